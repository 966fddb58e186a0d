"""The spine end to end: real Redis, real worker processes, real models."""

from __future__ import annotations

import pickle
import threading
import uuid
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer

from smmf_queue import (
    Client,
    JobFailed,
    JobTimeout,
    NoLiveWorker,
    RequestError,
    UnknownModel,
    WrongModelKind,
    keys,
)
from smmf_queue.config import SmmfConfig
from smmf_queue.jobs import EmbeddingRequest, StreamEvent, unpack_vectors
from smmf_queue.queues import make_celery_app
from smmf_queue.streaming import decode_log

from .conftest import CHAT, EMBED, SPARE, StartWorker, WorkerProcess, cosine, wait_until

HELLO = [{"role": "user", "content": "hello there"}]


def logged_events(redis_client: redis.Redis, job_id: str) -> list[StreamEvent]:
    return decode_log(redis_client.xrange(keys.event_log(job_id)))


def test_streamed_chat_arrives_in_order_with_one_terminal_event(
        client: Client, redis_client: redis.Redis) -> None:
    # Given a live chat worker
    # When a reply is streamed
    deltas = list(client.stream_chat(CHAT, HELLO, max_tokens=40, temperature=0))
    # Then the job's log holds seq 1..n in order, deltas then exactly one terminal `end`
    result = client.chat(CHAT, HELLO, max_tokens=40, temperature=0)
    events = logged_events(redis_client, result.job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events[:-1]] == ["delta"] * (len(events) - 1)
    assert events[-1].type == "end" and events[-1].finish_reason == "length"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 40
    # and the streamed text equals the whole reply (temperature 0 is deterministic)
    assert "".join(d.text for d in deltas) == result.text != ""


def test_the_final_result_is_in_the_result_backend_without_the_prompt(
        client: Client, config: SmmfConfig, redis_client: redis.Redis) -> None:
    # Given a finished chat whose prompt is long
    prompt = [{"role": "user", "content": "a long conversation " * 200}]
    result = client.chat(CHAT, prompt, max_tokens=8, temperature=0)
    # Then Celery's result backend holds the same final result
    app = make_celery_app(config)
    try:
        stored = app.AsyncResult(result.job_id).get(timeout=10)
    finally:
        app.close()
    assert stored["text"] == result.text and stored["usage"] == result.usage.model_dump()
    # and no second copy of the request (result_extended would store the task's arguments)
    raw = b"".join(redis_client.get(key) or b"" for key in redis_client.keys(f"*{result.job_id}*")
                   if redis_client.type(key) == b"string")
    assert b"a long conversation" not in raw


def test_temperature_zero_reaches_the_model(client: Client) -> None:
    # Greedy decoding is deterministic; sampling with different seeds is not.
    greedy = {client.chat(CHAT, HELLO, max_tokens=24, temperature=0).text for _ in range(2)}
    sampled = {client.chat(CHAT, HELLO, max_tokens=24, temperature=1.5, seed=s).text for s in (1, 2)}
    assert len(greedy) == 1
    assert len(sampled) == 2


def test_stop_and_max_tokens(client: Client) -> None:
    full = client.chat(CHAT, HELLO, max_tokens=60, temperature=0)
    assert full.finish_reason == "length" and full.usage.completion_tokens == 60
    stop = full.text[len(full.text) // 2:][:3]
    stopped = client.chat(CHAT, HELLO, max_tokens=60, temperature=0, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(stop)]


def test_late_subscriber_replays_the_whole_stream(client: Client, config: SmmfConfig) -> None:
    # Given a finished job
    result = client.chat(CHAT, HELLO, max_tokens=30, temperature=0)
    # When a second client connects afterwards
    with Client(config) as late:
        replayed = "".join(d.text for d in late.replay(result.job_id, CHAT))
        tail = "".join(d.text for d in late.replay(result.job_id, CHAT, from_seq=2))
    # Then it reads the whole reply, without loss or duplicates, or from any seq on
    assert replayed == result.text
    assert result.text.endswith(tail) and len(tail) < len(replayed)


def test_reader_joining_mid_stream_misses_nothing(client: Client, config: SmmfConfig,
                                                  redis_client: redis.Redis) -> None:
    # Given a long reply being streamed by one reader
    first_delta = threading.Event()
    job_id = f"mid-stream-{uuid.uuid4().hex}"
    texts: list[str] = []

    def reader() -> None:
        pieces = []
        for delta in client.stream_chat(CHAT, HELLO, max_tokens=400, temperature=0, job_id=job_id):
            pieces.append(delta.text)
            first_delta.set()
        texts.append("".join(pieces))

    thread = threading.Thread(target=reader)
    thread.start()
    assert first_delta.wait(30)
    # When a second reader joins while it runs
    with Client(config) as second:
        joined = "".join(d.text for d in second.replay(job_id, CHAT))
    thread.join(30)
    # Then both read the same, complete reply
    assert joined == texts[0] != ""


def test_embeddings_match_sentence_transformers_in_process(client: Client, config: SmmfConfig) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [f"sentence number {i} about {'queues' if i % 2 else 'cats'}" for i in range(37)]
    texts.append("a text longer than the model's limit " * 40)
    result = client.embed(EMBED, texts)
    model = SentenceTransformer(config.model(EMBED).path, device="cpu")
    local = model.encode(texts)
    assert len(result.vectors) == len(texts)
    for got, want in zip(result.vectors, local.tolist()):
        assert cosine(got, want) > 0.999
    # usage counts the tokens the model was fed: the long text cut at the model's limit
    fed = [min(len(ids), model.max_seq_length) for ids in model.tokenizer(texts)["input_ids"]]
    assert max(fed) == model.max_seq_length
    assert result.usage.prompt_tokens == sum(fed)


def test_an_embedding_s_vectors_are_stored_once_unless_the_result_backend_is_its_only_way(
        client: Client, config: SmmfConfig, redis_client: redis.Redis) -> None:
    texts = ["a queue", "a cat"]
    app = make_celery_app(config)
    try:
        # Given an embedding job sent by the SDK, whose reply channel carried its end event
        result = client.embed(EMBED, texts)
        stored = app.AsyncResult(result.job_id).get(timeout=10)
        # When a plain Celery producer (no reply channel) sends the same
        request = EmbeddingRequest(model=EMBED, texts=texts)
        plain = app.send_task(keys.EMBED_TASK, kwargs={"request": request.message()}, task_id=request.job_id,
                              queue=keys.queue_name("embedding", EMBED)).get(timeout=60)
    finally:
        app.close()
    # Then the SDK's job keeps its vectors in its event log only, its result backend copy
    # holding the rest; the plain producer's result carries them
    [end] = logged_events(redis_client, result.job_id)
    assert end.vectors_b64 is not None and unpack_vectors(end.vectors_b64, end.dims) == result.vectors
    assert "vectors_b64" not in stored and stored["dims"] == end.dims and stored["usage"]["prompt_tokens"] > 0
    assert unpack_vectors(plain["vectors_b64"], plain["dims"]) == result.vectors


def test_two_models_never_receive_each_others_jobs(client: Client, chat_worker: WorkerProcess,
                                                   embed_worker: WorkerProcess) -> None:
    # Given one worker per model, when both kinds of jobs are sent
    chats = [client.chat(CHAT, HELLO, max_tokens=4) for _ in range(4)]
    embeds = [client.embed(EMBED, ["a", "b"]) for _ in range(4)]
    # Then each job ran on the worker pinned to its model
    assert {c.worker for c in chats} == {chat_worker.worker_id}
    assert {e.worker for e in embeds} == {embed_worker.worker_id}
    workers = {w.worker_id: w for w in client.live_workers()}
    assert [m.name for m in workers[chat_worker.worker_id].models] == [CHAT]
    assert [m.name for m in workers[embed_worker.worker_id].models] == [EMBED]


def test_request_errors_are_typed(client: Client) -> None:
    with pytest.raises(UnknownModel):
        client.chat("no-such-model", HELLO)
    with pytest.raises(WrongModelKind):
        client.embed(CHAT, ["x"])
    with pytest.raises(RequestError, match="temperature"):
        client.chat(CHAT, HELLO, temperature=-1)
    with pytest.raises(RequestError):
        client.chat(CHAT, [])
    with pytest.raises(RequestError, match="job_id"):  # job ids end at a space on reply channels
        client.chat(CHAT, HELLO, job_id="two words")
    # A slip of type is an error that names the field, not a one-token reply or a stream
    with pytest.raises(RequestError, match=r"^invalid chat request: params\.max_tokens: expected a number, got true$"):
        client.chat(CHAT, HELLO, max_tokens=True)
    with pytest.raises(RequestError, match="normalize: expected true or false"):
        client.embed(EMBED, ["x"], normalize=1)


def test_a_producer_subscribes_once_not_per_job(config: SmmfConfig, redis_client: redis.Redis,
                                                 chat_worker: WorkerProcess) -> None:
    def subscribes() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0))

    before = subscribes()
    with Client(config) as fresh:
        replies = [fresh.chat(CHAT, HELLO, max_tokens=3, temperature=0) for _ in range(5)]
    assert len({r.job_id for r in replies}) == 5 and all(r.text for r in replies)
    assert subscribes() - before == 1  # the client's reply channel, before its first job


def test_a_job_cancelled_while_queued_publishes_nothing(client: Client,
                                                      redis_client: redis.Redis) -> None:
    # Given a job whose caller cancelled it before a worker took it (a worker starts the model
    # while the job's claim is on its way, and must read the answer before publishing)
    job_id = "cancelled-while-queued"
    client.cancel(job_id, ttl_s=60)
    # When it is enqueued and the worker takes it
    with pytest.raises(JobTimeout):
        list(client.stream_chat(CHAT, HELLO, max_tokens=40, temperature=0, job_id=job_id, timeout=3))
    # Then the worker took it off the queue but published nothing of it
    assert sum(redis_client.llen(lane) for lane in keys.queue_lanes("llm", CHAT)) == 0
    assert logged_events(redis_client, job_id) == []
    # and keeps serving
    assert client.chat(CHAT, HELLO, max_tokens=3).usage.completion_tokens == 3


def test_threads_streaming_through_one_client_each_get_their_whole_reply(client: Client) -> None:
    # Given four threads streaming at once through one blocking Client, which read their events
    # on their own threads (whichever waits reads the shared connection and routes for all)
    lengths = [5, 15, 25, 35]
    texts: dict[int, str] = {}

    def reader(max_tokens: int) -> None:
        texts[max_tokens] = "".join(d.text for d in client.stream_chat(
            CHAT, HELLO, max_tokens=max_tokens, temperature=0))

    threads = [threading.Thread(target=reader, args=(n,)) for n in lengths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Then each got its own reply whole (greedy decoding: the same as a single chat)
    assert texts == {n: client.chat(CHAT, HELLO, max_tokens=n, temperature=0).text for n in lengths}


def test_leaving_a_stream_early_cancels_the_job(client: Client, redis_client: redis.Redis) -> None:
    job_id = "left-early"
    for _ in client.stream_chat(CHAT, HELLO, max_tokens=2000, temperature=0, job_id=job_id):
        break
    wait_until(lambda: any(e.type == "error" for e in logged_events(redis_client, job_id)), 30,
               "the worker to stop the job")
    assert logged_events(redis_client, job_id)[-1].error_type == "Cancelled"


def test_provider_failure_becomes_job_failed(client: Client) -> None:
    # The tiny model has 8192 positions: asking for far more makes transformers fail in the worker.
    huge = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(JobFailed) as caught:
        client.chat(CHAT, huge, max_tokens=1)
    assert caught.value.job_id and caught.value.model == CHAT
    # and the worker keeps serving
    assert client.chat(CHAT, HELLO, max_tokens=3).usage.completion_tokens == 3


def test_no_worker_fails_fast_or_waits_for_one(client: Client, start_worker: StartWorker,
                                              redis_client: redis.Redis) -> None:
    # Given a configured model with no worker
    # When the caller asks to fail fast, then it fails at once, naming the model
    with pytest.raises(NoLiveWorker, match=SPARE):
        client.chat(SPARE, HELLO, fail_fast=True)
    # When it does not, the job waits in the durable queue ...
    results = []
    waiting = threading.Thread(target=lambda: results.append(client.chat(SPARE, HELLO, max_tokens=5)))
    waiting.start()
    wait_until(lambda: redis_client.llen(keys.queue_name("llm", SPARE)) == 1, 10, "a queued job")
    # ... and is served once a worker starts
    spare = start_worker(SPARE)
    waiting.join(60)
    assert results and results[0].worker == spare.worker_id
    # A killed worker vanishes from `smmf-queue models` within its heartbeat TTL
    assert live_replicas(client, SPARE) == 1
    spare.kill()
    wait_until(lambda: live_replicas(client, SPARE) == 0, 1.5 + 2, "the heartbeat to expire")


def live_replicas(client: Client, model: str) -> int:
    return sum(1 for w in client.live_workers() for m in w.models if m.name == model)


class _Exploit:
    """Unpickling this would create a file: the proof that a worker accepted pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_pickle_message_is_rejected_and_worker_keeps_serving(
        client: Client, config: SmmfConfig, tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given a pickle-serialized task message put on the chat model's queue
    marker = tmp_path / "unpickled"
    queue = keys.queue_name("llm", CHAT)
    with Connection(config.queue.broker_url) as connection:
        producer = Producer(connection, exchange=Exchange(queue, type="direct"), routing_key=queue)
        producer.publish(
            pickle.dumps(((), {"request": _Exploit(marker)}, {})), serializer=None,
            content_type="application/x-python-serialize", content_encoding="binary",
            headers={"lang": "py", "task": keys.CHAT_TASK, "id": "pickled-job"}, declare=[])
    wait_until(lambda: redis_client.llen(queue) == 0, 10, "the worker to take the message")
    # When a normal job follows, then the worker serves it and never unpickled the message
    assert client.chat(CHAT, HELLO, max_tokens=3).usage.completion_tokens == 3
    assert not marker.exists()
    assert not redis_client.exists(keys.job_record("pickled-job"))


def test_the_sdk_refuses_what_a_model_cannot_honour_before_enqueueing(client: Client) -> None:
    from smmf_queue import UnsupportedParameter

    with pytest.raises(UnsupportedParameter) as refused:
        client.chat(CHAT, HELLO, max_tokens=3, tools=[{"type": "function", "function": {"name": "f"}}])
    assert refused.value.param == "tools" and CHAT in refused.value.message
