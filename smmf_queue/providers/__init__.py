"""The provider name table: config prefix → "module:Class", imported only when a worker serves it.

A gateway or an SDK process validates `provider = "..."` against this table without importing
torch, vLLM or MLX; only the worker that serves a model imports its provider module.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

from ..errors import ProviderUnavailable

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import Provider

#: provider prefix (as in DB-GPT's configs) → implementation, imported on use.
PROVIDERS: dict[str, str] = {
    "hf": "smmf_queue.providers.hf:HFProvider",
}

#: extra keys each provider family accepts in a model entry (beyond the common ones in config.py);
#: kept here, not in the provider modules, so validating a config never imports an engine.
PROVIDER_KEYS: dict[str, frozenset[str]] = {
    "hf": frozenset({"torch_dtype", "trust_remote_code", "max_new_tokens", "normalize",
                     "batch_size", "num_threads"}),
}


def known_providers() -> list[str]:
    """Provider prefixes this build can serve, sorted for messages."""
    return sorted(PROVIDERS)


def suggest_provider(name: str) -> str:
    """A "did you mean" hint for a misspelt provider, or "" when nothing is close."""
    close = difflib.get_close_matches(name, known_providers(), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def load_provider(model: ModelConfig) -> Provider:
    """Import the model's provider implementation and build it (does not load weights yet)."""
    target = PROVIDERS[model.provider]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProviderUnavailable(
            f"provider '{model.provider}' needs a package that is not installed ({exc.name}); "
            f"install the extra: pip install 'smmf-queue[{_extra_of(model.provider)}]'",
            model=model.name,
        ) from exc
    provider_class = getattr(module, class_name)
    return provider_class(model)  # type: ignore[no-any-return]


def _extra_of(provider: str) -> str:
    return provider.replace(".", "").split("/")[0]
