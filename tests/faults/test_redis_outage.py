"""Fault: Redis killed with SIGKILL, then started again on the same port with its AOF.

Jobs it accepted before the kill are still queued after it.

Clients, the gateway and workers that lived through the outage must serve again without a
restart of their own; while Redis is down, calls fail with BrokerUnavailable (SDK) or 503 with
Retry-After (gateway), never hang or answer 500.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from smmf_queue import AsyncClient, BrokerUnavailable, Client, keys
from smmf_queue.config import load_config
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.jobs import ChatDelta, new_job_id
from smmf_queue.queues import JobSender, make_celery_app
from smmf_queue.streaming import decode_log

from ..conftest import CHAT, GATEWAY_KEY, StartWorker, free_port, start_service, wait_until, write_config

T = TypeVar("T")
HELLO = [{"role": "user", "content": "hi"}]
#: seconds a test gives a client to serve again once Redis is back (the promise is 10 s).
RECOVERY_BOUND_S = 30.0


@pytest.fixture
def outage(tmp_path: Path, tiny_models: Path, start_worker: StartWorker) -> Iterator[tuple[EmbeddedRedis, Path]]:
    """A private Redis with a live worker for CHAT; the test kills and restarts the Redis."""
    server = EmbeddedRedis(free_port(), tmp_path / "redis")
    server.start()
    config = write_config(tmp_path / "outage.toml", server.url, tiny_models)
    worker = start_worker(CHAT, config=config)
    yield server, config
    worker.stop()
    server.stop()


def kill(server: EmbeddedRedis) -> None:
    assert server.process is not None
    server.process.kill()
    server.process.wait()


def eventually(call: Callable[[], T]) -> T:
    """`call` once it stops raising BrokerUnavailable (bounded: RECOVERY_BOUND_S)."""
    deadline = time.monotonic() + RECOVERY_BOUND_S
    while True:
        try:
            return call()
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_clients_that_met_redis_down_serve_again_once_it_is_back(
        outage: tuple[EmbeddedRedis, Path]) -> None:
    server, config = outage
    with Client(config) as used, Client(config) as fresh:
        # Given one client in use and one made but not used yet
        assert used.chat(CHAT, HELLO, max_tokens=2).text is not None
        # When Redis dies, both fail with a clear BrokerUnavailable, streamed or not
        kill(server)
        for call in (lambda: fresh.chat(CHAT, HELLO, max_tokens=2, timeout=20),
                     lambda: list(used.stream_chat(CHAT, HELLO, max_tokens=2, timeout=20))):
            with pytest.raises(BrokerUnavailable) as down:
                call()
            assert "Redis" in down.value.message and not down.value.message.endswith(": ")
        # Then, once Redis is back on its port with its data, both serve again
        server.start()
        assert eventually(lambda: fresh.chat(CHAT, HELLO, max_tokens=2, timeout=20)).usage.completion_tokens == 2
        assert eventually(lambda: list(fresh.stream_chat(CHAT, HELLO, max_tokens=2, timeout=20)))[-1].usage
        assert eventually(lambda: used.chat(CHAT, HELLO, max_tokens=2, timeout=20)).usage.completion_tokens == 2


def test_an_async_client_first_used_while_redis_is_down_serves_once_it_is_back(
        outage: tuple[EmbeddedRedis, Path]) -> None:
    server, config = outage

    async def scenario() -> int:
        async with AsyncClient(config) as client:
            kill(server)
            with pytest.raises(BrokerUnavailable):
                await client.chat(CHAT, HELLO, max_tokens=2, timeout=20)
            server.start()
            deadline = time.monotonic() + RECOVERY_BOUND_S
            while True:
                try:
                    return (await client.chat(CHAT, HELLO, max_tokens=2, timeout=20)).usage.completion_tokens
                except BrokerUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

    assert asyncio.run(scenario()) == 2


def test_the_gateway_answers_503_with_retry_after_while_redis_is_down(
        outage: tuple[EmbeddedRedis, Path], tmp_path: Path) -> None:
    server, config = outage
    port = free_port()
    gateway = start_service("gateway", config, tmp_path / "gateway.log",
                            f"http://127.0.0.1:{port}/healthz", "--port", str(port))
    try:
        post = partial(_post, port)
        assert post()[0] == 200
        # When Redis dies, the gateway answers 503 with Retry-After, OpenAI-shaped, whether the
        # request streams or not, and so do the routes that read Redis themselves
        kill(server)
        time.sleep(1.5)  # past the liveness cache: the request itself meets Redis down
        for answer in (post(), post(stream=True), _get(port, "/v1/models")):
            status, headers, body = answer
            assert status == 503, body
            assert int(headers["retry-after"]) >= 1
            assert body["error"]["code"] == "broker_unavailable"  # type: ignore[index]
        # Then, once Redis is back, it serves again without a restart of its own
        server.start()
        deadline = time.monotonic() + RECOVERY_BOUND_S
        while (status := post()[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)


def test_the_gateway_answers_503_and_stays_responsive_while_redis_is_silent(
        outage: tuple[EmbeddedRedis, Path], tmp_path: Path) -> None:
    # Given a gateway whose Redis commands give up after 3 s, and which sends a chat without
    # first asking Redis for live workers (wait_for_worker: its send is the first command)
    server, config = outage
    silent_config = tmp_path / "silent.toml"
    silent_config.write_text(config.read_text().replace(
        "job_timeout_s = 60", "job_timeout_s = 60\nsocket_timeout_s = 3").replace(
        "max_body_bytes = 65536", "max_body_bytes = 65536\nwait_for_worker = true"))
    port = free_port()
    gateway = start_service("gateway", silent_config, tmp_path / "gateway.log",
                            f"http://127.0.0.1:{port}/healthz", "--port", str(port))
    assert server.process is not None
    try:
        assert _post(port)[0] == 200
        # When Redis goes silent, its connections open (SIGSTOP: a frozen host, a partition)
        server.process.send_signal(signal.SIGSTOP)
        # Then a chat gets a 503 broker_unavailable (it used to wait for ever, and so did every
        # other request: the first send held the gateway's event loop)
        status, _, body = _post(port)
        assert status == 503 and body["error"]["code"] == "broker_unavailable", body  # type: ignore[index]
        # and while the next chat waits for Redis, the gateway answers others at once
        waiting: list[int] = []
        chat = threading.Thread(target=lambda: waiting.append(_post(port, stream=True)[0]))
        chat.start()
        time.sleep(0.5)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
        assert chat.is_alive()  # (the health check answered while it waited)
        chat.join(60)
        assert waiting == [503]
        # and once Redis answers again, the gateway serves without a restart of its own
        server.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + RECOVERY_BOUND_S
        while (status := _post(port)[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
    finally:
        server.process.send_signal(signal.SIGCONT)
        gateway.terminate()
        gateway.wait(timeout=15)


def test_a_job_running_when_redis_goes_silent_runs_again_and_ends_whole(
        outage: tuple[EmbeddedRedis, Path]) -> None:
    # Given a long reply streaming from the worker (Redis commands give up after 5 s)
    server, config = outage
    assert server.process is not None
    with Client(config) as client:
        reference = client.chat(CHAT, HELLO, max_tokens=3000, temperature=0).text
        job_id = new_job_id()
        deltas: list[ChatDelta] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                deltas.extend(client.stream_chat(CHAT, HELLO, max_tokens=3000, temperature=0,
                                                 timeout=150, job_id=job_id))
            except BaseException as exc:  # noqa: BLE001 (the test asserts there was none)
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: len(deltas) >= 5, 30, "the first deltas")
        # When Redis goes silent for 40 s mid-reply (SIGSTOP), longer than the worker's writes
        # wait, so that its event writes and the job's failure fail
        server.process.send_signal(signal.SIGSTOP)
        time.sleep(40)
        server.process.send_signal(signal.SIGCONT)
        reader.join(150)
        # Then the job's message came back and the job ran again: its reader gets the whole
        # reply (after its last restart), and the log one end (the worker used to acknowledge
        # the message as a failed task's while the job's record still said RUNNING: its caller
        # waited out its timeout)
        assert not errors, errors
        restart = max((i for i, delta in enumerate(deltas) if delta.restart), default=0)
        assert "".join(delta.text for delta in deltas[restart:]) == reference
        logged = decode_log(redis.Redis.from_url(server.url).xrange(keys.event_log(job_id)))  # type: ignore[arg-type]
        assert sum(1 for event in logged if event.terminal) == 1
        # and the worker serves the next chat
        assert client.chat(CHAT, HELLO, max_tokens=4, temperature=0, timeout=60).text


def _post(port: int, stream: bool = False) -> tuple[int, dict[str, str], dict[str, object]]:
    """A chat through the gateway on `port`: its status, headers and JSON body."""
    body = json.dumps({"model": CHAT, "messages": HELLO, "max_tokens": 2, "stream": stream}).encode()
    return _send(urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {GATEWAY_KEY}"}))


def _get(port: int, path: str) -> tuple[int, dict[str, str], dict[str, object]]:
    return _send(urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                        headers={"Authorization": f"Bearer {GATEWAY_KEY}"}))


def _send(request: urllib.request.Request) -> tuple[int, dict[str, str], dict[str, object]]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, _lower(response.headers.items()), json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, _lower(error.headers.items()), json.load(error)


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


def test_jobs_accepted_just_before_redis_is_killed_are_in_their_queue_after_it_restarts(
        tmp_path: Path, tiny_models: Path) -> None:
    # Given a Redis with its AOF fsynced every second (the default), no worker, and 300 jobs
    # whose enqueue returned in the last moments before Redis was SIGKILLed
    server = EmbeddedRedis(free_port(), tmp_path / "redis")
    server.start()
    config = load_config(write_config(tmp_path / "accepts.toml", server.url, tiny_models))
    sender = JobSender(make_celery_app(config, store_results=False))
    accepted = [new_job_id() for _ in range(300)]
    for job_id in accepted:
        sender.send(keys.CHAT_TASK, "llm", {"model": CHAT, "job_id": job_id, "reply_to": "none",
                                            "messages": HELLO, "params": {}}, expires_s=None)
    kill(server)
    # When it starts again from its data folder
    server.start()
    # Then every accepted job is in its queue (a reply leaves Redis after its AOF write)
    queued = [json.loads(raw)["headers"]["id"]
              for raw in redis.Redis.from_url(server.url).lrange(keys.queue_name("llm", CHAT), 0, -1)]
    assert sorted(queued) == sorted(accepted)
    server.stop()

