"""Ollama's native API through the official `ollama` client: `/api/chat` (streamed NDJSON) and
`/api/embed`.

Every sampling parameter goes into Ollama's `options` (DB-GPT sends none of them), with
Ollama's names: `max_tokens` → `num_predict`, `context_length` → `num_ctx`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama

from ..jobs import ChatRequest, Usage
from .api_proxy import Endpoint, RetryPolicy, account, base_url, embed_in_batches, timeout_s
from .base import ChatChunk, Embeddings, Provider, read_ahead

ENDPOINT = Endpoint("http://localhost:11434", "OLLAMA_API_BASE", None)
#: texts per /api/embed request when the config does not set `batch_size`.
EMBED_BATCH_LIMIT = 512


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ollama.ResponseError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, ConnectionError | httpx.TransportError)


class OllamaProvider(Provider):
    """A model served by an Ollama server."""

    def hardware(self) -> str:
        return f"api {urlsplit(self._host()).netloc}"

    def load(self) -> None:
        self.retry = RetryPolicy.of(self.model, account(self.model, self._host(), None), self._host())
        # ollama.Client passes further keywords on to its httpx client: http_proxy reaches it.
        self.client = ollama.Client(host=self._host(), timeout=timeout_s(self.model),
                                    proxy=self.model.options.get("http_proxy"))

    def _host(self) -> str:
        if self.model.kind == "embedding" and self.model.api_url:
            return self.model.api_url.rstrip("/")  # DB-GPT's key for Ollama embeddings
        return base_url(self.model, ENDPOINT)

    def options(self, request: ChatRequest) -> dict[str, Any]:
        """Ollama's `options` for the request: what it sets, 0 included, in Ollama's names."""
        options = request.params.given(max_tokens="num_predict")
        if self.model.context_length:
            options["num_ctx"] = self.model.context_length
        return options

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        messages = [m.as_dict() for m in request.messages]
        options = self.options(request)

        def start() -> Iterator[Any]:
            return self.client.chat(model=self.model.upstream_name, messages=messages,
                                    stream=True, options=options)

        return read_ahead(self._chunks(self.retry.stream(start, _retryable)), request.job_id)

    def _chunks(self, stream: Iterator[Any]) -> Iterator[ChatChunk]:
        finish_reason, usage = "stop", None
        for part in stream:
            text = part.message.content or ""
            reasoning = getattr(part.message, "thinking", None) or ""
            if text or reasoning:
                yield ChatChunk(text=text, reasoning=reasoning)
            if part.done:
                finish_reason = part.done_reason or "stop"
                prompt, completion = part.prompt_eval_count or 0, part.eval_count or 0
                usage = Usage(prompt_tokens=prompt, completion_tokens=completion,
                              total_tokens=prompt + completion)
        yield ChatChunk(finish_reason=finish_reason, usage=usage)

    def embed(self, texts: list[str], normalize: bool | None) -> Embeddings:
        """The API's vectors as they come (/api/embed's are unit length), unless asked to normalize."""
        limit = int(self.model.options.get("batch_size", EMBED_BATCH_LIMIT))
        return embed_in_batches(texts, limit, self._embed_batch,
                                normalize=self.wants_unit_vectors(normalize, default=False))

    def _embed_batch(self, texts: list[str]) -> tuple[list[list[float]], int]:
        response = self.retry.call(partial(self.client.embed, model=self.model.upstream_name,
                                           input=texts, truncate=True), _retryable)
        return [list(vector) for vector in response.embeddings], response.prompt_eval_count or 0
