"""The gateway re-reads its config on SIGHUP (#19): new models appear in /v1/models and serve,
removed ones answer 404, a stream under way goes on to its end, and a config that does not load
leaves the running one in place. A real gateway process and workers, the session's Redis; the
streamed model's upstream is the FAKE (tests/fake_upstream.py), which holds its reply open."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx

from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import (
    CHAT,
    GATEWAY_KEY,
    SPARE,
    StartWorker,
    WorkerProcess,
    free_port,
    start_service,
    wait_until,
    write_config,
)
from .fake_upstream import FakeUpstream, chat_chunk

HEADERS = {"Authorization": f"Bearer {GATEWAY_KEY}"}
HELD, ADDED = "reload-held-stream", "reload-added-later"


def _proxy(name: str, upstream: FakeUpstream) -> str:
    return (f'\n[[models.llms]]\nname = "{name}"\nprovider = "proxy/openai"\n'
            f'api_base = "{upstream.url}/v1"\napi_key = "unused"\nmax_retries = 0\n')


def _listed(url: str) -> set[str]:
    return {model["id"] for model in httpx.get(f"{url}/v1/models", headers=HEADERS).json()["data"]}


def test_sighup_reloads_models_without_dropping_a_stream(
        tmp_path: Path, redis_server: EmbeddedRedis, tiny_models: Path, upstream: FakeUpstream,
        start_worker: StartWorker, chat_worker: WorkerProcess) -> None:
    # Given a gateway on a config with a model whose upstream holds its reply open, mid-stream
    config = write_config(tmp_path / "reload.toml", redis_server.url, tiny_models, extra=_proxy(HELD, upstream))
    original = config.read_text()
    start_worker(HELD, config=config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = start_service("gateway", config, tmp_path / "gateway.log", f"{url}/healthz", "--port", str(port))
    try:
        release = threading.Event()
        upstream.reset()
        upstream.sse([chat_chunk("before "), chat_chunk("after"), chat_chunk(finish="stop")], hold=release)
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=HEADERS, timeout=60,
                          json={"model": HELD, "messages": [{"role": "user", "content": "hi"}],
                                "stream": True}) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if "before" in line)
            # When the config loses SPARE, gains ADDED, and the gateway gets SIGHUP
            config.write_text(original.replace(f'name = "{SPARE}"', f'name = "{ADDED}"'))
            gateway.send_signal(signal.SIGHUP)
            wait_until(lambda: ADDED in _listed(url), 10, "the reloaded config's models")
            release.set()
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        # Then the stream under way ended as it would have
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in rest if c["choices"]) == "after"
        # And the removed model answers 404, the added one is listed and serves
        assert SPARE not in _listed(url)
        gone = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=60,
                          json={"model": SPARE, "messages": [{"role": "user", "content": "hi"}]})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        # (ADDED is tiny-noise-chat's weights under another name; its worker reads the new file)
        start_worker(ADDED, config=config)
        added = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=60,
                           json={"model": ADDED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert added.status_code == 200 and added.json()["model"] == ADDED
        # When the file is broken and the gateway gets SIGHUP again, then the running config stays
        config.write_text(original + "\n[[models.llms]]\nname = 3\n")
        gateway.send_signal(signal.SIGHUP)
        wait_until(lambda: "config not reloaded" in (tmp_path / "gateway.log").read_text(), 10, "the refusal")
        assert ADDED in _listed(url) and gateway.poll() is None
        ok = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=60,
                        json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert ok.status_code == 200
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)
