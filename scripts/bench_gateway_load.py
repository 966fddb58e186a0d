"""Streamed chats per second through one gateway process, 64 concurrent clients, from a fast
OpenAI-compatible backend; against that backend called directly, in the same run.

The backend is a FAKE of ours (Starlette under uvicorn, one process): it answers every streamed
chat with the same 16 one-word chunks at once, so the figures measure smmf-queue, not a model.
Starts its own Redis, the backend, one worker (or `--workers` of them) serving a `proxy/openai`
model with 64 slots that points at the backend, and one gateway process; then, with 64 clients
at a time (httpx):
  1. direct: streamed POSTs to the backend (its own limit on this machine, the baseline);
  2. gateway: the same POSTs to the gateway, through the queue, the worker and the backend;
  3. SDK: AsyncClient.stream_chat through the queue (no gateway).
Prints chats/s and first-token p50 for each and the ratios.

    .venv/bin/python scripts/bench_gateway_load.py [--n 2000] [--clients 64] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
from bench_gateway import run_clients, wait_healthy
from benchkit import MESSAGES, free_port, worker_stack

from smmf_queue import AsyncClient
from smmf_queue.standalone import start_process

WORDS = [f" word{i}" for i in range(16)]
MODEL = "fast-proxy"


def backend_app():  # type: ignore[no-untyped-def]
    """The fake backend: every chat gets the same 16 chunks, streamed or whole."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def chunk(delta: dict[str, str], finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                      "model": "fast", "choices": [{"index": 0, "delta": delta,
                                                                    "finish_reason": finish}]}) + "\n\n"

    async def chat(request: Request):  # type: ignore[no-untyped-def]
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": "fast",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "".join(WORDS)}}],
                                 "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}})

        async def events():  # type: ignore[no-untyped-def]
            for word in WORDS:
                yield chunk({"content": word})
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def models_toml(backend: int) -> str:
    return f"""
[[models.llms]]
name = "{MODEL}"
provider = "proxy/openai"
api_base = "http://127.0.0.1:{backend}/v1"
api_key = "unused"
concurrency = 64
max_retries = 0
"""


async def load(one_chat: Callable[[], Awaitable[float]], n: int, clients: int) -> tuple[float, float]:
    """(chats per second, first-token p50 in ms) of n chats, `clients` at a time."""
    ttfts, rate = await run_clients(one_chat, n, clients)
    return rate, sorted(ttfts)[len(ttfts) // 2] * 1000


def streamed_post(http: httpx.AsyncClient, path: str, model: str) -> Callable[[], Awaitable[float]]:
    body = {"model": model, "messages": MESSAGES, "stream": True, "max_tokens": 16}

    async def chat() -> float:
        start = time.perf_counter()
        first = 0.0
        async with http.stream("POST", path, json=body) as response:
            async for line in response.aiter_lines():
                if not first and '"content":' in line and '"content":""' not in line:
                    first = time.perf_counter() - start
        return first

    return chat


async def measure(backend: int, gateway: int, config: str, n: int, clients: int) -> dict[str, tuple[float, float]]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    direct = httpx.AsyncClient(base_url=f"http://127.0.0.1:{backend}", timeout=60, limits=limits)
    through = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway}", timeout=60, limits=limits)
    await wait_healthy(through)
    sdk = AsyncClient(config)

    async def sdk_chat() -> float:
        start = time.perf_counter()
        first = 0.0
        async for delta in sdk.stream_chat(MODEL, MESSAGES, max_tokens=16):
            if not first and delta.text:
                first = time.perf_counter() - start
        return first

    paths = {"direct": streamed_post(direct, "/v1/chat/completions", "fast"),
             "gateway": streamed_post(through, "/v1/chat/completions", MODEL), "SDK": sdk_chat}
    for chat in paths.values():  # warm-up
        await load(chat, clients * 2, clients)
    results = {}
    for name, chat in paths.items():  # each row as soon as it is measured (a run may be cut short)
        rate, ttft = results[name] = await load(chat, n, clients)
        print(f"  {name:<8} {rate:8.1f} chats/s   first token p50 {ttft:8.2f} ms", flush=True)
    await direct.aclose()
    await through.aclose()
    await sdk.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="worker processes for the model")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        import uvicorn
        uvicorn.run(backend_app(), host="127.0.0.1", port=args.backend, log_level="warning")
        return
    backend_port, gateway_port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, __file__, "--backend", str(backend_port)])
    try:
        with worker_stack(models_toml(backend_port), [MODEL], f"[gateway]\nport = {gateway_port}\n",
                          workers=args.workers) as (config, _):
            gateway = start_process("gateway", config, config.with_name("gateway.log"))
            print(f"{args.n} streamed chats of 16 chunks per row, {args.clients} clients at a time, "
                  f"{args.workers} worker process(es), {os.cpu_count()} cores; backend: a fast FAKE "
                  "(Starlette, one process)", flush=True)
            try:
                results = asyncio.run(measure(backend_port, gateway_port, str(config), args.n, args.clients))
            finally:
                gateway.terminate()
                gateway.wait(timeout=15)
    finally:
        backend.terminate()
        backend.wait(timeout=15)
    direct_rate = results["direct"][0]
    print(f"ratios to direct: gateway {results['gateway'][0] / direct_rate:.2f}x, "
          f"SDK {results['SDK'][0] / direct_rate:.2f}x (project target: gateway >= 400 chats/s)")


if __name__ == "__main__":
    main()
