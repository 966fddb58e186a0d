"""llama.cpp through llama-cpp-python: GGUF chat models (streamed) and embedding models.

The chat template comes from the GGUF file's own metadata unless `chat_format` names one of
llama-cpp-python's formats. A `Llama` object is not thread-safe, so a worker's jobs for one
model take turns on it (the model's `concurrency` defaults to 1 for this provider).

Usage is the engine's own count, though llama-cpp-python streams text, not tokens, and reports
no usage when streaming: a logits processor that changes nothing counts the tokens sampled, and
the context's length afterwards says how many of them were evaluated (`_SampleCounter`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp

from ..errors import JobFailed, ProviderUnavailable
from ..jobs import ChatRequest, Usage
from ..tool_calls import FragmentCleaner
from .base import ChatChunk, Embeddings, Provider, StopFilter, read_ahead

log = logging.getLogger("smmf_queue.providers.llamacpp")

#: context window when neither `context_length` nor `n_ctx` is set (0 would take the model's
#: full training context, which can be far more memory than a worker expects).
DEFAULT_N_CTX = 4096
#: llama.cpp's pooling types by name, for embedding models (`pooling_type` key).
POOLING = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
           "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}


class LlamaCppProvider(Provider):
    """A GGUF model run by llama.cpp in the worker process."""

    def check_hardware(self) -> None:
        path = self._path()
        if not Path(path).is_file():
            raise ProviderUnavailable(f"model '{self.model.name}': path '{path}' is not a GGUF file",
                                      model=self.model.name)

    def hardware(self) -> str:
        layers = self._gpu_layers()
        if layers and llama_cpp.llama_supports_gpu_offload():
            return f"llama.cpp gpu offload ({'all' if layers < 0 else layers} layers)"
        return "cpu"

    def load(self) -> None:
        if self._gpu_layers() and not llama_cpp.llama_supports_gpu_offload():
            log.warning("model %s: n_gpu_layers is set but this llama-cpp-python build has no GPU "
                        "support; running on the CPU", self.model.name)
        self._lock = threading.Lock()
        self.llm = llama_cpp.Llama(**self.llama_kwargs())

    def llama_kwargs(self) -> dict[str, Any]:
        """Arguments for llama_cpp.Llama from the model entry."""
        options = self.model.options
        kwargs: dict[str, Any] = {
            "model_path": self._path(),
            "n_ctx": int(self.model.context_length or options.get("n_ctx", DEFAULT_N_CTX)),
            "n_gpu_layers": self._gpu_layers(),
            "verbose": self.model.verbose,
        }
        for key in ("n_threads", "n_batch", "seed"):
            if key in options:
                kwargs[key] = int(options[key])
        if options.get("logits_all"):  # every token's logits kept: what logprobs need
            kwargs["logits_all"] = True
        if options.get("chat_format"):
            kwargs["chat_format"] = options["chat_format"]
        if self.model.kind == "embedding":
            kwargs["embedding"] = True
            kwargs["pooling_type"] = POOLING[options.get("pooling_type", "mean")]
        return kwargs

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        return read_ahead(self._generate(request), request.job_id)

    def _generate(self, request: ChatRequest) -> Iterator[ChatChunk]:
        kwargs: dict[str, Any] = request.params.given()
        stops = StopFilter(kwargs.pop("stop", []))  # ours: llama.cpp's would hide where it cut
        kwargs.update(self._structure(request))
        messages: Any = shown_tool_results([m.as_dict() for m in request.messages],
                                           self.model.options.get("chat_format"))
        counter = _SampleCounter(kwargs.get("max_tokens"))
        calls = FragmentCleaner()
        engine_finish = None
        with self._lock:
            # Streamed, it returns an iterator of chunk dicts (its type hints cover both modes);
            # whole when the model picks between text and a tool call, which it cannot stream.
            processors = llama_cpp.LogitsProcessorList([counter])
            output: Any = (
                self.llm.create_completion(prompt=request.prompt, stream=True,
                                           logits_processor=processors, **kwargs)
                if request.prompt is not None else
                self.llm.create_chat_completion(messages=messages, stream=not auto_tools(kwargs),
                                                logits_processor=processors, **kwargs))
            stream = output if not isinstance(output, dict) else iter([_as_chunk(output)])
            try:
                for chunk in stream:
                    choice = chunk["choices"][0]
                    delta = choice.get("delta") or {"content": choice.get("text")}  # completions: text
                    text = stops.feed(delta.get("content") or "")
                    fragments = calls.from_openai(delta.get("tool_calls") or ())
                    logprobs = (choice.get("logprobs") or {}).get("content") or []
                    if text or fragments or logprobs:
                        yield ChatChunk(text=text, tool_calls=fragments, logprobs=logprobs)
                    engine_finish = choice.get("finish_reason") or engine_finish
                    if stops.stopped or counter.at_limit:
                        break
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            usage = counter.usage(self.llm.n_tokens, ended_by_eos=engine_finish == "stop")
        if tail := stops.flush():
            yield ChatChunk(text=tail)
        limit = "length" if counter.at_limit else "stop"
        yield ChatChunk(finish_reason="stop" if stops.stopped else engine_finish or limit, usage=usage)

    def _structure(self, request: ChatRequest) -> dict[str, Any]:
        """Tools and response_format as llama-cpp-python takes them: a JSON schema response
        format becomes its `json_object` with a schema (sampled under a grammar made from it);
        `tool_choice: "required"` with one tool forces that tool (its handler knows only
        "auto", "none" and a named tool)."""
        given = request.given()
        given.pop("parallel_tool_calls", None)
        given.pop("user", None)  # for an API's abuse monitoring: nothing to do here
        if given.get("logprobs") and given.get("top_logprobs") is None:
            given["top_logprobs"] = 0  # its handler asks the engine for top_logprobs alternatives
        if request.prompt is not None:  # the completions API takes none of these
            given = {}
        if "response_format" in given:
            given["response_format"] = json_schema_as_grammar_format(given["response_format"])
        if given.get("tool_choice") == "required":
            tools = given.get("tools") or []
            if len(tools) != 1:
                raise JobFailed(f"model '{self.model.name}' (llama.cpp) cannot require one of "
                                f"{len(tools)} tools; name the tool in tool_choice",
                                error_type="InvalidRequest", model=self.model.name,
                                job_id=request.job_id)
            given["tool_choice"] = {"type": "function", "function": {
                "name": tools[0]["function"]["name"]}}
        return given

    def embed(self, texts: list[str], normalize: bool | None) -> Embeddings:
        normalize = self.wants_unit_vectors(normalize, default=True)
        with self._lock:
            vectors, tokens = self.llm.embed(texts, normalize=normalize, truncate=True,
                                             return_count=True)
        return Embeddings([list(v) for v in vectors], Usage(prompt_tokens=tokens, total_tokens=tokens))

    def _path(self) -> str:
        return self.model.path or self.model.upstream_name

    def _gpu_layers(self) -> int:
        return int(self.model.options.get("n_gpu_layers", 0))


def shown_tool_results(messages: list[dict[str, Any]], chat_format: str | None) -> list[dict[str, Any]]:
    """The messages as llama-cpp-python's function-calling chat format can show them: its
    template renders a `tool` message's role but not its content, so the model would never see
    a tool's result; such a message becomes a user turn that says which call it answers."""
    if chat_format != "chatml-function-calling":
        return messages
    names = {call["id"]: call["function"]["name"] for m in messages for call in m.get("tool_calls") or ()}
    return [{"role": "user", "content": f"functions.{names.get(m.get('tool_call_id'), 'tool')} "
                                        f"returned:\n{m.get('content', '')}"}
            if m["role"] == "tool" else m for m in messages]


def json_schema_as_grammar_format(response_format: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `json_schema` response format as llama-cpp-python takes it: its JSON mode with
    a `schema` (it samples under a grammar made from the schema); others unchanged."""
    if response_format.get("type") != "json_schema":
        return response_format
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    return {"type": "json_object", "schema": schema}


def auto_tools(kwargs: dict[str, Any]) -> bool:
    """Whether the model chooses between text and tool calls (llama-cpp-python's
    function-calling handler answers that only whole)."""
    return bool(kwargs.get("tools")) and kwargs.get("tool_choice", "auto") == "auto"


def _as_chunk(completion: dict[str, Any]) -> dict[str, Any]:
    """A whole chat completion as one streamed chunk, its message as the delta."""
    choice = completion["choices"][0]
    message = dict(choice["message"])
    for position, call in enumerate(message.get("tool_calls") or []):
        call.setdefault("index", position)
    return {"choices": [{"delta": message, "finish_reason": choice.get("finish_reason")}]}


class _SampleCounter:
    """A logits processor that changes nothing and counts the tokens llama.cpp samples; it also
    says when `max_tokens` were sampled (llama-cpp-python's function-calling handler ignores
    max_tokens when the model answers in text).

    llama.cpp evaluates a sampled token only to sample the next one, so once generation stops
    the context holds the prompt and every sampled token but the last: prompt = context length
    - samples + 1. Every sampled token is part of the reply except an end-of-sequence token,
    which llama-cpp-python drops (what its own usage counts, unstreamed)."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.samples = 0
        self.max_tokens = max_tokens

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.samples += 1
        return scores

    @property
    def at_limit(self) -> bool:
        return self.max_tokens is not None and self.samples >= self.max_tokens

    def usage(self, context_tokens: int, ended_by_eos: bool) -> Usage:
        prompt = context_tokens - self.samples + 1
        completion = self.samples - 1 if ended_by_eos else self.samples
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)
