"""The provider name table: config prefix → "module:Class", imported only when a worker serves it.

A gateway or an SDK process validates `provider = "..."` against this table without importing
torch, vLLM or MLX; only the worker that serves a model imports its provider module.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from typing import TYPE_CHECKING

from ..errors import ProviderUnavailable

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import Provider

#: provider prefix (as in DB-GPT's configs) → implementation, imported on use.
PROVIDERS: dict[str, str] = {
    "hf": "smmf_queue.providers.hf:HFProvider",
    "llama.cpp": "smmf_queue.providers.llamacpp:LlamaCppProvider",
    "vllm": "smmf_queue.providers.vllm_engine:VLLMProvider",
    "mlx": "smmf_queue.providers.mlx_engine:MLXProvider",
    "proxy/openai": "smmf_queue.providers.openai_api:OpenAIProvider",
    "proxy/deepseek": "smmf_queue.providers.openai_api:OpenAIProvider",
    "proxy/tongyi": "smmf_queue.providers.openai_api:OpenAIProvider",
    "proxy/siliconflow": "smmf_queue.providers.openai_api:OpenAIProvider",
    "proxy/ollama": "smmf_queue.providers.ollama_api:OllamaProvider",
}

#: the pip extra that installs each provider's packages.
EXTRAS: dict[str, str] = {"hf": "hf", "llama.cpp": "llamacpp", "vllm": "vllm", "mlx": "mlx",
                          "proxy/openai": "proxy", "proxy/deepseek": "proxy", "proxy/tongyi": "proxy",
                          "proxy/siliconflow": "proxy", "proxy/ollama": "proxy"}
#: what each extra installs, by import name (found without importing any of it).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "hf": ("torch", "transformers", "sentence_transformers"), "llamacpp": ("llama_cpp",),
    "vllm": ("vllm",), "mlx": ("mlx_lm",), "proxy": ("openai", "httpx2", "ollama", "tenacity"),
}

#: keys every API proxy understands: seconds per call, retries of 429/5xx/connection errors
#: before the first token and their first backoff in seconds, texts per embeddings request.
_REMOTE_KEYS = frozenset({"timeout_s", "max_retries", "retry_backoff_s", "batch_size", "http_proxy",
                          "normalize"})
_OPENAI_KEYS = _REMOTE_KEYS | {"stream_usage"}
#: vLLM's engine arguments that a model entry passes through unchanged (as DB-GPT does).
VLLM_ENGINE_KEYS = frozenset({
    "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
    "dtype", "quantization", "enforce_eager", "max_num_seqs", "max_num_batched_tokens",
    "trust_remote_code", "seed", "swap_space", "block_size", "enable_prefix_caching",
    "kv_cache_dtype", "tokenizer", "revision", "download_dir", "load_format",
})

#: extra keys each provider family accepts in a model entry (beyond the common ones in config.py);
#: kept here, not in the provider modules, so validating a config never imports an engine.
PROVIDER_KEYS: dict[str, frozenset[str]] = {
    "hf": frozenset({"torch_dtype", "trust_remote_code", "max_new_tokens", "normalize",
                     "batch_size", "num_threads", "truncate"}),
    "llama.cpp": frozenset({"n_ctx", "n_gpu_layers", "n_threads", "n_batch", "seed", "chat_format",
                            "pooling_type", "normalize"}),
    "vllm": VLLM_ENGINE_KEYS | {"normalize"},
    "mlx": frozenset({"max_new_tokens"}),
    "proxy/openai": _OPENAI_KEYS | {"api_type", "api_version", "api_azure_deployment"},
    "proxy/deepseek": _OPENAI_KEYS | {"thinking_enabled"},
    "proxy/tongyi": _OPENAI_KEYS,
    "proxy/siliconflow": _OPENAI_KEYS,
    "proxy/ollama": _REMOTE_KEYS,
}


def known_providers() -> list[str]:
    """Provider prefixes this build can serve, sorted for messages."""
    return sorted(PROVIDERS)


def suggest_provider(name: str) -> str:
    """A "did you mean" hint for a misspelt provider, or "" when nothing is close."""
    close = difflib.get_close_matches(name, known_providers(), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def missing_extra(provider: str) -> str | None:
    """The pip extra that `provider` needs and this environment lacks, or None; asked without
    importing torch or an engine, so `up` can skip such a model instead of failing on it."""
    extra = EXTRAS[provider]
    if all(importlib.util.find_spec(module) for module in EXTRA_MODULES[extra]):
        return None
    return extra


def load_provider(model: ModelConfig) -> Provider:
    """Import the model's provider implementation and build it (does not load weights yet)."""
    target = PROVIDERS[model.provider]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProviderUnavailable(
            f"provider '{model.provider}' needs a package that is not installed ({exc.name}); "
            f"install the extra: pip install 'smmf-queue[{EXTRAS[model.provider]}]'",
            model=model.name,
        ) from exc
    provider_class = getattr(module, class_name)
    return provider_class(model)  # type: ignore[no-any-return]
