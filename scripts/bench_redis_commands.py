"""Redis commands per streamed chat and per embedding job, counted by Redis itself (`INFO
commandstats`, which counts the commands run inside scripts too), split into a fixed part per
job and a part per event the worker writes (issue #20's targets: at most 12 per job and 3 per
event).

    .venv/bin/python scripts/bench_redis_commands.py [--n 100]

One worker for `tiny-noise-chat` and all-MiniLM-L6-v2 on a private Redis; N chats of 1 token,
then N of 32 tokens, then N embedding requests of 16 texts, through the SDK one after another.
Commands per job and events per job (each job's event log length, read after the count) in the
two chat groups give the two parts; an embedding job's fixed part is what it takes beyond its
events at the chats' rate per event. What the stack does while idle (heartbeats, kombu's
restore and polling) is measured over a quiet spell of the same length and taken off first.
Prints the splits and, for the 32-token chats and the embeddings, commands per job by name;
then what Redis holds for one more job of each (`MEMORY USAGE` of its keys, and their TTLs).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import redis
from benchkit import EMBEDDING_MODEL, EMBEDDING_TOML, MESSAGES, MODEL, chat_toml, make_models, worker_stack

from smmf_queue import Client, keys


def counts(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last reset (EVALSHA's own call included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


TEXTS = [f"text number {i} about queues" for i in range(16)]


def chats(sdk: Client, max_tokens: int) -> Callable[[str], None]:
    """One streamed chat of `max_tokens` tokens, read to its end."""
    def run(job_id: str) -> None:
        for _ in sdk.stream_chat(MODEL, MESSAGES, max_tokens=max_tokens, temperature=0, job_id=job_id):
            pass
    return run


def embeddings(sdk: Client) -> Callable[[str], None]:
    """One embedding request of 16 texts."""
    def run(job_id: str) -> None:
        sdk.embed(EMBEDDING_MODEL, TEXTS, job_id=job_id)
    return run


def run_group(client: redis.Redis, job: Callable[[str], None], n: int) -> tuple[dict[str, int], float, int]:
    """(commands by name, seconds, events) of n jobs run one after another."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    client.config_resetstat()
    started = time.perf_counter()
    for job_id in ids:
        job(job_id)
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


def memory(client: redis.Redis, job: Callable[[str], None]) -> str:
    """Run one more job; what Redis holds for it (MEMORY USAGE of its keys, and their TTLs)."""
    job_id = uuid.uuid4().hex
    job(job_id)
    held = {"event log": keys.event_log(job_id), "record": keys.job_record(job_id),
            "Celery result": f"celery-task-meta-{job_id}"}
    return ", ".join(f"{name} {client.memory_usage(key) or 0:,} B for {client.ttl(key)} s"
                     for name, key in held.items())


def print_by_name(title: str, job: dict[str, float]) -> None:
    print(title)
    for name, calls in sorted(job.items(), key=lambda item: -item[1]):
        if calls >= 0.05:
            print(f"  {name:<20} {calls:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    make_models()
    with worker_stack(chat_toml() + EMBEDDING_TOML, [MODEL, EMBEDDING_MODEL]) as (config_path, server), \
            Client(config_path) as sdk:
        client = redis.Redis.from_url(server.url)
        run_group(client, chats(sdk, 4), 10)  # warm-up: scripts loaded, connections open
        run_group(client, embeddings(sdk), 10)
        short, short_s, short_events = run_group(client, chats(sdk, 1), args.n)
        long, long_s, long_events = run_group(client, chats(sdk, 32), args.n)
        embed, embed_s, embed_events = run_group(client, embeddings(sdk), args.n)
        idle = idle_rate(client, max(short_s, long_s, embed_s))
        held = {"chat of 32 tokens": memory(client, chats(sdk, 32)), "embedding": memory(client, embeddings(sdk))}
    short_job, long_job = per_job(short, idle, short_s, args.n), per_job(long, idle, long_s, args.n)
    embed_job = per_job(embed, idle, embed_s, args.n)
    c1, c2, c3 = sum(short_job.values()), sum(long_job.values()), sum(embed_job.values())
    e1, e2, e3 = short_events / args.n, long_events / args.n, embed_events / args.n
    per_event = (c2 - c1) / (e2 - e1)
    fixed = c1 - per_event * e1
    print(f"{args.n} streamed chats of 1 token ({e1:.1f} events each) and of 32 tokens ({e2:.1f} events "
          f"each), {args.n} embedding requests of {len(TEXTS)} texts ({e3:.1f} events each), one worker; "
          f"idle traffic ({sum(idle.values()):.1f} commands/s) taken off")
    print(f"commands per job: {c1:.1f} (1 token), {c2:.1f} (32 tokens), {c3:.1f} (embedding)")
    print(f"chat: fixed per job {fixed:.1f} + {per_event:.2f} per event (targets: at most 12 and 3)")
    print(f"embedding: fixed per job {c3 - per_event * e3:.1f} + {per_event:.2f} per event")
    print_by_name("per chat of 32 tokens, by command:", long_job)
    print_by_name("per embedding job, by command:", embed_job)
    for what, keys_held in held.items():
        print(f"Redis memory of one {what}: {keys_held}")


if __name__ == "__main__":
    main()
