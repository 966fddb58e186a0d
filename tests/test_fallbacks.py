"""Fallbacks (#18): a model's `fallbacks` take a chat it cannot: no live worker, a full queue, or
a failure before the first token; the answer names the model that gave it. Real workers, a real
gateway, the session's Redis."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from smmf_queue import Client, keys
from smmf_queue.config import load_config
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.errors import ConfigError, NoLiveWorker

from .conftest import (
    CHAT,
    GATEWAY_KEY,
    IDLE,
    StartWorker,
    WorkerProcess,
    free_port,
    gateway_process,
    wait_until,
    write_config,
)
from .fake_upstream import FakeUpstream, chat_chunk

DOWN, FULL, BROKEN = "fb-no-worker", "fb-full-queue", "fb-broken-upstream"
ASK = [{"role": "user", "content": "hello there"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fallback_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                    tiny_models: Path, upstream: FakeUpstream) -> Path:
    """The session's models, and three that hand their chats to tiny-noise-chat: one no worker
    serves, one with one slot and a queue of at most one job (its upstream a FAKE that holds
    replies open on demand), one whose upstream refuses every connection."""
    closed_port = free_port()
    return write_config(tmp_path_factory.mktemp("fallbacks") / "fallbacks.toml", redis_server.url,
                        tiny_models, extra=f"""
[[models.llms]]
name = "{DOWN}"
provider = "hf"
path = "{tiny_models / 'tiny-noise-chat'}"
fallbacks = ["{CHAT}"]

[[models.llms]]
name = "{FULL}"
provider = "proxy/openai"
api_base = "{upstream.url}/v1"
api_key = "unused"
max_retries = 0
max_queue_depth = 1
concurrency = 1
fallbacks = ["{CHAT}"]

[[models.llms]]
name = "{BROKEN}"
provider = "proxy/openai"
api_base = "http://127.0.0.1:{closed_port}/v1"
api_key = "unused"
max_retries = 0
fallbacks = ["{DOWN}", "{CHAT}"]
""")


@pytest.fixture(scope="module")
def sdk(fallback_config: Path, chat_worker: WorkerProcess, start_worker: StartWorker) -> Iterator[Client]:
    start_worker(BROKEN, config=fallback_config)
    with Client(fallback_config) as client:
        yield client


def test_a_model_without_a_live_worker_hands_its_chat_to_its_fallback(sdk: Client) -> None:
    direct = sdk.chat(CHAT, ASK, max_tokens=8, temperature=0)
    # When a chat goes to a model no worker serves
    whole = sdk.chat(DOWN, ASK, max_tokens=8, temperature=0)
    streamed = list(sdk.stream_chat(DOWN, ASK, max_tokens=8, temperature=0))
    # Then its fallback answers, and says so
    assert whole.model == CHAT and whole.text == direct.text
    assert "".join(d.text for d in streamed) == direct.text
    assert {d.model for d in streamed} == {CHAT}


def test_a_full_queue_hands_the_chat_to_the_fallback(sdk: Client, redis_client: redis.Redis,
                                                     start_worker: StartWorker, fallback_config: Path,
                                                     upstream: FakeUpstream) -> None:
    # Given the model's one worker slot busy with a reply its upstream holds open, and its
    # queue holding the one job it may hold (max_queue_depth = 1)
    start_worker(FULL, config=fallback_config)
    release = threading.Event()
    upstream.sse([chat_chunk("held")], hold=release, done=False)
    busy = f"fb-busy-{uuid.uuid4().hex}"
    waiting = [threading.Thread(target=_quietly, args=(sdk.chat, FULL, ASK), kwargs={"job_id": busy},
                                daemon=True)]
    waiting += [threading.Thread(target=_quietly, args=(sdk.chat, FULL, ASK), daemon=True) for _ in range(2)]
    for thread in waiting:  # the worker may hold one job back from the list (Celery's prefetch)
        thread.start()
        time.sleep(0.5)
    try:
        wait_until(lambda: sum(redis_client.llen(lane) for lane in keys.queue_lanes("llm", FULL)) == 1,
                   10, "a job waiting on the model's queue")
        # When another chat is sent to it
        result = sdk.chat(FULL, ASK, max_tokens=4, temperature=0)
    finally:
        release.set()
    # Then the full queue sends it to the fallback
    assert result.model == CHAT and result.text


def _quietly(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    """A chat in a thread whose outcome does not matter (it only fills a queue)."""
    with contextlib.suppress(Exception):
        call(*args, **kwargs)


def test_a_failure_before_the_first_token_tries_each_fallback_in_turn(sdk: Client) -> None:
    # When the upstream refuses the connection (the job fails before any token), and the first
    # fallback has no worker
    result = sdk.chat(BROKEN, ASK, max_tokens=4, temperature=0)
    deltas = list(sdk.stream_chat(BROKEN, ASK, max_tokens=4, temperature=0))
    # Then the second fallback answers
    assert result.model == CHAT and result.text
    assert deltas and all(d.model == CHAT for d in deltas)


def test_the_gateway_says_which_model_answered(fallback_config: Path, sdk: Client,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    body = {"model": DOWN, "messages": ASK, "max_tokens": 4, "temperature": 0}
    with gateway_process(fallback_config, tmp_path_factory.mktemp("fallback-gateway")) as url:
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          headers=headers, timeout=60) as response:
            frames = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert whole.status_code == 200 and whole.json()["model"] == CHAT
    assert whole.headers["x-smmf-model"] == CHAT
    assert f'"model":"{CHAT}"' in frames[-1] and '"content"' in "".join(frames)


def test_without_fallbacks_the_error_stands(sdk: Client) -> None:
    with pytest.raises(NoLiveWorker):
        sdk.chat(IDLE, ASK, max_tokens=4, fail_fast=True)


@pytest.mark.parametrize(("entry", "expected"), [
    ('fallbacks = ["no-such-model"]', "expected the name of another configured LLM, got 'no-such-model'"),
    ('fallbacks = ["self"]', "got 'self'"),
])
def test_a_fallback_must_name_another_configured_llm(tmp_path: Path, entry: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[[models.llms]]\nname = "self"\nprovider = "proxy/openai"\n{entry}\n')
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(path) in refused.value.message and "model 'self': key 'fallbacks'" in refused.value.message
    assert expected in refused.value.message


def test_embedding_models_take_no_fallbacks(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[models.llms]]\nname = "chat"\nprovider = "proxy/openai"\n\n'
                    '[[models.embeddings]]\nname = "vec"\nprovider = "proxy/openai"\nfallbacks = ["chat"]\n')
    with pytest.raises(ConfigError, match="only LLMs fall back"):
        load_config(path)


def test_a_virtual_key_falls_back_only_to_models_it_may_call(fallback_config: Path, sdk: Client,
                                                             tmp_path_factory: pytest.TempPathFactory,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    master = {"Authorization": "Bearer sk-fallback-master"}
    monkeypatch.setenv("SMMF_MASTER_KEY", "sk-fallback-master")
    with gateway_process(fallback_config, tmp_path_factory.mktemp("fallback-keys")) as url:
        def key_for(models: list[str]) -> dict[str, str]:
            made = httpx.post(f"{url}/key/generate", json={"models": models}, headers=master, timeout=30)
            return {"Authorization": f"Bearer {made.json()['key']}"}

        def ask(headers: dict[str, str]) -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60,
                              json={"model": DOWN, "messages": ASK, "max_tokens": 4})

        # When a key that may call only the model without a worker asks it
        narrow, wide = ask(key_for([DOWN])), ask(key_for([DOWN, "tiny-*"]))
    # Then the fallback it may not call is skipped, and the model's own error stands
    assert narrow.status_code == 503 and narrow.json()["error"]["code"] == "no_live_worker"
    # While a key that may call the fallback (by pattern) gets its answer
    assert wide.status_code == 200 and wide.json()["model"] == CHAT
