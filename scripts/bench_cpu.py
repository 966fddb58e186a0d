"""Server CPU per streamed chat and per embedding request through the gateway, against a bare
Celery round trip carrying the same call, measured in the same run (issue #20's ratios).

Starts a private Redis, the FAKE backend of bench_gateway_load.py (16 chunks at once; the same
vector for every text), one worker process serving `fast-proxy` and `fast-embed` (proxy/openai
to that backend), one gateway process, and a bare Celery worker (Celery's defaults, threads
pool, a Redis result backend) whose two tasks
make the same calls through the same providers (ours, loaded from the same config): the streamed
chat, collected, and the embedding of the same 16 texts, each returned through Celery's Redis
result backend to a caller waiting in `.get()`. Then, `--rounds` times, each path in turn:
`--n` requests, `--clients` at a time (HTTP clients on an event loop for the gateway, as many
caller processes for Celery), and the CPU time (user + system, from /proc) that the path's
server processes spent: gateway + worker + Redis, or Celery worker + Redis. What each process
does while idle (heartbeats, polling) is measured over a quiet spell and taken off. Prints CPU
per request for each path, the gateway's share, and the ratios, and for reference what the
providers' own calls cost in this process and what the HTTP part alone costs: the HTTP floor,
a FastAPI app on uvicorn (the gateway's framework, parser and loop) that validates the same
request body with the gateway's own model and streams back, in as many writes and through the
gateway's own response class, the bytes the gateway sent for one chat, with no queue behind
it. A ratio is taken within each round (our path against the bare path measured just before
it) and the median of those is printed with each round's: the machine's speed drifts between
rounds, and a ratio of two medians mixes rounds.

    .venv/bin/python scripts/bench_cpu.py [--n 400] [--clients 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis
from bench_gateway import run_clients
from bench_gateway_load import MODEL, STATIC_KEY, _healthy, fake_backend, models_toml
from benchkit import MESSAGES, free_port, worker_stack
from celery import Celery

from smmf_queue import registry
from smmf_queue.gateway_models import ChatCompletionRequest
from smmf_queue.gateway_sse import EventStream
from smmf_queue.standalone import start_process

EMBED = "fast-embed"
TEXTS = [f"sentence number {i} about {'queues' if i % 2 else 'cats'}" for i in range(16)]
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
#: seconds of the quiet spell over which idle CPU is measured.
IDLE_S = 5.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_s(pid) for name, pid in pids.items()}


def bare_app(url: str) -> Celery:
    """The bare Celery baseline: the same two calls as plain tasks, results in Redis."""
    app = Celery("bench_bare", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                    worker_prefetch_multiplier=1, task_acks_late=True, worker_hijack_root_logger=False)
    app.task(name="bench.chat")(bare_chat)
    app.task(name="bench.embed")(bare_embed)
    return app


_providers: dict[str, Any] = {}
_loading = threading.Lock()


def provider(config_path: str, model: str) -> Any:
    """Our provider of `model`, loaded once per bare worker: the bare path makes the very call
    the worker makes, so the difference is what the queue, the worker and the gateway add."""
    with _loading:
        if model not in _providers:
            from smmf_queue import load_config
            from smmf_queue.providers import load_provider
            loaded = load_provider(load_config(config_path).model(model))
            loaded.load()
            _providers[model] = loaded
    return _providers[model]


def bare_chat(config_path: str) -> str:
    """The task of the bare chat: the provider's streamed reply, collected."""
    from smmf_queue.jobs import ChatRequest
    request = ChatRequest(model=MODEL, messages=MESSAGES, params={"max_tokens": 16})
    return "".join(chunk.text for chunk in provider(config_path, MODEL).stream_chat(request))


def bare_embed(config_path: str, texts: list[str]) -> list[list[float]]:
    """The task of the bare embedding: the provider's vectors, as JSON lists."""
    import numpy as np
    return np.asarray(provider(config_path, EMBED).embed(texts, None).vectors).tolist()  # type: ignore[no-any-return]


def _bare_caller(url: str, task: str, args: list[Any], n: int, ready: Any) -> None:
    """One caller process of the bare path: n round trips, one after another."""
    app = bare_app(url)
    app.send_task(task, args=args).get(timeout=60)
    ready.wait()
    for _ in range(n):
        app.send_task(task, args=args).get(timeout=60)


def run_bare(url: str, task: str, args: list[Any], n: int, clients: int) -> None:
    """n round trips of `task`, `clients` caller processes at a time."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(clients + 1)
    callers = [context.Process(target=_bare_caller, args=(url, task, args, n // clients, ready))
               for _ in range(clients)]
    for caller in callers:
        caller.start()
    ready.wait()
    for caller in callers:
        caller.join()


def run_gateway(port: int, request: Callable[[httpx.AsyncClient], Awaitable[float]], n: int,
                clients: int) -> None:
    """n requests to the gateway, `clients` at a time."""
    async def run() -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits,
                                     headers={"Authorization": f"Bearer {STATIC_KEY}"}) as http:
            await run_clients(lambda: request(http), clients, clients)  # warm connections
            await run_clients(lambda: request(http), n, clients)
    asyncio.run(run())


async def streamed_chat(http: httpx.AsyncClient) -> float:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 16}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for _ in response.aiter_lines():
            pass
        response.raise_for_status()
    return 0.0


async def embedding(http: httpx.AsyncClient) -> float:
    response = await http.post("/v1/embeddings", json={"model": EMBED, "input": TEXTS})
    response.raise_for_status()
    return 0.0


def measured(pids: dict[str, int], idle: dict[str, float], n: int, run: Callable[[], None]) -> dict[str, float]:
    """CPU ms per request of each of `pids` over `run`, each process's idle rate taken off."""
    before, started = cpu_of(pids), time.monotonic()
    run()
    seconds, after = time.monotonic() - started, cpu_of(pids)
    return {name: max(0.0, after[name] - before[name] - idle[name] * seconds) * 1000 / n for name in pids}


def idle_rates(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds per second of each process while no request runs."""
    before = cpu_of(pids)
    time.sleep(IDLE_S)
    after = cpu_of(pids)
    return {name: (after[name] - before[name]) / IDLE_S for name in pids}


@contextmanager
def running(process: subprocess.Popen[bytes]) -> Iterator[int]:
    """`process` until the block ends (its pid)."""
    try:
        yield process.pid
    finally:
        process.terminate()
        process.wait(timeout=15)


def this_script(log: Path, *args: str) -> subprocess.Popen[bytes]:
    """This script in a process of its own (a server of one path), its output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=subprocess.STDOUT)


@contextmanager
def bare_worker(url: str, config: Path, log: Path) -> Iterator[int]:
    """The bare Celery worker process (its pid), ready."""
    with running(this_script(log, "--bare-worker", url)) as pid:
        app = bare_app(url)
        app.send_task("bench.embed", args=[str(config), TEXTS[:1]]).get(timeout=120)  # loads the model
        yield pid


@contextmanager
def gateway(config: Path) -> Iterator[tuple[int, int]]:
    """One gateway process, healthy: its port and pid."""
    port = free_port()
    with running(start_process("gateway", config, config.with_name("gateway.log"), "--port", str(port))) as pid:
        asyncio.run(_healthy(port))
        yield port, pid


def record_reply(port: int, frames: Path) -> None:
    """Keep the bytes of one streamed chat through the gateway, as the reads that brought them
    (about its writes), for the HTTP floor to send back."""
    async def record() -> list[str]:
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 16}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                     headers={"Authorization": f"Bearer {STATIC_KEY}"}) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                return [chunk.decode() async for chunk in response.aiter_raw()]
    frames.write_text(json.dumps(asyncio.run(record())))


def serve_http_floor(port: int, frames: Path) -> None:
    """The HTTP floor's server: what any gateway on FastAPI and uvicorn costs per streamed chat."""
    import uvicorn
    from fastapi import FastAPI

    writes = [frame.encode() for frame in json.loads(frames.read_text())]
    app = FastAPI()

    # ChatCompletionRequest is imported at the module's top: FastAPI resolves the body's type there.
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> EventStream:
        async def reply() -> AsyncIterator[bytes]:
            for write in writes:
                yield write
        return EventStream(reply())

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", log_config=None,
                access_log=False)


@contextmanager
def http_floor(frames: Path, log: Path) -> Iterator[tuple[int, int]]:
    """The HTTP floor's server process, answering: its port and pid."""
    port = free_port()
    with running(this_script(log, "--http-floor", str(port), str(frames))) as pid:
        asyncio.run(_answering(port))
        yield port, pid


async def _answering(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        for _ in range(300):
            try:
                await streamed_chat(http)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"the HTTP floor's server on port {port} never answered")


def embedding_toml(backend: int) -> str:
    return f"""
[[models.embeddings]]
name = "{EMBED}"
provider = "proxy/openai"
api_base = "http://127.0.0.1:{backend}/v1"
api_key = "unused"
concurrency = 64
max_retries = 0
"""


def in_process(config: Path, n: int) -> dict[str, float]:
    """CPU ms per call of the two calls made by the providers in this process, one after another:
    what neither path can do without."""
    per_call = {}
    for name, call in (("chat", lambda: bare_chat(str(config))),
                       ("embedding", lambda: bare_embed(str(config), TEXTS))):
        call()
        started = time.process_time()
        for _ in range(n):
            call()
        per_call[name] = (time.process_time() - started) * 1000 / n
    return per_call


def report(name: str, rounds: list[dict[str, float]]) -> None:
    """Print the median CPU ms per request of a path, by process, and each round's total."""
    totals = [sum(row.values()) for row in rounds]
    parts = ", ".join(f"{process} {statistics.median(row[process] for row in rounds):.2f}"
                      for process in rounds[0])
    total = statistics.median(totals)
    print(f"  {name:<30} {total:6.2f} ms CPU per request ({parts}; rounds {', '.join(f'{t:.2f}' for t in totals)})")


def paired_ratios(ours: list[dict[str, float]], bare: list[dict[str, float]]) -> str:
    """The median of the rounds' ratios (each round's path against its bare path), and each."""
    ratios = [sum(row.values()) / sum(base.values()) for row, base in zip(ours, bare)]
    return (f"{statistics.median(ratios):.2f}x (median of the rounds' ratios: "
            f"{', '.join(f'{ratio:.2f}' for ratio in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="requests per path per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    parser.add_argument("--http-floor", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.http_floor:
        serve_http_floor(int(args.http_floor[0]), Path(args.http_floor[1]))
        return
    if args.bare_worker:
        bare_app(args.bare_worker).worker_main(["worker", "--pool=threads", "--concurrency=64",
                                                "--loglevel=WARNING", "--without-gossip",
                                                "--without-mingle"])
        return
    with ExitStack() as stack:
        backend = stack.enter_context(fake_backend())
        config, server = stack.enter_context(
            worker_stack(models_toml(backend) + embedding_toml(backend), [MODEL, EMBED]))
        port, gateway_pid = stack.enter_context(gateway(config))
        bare_pid = stack.enter_context(bare_worker(server.url, config, config.with_name("bare.log")))
        record_reply(port, config.with_name("frames.json"))
        floor_port, floor_pid = stack.enter_context(
            http_floor(config.with_name("frames.json"), config.with_name("floor.log")))
        [worker_pid] = [w.pid for w in registry.live_workers(redis.Redis.from_url(server.url))]
        assert server.process is not None
        ours = {"gateway": gateway_pid, "worker": worker_pid, "redis": server.process.pid}
        bare = {"celery worker": bare_pid, "redis": server.process.pid}
        floor = {"http floor": floor_pid}
        idle = idle_rates({**ours, **bare, **floor})
        paths: dict[str, tuple[dict[str, int], Callable[[], None]]] = {
            "chat, bare Celery": (bare, lambda: run_bare(server.url, "bench.chat", [str(config)], args.n, args.clients)),
            "chat, gateway": (ours, lambda: run_gateway(port, streamed_chat, args.n, args.clients)),
            "chat, HTTP floor": (floor, lambda: run_gateway(floor_port, streamed_chat, args.n, args.clients)),
            "embedding, bare Celery": (bare, lambda: run_bare(server.url, "bench.embed", [str(config), TEXTS], args.n, args.clients)),
            "embedding, gateway": (ours, lambda: run_gateway(port, embedding, args.n, args.clients)),
        }
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        provider_only = []
        for _ in range(args.rounds):
            for name, (pids, run) in paths.items():
                rounds[name].append(measured(pids, {p: idle[p] for p in pids}, args.n, run))
            provider_only.append(in_process(config, args.n // 4))
    print(f"{args.n} requests per path and round, {args.clients} at a time, {args.rounds} rounds, "
          f"{os.cpu_count()} cores; a fast FAKE backend: chats of 16 chunks, embeddings of 16 texts "
          f"(1536 numbers each) through proxy/openai; idle CPU taken off")
    for call in ("chat", "embedding"):
        print(f"  {call + ', the provider alone':<30} {statistics.median(r[call] for r in provider_only):6.2f} "
              "ms CPU per call (in this process, one after another)")
    for name, rows in rounds.items():
        report(name, rows)
    gateway_share = statistics.median(row["gateway"] for row in rounds["chat, gateway"])
    print(f"chat: gateway path / bare Celery {paired_ratios(rounds['chat, gateway'], rounds['chat, bare Celery'])} "
          f"(target: at most 1.5x); the gateway's share {gateway_share:.2f} ms (target: at most 1 ms)")
    shares = [{"gateway": row["gateway"]} for row in rounds["chat, gateway"]]
    floor_ms = statistics.median(row["http floor"] for row in rounds["chat, HTTP floor"])
    print(f"chat: the gateway's share / the HTTP floor {paired_ratios(shares, rounds['chat, HTTP floor'])}; "
          f"the floor {floor_ms:.2f} ms, the gateway {gateway_share - floor_ms:.2f} ms over it")
    print(f"embedding: gateway path / bare Celery "
          f"{paired_ratios(rounds['embedding, gateway'], rounds['embedding, bare Celery'])} (target: at most 1.2x)")


if __name__ == "__main__":
    main()
