"""Which fields of OpenAI's chat request reach a model, and what happens to the others.

The wire (`jobs.SamplingParams`) carries the sampling fields every provider honours:
temperature, top_p, max_tokens (max_completion_tokens), stop, seed. A field that would change
the reply beyond those reaches a model only if its provider says it honours it
(`ProviderSpec.supports`); none does yet. Any other such field gets a 400
`unsupported_parameter` naming the field and the model (the gateway) or `UnsupportedParameter`
(the SDK), before anything is enqueued; a model with `drop_params = true` (LiteLLM's name) has
them dropped instead, and the gateway says which in the `x-smmf-dropped-params` header. Fields
that change nothing in the reply (`user`, `metadata`, `store`, ...) are accepted and not sent on.
Nothing reaches a model that would silently ignore it.
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedParameter

#: output-changing fields of OpenAI's chat request, each with the values that ask for nothing
#: (the field may be sent with one of them, as many clients do).
OUTPUT_CHANGING: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "n": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,),
}
#: content parts a model could only ignore: everything but text.
TEXT_PART = "text"


def asked(fields: dict[str, Any], messages: list[dict[str, Any]]) -> list[str]:
    """The output-changing fields a request asks for, in a stable order; image (or any other
    non-text) parts of the messages count as `messages[].content[].<type>`."""
    named = [name for name, idle in OUTPUT_CHANGING.items()
             if name in fields and fields[name] not in idle]
    parts = {part.get("type", "?") for message in messages
             if isinstance(message.get("content"), list) for part in message["content"]
             if isinstance(part, dict) and part.get("type") != TEXT_PART}
    return named + [f"messages[].content[].{kind}" for kind in sorted(parts)]


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
