"""From `pip install` to a running stack in an empty folder (#19), as a new user meets it: the
wheel `python -m build` makes, installed with `[hf,standalone]` into a fresh virtual environment
(the CPU build of torch first, as scripts/bootstrap.sh does), then `smmf-queue init` and
`smmf-queue up --demo` in an empty folder: a chat and an embedding through the queues. Slow: it
installs torch and transformers into the new environment (from pip's cache when warm)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def test_the_wheel_runs_a_stack_in_an_empty_folder(tmp_path: Path) -> None:
    # Given the wheel, built from a copy of the sources
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "smmf_queue", source / "smmf_queue", ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", source)
    [wheel] = (tmp_path / "dist").glob("smmf_queue-*.whl")
    # When it is installed into a fresh virtual environment
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run(*pip, "torch==2.13.0")
    run(*pip, f"{wheel}[hf,standalone]")
    # and started in an empty folder, on free ports, with no config anywhere
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in ("SMMF_CONFIG", "VIRTUAL_ENV")},
           "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
           "SMMF_REDIS_PORT": str(free_port()), "SMMF_GATEWAY_PORT": str(free_port()), "COLUMNS": "200"}
    smmf = venv / "bin" / "smmf-queue"
    assert run(smmf, "--version", cwd=empty, env=env).stdout.startswith("smmf-queue ")
    run(smmf, "init", cwd=empty, env=env)
    demo = run(smmf, "up", "--demo", cwd=empty, env=env)
    # Then a chat (SDK and gateway) and an embedding went through the queues
    assert "config: smmf.toml" in demo.stderr
    assert "(tiny-noise-chat, first token after" in demo.stdout
    assert "3 vectors of 384 dimensions from all-MiniLM-L6-v2" in demo.stdout
    assert "/v1/chat/completions (tiny-noise-chat)" in demo.stdout
