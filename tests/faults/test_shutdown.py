"""Fault: a worker stopped with SIGTERM (a rolling restart) while it runs a job.

A job that ends within `worker.shutdown_grace_s` ends there; one still running after it is
handed back at once and runs again on another worker, not after its lease (set here beyond the
job's own timeout).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
import redis

from smmf_queue import ChatDelta, Client, job_record, registry
from smmf_queue.embedded_redis import EmbeddedRedis

from ..conftest import StartWorker, WorkerProcess
from . import fault_config

MODEL = "tiny-chat-rolling"
#: a prompt the tiny model answers at length (2,443 tokens at temperature 0, seconds in a
#: worker), so the fault always lands while the reply is still streaming.
QUESTION = [{"role": "user", "content": "what is a queue"}]


def config_with(tmp_path: Path, redis_server: EmbeddedRedis, tiny_models: Path, grace_s: float) -> Path:
    """A lease of 100 s, beyond the reader's timeout: a job comes back early only if released."""
    return fault_config(tmp_path / "rolling.toml", redis_server.url, tiny_models, MODEL, lease_s=100,
                        worker_extra=f"shutdown_grace_s = {grace_s}")


def stream_and_stop_its_worker(config: Path, workers: list[WorkerProcess],
                               redis_client: redis.Redis, job_id: str) -> tuple[list[ChatDelta], WorkerProcess]:
    """Stream a long reply; SIGTERM the worker holding it after the first delta."""
    deltas: list[ChatDelta] = []
    started = threading.Event()
    with Client(config) as client:
        def read() -> None:
            for delta in client.stream_chat(MODEL, QUESTION, max_tokens=3000, temperature=0,
                                            job_id=job_id, timeout=60):
                deltas.append(delta)
                started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        owner = job_record.read(redis_client, job_id).get("owner", "")
        [holder] = [w for w in workers if owner.startswith(w.worker_id)]
        holder.process.send_signal(signal.SIGTERM)
        reader.join(90)
        assert not reader.is_alive()
    return deltas, holder


@pytest.mark.parametrize("grace_s", [30.0], ids=["long-grace"])
def test_a_job_that_ends_within_the_grace_ends_on_the_stopping_worker(
        tmp_path: Path, redis_server: EmbeddedRedis, tiny_models: Path, start_worker: StartWorker,
        redis_client: redis.Redis, grace_s: float) -> None:
    config = config_with(tmp_path, redis_server, tiny_models, grace_s)
    worker = start_worker(MODEL, config=config)
    deltas, holder = stream_and_stop_its_worker(config, [worker], redis_client, "rolling-1")
    assert holder is worker
    assert not any(d.restart for d in deltas) and deltas[-1].finish_reason in ("stop", "length")
    assert worker.process.wait(timeout=30) == 0


def test_a_job_still_running_after_the_grace_is_handed_back_at_once(
        tmp_path: Path, redis_server: EmbeddedRedis, tiny_models: Path, start_worker: StartWorker,
        redis_client: redis.Redis) -> None:
    # Given two workers of a model with a 100 s lease (and a heartbeat that lasts as long), and
    # a long reply on one of them
    config = config_with(tmp_path, redis_server, tiny_models, grace_s=0.1)
    config.write_text(config.read_text().replace("heartbeat_ttl_s = 1.5", "heartbeat_ttl_s = 100"))
    workers = [start_worker(MODEL, config=config), start_worker(MODEL, config=config)]
    # When the worker holding it gets SIGTERM (grace 0.1 s)
    deltas, holder = stream_and_stop_its_worker(config, workers, redis_client, "rolling-2")
    # Then it stops, no longer listed as a live worker (producers do not count on it), and the
    # reply restarts once on the other worker and ends, long before the lease would have run
    # out (the reader's timeout is 60 s)
    assert holder.process.wait(timeout=30) == 0
    assert holder.worker_id not in [w.worker_id for w in registry.live_workers(redis_client)]
    assert sum(1 for d in deltas if d.restart) == 1
    assert deltas[-1].finish_reason in ("stop", "length")
    [other] = [w for w in workers if w is not holder]
    assert job_record.read(redis_client, "rolling-2")["owner"].startswith(other.worker_id)
    other.stop()
