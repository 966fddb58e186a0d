"""Our subclasses of Celery's and kombu's parts (smmf_queue/celery_ext.py) change cost, not
behaviour: kombu keeps one redis client per channel, every task event still arrives, the
unacknowledged-message bookkeeping holds a taken message until its ack (or the job's finish,
which clears it for the ack, each message by its own tag, or its channel's close), a waiter on the
result backend gets a result stored after it began waiting (published or not), and the result a
job's fenced finish writes is Celery's own, which a stale attempt cannot overwrite."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest
import redis
from kombu import Connection

from smmf_queue import Client, celery_ext, keys
from smmf_queue.config import SmmfConfig
from smmf_queue.queues import make_celery_app

from .conftest import EMBED, SPARE, StartWorker, WorkerProcess, event_capture, task_events, wait_until


def test_a_channel_keeps_one_redis_client_until_its_pool_is_replaced(redis_server) -> None:  # type: ignore[no-untyped-def]
    with Connection(redis_server.url, transport="smmf_queue.celery_ext:Transport") as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        with channel.conn_or_acquire() as client:
            assert client is first and client.ping()
        channel._disconnect_pools()  # what kombu does after a fork or a lost connection
        assert channel._create_client() is not first


@pytest.mark.parametrize(("url", "transport", "lease"), [
    ("redis://127.0.0.1:6379/0", "smmf_queue.celery_ext:Transport", "worker.lease_s"),
    ("sentinel://127.0.0.1:26379/0", "smmf_queue.celery_ext:SentinelTransport", "worker.lease_s"),
    ("rediss://127.0.0.1:6380/0", None, "queue.visibility_timeout_s"),
])
def test_a_held_message_s_lease_is_ours_wherever_our_transport_renews_it(
        config: SmmfConfig, url: str, transport: str | None, lease: str) -> None:
    queue = config.queue.model_copy(update={"broker_url": url, "sentinel_master": "m",
                                            "visibility_timeout_s": 1234})
    app = make_celery_app(config.model_copy(update={"queue": queue}), store_results=False)
    # Our QoS renews held messages with each heartbeat: there the lease is worker.lease_s;
    # kombu's own transport (a TLS Redis) renews nothing: there it stays long
    assert app.conf.broker_transport == transport
    expected = config.worker.lease_s if lease == "worker.lease_s" else 1234
    assert app.conf.broker_transport_options["visibility_timeout"] == expected


def test_a_taken_message_is_held_as_unacknowledged_until_its_ack(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url)
    taken: list[Any] = []
    with Connection(redis_server.url, transport="smmf_queue.celery_ext:Transport") as conn:
        queue = conn.SimpleQueue("test-unacked-bookkeeping")
        queue.put({"n": 1})
        consumer = conn.Consumer(queue.queue, callbacks=[lambda body, message: taken.append(message)],
                                 accept=["json"])
        with consumer:
            conn.drain_events(timeout=5)
            [message] = taken
            tag = message.delivery_tag
            # Taken: kombu holds the message and indexes it, so a dead worker's copy comes back
            assert client.hexists("unacked", tag) and client.zscore("unacked_index", tag) is not None
            message.ack()
            assert not client.hexists("unacked", tag) and client.zscore("unacked_index", tag) is None
        queue.close()


def test_a_closed_channel_s_messages_are_no_longer_held(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url)
    taken: list[Any] = []
    with Connection(redis_server.url, transport="smmf_queue.celery_ext:Transport") as conn:
        queue = conn.SimpleQueue("test-held-until-close")
        queue.put({"n": 1}, headers={"id": "held-then-closed"})
        consumer = conn.Consumer(queue.queue, callbacks=[lambda body, message: taken.append(message)],
                                 accept=["json"])
        with consumer:
            conn.drain_events(timeout=5)
            assert celery_ext.held_message("held-then-closed") is not None
    # When its channel closes unacknowledged (a lost connection, a stop), kombu restores the
    # message to its queue, and this process no longer counts it as held
    assert celery_ext.held_message("held-then-closed") is None
    assert client.llen("test-held-until-close") == 1


def test_a_finish_settles_only_the_message_it_cleared(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url)
    taken: list[Any] = []
    with Connection(redis_server.url, transport="smmf_queue.celery_ext:Transport") as conn:
        # Given two messages of one job id held at once (a caller that sent the job twice)
        queue = conn.SimpleQueue("test-settled-by-tag")
        for n in (1, 2):
            queue.put({"n": n}, headers={"id": "twice-sent"})
        consumer = conn.Consumer(queue.queue, callbacks=[lambda body, message: taken.append(message)],
                                 accept=["json"])
        with consumer:
            while len(taken) < 2:
                conn.drain_events(timeout=5)
            first, second = taken
            # When a finish clears the bookkeeping of the one it finds held (the later)
            unacked, index, tag = celery_ext.held_message("twice-sent") or ("", "", "")
            assert tag == second.delivery_tag
            client.hdel(unacked, tag)
            client.zrem(index, tag)
            celery_ext.settled_by_finish(tag)
            # Then each ack settles its own message: nothing is left behind for kombu's restore
            first.ack()
            second.ack()
            for message in (first, second):
                assert not client.hexists("unacked", message.delivery_tag)
                assert client.zscore("unacked_index", message.delivery_tag) is None
            assert celery_ext.held_message("twice-sent") is None
        queue.close()


@pytest.mark.parametrize("settle", ["ack", "reject"])
def test_a_message_whose_ack_redis_did_not_hear_leaves_the_worker_s_slot(redis_server, settle: str) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url)
    taken: list[Any] = []
    options = {"socket_timeout": 0.3}
    with Connection(redis_server.url, transport="smmf_queue.celery_ext:Transport",
                    transport_options=options) as conn:
        # Given a message held by a channel that takes one at a time (a worker's one slot)
        queue = conn.SimpleQueue(f"test-unheard-{settle}")
        queue.put({"n": 1}, headers={"id": f"unheard-{settle}"})
        consumer = conn.Consumer(queue.queue, callbacks=[lambda body, message: taken.append(message)],
                                 accept=["json"], prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=5)
            [message] = taken
            qos = message.channel.qos
            assert not qos.can_consume()
            # When Redis does not answer its ack or reject (its writes paused: a silent Redis)
            client.client_pause(10_000, all=False)
            try:
                with pytest.raises(redis.RedisError):
                    message.ack() if settle == "ack" else message.reject()
            finally:
                client.client_unpause()
            # Then the channel holds it no longer: the slot takes the next message, and the
            # heartbeat no longer renews this one's lease, so kombu's restore hands it back (it
            # used to fill the slot for good, its lease renewed)
            assert qos.can_consume() and qos._held_tags() == []
            assert celery_ext.held_message(f"unheard-{settle}") is None
            # (The paused writes run after the pause; a silent Redis may run them too, or not.)
            client.hdel("unacked", message.delivery_tag)
            client.zrem("unacked_index", message.delivery_tag)
        queue.close()


def test_a_task_whose_trace_fails_outside_its_body_still_ends() -> None:
    # Given the worker's thread pool, and a task whose trace raises (as Celery's does when
    # storing the task's state fails twice: its result backend silent or full)
    pool = celery_ext.ThreadPool(limit=1)
    pool.start()
    ended: list[Any] = []

    def trace() -> None:
        raise redis.TimeoutError("Timeout reading from socket")

    pool.apply_async(trace, callback=ended.append).wait(5)
    pool.stop()
    # Then the task ends, as a failure, with the trace's error (Celery's thread pool dropped the
    # error with the thread's future: the task never ended, and its message stayed held)
    [(failed, info, _)] = ended
    assert failed == 1 and isinstance(info.exception.exc, redis.TimeoutError)


def test_a_job_s_finish_clears_its_message_s_bookkeeping_in_its_own_script_call(
        client: Client, embed_worker: WorkerProcess, redis_client: redis.Redis) -> None:
    # Given a worker whose broker is the Redis of its job records, watched command by command
    commands: list[dict[str, Any]] = []
    monitor = redis_client.monitor()
    monitor.connection.send_command("MONITOR")  # what `with monitor` does, without blocking
    assert monitor.connection.read_response() in (b"OK", "OK")

    def watch() -> None:
        with contextlib.suppress(redis.ConnectionError):
            while True:
                commands.append(monitor.next_command())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # When it runs a job
    job = client.embed(EMBED, ["text"]).job_id
    tag = next(c["command"].split()[2] for c in list(commands) if c["command"].startswith("HSET unacked "))
    wait_until(lambda: not redis_client.hexists("unacked", tag) and redis_client.zscore(
        "unacked_index", tag) is None, 10, "the message's bookkeeping cleared")
    time.sleep(0.2)  # the ack, after the task's end
    monitor.connection.disconnect()
    watcher.join(5)
    # Then the job's fenced finish cleared it, and the ack sent nothing more for it
    cleared = [c for c in commands if c["command"].startswith(("HDEL unacked ", "ZREM unacked_index "))
               and tag in c["command"]]
    assert [(c["command"].split()[0], c["client_type"]) for c in cleared] == [("HDEL", "lua"), ("ZREM", "lua")]
    assert any(c["command"].startswith("EVALSHA") and job in c["command"] for c in commands)


def test_a_result_stored_after_its_waiter_began_reaches_it(config) -> None:  # type: ignore[no-untyped-def]
    import threading

    from smmf_queue.celery_ext import ResultBackend

    app = make_celery_app(config)
    assert isinstance(app.backend, ResultBackend)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(app.AsyncResult("late-result").get(timeout=10)))
    waiter.start()
    time.sleep(0.5)  # the waiter has subscribed and found nothing
    app.backend.store_result("late-result", {"text": "stored late"}, "SUCCESS")
    waiter.join(15)
    app.close()
    assert got == [{"text": "stored late"}]


def test_the_finish_writes_celerys_result_and_a_stale_attempt_cannot_overwrite_it(config) -> None:  # type: ignore[no-untyped-def]
    import threading

    from smmf_queue.attempt import Attempt, Deliveries, JobLost
    from smmf_queue.errors import JobFailed

    app = make_celery_app(config)
    deliveries = Deliveries(redis.Redis.from_url(config.queue.redis), "w", lease_s=0.05, max_attempts=3,
                            record_ttl_s=60, event_ttl_s=60, max_events=100)
    deliveries.results = app.backend
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(app.AsyncResult("fenced-result").get(timeout=10)))
    waiter.start()
    # Given a job whose first attempt lost its lease to a second
    assert deliveries.claim("fenced-result", "old").value == 1
    time.sleep(0.1)
    assert deliveries.claim("fenced-result", "new").value == 2
    old = Attempt(deliveries, "fenced-result", "old", 1, None)
    new = Attempt(deliveries, "fenced-result", "new", 2, None)
    # When both finish, the stale one last
    new.finish(new.next_event("end"), {"text": "from the owner"})
    with pytest.raises(JobLost):
        old.finish(old.next_event("end"), {"text": "stale"})
    # Then Celery's waiter, begun before, and a later reader get the owner's result
    waiter.join(15)
    assert got == [{"text": "from the owner"}]
    assert app.AsyncResult("fenced-result").get(timeout=5) == {"text": "from the owner"}
    # and a failed job's result is Celery's FAILURE, with its exception's type
    assert deliveries.claim("fenced-failure", "w/1").value == 1
    failed = Attempt(deliveries, "fenced-failure", "w/1", 1, None)
    with pytest.raises(JobFailed):
        failed.fail(JobFailed("the model is on fire", error_type="Fire"))
    stored = app.AsyncResult("fenced-failure")
    assert stored.state == "FAILURE" and type(stored.result).__name__ == "JobFailed"
    assert "the model is on fire" in str(stored.result)
    app.close()


def test_a_waiter_gets_the_result_that_the_finish_did_not_publish(config) -> None:  # type: ignore[no-untyped-def]
    import threading

    from smmf_queue.attempt import Attempt, Deliveries

    app = make_celery_app(config)
    deliveries = Deliveries(redis.Redis.from_url(config.queue.redis), "w", lease_s=30, max_attempts=2,
                            record_ttl_s=60, event_ttl_s=60, max_events=100)
    deliveries.results = app.backend
    listener = redis.Redis.from_url(config.queue.redis).pubsub()
    listener.subscribe(app.backend.get_key_for_task("unpublished"))
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(app.AsyncResult("unpublished").get(timeout=10)))
    waiter.start()
    # Given a job whose producer reads its events on a reply channel, and a Celery waiter
    assert deliveries.claim("unpublished", "w/1").value == 1
    time.sleep(0.5)  # the waiter has subscribed and found nothing
    # When it finishes
    attempt = Attempt(deliveries, "unpublished", "w/1", 1, keys.reply_channel("someone"))
    attempt.finish(attempt.next_event("end"), {"text": "not published"})
    # Then its result was not published (its producer has its end event), yet the waiter has it
    waiter.join(15)
    assert got == [{"text": "not published"}]
    messages = [listener.get_message(timeout=0.1) for _ in range(3)]
    assert [m["type"] for m in messages if m] == ["subscribe"]
    listener.close()
    app.close()


WANTED = {"task-received", "task-started", "task-succeeded"}


def collect(pubsub: redis.client.PubSub, ids: list[str]) -> tuple[dict[str, set[str]], int]:
    """The task event types seen per job id (until all of WANTED or 15 s), and the messages."""
    seen: dict[str, set[str]] = {}
    messages = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(WANTED <= seen.get(i, set()) for i in ids):
        message = pubsub.get_message(timeout=1)
        events = task_events(message["data"]) if message else []
        messages += bool(events)
        for event in events:
            seen.setdefault(event["uuid"], set()).add(event["type"])
    pubsub.close()
    return seen, messages


def test_every_task_event_arrives_in_fewer_messages_than_jobs(
        client: Client, embed_worker: WorkerProcess, redis_client: redis.Redis) -> None:
    pubsub = event_capture(redis_client)
    ids = [client.embed(EMBED, [f"text {i}"]).job_id for i in range(10)]
    seen, messages = collect(pubsub, ids)
    assert all(WANTED <= seen.get(i, set()) for i in ids), seen
    assert messages <= len(ids)  # Celery alone sends two or more per job


def test_a_worker_stopping_right_after_a_job_still_publishes_its_events(
        client: Client, start_worker: StartWorker, redis_client: redis.Redis) -> None:
    spare = start_worker(SPARE)
    pubsub = event_capture(redis_client)
    job = client.chat(SPARE, [{"role": "user", "content": "hi"}], max_tokens=2).job_id
    spare.stop()  # warm shutdown, within the 0.1 s the events may wait in the worker
    seen, _ = collect(pubsub, [job])
    assert WANTED <= seen.get(job, set()), seen
