"""Redis commands per streamed chat of a proxy model through the gateway, counted by Redis itself
(`INFO commandstats`, commands inside scripts included), by name.

    .venv/bin/python scripts/bench_proxy_commands.py [--n 300]

bench_cpu.py's stack: a private Redis, the fast FAKE OpenAI-compatible backend (16 chunks per
chat at once), one worker serving the `proxy/openai` chat model, one gateway. After 50 chats to
warm it, N streamed chats, 8 at a time; the counts are per chat and include what the idle stack
does meanwhile (heartbeats, kombu's restore). bench_redis_commands.py splits a job's commands
into fixed and per-event parts on the tiny hf model; this one shows the path of an API proxy,
whose chunks go through `providers.base.read_ahead` (the hf engine's do not).
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import redis
from bench_cpu import EMBED, embedding_toml, run_gateway, streamed_chat
from bench_gateway_ab import gateway_from
from bench_gateway_load import MODEL, fake_backend, models_toml
from benchkit import worker_stack

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    with ExitStack() as stack:
        backend = stack.enter_context(fake_backend())
        config, server = stack.enter_context(
            worker_stack(models_toml(backend) + embedding_toml(backend), [MODEL, EMBED]))
        port, _ = stack.enter_context(gateway_from(ROOT, config))
        client = redis.Redis.from_url(server.url)
        run_gateway(port, streamed_chat, 50, 8)
        client.config_resetstat()
        run_gateway(port, streamed_chat, args.n, 8)
        calls = {name.removeprefix("cmdstat_"): int(stats["calls"]) / args.n
                 for name, stats in client.info("commandstats").items()}
    print(f"{args.n} streamed chats of {MODEL} through the gateway, 8 at a time, one worker; "
          f"idle traffic included")
    print(f"per chat: {sum(calls.values()):.2f} commands: "
          + ", ".join(f"{name} {count:.2f}" for name, count in sorted(calls.items(), key=lambda kv: -kv[1])
                      if count >= 0.05))


if __name__ == "__main__":
    main()
