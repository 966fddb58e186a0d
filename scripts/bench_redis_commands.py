"""Redis commands per streamed chat, counted by Redis itself (`INFO commandstats`, which counts
the commands run inside scripts too), split into a fixed part per job and a part per event the
worker writes (issue #20's targets: at most 12 per job and 3 per event).

    .venv/bin/python scripts/bench_redis_commands.py [--n 100]

One worker for `tiny-noise-chat` on a private Redis; N chats of 1 token, then N of 32 tokens,
through the SDK one after another. Commands per job and events per job (each job's event log
length, read after the count) in the two groups give the two parts. What the stack does while
idle (heartbeats, kombu's restore and polling) is measured over a quiet spell of the same
length and taken off first. Prints the split and, for the 32-token group, commands per job by
name.
"""

from __future__ import annotations

import argparse
import time
import uuid

import redis
from benchkit import MESSAGES, MODEL, chat_stack

from smmf_queue import Client, keys


def counts(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last reset (EVALSHA's own call included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def run_group(client: redis.Redis, sdk: Client, n: int, max_tokens: int) -> tuple[dict[str, int], float, int]:
    """(commands by name, seconds, events) of n chats of `max_tokens` tokens."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    client.config_resetstat()
    started = time.perf_counter()
    for job_id in ids:
        for _ in sdk.stream_chat(MODEL, MESSAGES, max_tokens=max_tokens, temperature=0, job_id=job_id):
            pass
    seconds = time.perf_counter() - started
    commands = counts(client)
    events = sum(int(client.xlen(keys.event_log(job_id))) for job_id in ids)
    return commands, seconds, events


def idle_rate(client: redis.Redis, seconds: float) -> dict[str, float]:
    """Commands per second by name while no job runs."""
    client.config_resetstat()
    time.sleep(seconds)
    return {name: calls / seconds for name, calls in counts(client).items()}


def per_job(commands: dict[str, int], idle: dict[str, float], seconds: float, n: int) -> dict[str, float]:
    return {name: max(0.0, (calls - idle.get(name, 0.0) * seconds)) / n for name, calls in commands.items()
            if name not in ("config|resetstat", "info")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    with chat_stack() as (config_path, server), Client(config_path) as sdk:
        client = redis.Redis.from_url(server.url)
        run_group(client, sdk, 10, 4)  # warm-up: scripts loaded, connections open
        short, short_s, short_events = run_group(client, sdk, args.n, 1)
        long, long_s, long_events = run_group(client, sdk, args.n, 32)
        idle = idle_rate(client, max(short_s, long_s))
    short_job, long_job = per_job(short, idle, short_s, args.n), per_job(long, idle, long_s, args.n)
    c1, c2 = sum(short_job.values()), sum(long_job.values())
    e1, e2 = short_events / args.n, long_events / args.n
    per_event = (c2 - c1) / (e2 - e1)
    fixed = c1 - per_event * e1
    print(f"{args.n} streamed chats of 1 token ({e1:.1f} events each) and of 32 tokens ({e2:.1f} events "
          f"each), one worker; idle traffic ({sum(idle.values()):.1f} commands/s) taken off")
    print(f"commands per job: {c1:.1f} (1 token), {c2:.1f} (32 tokens)")
    print(f"fixed per job {fixed:.1f} + {per_event:.2f} per event (targets: at most 12 and 3)")
    print("per job of 32 tokens, by command:")
    for name, calls in sorted(long_job.items(), key=lambda item: -item[1]):
        if calls >= 0.05:
            print(f"  {name:<20} {calls:6.2f}")


if __name__ == "__main__":
    main()
