"""Fault: the Redis master behind Sentinel is SIGKILLed and a replica takes over.

A master, a replica and three sentinels (the bundled redis-server in sentinel mode). Workers,
SDK clients and Celery all reach Redis through the sentinels (`sentinel://` URLs and
`queue.sentinel_master`); after the failover they find the new master by themselves and serve
again, with no restart of theirs.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from smmf_queue import BrokerUnavailable, Client, JobTimeout, redis_clients
from smmf_queue.config import SmmfConfig, load_config
from smmf_queue.stream_hub import StreamHub, ThreadHub

from ..conftest import CHAT, StartWorker, event_capture, task_events, wait_until, write_config
from ..fake_upstream import FakeUpstream, chat_chunk
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


def test_the_stream_hub_follows_a_failover_away_from_a_silent_master(
        sentinels: SentinelGroup, tmp_path: Path, tiny_models: Path) -> None:
    # Given a gateway's stream hub subscribed to its reply channel through the sentinels, with
    # Redis commands that give up after 3 s
    queue = _silent_config(sentinels, tmp_path, tiny_models).queue

    async def follow() -> int:
        client = redis_clients.connect_async(queue)
        hub = StreamHub(client, silent_after_s=queue.socket_timeout_s)
        await hub.start()
        try:
            assert _subscribers(sentinels.master_port, hub.reply_channel) == 1
            # When the master goes silent with its connections open (SIGSTOP: a frozen host)
            # and the sentinels promote the replica (the hub's loop runs meanwhile)
            # Then the hub has subscribed again, on the new master (it used to wait on the
            # silent one for ever, and events came only from the logs, every 2 s)
            return await asyncio.to_thread(_silent_failover, sentinels, hub.reply_channel,
                                           lambda: time.sleep(0.2))
        finally:
            await hub.aclose()
            await client.aclose()

    assert asyncio.run(follow()) == 1


def test_the_blocking_clients_hub_follows_a_failover_away_from_a_silent_master(
        sentinels: SentinelGroup, tmp_path: Path, tiny_models: Path) -> None:
    # Given a blocking client's hub (ThreadHub) subscribed through the sentinels, with a job
    # whose events it waits for
    queue = _silent_config(sentinels, tmp_path, tiny_models).queue
    hub = ThreadHub(redis_clients.connect(queue), silent_after_s=queue.socket_timeout_s)
    hub.start()
    hub.open("waiting")
    assert _subscribers(sentinels.master_port, hub.reply_channel) == 1
    # When the master goes silent (SIGSTOP) and the sentinels promote the replica, while a
    # reader waits (the hub reads then)
    # Then the hub has subscribed again, on the new master
    assert _silent_failover(sentinels, hub.reply_channel, lambda: hub.get("waiting", 0.5)) == 1
    hub.shutdown()


def test_a_worker_follows_a_failover_away_from_a_silent_master(
        sentinels: SentinelGroup, tmp_path: Path, tiny_models: Path, start_worker: StartWorker) -> None:
    # Given a worker and a client behind the sentinels, with Redis commands that give up after 3 s
    config = _silent_config_file(sentinels, tmp_path, tiny_models)
    start_worker(CHAT, config=config)
    with Client(config) as client:
        before = client.chat(CHAT, HELLO, max_tokens=4, temperature=0).text
        # When the master goes silent with the worker's BRPOP open on it (SIGSTOP: a frozen
        # host), and the sentinels promote the replica
        sentinels.processes[sentinels.master_port].send_signal(signal.SIGSTOP)
        wait_until(lambda: sentinels.master() == sentinels.replica_port, 60, "the failover")
        # Then the worker takes jobs from the new master within a few socket timeouts: it drops
        # its silent BRPOP connection (kombu's own check came after 51 s), and the job that
        # ended as the master froze (in about one run in four its result and its ack met the
        # silence) ends and leaves the worker's one slot (it used to hold it for good)
        assert chat_eventually(client, 30) == before


def _silent_failover(sentinels: SentinelGroup, channel: str, wait: Callable[[], object]) -> int:
    """SIGSTOP the master (a frozen host), then `wait` again and again until the sentinels have
    promoted the replica and `channel` has a subscriber there (60 s at most); how many."""
    sentinels.processes[sentinels.master_port].send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
            sentinels.master() != sentinels.replica_port
            or _subscribers(sentinels.replica_port, channel) == 0):
        wait()
    return _subscribers(sentinels.replica_port, channel)


def _silent_config(sentinels: SentinelGroup, tmp_path: Path, tiny_models: Path) -> SmmfConfig:
    """The tests' config behind the sentinels, with Redis commands that give up after 3 s."""
    return load_config(_silent_config_file(sentinels, tmp_path, tiny_models))


def _silent_config_file(sentinels: SentinelGroup, tmp_path: Path, tiny_models: Path) -> Path:
    """The file of `_silent_config`."""
    config = write_config(tmp_path / "silent.toml", sentinels.url, tiny_models)
    config.write_text(config.read_text().replace(
        f'broker_url = "{sentinels.url}"',
        f'broker_url = "{sentinels.url}"\nsentinel_master = "{MASTER}"\nsocket_timeout_s = 3'))
    return config


def _subscribers(port: int, channel: str) -> int:
    """How many subscribers the Redis on `port` has for `channel` (PUBSUB NUMSUB)."""
    [(_, count)] = redis.Redis(port=port, socket_timeout=2).pubsub_numsub(channel)
    return int(count)


LONG_MODEL = "held-chat"


def test_behind_sentinel_a_job_longer_than_its_lease_is_delivered_once(
        sentinels: SentinelGroup, tmp_path: Path, tiny_models: Path, start_worker: StartWorker,
        upstream: FakeUpstream) -> None:
    # Given a worker behind the sentinels whose held messages' leases last a second, and a chat
    # whose upstream (the FAKE: it holds a reply open on cue) answers until the test says so
    config = write_config(tmp_path / "long.toml", sentinels.url, tiny_models, extra=f"""
[[models.llms]]
name = "{LONG_MODEL}"
provider = "proxy/openai"
api_base = "{upstream.url}/v1"
api_key = "unused"
max_retries = 0
""")
    config.write_text(config.read_text().replace("lease_s = 3", "lease_s = 1").replace(
        f'broker_url = "{sentinels.url}"', f'broker_url = "{sentinels.url}"\nsentinel_master = "{MASTER}"'))
    release = threading.Event()
    upstream.reset()
    upstream.sse([chat_chunk("held "), chat_chunk("long", finish="stop")], hold=release, done=False)
    start_worker(LONG_MODEL, config=config)
    master = redis.Redis(port=sentinels.master_port)  # kept: a dropped client closes its pool
    events = event_capture(master)
    with Client(config) as client:
        job_id = f"held-{uuid.uuid4().hex}"
        stream = client.stream_chat(LONG_MODEL, HELLO, timeout=60, job_id=job_id)
        first = next(stream)
        # When the job runs for four leases (kombu restores every half second meanwhile)
        time.sleep(4)
        release.set()
        deltas = [first, *stream]
    # Then its message stayed with its worker, renewed by the heartbeat: delivered once, never
    # handed back to run into the live lease (and retried until the job ended)
    seen = _task_events_of(events, job_id, until="task-succeeded")
    assert seen.count("task-received") == 1 and "task-retried" not in seen, seen
    assert "".join(d.text for d in deltas) == "held long"


def _task_events_of(pubsub: redis.client.PubSub, job_id: str, until: str) -> list[str]:
    """The types of the task events of `job_id` published so far, read until `until` comes."""
    seen: list[str] = []
    deadline = time.monotonic() + 15
    while until not in seen and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        events = task_events(message["data"]) if message else []
        seen += [event["type"] for event in events if event.get("uuid") == job_id]
    pubsub.close()
    return seen
