"""Fault: a job that waits in its queue past its deadline (`queue_timeout`), behind a long one.

It must not run, and its caller must get a clear timeout, not wait for the job's own timeout.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import redis

from smmf_queue import Client, JobTimeout, keys
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.streaming import decode_log

from ..conftest import GATEWAY_KEY, StartWorker, free_port, start_service
from . import fault_config

MODEL = "tiny-chat-deadline"
LONG = [{"role": "user", "content": "what is a queue"}]  # seconds of reply on the tiny model


def test_a_job_past_its_queue_deadline_is_not_run_and_its_caller_gets_a_timeout(
        tmp_path: Path, redis_server: EmbeddedRedis, tiny_models: Path, start_worker: StartWorker,
        redis_client: redis.Redis) -> None:
    config = fault_config(tmp_path / "deadline.toml", redis_server.url, tiny_models, MODEL)
    worker = start_worker(MODEL, config=config)  # one slot
    port = free_port()
    gateway = start_service("gateway", config, tmp_path / "gateway.log",
                            f"http://127.0.0.1:{port}/healthz", "--port", str(port))
    with Client(config) as client:
        # Given the model's only slot busy with a long reply
        started = threading.Event()

        def long_job() -> None:
            for _ in client.stream_chat(MODEL, LONG, max_tokens=3000, temperature=0):
                started.set()

        busy = threading.Thread(target=long_job)
        busy.start()
        assert started.wait(30)
        # When a job that may wait at most half a second in the queue is sent behind it
        # (one through the gateway, its deadline in a header, and one through the SDK)
        answers: list[httpx.Response] = []
        through_gateway = threading.Thread(target=lambda: answers.append(httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {GATEWAY_KEY}", "x-smmf-queue-timeout": "0.5"})))
        through_gateway.start()
        with pytest.raises(JobTimeout, match="deadline"):
            client.chat(MODEL, [{"role": "user", "content": "hi"}], max_tokens=2, timeout=60,
                        queue_timeout=0.5, job_id="deadline-1")
        through_gateway.join(60)
        busy.join(60)
    # Then it never ran: its log holds only the error that ended it
    events = decode_log(redis_client.xrange(keys.event_log("deadline-1")))  # type: ignore[arg-type]
    assert [(e.type, e.error_type) for e in events] == [("error", "DeadlineExceeded")]
    [answer] = answers
    assert (answer.status_code, answer.json()["error"]["code"]) == (504, "job_timeout")
    assert "deadline" in answer.json()["error"]["message"]
    gateway.terminate()
    worker.stop()
