"""The deployment files, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.main import get_command

from smmf_queue import load_config
from smmf_queue.cli import app
from smmf_queue.providers import PROVIDERS

from .conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
#: compose's `${VAR:-default}`, resolved to its default as on a host that sets nothing.
_COMPOSE_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_every_compose_service_is_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = COMPOSE["services"][name]
    for key, value in service.get("environment", {}).items():
        monkeypatch.setenv(key, _COMPOSE_DEFAULT.sub(r"\1", str(value)))
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
