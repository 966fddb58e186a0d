"""Streamed chats per second through one gateway process, 64 concurrent clients, from a fast
OpenAI-compatible backend; against that backend called directly, in the same run.

The backend is a FAKE of ours (Starlette under uvicorn, one process): it answers every streamed
chat with the same 16 one-word chunks at once (and every embedding with the same vector), so the
figures measure smmf-queue, not a model.
Starts its own Redis, the backend, `--workers` worker processes serving a `proxy/openai` model
with 64 slots each that points at the backend, and `--gateways` gateway processes; then, with
64 clients at a time (httpx), spread over `--client-procs` load processes:
  1. direct: streamed POSTs to the backend (its own limit on this machine, the baseline);
  2. gateway: the same POSTs to the gateways (clients take them in turn), through the queue, the
     worker and the backend;
  3. SDK: AsyncClient.stream_chat through the queue (no gateway).
Prints chats/s and first-token p50 for each and the ratios. `--curve` measures the scale-out
curve instead: workers 1, 2, 4 by gateways 1, 2, each as a ratio to the direct rate of the run.
`--virtual-key` measures what a virtual key costs instead (virtual_keys.py: the admission
script, rpm and tpm counted, usage settled): pairs of chats through one gateway, one with its
static key and one with a virtual key, back to back (which goes first alternates), `--n` pairs
per block, `--rounds` blocks; the median of the pairs' first-token differences, per block and
over all. Pairing chat by chat cancels the machine's drift, which moved whole rows of each
key by more than the 0.3 ms target (sessions 11 to 17).

    .venv/bin/python scripts/bench_gateway_load.py [--n 2000] [--clients 64] [--workers 1]
        [--gateways 1] [--client-procs 1] [--curve | --virtual-key [--rounds 3]]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from bench_gateway import run_clients, wait_healthy
from benchkit import MESSAGES, free_port, worker_stack

from smmf_queue import AsyncClient
from smmf_queue.standalone import start_process

WORDS = [f" word{i}" for i in range(16)]
#: the vector the FAKE backend answers for every text (OpenAI's text-embedding-3-small's size).
EMBEDDING = [round((i % 97) / 97 - 0.5, 6) for i in range(1536)]
#: the same, as OpenAI sends it when asked for `encoding_format: base64` (little-endian float32).
EMBEDDING_B64 = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
MODEL = "fast-proxy"
#: the gateways' static API key, and their master key (with which virtual keys are served).
STATIC_KEY, MASTER_KEY = "bench-static-key", "bench-master-key"


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

    async def embeddings(request: Request):  # type: ignore[no-untyped-def]
        body = await request.json()
        texts = body["input"]
        vector = EMBEDDING_B64 if body.get("encoding_format") == "base64" else EMBEDDING
        return JSONResponse({"object": "list", "model": "fast",
                             "data": [{"object": "embedding", "index": i, "embedding": vector}
                                      for i in range(len(texts))],
                             "usage": {"prompt_tokens": 4 * len(texts), "total_tokens": 4 * len(texts)}})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/embeddings", embeddings, methods=["POST"])])


def models_toml(backend: int) -> str:
    return f"""
[gateway]
api_keys = ["{STATIC_KEY}"]

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


def sdk_chat(sdk: AsyncClient) -> Callable[[], Awaitable[float]]:
    async def chat() -> float:
        start = time.perf_counter()
        first = 0.0
        async for delta in sdk.stream_chat(MODEL, MESSAGES, max_tokens=16):
            if not first and delta.text:
                first = time.perf_counter() - start
        return first

    return chat


def in_turn(chats: list[Callable[[], Awaitable[float]]]) -> Callable[[], Awaitable[float]]:
    """One chat function that sends each call to the next of `chats` (clients spread over gateways)."""
    turn = iter(range(1 << 62))

    async def chat() -> float:
        return await chats[next(turn) % len(chats)]()

    return chat


async def load_path(path: str, ports: list[int], config: str, n: int, clients: int,
                    warm_up: bool = True) -> tuple[list[float], float, float]:
    """(first-token times, start, end on the monotonic clock) of n chats on one path:
    "direct" to the backend at ports[0], "gateway" over the gateways at `ports`, or "SDK"."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    https = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits,
                               headers={"Authorization": f"Bearer {STATIC_KEY}"}) for port in ports]
    sdk = AsyncClient(config) if path == "SDK" else None
    if sdk is not None:
        chat = sdk_chat(sdk)
    elif path == "direct":
        chat = streamed_post(https[0], "/v1/chat/completions", "fast")
    else:
        chat = in_turn([streamed_post(http, "/v1/chat/completions", MODEL) for http in https])
    try:
        if warm_up:
            await run_clients(chat, clients * 2, clients)
        start = time.monotonic()
        ttfts, _ = await run_clients(chat, n, clients)
        return ttfts, start, time.monotonic()
    finally:
        for http in https:
            await http.aclose()
        if sdk is not None:
            await sdk.aclose()


def _load_process(args: tuple, ready: multiprocessing.Barrier, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One load process: warm up, wait for the others, measure, report."""
    path, ports, config, n, clients = args

    async def run() -> tuple[list[float], float, float]:
        await load_path(path, ports, config, clients * 2, clients, warm_up=False)
        ready.wait()
        return await load_path(path, ports, config, n, clients, warm_up=False)

    results.put(asyncio.run(run()))


def measure_path(path: str, ports: list[int], config: str, n: int, clients: int,
                 procs: int) -> tuple[float, float]:
    """(chats per second, first-token p50 in ms) of n chats on `path`, spread over `procs` load
    processes (one asyncio loop each) started together; the rate counts from the first start to
    the last end."""
    if procs == 1:
        ttfts, start, end = asyncio.run(load_path(path, ports, config, n, clients))
        return n / (end - start), sorted(ttfts)[len(ttfts) // 2] * 1000
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(procs), context.Queue()
    share = (path, ports, config, n // procs, max(1, clients // procs))
    children = [context.Process(target=_load_process, args=(share, ready, results)) for _ in range(procs)]
    for child in children:
        child.start()
    runs = [results.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    ttfts = sorted(t for run in runs for t in run[0])
    start, end = min(run[1] for run in runs), max(run[2] for run in runs)
    return len(ttfts) / (end - start), ttfts[len(ttfts) // 2] * 1000


@contextmanager
def gateways(config: Path, count: int) -> Iterator[list[int]]:
    """`count` gateway processes on free ports of one config (their ports)."""
    ports = [free_port() for _ in range(count)]
    processes = [start_process("gateway", config, config.with_name(f"gateway{i}.log"), "--port", str(port))
                 for i, port in enumerate(ports)]
    try:
        for port in ports:
            asyncio.run(_healthy(port))
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)


async def _healthy(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        await wait_healthy(http)


def row(name: str, rate: float, ttft: float, direct: float | None = None) -> None:
    ratio = f"   {rate / direct:5.2f}x direct" if direct else ""
    print(f"  {name:<26} {rate:8.1f} chats/s   first token p50 {ttft:8.2f} ms{ratio}", flush=True)


@contextmanager
def fake_backend() -> Iterator[int]:
    """The FAKE backend in its own process (its port)."""
    port = free_port()
    backend = subprocess.Popen([sys.executable, __file__, "--backend", str(port)])
    try:
        yield port
    finally:
        backend.terminate()
        backend.wait(timeout=15)


def one_stack(args: argparse.Namespace, backend: int) -> None:
    """direct, gateway and SDK rows for one stack of args.workers workers and args.gateways gateways."""
    with ExitStack() as stack:
        config, _ = stack.enter_context(worker_stack(models_toml(backend), [MODEL], workers=args.workers))
        ports = stack.enter_context(gateways(config, args.gateways))
        print(f"{args.n} streamed chats of 16 chunks per row, {args.clients} clients at a time in "
              f"{args.client_procs} load process(es), {args.workers} worker process(es), "
              f"{args.gateways} gateway process(es), {os.cpu_count()} cores; backend: a fast FAKE "
              "(Starlette, one process)", flush=True)
        rates = {}
        for path, at in (("direct", [backend]), ("gateway", ports), ("SDK", ports)):
            rates[path] = measure_path(path, at, str(config), args.n, args.clients, args.client_procs)
            row(path, *rates[path], rates["direct"][0] if path != "direct" else None)
    print("project target: gateway >= 400 chats/s (judged on a 16-core host)")


def curve(args: argparse.Namespace, backend: int) -> None:
    """The scale-out curve: gateway and SDK rates for workers 1, 2, 4 by gateways 1, 2, each as a
    ratio to the direct rate measured first in the same run."""
    print(f"scale-out: {args.n} streamed chats of 16 chunks per row, {args.clients} clients at a time "
          f"in {args.client_procs} load process(es), {os.cpu_count()} cores; backend: a fast FAKE", flush=True)
    direct = None
    for workers in (1, 2, 4):
        for count in (1, 2):
            with ExitStack() as stack:
                config, _ = stack.enter_context(worker_stack(models_toml(backend), [MODEL], workers=workers))
                ports = stack.enter_context(gateways(config, count))
                if direct is None:
                    direct = measure_path("direct", [backend], str(config), args.n, args.clients, args.client_procs)
                    row("direct", *direct)
                rate = measure_path("gateway", ports, str(config), args.n, args.clients, args.client_procs)
                row(f"{workers} worker(s), {count} gateway(s)", *rate, direct[0])
                if count == 1:
                    rate = measure_path("SDK", ports, str(config), args.n, args.clients, args.client_procs)
                    row(f"{workers} worker(s), SDK", *rate, direct[0])


def virtual_key(args: argparse.Namespace, backend: int) -> None:
    """What a virtual key (rpm and tpm set, far above what the run uses) adds to the first token:
    the median of chat-by-chat pairs' differences against the gateway's static key."""
    import redis

    from smmf_queue.virtual_keys import KeySpec, KeyStore

    with ExitStack() as stack:
        config, server = stack.enter_context(worker_stack(models_toml(backend), [MODEL], workers=args.workers))
        [port] = stack.enter_context(gateways(config, 1))
        made = KeyStore(redis.Redis.from_url(server.url)).generate(
            KeySpec(key_alias="bench", rpm_limit=10**9, tpm_limit=10**12))
        print(f"{args.rounds} blocks of {args.n} pairs of streamed chats of 16 chunks, one with the "
              f"static key and one with a virtual key, back to back; {args.clients} client(s) at a time, "
              f"{args.workers} worker process(es), {os.cpu_count()} cores", flush=True)
        firsts: dict[str, list[float]] = {STATIC_KEY: [], made["key"]: []}
        wholes: dict[str, list[float]] = {STATIC_KEY: [], made["key"]: []}
        blocks = [asyncio.run(paired_block(port, STATIC_KEY, made["key"], args.n, args.clients,
                                           firsts, wholes))
                  for _ in range(args.rounds)]
    for number, block in enumerate(blocks, 1):
        low, middle, high = statistics.quantiles(block, n=4)
        print(f"  block {number}: added by the virtual key {middle:+.3f} ms "
              f"(pairs' quartiles {low:+.3f} to {high:+.3f})", flush=True)
    rates = [args.clients * 1000 * len(times) / sum(times) for times in wholes.values()]
    print(f"chats/s, from each key's mean chat time with {args.clients} client(s): static key "
          f"{rates[0]:.1f}, virtual key {rates[1]:.1f} ({rates[1] / rates[0]:.3f}x)")
    static, virtual = (statistics.median(times) for times in firsts.values())
    print(f"first token p50: static key {static:.2f} ms, virtual key {virtual:.2f} ms; added by the virtual "
          f"key: {statistics.median(d for block in blocks for d in block):+.3f} ms, the median of all "
          f"{sum(map(len, blocks))} pairs' differences (blocks {min(map(statistics.median, blocks)):+.3f} "
          f"to {max(map(statistics.median, blocks)):+.3f}; target: under 0.3 ms)")


async def paired_block(port: int, static_key: str, virtual_key: str, n: int, clients: int,
                       firsts: dict[str, list[float]], wholes: dict[str, list[float]]) -> list[float]:
    """n pairs of chats, one per key, back to back on each client (the first of a pair
    alternates); each pair's first-token difference in ms, the virtual key's minus the static
    key's. `firsts` and `wholes` get every chat's first token and whole time (ms), by key."""
    https = {key: httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                    headers={"Authorization": f"Bearer {key}"})
             for key in (static_key, virtual_key)}
    chats = {key: streamed_post(http, "/v1/chat/completions", MODEL) for key, http in https.items()}
    turn = iter(range(1 << 62))
    measuring = False

    async def pair() -> float:
        order = (static_key, virtual_key) if next(turn) % 2 else (virtual_key, static_key)
        took = {}
        for key in order:
            started = time.perf_counter()
            took[key] = await chats[key]() * 1000
            if measuring:
                wholes[key].append((time.perf_counter() - started) * 1000)
                firsts[key].append(took[key])
        return took[virtual_key] - took[static_key]

    try:
        await run_clients(pair, clients * 2, clients)  # warm connections and caches
        measuring = True
        differences, _ = await run_clients(pair, n, clients)
        return differences
    finally:
        for http in https.values():
            await http.aclose()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="worker processes for the model")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes")
    parser.add_argument("--client-procs", type=int, default=1, help="load-client processes")
    parser.add_argument("--curve", action="store_true", help="workers 1, 2, 4 by gateways 1, 2")
    parser.add_argument("--virtual-key", action="store_true", help="what a virtual key costs")
    parser.add_argument("--rounds", type=int, default=3, help="--virtual-key: blocks of --n pairs")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        import uvicorn
        uvicorn.run(backend_app(), host="127.0.0.1", port=args.backend, log_level="warning")
        return
    os.environ["SMMF_MASTER_KEY"] = MASTER_KEY  # inherited by the gateways
    with fake_backend() as backend:
        (curve if args.curve else virtual_key if args.virtual_key else one_stack)(args, backend)


if __name__ == "__main__":
    main()
