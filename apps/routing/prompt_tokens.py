"""A request's prompt as the engine will see it, in tokens, for routing on cached KV blocks.

The precise-prefix router (`apps.routing.router`) matches a prompt's blocks against what each engine
caches (`apps.routing.kv_index`), so it needs the prompt's token ids before the engine has them: the chat
template rendered and the text tokenized as vLLM's OpenAI layer does (the suite checks the ids
against the engine's own, tests/test_routing_cache.py). Other endpoints route by the prefix hash.

Only what this module renders exactly as vLLM does is tokenized: a completion's text prompt, and
a chat of system, user and assistant messages whose content is text (a string or text parts),
rendered in the template's "string" content format (text parts joined by newlines, as vLLM does
for most templates). Tools, tool calls, other roles, images, a per-request chat template or
documents, a `cache_salt` (vLLM mixes it into the first block's hash) make the prompt one this
module does not tokenize, and the request routes by the prefix hash.

A model's tokenizer loads in a thread the first time it is needed (requests route by the prefix
hash meanwhile) and stays loaded for the process's life; a failed load is tried again a minute
later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from apps.endpoints import ENDPOINTS, first_prompt, message_text

logger = logging.getLogger("ray.serve")

# The leading characters of a rendered prompt that are tokenized (about 0.3 ms of CPU per 2,000
# characters here): the router matches cached runs within them, so a long prompt costs the
# ingress no more than this. Past a cut, the last tokens may differ from the full text's: the
# cut prompt's last CUT_MARGIN_TOKENS are dropped.
TOKENIZED_CHARS = 16_384
CUT_MARGIN_TOKENS = 16
# A failed tokenizer load is tried again after this long.
RETRY_LOAD_S = 60.0
# Chat messages rendered here: these roles, with these keys.
PLAIN_ROLES = frozenset({"system", "user", "assistant"})
PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "name"})
# Chat request fields that change the rendered prompt in ways this module does not follow.
UNRENDERED_FIELDS = (
    "tools",
    "chat_template",
    "documents",
    "cache_salt",
    "reasoning_effort",
    "mm_processor_kwargs",
    "add_special_tokens",
)

_tokenizers: dict[str, Any] = {}  # path -> tokenizer; None while loading
_failed_at: dict[str, float] = {}  # path -> time.monotonic() of its last failed load
_lock = threading.Lock()


def loaded_tokenizer(path: str) -> Any | None:
    """The tokenizer at `path`, or None while it loads (started here on first call, and again a
    minute after a failed load)."""
    with _lock:
        if path in _tokenizers:
            return _tokenizers[path]
        if time.monotonic() - _failed_at.get(path, -RETRY_LOAD_S) < RETRY_LOAD_S:
            return None
        _tokenizers[path] = None
    threading.Thread(target=_load, args=(path,), name="tokenizer-load", daemon=True).start()
    return None


def _load(path: str) -> None:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        logger.exception("Loading the tokenizer at %s failed: routing by the prefix hash", path)
        with _lock:
            del _tokenizers[path]
            _failed_at[path] = time.monotonic()
        return
    with _lock:
        _tokenizers[path] = tokenizer


def prompt_token_ids(tokenizer: Any, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
    """The prompt's token ids as vLLM renders `body` for `endpoint`; None where this module does
    not render the endpoint, or the body does not render (the engine will say why)."""
    try:
        if endpoint == "chat":
            return _chat_ids(tokenizer, body)
        if endpoint == "completion":
            prompt = first_prompt(ENDPOINTS["completion"], body)
            return _encode(tokenizer, prompt, add_special_tokens=True) if prompt else None
    except Exception:  # a template's own error (roles out of order, ...): the engine reports it
        return None
    return None


def _chat_ids(tokenizer: Any, body: Mapping[str, Any]) -> list[int] | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or any(body.get(name) for name in UNRENDERED_FIELDS):
        return None
    conversation = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in PLAIN_ROLES:
            return None
        if not PLAIN_MESSAGE_KEYS.issuperset(message):
            return None
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                return None
            # vLLM's "string" content format: a list's text parts joined by newlines.
            content = "\n".join(message_text([part]) for part in content)
        elif content is None:
            content = ""  # as vLLM passes it to the template
        elif not isinstance(content, str):
            return None
        conversation.append({**message, "content": content})
    kwargs = body.get("chat_template_kwargs")
    text = tokenizer.apply_chat_template(
        conversation,
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        tokenize=False,
        **(kwargs if isinstance(kwargs, dict) else {}),
    )
    # The template writes the special tokens itself.
    return _encode(tokenizer, text, add_special_tokens=False)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """`text`'s token ids, of its first TOKENIZED_CHARS characters at most."""
    if len(text) <= TOKENIZED_CHARS:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    ids = tokenizer.encode(text[:TOKENIZED_CHARS], add_special_tokens=add_special_tokens)
    return list(ids[:-CUT_MARGIN_TOKENS])
