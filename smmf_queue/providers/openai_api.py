"""OpenAI-compatible APIs through the official `openai` SDK.

One implementation serves `proxy/openai` (also Azure OpenAI, with `api_type = "azure"`),
`proxy/deepseek` (its `reasoning_content` becomes reasoning text; `thinking_enabled` as in
DB-GPT), `proxy/tongyi` (Qwen through DashScope's compatible mode), `proxy/siliconflow` and
`proxy/openapi` (DB-GPT's name for a rerank API). They differ only in their defaults
(`ENDPOINTS`) and their embedding batch limits. Reranking has no method in the SDK: it is a
POST of {model, query, documents} through the SDK's own client (its auth, errors and retries),
to `/rerank` or the model's `api_url`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai

from .. import tracing
from ..jobs import ChatRequest, Usage
from ..tool_calls import FragmentCleaner
from .api_proxy import (
    Endpoint,
    RetryPolicy,
    account,
    api_key,
    base_url,
    embed_in_batches,
    require_api_key,
    rerank_scores,
    retry_after_header,
    timeout_s,
)
from .base import ChatChunk, Embeddings, Provider, Reranked, read_ahead

#: provider → DB-GPT's default base URL and env vars for it and the key.
ENDPOINTS: dict[str, Endpoint] = {
    "proxy/openai": Endpoint("https://api.openai.com/v1", "OPENAI_API_BASE", "OPENAI_API_KEY"),
    "proxy/deepseek": Endpoint("https://api.deepseek.com/v1", "DEEPSEEK_API_BASE", "DEEPSEEK_API_KEY"),
    "proxy/tongyi": Endpoint("https://dashscope.aliyuncs.com/compatible-mode/v1",
                             "DASHSCOPE_API_BASE", "DASHSCOPE_API_KEY"),
    "proxy/siliconflow": Endpoint("https://api.siliconflow.cn/v1", "SILICONFLOW_API_BASE",
                                  "SILICONFLOW_API_KEY"),
    "proxy/openapi": Endpoint("http://localhost:8100/v1", "OPENAPI_RERANK_API_BASE",
                              "OPENAPI_RERANK_API_KEY"),
}
#: providers whose API may take no key (DB-GPT's rerank API runs inside a private network).
KEYLESS = frozenset({"proxy/openapi"})
#: where a rerank request goes when the model sets no `api_url`, below the base URL.
RERANK_PATH: dict[str, str] = {"proxy/openapi": "/beta/relevance"}
#: Azure's endpoint and key come from these when the config does not set them (as in DB-GPT).
AZURE = Endpoint("", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_KEY")

#: most texts per embeddings request, by provider (the `batch_size` key overrides it).
EMBED_BATCH_LIMIT: dict[str, int] = {"proxy/openai": 2048, "proxy/tongyi": 10,
                                     "proxy/siliconflow": 32, "proxy/deepseek": 64,
                                     "llama.cpp.server": 64}

#: errors worth another try: rate limits, server errors, lost connections and timeouts.
RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE)


def retry_after(exc: BaseException) -> float | None:
    """What a 429 said to wait (RetryPolicy waits it out without spending a retry)."""
    if isinstance(exc, openai.RateLimitError):
        return retry_after_header(exc.response.headers.get("retry-after"))
    return None


#: what `_stream_chunks` yields for `[DONE]`.
_DONE: dict[str, Any] = {}


def _error_message(error: object) -> str:
    """The message of an error object sent inside a stream."""
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) and message else "An error occurred during streaming"


class OpenAIProvider(Provider):
    """A model behind an OpenAI-compatible HTTP API."""

    def check_hardware(self) -> None:
        self._api_key()

    def _api_key(self) -> str:
        if self.model.provider in KEYLESS:
            return api_key(self.model, self._endpoint()) or "no-key"
        return require_api_key(self.model, self._endpoint())

    def hardware(self) -> str:
        return f"api {urlsplit(self._base_url()).netloc}"

    def load(self) -> None:
        base = self._base_url()
        self.retry = RetryPolicy.of(self.model, account(self.model, base, self._api_key()), base)
        self.client = self._client()

    def _client(self) -> openai.OpenAI:
        common: dict[str, Any] = {"api_key": self._api_key(),
                                  "timeout": timeout_s(self.model), "max_retries": 0}
        proxy = self.model.options.get("http_proxy")
        if proxy:  # the SDK's own HTTP client (httpx2), so its errors and streaming are unchanged
            common["http_client"] = httpx2.Client(proxy=proxy)
        if self._is_azure():
            return openai.AzureOpenAI(
                azure_endpoint=self._base_url(), api_version=self.model.options.get("api_version"),
                azure_deployment=self.model.options.get("api_azure_deployment"), **common)
        return openai.OpenAI(base_url=self._base_url(), **common)

    def _is_azure(self) -> bool:
        return self.model.options.get("api_type") == "azure"

    def _endpoint(self) -> Endpoint:
        return AZURE if self._is_azure() else ENDPOINTS[self.model.provider]

    def _base_url(self) -> str:
        if self.model.kind == "reranker" and self.model.api_url:
            return self.model.api_url.rstrip("/")  # the full URL (DB-GPT's key), posted to as it is
        if self.model.kind == "embedding" and self.model.api_url:
            # DB-GPT's api_url is the full embeddings URL; the SDK wants the base.
            return self.model.api_url.rstrip("/").removesuffix("/embeddings")
        return base_url(self.model, self._endpoint())

    # chat

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        kwargs = self.chat_kwargs(request)
        stream = self.retry.stream(partial(self._stream_chunks, kwargs), retryable, retry_after)
        return read_ahead(self._chunks(stream), request.job_id)

    def _stream_chunks(self, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The streamed chat.completion.chunk objects as dicts (`_DONE` for `[DONE]`), read to
        the end of the body.

        Through the SDK's raw streaming response and httpx2's SSE reader rather than the SDK's
        `Stream`, which stops reading at `[DONE]` and closes the response before the body ends,
        so httpx drops the connection (a new TCP, or TLS, connection per chat:
        openai/openai-python#3440), and which builds a pydantic object per chunk: about half the
        worker's CPU per streamed chat (docs/performance-log.md). Transport errors become the SDK's, as in its
        `Stream`, so retries and error types stay the same."""
        api = self.client.completions if "prompt" in kwargs else self.client.chat.completions
        with api.with_streaming_response.create(**kwargs, extra_headers=tracing.headers() or None) as response:
            http = response.http_response
            try:
                for event in httpx2.EventSource(http):
                    if event.data.startswith("[DONE]"):
                        yield _DONE  # the reply is complete; reading on to the end of the
                        continue     # body (in read_ahead's thread) keeps the connection
                    chunk = event.json()
                    if not isinstance(chunk, dict):
                        raise openai.APIError(f"the stream sent {event.data[:80]!r}, not a chunk",
                                              request=http.request, body=None)
                    if chunk.get("error"):
                        raise openai.APIError(_error_message(chunk["error"]), request=http.request,
                                              body=chunk["error"])
                    yield chunk
            except httpx2.TimeoutException as exc:
                raise openai.APITimeoutError(request=http.request) from exc
            except httpx2.TransportError as exc:
                raise openai.APIConnectionError(message=str(exc) or "Connection error.",
                                                request=http.request) from exc

    def chat_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        """The create() arguments (of the completions API for a prompt): every sampling
        parameter the request sets, 0 included, and its tools and response_format as sent."""
        kwargs: dict[str, Any] = {"model": self.model.upstream_name, "stream": True}
        if request.prompt is not None:  # the completions API
            kwargs["prompt"] = request.prompt
        else:
            kwargs["messages"] = [m.as_dict() for m in request.messages]
        if self.model.options.get("stream_usage", True):
            kwargs["stream_options"] = {"include_usage": True}
        kwargs.update(request.params.given())
        kwargs.update(request.given())
        thinking = self._thinking()
        if thinking is not None:
            kwargs["extra_body"] = {"thinking": {"type": "enabled" if thinking else "disabled"}}
        return kwargs

    def _thinking(self) -> bool | None:
        """DeepSeek's thinking switch: None leaves the model's default."""
        if self.model.provider != "proxy/deepseek":
            return None
        value = self.model.options.get("thinking_enabled")
        return None if value is None else bool(value)

    def _chunks(self, stream: Iterator[dict[str, Any]]) -> Iterator[ChatChunk]:
        """Our chunks; the final one as soon as `[DONE]` arrives (or the stream ends without it)."""
        finish_reason, usage, finished = "stop", None, False
        keep_reasoning = self._thinking() is not False
        calls = FragmentCleaner()
        for chunk in stream:
            if chunk is _DONE:
                if not finished:
                    finished = True
                    yield ChatChunk(finish_reason=finish_reason, usage=usage)
                continue
            if chunk.get("usage"):
                counts = chunk["usage"]
                usage = Usage(prompt_tokens=counts.get("prompt_tokens") or 0,
                              completion_tokens=counts.get("completion_tokens") or 0,
                              total_tokens=counts.get("total_tokens") or 0)
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            delta = choice.get("delta") or {"content": choice.get("text")}  # completions: text
            text = delta.get("content") or ""
            reasoning = (delta.get("reasoning_content") or "") if keep_reasoning else ""
            fragments = calls.from_openai(delta.get("tool_calls") or ())
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            if text or reasoning or fragments or logprobs:
                yield ChatChunk(text=text, reasoning=reasoning, tool_calls=fragments, logprobs=logprobs)
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
        if not finished:
            yield ChatChunk(finish_reason=finish_reason, usage=usage)

    # reranking

    def rerank(self, query: str, documents: list[str]) -> Reranked:
        path = "" if self.model.api_url else RERANK_PATH.get(self.model.provider, "/rerank")
        body = {"model": self.model.upstream_name, "query": query, "documents": documents}
        reply = self.retry.call(partial(self.client.post, self._base_url() + path, body=body,
                                        cast_to=object), retryable, retry_after)
        return rerank_scores(reply, len(documents))

    # embeddings

    def embed(self, texts: list[str], normalize: bool | None) -> Embeddings:
        """The API's vectors as they come (OpenAI's are unit length), unless asked to normalize."""
        return self._embed(texts, normalize, {})

    def embed_shortened(self, texts: list[str], normalize: bool | None, dimensions: int) -> Embeddings:
        """The API's vectors, `dimensions` long (it shortens them: OpenAI's text-embedding-3)."""
        return self._embed(texts, normalize, {"dimensions": dimensions})

    def _embed(self, texts: list[str], normalize: bool | None, extra: dict[str, Any]) -> Embeddings:
        limit = int(self.model.options.get("batch_size", EMBED_BATCH_LIMIT[self.model.provider]))
        return embed_in_batches(texts, limit, partial(self._embed_batch, extra=extra),
                                normalize=self.wants_unit_vectors(normalize, default=False))

    def _embed_batch(self, texts: list[str], extra: dict[str, Any]) -> tuple[list[list[float]], int]:
        """One request. The SDK asks for base64 vectors and decodes them with numpy (a server
        that answers floats anyway is read as well): floats cost the SDK a model object per
        number, most of the CPU of the whole call (docs/performance-log.md, cost per job)."""
        response = self.retry.call(partial(self.client.embeddings.create, model=self.model.upstream_name,
                                           input=texts, **extra), retryable, retry_after)
        vectors = [item.embedding for item in sorted(response.data, key=lambda d: d.index)]
        return vectors, response.usage.prompt_tokens if response.usage else 0
