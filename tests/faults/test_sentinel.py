"""Fault: the Redis master behind Sentinel is SIGKILLed and a replica takes over.

A master, a replica and three sentinels (the bundled redis-server in sentinel mode). Workers,
SDK clients and Celery all reach Redis through the sentinels (`sentinel://` URLs and
`queue.sentinel_master`); after the failover they find the new master by themselves and serve
again, with no restart of theirs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smmf_queue import BrokerUnavailable, Client, JobTimeout

from ..conftest import CHAT, StartWorker, wait_until, write_config
from .sentinel_group import MASTER, SentinelGroup

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path)
    group.start()
    yield group
    group.stop()


def chat_eventually(client: Client, bound_s: float) -> str:
    """A chat, retried while Redis is failing over (bounded)."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            return client.chat(CHAT, HELLO, max_tokens=4, temperature=0, timeout=10).text
        except (BrokerUnavailable, JobTimeout):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_clients_and_workers_follow_a_sentinel_failover(sentinels: SentinelGroup, tmp_path: Path,
                                                        tiny_models: Path,
                                                        start_worker: StartWorker) -> None:
    # Given a worker and a client that reach Redis through the sentinels
    config = write_config(tmp_path / "sentinel.toml", "redis://unused", tiny_models)
    config.write_text(config.read_text().replace(
        'broker_url = "redis://unused"', f'broker_url = "{sentinels.url}"\nsentinel_master = "{MASTER}"'))
    worker = start_worker(CHAT, config=config)
    with Client(config) as client:
        before = client.chat(CHAT, HELLO, max_tokens=4, temperature=0).text
        # When the master is SIGKILLed, and a job is sent before the sentinels promote the replica
        sentinels.kill(sentinels.master_port)
        with pytest.raises(BrokerUnavailable):
            client.chat(CHAT, HELLO, max_tokens=4, temperature=0, timeout=10)
        # Then the sentinels promote the replica, and the same worker and client serve again
        wait_until(lambda: sentinels.master() == sentinels.replica_port, 60, "the failover")
        assert chat_eventually(client, 60) == before
    worker.stop()
