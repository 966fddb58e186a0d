"""Standalone mode: one machine runs the embedded Redis, one worker process per model and the
gateway.

`Stack` starts them, waits until every model it started has a live worker and the gateway
answers, and stops them all on exit. A model whose provider's extra is not installed here is
skipped, with the reason in `skipped` (the offline default serves SmolLM2 through llama.cpp only
where the `llamacpp` extra is installed); `smmf-queue worker --model` still refuses it loudly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import redis_clients, registry
from .config import ModelConfig, SmmfConfig
from .embedded_redis import EmbeddedRedis
from .errors import SmmfError
from .providers import missing_extra, require_extra

#: seconds to wait for every worker to load its model and report live.
READY_TIMEOUT_S = 300.0


class Stack:
    """The processes of a standalone deployment of one config."""

    def __init__(self, config: SmmfConfig, *, log_dir: str | Path = ".smmf/logs",
                 flower: bool = False):
        self.config = config
        self.log_dir = Path(log_dir)
        self.with_flower = flower
        self.flower: subprocess.Popen[bytes] | None = None
        self.redis: EmbeddedRedis | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        #: model name → why no worker is started for it here.
        self.skipped: dict[str, str] = {}
        for model in config.models:
            extra = missing_extra(model.provider)
            if extra is not None:
                self.skipped[model.name] = (f"provider '{model.provider}' needs the '{extra}' extra: "
                                            f"pip install 'smmf-queue[{extra}]'")
            elif problems := model.unresolved():
                self.skipped[model.name] = "; ".join(problems)
        self.gateway: subprocess.Popen[bytes] | None = None

    @property
    def served(self) -> list[ModelConfig]:
        """The models this stack starts a worker for."""
        return [model for model in self.config.models if model.name not in self.skipped]

    @property
    def gateway_url(self) -> str:
        return f"http://{self.config.gateway.host}:{self.config.gateway.port}"

    def start(self) -> None:
        if self.config.queue.embedded_redis:
            require_extra("standalone", "an embedded Redis (queue.embedded_redis = true)")
        if self.with_flower:
            require_extra("flower", "Flower")
        if self.config.queue.embedded_redis:
            self.redis = EmbeddedRedis.for_url(self.config.queue.redis,
                                               self.config.queue.embedded_redis_dir,
                                               self.config.queue.embedded_redis_fsync)
            self.redis.start()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for model in self.served:
            self.workers[model.name] = start_worker_process(self.config.source, [model.name],
                                                            self.log_dir / f"{_file_safe(model.name)}.log")
        self.gateway = start_process("gateway", self.config.source, self.log_dir / "gateway.log")
        if self.with_flower:
            self.flower = start_process("flower", self.config.source, self.log_dir / "flower.log")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until every started worker is live; raise if a worker dies first."""
        client = redis_clients.connect(self.config.queue)
        deadline = time.monotonic() + timeout_s
        while True:
            workers = registry.live_workers(client)
            missing = [m.name for m in self.served if not registry.replicas(workers, m.kind, m.name)]
            if not missing and self._gateway_answers():
                return
            for label, process, log in self._children():
                if process.poll() is not None:
                    raise SmmfError(f"{label} exited with code {process.returncode}; "
                                    f"last lines of {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise SmmfError(f"not ready after {timeout_s:.0f}s: workers missing for "
                                f"{', '.join(missing) or 'none'}; gateway answering: "
                                f"{self._gateway_answers()}")
            time.sleep(0.2)

    def _children(self) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
        children = [(f"the worker for '{name}'", process, self.log_dir / f"{_file_safe(name)}.log")
                    for name, process in self.workers.items()]
        if self.gateway is not None:
            children.append(("the gateway", self.gateway, self.log_dir / "gateway.log"))
        if self.flower is not None:
            children.append(("Flower", self.flower, self.log_dir / "flower.log"))
        return children

    def _gateway_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        stop_processes([process for _, process, _ in self._children()], grace_s=15)
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Stack:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_process(command: str, config_path: Path, log_file: Path,
                  *args: str) -> subprocess.Popen[bytes]:
    """`smmf-queue COMMAND -c CONFIG ARGS...` in a child process, its output going to `log_file`."""
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "smmf_queue", command, "-c", str(config_path), *args],
            stdout=log, stderr=subprocess.STDOUT)


def stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM each, then SIGKILL any that has not exited `grace_s` later: none outlives us."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_worker_process(config_path: Path, models: list[str], log_file: Path,
                         metrics_port: int | None = None) -> subprocess.Popen[bytes]:
    """`smmf-queue worker` for `models` in a child process, its output going to `log_file`."""
    args = [arg for name in models for arg in ("--model", name)]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port)]
    return start_process("worker", config_path, log_file, *args)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
