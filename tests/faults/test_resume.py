"""Fault: an HTTP client's streamed reply drops mid-stream and the client reconnects.

Every SSE frame carries an `id:`; a client that reconnects to the stream's resume endpoint with
`Last-Event-ID` gets every frame after it and nothing twice, and its job was not cancelled while
it was away. One that never comes back has its job cancelled once the grace is over.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from smmf_queue import job_record, keys
from smmf_queue.client import AsyncClient
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.gateway_resume import LeftStreams

from ..conftest import GATEWAY_KEY, StartWorker, free_port, start_service, wait_until
from . import fault_config

MODEL = "tiny-chat-resume"
#: answered at length by the tiny model (2,443 tokens at temperature 0): the reply is still
#: streaming well after the grace, so a resume that cancelled would show.
QUESTION = [{"role": "user", "content": "what is a queue"}]
#: `gateway.resume_grace_s` here (the other tests' gateways cancel at once).
GRACE_S = 1
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}

Frame = tuple[str | None, dict]  # type: ignore[type-arg]


@pytest.fixture(scope="module")
def resume_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                  tiny_models: Path, start_worker: StartWorker) -> Path:
    """The model's config, with a worker for it; gateways stop within a second of SIGTERM."""
    folder = tmp_path_factory.mktemp("resume")
    config = fault_config(folder / "resume.toml", redis_server.url, tiny_models, MODEL, lease_s=3)
    config.write_text(config.read_text().replace(
        "resume_grace_s = 0", f"resume_grace_s = {GRACE_S}\nshutdown_grace_s = 1"))
    start_worker(MODEL, config=config)
    return config


def start_gateway(config: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = start_service("gateway", config, config.with_name(f"gateway-{port}.log"),
                            f"http://127.0.0.1:{port}/healthz", "--port", str(port))
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gateway(resume_config: Path) -> Iterator[str]:
    process, url = start_gateway(resume_config)
    yield url
    process.terminate()
    process.wait(timeout=15)


def frames(response: httpx.Response) -> Iterator[Frame]:
    """(id, data) of each SSE event, the `[DONE]` sentinel included as data {"done": true}."""
    frame_id = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            frame_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            yield frame_id, {"done": True} if data == "[DONE]" else json.loads(data)
            frame_id = None


def text_of(received: list[Frame]) -> str:
    return "".join(data["choices"][0]["delta"].get("content") or ""
                   for _, data in received if data.get("choices"))


def finishes(received: list[Frame]) -> list[str]:
    return [data["choices"][0]["finish_reason"] for _, data in received
            if data.get("choices") and data["choices"][0]["finish_reason"]]


def start_and_drop(gateway: str, after_text_frames: int) -> tuple[list[Frame], str]:
    """Stream the long reply and close the connection after some text frames: (frames, resume path)."""
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3000, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    received: list[Frame] = []
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as response:
        resume = response.headers["x-smmf-resume"]
        for frame in frames(response):
            received.append(frame)
            if sum(1 for f in received if text_of([f])) >= after_text_frames:
                break
    return received, resume


def resume(gateway: str, path: str, last_event_id: str | None) -> list[Frame]:
    headers = {**AUTH, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    with httpx.stream("GET", f"{gateway}{path}", headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return list(frames(response))


def test_a_dropped_stream_resumes_with_nothing_missing_and_nothing_twice(gateway: str) -> None:
    whole = httpx.post(f"{gateway}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "messages": QUESTION, "max_tokens": 3000, "temperature": 0}).json()
    # Given a streamed reply whose connection dropped after three text frames
    before, path = start_and_drop(gateway, after_text_frames=3)
    # When the client reconnects with the last id it saw
    after = resume(gateway, path, before[-1][0])
    # Then the two parts make the whole reply, each frame once, one finish and one usage frame
    assert text_of(before) + text_of(after) == whole["choices"][0]["message"]["content"]
    assert finishes(before + after) == [whole["choices"][0]["finish_reason"]]
    assert [d["usage"]["completion_tokens"] for _, d in after if d.get("usage")] == \
        [whole["usage"]["completion_tokens"]]
    ids = [i for i, _ in before + after if i is not None]
    assert len(ids) == len(set(ids)) and after[-1] == (None, {"done": True})


def test_resuming_after_the_finish_frame_sends_only_what_is_left(gateway: str) -> None:
    # Given a stream read to its end
    before, path = start_and_drop(gateway, after_text_frames=10**9)
    finish_id = next(i for i, d in before if d.get("choices") and d["choices"][0]["finish_reason"])
    usage_id = next(i for i, d in before if d.get("usage"))
    # When a client resumes after its finish frame, after its usage frame, or from the start
    # Then it gets the usage frame, nothing, or the whole stream again
    assert [i for i, _ in resume(gateway, path, finish_id)] == [usage_id, None]
    assert resume(gateway, path, usage_id) == [(None, {"done": True})]
    assert text_of(resume(gateway, path, None)) == text_of(before)


def test_a_client_that_never_comes_back_has_its_job_cancelled(gateway: str,
                                                               redis_client: redis.Redis) -> None:
    # Given a stream whose client left after one text frame
    before, path = start_and_drop(gateway, after_text_frames=1)
    job_id = before[0][1]["id"].removeprefix("chatcmpl-")
    # Then, once the grace is over, the job is cancelled
    wait_until(lambda: job_record.read(redis_client, job_id).get("cancelled"), 30, "the cancel mark")


def test_bad_resumes_get_openai_shaped_4xx(gateway: str, redis_client: redis.Redis) -> None:
    before, path = start_and_drop(gateway, after_text_frames=10**9)
    bad_id = httpx.get(f"{gateway}{path}", headers={**AUTH, "Last-Event-ID": "x"})
    unknown = httpx.get(f"{gateway}/v1/chat/completions/chatcmpl-nope/stream?model={MODEL}", headers=AUTH)
    no_model = httpx.get(f"{gateway}{path.split('?')[0]}?model=no-such-model", headers=AUTH)
    assert (bad_id.status_code, bad_id.json()["error"]["type"]) == (400, "invalid_request_error")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "stream_not_found")
    assert (no_model.status_code, no_model.json()["error"]["code"]) == (404, "model_not_found")
    # and a finished job whose log expired is not waited for
    redis_client.delete(keys.event_log(before[0][1]["id"].removeprefix("chatcmpl-")))
    expired = httpx.get(f"{gateway}{path}", headers=AUTH, timeout=10)
    assert (expired.status_code, expired.json()["error"]["code"]) == (404, "stream_not_found")


def test_a_stream_cut_by_a_stopping_gateway_resumes_on_another_replica(gateway: str,
                                                                       resume_config: Path) -> None:
    whole = httpx.post(f"{gateway}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "messages": QUESTION, "max_tokens": 3000, "temperature": 0}).json()
    # Given a long reply streaming through a second gateway replica
    stopping, url = start_gateway(resume_config)
    received: list[Frame] = []
    streaming = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, timeout=60, json={
                "model": MODEL, "messages": QUESTION, "max_tokens": 3000, "temperature": 0,
                "stream": True}) as response:
            received.append((response.headers["x-smmf-resume"], {}))
            try:
                for frame in frames(response):
                    received.append(frame)
                    streaming.set()
            except httpx.HTTPError:
                pass  # the connection was cut

    reader = threading.Thread(target=read)
    reader.start()
    assert streaming.wait(30)
    # When that replica is stopped mid-stream
    stopping.terminate()
    # Then it exits within its shutdown grace, however long the stream
    stopping.wait(timeout=30)
    reader.join(30)
    # and the client resumes on the other replica with nothing missing and nothing twice
    path, before = received[0][0], received[1:]
    assert path is not None and before[-1] != (None, {"done": True})
    after = resume(gateway, path, before[-1][0])
    assert text_of(before) + text_of(after) == whole["choices"][0]["message"]["content"]


def test_a_resume_is_noted_when_jobs_time_out_within_a_second(tmp_path: Path, resume_config: Path,
                                                              redis_client: redis.Redis) -> None:
    # Given a gateway's config whose jobs time out in half a second
    config = tmp_path / "short.toml"
    config.write_text(resume_config.read_text().replace("job_timeout_s = 60", "job_timeout_s = 0.5", 1))
    assert "job_timeout_s = 0.5" in config.read_text()

    async def attach() -> bytes:
        client = AsyncClient(config)
        streams = LeftStreams(client, grace_s=0)
        try:
            return await streams.attach("short-job")
        finally:
            await streams.aclose()
            await client.aclose()

    # When a reader resumes a stream, then its note is kept for a whole second, not refused by
    # Redis (an EX of 0 seconds)
    token = asyncio.run(attach())
    assert redis_client.get(keys.stream_reader("short-job")) == token
    assert redis_client.ttl(keys.stream_reader("short-job")) == 1
