"""Which fields of OpenAI's chat request reach a model, and what happens to the others.

Every provider honours the common sampling fields: temperature, top_p, max_tokens
(max_completion_tokens), stop, seed. A field that would change the reply beyond those reaches
a model only if its provider says it honours it (`ProviderSpec.supports`, refined per model by
`providers.honoured`): tools, response_format, logprobs, penalties, logit_bias, a completion's
prompt and image parts travel on the wire (jobs.py, wire 2) to those that do. Any other such field gets a 400
`unsupported_parameter` naming the field and the model (the gateway) or `UnsupportedParameter`
(the SDK), before anything is enqueued; a model with `drop_params = true` (LiteLLM's name) has
them dropped instead, and the gateway says which in the `x-smmf-dropped-params` header. Fields
that change nothing in the reply (`metadata`, `store`, ...) are accepted and not sent on; `user`
goes to the APIs that take it (proxies). Nothing reaches a model that would silently ignore it.
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedParameter
from .providers import PROVIDERS, honoured, honoured_when

#: output-changing fields of OpenAI's chat request, each with the values that ask for nothing
#: (the field may be sent with one of them, as many clients do).
OUTPUT_CHANGING: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True),
    "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "n": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,),
    # the completions API: a prompt in place of messages, no chat template; its own fields
    "prompt": (None,), "suffix": (None, ""), "best_of": (None, 1),
}
#: content parts a model could only ignore: everything but text.
TEXT_PART = "text"
#: the request fields that travel at the top of a ChatRequest (jobs.py), not in its params.
REQUEST_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "response_format",
                            "prompt", "logprobs", "top_logprobs", "user"})
#: the embeddings request's one output-changing field beyond the texts (OpenAI's).
DIMENSIONS = "dimensions"
#: fields that change nothing in the reply: accepted and not sent on (`user` is: proxies pass
#: it to their API, for its abuse monitoring).
NEUTRAL = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                     "stream_options"})
#: what an assistant turn's tool calls, sent back in a later request, count as.
TOOL_CALLS_IN_MESSAGES = "tools"


def asked(fields: dict[str, Any], messages: list[dict[str, Any]]) -> list[str]:
    """The output-changing fields a request asks for, in a stable order; image (or any other
    non-text) parts of the messages count as `messages[].content[].<type>`."""
    named = [name for name, idle in OUTPUT_CHANGING.items()
             if name in fields and fields[name] not in idle]
    parts = {part.get("type", "?") for message in messages
             if isinstance(message.get("content"), list) for part in message["content"]
             if isinstance(part, dict) and part.get("type") != TEXT_PART}
    if TOOL_CALLS_IN_MESSAGES not in named and any(m.get("tool_calls") for m in messages):
        named.append(TOOL_CALLS_IN_MESSAGES)
    return named + [part_field(kind) for kind in sorted(parts)]


def part_field(kind: str) -> str:
    """How a content part of type `kind` is named among the fields (`supports`, errors)."""
    return f"messages[].content[].{kind}"


def refuse_or_drop(fields: dict[str, Any], messages: list[dict[str, Any]], model: str,
                   supports: frozenset[str], drop_params: bool) -> list[str]:
    """The fields to drop (drop_params), after raising UnsupportedParameter for the first one
    the model cannot honour (without drop_params)."""
    unsupported = [name for name in asked(fields, messages) if name not in supports]
    if unsupported and not drop_params:
        raise UnsupportedParameter(
            f"model '{model}' cannot honour '{unsupported[0]}' (it would be ignored, so the request "
            f"is refused; set drop_params = true on the model to drop such fields instead)",
            param=unsupported[0], model=model)
    return unsupported


def split(fields: dict[str, Any], dropped: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level ChatRequest fields, sampling params) of what is not dropped; idle values
    (`tool_choice: "none"` without tools, `n: 1`...) are not sent on, and fields that change
    nothing in the reply (`metadata`, `store`...) are left out here."""
    kept = {name: value for name, value in fields.items() if name not in dropped
            and name not in NEUTRAL and value not in OUTPUT_CHANGING.get(name, (None,))}
    top = {name: value for name, value in kept.items() if name in REQUEST_FIELDS}
    params = {name: value for name, value in kept.items() if name not in REQUEST_FIELDS}
    return top, params


def shape_messages(messages: list[dict[str, Any]], dropped: list[str]) -> list[dict[str, Any]]:
    """The messages as the wire carries them: content parts that are all text joined into one
    string (what a wire-1 worker reads), dropped parts and tool calls left out, and no content
    (an assistant turn of tool calls) as ""."""
    shaped = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content", "")
        if isinstance(content, list):
            kept = [part for part in content if part.get("type") == TEXT_PART
                    or part_field(part.get("type", "?")) not in dropped]
            if all(part.get("type") == TEXT_PART for part in kept):
                content = "".join(part.get("text") or "" for part in kept)
            else:
                content = kept
        message["content"] = content
        if TOOL_CALLS_IN_MESSAGES in dropped:
            message.pop("tool_calls", None)
        shaped.append(message)
    return shaped


#: the rows of the support table: every output-changing field and content part kind.
TABLE_FIELDS = [*OUTPUT_CHANGING, part_field("image_url"), part_field("input_audio")]


def status(provider: str, field: str) -> str:
    """How models of `provider` treat `field`: "honoured" (by the engine in the worker),
    "forwarded" (an API is sent it unchanged and answers for it), "refused", or honoured with a
    condition on the model entry."""
    spec = PROVIDERS[provider]
    if field not in spec.supports:
        return "refused"
    if spec.extra == "proxy":
        return "forwarded"
    if field not in honoured(provider, {}):
        return f"honoured with {honoured_when(provider, field)}"
    return "honoured"


def chat_providers() -> list[str]:
    """The providers that serve chat models: the table's columns."""
    return [name for name, spec in PROVIDERS.items() if "llm" in spec.kinds]


def support_table() -> str:
    """The field × provider table, in Markdown (the README holds it; a test keeps it current)."""
    providers = chat_providers()
    lines = ["| field | " + " | ".join(f"`{p}`" for p in providers) + " |",
             "|---|" + "---|" * len(providers)]
    for field in TABLE_FIELDS:
        lines.append(f"| `{field}` | " + " | ".join(status(p, field) for p in providers) + " |")
    return "\n".join(lines) + "\n"
