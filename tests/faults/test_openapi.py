"""Hostile HTTP input: schemathesis, driven by the gateway's own OpenAPI document.

Every generated request (valid ones that reach a real worker, and invalid ones: wrong types,
non-UTF-8 bodies, odd headers) must get a documented status with an OpenAI-shaped body: no
undocumented status or content type, no 500, and a schema-valid request is never refused.
The admin API (virtual keys, usage) exists with a master key only: a second gateway has one,
on a Redis of its own (the run makes hundreds of keys). The runs are bounded (examples per
operation, a fixed seed); `scripts/faults.py openapi` runs more of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smmf_queue.embedded_redis import EmbeddedRedis

from ..conftest import GATEWAY_KEY, WorkerProcess, free_port, start_service

SETTINGS = Path(__file__).with_name("schemathesis.toml")
#: the admin gateway's master key.
MASTER = "sk-master-openapi"


@pytest.fixture(scope="module")
def gateway_url(config_path: Path, chat_worker: WorkerProcess, embed_worker: WorkerProcess,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("openapi") / "gateway.log"
    process = start_service("gateway", config_path, log, f"http://127.0.0.1:{port}/healthz",
                            "--port", str(port))
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=15)


@pytest.fixture(scope="module")
def admin_gateway_url(config_path: Path, redis_server: EmbeddedRedis,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway with a master key (SMMF_MASTER_KEY), on a Redis of its own."""
    folder = tmp_path_factory.mktemp("openapi-admin")
    with EmbeddedRedis(free_port(), folder / "redis") as own:
        config = folder / "admin.toml"
        config.write_text(config_path.read_text().replace(redis_server.url, own.url))
        port = free_port()
        os.environ["SMMF_MASTER_KEY"] = MASTER
        try:
            process = start_service("gateway", config, folder / "gateway.log",
                                    f"http://127.0.0.1:{port}/healthz", "--port", str(port))
        finally:
            del os.environ["SMMF_MASTER_KEY"]
        yield f"http://127.0.0.1:{port}"
        process.terminate()
        process.wait(timeout=15)


def schemathesis(url: str, examples: int, seed: int, key: str = GATEWAY_KEY,
                 *only: str) -> subprocess.CompletedProcess[str]:
    """`st run` against the gateway at `url`, every check on (`only`: more of st's options)."""
    st = Path(sys.executable).with_name("st")
    return subprocess.run(
        [str(st), "--config-file", str(SETTINGS), "run", f"{url}/openapi.json", "--checks", "all",
         "--max-examples", str(examples), "--seed", str(seed), "--request-timeout", "60",
         "-H", f"Authorization: Bearer {key}", "--no-color", *only],
        capture_output=True, text=True, timeout=600)


def passed(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 0, run.stdout[max(0, run.stdout.find("FAILURES"), run.stdout.find("ERRORS")):][:8000] + run.stderr[-2000:]
    assert "generated" in run.stdout  # it ran cases, not nothing


def test_the_gateway_passes_schemathesis_against_its_own_schema(gateway_url: str) -> None:
    passed(schemathesis(gateway_url, examples=10, seed=1))


def test_the_admin_api_passes_schemathesis_against_its_own_schema(admin_gateway_url: str) -> None:
    # Before: undocumented 4xx, durations that the schema allowed refused (and huge ones a 500),
    # booleans taken for limits, a taken alias answered 400 (now 409)
    passed(schemathesis(admin_gateway_url, 20, 1, MASTER, "--include-path-regex", "^/(key|usage)"))
