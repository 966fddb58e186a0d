"""Each provider that runs here, through the queue against the same provider in-process.

Starts its own Redis, llama-cpp-python's OpenAI-compatible server on a GGUF (the upstream of
proxy/openai) and one worker process serving the three models below; then, per model,
alternates N streamed chats called in-process (the provider object in this process, the
baseline) with N through the SDK, in the same run:
  - hf            tiny-noise-chat (transformers, random weights), or with `--real` the offline
                  default's SmolLM2-135M-Instruct (its transformers folder)
  - llama.cpp     tiny-noise-chat.gguf, or with `--real` SmolLM2-135M-Instruct.Q4_1.gguf
  - proxy/openai  the same GGUF behind llama_cpp.server
Prints time to first token (p50) and tokens/s (completion tokens / total time, median) for
both, and the ratios.

    .venv/bin/python scripts/bench_providers.py [--n 50] [--max-tokens 64] [--real]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
from benchkit import (
    MESSAGES,
    MODEL,
    MODELS,
    REAL_MODEL,
    ROOT,
    chat_toml,
    free_port,
    make_models,
    percentile,
    worker_stack,
)

from smmf_queue import Client, load_config
from smmf_queue.jobs import ChatRequest
from smmf_queue.offline_models import smollm2_gguf
from smmf_queue.providers import load_provider

TINY_GGUF = MODELS / "tiny-noise-chat.gguf"
KEY = "sk-bench"


@contextmanager
def llama_server(gguf: Path) -> Iterator[str]:
    """llama_cpp.server on `gguf`; yields its /v1 URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                               "--host", "127.0.0.1", "--port", str(port), "--api_key", KEY,
                               "--model_alias", "tiny-gguf", "--n_threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=2).models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("llama_cpp.server did not start") from None
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def models_toml(hf_model: str, gguf: Path, upstream: str) -> str:
    return chat_toml(hf_model) + f"""
[[models.llms]]
name = "gguf-chat"
provider = "llama.cpp"
path = "{gguf}"
n_threads = 1

[[models.llms]]
name = "gguf-proxy"
provider = "proxy/openai"
backend = "tiny-gguf"
api_base = "{upstream}"
api_key = "{KEY}"
concurrency = 4
"""


def timed(chunks: Iterator[Any], tokens: int) -> tuple[float, float, int]:
    """(seconds to first text, total seconds, completion tokens) of consuming a stream; `tokens`
    counts when the stream reports no usage (llama_cpp.server sends none while streaming)."""
    start = time.perf_counter()
    first = None
    for chunk in chunks:
        if first is None and chunk.text:
            first = time.perf_counter()
        if chunk.usage is not None and chunk.usage.completion_tokens:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def upstream_tokens(upstream: str, max_tokens: int) -> int:
    """Completion tokens of the benchmark's request, from the server's non-streamed answer
    (temperature 0: the streamed replies are the same text)."""
    reply = openai.OpenAI(base_url=upstream, api_key=KEY).chat.completions.create(
        model="tiny-gguf", messages=MESSAGES, temperature=0, max_tokens=max_tokens)  # type: ignore[arg-type]
    return reply.usage.completion_tokens if reply.usage else 0


def bench(config_path: Path, client: Client, model: str, n: int, max_tokens: int,
          tokens: int) -> dict[str, list[Any]]:
    provider = load_provider(load_config(config_path).model(model))
    provider.check_hardware()
    provider.load()
    params = {"max_tokens": max_tokens, "temperature": 0}
    runs: dict[str, list[Any]] = {"local": [], "queue": []}
    for i in range(n + 3):
        request = ChatRequest(model=model, messages=MESSAGES, params=params)
        local = timed(provider.stream_chat(request), tokens)
        queued = timed(client.stream_chat(model, MESSAGES, **params), tokens)
        if i >= 3:  # warm-up
            runs["local"].append(local)
            runs["queue"].append(queued)
    return runs


def row(name: str, runs: list[tuple[float, float, int]]) -> tuple[float, float]:
    ttft = percentile([r[0] for r in runs], 50) * 1000
    rate = statistics.median(r[2] / r[1] for r in runs if r[1] > 0)
    print(f"  {name:<12} first token p50 {ttft:8.2f} ms   {rate:9.0f} tokens/s")
    return ttft, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M-Instruct instead of the tiny random-weight models")
    args = parser.parse_args()
    make_models()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(TINY_GGUF)],
                   check=True, capture_output=True)
    hf_model, gguf = (REAL_MODEL, smollm2_gguf()) if args.real else (MODEL, TINY_GGUF)
    served = [hf_model, "gguf-chat", "gguf-proxy"]
    print(f"{args.n} streamed chats of up to {args.max_tokens} tokens per model, temperature 0, "
          f"{os.cpu_count()} cores; in-process = the provider called in this process; "
          f"GGUF {gguf.name}")
    with llama_server(gguf) as upstream, \
            worker_stack(models_toml(hf_model, gguf, upstream), served) as (config_path, _), \
            Client(config_path) as client:
        proxy_tokens = upstream_tokens(upstream, args.max_tokens)
        for model in served:
            tokens = proxy_tokens if model == "gguf-proxy" else 0
            runs = bench(config_path, client, model, args.n, args.max_tokens, tokens)
            provider = load_config(config_path).model(model).provider
            print(f"{model} ({provider})")
            local_ttft, local_rate = row("in-process", runs["local"])
            queue_ttft, queue_rate = row("queue", runs["queue"])
            print(f"  added first-token latency {queue_ttft - local_ttft:.2f} ms; "
                  f"tokens/s ratio queue/in-process {queue_rate / local_rate:.2f}")


if __name__ == "__main__":
    main()
