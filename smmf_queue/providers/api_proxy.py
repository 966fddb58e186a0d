"""What every API proxy shares: where the endpoint and key come from, timeouts and retries.

Retries follow one rule for every proxy: a 429, a 5xx or a connection error is retried with
exponential backoff and jitter only until the first chunk of a reply has arrived. After that,
text has been streamed to the caller and cannot be taken back, so a failure becomes the job's
`error` event instead. A 429 that says when to come back (`Retry-After`) delays the job that long
instead of spending one of its retries, up to RATE_LIMIT_WAIT_S in all; and every call of the
same upstream account, from any worker, waits with it rather than meeting the 429 too. Each
call passes its account's gate first (upstream_accounts.py: that cool-down, and the rpm/tpm of
an `[accounts.<name>]`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import tenacity
from opentelemetry.trace import SpanKind

from .. import tracing
from ..config import ModelConfig
from ..errors import ProviderUnavailable
from ..jobs import Usage
from ..upstream_accounts import ACCOUNTS
from .base import Embeddings, Reranked, unit_vectors

T = TypeVar("T")

#: seconds an API call may take (connect and each read) when the config does not say.
DEFAULT_TIMEOUT_S = 60.0
#: retries after the first try, for 429, 5xx and connection errors.
DEFAULT_MAX_RETRIES = 3
#: first backoff in seconds; doubled each retry, with full jitter, capped at 30 s.
DEFAULT_RETRY_BACKOFF_S = 0.5
#: most seconds one call waits in all on 429s that say `Retry-After`; past it they count as retries.
RATE_LIMIT_WAIT_S = 120.0


@dataclass(frozen=True)
class Endpoint:
    """A provider's defaults, as DB-GPT has them: base URL, and the env vars that override it."""

    base_url: str
    base_env: str
    key_env: str | None


def base_url(model: ModelConfig, endpoint: Endpoint) -> str:
    """The config's api_base, else the provider's env var, else its public default."""
    return (model.api_base or os.environ.get(endpoint.base_env) or endpoint.base_url).rstrip("/")


def api_key(model: ModelConfig, endpoint: Endpoint) -> str | None:
    """The config's api_key, else the provider's env var (read in the worker, never sent in a job)."""
    if model.api_key is not None:
        return model.api_key.get_secret_value()
    return os.environ.get(endpoint.key_env) if endpoint.key_env else None


def require_api_key(model: ModelConfig, endpoint: Endpoint) -> str:
    """The API key, or ProviderUnavailable naming where it should come from."""
    key = api_key(model, endpoint)
    if not key:
        where = f"set api_key in the model entry or the environment variable {endpoint.key_env}"
        raise ProviderUnavailable(f"model '{model.name}' ({model.provider}) has no API key: {where} "
                                  "(a local server without auth takes any value)", model=model.name)
    return key


def timeout_s(model: ModelConfig) -> float:
    return float(model.options.get("timeout_s", DEFAULT_TIMEOUT_S))


def account(model: ModelConfig, base: str, key: str | None) -> str:
    """The upstream account a model calls (upstream_accounts.py): its `account`, else its
    endpoint and a digest of its key."""
    return model.account or base + "|" + hashlib.sha256((key or "").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    #: the upstream account whose gate each call passes (`account`); "" for none.
    account: str = ""
    #: the upstream's host, for the span of each try (tracing.py).
    host: str = ""

    @classmethod
    def of(cls, model: ModelConfig, account: str = "", base_url: str = "") -> RetryPolicy:
        options = model.options
        return cls(max_retries=int(options.get("max_retries", DEFAULT_MAX_RETRIES)),
                   backoff_s=float(options.get("retry_backoff_s", DEFAULT_RETRY_BACKOFF_S)),
                   account=account, host=urlsplit(base_url).netloc)

    def retrying(self, retryable: Callable[[BaseException], bool],
                 retry_after: Callable[[BaseException], float | None]) -> tenacity.Retrying:
        """tenacity's loop for one call: `retry_after` reads a 429's `Retry-After` (None where
        there is none): such a wait does not count against `max_retries`."""
        backoff = tenacity.wait_random_exponential(multiplier=self.backoff_s, max=30)
        told_waits: list[float] = []

        def told_within_budget(state: tenacity.RetryCallState) -> float | None:
            """The failed try's 429 wait, if it said one and RATE_LIMIT_WAIT_S has room for it."""
            told = _told_wait(state, retry_after)
            return told if told is not None and sum(told_waits) + told <= RATE_LIMIT_WAIT_S else None

        def stop(state: tenacity.RetryCallState) -> bool:
            if told_within_budget(state) is not None:
                return False
            return state.attempt_number - len(told_waits) > self.max_retries

        def wait(state: tenacity.RetryCallState) -> float:
            told = told_within_budget(state)
            if told is None:
                return float(backoff(state))
            told_waits.append(told)
            if self.account:
                ACCOUNTS.hold(self.account, told)
            return told

        def before(state: tenacity.RetryCallState) -> None:
            if self.account:
                ACCOUNTS.enter(self.account)

        return tenacity.Retrying(stop=stop, wait=wait, before=before,
                                 retry=tenacity.retry_if_exception(retryable), reraise=True)

    def call(self, function: Callable[[], T], retryable: Callable[[BaseException], bool],
             retry_after: Callable[[BaseException], float | None] = lambda exc: None) -> T:
        """Call `function`, retrying the errors `retryable` accepts."""
        for attempt in self.retrying(retryable, retry_after):
            with attempt, self._try_span(attempt.retry_state.attempt_number):
                result = function()
        return result

    def stream(self, start: Callable[[], Iterator[T]], retryable: Callable[[BaseException], bool],
               retry_after: Callable[[BaseException], float | None] = lambda exc: None) -> Iterator[T]:
        """Items of the stream `start()` opens; opening it and its first item are retried, the rest never."""
        stream: Iterator[T] = iter(())
        first: object = _NOTHING
        for attempt in self.retrying(retryable, retry_after):
            with attempt, self._try_span(attempt.retry_state.attempt_number):
                stream = iter(start())
                first = next(stream, _NOTHING)
        if first is not _NOTHING:
            yield first  # type: ignore[misc]
        yield from stream


    def _try_span(self, number: int) -> AbstractContextManager[object]:
        """The span of one try: the request until its first item (tracing.py)."""
        return tracing.span("smmf.upstream", SpanKind.CLIENT,
                            {"server.address": self.host, "smmf.upstream.try": number})


_NOTHING = object()


def _told_wait(state: tenacity.RetryCallState,
               retry_after: Callable[[BaseException], float | None]) -> float | None:
    """The seconds the failed try's 429 said to wait, if it said."""
    exc = state.outcome.exception() if state.outcome is not None else None
    return retry_after(exc) if exc is not None else None


def retry_after_header(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header in seconds (its HTTP-date form is not used by the
    APIs we proxy); None for anything else."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def split(items: list[T], size: int) -> Iterator[list[T]]:
    """`items` in slices of at most `size` (a provider's batch limit), in order."""
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


def embed_in_batches(texts: list[str], limit: int,
                     request: Callable[[list[str]], tuple[list[list[float]], int]], *,
                     normalize: bool) -> Embeddings:
    """Embeddings of `texts` from `request` (vectors and tokens of one API call), called on
    slices of at most `limit` texts (the provider's batch limit) and put back in order."""
    vectors: list[list[float]] = []
    tokens = 0
    for batch in split(texts, limit):
        batch_vectors, batch_tokens = request(batch)
        vectors.extend(batch_vectors)
        tokens += batch_tokens
    if normalize:
        vectors = unit_vectors(vectors)
    return Embeddings(vectors, Usage(prompt_tokens=tokens, total_tokens=tokens))


def rerank_scores(reply: object, count: int) -> Reranked:
    """The scores of a rerank API's answer, in input order: Cohere's and Jina's shape (which
    SiliconFlow, vLLM and Xinference serve), `{"results": [{"index", "relevance_score"}]}`,
    or DB-GPT's relevance API, `{"data": [score, ...]}`. Usage from `usage.total_tokens`
    where the answer has it."""
    if not isinstance(reply, dict):
        raise ValueError(f"the rerank API answered {type(reply).__name__}, not an object")
    if isinstance(reply.get("results"), list):
        by_index = {int(item["index"]): float(item["relevance_score"]) for item in reply["results"]}
        scores = [by_index[index] for index in range(count) if index in by_index]
    elif isinstance(reply.get("data"), list):
        scores = [float(score) for score in reply["data"]]
    else:
        raise ValueError(f"the rerank API answered no `results` or `data`: {str(reply)[:200]}")
    if len(scores) != count:
        raise ValueError(f"the rerank API scored {len(scores)} of {count} documents")
    tokens = int((reply.get("usage") or {}).get("total_tokens") or 0)
    return Reranked(scores, Usage(prompt_tokens=tokens, total_tokens=tokens))
