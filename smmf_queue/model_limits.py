"""Requests and tokens per minute per model (`rpm`, `tpm` on a model entry, as LiteLLM names a
deployment's limits), shared by every producer and worker on one Redis.

Producers (the SDK, and so the gateway) admit each job with one script right before enqueueing
it (ADMIT: under both limits in the current minute, then the request counted); workers count the
tokens each job really used when it ends (COUNT). Over a limit the SDK raises RateLimited with
the wait, and the gateway answers 429 with Retry-After and OpenAI's `x-ratelimit-*` headers.
tpm counts tokens already used: a model's jobs are refused once its minute used `tpm` tokens, so
the last job admitted may take the minute past it. Minutes are fixed windows on Redis' clock.
"""

from __future__ import annotations

import redis

from . import keys
from .config import ModelConfig
from .errors import RateLimited
from .virtual_keys import ratelimit_headers

ADMIT = """
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


class ModelLimits:
    """The limits' two scripts on one (blocking) Redis client."""

    def __init__(self, client: redis.Redis):
        self._admit = client.register_script(ADMIT)
        self._count = client.register_script(COUNT)

    def admit(self, model: ModelConfig) -> None:
        """Count one job of `model`, or raise RateLimited if its minute is full."""
        answer = self._admit(keys=[keys.model_limits(model.name)], args=[model.rpm or 0, model.tpm or 0])
        if answer[0] == b"ok":
            return
        reset, requests, tokens = (int(value) for value in answer[1:4])
        what, limit = ("requests", model.rpm) if answer[0] == b"rpm" else ("tokens", model.tpm)
        raise RateLimited(f"Rate limit reached for {what} per minute on model '{model.name}': "
                          f"limit {limit}; try again in {reset} s.", retry_after_s=reset,
                          headers=ratelimit_headers(reset, model.rpm or 0, requests, model.tpm or 0, tokens))

    def count(self, model: ModelConfig, tokens: int) -> None:
        """Add the tokens a job of `model` used to its minute (models with a tpm only)."""
        if model.tpm and tokens:
            self._count(keys=[keys.model_limits(model.name)], args=[tokens])
