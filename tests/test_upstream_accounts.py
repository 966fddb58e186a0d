"""Upstream accounts (#18): what one API key at a provider allows holds across every worker and
every model calling it, counted in Redis. An `[accounts.<name>]` rpm delays calls past it to
the next minute (no job fails for it); workers count finished jobs' tokens to its tpm; a 429
that says when to come back holds back the account's calls at every worker, config or none.
Two real worker processes per case, the session's Redis, and the FAKE upstream
(tests/fake_upstream.py): only a scripted server can answer 429 on cue and count calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from smmf_queue import Client, keys
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.model_limits import RateWindows

from .conftest import StartWorker, wait_until, write_config
from .fake_upstream import FakeUpstream, chat_chunk

ASK = [{"role": "user", "content": "hello"}]
pytestmark = pytest.mark.slow


def _proxy(name: str, upstream: FakeUpstream, key: str, account: str | None) -> str:
    return f"""
[[models.llms]]
name = "{name}"
provider = "proxy/openai"
api_base = "{upstream.url}/v1"
api_key = "{key}"
max_retries = 0
concurrency = 4
{f'account = "{account}"' if account else ''}
"""


@pytest.fixture(scope="module")
def accounts_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                    tiny_models: Path, upstream: FakeUpstream) -> Path:
    models = "".join([_proxy("team-a", upstream, "sk-team", "team"), _proxy("team-b", upstream, "sk-team", "team"),
                      _proxy("metered", upstream, "sk-meter", "meter"),
                      _proxy("key-a", upstream, "sk-shared", None), _proxy("key-b", upstream, "sk-shared", None)])
    return write_config(tmp_path_factory.mktemp("accounts") / "accounts.toml", redis_server.url, tiny_models,
                        extra="[accounts.team]\nrpm = 2\n\n[accounts.meter]\ntpm = 50\n" + models)


@pytest.fixture(scope="module")
def sdk(accounts_config: Path, start_worker: StartWorker) -> Iterator[Client]:
    """Each model of a pair in a worker process of its own: they share only Redis."""
    for name in ("team-a", "team-b", "metered", "key-a", "key-b"):
        start_worker(name, config=accounts_config)
    with Client(accounts_config) as client:
        yield client


def _minute(redis_client: redis.Redis) -> int:
    return int(redis_client.time()[0]) // 60


def _inside_one_minute(redis_client: redis.Redis) -> int:
    """The minute on Redis' clock, waiting for a new one if fewer than 15 s are left in this
    one: limits count in fixed minute windows, and a test's calls must share one."""
    if int(redis_client.time()[0]) % 60 > 45:
        time.sleep(60 - int(redis_client.time()[0]) % 60 + 0.5)
    return _minute(redis_client)


def _chat_in_thread(sdk: Client, model: str, answers: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.append(sdk.chat(model, ASK, timeout=120).text))
    thread.start()
    return thread


def test_an_accounts_rpm_holds_across_workers_and_models(sdk: Client, upstream: FakeUpstream,
                                                         redis_client: redis.Redis) -> None:
    # Given an account with rpm = 2 called by two models, each in its own worker
    minute = _inside_one_minute(redis_client)
    upstream.reset()
    for _ in range(3):
        upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop")])
    # When three chats are sent at once, across both models
    answers: list[str] = []
    threads = [_chat_in_thread(sdk, model, answers) for model in ("team-a", "team-b", "team-a")]
    wait_until(lambda: len(upstream.requests) == 2, 20, "two calls within the account's rpm")
    # Then the third reaches the upstream only once the minute turned, and is answered then
    while _minute(redis_client) == minute:
        assert len(upstream.requests) == 2
        time.sleep(0.2)
    for thread in threads:
        thread.join(30)
    assert answers == ["ok"] * 3 and len(upstream.requests) == 3


def test_workers_count_jobs_tokens_to_their_accounts_tpm(sdk: Client, upstream: FakeUpstream,
                                                         redis_client: redis.Redis) -> None:
    # Given an account with tpm = 50
    upstream.reset()
    for _ in range(2):
        upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop"),
                      chat_chunk(usage={"prompt_tokens": 20, "completion_tokens": 10})])
    minute = _inside_one_minute(redis_client)
    # When two chats of 30 tokens each finish
    used = [sdk.chat("metered", ASK).usage.total_tokens for _ in range(2)]
    # Then their tokens are counted to the account's minute, which refuses the next call
    assert used == [30, 30]
    assert redis_client.get(f"{keys.account_limits('meter')}tpm:{minute}") == b"60"
    refusal = RateWindows(redis_client).take(keys.account_limits("meter"), None, 50)
    assert refusal is not None and refusal.limit == "tpm" and refusal.tokens == 60


def test_a_429_holds_back_the_accounts_calls_at_every_worker(sdk: Client, upstream: FakeUpstream) -> None:
    # Given two models on one endpoint and key (no [accounts] entry), in two workers, and a
    # first call answered 429 with Retry-After: 3
    upstream.reset()
    upstream.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}, headers={"retry-after": "3"})
    for _ in range(2):
        upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop")])
    answers: list[str] = []
    first = _chat_in_thread(sdk, "key-a", answers)
    wait_until(lambda: len(upstream.requests) == 1, 20, "the first chat's 429")
    # When the other worker's model is called during the cool-down
    second = _chat_in_thread(sdk, "key-b", answers)
    time.sleep(1.5)
    # Then it waits too, instead of meeting the 429; both are answered afterwards
    assert len(upstream.requests) == 1
    first.join(30)
    second.join(30)
    assert answers == ["ok", "ok"] and len(upstream.requests) == 3
