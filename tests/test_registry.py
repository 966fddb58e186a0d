"""Worker heartbeats: liveness by expiry, read without scanning the keyspace."""

from __future__ import annotations

import time

import redis

from smmf_queue import keys, registry


def scans(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def info(worker_id: str) -> registry.WorkerInfo:
    return registry.WorkerInfo(worker_id=worker_id, host="h", pid=1, hardware="cpu", models=[],
                               started_at=0.0, beat_at=0.0)


def test_live_workers_are_read_without_a_scan_and_the_dead_drop_out(redis_client: redis.Redis) -> None:
    # Given two workers that beat, one of which then dies (its heartbeat expires)
    registry.beat(redis_client, info("reg-alive"), ttl_s=30)
    registry.beat(redis_client, info("reg-dead"), ttl_s=0.1)
    time.sleep(0.2)
    before = scans(redis_client)
    # When the live workers are read
    live = {w.worker_id for w in registry.live_workers(redis_client)}
    # Then the live one is there, the dead one is not (and leaves the index), and nothing scanned
    assert "reg-alive" in live and "reg-dead" not in live
    assert not redis_client.sismember(keys.WORKERS, "reg-dead")
    assert scans(redis_client) == before
    registry.forget(redis_client, "reg-alive")
    assert "reg-alive" not in {w.worker_id for w in registry.live_workers(redis_client)}
