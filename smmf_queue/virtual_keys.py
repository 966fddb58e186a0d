"""Virtual keys: API keys made and revoked at run time, each with the models it may call, its
requests and tokens per minute, a token budget per period and an expiry. They live in Redis, so
every gateway replica sees a change on its next request.

A key is stored only as its SHA-256 (the key itself is shown once, when made); its record keeps
the last four characters for people to tell keys apart. Fields and admin routes follow LiteLLM's
proxy (`key_alias`, `models`, `rpm_limit`, `tpm_limit`, `duration`, `metadata`), so its users'
scripts keep working; the budget is ours, in tokens (`token_budget` per `budget_duration`).

Each request is admitted by one Lua script (ADMIT): the key exists, has not expired, may call
the model, and is under its budget and its rpm and tpm in the current minute (fixed windows on
Redis' clock, shared by every replica); it counts the request and reserves the request's
`max_tokens`. When the job ends, SETTLE puts the tokens really used in the reservation's place
and adds them to the key's budget and usage. The scripts build counter names from the record,
so they need one Redis, not a Cluster (as the rest of smmf-queue does).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis
import redis.asyncio
from pydantic import ConfigDict, Field, field_validator

from . import keys, metrics
from .errors import (
    BudgetExceeded,
    InvalidKey,
    KeyAliasTaken,
    ModelNotAllowed,
    RateLimited,
    UnknownKey,
)
from .jobs import Usage
from .json_types import JsonBody

#: what a made key starts with (as OpenAI's and LiteLLM's do).
KEY_PREFIX = "sk-"
#: days a day's usage by key and model is kept.
USAGE_DAYS = 400
#: what a day's usage counts per key and model.
_MEASURES = ("requests", "prompt_tokens", "completion_tokens", "failed")
#: a key's token: the SHA-256 of the key, in hex.
_TOKEN = re.compile(r"[0-9a-f]{64}")
#: LiteLLM's duration strings ("30s", "15m", "12h", "30d", "2w", "1mo"), at most 9999 of a unit
#: (822 years: a key's expiry must stay a date). Also the OpenAPI document's pattern.
DURATION_PATTERN = r"^0*([1-9][0-9]{0,3})(s|m|h|d|w|mo)$"
_DURATION = re.compile(DURATION_PATTERN)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}


def parse_duration(text: str) -> int:
    """Seconds in a duration string (DURATION_PATTERN)."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration like 30s, 15m, 12h, 30d, 2w or 1mo "
                         "(1 to 9999 of a unit)")
    return int(match.group(1)) * _SECONDS[match.group(2)]


class KeySpec(JsonBody):
    """What a key may do: the body of `/key/generate` and (every field optional) `/key/update`."""

    model_config = ConfigDict(extra="forbid")

    key_alias: str | None = Field(default=None, min_length=1, max_length=200)
    #: model names or shell-style patterns ("team-a-*"); empty: every model.
    models: list[str] = Field(default_factory=list)
    rpm_limit: int | None = Field(default=None, ge=1)
    tpm_limit: int | None = Field(default=None, ge=1)
    token_budget: int | None = Field(default=None, ge=1)
    #: the budget's period ("30d"); none: the budget is for the key's whole life.
    budget_duration: str | None = Field(default=None, json_schema_extra={"pattern": DURATION_PATTERN})
    #: how long the key lives ("30d"); none: until revoked.
    duration: str | None = Field(default=None, json_schema_extra={"pattern": DURATION_PATTERN})
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("duration", "budget_duration")
    @classmethod
    def _is_duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _lua_pattern(model_pattern: str) -> str:
    """A shell-style model pattern ('*' for any text) as a Lua pattern for ADMIT."""
    escaped = re.sub(r"([\^$()%.\[\]+\-?])", r"%\1", model_pattern)
    return escaped.replace("*", ".*")


def _record_fields(spec: dict[str, Any], now: float) -> dict[Any, Any]:
    """The Redis hash fields for the given KeySpec fields (empty string: no limit)."""
    out: dict[Any, Any] = {}
    for name, value in spec.items():
        if name == "models":
            out["models"] = json.dumps(value)
            out["patterns"] = "\n".join(_lua_pattern(m) for m in value)
        elif name == "metadata":
            out["metadata"] = json.dumps(value)
        elif name == "duration":
            out["duration"] = value or ""
            out["expires_at"] = str(int(now) + parse_duration(value)) if value else "0"
        elif name == "budget_duration":
            out["budget_duration"] = value or ""
            out["budget_s"] = str(parse_duration(value)) if value else "0"
        else:
            out[name] = "" if value is None else str(value)
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _iso(epoch: str | None) -> str | None:
    if not epoch or epoch == "0":
        return None
    return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat()


class KeyStore:
    """The admin side: make, read, change and revoke keys (the gateway's `/key/*` routes and
    `smmf-queue keys`)."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def generate(self, spec: KeySpec) -> dict[str, Any]:
        """A new key; the answer is the only place the key itself ever appears."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        token = key_hash(key)
        if spec.key_alias and not self.redis.hsetnx(keys.VIRTUAL_KEY_ALIASES, spec.key_alias, token):
            raise KeyAliasTaken(f"key_alias '{spec.key_alias}' is taken by another key")
        now = time.time()
        record: dict[Any, Any] = {"token": token, "key_name": f"{KEY_PREFIX}...{key[-4:]}",
                                  "created_at": str(int(now)), "counters": keys.virtual_key_counters(token),
                                  **_record_fields(spec.model_dump(), now)}
        pipe = self.redis.pipeline()
        pipe.hset(keys.virtual_key(token), mapping=record)
        pipe.sadd(keys.VIRTUAL_KEYS, token)
        pipe.execute()
        return {"key": key, **self._public(record)}

    def info(self, named: str) -> dict[str, Any]:
        record = self._record(self._token(named))
        return self._public(record)

    def records(self) -> list[dict[str, Any]]:
        tokens = sorted(_text(t) for t in self.redis.smembers(keys.VIRTUAL_KEYS))
        records = [self._load(token) for token in tokens]
        return [self._public(record) for record in records if record]

    def update(self, named: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the given fields only (a KeySpec's, validated by the caller) of the key named
        by the key itself, its token, or its alias."""
        token = self._token(named)
        record = self._record(token)
        alias = changes.get("key_alias")
        if alias and alias != record.get("key_alias"):
            if not self.redis.hsetnx(keys.VIRTUAL_KEY_ALIASES, alias, token):
                raise KeyAliasTaken(f"key_alias '{alias}' is taken by another key")
            if record.get("key_alias"):
                self.redis.hdel(keys.VIRTUAL_KEY_ALIASES, record["key_alias"])
        self.redis.hset(keys.virtual_key(token), mapping=_record_fields(changes, time.time()))
        return self._public(self._record(token))

    def delete(self, keys_or_tokens: list[str], aliases: list[str]) -> list[str]:
        """Revoke keys, named by key, token or alias; the tokens revoked. The next request with
        one of them is refused by every replica (nothing caches a record)."""
        tokens = [self._token(name) for name in [*keys_or_tokens, *aliases]]
        for token in tokens:
            record = self._record(token)
            pipe = self.redis.pipeline()
            pipe.delete(keys.virtual_key(token), record["counters"] + "usage")
            pipe.srem(keys.VIRTUAL_KEYS, token)
            if record.get("key_alias"):
                pipe.hdel(keys.VIRTUAL_KEY_ALIASES, record["key_alias"])
            pipe.execute()
        return tokens

    def usage(self, named: str | None, since: str) -> list[dict[str, Any]]:
        """Usage by key and model over the UTC days that `since` ("7d", "24h") reaches back
        into, today's included; one key's (by key, token or alias) or every key's."""
        token = self._token(named) if named else None
        days = min(USAGE_DAYS, max(1, math.ceil(parse_duration(since) / 86400)))  # none older is kept
        today = int(self.redis.time()[0]) // 86400
        pipe = self.redis.pipeline(transaction=False)
        for day in range(today - days + 1, today + 1):
            pipe.hgetall(keys.usage_day(day))
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for day_usage in pipe.execute():
            for field_name, count in day_usage.items():
                row_token, rest = _text(field_name).split("|", 1)  # a model's name may hold "|"
                model, measure = rest.rsplit("|", 1)
                if token is None or row_token == token:
                    row = rows.setdefault((row_token, model), {"token": row_token, "model": model})
                    row[measure] = row.get(measure, 0) + int(count)
        aliases = {_text(t): _text(a) for a, t in self.redis.hgetall(keys.VIRTUAL_KEY_ALIASES).items()}
        return [{"key_alias": aliases.get(row["token"]), **{m: 0 for m in _MEASURES}, **row}
                for row in sorted(rows.values(), key=lambda r: (r["token"], r["model"]))]

    def _token(self, named: str) -> str:
        """The token of a key named by the key itself, its token, or its alias."""
        if named.startswith(KEY_PREFIX):
            return key_hash(named)
        if _TOKEN.fullmatch(named):
            return named
        token = self.redis.hget(keys.VIRTUAL_KEY_ALIASES, named)
        if token is None:
            raise UnknownKey(f"no key has the alias '{named}'")
        return _text(token)

    def _load(self, token: str) -> dict[str, str]:
        raw = self.redis.hgetall(keys.virtual_key(token))
        return {_text(k): _text(v) for k, v in raw.items()}

    def _record(self, token: str) -> dict[str, str]:
        record = self._load(token)
        if not record:
            raise UnknownKey("no such key (never made, or revoked)")
        return record

    def _public(self, record: dict[str, str]) -> dict[str, Any]:
        """A record as the admin API shows it: no key, no hash fields of ours."""
        usage = {_text(k): int(v) for k, v in self.redis.hgetall(record["counters"] + "usage").items()}

        def number(name: str) -> int | None:
            return int(record[name]) if record.get(name) else None

        return {"token": record["token"], "key_name": record["key_name"],
                "key_alias": record.get("key_alias") or None, "models": json.loads(record["models"]),
                "rpm_limit": number("rpm_limit"), "tpm_limit": number("tpm_limit"),
                "token_budget": number("token_budget"),
                "budget_duration": record.get("budget_duration") or None,
                "duration": record.get("duration") or None, "expires": _iso(record.get("expires_at")),
                "metadata": json.loads(record["metadata"]), "created_at": _iso(record["created_at"]),
                "usage": {"requests": usage.get("requests", 0),
                          "prompt_tokens": usage.get("prompt_tokens", 0),
                          "completion_tokens": usage.get("completion_tokens", 0)}}


ADMIT = """
local r = redis.call('HMGET', KEYS[1], 'counters', 'expires_at', 'patterns', 'rpm_limit',
                     'tpm_limit', 'token_budget', 'budget_s', 'token', 'key_alias', 'models')
if not r[1] then return {'unknown'} end
local now = tonumber(redis.call('TIME')[1])
local expires = tonumber(r[2]) or 0
if expires > 0 and now >= expires then return {'expired'} end
if ARGV[1] ~= '' and r[3] and r[3] ~= '' then
  local allowed = false
  for pattern in string.gmatch(r[3], '[^\\n]+') do
    if string.find(ARGV[1], '^' .. pattern .. '$') then allowed = true break end
  end
  if not allowed then return {'model'} end
end
if ARGV[3] == 'check' then return {'ok', r[1], 0, 0, 0, 0, 0, 0, 0, 0, r[8], r[9] or '', r[10]} end
local budget, period_s = tonumber(r[6]) or 0, tonumber(r[7]) or 0
if budget > 0 then
  local period = period_s > 0 and math.floor(now / period_s) or 0
  local used = tonumber(redis.call('GET', r[1] .. 'budget:' .. period) or '0')
  if used >= budget then
    return {'budget', period_s > 0 and (period + 1) * period_s - now or 0, budget, used}
  end
end
local window, reset = math.floor(now / 60), 60 - now % 60
local rpm, tpm, reserve = tonumber(r[4]) or 0, tonumber(r[5]) or 0, tonumber(ARGV[2])
local requests_key, tokens_key = r[1] .. 'rpm:' .. window, r[1] .. 'tpm:' .. window
local requests = tonumber(redis.call('GET', requests_key) or '0')
local tokens = tonumber(redis.call('GET', tokens_key) or '0')
if rpm > 0 and requests >= rpm then return {'rpm', reset, rpm, requests, tpm, tokens} end
if tpm > 0 and (tokens >= tpm or tokens + reserve > tpm) then
  return {'tpm', reset, rpm, requests, tpm, tokens}
end
if rpm > 0 then
  redis.call('INCR', requests_key)
  redis.call('EXPIRE', requests_key, 120)
end
if tpm > 0 then
  redis.call('INCRBY', tokens_key, reserve)
  redis.call('EXPIRE', tokens_key, 120)
end
return {'ok', r[1], window, reset, rpm, requests + 1, tpm, tokens + reserve, budget, period_s,
        r[8], r[9] or '', r[10]}
"""

SETTLE = """
local counters, window, reserved = ARGV[1], ARGV[2], tonumber(ARGV[3])
local prompt, completion = tonumber(ARGV[4]), tonumber(ARGV[5])
local used = prompt + completion
local now = tonumber(redis.call('TIME')[1])
if tonumber(ARGV[6]) > 0 then
  local tokens_key = counters .. 'tpm:' .. window
  if redis.call('EXISTS', tokens_key) == 1 then redis.call('INCRBY', tokens_key, used - reserved) end
end
if tonumber(ARGV[7]) > 0 then
  local period_s = tonumber(ARGV[8])
  local period = period_s > 0 and math.floor(now / period_s) or 0
  local budget_key = counters .. 'budget:' .. period
  redis.call('INCRBY', budget_key, used)
  if period_s > 0 then redis.call('EXPIRE', budget_key, 2 * period_s) end
end
redis.call('HINCRBY', counters .. 'usage', 'requests', 1)
redis.call('HINCRBY', counters .. 'usage', 'prompt_tokens', prompt)
redis.call('HINCRBY', counters .. 'usage', 'completion_tokens', completion)
local day = ARGV[9] .. math.floor(now / 86400)
local field = ARGV[10] .. '|' .. ARGV[11] .. '|'
redis.call('HINCRBY', day, field .. 'requests', 1)
redis.call('HINCRBY', day, field .. 'prompt_tokens', prompt)
redis.call('HINCRBY', day, field .. 'completion_tokens', completion)
if ARGV[12] ~= 'ok' then redis.call('HINCRBY', day, field .. 'failed', 1) end
redis.call('EXPIRE', day, USAGE_DAYS * 86400)
if ARGV[13] ~= '' then redis.call('XADD', ARGV[13], '*', 'row', ARGV[14]) end
"""


@dataclass
class Admission:
    """An admitted request: what SETTLE needs, and the `x-ratelimit-*` headers to answer with."""

    counters: str
    window: int
    reserved: int
    tpm: int
    budget: int
    budget_s: int
    token: str
    alias: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    #: the models (names or patterns) the key may call; empty for all.
    models: list[str] = field(default_factory=list)


def may_call(models: list[str], name: str) -> bool:
    """Whether a key allowed `models` (names or patterns, as ADMIT reads them) may call `name`."""
    return not models or any(re.fullmatch(re.escape(m).replace(r"\*", ".*"), name) for m in models)


def ratelimit_headers(reset_s: int, rpm: int, requests: int, tpm: int, tokens: int) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers, for the limits the key has."""
    headers: dict[str, str] = {}
    for what, limit, used in (("requests", rpm, requests), ("tokens", tpm, tokens)):
        if limit:
            headers |= {f"x-ratelimit-limit-{what}": str(limit),
                        f"x-ratelimit-remaining-{what}": str(max(0, limit - used)),
                        f"x-ratelimit-reset-{what}": f"{reset_s}s"}
    return headers


class Gatekeeper:
    """The gateway's side: admit each request with one script call, settle it when it ends."""

    def __init__(self, client: redis.asyncio.Redis):
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE.replace("USAGE_DAYS", str(USAGE_DAYS)))

    async def admit(self, key: str, model: str, reserve: int = 0) -> Admission:
        """Admit one request of `key` for `model`, reserving `reserve` tokens; raises
        InvalidKey, ModelNotAllowed, RateLimited or BudgetExceeded."""
        answer = await self._admit(keys=[keys.virtual_key(key_hash(key))], args=[model, reserve, "count"])
        self._refuse(answer, model)
        counters, window, reset, rpm, requests, tpm, tokens, budget, budget_s, token, alias, models = answer[1:13]
        return Admission(counters.decode(), int(window), reserve, int(tpm), int(budget), int(budget_s),
                         token.decode(), alias.decode(), model,
                         ratelimit_headers(int(reset), int(rpm), int(requests), int(tpm), int(tokens)),
                         json.loads(models))

    async def check(self, key: str, model: str = "") -> list[str]:
        """For a route that runs no job: the key exists, has not expired and (given a model) may
        call it, or InvalidKey / ModelNotAllowed; the models (names or patterns) it may call,
        empty for all. Nothing is counted."""
        answer = await self._admit(keys=[keys.virtual_key(key_hash(key))], args=[model, 0, "check"])
        self._refuse(answer, model)
        return list(json.loads(answer[12]))

    @staticmethod
    def _refuse(answer: list[Any], model: str) -> None:
        """Raise what ADMIT's answer refuses, if it does."""
        verdict = answer[0].decode()
        if verdict == "unknown":
            raise InvalidKey("Incorrect API key provided (unknown or revoked).")
        if verdict == "expired":
            raise InvalidKey("This API key has expired.")
        if verdict == "model":
            raise ModelNotAllowed(f"this API key may not call model '{model}'", model=model)
        if verdict == "budget":
            wait, budget, used = (int(v) for v in answer[1:4])
            raise BudgetExceeded(f"this API key has used its budget of {budget} tokens ({used} used)"
                                 + (f"; it renews in {wait} s" if wait else ""), retry_after_s=wait or 0)
        if verdict in ("rpm", "tpm"):
            reset, rpm, requests, tpm, tokens = (int(v) for v in answer[1:6])
            what = "requests" if verdict == "rpm" else "tokens"
            limit = rpm if verdict == "rpm" else tpm
            raise RateLimited(f"Rate limit reached for {what} per minute on this API key: limit "
                              f"{limit}; try again in {reset} s.", retry_after_s=reset,
                              headers=ratelimit_headers(reset, rpm, requests, tpm, tokens))

    async def settle(self, admission: Admission, usage: Usage | None, ledger_row: str | None = None) -> None:
        """Count what the job really used (nothing, for one that failed): to the key's limits
        and usage, to the day's usage by key and model, and to the Prometheus counter; and
        queue its `ledger_row` for the usage ledger (usage_ledger.py), if given."""
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        await self._settle(args=[admission.counters, admission.window, admission.reserved, prompt,
                                 completion, admission.tpm, admission.budget, admission.budget_s,
                                 keys.USAGE_DAY_PREFIX, admission.token, admission.model,
                                 "ok" if usage else "failed",
                                 keys.USAGE_LEDGER if ledger_row else "", ledger_row or ""])
        for kind, count in (("prompt", prompt), ("completion", completion)):
            metrics.KEY_TOKENS.labels(admission.alias or "none", admission.model, kind).inc(count)

