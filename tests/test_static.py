"""The package's static checks run with the tests, so a change cannot land that breaks them:
mypy on the package and ruff on everything (their settings are in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)


def test_the_package_type_checks() -> None:
    result = run_tool("mypy", "smmf_queue")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_code_passes_ruff() -> None:
    result = run_tool("ruff", "check", "smmf_queue", "tests", "scripts")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
