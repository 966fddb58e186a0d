"""The pieces of a stream: stop filtering, coalescing, ordering, fencing of stale attempts."""

from __future__ import annotations

import queue
import time

import pytest
import redis

from smmf_queue import keys
from smmf_queue.jobs import StreamEvent, pack_vectors, unpack_vectors
from smmf_queue.providers.base import StopFilter
from smmf_queue.records import Claim, ClaimRefused, JobRecords
from smmf_queue.streaming import EventAssembler, EventWriter, decode_log, drain, last_seq


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
def records(redis_client: redis.Redis) -> JobRecords:
    return JobRecords(redis_client, lease_s=0.3, max_attempts=2, ttl_s=60)


def writer(client: redis.Redis, job_id: str, attempt: int) -> EventWriter:
    return EventWriter(client, job_id, attempt, worker_id="w", ttl_s=60, max_events=100,
                       last_seq=last_seq(client, job_id))


def test_a_live_lease_blocks_a_second_delivery_and_only_the_owner_finishes(
        records: JobRecords, redis_client: redis.Redis) -> None:
    job = "fence-1"
    assert records.claim(job, "A").outcome == "claimed"
    busy = records.claim(job, "B")
    assert busy.outcome == "busy" and 0 < busy.value <= 300
    time.sleep(0.35)  # A's lease expires (A died)
    second = records.claim(job, "B")
    assert (second.outcome, second.value) == ("claimed", 2)
    # A, back from the dead, cannot end the stream; B can, once
    stale = writer(redis_client, job, 1)
    assert not records.finish(stale, "A", stale.next_event("end"))
    current = writer(redis_client, job, 2)
    assert records.finish(current, "B", current.next_event("end"))
    assert records.claim(job, "C").outcome == "finished"
    assert [e.type for e in decode_log(redis_client.xrange(keys.event_log(job)))] == ["end"]


def test_a_job_that_keeps_killing_workers_is_exhausted(records: JobRecords) -> None:
    job = "fence-2"
    for owner in ("A", "B"):
        assert records.claim(job, owner).outcome == "claimed"
        time.sleep(0.35)
    assert records.claim(job, "C").outcome == "exhausted"


def test_a_claim_sent_ahead_answers_as_a_claim_does(records: JobRecords) -> None:
    first = records.send_claim("ahead-1", "A")
    assert first.result() == Claim("claimed", 1)
    first.confirm()  # the first attempt: the worker may publish
    second = records.send_claim("ahead-1", "B")
    assert second.result().outcome == "busy"
    with pytest.raises(ClaimRefused) as refused:
        second.confirm()
    assert refused.value.claim.outcome == "busy"


def test_a_claim_sent_ahead_survives_a_script_flush_and_gives_its_connection_back(
        redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url, client_name="ahead")
    records = JobRecords(client, lease_s=30, max_attempts=2, ttl_s=60)
    for i in range(20):
        if i % 5 == 0:
            client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
        assert records.send_claim(f"ahead-2-{i}", "A").result() == Claim("claimed", 1)
        records.send_claim(f"ahead-3-{i}", "A").release()  # the job stopped before reading it
    assert [c["name"] for c in client.client_list()].count("ahead") == 1


def test_a_writer_asks_before_its_first_write_only(redis_client: redis.Redis) -> None:
    asked = []
    writer = EventWriter(redis_client, "gate-1", 1, worker_id="w", ttl_s=60, max_events=100,
                         before_first_write=lambda: asked.append(True))
    writer.delta("a")
    writer.delta("b")
    assert asked == [True]

    def refuse() -> None:
        raise ClaimRefused(Claim("cancelled", 0))

    refused = EventWriter(redis_client, "gate-2", 1, worker_id="w", ttl_s=60, max_events=100,
                          before_first_write=refuse)
    with pytest.raises(ClaimRefused):
        refused.delta("a")
    assert redis_client.xlen(keys.event_log("gate-2")) == 0


def test_hub_survives_rapid_subscribe_unsubscribe_cycles(redis_server) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import redis.asyncio

    from smmf_queue.hub import StreamHub

    async def cycle() -> int:
        client = redis.asyncio.from_url(redis_server.url)
        hub = StreamHub(client)
        delivered = 0
        for i in range(300):
            inbox = await asyncio.wait_for(hub.subscribe(f"cycle-{i}"), 5)
            await client.publish(keys.stream_channel(f"cycle-{i}"), b"ping")
            delivered += (await asyncio.wait_for(inbox.get(), 5)) == b"ping"
            await hub.unsubscribe(f"cycle-{i}")
        await hub.aclose()
        await client.aclose()
        return delivered

    assert asyncio.run(cycle()) == 300


def test_a_worker_publishes_only_to_reply_channels() -> None:
    from smmf_queue.worker import _reply_channel

    assert _reply_channel({"reply_to": keys.reply_channel("abc")}) == "smmf:reply:abc"
    for other in (keys.stream_channel("someone-else"), "/0.celeryev/task.multi", 42, None):
        assert _reply_channel({"reply_to": other}) is None


def test_events_reach_the_reply_channel_prefixed_with_the_job_id(redis_client: redis.Redis) -> None:
    reply, own = keys.reply_channel("test-reply"), keys.stream_channel("job-r")
    pubsub = redis_client.pubsub()
    pubsub.subscribe(reply, own)
    for _ in range(2):
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    writer = EventWriter(redis_client, "job-r", 1, worker_id="w", ttl_s=60, max_events=100,
                         reply_to=reply)
    writer.delta("hi")
    got = {}
    for _ in range(2):
        message = pubsub.get_message(timeout=5)
        assert message is not None
        got[message["channel"]] = message["data"]
    pubsub.close()
    event = got[own.encode()]
    assert got[reply.encode()] == b"job-r " + event
    assert StreamEvent.model_validate_json(event).text == "hi"


def test_job_ids_of_batch_chunks_splits_and_retries_are_valid_on_the_wire() -> None:
    from smmf_queue.jobs import EmbeddingRequest, new_job_id

    run = new_job_id()
    for job_id in (f"{run}-12", f"{run}-12.0.1", f"{run}-12~2", f"{run}-12.1~1"):  # see batch.py
        assert EmbeddingRequest(model="m", texts=["x"], job_id=job_id).job_id == job_id
    with pytest.raises(ValueError):
        EmbeddingRequest(model="m", texts=["x"], job_id="has a space")
