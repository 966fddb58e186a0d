"""The OpenAPI document the gateway serves, made to say what the gateway really answers.

FastAPI derives a route's schema from its signature; this adds what the signature cannot say,
so that a client generated from the document, or a schema fuzzer such as schemathesis, sees
the truth: which models exist (an enum, per kind), only idle values of the fields that no
configured model honours (chat_fields.py), the OpenAI-shaped errors each route gives
(and no 422: validation errors leave as 400), SSE as a second content type of a streamed chat,
and optional headers and query parameters as plain values (a header cannot carry JSON null).
"""

from __future__ import annotations

from typing import Any

from . import chat_fields
from .config import SmmfConfig
from .gateway_models import COMPLETION_REFUSES

#: OpenAI's error body.
ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_WHY = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model, stream or key",
        409: "The key alias is taken", 413: "Request body too large",
        429: "The model's queue is full (with Retry-After)",
        502: "The job failed on its worker",
        503: "No live worker, or Redis unreachable (with Retry-After)", 504: "The job's deadline passed"}
_JOB_ERRORS = [400, 401, 404, 413, 429, 502, 503, 504]
#: (path, method) → the error statuses it may answer.
ROUTE_ERRORS = {
    ("/v1/chat/completions", "post"): _JOB_ERRORS,
    ("/v1/chat/completions/{completion_id}/stream", "get"): _JOB_ERRORS,
    ("/v1/completions", "post"): _JOB_ERRORS,
    ("/v1/embeddings", "post"): _JOB_ERRORS,
    ("/v1/rerank", "post"): _JOB_ERRORS,
    ("/rerank", "post"): _JOB_ERRORS,
    ("/v1/models", "get"): [401, 503],
    ("/metrics", "get"): [503],
    ("/readyz", "get"): [503],
    # The admin API (gateway_keys.py), with a master key only.
    ("/usage", "get"): [400, 401, 404, 503],
    ("/key/generate", "post"): [400, 401, 409, 503],
    ("/key/info", "get"): [400, 401, 404, 503],
    ("/key/list", "get"): [400, 401, 503],
    ("/key/update", "post"): [400, 401, 404, 409, 503],
    ("/key/delete", "post"): [400, 401, 404, 503],
}
#: one SSE event of a streamed chat (schemathesis checks each event against it).
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "id": {"type": "string"}}}
#: a message's content part that every model honours.
TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
#: content parts some model may honour beyond text, by type.
PARTS = {"image_url": {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"const": "image_url"},
    "image_url": {"type": "object", "required": ["url"], "properties": {
        "url": {"type": "string"}, "detail": {"enum": ["auto", "low", "high"]}}}}}}
#: schema components whose `model` names a model of one kind.
MODEL_FIELDS = {"ChatCompletionRequest": "llm", "CompletionRequest": "llm", "EmbeddingsRequest": "embedding",
                "RerankRequest": "reranker"}


def complete(schema: dict[str, Any], config: SmmfConfig) -> dict[str, Any]:
    """FastAPI's document for the gateway of `config`, completed as the module docstring says."""
    names = {kind: [m.name for m in config.models if m.kind == kind] for kind in MODEL_FIELDS.values()}
    for component, kind in MODEL_FIELDS.items():
        if names[kind]:  # no model of a kind: any name is a documented 404
            schema["components"]["schemas"][component]["properties"]["model"]["enum"] = names[kind]
    schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]["maximum"] = (
        config.gateway.max_n)
    _only_what_models_honour(schema["components"]["schemas"],
                             {name for m in config.models if m.kind == "llm" for name in m.supports})
    _embeddings_as_accepted(schema["components"]["schemas"]["EmbeddingsRequest"]["properties"],
                            any(chat_fields.DIMENSIONS in m.supports for m in config.embeddings))
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            _complete_operation(path, method, operation, names["llm"])
    schema["components"]["schemas"].pop("HTTPValidationError", None)
    schema["components"]["schemas"].pop("ValidationError", None)
    return schema


def _only_what_models_honour(components: dict[str, Any], honoured: set[str]) -> None:
    """Each output-changing field that no configured model honours documented with only the
    values that ask for nothing (anything else is a 400; a chat's `n` the gateway honours
    itself), and content parts limited to text and the kinds some model honours. The document covers every model at once: where only some
    models honour a field, the others answer it with the documented 400."""
    for component, offered in (("ChatCompletionRequest", honoured | {"n"}),
                               ("CompletionRequest", honoured - COMPLETION_REFUSES)):
        request = components[component]["properties"]
        required = components[component].get("required", [])
        for name, idle in chat_fields.OUTPUT_CHANGING.items():
            if name in request and name not in offered and name not in required:
                request[name] = _only(idle, request[name], "no configured model honours it")
    message = components["_Message"]["properties"]
    if chat_fields.TOOL_CALLS_IN_MESSAGES not in honoured:
        message["tool_calls"] = _only((None, []), message["tool_calls"], "no configured model takes tools")
    parts = next(option for option in message["content"]["anyOf"] if option.get("type") == "array")
    kinds = [part for kind, part in PARTS.items() if chat_fields.part_field(kind) in honoured]
    parts["items"] = {"anyOf": [TEXT_PART, *kinds]} if kinds else TEXT_PART
    components.pop("_ContentPart", None)


def _embeddings_as_accepted(request: dict[str, Any], dimensions: bool) -> None:
    """`input` as text only (token ids are refused), and `dimensions` only where some embedding
    model honours it."""
    request["input"]["anyOf"] = [option for option in request["input"]["anyOf"]
                                 if "integer" not in str(option)]
    if not dimensions:
        request[chat_fields.DIMENSIONS] = _only((None,), request[chat_fields.DIMENSIONS],
                                                "no configured embedding model honours it")


def _only(values: tuple[Any, ...], field: dict[str, Any], why: str) -> dict[str, Any]:
    """A field's schema narrowed to `values` (null only where the field takes it)."""
    nullable = any(option.get("type") == "null" for option in field.get("anyOf", [field]))
    return {"enum": [value for value in values if value is not None or nullable],
            "description": f"Only values that ask for nothing: {why} (others are refused with "
                           "400 unsupported_parameter)."}


def _complete_operation(path: str, method: str, operation: dict[str, Any], llms: list[str]) -> None:
    responses = operation["responses"]
    responses.pop("422", None)
    for status in ROUTE_ERRORS.get((path, method), []):
        responses[str(status)] = {"description": _WHY[status],
                                  "content": {"application/json": {"schema": ERROR}}}
    for parameter in operation.get("parameters", []):
        options = parameter["schema"].pop("anyOf", None)
        if options:  # `X | None` with a default: the value, or the parameter left out
            parameter["schema"].update(next(o for o in options if o.get("type") != "null"))
        if parameter["name"] == "model":
            parameter["schema"]["enum"] = llms
    if path in ("/v1/chat/completions", "/v1/completions"):  # JSON, or SSE when `stream` is true
        responses["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    if path.endswith("/stream"):
        responses["200"]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    if path == "/metrics":
        responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
