"""The lines of a server-sent event stream, for the clients here (benchmarks, the drill, tests).

httpx's `iter_lines` splits the way `str.splitlines` does: also at U+0085, U+2028 and U+2029,
which JSON leaves unescaped. A model's generated text may hold one of them (a tiny model's random
text can, as two byte-level tokens), and the event's `data:` line then reaches the client in
two pieces, neither of them JSON. Lines here end at LF, with a CR before it dropped: what every
server these clients talk to writes (the SSE format also allows a lone CR, which none does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx


class LineSplitter:
    """Splits a byte stream that arrives in pieces cut anywhere into lines, decoded as UTF-8 (the
    byte of LF is never part of a longer character's encoding, so a line splits cleanly)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines `chunk` completes."""
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return [_decoded(line) for line in lines]

    def end(self) -> list[str]:
        """The last line, if the stream did not end with LF."""
        return [_decoded(self._pending)] if self._pending else []


def _decoded(line: bytes) -> str:
    # As httpx's readers do: a bad byte becomes U+FFFD, not an error that ends a benchmark run.
    return line.removesuffix(b"\r").decode(errors="replace")


def sse_lines(body: str) -> list[str]:
    """The lines of a whole SSE body already read."""
    return [line.removesuffix("\r") for line in body.split("\n")]


def iter_sse_lines(response: httpx.Response) -> Iterator[str]:
    """The lines of a streamed response's body, as they arrive."""
    splitter = LineSplitter()
    for chunk in response.iter_bytes():
        yield from splitter.feed(chunk)
    yield from splitter.end()


async def aiter_sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of a streamed response's body, as they arrive (an async client's)."""
    splitter = LineSplitter()
    async for chunk in response.aiter_bytes():
        for line in splitter.feed(chunk):
            yield line
    for line in splitter.end():
        yield line
