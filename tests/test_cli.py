"""The `smmf-queue` command, run in-process with Typer's CliRunner."""

from __future__ import annotations

import importlib.metadata
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
    rows = {row["model"]: row for row in json.loads(result.stdout)}
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
    rows = {row["provider"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(PROVIDERS)
    assert rows["hf"]["installed"] and rows["proxy/openai"]["default_concurrency"] == 64
    assert rows["mlx"]["kinds"] == ["llm"]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in PROVIDERS)


def test_version_and_known_log_levels_only() -> None:
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"smmf-queue {importlib.metadata.version('smmf-queue')}"
    refused = runner.invoke(app, ["worker", "-m", CHAT, "--loglevel", "chatty"])
    assert refused.exit_code == 2 and "'chatty' is not one of" in refused.output


def test_commands_find_their_config_and_say_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a folder with no config, then one with ./smmf.toml, then SMMF_CONFIG set
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SMMF_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    missing = runner.invoke(app, ["config"])
    assert missing.exit_code == 1 and "no config file" in missing.output and "smmf-queue init" in missing.output
    (tmp_path / "smmf.toml").write_text('[[models.llms]]\nname = "here"\nprovider = "proxy/openai"\n')
    (tmp_path / "other.toml").write_text('[[models.llms]]\nname = "there"\nprovider = "proxy/openai"\n')
    found = runner.invoke(app, ["config"])
    assert json.loads(found.stdout)["llms"][0]["name"] == "here"
    assert "config: smmf.toml (the first found of smmf.toml" in found.stderr
    monkeypatch.setenv("SMMF_CONFIG", "other.toml")
    named = runner.invoke(app, ["config"])
    assert json.loads(named.stdout)["llms"][0]["name"] == "there"
    assert "config: other.toml (from $SMMF_CONFIG)" in named.stderr
    # And -c wins over both
    given = runner.invoke(app, ["config", "-c", "smmf.toml"])
    assert json.loads(given.stdout)["llms"][0]["name"] == "here" and "(from -c)" in given.stderr


@pytest.mark.parametrize("name", ["openai", "deepseek", "tongyi", "siliconflow", "ollama"])
def test_init_writes_a_proxy_config_that_loads(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from smmf_queue.providers.openai_api import ENDPOINTS
    from smmf_queue.starter import PROXIES

    starter = PROXIES[name]
    if starter.key_env:  # the starter reads the key from the variable the provider documents
        assert starter.key_env == ENDPOINTS[starter.provider].key_env
        monkeypatch.setenv(starter.key_env, "sk-from-env")
    made = runner.invoke(app, ["init", "--proxy", name, "-o", str(tmp_path / "p.toml")])
    assert made.exit_code == 0, made.output
    loaded = smmf_queue.load_config(tmp_path / "p.toml")
    assert {m.provider for m in loaded.models} == {starter.provider}
    assert loaded.default_llm == starter.llm and loaded.queue.embedded_redis


def test_init_refuses_to_overwrite_and_names_unknown_proxies(tmp_path: Path) -> None:
    target = tmp_path / "smmf.toml"
    target.write_text("# mine\n")
    kept = runner.invoke(app, ["init", "-o", str(target)])
    assert kept.exit_code == 1 and "--force" in kept.output and target.read_text() == "# mine\n"
    unknown = runner.invoke(app, ["init", "--proxy", "openia", "-o", str(tmp_path / "x.toml")])
    assert unknown.exit_code == 1 and "expected one of openai, deepseek" in unknown.output


def test_config_origins_says_where_each_value_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[gateway]\nport = 8123\n")
    monkeypatch.setenv("SMMF_GATEWAY__HOST", "0.0.0.0")
    result = runner.invoke(app, ["config", "-c", str(path), "--origins", "--json"])
    rows = {row["key"]: row for row in json.loads(result.stdout)}
    assert rows["gateway.host"] == {"key": "gateway.host", "value": "0.0.0.0", "from": "$SMMF_GATEWAY__HOST"}
    assert rows["gateway.port"]["from"] == "file" and rows["worker.lease_s"]["from"] == "default"


def test_a_worker_refuses_a_model_whose_key_variable_is_not_set(tmp_path: Path, redis_server, tiny_models: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMMF_NO_SUCH_KEY", raising=False)
    path = write_config(tmp_path / "keyless.toml", redis_server.url, tiny_models, extra=(
        '[[models.llms]]\nname = "keyless"\nprovider = "proxy/openai"\napi_key = "${env:SMMF_NO_SUCH_KEY}"\n'))
    result = runner.invoke(app, ["worker", "-c", str(path), "--model", "keyless"], terminal_width=300)
    assert result.exit_code == 1
    assert "model 'keyless': key 'api_key': environment variable SMMF_NO_SUCH_KEY is not set" in result.output
