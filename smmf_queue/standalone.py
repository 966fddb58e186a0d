"""Standalone mode: one machine runs the embedded Redis and one worker process per model.

`Stack` starts them, waits until every model has a live worker, and stops them all on exit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from . import registry
from .config import SmmfConfig
from .embedded import EmbeddedRedis
from .errors import SmmfError

#: seconds to wait for every worker to load its model and report live.
READY_TIMEOUT_S = 300.0


class Stack:
    """The processes of a standalone deployment of one config."""

    def __init__(self, config: SmmfConfig, *, log_dir: str | Path = ".smmf/logs"):
        self.config = config
        self.log_dir = Path(log_dir)
        self.redis: EmbeddedRedis | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        if self.config.queue.embedded_redis:
            self.redis = EmbeddedRedis.for_url(self.config.queue.redis,
                                               self.config.queue.embedded_redis_dir)
            self.redis.start()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for model in self.config.models:
            self.workers[model.name] = start_worker_process(self.config.source, [model.name],
                                                            self.log_dir / f"{_file_safe(model.name)}.log")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until every configured model has a live worker; raise if a worker dies first."""
        client = redis.Redis.from_url(self.config.queue.redis)
        deadline = time.monotonic() + timeout_s
        while True:
            workers = registry.live_workers(client)
            missing = [m.name for m in self.config.models
                       if not registry.replicas(workers, m.kind, m.name)]
            if not missing:
                return
            for name, process in self.workers.items():
                if process.poll() is not None:
                    log = self.log_dir / f"{_file_safe(name)}.log"
                    raise SmmfError(f"worker for '{name}' exited with code {process.returncode}; "
                                    f"last lines of {log}:\n{_tail(log)}", model=name)
            if time.monotonic() > deadline:
                raise SmmfError(f"workers not live after {timeout_s:.0f}s: {', '.join(missing)}")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
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


def start_worker_process(config_path: Path, models: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    """`smmf-queue worker` for `models` in a child process, its output going to `log_file`."""
    args = [sys.executable, "-m", "smmf_queue", "worker", "-c", str(config_path)]
    for name in models:
        args += ["--model", name]
    with open(log_file, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
