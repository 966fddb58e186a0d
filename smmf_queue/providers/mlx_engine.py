"""MLX: mlx-lm's streamed generation on Apple Silicon.

mlx-lm is imported in `load`, never at import time, so the hardware check and the sampling
mapping run (and are tested) anywhere. mlx-lm generates text only: an MLX embedding model is
refused with a message that says so.
"""

from __future__ import annotations

import importlib.util
import platform
import threading
from collections.abc import Iterator
from typing import Any

from ..jobs import ChatRequest, Usage
from .base import ChatChunk, Provider, StopFilter, read_ahead

#: tokens generated when neither the request nor the config says.
DEFAULT_MAX_TOKENS = 256


def missing_for_mlx(kind: str) -> list[str]:
    """What this host lacks to run an MLX model of `kind`; empty when it can."""
    missing = []
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        missing.append(f"MLX needs Apple Silicon (this host is {platform.system()} "
                       f"{platform.machine()})")
    if importlib.util.find_spec("mlx_lm") is None:
        missing.append("the mlx-lm package is not installed (pip install 'smmf-queue[mlx]')")
    if kind == "embedding":
        missing.append("mlx-lm generates text only; serve embedding models with hf or llama.cpp")
    return missing


class MLXProvider(Provider):
    """A model run by mlx-lm in the worker process (one generation at a time)."""

    def check_hardware(self) -> None:
        self.refuse_if_missing(missing_for_mlx(self.model.kind))

    def hardware(self) -> str:
        return f"apple silicon ({platform.machine()})"

    def load(self) -> None:
        from mlx_lm import load

        self._lock = threading.Lock()
        self.lm, self.tokenizer = load(self.model.path or self.model.upstream_name)

    def sampling(self, request: ChatRequest) -> dict[str, Any]:
        """Token budget and mlx-lm sampler settings; temperature 0 (mlx-lm's default) is greedy."""
        params = request.params
        return {
            "max_tokens": params.max_tokens or int(self.model.options.get("max_new_tokens",
                                                                          DEFAULT_MAX_TOKENS)),
            "temp": params.temperature if params.temperature is not None else 0.0,
            "top_p": params.top_p if params.top_p is not None else 1.0,
        }

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        return read_ahead(self._generate(request), request.job_id)

    def _generate(self, request: ChatRequest) -> Iterator[ChatChunk]:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        if request.params.seed is not None:
            mx.random.seed(request.params.seed)
        prompt = self.tokenizer.apply_chat_template(
            [m.as_dict() for m in request.messages], add_generation_prompt=True)
        sampling = self.sampling(request)
        sampler = make_sampler(temp=sampling["temp"], top_p=sampling["top_p"])
        stops = StopFilter(request.params.stop)
        finish_reason, last = "stop", None
        with self._lock:
            for response in stream_generate(self.lm, self.tokenizer, prompt,
                                            max_tokens=sampling["max_tokens"], sampler=sampler):
                last = response
                piece = stops.feed(response.text)
                if piece:
                    yield ChatChunk(text=piece)
                if stops.stopped:
                    break
                finish_reason = response.finish_reason or finish_reason
        tail = stops.flush()
        if tail:
            yield ChatChunk(text=tail)
        prompt_tokens = getattr(last, "prompt_tokens", 0) or 0
        generated = getattr(last, "generation_tokens", 0) or 0
        yield ChatChunk(finish_reason=finish_reason, usage=Usage(
            prompt_tokens=prompt_tokens, completion_tokens=generated,
            total_tokens=prompt_tokens + generated))
