"""The endpoints the gateway serves, in one table: each endpoint's path, how its request is shaped
and accounted, and which of vLLM's serving objects answers it.

    endpoint     path                    output cap field(s)                  vLLM serving object
    chat         /v1/chat/completions    max_completion_tokens, max_tokens    openai_serving_chat
    completion   /v1/completions         max_tokens                           openai_serving_completion
    responses    /v1/responses           max_output_tokens                    openai_serving_responses
    messages     /v1/messages            max_tokens (Anthropic's errors)      anthropic_serving_messages
    tokenize     /tokenize               (generates nothing)                  serving_tokenization
    detokenize   /detokenize             (generates nothing)                  serving_tokenization

Every endpoint takes the same corridor through the ingress (`apps.ingress`): authenticate, read,
authorize, shape (`apps.validation`, with the table's rules), reserve, admit, route, engine,
relay, account. An endpoint that generates nothing (tokenize) takes no admission slot and reserves
no tokens: a rate-limited key pays one request for it.

Endpoints whose prompt is a conversation (chat, responses, messages, a chat tokenize) give their
turns as chat messages (`conversation`), so the prompt estimate, the router's prefix and the
volatile-prefix check read every one of them the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from apps.errors import ErrorStyle, InvalidRequest

Endpoint = Literal["chat", "completion", "responses", "messages", "tokenize", "detokenize"]
# A conversation as chat messages ({"role", "content"}), or None: the body's prompt is `prompt`.
Conversation = Callable[[Mapping[str, Any]], list[Any] | None]


def chat_messages(body: Mapping[str, Any]) -> list[Any] | None:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else []


def no_conversation(body: Mapping[str, Any]) -> None:
    return None


def responses_turns(body: Mapping[str, Any]) -> list[Any]:
    """A Responses request's `instructions` and `input` items, as chat messages. An item that
    is not a message (a function call's output, say) counts with its `output` text."""
    turns: list[Any] = []
    if isinstance(body.get("instructions"), str):
        turns.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return [*turns, {"role": "user", "content": items}]
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            content = item.get("content", item.get("output"))
            turns.append({"role": item.get("role", item.get("type")), "content": content})
    return turns


def anthropic_turns(body: Mapping[str, Any]) -> list[Any]:
    """A Messages request's `system` and `messages`, as chat messages (Anthropic's text blocks
    hold their text in `text`, as OpenAI's content parts do)."""
    system = body.get("system")
    turns: list[Any] = [{"role": "system", "content": system}] if system else []
    messages = body.get("messages")
    return turns + (messages if isinstance(messages, list) else [])


def tokenize_turns(body: Mapping[str, Any]) -> list[Any] | None:
    """A tokenize request holds either a chat's `messages` or a completion's `prompt`."""
    return chat_messages(body) if "messages" in body else None


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# A Responses request that reads or writes vLLM's response store: the store lives in one
# engine's memory, so a later request routed to another replica would not find it.
STORED_RESPONSE_FIELDS = ("previous_response_id", "background")


def chat_rule(body: dict[str, Any]) -> dict[str, Any]:
    """A non-empty list of objects with one of OpenAI's roles (vLLM would pass any role string to
    the chat template, which renders a prompt the model was never trained on)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty list.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"`messages[{i}]` must be an object.", param=f"messages.{i}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"`messages[{i}].role` must be one of {sorted(CHAT_ROLES)}. Given: {role!r}",
                param=f"messages.{i}.role",
            )
    return body


def completion_rule(body: dict[str, Any]) -> dict[str, Any]:
    """`best_of` is accepted when it asks for no more candidates than choices (the answer is
    then the same), and dropped: vLLM's V1 engine does not generate extra candidates, and
    ignoring a larger `best_of` would answer with fewer samples than were asked for."""
    if "best_of" not in body:
        return body
    best_of, choices = body["best_of"], body.get("n") or 1
    if best_of is not None and (not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < 1):
        raise InvalidRequest(f"`best_of` must be a positive integer. Given: {best_of!r}", param="best_of")
    if best_of is not None and isinstance(choices, int) and best_of > choices:
        raise InvalidRequest(
            f"`best_of` ({best_of}) larger than `n` ({choices}) is not supported: the engine "
            "(vLLM V1) generates only the choices it returns. Send `n` candidates and pick one.",
            param="best_of",
            code="unsupported_parameter",
        )
    return {name: value for name, value in body.items() if name != "best_of"}


def responses_rule(body: dict[str, Any]) -> dict[str, Any]:
    """Stored responses are refused (`STORED_RESPONSE_FIELDS`, `store: true`); a request that
    does not say is not stored (vLLM, without its store, ignores `store` anyway), and its answer
    says `store: false`."""
    for name in STORED_RESPONSE_FIELDS:
        if body.get(name):
            raise _unstored(name)
    if body.get("store") is True:
        raise _unstored("store")
    return body | {"store": False}


def _unstored(name: str) -> InvalidRequest:
    return InvalidRequest(
        f"`{name}` needs stored responses, which this gateway does not keep: a response lives in "
        "one engine's memory and the next request may reach another replica. Send the whole "
        "conversation in `input` instead.",
        param=name,
        code="unsupported_parameter",
    )


def tokenize_rule(body: dict[str, Any]) -> dict[str, Any]:
    return chat_rule(body) if "messages" in body else body


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint: its path, its shaping and accounting rules, and vLLM's serving of it."""

    name: Endpoint
    path: str
    # The fields a client may cap the output with (first wins when both are given), and the one
    # the shaped body carries. None: the endpoint generates nothing (no admission slot, no tokens).
    max_tokens_fields: tuple[str, ...]
    output_field: str | None
    conversation: Conversation
    # vLLM: the protocol model(s) ("module:Class"; chosen by the body's `messages` when two),
    # the serving object's attribute on vLLM's app state, and its method.
    request_types: tuple[str, ...]
    serving: str
    method: str
    # How the serving object's answer is written as JSON (pydantic's model_dump_json options),
    # as vLLM's own router writes it.
    json_options: Mapping[str, bool] = field(default_factory=dict)
    stop_field: str | None = None  # the body's list of stop sequences
    choices: bool = False  # the body may ask for several choices (`n`)
    resumable: bool = False  # a stream that may continue on another replica (`apps.resume`)
    # The endpoint's own checks of a body (400), and the body it forwards.
    rule: Callable[[dict[str, Any]], dict[str, Any]] = lambda body: body
    errors: ErrorStyle = "openai"

    @property
    def generates(self) -> bool:
        return self.output_field is not None


_PROTOCOL = "vllm.entrypoints"
ENDPOINTS: dict[Endpoint, EndpointSpec] = {
    spec.name: spec
    for spec in (
        EndpointSpec(
            "chat",
            "/v1/chat/completions",
            ("max_completion_tokens", "max_tokens"),
            "max_tokens",
            chat_messages,
            (f"{_PROTOCOL}.openai.chat_completion.protocol:ChatCompletionRequest",),
            "openai_serving_chat",
            "create_chat_completion",
            stop_field="stop",
            choices=True,
            resumable=True,
            rule=chat_rule,
        ),
        EndpointSpec(
            "completion",
            "/v1/completions",
            ("max_tokens",),
            "max_tokens",
            no_conversation,
            (f"{_PROTOCOL}.openai.completion.protocol:CompletionRequest",),
            "openai_serving_completion",
            "create_completion",
            stop_field="stop",
            choices=True,
            resumable=True,
            rule=completion_rule,
        ),
        EndpointSpec(
            "responses",
            "/v1/responses",
            ("max_output_tokens",),
            "max_output_tokens",
            responses_turns,
            (f"{_PROTOCOL}.openai.responses.protocol:ResponsesRequest",),
            "openai_serving_responses",
            "create_responses",
            json_options={"by_alias": True},
            rule=responses_rule,
        ),
        EndpointSpec(
            "messages",
            "/v1/messages",
            ("max_tokens",),
            "max_tokens",
            anthropic_turns,
            (f"{_PROTOCOL}.anthropic.protocol:AnthropicMessagesRequest",),
            "anthropic_serving_messages",
            "create_messages",
            json_options={"exclude_none": True},
            stop_field="stop_sequences",
            errors="anthropic",
        ),
        EndpointSpec(
            "tokenize",
            "/tokenize",
            (),
            None,
            tokenize_turns,
            (
                f"{_PROTOCOL}.serve.tokenize.protocol:TokenizeCompletionRequest",
                f"{_PROTOCOL}.serve.tokenize.protocol:TokenizeChatRequest",
            ),
            "serving_tokenization",
            "create_tokenize",
            rule=tokenize_rule,
        ),
        EndpointSpec(
            "detokenize",
            "/detokenize",
            (),
            None,
            no_conversation,
            (f"{_PROTOCOL}.serve.tokenize.protocol:DetokenizeRequest",),
            "serving_tokenization",
            "create_detokenize",
        ),
    )
}
ENDPOINTS_BY_PATH: dict[str, EndpointSpec] = {spec.path: spec for spec in ENDPOINTS.values()}


def error_style(path: str) -> ErrorStyle:
    """How errors are written on `path`: Anthropic's format on its Messages endpoint."""
    spec = ENDPOINTS_BY_PATH.get(path)
    return spec.errors if spec is not None else "openai"
