"""What the queue adds: streamed chats through smmf-queue against the same provider in-process.

Starts its own Redis (the bundled redis-server, free port) and one worker process for a chat
model (the tiny random-weight one, or with `--model SmolLM2-135M-Instruct` the offline default's
real model), then, in one run:
  1. in-process: the hf provider called directly (the baseline);
  2. through the queue: the SDK's stream_chat, same requests, same model;
  3. a no-op Celery round trip on the same Redis (apply_async + get), for scale;
  4. a bare Redis round trip through another process (LPUSH, that process's BRPOP and LPUSH,
     our BRPOP): the two hops through Redis that any queue with a reply adds, with no Celery.
Prints p50/p99 of time to first token and total time, the added latency and the ratios.

    .venv/bin/python scripts/bench_dispatch.py [--n 200] [--max-tokens 16] [--device cpu]
        [--model tiny-noise-chat | SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from benchkit import MESSAGES, MODEL, REAL_MODEL, chat_stack, percentile
from celery import Celery

from smmf_queue import Client, load_config
from smmf_queue.jobs import ChatRequest
from smmf_queue.providers import load_provider

#: the lists of the bare Redis round trip.
ECHO_IN, ECHO_OUT = "bench:echo:in", "bench:echo:out"


def noop_app(url: str) -> Celery:
    app = Celery("bench_noop", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                    worker_prefetch_multiplier=1, task_acks_late=True,
                    worker_hijack_root_logger=False)
    app.task(name="bench.noop")(noop)
    return app


def noop() -> None:
    """The task of the no-op round trip."""


def summary(name: str, values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    return f"{name:<34} p50 {percentile(ms, 50):7.2f} ms   p99 {percentile(ms, 99):7.2f} ms"


def timed(chunks: Iterator[Any]) -> tuple[float, float]:
    """(time to first text, total time) of consuming a stream, in seconds."""
    start = time.perf_counter()
    first = None
    for chunk in chunks:
        if first is None and chunk.text:
            first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - start


def bench_chats(config_path: Path, client: Client, model: str, n: int,
                max_tokens: int) -> dict[str, list[tuple[float, float]]]:
    """Alternate in-process and queued chats, so both see the same machine state."""
    provider = load_provider(load_config(config_path).model(model))
    provider.load()
    params = {"max_tokens": max_tokens, "temperature": 0}
    runs: dict[str, list[tuple[float, float]]] = {"local": [], "queue": []}
    for i in range(n + 5):
        request = ChatRequest(model=model, messages=MESSAGES, params=params)
        local = timed(provider.stream_chat(request))
        queued = timed(client.stream_chat(model, MESSAGES, **params))
        if i >= 5:  # warm-up
            runs["local"].append(local)
            runs["queue"].append(queued)
    return runs


def bench_noop(url: str, n: int) -> list[float]:
    app = noop_app(url)
    times = []
    for i in range(n + 5):
        start = time.perf_counter()
        app.send_task("bench.noop").get(timeout=10)
        if i >= 5:
            times.append(time.perf_counter() - start)
    return times


def echo(url: str) -> None:
    """The other process of the bare Redis round trip: hand each item straight back (until
    terminated, like the no-op worker)."""
    client = redis.Redis.from_url(url)
    while True:
        _, item = client.brpop([ECHO_IN])
        client.lpush(ECHO_OUT, item)


def bench_bare_redis(url: str, n: int) -> list[float]:
    client = redis.Redis.from_url(url)
    times = []
    for i in range(n + 5):
        start = time.perf_counter()
        client.lpush(ECHO_IN, i)
        client.brpop([ECHO_OUT], timeout=10)
        if i >= 5:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--model", default=MODEL, choices=[MODEL, REAL_MODEL],
                        help="the chat model (hf, one slot, one torch thread)")
    parser.add_argument("--noop-worker", help=argparse.SUPPRESS)
    parser.add_argument("--echo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        echo(args.echo)
        return
    if args.noop_worker:
        noop_app(args.noop_worker).worker_main(["worker", "--pool=solo", "--loglevel=WARNING",
                                                "--without-gossip", "--without-mingle"])
        return

    with chat_stack(device=args.device, model=args.model) as (config_path, server):
        noop = subprocess.Popen([sys.executable, __file__, "--noop-worker", server.url])
        try:
            with Client(config_path) as client:
                runs = bench_chats(config_path, client, args.model, args.n, args.max_tokens)
            noop_times = bench_noop(server.url, args.n)
        finally:
            noop.terminate()
            noop.wait(timeout=15)
        echoer = subprocess.Popen([sys.executable, __file__, "--echo", server.url])
        try:
            bare_times = bench_bare_redis(server.url, args.n)
        finally:
            echoer.terminate()
            echoer.wait(timeout=15)

    local_ttft, local_total = [r[0] for r in runs["local"]], [r[1] for r in runs["local"]]
    queue_ttft, queue_total = [r[0] for r in runs["queue"]], [r[1] for r in runs["queue"]]
    print(f"{args.n} streamed chats of {args.max_tokens} tokens, model {args.model} on "
          f"{args.device}, one worker, {os.cpu_count()} cores")
    print(summary("in-process provider: first token", local_ttft))
    print(summary("through the queue:   first token", queue_ttft))
    print(summary("in-process provider: total", local_total))
    print(summary("through the queue:   total", queue_total))
    print(summary("no-op Celery round trip", noop_times))
    print(summary("bare Redis round trip", bare_times))
    # Each queued chat ran right after an in-process one: the added time is taken pair by pair
    # (one p99 minus another is no p99 of anything, and came out below the p50).
    added = [(queued - local) * 1000 for queued, local in zip(queue_ttft, local_ttft)]
    added_p50, added_p99 = percentile(added, 50), percentile(added, 99)
    print(f"added time to first token, pair by pair: p50 {added_p50:.2f} ms, p99 {added_p99:.2f} ms "
          f"(target: p50 under 3 ms)")
    print(f"ratios (queue / in-process): first token p50 "
          f"{percentile(queue_ttft, 50) / percentile(local_ttft, 50):.2f}x, total p50 "
          f"{percentile(queue_total, 50) / percentile(local_total, 50):.2f}x; added TTFT p50 / no-op "
          f"Celery round trip p50 {added_p50 / (percentile(noop_times, 50) * 1000):.2f}x, / bare "
          f"Redis round trip p50 {added_p50 / (percentile(bare_times, 50) * 1000):.2f}x")


if __name__ == "__main__":
    main()
