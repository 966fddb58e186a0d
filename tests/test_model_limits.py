"""Per-model rpm and tpm (#18): counted in Redis by every producer (admission) and worker (tokens
used), so they hold for the SDK and the gateway alike; over them, RateLimited with the wait
(SDK) or 429 with Retry-After and x-ratelimit-* (gateway); a model with fallbacks hands its
chat on instead. Real workers, a real gateway, the session's Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from smmf_queue import Client
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.errors import RateLimited

from .conftest import CHAT, GATEWAY_KEY, StartWorker, WorkerProcess, gateway_process, write_config

RPM, TPM, SPILLS = "limited-rpm", "limited-tpm", "limited-with-fallback"
ASK = [{"role": "user", "content": "hello"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def limits_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                  tiny_models: Path) -> Path:
    model = tiny_models / "tiny-noise-chat"
    return write_config(tmp_path_factory.mktemp("limits") / "limits.toml", redis_server.url, tiny_models,
                        extra=f"""
[[models.llms]]
name = "{RPM}"
provider = "hf"
path = "{model}"
rpm = 3

[[models.llms]]
name = "{TPM}"
provider = "hf"
path = "{model}"
tpm = 60

[[models.llms]]
name = "{SPILLS}"
provider = "hf"
path = "{model}"
rpm = 1
fallbacks = ["{CHAT}"]
""")


@pytest.fixture(scope="module")
def sdk(limits_config: Path, start_worker: StartWorker, chat_worker: WorkerProcess) -> Iterator[Client]:
    start_worker(RPM, TPM, SPILLS, config=limits_config)
    with Client(limits_config) as client:
        yield client


@pytest.fixture(autouse=True)
def inside_one_minute(redis_client: redis.Redis) -> None:
    """Wait for a new minute on Redis' clock if fewer than 20 s are left in this one: limits
    count in fixed minute windows, and a test's requests must share one."""
    seconds = int(redis_client.time()[0]) % 60
    if seconds > 40:
        time.sleep(60 - seconds + 0.5)


def test_rpm_holds_for_the_sdk_and_the_gateway_together(sdk: Client, limits_config: Path,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    with gateway_process(limits_config, tmp_path_factory.mktemp("limits-gateway")) as url:
        # When two chats go through the SDK and two through the gateway, against rpm = 3
        assert all(sdk.chat(RPM, ASK, max_tokens=2).model == RPM for _ in range(2))
        through = [httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
                              json={"model": RPM, "messages": ASK, "max_tokens": 2}, timeout=60)
                   for _ in range(2)]
        # Then the fourth is refused at the gateway with OpenAI's 429 and headers
        assert [r.status_code for r in through] == [200, 429]
        refused = through[1]
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.headers["x-ratelimit-limit-requests"] == "3"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    # And the SDK's next is refused too, saying how long to wait
    with pytest.raises(RateLimited) as limited:
        sdk.chat(RPM, ASK, max_tokens=2)
    assert 0 < limited.value.retry_after_s <= 60 and RPM in limited.value.message


def test_tpm_stops_a_model_once_its_minute_used_that_many_tokens(sdk: Client) -> None:
    used: list[int] = []
    with pytest.raises(RateLimited, match="tokens per minute"):
        while len(used) < 30:
            result = sdk.chat(TPM, ASK, max_tokens=8)
            used.append(result.usage.prompt_tokens + result.usage.completion_tokens)
    # Refused once the tokens really used reached tpm, and not before
    assert sum(used[:-1]) < 60 <= sum(used)


def test_a_rate_limited_model_hands_its_chat_to_its_fallback(sdk: Client) -> None:
    first = sdk.chat(SPILLS, ASK, max_tokens=2)
    second = sdk.chat(SPILLS, ASK, max_tokens=2)
    assert first.model == SPILLS and second.model == CHAT
