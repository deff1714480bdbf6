"""The SSE line reader of the clients here (scripts/sse.py): lines end at LF only, whatever the
generated text holds and wherever the network cuts the bytes."""

from __future__ import annotations

import asyncio
import json

import httpx

from scripts.sse import LineSplitter, aiter_sse_lines, iter_sse_lines, sse_lines

# Characters str.splitlines (and so httpx's iter_lines) breaks at, which JSON leaves unescaped.
LINE_BREAKS_TO_PYTHON = "\x85\u2028\u2029"
EVENT = "data: " + json.dumps({"delta": {"content": f"a{LINE_BREAKS_TO_PYTHON}é b"}}, ensure_ascii=False)
STREAM = f"{EVENT}\r\n\r\ndata: [DONE]\n\n".encode()


def test_a_line_ends_at_lf_only_wherever_the_bytes_are_cut():
    for cut in range(1, len(STREAM)):  # including inside a character's UTF-8 bytes
        splitter = LineSplitter()
        lines = splitter.feed(STREAM[:cut]) + splitter.feed(STREAM[cut:]) + splitter.end()
        assert lines == [EVENT, "", "data: [DONE]", ""], cut


def test_a_last_line_without_lf_is_kept():
    splitter = LineSplitter()
    assert splitter.feed(b"data: 1\ndata: 2") == ["data: 1"]
    assert splitter.end() == ["data: 2"]


def test_the_readers_of_a_response_split_the_same_way_and_keep_an_unfinished_last_line():
    body = STREAM + b"data: cut"
    expected = [EVENT, "", "data: [DONE]", "", "data: cut"]
    assert list(iter_sse_lines(httpx.Response(200, content=body))) == expected

    async def chunks():
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    async def read() -> list[str]:
        return [line async for line in aiter_sse_lines(httpx.Response(200, content=chunks()))]

    assert asyncio.run(read()) == expected


def test_a_whole_body_splits_as_the_stream_does():
    assert sse_lines(STREAM.decode()) == [EVENT, "", "data: [DONE]", "", ""]
