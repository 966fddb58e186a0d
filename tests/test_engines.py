"""vLLM and MLX cannot run on this machine: their config-to-engine mapping and their refusals
are tested here; the real vLLM path runs only where a GPU machine is lent (docs/performance-log.md)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smmf_queue.cli import app
from smmf_queue.config import ModelConfig
from smmf_queue.errors import ProviderUnavailable
from smmf_queue.providers import load_provider
from smmf_queue.providers.mlx_engine import missing_for_mlx
from smmf_queue.providers.vllm_engine import VLLMProvider, engine_args, missing_for_vllm

runner = CliRunner()


def vllm_model(**entry: object) -> ModelConfig:
    return ModelConfig(**{"name": "qwen", "provider": "vllm", **entry})  # type: ignore[arg-type]


def test_vllm_engine_keys_pass_through_as_dbgpt_writes_them() -> None:
    model = vllm_model(path="/models/Qwen2.5-7B", backend="Qwen2.5-7B-Instruct", tensor_parallel_size=2,
                       gpu_memory_utilization=0.85, dtype="bfloat16", max_num_seqs=128,
                       trust_remote_code=True)
    assert engine_args(model) == {
        "model": "/models/Qwen2.5-7B", "served_model_name": "Qwen2.5-7B-Instruct",
        "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85, "dtype": "bfloat16",
        "max_num_seqs": 128, "trust_remote_code": True}


def test_vllm_context_length_and_embedding_task() -> None:
    chat = vllm_model(backend="Qwen/Qwen2.5-7B-Instruct", context_length=8192)
    assert engine_args(chat) == {"model": "Qwen/Qwen2.5-7B-Instruct", "max_model_len": 8192}
    explicit = vllm_model(context_length=8192, max_model_len=4096)
    assert engine_args(explicit)["max_model_len"] == 4096
    embed = ModelConfig(name="bge", provider="vllm", kind="embedding", path="/models/bge-m3")
    assert engine_args(embed) == {"model": "/models/bge-m3", "task": "embed"}


def test_vllm_sampling_params_keep_temperature_zero() -> None:
    from smmf_queue.jobs import ChatRequest
    request = ChatRequest(model="qwen", messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
                          params={"temperature": 0, "max_tokens": 5, "stop": ["\n"], "seed": 1})  # type: ignore[arg-type]
    assert VLLMProvider(vllm_model()).sampling_params(request) == {
        "temperature": 0, "max_tokens": 5, "stop": ["\n"], "seed": 1}


def test_mlx_sampling_maps_the_request() -> None:
    from smmf_queue.jobs import ChatRequest
    from smmf_queue.providers.mlx_engine import MLXProvider
    model = ModelConfig(name="qwen-mlx", provider="mlx", max_new_tokens=64)
    request = ChatRequest(model="qwen-mlx", messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
                          params={"temperature": 0.7, "top_p": 0.9})  # type: ignore[arg-type]
    assert MLXProvider(model).sampling(request) == {"max_tokens": 64, "temp": 0.7, "top_p": 0.9}


@pytest.mark.skipif(not missing_for_vllm(), reason="this host can run vLLM")
def test_vllm_refuses_with_what_is_missing() -> None:
    with pytest.raises(ProviderUnavailable) as refusal:
        load_provider(vllm_model()).check_hardware()
    message = str(refusal.value)
    assert message.startswith("model 'qwen' (vllm) cannot run here: ")
    assert "smmf-queue[vllm]" in message or "CUDA" in message or "NVIDIA" in message


@pytest.mark.skipif(platform.system() == "Darwin" and platform.machine() == "arm64",
                    reason="this host is Apple Silicon")
def test_mlx_refuses_off_apple_silicon_and_for_embeddings() -> None:
    chat = ModelConfig(name="qwen-mlx", provider="mlx")
    with pytest.raises(ProviderUnavailable) as refusal:
        load_provider(chat).check_hardware()
    assert "MLX needs Apple Silicon (this host is " in str(refusal.value)
    assert any("generates text only" in reason for reason in missing_for_mlx("embedding"))


def test_worker_command_refuses_a_vllm_model_before_consuming(tmp_path: Path) -> None:
    if not missing_for_vllm():
        pytest.skip("this host can run vLLM")
    config = tmp_path / "vllm.toml"
    config.write_text('[[models.llms]]\nname = "qwen"\nprovider = "vllm"\npath = "/nowhere"\n'
                      '[queue]\nbroker_url = "redis://127.0.0.1:1/0"\n')
    result = runner.invoke(app, ["worker", "-c", str(config), "--model", "qwen"])
    assert result.exit_code == 1
    assert "model 'qwen' (vllm) cannot run here" in result.output
