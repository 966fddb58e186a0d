"""Nothing accepted is lost: a Redis restart while a job waits in its queue."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis

from smmf_queue import Client, keys
from smmf_queue.embedded import EmbeddedRedis

from .conftest import CHAT, StartWorker, free_port, wait_until, write_config


def test_a_queued_job_survives_a_redis_restart(tmp_path: Path, tiny_models: Path,
                                               start_worker: StartWorker) -> None:
    # Given a job accepted into the queue of a model with no worker yet
    server = EmbeddedRedis(free_port(), tmp_path / "redis")
    server.start()
    config = write_config(tmp_path / "restart.toml", server.url, tiny_models)
    probe = redis.Redis.from_url(server.url)
    results: list[object] = []
    with Client(config) as client:
        waiting = threading.Thread(target=lambda: results.append(
            client.chat(CHAT, [{"role": "user", "content": "hi"}], max_tokens=4, timeout=90)))
        waiting.start()
        wait_until(lambda: probe.llen(keys.queue_name("llm", CHAT)) == 1, 10, "the queued job")
        # When Redis restarts (same data folder) and only then a worker starts
        server.stop()
        time.sleep(0.5)
        server.start()
        assert probe.llen(keys.queue_name("llm", CHAT)) == 1
        worker = start_worker(CHAT, config=config)
        # Then the job is served and the waiting caller gets its result
        waiting.join(90)
        worker.stop()
    server.stop()
    assert results and results[0].worker == worker.worker_id
