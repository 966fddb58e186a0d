"""The pieces of a stream and of a job's life on a worker: stop filtering, coalescing, ordering,
claims, leases and the fencing of stale attempts."""

from __future__ import annotations

import queue
import time

import pytest
import redis

from smmf_queue import job_record, keys, lua
from smmf_queue.attempt import Attempt, Claim, ClaimRefused, Deliveries, JobLost, LeaseBusy, PendingClaim
from smmf_queue.errors import JobFailed, JobTimeout
from smmf_queue.jobs import StreamEvent, pack_vectors, unpack_vectors
from smmf_queue.providers.base import StopFilter, drain
from smmf_queue.streaming import EventAssembler, JobReader, decode_log

from .conftest import wait_until


def test_stop_filter_cuts_at_a_stop_split_across_pieces() -> None:
    stops = StopFilter(["END"])
    out = [stops.feed(piece) for piece in ["hello E", "N", "D tail"]]
    assert "".join(out) == "hello " and stops.stopped
    assert stops.feed("more") == ""


def test_stop_filter_releases_held_text_that_was_not_a_stop() -> None:
    stops = StopFilter(["END"])
    assert stops.feed("send E") == "send "  # "E" might begin "END": held back
    assert stops.feed("x") == "Ex"
    assert stops.feed("tail E") == "tail "
    assert stops.flush() == "E" and not stops.stopped


def test_drain_gives_one_batch_per_wake_up_and_stops_at_the_end() -> None:
    ready: queue.Queue[object] = queue.Queue()
    end = object()
    batches = drain(ready, end)
    ready.put("a")
    assert next(batches) == ["a"]  # the first token goes out at once
    for piece in "bcd":  # the consumer was busy while these arrived
        ready.put(piece)
    assert next(batches) == ["b", "c", "d"]
    ready.put("e")
    ready.put(end)
    assert list(batches) == [["e"]]


def event(seq: int, type_: str = "delta", attempt: int = 1, text: str = "") -> StreamEvent:
    return StreamEvent(seq=seq, attempt=attempt, type=type_, text=text)  # type: ignore[arg-type]


def test_assembler_restart_voids_earlier_text_and_ignores_stale_attempts() -> None:
    assembler = EventAssembler("j", "m")
    assembler.apply(event(1, text="old "))
    restart = assembler.apply(event(2, "restart", attempt=2))
    assert restart is not None and restart.restart
    assert assembler.apply(event(3, attempt=1, text="stale")) is None
    assembler.apply(event(4, attempt=2, text="new"))
    assembler.apply(StreamEvent(seq=5, attempt=2, type="end", finish_reason="stop"))
    assert assembler.chat_result().text == "new"
    with pytest.raises(ValueError, match="out of order"):
        assembler.apply(event(9))


def test_a_reader_fills_a_gap_from_the_log_before_the_live_event() -> None:
    reader = JobReader("j", "m", timeout_s=60)
    # Given live event 3 arrives while 1 and 2 were lost by pub/sub
    assert reader.take(event(3, text="c").encode().encode()) == (1, 2)
    # When the log's 1 and 2 are applied, then all three come out in order
    deltas = reader.apply([event(1, text="a"), event(2, text="b")])
    assert [d.text for d in deltas] == ["a", "b", "c"]
    # And a duplicate live copy changes nothing; a quiet spell asks the log from the next seq
    assert reader.take(event(2, text="b").encode().encode()) is None and reader.apply([]) == []
    assert reader.take(None) == (4, None)
    reader.apply([StreamEvent(seq=4, attempt=1, type="error", error_type="Boom", error_message="x")])
    assert reader.done
    with pytest.raises(JobFailed, match="x"):
        reader.ending("llm")


def test_a_reader_replaying_from_a_seq_returns_only_the_deltas_from_there() -> None:
    reader = JobReader("j", "m", timeout_s=60, from_seq=3)
    deltas = reader.apply([event(i, text=str(i)) for i in (1, 2, 3)]
                          + [StreamEvent(seq=4, attempt=1, type="end", finish_reason="stop"),
                             event(5, text="after the end")])
    assert [d.text for d in deltas] == ["3"]
    assert reader.done and reader.assembler.chat_result().text == "123"
    [last] = reader.ending("llm")
    assert last.finish_reason == "stop"


def test_a_reader_gives_up_when_the_job_s_time_is_up() -> None:
    reader = JobReader("j", "m", timeout_s=0.05)
    assert 0 < reader.wait_s() <= 0.05
    time.sleep(0.06)
    with pytest.raises(JobTimeout):
        reader.wait_s()


def test_vectors_survive_the_wire_exactly() -> None:
    vectors = [[0.1, -2.5, 3.25], [1e-8, 0.0, 7.0]]
    packed, dims = pack_vectors(vectors)
    back = unpack_vectors(packed, dims)
    assert dims == 3 and len(back) == 2
    assert back[0][1] == -2.5 and back[1][2] == 7.0 and abs(back[0][0] - 0.1) < 1e-7


def test_safe_queue_names() -> None:
    assert keys.queue_name("llm", "Qwen/Qwen2.5-7B") == "smmf.llm.Qwen_Qwen2.5-7B"
    assert keys.queue_name("embedding", "bge:m3 x") == "smmf.embedding.bge_m3_x"


@pytest.fixture
def deliveries(redis_client: redis.Redis) -> Deliveries:
    return Deliveries(redis_client, "w", lease_s=0.3, max_attempts=2, record_ttl_s=60,
                      event_ttl_s=60, max_events=100)


def attempt_of(deliveries: Deliveries, job_id: str, owner: str, number: int) -> Attempt:
    return Attempt(deliveries, job_id, owner, number, None, last_seq=deliveries.last_seq(job_id))


def test_a_live_lease_blocks_a_second_delivery_and_only_the_owner_finishes(
        deliveries: Deliveries, redis_client: redis.Redis) -> None:
    job = "fence-1"
    assert deliveries.claim(job, "A").outcome == "claimed"
    busy = deliveries.claim(job, "B")
    assert busy.outcome == "busy" and 0 < busy.value <= 300
    time.sleep(0.35)  # A's lease expires (A died)
    second = deliveries.claim(job, "B")
    assert (second.outcome, second.value) == ("claimed", 2)
    # A, back from the dead, cannot end the stream, and says it lost the job; B can, once
    lost: list[str] = []
    deliveries.on_lost = lost.append
    stale = attempt_of(deliveries, job, "A", 1)
    with pytest.raises(JobLost):
        stale.finish(stale.next_event("end"))
    assert lost == [job]
    # nor fail it: its failure is not the job's (no dead letter is kept for it)
    with pytest.raises(JobLost):
        stale.fail(JobFailed("the stale attempt's own error", error_type="Boom"))
    assert lost == [job, job]
    current = attempt_of(deliveries, job, "B", 2)
    current.finish(current.next_event("end"))
    assert lost == [job, job]
    assert deliveries.claim(job, "C").outcome == "finished"
    assert [e.type for e in decode_log(redis_client.xrange(keys.event_log(job)))] == ["end"]


def test_a_stale_attempts_next_event_stops_it_once_a_later_attempt_wrote(
        deliveries: Deliveries, redis_client: redis.Redis) -> None:
    # Given a job whose first attempt stalled past its lease after one event, and a second
    # attempt that took it over and wrote its restart
    job = "stale-write-1"
    lost: list[str] = []
    deliveries.on_lost = lost.append
    assert deliveries.claim(job, "A").outcome == "claimed"
    stale = attempt_of(deliveries, job, "A", 1)
    stale.delta("one")
    time.sleep(0.35)
    assert deliveries.claim(job, "B") == Claim("claimed", 2)
    attempt_of(deliveries, job, "B", 2).restart()
    # When the first attempt writes its next event, then it stops, writing nothing, and says
    # it lost the job
    with pytest.raises(JobLost):
        stale.delta("two")
    assert lost == [job]
    assert [(e.type, e.attempt) for e in decode_log(redis_client.xrange(keys.event_log(job)))] == [
        ("delta", 1), ("restart", 2)]


def test_a_first_claim_writes_the_whole_record_and_its_ttl(deliveries: Deliveries,
                                                           redis_client: redis.Redis) -> None:
    assert deliveries.claim("first-1", "A") == Claim("claimed", 1)
    assert job_record.read(redis_client, "first-1") == {
        "state": "RUNNING", "owner": "A", "attempt": 1, "lease_ms": 300, "ttl_ms": 60_000}
    assert 59_000 < redis_client.pttl(keys.job_record("first-1")) <= 60_000
    # and a renewal and the finish read it, and keep it: only its owner's
    def renew(owner: str) -> int:
        return int(deliveries._renew(keys=[keys.job_record("first-1")], args=[owner, 60]))

    assert (renew("B"), renew("A")) == (0, 1)
    attempt_of(deliveries, "first-1", "A", 1).finish(StreamEvent(seq=1, attempt=1, type="end"))
    assert job_record.read(redis_client, "first-1")["state"] == "DONE"
    assert redis_client.pttl(keys.job_record("first-1")) > 59_000


def test_a_cancel_before_the_first_claim_stops_it(deliveries: Deliveries, redis_client: redis.Redis) -> None:
    # Given a job its caller cancelled before any worker took it
    redis_client.eval(lua.CANCEL, 1, keys.job_record("cancel-1"), 30)
    # When a first delivery claims it, then it runs nothing, by the first claim or sent ahead
    assert deliveries.claim("cancel-1", "A") == Claim("cancelled", 0)
    assert PendingClaim(deliveries, "cancel-1", "B").result() == Claim("cancelled", 0)
    # and a cancel of a running job keeps its record's fields and its longer TTL
    deliveries.claim("cancel-2", "A")
    redis_client.eval(lua.CANCEL, 1, keys.job_record("cancel-2"), 30)
    assert job_record.read(redis_client, "cancel-2")["owner"] == "A"
    assert job_record.read(redis_client, "cancel-2")["cancelled"] == 1
    assert redis_client.pttl(keys.job_record("cancel-2")) > 59_000


@pytest.mark.parametrize("timed_by", ["ttl", "lease_until"])
def test_a_hash_record_of_an_earlier_version_is_timed_as_it_timed_it_then_rewritten(
        deliveries: Deliveries, redis_client: redis.Redis, timed_by: str) -> None:
    # Given a job claimed by a worker of an earlier version (a rolling upgrade): a hash, whose
    # lease is timed by its TTL (session 19) or ends at `lease_until` on Redis' clock (before)
    job = f"old-{timed_by}"
    seconds, micros = redis_client.time()
    lease = ({"lease_ms": 300, "ttl_ms": 60_000} if timed_by == "ttl"
             else {"lease_until": seconds * 1000 + micros // 1000 + 300})
    redis_client.hset(keys.job_record(job), mapping={"state": "RUNNING", "owner": "old", "attempt": 1,
                                                     **lease})
    redis_client.expire(keys.job_record(job), 60)
    # When a delivery of this version claims it, then it waits for that lease, then takes it
    busy = deliveries.claim(job, "new")
    assert busy.outcome == "busy" and 0 < busy.value <= 300
    time.sleep(0.35)
    assert deliveries.claim(job, "new") == Claim("claimed", 2)
    # and the record is this version's from then on
    assert job_record.read(redis_client, job) == {
        "state": "RUNNING", "owner": "new", "attempt": 2, "lease_ms": 300, "ttl_ms": 60_000}


def test_a_last_delta_kept_for_the_finish_is_written_and_published_before_the_end(
        deliveries: Deliveries, redis_client: redis.Redis) -> None:
    reply = keys.reply_channel("last-delta")
    listener = redis_client.pubsub()
    listener.subscribe(reply)
    assert listener.get_message(timeout=1)["type"] == "subscribe"
    # Given a reply whose last text came with its end
    assert deliveries.claim("last-1", "A").outcome == "claimed"
    attempt = Attempt(deliveries, "last-1", "A", 1, reply)
    attempt.delta("Hello")
    assert attempt.delta(", world", last=True) is False
    assert [e.type for e in decode_log(redis_client.xrange(keys.event_log("last-1")))] == ["delta"]
    # When the attempt finishes, then the log and the reply channel have it before the end
    attempt.finish(attempt.next_event("end"))
    logged = decode_log(redis_client.xrange(keys.event_log("last-1")))
    assert [(e.seq, e.type, e.text) for e in logged] == [(1, "delta", "Hello"), (2, "delta", ", world"),
                                                        (3, "end", "")]
    published = [listener.get_message(timeout=1) for _ in range(3)]
    assert [StreamEvent.model_validate_json(m["data"].split(b" ", 1)[1]).seq for m in published] == [1, 2, 3]
    listener.close()
    # and a stale attempt's kept delta is refused with its finish: nothing written
    assert deliveries.claim("last-2", "B").outcome == "claimed"
    stale = Attempt(deliveries, "last-2", "B", 1, None)
    time.sleep(0.35)
    assert deliveries.claim("last-2", "C") == Claim("claimed", 2)
    stale.delta("stale", last=True)
    with pytest.raises(JobLost):
        stale.finish(stale.next_event("end"))
    assert redis_client.xlen(keys.event_log("last-2")) == 0


def test_a_job_that_keeps_killing_workers_is_exhausted(deliveries: Deliveries) -> None:
    job = "fence-2"
    for owner in ("A", "B"):
        assert deliveries.claim(job, owner).outcome == "claimed"
        time.sleep(0.35)
    assert deliveries.claim(job, "C").outcome == "exhausted"


def test_a_delivery_runs_its_work_once_and_a_second_one_finds_it_busy_then_finished(
        deliveries: Deliveries) -> None:
    # Given a job whose first delivery is running
    seen: list[int] = []

    def work(attempt: Attempt) -> str:
        seen.append(attempt.number)
        # When a second delivery of it arrives meanwhile, then it runs nothing and waits
        with pytest.raises(LeaseBusy) as busy:
            deliveries.run("run-1", None, lambda _: "twice")
        assert 0 < busy.value.retry_in_s <= 1.3
        attempt.finish(attempt.next_event("end"))
        return "done"

    assert deliveries.run("run-1", None, work, ahead=True) == "done"
    # And a delivery after the finish runs nothing at all
    assert deliveries.run("run-1", None, lambda _: "again") is None
    assert seen == [1]


def test_a_second_delivery_of_a_running_job_leaves_the_first_ones_lease_renewed(
        deliveries: Deliveries, redis_client: redis.Redis) -> None:
    def record_ttl_left_ms() -> int:  # the record's TTL is its lease's clock (lua.py)
        return int(redis_client.pttl(keys.job_record("renew-1")))

    def work(attempt: Attempt) -> None:
        # When a second delivery of the running job arrives at the same worker and backs off
        with pytest.raises(LeaseBusy):
            deliveries.run("renew-1", None, lambda _: "twice")
        # Then the first is still counted here, and the heartbeat's renewal extends its lease
        time.sleep(0.2)
        before = record_ttl_left_ms()
        deliveries.renew_leases()
        assert deliveries.in_flight == 1 and record_ttl_left_ms() > before
        # past the 0.3 s lease from the claim, not from the renewal: a third delivery still waits
        time.sleep(0.2)
        with pytest.raises(LeaseBusy):
            deliveries.run("renew-1", None, lambda _: "thrice")
        attempt.finish(attempt.next_event("end"))

    deliveries.run("renew-1", None, work, ahead=True)


def test_a_job_that_runs_longer_than_its_record_s_ttl_still_finishes(redis_client: redis.Redis) -> None:
    # Given a worker whose job records live one second
    deliveries = Deliveries(redis_client, "w", lease_s=0.3, max_attempts=2, record_ttl_s=1,
                            event_ttl_s=60, max_events=100)

    def work(attempt: Attempt) -> str:
        # When its job runs for twice that, the heartbeat renewing its lease as it runs
        for _ in range(8):
            time.sleep(0.25)
            deliveries.renew_leases()
        attempt.finish(attempt.next_event("end"))  # JobLost had the record expired
        return "finished"

    # Then its record is still there for the fenced finish, which ends the stream
    assert deliveries.run("long-1", None, work) == "finished"
    assert [e.type for e in decode_log(redis_client.xrange(keys.event_log("long-1")))] == ["end"]


def test_a_claim_sent_ahead_is_in_redis_before_its_answer_is_read(deliveries: Deliveries,
                                                                  redis_client: redis.Redis) -> None:
    # Given a Redis whose script cache is empty (a fresh or restarted server): a first claim
    # is a plain SET
    redis_client.script_flush()
    # When a claim is sent ahead, then the job is held (leased) before its answer is read
    pending = PendingClaim(deliveries, "ahead-loaded", "A")
    wait_until(lambda: job_record.read(redis_client, "ahead-loaded").get("owner") == "A", 5, "the claim")
    pending.confirm()
    attempt = Attempt(deliveries, "ahead-loaded", "A", 1, None)
    attempt.finish(attempt.next_event("end"))  # no RUNNING job left for other tests


def test_a_delivery_started_ahead_of_a_refused_claim_publishes_nothing_and_restarts(
        deliveries: Deliveries, redis_client: redis.Redis) -> None:
    # Given a job claimed by a worker that died (its lease expired)
    assert deliveries.claim("ahead-0", "dead").outcome == "claimed"
    time.sleep(0.35)
    numbers: list[int] = []

    def work(attempt: Attempt) -> None:
        numbers.append(attempt.number)
        attempt.delta("text")  # the first write reads the claim sent ahead
        attempt.finish(attempt.next_event("end"))

    # When a delivery that took itself for the first starts the job ahead of its claim
    deliveries.run("ahead-0", None, work, ahead=True)
    # Then the optimistic start wrote nothing, and the job ran again as attempt 2, restarting
    assert numbers == [1, 2]
    events = decode_log(redis_client.xrange(keys.event_log("ahead-0")))
    assert [(e.type, e.attempt) for e in events] == [("restart", 2), ("delta", 2), ("end", 2)]


def test_an_exhausted_job_ends_in_a_worker_lost_error(deliveries: Deliveries,
                                                    redis_client: redis.Redis) -> None:
    for owner in ("A", "B"):
        deliveries.claim("lost-1", owner)
        time.sleep(0.35)
    with pytest.raises(JobFailed) as failed:
        deliveries.run("lost-1", None, lambda _: pytest.fail("ran an exhausted job"))
    assert failed.value.error_type == "WorkerLost"
    [end] = decode_log(redis_client.xrange(keys.event_log("lost-1")))
    assert (end.type, end.error_type) == ("error", "WorkerLost")


def test_a_claim_sent_ahead_answers_as_a_claim_does(deliveries: Deliveries) -> None:
    first = PendingClaim(deliveries, "ahead-1", "A")
    assert first.result() == Claim("claimed", 1)
    first.confirm()  # the first attempt: the worker may publish
    second = PendingClaim(deliveries, "ahead-1", "B")
    assert second.result().outcome == "busy"
    with pytest.raises(ClaimRefused) as refused:
        second.confirm()
    assert refused.value.claim.outcome == "busy"


def test_a_claim_sent_ahead_survives_a_script_flush_and_gives_its_connection_back(
        redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url, client_name="ahead")
    deliveries = Deliveries(client, "w", lease_s=30, max_attempts=2, record_ttl_s=60,
                            event_ttl_s=60, max_events=100)
    for i in range(20):
        if i % 5 == 0:
            client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
        assert PendingClaim(deliveries, f"ahead-2-{i}", "A").result() == Claim("claimed", 1)
        assert PendingClaim(deliveries, f"ahead-2-{i}", "B").result().outcome == "busy"  # lua.CLAIM
        PendingClaim(deliveries, f"ahead-3-{i}", "A").release()  # the job stopped before reading it
    assert [c["name"] for c in client.client_list()].count("ahead") == 1


def test_an_attempt_passes_its_gate_before_its_first_write_only(deliveries: Deliveries,
                                                               redis_client: redis.Redis) -> None:
    asked = []
    attempt = Attempt(deliveries, "gate-1", "w", 1, None, gate=lambda: asked.append(True))
    attempt.delta("a")
    attempt.delta("b")
    assert asked == [True]

    def refuse() -> None:
        raise ClaimRefused(Claim("cancelled", 0))

    refused = Attempt(deliveries, "gate-2", "w", 1, None, gate=refuse)
    with pytest.raises(ClaimRefused):
        refused.delta("a")
    assert redis_client.xlen(keys.event_log("gate-2")) == 0


def test_hub_routes_each_of_many_short_jobs_to_its_own_inbox(redis_server) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import redis.asyncio

    from smmf_queue.stream_hub import StreamHub

    async def cycle() -> int:
        client = redis.asyncio.from_url(redis_server.url)
        hub = StreamHub(client)
        await asyncio.wait_for(hub.start(), 5)
        delivered = 0
        for i in range(300):
            inbox = hub.open(f"cycle-{i}")
            await client.publish(hub.reply_channel, f"cycle-{i} ping-{i}".encode())
            delivered += (await asyncio.wait_for(inbox.get(), 5)) == f"ping-{i}".encode()
            hub.close(f"cycle-{i}")
        await hub.aclose()
        await client.aclose()
        return delivered

    assert asyncio.run(cycle()) == 300


def test_a_worker_publishes_only_to_reply_channels() -> None:
    from smmf_queue.worker import _reply_channel

    assert _reply_channel({"reply_to": keys.reply_channel("abc")}) == "smmf:reply:abc"
    for other in ("smmf:stream:someone-else", "/0.celeryev/task.multi", 42, None):
        assert _reply_channel({"reply_to": other}) is None


def test_each_event_is_published_once_on_the_reply_channel_prefixed_with_the_job_id(
        redis_client: redis.Redis) -> None:
    reply = keys.reply_channel("test-reply")
    pubsub = redis_client.pubsub()
    pubsub.psubscribe("smmf:*")  # every channel of ours
    assert pubsub.get_message(timeout=5)["type"] == "psubscribe"  # type: ignore[index]
    deliveries = Deliveries(redis_client, "w", lease_s=30, max_attempts=2, record_ttl_s=60,
                            event_ttl_s=60, max_events=100)
    attempt = Attempt(deliveries, "job-r", "w", 1, reply)
    attempt.delta("hi")
    attempt.delta("there")
    got = [pubsub.get_message(timeout=5) for _ in range(2)]
    assert pubsub.get_message(timeout=0.5) is None  # nothing else was published
    pubsub.close()
    assert [message["channel"] for message in got] == [reply.encode()] * 2  # type: ignore[index]
    events = [message["data"].removeprefix(b"job-r ") for message in got]  # type: ignore[index]
    assert [StreamEvent.model_validate_json(event).text for event in events] == ["hi", "there"]


def test_job_ids_of_batch_chunks_splits_and_retries_are_valid_on_the_wire() -> None:
    from smmf_queue.jobs import EmbeddingRequest, new_job_id

    run = new_job_id()
    for job_id in (f"{run}-12", f"{run}-12.0.1", f"{run}-12~2", f"{run}-12.1~1"):  # see batch/chunks.py
        assert EmbeddingRequest(model="m", texts=["x"], job_id=job_id).job_id == job_id
    with pytest.raises(ValueError):
        EmbeddingRequest(model="m", texts=["x"], job_id="has a space")


def test_a_replay_begun_before_the_first_event_tails_the_log_to_the_end(
        config_path, redis_client: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    import threading

    from smmf_queue import Client

    # Given a reader of someone else's job that has no event log yet
    job_id = "tail-before-start"
    texts: list[str] = []
    with Client(config_path) as reader:
        thread = threading.Thread(target=lambda: texts.append(
            "".join(delta.text for delta in reader.replay(job_id, "tiny-noise-chat"))))
        thread.start()
        time.sleep(0.3)  # the reader is waiting on a log that does not exist
        # When a worker writes the job's events, with no reply channel at all
        deliveries = Deliveries(redis_client, "w", lease_s=30, max_attempts=2, record_ttl_s=60,
                                event_ttl_s=60, max_events=100)
        claim = deliveries.claim(job_id, "w")
        attempt = Attempt(deliveries, job_id, "w", claim.value, None)
        for piece in ("tail", "ed ", "log"):
            attempt.delta(piece)
        attempt.finish(attempt.next_event("end", finish_reason="stop"))
        thread.join(10)
    # Then the reader got them all from the log
    assert texts == ["tailed log"]
