"""Hostile HTTP input: schemathesis, driven by the gateway's own OpenAPI document.

Every generated request (valid ones that reach a real worker, and invalid ones: wrong types,
non-UTF-8 bodies, odd headers) must get a documented status with an OpenAI-shaped body: no
undocumented status or content type, no 500, and a schema-valid request is never refused.
The run is bounded (examples per operation, a fixed seed); `scripts/faults.py openapi` runs
more of them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import GATEWAY_KEY, WorkerProcess, free_port, start_service

SETTINGS = Path(__file__).with_name("schemathesis.toml")


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


def schemathesis(url: str, examples: int, seed: int) -> subprocess.CompletedProcess[str]:
    """`st run` against the gateway at `url`, every check on."""
    st = Path(sys.executable).with_name("st")
    return subprocess.run(
        [str(st), "--config-file", str(SETTINGS), "run", f"{url}/openapi.json", "--checks", "all",
         "--max-examples", str(examples), "--seed", str(seed), "--request-timeout", "60",
         "-H", f"Authorization: Bearer {GATEWAY_KEY}", "--no-color"],
        capture_output=True, text=True, timeout=600)


def test_the_gateway_passes_schemathesis_against_its_own_schema(gateway_url: str) -> None:
    run = schemathesis(gateway_url, examples=10, seed=1)
    assert run.returncode == 0, run.stdout[max(0, run.stdout.find("FAILURES"), run.stdout.find("ERRORS")):][:8000] + run.stderr[-2000:]
    assert "generated" in run.stdout  # it ran cases, not nothing
