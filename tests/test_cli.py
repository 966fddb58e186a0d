"""The `smmf-queue` command, run in-process with Typer's CliRunner."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import smmf_queue
from smmf_queue.cli import app

from .conftest import CHAT, EMBED, SPARE, WorkerProcess, write_config

runner = CliRunner()


def test_help_on_every_command() -> None:
    for command in ("up", "worker", "models", "chat", "embed", "config", "jobs", "providers"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_config_prints_resolved_with_secrets_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMMF_TEST_KEY", "sk-very-secret")
    path = tmp_path / "c.toml"
    path.write_text('[[models.llms]]\nname = "m"\nprovider = "hf"\napi_key = "${env:SMMF_TEST_KEY}"\n')
    result = runner.invoke(app, ["config", "-c", str(path)])
    assert result.exit_code == 0
    assert "sk-very-secret" not in result.output and '"api_key": "**********"' in result.output


def test_config_error_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[models.llms]]\nname = "m"\nprovider = "nope"\n')
    result = runner.invoke(app, ["config", "-c", str(path)])
    assert result.exit_code == 1
    assert "unknown provider 'nope'" in result.output


def test_models_shows_live_workers_and_queue_depth(config_path: Path, chat_worker: WorkerProcess,
                                                   embed_worker: WorkerProcess) -> None:
    result = runner.invoke(app, ["models", "-c", str(config_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(result.output)}
    assert rows[CHAT]["live_workers"] == 1 and rows[CHAT]["queue"] == "smmf.llm.tiny-noise-chat"
    assert rows[EMBED]["live_workers"] == 1 and rows[EMBED]["queued"] == 0
    assert rows[SPARE]["live_workers"] == 0
    assert rows[CHAT]["workers"] == [f"{chat_worker.worker_id} [cpu]"]
    table = runner.invoke(app, ["models", "-c", str(config_path)])
    assert table.exit_code == 0
    assert f"worker {chat_worker.worker_id} (pid {chat_worker.process.pid}" in table.output


def test_chat_and_embed_commands(config_path: Path, chat_worker: WorkerProcess,
                                 embed_worker: WorkerProcess) -> None:
    chat = runner.invoke(app, ["chat", "-c", str(config_path), "hi", "--max-tokens", "5",
                               "--temperature", "0"])
    assert chat.exit_code == 0, chat.output
    assert f"({CHAT}, first token after" in chat.output
    embed = runner.invoke(app, ["embed", "-c", str(config_path), "queues", "workers", "cats"],
                          terminal_width=200)
    assert embed.exit_code == 0, embed.output
    assert "3 vectors of 384 dimensions" in embed.output


def test_worker_refuses_hardware_it_lacks(tmp_path: Path, redis_server, tiny_models: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(tmp_path / "gpu.toml", redis_server.url, tiny_models)
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "cuda"', 1))
    result = runner.invoke(app, ["worker", "-c", str(path), "--model", CHAT])
    assert result.exit_code == 1
    assert f"model '{CHAT}' asks for device 'cuda' but no CUDA device is visible" in result.output


def test_worker_refuses_an_unknown_model(config_path: Path) -> None:
    result = runner.invoke(app, ["worker", "-c", str(config_path), "--model", "ghost"])
    assert result.exit_code == 1 and "unknown model 'ghost'" in result.output


def test_public_api_is_exactly_all() -> None:
    public = {name for name, value in vars(smmf_queue).items()
              if not name.startswith("_") and not inspect.ismodule(value)}
    assert set(smmf_queue.__all__) == public
    assert len(smmf_queue.__all__) == len(set(smmf_queue.__all__))  # each name listed once


def test_providers_lists_the_table_and_the_readme_shows_every_provider() -> None:
    from smmf_queue.providers import PROVIDERS

    result = runner.invoke(app, ["providers", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["provider"]: row for row in json.loads(result.output)}
    assert set(rows) == set(PROVIDERS)
    assert rows["hf"]["installed"] and rows["proxy/openai"]["default_concurrency"] == 64
    assert rows["mlx"]["kinds"] == ["llm"]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in PROVIDERS)
