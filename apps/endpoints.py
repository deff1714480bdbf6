"""The endpoints the gateway serves, in one table: each endpoint's path, how its request is shaped
and accounted, and which of vLLM's serving objects answers it.

    endpoint      path                        task      output cap field(s)      vLLM serving object
    chat          /v1/chat/completions        generate  max_completion_tokens,   openai_serving_chat
                                                        max_tokens
    completion    /v1/completions             generate  max_tokens               openai_serving_completion
    responses     /v1/responses               generate  max_output_tokens        openai_serving_responses
    messages      /v1/messages                generate  max_tokens               anthropic_serving_messages
    count_tokens  /v1/messages/count_tokens   generate  (the tokenizer only)     anthropic_serving_messages
    embeddings    /v1/embeddings              embed     (pooling: none)          serving_embedding
    score         /v1/score                   embed,    (pooling: none)          serving_scores
                                              score
    rerank        /v1/rerank                  embed,    (pooling: none)          serving_scores
                                              score
    tokenize      /tokenize                   any       (the tokenizer only)     serving_tokenization
    detokenize    /detokenize                 any       (the tokenizer only)     serving_tokenization

Every endpoint takes the same corridor through the ingress (`apps.edge.ingress`): authenticate, read,
authorize, shape (`apps.shaping.validation`, with the table's rules), reserve, admit, route, engine,
relay, account. A pooling request reserves its inputs' tokens; tokenize reserves none (a
rate-limited key pays one request for it) and holds its admission slot for the milliseconds it
runs (a slot of the model's replicas too: left out of the gate, a flood of them would fill the
replicas under the gate's count). Errors are OpenAI's, except on /v1/messages and its
count_tokens (Anthropic's).

A body's prompt reads one of two ways: a conversation (chat, Responses, Messages, a chat
tokenize), given as chat messages (`conversation`), or a list of prompts (`prompts`: a
completion's, an embeddings request's inputs, a score's texts). The prompt estimate, the router's
prefix and the volatile-prefix check read every endpoint through these two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from apps.config import ModelTask
from apps.errors import ErrorStyle, InvalidRequest

Endpoint = Literal[
    "chat",
    "completion",
    "responses",
    "messages",
    "count_tokens",
    "embeddings",
    "score",
    "rerank",
    "tokenize",
    "detokenize",
]
GENERATE: frozenset[ModelTask] = frozenset({"generate"})
EMBED: frozenset[ModelTask] = frozenset({"embed"})
SCORE: frozenset[ModelTask] = frozenset({"embed", "score"})  # by cosine similarity, or a cross-encoder
ANY_TASK: frozenset[ModelTask] = frozenset({"generate", "embed", "score"})
# A conversation as chat messages ({"role", "content"}), or None: the body holds prompts instead.
Conversation = Callable[[Mapping[str, Any]], list[Any] | None]


def completion_prompts(prompt: Any) -> list[Any]:
    """A completion's prompts: a string or token-id list is one; a list of them is several."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return prompt
    return [prompt]


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def field_prompts(*names: str) -> Callable[[Mapping[str, Any]], list[Any]]:
    """The prompts in the body's fields `names` (each one prompt, or a list of them)."""

    def prompts(body: Mapping[str, Any]) -> list[Any]:
        return [item for name in names if name in body for item in completion_prompts(body[name])]

    return prompts


def no_prompts(body: Mapping[str, Any]) -> list[Any]:
    return []


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


def messages_if_any(body: Mapping[str, Any]) -> list[Any] | None:
    """A tokenize or embeddings request holds either a chat's `messages` or prompts."""
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
    does not say is sent with `store: false` (vLLM, without its store, ignores `store` anyway)."""
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


def messages_rule(body: dict[str, Any]) -> dict[str, Any]:
    return chat_rule(body) if "messages" in body else body


# OpenAI's encodings. vLLM's `bytes` formats put the shapes in response headers, which the
# model server's answer does not carry.
EMBEDDING_ENCODINGS = (None, "float", "base64")


def embeddings_rule(body: dict[str, Any]) -> dict[str, Any]:
    encoding = body.get("encoding_format")
    if encoding not in EMBEDDING_ENCODINGS:
        raise InvalidRequest(
            f"`encoding_format` must be `float` or `base64`. Given: {encoding!r}",
            param="encoding_format",
        )
    return messages_rule(body)


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint: its path, its shaping and accounting rules, and vLLM's serving of it."""

    name: Endpoint
    path: str
    tasks: frozenset[ModelTask]  # the models that serve it (`ModelConfig.task`)
    # The fields a client may cap the output with (first wins when both are given), and the one
    # the shaped body carries. None: the endpoint generates nothing.
    max_tokens_fields: tuple[str, ...]
    output_field: str | None
    conversation: Conversation
    prompts: Callable[[Mapping[str, Any]], list[Any]]  # when the body is no conversation
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
    pooling: bool = False  # one engine pass per input, capped by `limits.max_inputs`
    resumable: bool = False  # a stream that may continue on another replica (`apps.routing.resume`)
    # The endpoint's own checks of a body (400), and the body it forwards.
    rule: Callable[[dict[str, Any]], dict[str, Any]] = lambda body: body
    errors: ErrorStyle = "openai"  # its error bodies and stream error events (`apps.errors`)


def first_prompt(spec: EndpointSpec, body: Mapping[str, Any]) -> str:
    """The body's first prompt when it is text ("" for token ids or none), for a body that is
    no conversation."""
    prompts = spec.prompts(body)
    return prompts[0] if prompts and isinstance(prompts[0], str) else ""


_PROTOCOL = "vllm.entrypoints"
ENDPOINTS: dict[Endpoint, EndpointSpec] = {
    spec.name: spec
    for spec in (
        EndpointSpec(
            "chat",
            "/v1/chat/completions",
            GENERATE,
            ("max_completion_tokens", "max_tokens"),
            "max_tokens",
            chat_messages,
            no_prompts,
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
            GENERATE,
            ("max_tokens",),
            "max_tokens",
            no_conversation,
            field_prompts("prompt"),
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
            GENERATE,
            ("max_output_tokens",),
            "max_output_tokens",
            responses_turns,
            no_prompts,
            (f"{_PROTOCOL}.openai.responses.protocol:ResponsesRequest",),
            "openai_serving_responses",
            "create_responses",
            json_options={"by_alias": True},
            rule=responses_rule,
            errors="responses",
        ),
        EndpointSpec(
            "messages",
            "/v1/messages",
            GENERATE,
            ("max_tokens",),
            "max_tokens",
            anthropic_turns,
            no_prompts,
            (f"{_PROTOCOL}.anthropic.protocol:AnthropicMessagesRequest",),
            "anthropic_serving_messages",
            "create_messages",
            json_options={"exclude_none": True},
            stop_field="stop_sequences",
            errors="anthropic",
        ),
        EndpointSpec(
            "count_tokens",  # Anthropic's messages.count_tokens: the prompt's tokens
            "/v1/messages/count_tokens",
            GENERATE,
            (),
            None,
            anthropic_turns,
            no_prompts,
            (f"{_PROTOCOL}.anthropic.protocol:AnthropicCountTokensRequest",),
            "anthropic_serving_messages",
            "count_tokens",
            json_options={"exclude_none": True},
            errors="anthropic",
        ),
        EndpointSpec(
            "embeddings",
            "/v1/embeddings",
            EMBED,
            (),
            None,
            messages_if_any,
            field_prompts("input"),
            (
                f"{_PROTOCOL}.pooling.embed.protocol:EmbeddingCompletionRequest",
                f"{_PROTOCOL}.pooling.embed.protocol:EmbeddingChatRequest",
            ),
            "serving_embedding",
            "__call__",
            pooling=True,
            rule=embeddings_rule,
        ),
        EndpointSpec(
            "score",
            "/v1/score",
            SCORE,
            (),
            None,
            no_conversation,
            field_prompts("queries", "documents", "items", "data_1", "data_2", "text_1", "text_2"),
            tuple(
                f"{_PROTOCOL}.pooling.scoring.protocol:{name}"
                for name in (
                    "ScoreQueriesDocumentsRequest",
                    "ScoreQueriesItemsRequest",
                    "ScoreDataRequest",
                    "ScoreTextRequest",
                )
            ),
            "serving_scores",
            "__call__",
            pooling=True,
        ),
        EndpointSpec(
            "rerank",
            "/v1/rerank",
            SCORE,
            (),
            None,
            no_conversation,
            field_prompts("query", "documents"),
            (f"{_PROTOCOL}.pooling.scoring.protocol:RerankRequest",),
            "serving_scores",
            "__call__",
            pooling=True,
        ),
        EndpointSpec(
            "tokenize",
            "/tokenize",
            ANY_TASK,
            (),
            None,
            messages_if_any,
            field_prompts("prompt"),
            (
                f"{_PROTOCOL}.serve.tokenize.protocol:TokenizeCompletionRequest",
                f"{_PROTOCOL}.serve.tokenize.protocol:TokenizeChatRequest",
            ),
            "serving_tokenization",
            "create_tokenize",
            rule=messages_rule,
        ),
        EndpointSpec(
            "detokenize",
            "/detokenize",
            ANY_TASK,
            (),
            None,
            no_conversation,
            no_prompts,
            (f"{_PROTOCOL}.serve.tokenize.protocol:DetokenizeRequest",),
            "serving_tokenization",
            "create_detokenize",
        ),
    )
}
ENDPOINTS_BY_PATH: dict[str, EndpointSpec] = {spec.path: spec for spec in ENDPOINTS.values()}


def endpoint_of(scope: Mapping[str, Any]) -> EndpointSpec | None:
    """The endpoint an HTTP request's scope is for, if any: by its path within the app (without
    the prefix the app is mounted at, Serve's `route_prefix`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return ENDPOINTS_BY_PATH.get(path)


def error_style(scope: Mapping[str, Any]) -> ErrorStyle:
    """How errors are written for a request: Anthropic's format on its Messages endpoint."""
    spec = endpoint_of(scope)
    return spec.errors if spec is not None else "openai"
