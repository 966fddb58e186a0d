"""Chats through the OpenAI-compatible gateway, against the SDK and the in-process provider.

Starts its own Redis (free port), one worker for tiny-noise-chat (hf, one slot) and one gateway
process, then in one run measures, for 1 and for 16 concurrent clients: time to first token and
completed streamed chats per second
  - in-process: the hf provider called directly (one model instance: callers take turns);
  - SDK: AsyncClient.stream_chat through the queue;
  - gateway: streaming POST /v1/chat/completions (httpx) through the gateway and the queue.

    .venv/bin/python scripts/bench_gateway.py [--n 120] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
from benchkit import MESSAGES, MODEL, chat_stack, free_port

from smmf_queue import AsyncClient, load_config
from smmf_queue.jobs import ChatRequest
from smmf_queue.providers import load_provider
from smmf_queue.standalone import start_process

KEY = "bench-key"


def p50(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] * 1000


async def wait_healthy(http: httpx.AsyncClient) -> None:
    """Until the gateway behind `http` answers /healthz with 200."""
    while True:
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)


async def run_clients(one_chat, n: int, clients: int) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """Run n chats with `clients` at a time; (first-token times, chats per second)."""
    ttfts: list[float] = []
    pending = iter(range(n))

    async def client_loop() -> None:
        for _ in pending:
            ttfts.append(await one_chat())

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return ttfts, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    gateway_port = free_port()
    with chat_stack(f'[gateway]\nport = {gateway_port}\napi_keys = ["{KEY}"]') as (config_path, _):
        gateway = start_process("gateway", config_path, config_path.with_name("gateway.log"))
        try:
            results = asyncio.run(measure(config_path, gateway_port, args.n, args.max_tokens))
        finally:
            gateway.terminate()
            gateway.wait(timeout=15)
    print(f"{args.n} streamed chats of {args.max_tokens} tokens per row, model {MODEL}, "
          f"one worker (one slot), {os.cpu_count()} cores")
    print(f"{'path':<12}{'clients':>8}{'TTFT p50 ms':>14}{'chats/s':>10}")
    for (path, clients), (ttft, rate) in results.items():
        print(f"{path:<12}{clients:>8}{ttft:>14.2f}{rate:>10.1f}")
    for clients in (1, 16):
        local, sdk, gw = (results[(p, clients)] for p in ("in-process", "SDK", "gateway"))
        print(f"{clients} clients: gateway adds {gw[0] - local[0]:.2f} ms TTFT p50 over in-process "
              f"({gw[0] - sdk[0]:.2f} ms over the SDK); chats/s gateway/in-process "
              f"{gw[1] / local[1]:.2f}x, gateway/SDK {gw[1] / sdk[1]:.2f}x")


async def measure(config_path: Path, port: int, n: int,
                  max_tokens: int) -> dict[tuple[str, int], tuple[float, float]]:
    config = load_config(config_path)
    provider = load_provider(config.model(MODEL))
    provider.load()
    lock = threading.Lock()
    params = {"max_tokens": max_tokens, "temperature": 0}

    def local_chat() -> float:
        start = time.perf_counter()  # waiting for the model counts, as it does in the queue
        with lock:  # one model instance, as in the worker's single slot
            first = None
            for chunk in provider.stream_chat(ChatRequest(model=MODEL, messages=MESSAGES, params=params)):
                if first is None and chunk.text:
                    first = time.perf_counter() - start
            return first or 0.0

    async def in_process() -> float:
        return await asyncio.to_thread(local_chat)

    sdk = AsyncClient(config)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                             headers={"Authorization": f"Bearer {KEY}"},
                             limits=httpx.Limits(max_connections=64))
    await wait_healthy(http)

    async def through_sdk() -> float:
        start = time.perf_counter()
        first = None
        async for delta in sdk.stream_chat(MODEL, MESSAGES, **params):
            if first is None and delta.text:
                first = time.perf_counter() - start
        return first or 0.0

    async def through_gateway() -> float:
        start = time.perf_counter()
        first = None
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, **params}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter() - start
        return first or 0.0

    results: dict[tuple[str, int], tuple[float, float]] = {}
    for chat in (in_process, through_sdk, through_gateway):  # warm-up
        for _ in range(5):
            await chat()
    for clients in (1, 16):
        for path, chat in (("in-process", in_process), ("SDK", through_sdk),
                           ("gateway", through_gateway)):
            ttfts, rate = await run_clients(chat, n, clients)
            results[(path, clients)] = (p50(ttfts), rate)
    await sdk.aclose()
    await http.aclose()
    return results


if __name__ == "__main__":
    main()
