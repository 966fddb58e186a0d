"""vLLM: one async engine per model in the worker process, shared by all of its concurrent jobs.

The engine batches the jobs continuously (that is what vLLM is for), so the model's
`concurrency` defaults to 64 slots. The engine runs on an asyncio loop in a thread of its own;
each job thread submits its request there and reads the outputs back through a queue.
vLLM is imported in `load`, never at import time, so the argument mapping and the hardware
check run (and are tested) on machines without vLLM or a GPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import queue
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from ..config import ModelConfig
from ..errors import JobFailed
from ..jobs import ChatRequest, ToolCallDelta, Usage
from ..tool_parsers import HermesParser
from . import VLLM_ENGINE_KEYS
from .base import ChatChunk, Embeddings, Provider, drain, unit_vectors

_DONE = object()


def engine_args(model: ModelConfig) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for a model entry (DB-GPT's keys, plus ours mapped)."""
    options = model.options
    kwargs: dict[str, Any] = {"model": model.path or model.upstream_name}
    if model.backend and model.path:
        kwargs["served_model_name"] = model.backend
    kwargs.update({key: options[key] for key in sorted(VLLM_ENGINE_KEYS) if key in options})
    if model.context_length and "max_model_len" not in kwargs:
        kwargs["max_model_len"] = model.context_length
    if model.kind == "embedding":
        kwargs["task"] = "embed"
    return kwargs


def missing_for_vllm() -> list[str]:
    """What this host lacks to run vLLM; empty when it can."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package is not installed (pip install 'smmf-queue[vllm]')")
    if importlib.util.find_spec("torch") is not None:
        import torch
        if not torch.cuda.is_available():
            missing.append("no CUDA device is visible to torch (vLLM needs an NVIDIA GPU)")
    elif shutil.which("nvidia-smi") is None:
        missing.append("no NVIDIA driver found (nvidia-smi is missing; vLLM needs an NVIDIA GPU)")
    return missing


class VLLMProvider(Provider):
    """A model run by vLLM's AsyncLLMEngine on NVIDIA GPUs."""

    def check_hardware(self) -> None:
        self.refuse_if_missing(missing_for_vllm())

    def hardware(self) -> str:
        import torch
        return f"cuda ({torch.cuda.get_device_name(0)}) x{torch.cuda.device_count()}"

    def load(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        kwargs = engine_args(self.model)
        fields = set(inspect.signature(AsyncEngineArgs).parameters)
        if "task" in kwargs and "task" not in fields:
            kwargs["runner"] = "pooling"  # vLLM 0.11 renamed the embedding task
            del kwargs["task"]
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name=f"vllm-{self.model.name}",
                         daemon=True).start()
        self.engine = self._on_loop(self._build(AsyncLLMEngine, AsyncEngineArgs(**kwargs))).result()

    async def _build(self, engine_class: Any, args: Any) -> Any:
        engine = engine_class.from_engine_args(args)
        tokenizer = engine.get_tokenizer()
        self.tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        return engine

    def _on_loop(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def sampling_params(self, request: ChatRequest) -> dict[str, Any]:
        """SamplingParams arguments: every parameter the request sets, temperature 0 included."""
        return request.params.given()

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        from vllm import SamplingParams

        if request.tools and request.tool_choice not in (None, "auto", "none"):
            raise JobFailed(f"model '{self.model.name}' (vllm) cannot be made to call a tool; send "
                            "tool_choice \"auto\"", error_type="InvalidRequest", model=self.model.name,
                            job_id=request.job_id)
        tools = request.tools if request.tools and request.tool_choice in (None, "auto") else None
        prompt = request.prompt if request.prompt is not None else self.tokenizer.apply_chat_template(
            [m.as_dict() for m in request.messages], tools=tools, tokenize=False,
            add_generation_prompt=True)
        calls = HermesParser() if tools else None
        outputs: queue.Queue[Any] = queue.Queue()
        running = self._on_loop(self._generate(prompt, SamplingParams(**self.sampling_params(request)),
                                               request.job_id, outputs))
        sent, finish_reason, usage = 0, "stop", None
        try:
            for batch in drain(outputs, _DONE):
                last = batch[-1]
                if isinstance(last, BaseException):
                    raise last
                completion = last.outputs[0]
                text = completion.text[sent:]  # cumulative text: send what is new
                sent = len(completion.text)
                found: list[ToolCallDelta] = []
                if calls is not None:
                    text, found = calls.feed(text)
                if text or found:
                    yield ChatChunk(text=text, tool_calls=found)
                if last.finished:
                    finish_reason = completion.finish_reason or "stop"
                    prompt_tokens, generated = len(last.prompt_token_ids), len(completion.token_ids)
                    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                  total_tokens=prompt_tokens + generated)
        finally:
            if not running.done():
                self._on_loop(self.engine.abort(request.job_id))
        if calls is not None:
            if tail := calls.flush():
                yield ChatChunk(text=tail)
            finish_reason = "tool_calls" if calls.calls else finish_reason
        yield ChatChunk(finish_reason=finish_reason, usage=usage)

    async def _generate(self, prompt: str, sampling: Any, request_id: str,
                        outputs: queue.Queue[Any]) -> None:
        try:
            async for output in self.engine.generate(prompt, sampling, request_id):
                outputs.put(output)
        except BaseException as exc:  # handed to the job thread
            outputs.put(exc)
        finally:
            outputs.put(_DONE)

    def embed(self, texts: list[str], normalize: bool | None) -> Embeddings:
        results = self._on_loop(self._encode_all(texts)).result()
        vectors = [_embedding_of(output) for output in results]
        tokens = sum(len(output.prompt_token_ids) for output in results)
        if self.wants_unit_vectors(normalize, default=False):
            vectors = unit_vectors(vectors)
        return Embeddings(vectors, Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def _encode_all(self, texts: list[str]) -> list[Any]:
        from vllm import PoolingParams

        async def one(index: int, text: str) -> Any:
            final = None
            async for output in self.engine.encode(text, PoolingParams(), f"embed-{id(texts)}-{index}"):
                final = output
            return final

        return list(await asyncio.gather(*(one(i, text) for i, text in enumerate(texts))))


def _embedding_of(output: Any) -> list[float]:
    data = getattr(output.outputs, "embedding", None)
    if data is None:
        data = output.outputs.data.tolist()
    return [float(x) for x in data]
