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

from ..errors import ProviderUnavailable
from ..jobs import ChatRequest, Usage
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
        messages: Any = [m.model_dump() for m in request.messages]
        counter = _SampleCounter()
        engine_finish = None
        with self._lock:
            # Streamed, it returns an iterator of chunk dicts (its type hints cover both modes).
            stream: Any = self.llm.create_chat_completion(
                messages=messages, stream=True,
                logits_processor=llama_cpp.LogitsProcessorList([counter]), **kwargs)
            try:
                for chunk in stream:
                    choice = chunk["choices"][0]
                    text = stops.feed(choice["delta"].get("content") or "")
                    if text:
                        yield ChatChunk(text=text)
                    if stops.stopped:
                        break
                    engine_finish = choice.get("finish_reason") or engine_finish
            finally:
                stream.close()
            usage = counter.usage(self.llm.n_tokens, ended_by_eos=engine_finish == "stop")
        if tail := stops.flush():
            yield ChatChunk(text=tail)
        yield ChatChunk(finish_reason="stop" if stops.stopped else engine_finish or "stop", usage=usage)

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


class _SampleCounter:
    """A logits processor that changes nothing and counts the tokens llama.cpp samples.

    llama.cpp evaluates a sampled token only to sample the next one, so once generation stops
    the context holds the prompt and every sampled token but the last: prompt = context length
    - samples + 1. Every sampled token is part of the reply except an end-of-sequence token,
    which llama-cpp-python drops (what its own usage counts, unstreamed)."""

    def __init__(self) -> None:
        self.samples = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.samples += 1
        return scores

    def usage(self, context_tokens: int, ended_by_eos: bool) -> Usage:
        prompt = context_tokens - self.samples + 1
        completion = self.samples - 1 if ended_by_eos else self.samples
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)
