"""Requests and tokens per minute, shared by every producer and worker on one Redis: per model
(`rpm`, `tpm` on a model entry, as LiteLLM names a deployment's limits) and per upstream account
(`[accounts.<name>]`, upstream_accounts.py).

Producers (the SDK, and so the gateway) admit each job of a model with one script right before
enqueueing it (TAKE: under both limits in the current minute, then the request counted); workers
count the tokens each job really used when it ends (COUNT). Over a model's limit the SDK raises
RateLimited with the wait, and the gateway answers 429 with Retry-After and OpenAI's
`x-ratelimit-*` headers. tpm counts tokens already used: jobs are refused once the minute used
`tpm` tokens, so the last job admitted may take the minute past it. Minutes are fixed windows on
Redis' clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from . import keys
from .config import ModelConfig
from .errors import RateLimited
from .virtual_keys import ratelimit_headers

TAKE = """
local now = tonumber(redis.call('TIME')[1])
local window, reset = math.floor(now / 60), 60 - now % 60
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local requests_key, tokens_key = KEYS[1] .. 'rpm:' .. window, KEYS[1] .. 'tpm:' .. window
local requests = tonumber(redis.call('GET', requests_key) or '0')
local tokens = tonumber(redis.call('GET', tokens_key) or '0')
if rpm > 0 and requests >= rpm then return {'rpm', reset, requests, tokens} end
if tpm > 0 and tokens >= tpm then return {'tpm', reset, requests, tokens} end
if rpm > 0 then
  redis.call('INCR', requests_key)
  redis.call('EXPIRE', requests_key, 120)
end
return {'ok'}
"""

COUNT = """
local key = KEYS[1] .. 'tpm:' .. math.floor(tonumber(redis.call('TIME')[1]) / 60)
redis.call('INCRBY', key, ARGV[1])
redis.call('EXPIRE', key, 120)
"""


@dataclass(frozen=True)
class Refusal:
    """Why a minute is full: `limit` ("rpm" or "tpm") was reached; it resets in `reset_s`."""

    limit: str
    reset_s: int
    requests: int
    tokens: int


class RateWindows:
    """The two scripts on one (blocking) Redis client, for any window prefix."""

    def __init__(self, client: redis.Redis):
        self._take = client.register_script(TAKE)
        self._count = client.register_script(COUNT)

    def take(self, prefix: str, rpm: int | None, tpm: int | None) -> Refusal | None:
        """Count one request in the current minute, or say why its minute is full."""
        answer = self._take(keys=[prefix], args=[rpm or 0, tpm or 0])
        if answer[0] == b"ok":
            return None
        reset, requests, tokens = (int(value) for value in answer[1:4])
        return Refusal(answer[0].decode(), reset, requests, tokens)

    def count(self, prefix: str, tokens: int) -> None:
        """Add tokens used to the current minute."""
        if tokens:
            self._count(keys=[prefix], args=[tokens])

    def admit(self, model: ModelConfig) -> None:
        """Count one job of `model`, or raise RateLimited if its minute is full."""
        refusal = self.take(keys.model_limits(model.name), model.rpm, model.tpm)
        if refusal is None:
            return
        what, limit = ("requests", model.rpm) if refusal.limit == "rpm" else ("tokens", model.tpm)
        raise RateLimited(f"Rate limit reached for {what} per minute on model '{model.name}': "
                          f"limit {limit}; try again in {refusal.reset_s} s.", retry_after_s=refusal.reset_s,
                          headers=ratelimit_headers(refusal.reset_s, model.rpm or 0, refusal.requests,
                                                    model.tpm or 0, refusal.tokens))
