"""`smmf-queue up` as a user runs it, and the SDK reaching that stack from another process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from smmf_queue import AsyncClient, Client, load_config

from .conftest import CHAT, EMBED, ROOT, free_port, wait_until


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_serves_the_config_and_stops_everything_on_ctrl_c_or_sigterm(
        tmp_path: Path, tiny_models: Path, stop: signal.Signals) -> None:
    # Given a config with an embedded Redis on a free port
    port, gateway_port = free_port(), free_port()
    config_path = tmp_path / "standalone.toml"
    config_path.write_text((ROOT / "configs" / "local.toml").read_text()
                           .replace('".smmf/models/tiny-noise-chat"', f'"{tiny_models / "tiny-noise-chat"}"')
                           .replace("${env:SMMF_REDIS_PORT:-6390}", str(port))
                           .replace("${env:SMMF_GATEWAY_PORT:-8000}", str(gateway_port))
                           .replace('".smmf/redis"', f'"{tmp_path / "redis"}"'))
    # When `smmf-queue up` runs it
    up = subprocess.Popen([sys.executable, "-m", "smmf_queue", "up", "-c", str(config_path)],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if line.startswith("serving"):
                break
        else:
            raise AssertionError("`up` ended before serving")
        # Then a client in another process reaches it through the same config, sync and async
        with Client(config_path) as client:
            assert client.chat(CHAT, [{"role": "user", "content": "hi"}], max_tokens=3).text
            assert len(client.embed(EMBED, ["a", "b"]).vectors) == 2
            worker_pids = {w.pid for w in client.live_workers()}
        assert len(worker_pids) == 2

        async def use_async() -> list[str]:
            async with AsyncClient(config_path) as aclient:
                pieces = [d.text async for d in aclient.stream_chat(
                    CHAT, [{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)]
                result = await aclient.embed(EMBED, ["x"])
                assert len(result.vectors[0]) == 384
                return pieces

        assert "".join(asyncio.run(use_async()))
        # and the gateway that `up` started answers with the configured models
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/v1/models") as response:
            assert {m["id"] for m in json.load(response)["data"]} == {CHAT, EMBED}
    finally:
        # And Ctrl-C (or SIGTERM) stops the workers, the gateway and the embedded Redis
        up.send_signal(stop)
        assert up.wait(timeout=60) == 0
    assert not any(_alive(pid) for pid in worker_pids)
    assert not _answers_http(gateway_port)
    assert load_config(config_path).queue.embedded_redis
    probe = redis.Redis(port=port, socket_connect_timeout=0.5)
    wait_until(lambda: not _answers(probe), 10, "the embedded Redis to stop")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _answers_http(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
    except OSError:
        return False
    return True


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
