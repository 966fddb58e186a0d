"""Nothing accepted is lost: a Redis restart while a job waits in its queue."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from smmf_queue import Client, keys
from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import CHAT, StartWorker, free_port, wait_until, write_config


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream_chat"])
def test_a_queued_job_survives_a_redis_restart(tmp_path: Path, tiny_models: Path,
                                               start_worker: StartWorker, streamed: bool) -> None:
    # Given a job accepted into the queue of a model with no worker yet
    server = EmbeddedRedis(free_port(), tmp_path / "redis")
    server.start()
    config = write_config(tmp_path / "restart.toml", server.url, tiny_models)
    probe = redis.Redis.from_url(server.url)
    results: list[object] = []
    hello = [{"role": "user", "content": "hi"}]
    with Client(config) as client:
        def wait_for_the_reply() -> None:
            if streamed:  # read on this thread, through the blocking client's own connection
                *_, last = client.stream_chat(CHAT, hello, max_tokens=4, timeout=90)
                results.append(last.usage)
            else:
                results.append(client.chat(CHAT, hello, max_tokens=4, timeout=90))

        waiting = threading.Thread(target=wait_for_the_reply)
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
        # and the client's next job goes out on the producer it kept across the restart
        after = client.chat(CHAT, hello, max_tokens=2, timeout=60)
        worker.stop()
    server.stop()
    assert after.usage.completion_tokens == 2
    if streamed:
        assert results and results[0].completion_tokens == 4
    else:
        assert results and results[0].worker == worker.worker_id
