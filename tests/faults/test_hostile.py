"""Fault: hostile messages put straight onto a model's queue, bypassing the SDK's validation.

None may run, none may stop the worker, a good job sent after each one is served, and each
one that can never run as sent is kept as a dead letter with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer

from smmf_queue import Client, dead_letters, job_record, keys
from smmf_queue.config import SmmfConfig
from smmf_queue.streaming import decode_log

from ..conftest import StartWorker, WorkerProcess, wait_until
from . import fault_config

MODEL = "tiny-chat-hostile"
HELLO = [{"role": "user", "content": "hi"}]
QUEUE = keys.queue_name("llm", MODEL)


def good_request(job_id: str, **changes: Any) -> dict[str, Any]:
    return {"v": 1, "job_id": job_id, "model": MODEL, "messages": HELLO,
            "params": {"max_tokens": 2}, **changes}


#: name → the error type of its dead letter (None: an ordinary job failure, e.g. a prompt over
#: the model's context, which its caller is told and which is no dead letter).
DEAD_AS: dict[str, str | None] = {
    "malformed JSON": "Rejected", "unknown task name": "Rejected", "no task headers": "Rejected",
    "request not an object": "InvalidRequest", "positional arguments": "InvalidRequest",
    "request missing fields": "InvalidRequest", "another model's request": "WrongWorker",
    "10 MB body": None,
}
#: name → (body, content type, headers): each put on the queue as it is.
HOSTILE: dict[str, tuple[bytes, str, dict[str, Any]]] = {
    "malformed JSON": (b'[[], {"request": ', "application/json",
                       {"task": keys.CHAT_TASK, "id": "hostile-json", "lang": "py"}),
    "unknown task name": (json.dumps([[], {"request": good_request("hostile-task")}, {}]).encode(),
                          "application/json", {"task": "smmf.no_such_task", "id": "hostile-task", "lang": "py"}),
    "no task headers": (json.dumps([[], {"request": good_request("hostile-headers")}, {}]).encode(),
                        "application/json", {}),
    "request not an object": (json.dumps([[], {"request": "rm -rf /"}, {}]).encode(), "application/json",
                              {"task": keys.CHAT_TASK, "id": "hostile-shape", "lang": "py"}),
    "positional arguments": (json.dumps([[1, 2, 3], {}, {}]).encode(), "application/json",
                             {"task": keys.CHAT_TASK, "id": "hostile-args", "lang": "py"}),
    "request missing fields": (json.dumps([[], {"request": {"model": MODEL}}, {}]).encode(),
                               "application/json", {"task": keys.CHAT_TASK, "id": "hostile-fields", "lang": "py"}),
    "another model's request": (json.dumps([[], {"request": good_request("hostile-model", model="other")}, {}]).encode(),
                                "application/json", {"task": keys.CHAT_TASK, "id": "hostile-model", "lang": "py"}),
    "10 MB body": (json.dumps([[], {"request": good_request(
        "hostile-big", messages=[{"role": "user", "content": "x" * 10_000_000}])}, {}]).encode(),
        "application/json", {"task": keys.CHAT_TASK, "id": "hostile-big", "lang": "py"}),
}


@pytest.fixture(scope="module")
def hostile_setup(tmp_path_factory: pytest.TempPathFactory, redis_server: Any, tiny_models: Path,
                  start_worker: StartWorker) -> tuple[Path, WorkerProcess]:
    path = fault_config(tmp_path_factory.mktemp("hostile") / "hostile.toml", redis_server.url,
                        tiny_models, MODEL, model_extra="context_length = 4096")
    return path, start_worker(MODEL, config=path)


def put(config: SmmfConfig, body: bytes, content_type: str, headers: dict[str, Any]) -> None:
    with Connection(config.queue.broker_url) as connection:
        producer = Producer(connection, exchange=Exchange(QUEUE, type="direct"), routing_key=QUEUE)
        producer.publish(body, serializer=None, content_type=content_type, content_encoding="utf-8",
                         headers=headers, declare=[])


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_message_never_runs_nor_stops_the_worker(
        name: str, hostile_setup: tuple[Path, WorkerProcess], redis_client: redis.Redis) -> None:
    from smmf_queue import load_config

    path, worker = hostile_setup
    config = load_config(path)
    body, content_type, headers = HOSTILE[name]
    # Given a hostile message on the model's queue
    put(config, body, content_type, headers)
    wait_until(lambda: redis_client.llen(QUEUE) == 0, 30, "the worker to take the message")
    # When a good job follows, then the worker serves it: it is alive and was not stopped
    with Client(path) as client:
        assert client.chat(MODEL, HELLO, max_tokens=2, timeout=60).usage.completion_tokens == 2
    assert worker.process.poll() is None
    # And the hostile message ran no model: no job ended DONE under its id
    job_id = headers.get("id")
    if job_id:
        assert job_record.read(redis_client, job_id).get("state") != "DONE"
    # and it is a dead letter with the reason, or (a job that failed as such) none
    letters = [letter for letter in dead_letters.listed(redis_client, 1000)
               if letter.job_id == job_id or (not job_id and not letter.request.get("headers"))]
    expected = DEAD_AS[name]
    assert [letter.error_type for letter in letters] == ([expected] if expected else [])
    if letters:
        assert letters[0].error_message and letters[0].queue == QUEUE




def test_a_message_whose_job_id_collides_with_a_running_job_runs_nothing(
        hostile_setup: tuple[Path, WorkerProcess], redis_client: redis.Redis) -> None:
    from smmf_queue import load_config

    path, worker = hostile_setup
    job_id = "hostile-collide"
    question = [{"role": "user", "content": "what is a queue"}]  # a long reply
    with Client(path) as client:
        # Given a job streaming its reply
        stream = client.stream_chat(MODEL, question, max_tokens=3000, temperature=0, job_id=job_id)
        deltas = [next(stream)]
        # When a second message with the same job id arrives on the queue
        request = good_request(job_id, messages=question, params={"max_tokens": 3000, "temperature": 0})
        put(load_config(path), json.dumps([[], {"request": request}, {}]).encode(), "application/json",
            {"task": keys.CHAT_TASK, "id": job_id, "lang": "py"})
        deltas += list(stream)
        wait_until(lambda: redis_client.llen(QUEUE) == 0, 30, "the worker to take the second message")
        # Then the job ran once: one attempt, one terminal event, a reply that never restarted
        assert client.chat(MODEL, HELLO, max_tokens=2).usage.completion_tokens == 2  # (after it)
    events = decode_log(redis_client.xrange(keys.event_log(job_id)))  # type: ignore[arg-type]
    assert [e.type for e in events if e.terminal] == ["end"]
    assert job_record.read(redis_client, job_id)["attempt"] == 1
    assert not any(d.restart for d in deltas) and worker.process.poll() is None

