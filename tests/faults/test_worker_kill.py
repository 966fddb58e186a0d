"""Fault: a whole worker process killed with SIGKILL in the middle of a job.

Its job must come back through its lease (reaper.py), not through kombu's visibility timeout,
which these tests set far beyond the job's own timeout: a job that came back that way would
fail the test by timing out.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from smmf_queue import Client, keys, load_config
from smmf_queue.attempt import Attempt, Deliveries
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.queues import make_celery_app
from smmf_queue.reaper import Reaper

from ..conftest import StartWorker, free_port
from . import fault_config

MODEL = "tiny-chat-reaped"
#: a prompt the tiny model answers at length (2,443 tokens at temperature 0, seconds in a
#: worker), so the fault always lands while the reply is still streaming.
QUESTION = [{"role": "user", "content": "what is a queue"}]


@pytest.fixture(scope="module")
def reaped_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                  tiny_models: Path) -> Path:
    return fault_config(tmp_path_factory.mktemp("reaper") / "reaper.toml", redis_server.url,
                        tiny_models, MODEL)


def test_a_killed_workers_job_comes_back_by_its_lease_not_the_visibility_timeout(
        reaped_config: Path, start_worker: StartWorker) -> None:
    # Given a long reply streaming from the only worker of its model
    first = start_worker(MODEL, config=reaped_config)
    deltas = []
    started = threading.Event()
    with Client(reaped_config) as client:
        def read() -> None:
            for delta in client.stream_chat(MODEL, QUESTION, max_tokens=3000, temperature=0,
                                            timeout=60):
                deltas.append(delta)
                started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        # When that worker is killed with SIGKILL and a replica starts
        first.kill()
        second = start_worker(MODEL, config=reaped_config)
        reader.join(90)
        # Then the reply restarts once and ends, from the replica, long before kombu's sweep
        assert not reader.is_alive()
        assert sum(1 for d in deltas if d.restart) == 1
        assert deltas[-1].finish_reason in ("stop", "length")
        whole = client.chat(MODEL, QUESTION, max_tokens=3000, temperature=0)
        restart = next(i for i, d in enumerate(deltas) if d.restart)
        assert "".join(d.text for d in deltas[restart + 1:]) == whole.text
        assert whole.worker == second.worker_id
    second.stop()


def test_the_reaper_hands_back_only_expired_running_jobs_once(
        tmp_path: Path, reaped_config: Path) -> None:
    # (a Redis of its own: the live workers of other tests reap the shared one too)
    with EmbeddedRedis(free_port(), tmp_path / "redis", appendonly=False) as server:
        _reap_only_expired_running_jobs_once(redis.Redis.from_url(server.url), reaped_config)


def _reap_only_expired_running_jobs_once(redis_client: redis.Redis, config: Path) -> None:
    deliveries = Deliveries(redis_client, "w", lease_s=0.2, max_attempts=3, record_ttl_s=60,
                            event_ttl_s=60, max_events=100)
    reaper = Reaper(redis_client, make_celery_app(load_config(config)), event_ttl_s=600)
    # Given a job whose worker died after its first event (its log has no TTL yet) and a
    # finished one
    assert deliveries.claim("reap-dead", "dead").outcome == "claimed"
    Attempt(deliveries, "reap-dead", "dead", 1, None).delta("half a reply")
    assert redis_client.ttl(keys.event_log("reap-dead")) == -1
    assert deliveries.claim("reap-done", "done").outcome == "claimed"
    done = Attempt(deliveries, "reap-done", "done", 1, None)
    assert done.finish(done.next_event("end"))

    def alive(attempt: Attempt) -> list[list[str]]:
        # and one running on a live worker, whose heartbeat renews its lease
        time.sleep(0.25)
        deliveries.renew_leases()
        # When the reaper passes twice
        return [reaper.reap(), reaper.reap()]

    first, second = deliveries.run("reap-alive", None, alive) or []
    # Then only the dead one is handed back, once, its log now expiring; the live one stays indexed
    assert first == ["reap-dead"] and second == []
    assert 0 < redis_client.ttl(keys.event_log("reap-dead")) <= 600
    assert redis_client.zscore(keys.LEASES, "reap-alive") is not None
    assert redis_client.zscore(keys.LEASES, "reap-done") is None
    reaper.close()
