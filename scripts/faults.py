"""The long fault runs behind RELIABILITY.md; each prints its figures as it measures them.

    .venv/bin/python scripts/faults.py kills [--n 100] [--lease 2] [--heartbeat 0.5] [--seed 1]
    .venv/bin/python scripts/faults.py stalls [--n 20] [--lease 2] [--heartbeat 0.5] [--seed 1]
    .venv/bin/python scripts/faults.py redis [--n 3]
    .venv/bin/python scripts/faults.py rolling [--rounds 2] [--clients 4] [--grace 1]
    .venv/bin/python scripts/faults.py resume [--streams 1000] [--drop 0.1] [--clients 4] [--seed 1]
    .venv/bin/python scripts/faults.py accepts [--n 3] [--fsync everysec|always] [--stop kill|term] [--seed 1]
    .venv/bin/python scripts/faults.py openapi [--examples 200] [--seed 1] [--admin]
    .venv/bin/python scripts/faults.py sentinel [--n 3] [--seed 1]
    .venv/bin/python scripts/faults.py silent-master [--n 8]

`kills`: a private Redis (AOF on), three worker processes for the tiny random-weight chat model
(a killed worker's messages come back once their lease, `--lease`, is over). N times: stream a long reply (temperature
0, so every attempt writes the same text), SIGKILL the worker that holds it after a random
number of deltas, start a replacement. Reports how long after the kill the reader was told the
reply restarts (the job running again on a live replica) and when it ended; checks every job
ended exactly once with the whole reply (its event log holds one terminal event; the text after
the restart equals an undisturbed run's), and counts lost jobs.

`stalls`: as `kills`, but the worker that holds the reply is stopped (SIGSTOP) past its lease,
so another takes the job over (kombu hands the message back with its delivery tag); at that
restart the stalled worker continues (SIGCONT) and its stale delivery stops (its next event
finds the log past it), then the worker that took over is SIGKILLed and
a replacement starts. Checks that the job comes back once more and ends exactly once with the
whole reply; reports how long after that kill the reply restarted again.

`redis`: a private Redis (AOF on), one worker and one SDK client in use. N times each: SIGKILL
Redis, then a clean stop (SIGTERM); one second later it starts again on the same port with the
same data folder. Reports how long after the start the same client's next chat (through the
worker, which lived through it too) succeeds.

`rolling`: two workers of one model under steady load (client threads streaming chats back to
back); each worker in turn gets SIGTERM (`shutdown_grace_s` short, so jobs still running are
handed back) and a replacement starts; `--rounds` times over. Counts jobs sent, ended, failed
and restarted.

`resume`: the gateway and two workers; client threads stream chats through the gateway (SSE,
temperature 0, so every reply is the same text); a `--drop` share of them close their
connection after a random number of frames and resume from the last `id:` they saw at the
stream's resume endpoint. Counts streams whose text (both parts joined) differs from the
reference (something missing or twice), frame ids seen twice, and streams lost; reports how long
a resume takes to its first frame.

`accepts`: a private Redis (AOF on, `--fsync` its appendfsync), no worker; a producer thread
enqueues chat jobs as fast as the SDK's sender accepts them; after a random 1-3 s Redis is
SIGKILLed (`--stop term`: stopped cleanly) and started again from its data folder. Counts the
accepted jobs (the enqueue returned) that are not in their queue afterwards, and how long
before the stop the lost ones were accepted; N rounds.

`sentinel`: a master, a replica and three sentinels; a producer enqueues chat jobs through the
sentinels as fast as it can; after a random 1-3 s the master is SIGKILLed. Reports how long
until the producer's jobs were accepted again (by the promoted replica) and how many accepted
jobs the new master does not hold (replication is asynchronous); N rounds.

`silent-master`: a master, a replica and three sentinels, one worker of the tiny chat model and
one SDK client behind them (`queue.socket_timeout_s` at its default). N times: right after a
chat ends, the master is frozen (SIGSTOP: its connections stay open, nothing answers), so the
worker's last writes for that job may meet the silence. Reports how long until the replica is
promoted and until a chat is served again (the client retries); says whether the worker's
writes met the silence (its log); a round with no chat served within 120 s counts as stuck.

`openapi`: the gateway with a chat, an embedding and a reranker worker, and schemathesis run
against the gateway's own OpenAPI document with every check (`tests/faults/schemathesis.toml`);
prints its summary. `--admin`: the gateway has a master key, and the run covers its admin API
only (`/key/*`, `/usage`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import redis
from benchkit import (
    EMBEDDING_MODEL,
    EMBEDDING_TOML,
    MODEL,
    MODELS,
    ROOT,
    chat_toml,
    free_port,
    make_models,
    percentile,
)

from smmf_queue import BrokerUnavailable, Client, JobTimeout, job_record, keys, registry
from smmf_queue.config import load_config
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.jobs import ChatDelta, new_job_id
from smmf_queue.queues import JobSender, make_celery_app
from smmf_queue.standalone import start_process, start_worker_process, stop_processes
from smmf_queue.streaming import decode_log
from tests.faults.sentinel_group import MASTER as SENTINEL_MASTER  # noqa: I001
from tests.faults.sentinel_group import SentinelGroup

QUESTION = [{"role": "user", "content": "tell me about queues"}]
#: the tiny random-weight cross-encoder (smmf_queue/tiny_models.py), for the rerank routes.
RERANKER_TOML = f"""
[[models.rerankers]]
name = "tiny-noise-reranker"
provider = "hf"
path = "{MODELS / 'tiny-noise-reranker'}"
"""
REPLY_TOKENS = 3000


#: a round of a fault run whose job was not lost: (text after the last restart, terminal
#: events logged, its timings in seconds, the first being fault -> reply restarts).
Outcome = tuple[str, int, tuple[float, ...]]


def kills(n: int, lease_s: float, heartbeat_s: float, seed: int) -> None:
    timings = _rounds(n, lease_s, heartbeat_s, seed, live=2, prefix="kill", one_round=_one_kill,
                      title="SIGKILLs of the worker holding a streamed reply")
    if timings:
        back, ended = [t[0] for t in timings], [t[1] for t in timings]
        print(f"kill -> reply restarts on a replica: p50 {percentile(back, 50):.2f} s, "
              f"p99 {percentile(back, 99):.2f} s, max {max(back):.2f} s (n={len(back)})")
        print(f"kill -> reply ends:                  p50 {percentile(ended, 50):.2f} s, "
              f"p99 {percentile(ended, 99):.2f} s, max {max(ended):.2f} s")


def _rounds(n: int, lease_s: float, heartbeat_s: float, seed: int, *, live: int, prefix: str,
            title: str, one_round: Callable[[Client, redis.Redis, Replicas, int, str], Outcome | None],
            ) -> list[tuple[float, ...]]:
    """N rounds of one fault against three workers: each streams a long reply (temperature 0,
    so every attempt writes the same text) through `one_round`, which faults it after a random
    number of deltas, then a replacement worker starts. Prints the header, the progress and
    the lost, wrong and not-exactly-once counts; returns the timings of the rounds not lost."""
    rng = random.Random(seed)
    timings: list[tuple[float, ...]] = []
    lost = wrong = doubled = 0
    with _replicas(lease_s, heartbeat_s) as (config, client_redis, replicas):
        with Client(config) as client:
            reference = client.chat(MODEL, QUESTION, max_tokens=REPLY_TOKENS, temperature=0).text
            print(f"{n} {title} ({len(reference)} chars); lease_s {lease_s}, heartbeat {heartbeat_s} s, "
                  f"seed {seed}, {os.cpu_count()} cores", flush=True)
            for i in range(n):
                _wait_live(client_redis, live, replicas.running())
                outcome = one_round(client, client_redis, replicas, rng.randint(1, 40), f"{prefix}-{seed}-{i}")
                replicas.spawn()
                if outcome is None:
                    lost += 1
                    print(f"  {i + 1}: LOST", flush=True)
                    continue
                text, terminals, times = outcome
                timings.append(times)
                wrong += text != reference
                doubled += terminals != 1
                if (i + 1) % 10 == 0:
                    print(f"  {i + 1} rounds: lost {lost}, reply back after the fault p50 "
                          f"{percentile([t[0] for t in timings], 50):.2f} s", flush=True)
    print(f"lost {lost} / {n}; wrong replies {wrong} / {n}; jobs not ended exactly once {doubled} / {n}")
    return timings


def _streamed(client: Client, job_id: str, on_delta: Callable[[int, ChatDelta], None]) -> tuple[str, int] | None:
    """Stream a long reply, calling `on_delta` with each delta's number (from 1) and the delta
    itself; (the text after the last restart, the deltas read), or None if the reader timed out
    (the job was lost)."""
    pieces: list[str] = []
    count = 0
    try:
        for delta in client.stream_chat(MODEL, QUESTION, max_tokens=REPLY_TOKENS, temperature=0,
                                        job_id=job_id):
            count += 1
            if delta.restart:
                pieces = []
            on_delta(count, delta)
            pieces.append(delta.text)
    except JobTimeout:
        return None
    return "".join(pieces), count


def _terminal_events(client_redis: redis.Redis, job_id: str) -> int:
    """How many terminal events (end or error) the job's log holds: exactly one is right."""
    events = decode_log(client_redis.xrange(keys.event_log(job_id)))  # type: ignore[arg-type]
    return sum(1 for e in events if e.terminal)


def _one_kill(client: Client, client_redis: redis.Redis, replicas: Replicas,
              after: int, job_id: str) -> Outcome | None:
    """Stream a reply, SIGKILL its worker after `after` deltas; (text after the restart,
    terminal events logged, seconds from the kill to the restart and to the end), or None if
    lost."""
    killed_at: list[float] = []
    restart_at: list[float] = []

    def on_delta(count: int, delta: ChatDelta) -> None:
        if delta.restart:
            restart_at.append(time.monotonic())
        if count == after and not killed_at:
            replicas.kill(_owner_pid(client_redis, job_id))
            killed_at.append(time.monotonic())

    streamed = _streamed(client, job_id, on_delta)
    if streamed is None:
        return None
    ended = time.monotonic()
    text, count = streamed
    if not killed_at or not restart_at:  # the reply ended before the kill: count it as not a kill
        raise SystemExit(f"job {job_id} ended after {count} deltas, before its kill; "
                         "use a longer reply")
    return text, _terminal_events(client_redis, job_id), (restart_at[0] - killed_at[0], ended - killed_at[0])


def stalls(n: int, lease_s: float, heartbeat_s: float, seed: int) -> None:
    timings = _rounds(n, lease_s, heartbeat_s, seed, live=3, prefix="stall", one_round=_one_stall,
                      title="stalls (SIGSTOP past the lease) of the worker holding a streamed reply, "
                            "a takeover, SIGCONT, then a SIGKILL of the worker that took over")
    if timings:
        back = [t[0] for t in timings]
        print(f"kill of the worker that took over -> reply restarts again: p50 {percentile(back, 50):.2f} s, "
              f"p99 {percentile(back, 99):.2f} s, max {max(back):.2f} s (n={len(back)})")


def _one_stall(client: Client, client_redis: redis.Redis, replicas: Replicas, after: int,
               job_id: str) -> Outcome | None:
    """Stream a reply; after `after` deltas SIGSTOP its worker; at the takeover's restart SIGCONT
    it, wait for its stale delivery to end, and SIGKILL the worker that took over. (Text after
    the last restart, terminal events logged, seconds from that kill to the next restart), or
    None if lost."""
    stalled: list[int] = []
    killed_at: list[float] = []
    back: list[float] = []

    def on_delta(count: int, delta: ChatDelta) -> None:
        if delta.restart:
            if killed_at and not back:
                back.append(time.monotonic() - killed_at[0])
            elif stalled and not killed_at:
                killed_at.append(_resume_then_kill_the_new_owner(client_redis, replicas, stalled[0], job_id))
        if count == after and not stalled:
            stalled.append(_owner_pid(client_redis, job_id))
            replicas.processes[stalled[0]].send_signal(signal.SIGSTOP)

    streamed = _streamed(client, job_id, on_delta)
    if streamed is None:
        return None
    text, count = streamed
    if not back:
        raise SystemExit(f"job {job_id} ended after {count} deltas, before its faults; use a longer reply")
    return text, _terminal_events(client_redis, job_id), (back[0],)


def _resume_then_kill_the_new_owner(client_redis: redis.Redis, replicas: Replicas,
                                    stalled: int, job_id: str) -> float:
    """SIGCONT the stalled worker, wait until its stale delivery of `job_id` ended (and was
    acknowledged), SIGKILL the job's new owner; when it was killed."""
    owner = _owner_pid(client_redis, job_id)
    replicas.processes[stalled].send_signal(signal.SIGCONT)
    log = replicas.logs[stalled]
    deadline = time.monotonic() + 30
    while f"job {job_id}: attempt 1 lost the job" not in log.read_text():
        if time.monotonic() > deadline:
            raise SystemExit(f"the stalled worker's delivery of {job_id} did not end; see {log}")
        time.sleep(0.05)
    time.sleep(0.3)  # its ack follows the task's end
    replicas.kill(owner)
    return time.monotonic()


def _owner_pid(client_redis: redis.Redis, job_id: str) -> int:
    """The pid of the worker that holds a job (its owner is `<host>-<pid>-<id>/<attempt id>`)."""
    owner = job_record.read(client_redis, job_id).get("owner", "")
    return int(owner.split("/")[0].split("-")[-2])


def redis_restarts(n: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="smmf-faults-"))
    server = EmbeddedRedis(free_port(), work / "redis")
    server.start()
    config = _config(work, server)
    worker = start_worker_process(config, [MODEL], work / "worker.log")
    try:
        _wait_live(redis.Redis.from_url(server.url), 1)
        with Client(config) as client:
            client.chat(MODEL, QUESTION, max_tokens=4)
            print(f"Redis stopped {n} times by SIGKILL and {n} times by SIGTERM, started again 1 s "
                  f"later (AOF on); one worker and one client live through it; {os.cpu_count()} cores",
                  flush=True)
            for how in ["SIGKILL"] * n + ["SIGTERM"] * n:
                assert server.process is not None
                server.process.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
                server.process.wait()
                time.sleep(1)
                server.start()
                started = time.monotonic()
                while True:
                    try:
                        client.chat(MODEL, QUESTION, max_tokens=4, timeout=10)
                        break
                    except (BrokerUnavailable, JobTimeout):
                        if time.monotonic() - started > 60:
                            raise SystemExit(f"no reply 60 s after Redis came back ({how})") from None
                        time.sleep(0.1)
                print(f"  {how}: the client's chat served again {time.monotonic() - started:.2f} s "
                      f"after Redis was back", flush=True)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        server.stop()


def rolling(rounds: int, clients: int, grace_s: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="smmf-faults-"))
    with EmbeddedRedis(free_port(), work / "redis") as server:
        config = _config(work, server, shutdown_grace_s=grace_s, heartbeat_interval_s=0.5)
        probe = redis.Redis.from_url(server.url)
        workers = [start_worker_process(config, [MODEL], work / f"worker-{i}.log") for i in range(2)]
        _wait_live(probe, 2)
        counts = {"sent": 0, "ended": 0, "failed": 0, "restarted": 0}
        lock = threading.Lock()
        stop = threading.Event()

        def load() -> None:
            with Client(config) as client:
                while not stop.is_set():
                    with lock:
                        counts["sent"] += 1
                    try:
                        deltas = list(client.stream_chat(MODEL, QUESTION, max_tokens=400, temperature=0))
                        outcome = "restarted" if any(d.restart for d in deltas) else "ended"
                    except Exception as exc:  # counted, and shown: the run is about failures
                        print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
                        outcome = "failed"
                    with lock:
                        counts[outcome] += 1

        threads = [threading.Thread(target=load) for _ in range(clients)]
        for thread in threads:
            thread.start()
        print(f"rolling restarts: 2 workers, {clients} clients streaming 400-token chats back to "
              f"back, shutdown_grace_s {grace_s}, {rounds} rounds; {os.cpu_count()} cores", flush=True)
        for round_ in range(rounds):
            for i in range(2):
                time.sleep(2)
                workers[i].send_signal(signal.SIGTERM)
                code = workers[i].wait(timeout=60)
                workers[i] = start_worker_process(config, [MODEL], work / f"worker-{round_}-{i}.log")
                _wait_live(probe, 2)
                print(f"  round {round_ + 1}, worker {i + 1}: stopped (exit {code}) and replaced; "
                      f"{counts}", flush=True)
        stop.set()
        for thread in threads:
            thread.join(180)
        stop_processes(workers, grace_s=30)
    print(f"jobs sent {counts['sent']}: ended {counts['ended'] + counts['restarted']} "
          f"({counts['restarted']} of them restarted on another worker), failed {counts['failed']}")


def resume_run(streams: int, drop: float, clients: int, seed: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="smmf-faults-"))
    with EmbeddedRedis(free_port(), work / "redis") as server:
        config = _config(work, server)
        workers = [start_worker_process(config, [MODEL], work / f"worker-{i}.log") for i in range(2)]
        port = free_port()
        gateway = start_process("gateway", config, work / "gateway.log", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_live(redis.Redis.from_url(server.url), 2)
            _wait_http(f"{url}/healthz")
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 64, "temperature": 0,
                    "stream": True}
            reference = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                   json={**body, "stream": False}).json()["choices"][0]["message"]["content"]
            print(f"{streams} streams through the gateway ({len(reference)} chars each), {drop:.0%} of "
                  f"readers dropping after a random number of frames and resuming; {clients} client "
                  f"threads, 2 workers, seed {seed}, {os.cpu_count()} cores", flush=True)
            rng = random.Random(seed)
            plan = [rng.random() < drop for _ in range(streams)]
            cut_after = [rng.randint(1, 12) for _ in range(streams)]
            counts = {"dropped": 0, "wrong": 0, "twice": 0, "lost": 0}
            resume_s: list[float] = []
            lock = threading.Lock()
            jobs = iter(range(streams))

            def read() -> None:
                with httpx.Client(base_url=url, timeout=60) as http:
                    for i in jobs:
                        outcome = _one_stream(http, body, cut_after[i] if plan[i] else None)
                        with lock:
                            counts["dropped"] += outcome.dropped
                            counts["lost"] += outcome.text is None
                            counts["wrong"] += outcome.text is not None and outcome.text != reference
                            counts["twice"] += outcome.twice
                            resume_s.extend(outcome.resume_s)

            threads = [threading.Thread(target=read) for _ in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(f"streams {streams}, dropped and resumed {counts['dropped']}: "
                  f"wrong text {counts['wrong']} / {streams}, frame ids twice {counts['twice']}, "
                  f"lost {counts['lost']} / {streams}")
            if resume_s:
                print(f"resume -> first frame: p50 {percentile(resume_s, 50) * 1000:.1f} ms, "
                      f"p99 {percentile(resume_s, 99) * 1000:.1f} ms, max {max(resume_s) * 1000:.1f} ms "
                      f"(n={len(resume_s)})")
        finally:
            stop_processes([gateway, *workers], grace_s=30)


class _Streamed:
    """What one stream through the gateway gave its reader."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.ids: list[str] = []
        self.done = False
        self.dropped = False
        self.resume_s: list[float] = []

    @property
    def text(self) -> str | None:
        return "".join(self.pieces) if self.done else None

    @property
    def twice(self) -> int:
        return len(self.ids) - len(set(self.ids))

    def read(self, response: httpx.Response, stop_after: int | None = None,
             asked: float | None = None) -> None:
        """Take frames until `[DONE]`, or return after `stop_after` of them; `asked`: when the
        request was sent (a resume, timed to its first line)."""
        for line in response.iter_lines():
            if asked is not None:
                self.resume_s.append(time.perf_counter() - asked)
                asked = None
            if line.startswith("id: "):
                self.ids.append(line[4:])
            elif line == "data: [DONE]":
                self.done = True
            elif line.startswith("data: "):
                choices = json.loads(line[6:]).get("choices") or [{}]
                self.pieces.append(choices[0].get("delta", {}).get("content") or "")
                if stop_after is not None and len(self.ids) >= stop_after:
                    return


def _one_stream(http: httpx.Client, body: dict[str, object], cut_after: int | None) -> _Streamed:
    streamed = _Streamed()
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        resume = response.headers["x-smmf-resume"]
        streamed.read(response, cut_after)
    if streamed.done or cut_after is None:
        return streamed
    streamed.dropped = True
    asked = time.perf_counter()
    with http.stream("GET", resume, headers={"Last-Event-ID": streamed.ids[-1]}) as response:
        streamed.read(response, asked=asked)
    return streamed


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within 60 s")
        time.sleep(0.2)


def accepts(n: int, fsync: str, stop: str, seed: int) -> None:
    rng = random.Random(seed)
    how = signal.SIGKILL if stop == "kill" else signal.SIGTERM
    print(f"Redis stopped by {how.name} {n} times under a producer enqueueing chat jobs as fast as "
          f"it can; AOF appendfsync {fsync}; seed {seed}, {os.cpu_count()} cores", flush=True)
    total_accepted = total_lost = 0
    for round_ in range(n):
        accepted, rate, lost = _stop_redis_under_a_producer(fsync, how, rng.uniform(1, 3))
        total_accepted += accepted
        total_lost += len(lost)
        window = f"; accepted {min(lost) * 1000:.0f}-{max(lost) * 1000:.0f} ms before the kill" if lost else ""
        print(f"  round {round_ + 1}: accepted {accepted} ({rate:.0f}/s), lost {len(lost)}{window}",
              flush=True)
    print(f"lost {total_lost} / {total_accepted} accepted jobs (appendfsync {fsync})")


def _stop_redis_under_a_producer(fsync: str, how: signal.Signals,
                                 after_s: float) -> tuple[int, float, list[float]]:
    """(jobs accepted, per second, how long before the kill each lost one was accepted)."""
    work = Path(tempfile.mkdtemp(prefix="smmf-faults-"))
    server = EmbeddedRedis(free_port(), work / "redis", fsync=fsync)  # type: ignore[arg-type]
    server.start()
    sender = JobSender(make_celery_app(load_config(_config(work, server)), store_results=False))
    accepted: dict[str, float] = {}
    producer = threading.Thread(target=_produce, args=(sender, accepted))
    started = time.monotonic()
    producer.start()
    time.sleep(after_s)
    assert server.process is not None
    server.process.send_signal(how)
    killed = time.monotonic()
    server.process.wait()
    producer.join(30)
    server.start()
    queued = _queued_job_ids(redis.Redis.from_url(server.url))
    server.stop()
    lost = [killed - at for job_id, at in accepted.items() if job_id not in queued]
    return len(accepted), len(accepted) / (killed - started), lost


def _produce(sender: JobSender, accepted: dict[str, float]) -> None:
    """Enqueue chat jobs until Redis refuses, noting when each was accepted."""
    while True:
        job_id = new_job_id()
        request = {"model": MODEL, "job_id": job_id, "reply_to": "nobody",
                   "messages": [{"role": "user", "content": "hi"}], "params": {}}
        try:
            sender.send(keys.CHAT_TASK, "llm", request, expires_s=None)
        except Exception:  # Redis is gone: what was accepted until now is the sample
            return
        accepted[job_id] = time.monotonic()


def _queued_job_ids(client: redis.Redis) -> set[str]:
    """Ids of the jobs in the model's queue (kombu keeps each message as JSON with its headers)."""
    return {json.loads(raw)["headers"]["id"]
            for lane in keys.queue_lanes("llm", MODEL) for raw in client.lrange(lane, 0, -1)}


def sentinel_run(n: int, seed: int) -> None:
    rng = random.Random(seed)
    print(f"Redis master SIGKILLed {n} times under a producer enqueueing through 3 sentinels "
          f"(down-after 1 s); seed {seed}, {os.cpu_count()} cores", flush=True)
    total_accepted = total_lost = 0
    for round_ in range(n):
        with _sentinel_group() as (group, config):
            sender = JobSender(make_celery_app(load_config(config), store_results=False))
            accepted: dict[str, float] = {}
            stop = threading.Event()
            producer = threading.Thread(target=_produce_through_failover, args=(sender, accepted, stop))
            producer.start()
            time.sleep(rng.uniform(1, 3))
            group.kill(group.master_port)
            killed = time.monotonic()
            _wait_promoted(group, killed)
            while not any(at > killed for at in list(accepted.values())) and time.monotonic() - killed < 60:
                time.sleep(0.1)
            back = min((at for at in list(accepted.values()) if at > killed), default=float("nan"))
            stop.set()
            producer.join(30)
            queued = _queued_job_ids(redis.Redis(port=group.replica_port))
            lost = [job_id for job_id, at in accepted.items() if at <= killed and job_id not in queued]
            total_accepted += len(accepted)
            total_lost += len(lost)
            print(f"  round {round_ + 1}: accepted {len(accepted)}, lost {len(lost)}; jobs accepted "
                  f"again {back - killed:.1f} s after the kill", flush=True)
    print(f"lost {total_lost} / {total_accepted} accepted jobs")


def silent_master_run(n: int) -> None:
    print(f"Redis master SIGSTOPped {n} times right after a chat, one worker and one client behind "
          f"3 sentinels (down-after 1 s); {os.cpu_count()} cores", flush=True)
    stuck = 0
    for round_ in range(n):
        with _sentinel_group() as (group, config):
            log = config.parent / "worker.log"
            worker = start_worker_process(config, [MODEL], log)
            try:
                with Client(config) as client:
                    if not _chat_within(client, 120):
                        raise SystemExit(f"the worker served no chat within 120 s: {log}")
                    group.processes[group.master_port].send_signal(signal.SIGSTOP)
                    stopped = time.monotonic()
                    promoted = _wait_promoted(group, stopped)
                    served = _chat_within(client, 120)
                    back = time.monotonic() - stopped
            finally:
                stop_processes([worker], grace_s=10)
        met = ("; the worker's writes for the last job met the silence"
               if "Failed operation" in log.read_text() else "")
        stuck += not served
        outcome = f"a chat served again {back:.1f} s after the stop" if served else "STUCK"
        print(f"  round {round_ + 1}: replica promoted {promoted:.1f} s after the stop, "
              f"{outcome}{met}", flush=True)
    print(f"stuck {stuck} / {n}")


@contextlib.contextmanager
def _sentinel_group() -> Iterator[tuple[SentinelGroup, Path]]:
    """A master, a replica and three sentinels, and a config for the tiny chat model behind
    them (stopped at the end)."""
    work = Path(tempfile.mkdtemp(prefix="smmf-faults-"))
    group = SentinelGroup(work)
    group.start()
    try:
        config = work / "sentinel.toml"
        config.write_text(chat_toml(MODEL) + f'\n[queue]\nbroker_url = "{group.url}"\n'
                          f'sentinel_master = "{SENTINEL_MASTER}"\n')
        yield group, config
    finally:
        group.stop()


def _wait_promoted(group: SentinelGroup, since: float) -> float:
    """Wait until the sentinels have promoted the replica (60 s at most); seconds since `since`."""
    while group.master() != group.replica_port and time.monotonic() - since < 60:
        time.sleep(0.1)
    return time.monotonic() - since


def _chat_within(client: Client, bound_s: float) -> bool:
    """Whether a chat is served within `bound_s`, retried meanwhile."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        with contextlib.suppress(BrokerUnavailable, JobTimeout):
            client.chat(MODEL, QUESTION, max_tokens=4, temperature=0, timeout=10)
            return True
        time.sleep(0.2)
    return False


def _produce_through_failover(sender: JobSender, accepted: dict[str, float], stop: threading.Event) -> None:
    """Enqueue chat jobs until `stop`, retrying while the broker fails over."""
    while not stop.is_set():
        job_id = new_job_id()
        request = {"model": MODEL, "job_id": job_id, "reply_to": "nobody",
                   "messages": [{"role": "user", "content": "hi"}], "params": {}}
        try:
            sender.send(keys.CHAT_TASK, "llm", request, expires_s=None)
        except Exception:  # the master is gone: try again until the replica is promoted
            time.sleep(0.05)
            continue
        accepted[job_id] = time.monotonic()


#: the master key of `openapi --admin`'s gateway.
ADMIN_MASTER_KEY = "sk-faults-master"


def openapi_run(examples: int, seed: int, admin: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="smmf-faults-"))
    with EmbeddedRedis(free_port(), work / "redis") as server:
        config = _config(work, server, models=EMBEDDING_TOML + RERANKER_TOML)
        workers = [start_worker_process(config, [name], work / f"worker-{name}.log")
                   for name in (MODEL, EMBEDDING_MODEL, "tiny-noise-reranker")]
        port = free_port()
        if admin:
            os.environ["SMMF_MASTER_KEY"] = ADMIN_MASTER_KEY
        gateway = start_process("gateway", config, work / "gateway.log", "--port", str(port))
        os.environ.pop("SMMF_MASTER_KEY", None)
        only = ["-H", f"Authorization: Bearer {ADMIN_MASTER_KEY}", "--include-path-regex",
                "^/(key|usage)"] if admin else []
        try:
            _wait_live(redis.Redis.from_url(server.url), len(workers))
            _wait_http(f"http://127.0.0.1:{port}/healthz")
            print(f"schemathesis {version('schemathesis')}, all checks, {examples} examples per "
                  f"operation, seed {seed}{', the admin API' if admin else ''}; {os.cpu_count()} cores",
                  flush=True)
            run = subprocess.run(
                [str(Path(sys.executable).with_name("st")), "--config-file",
                 str(ROOT / "tests" / "faults" / "schemathesis.toml"), "run",
                 f"http://127.0.0.1:{port}/openapi.json", "--checks", "all", "--max-examples",
                 str(examples), "--seed", str(seed), "--request-timeout", "60", "--no-color", *only],
                capture_output=True, text=True)
            print(run.stdout[run.stdout.find("SUMMARY") - 40:] if run.returncode == 0 else run.stdout)
        finally:
            stop_processes([gateway, *workers], grace_s=30)


class Replicas:
    """Worker processes of the tiny chat model on one config, by pid, with their logs."""

    def __init__(self, config: Path, work: Path):
        self.config, self.work = config, work
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}

    def spawn(self) -> None:
        log = self.work / f"worker-{len(self.processes)}.log"
        process = start_worker_process(self.config, [MODEL], log)
        self.processes[process.pid], self.logs[process.pid] = process, log

    def kill(self, pid: int) -> None:
        self.processes[pid].send_signal(signal.SIGKILL)
        self.processes[pid].wait()

    def running(self) -> set[int]:
        """The pids of the workers not killed (a killed one stays listed live until its TTL)."""
        return {pid for pid, process in self.processes.items() if process.poll() is None}


@contextlib.contextmanager
def _replicas(lease_s: float, heartbeat_s: float) -> Iterator[tuple[Path, redis.Redis, Replicas]]:
    """A private Redis (AOF on) and three live workers of the tiny chat model with this lease
    and heartbeat: (config, a client of that Redis, the workers)."""
    work = Path(tempfile.mkdtemp(prefix="smmf-faults-"))
    with EmbeddedRedis(free_port(), work / "redis") as server:
        config = _config(work, server, heartbeat_interval_s=heartbeat_s,
                         heartbeat_ttl_s=heartbeat_s * 3, lease_s=lease_s)
        client_redis = redis.Redis.from_url(server.url)
        replicas = Replicas(config, work)
        for _ in range(3):
            replicas.spawn()
        _wait_live(client_redis, 3)
        try:
            yield config, client_redis, replicas
        finally:
            stop_processes(list(replicas.processes.values()), grace_s=30)


def _config(work: Path, server: EmbeddedRedis, models: str = "", **worker: float) -> Path:
    """A config for the tiny chat model (and `models`) on `server`: jobs may take 2 minutes,
    kombu's sweep is an hour away (the default), and `worker` sets [worker] keys."""
    config = work / "faults.toml"
    settings = "".join(f"{key} = {value}\n" for key, value in worker.items())
    config.write_text(chat_toml(MODEL) + models + f'\n[queue]\nbroker_url = "{server.url}"\n'
                      f"job_timeout_s = 120\n\n[worker]\n{settings}")
    return config


def _wait_live(client: redis.Redis, count: int, pids: set[int] | None = None) -> None:
    """Wait until `count` workers are live (of `pids`, where given)."""
    deadline = time.monotonic() + 120
    while len([w for w in registry.live_workers(client) if pids is None or w.pid in pids]) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {count} live workers after 120 s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    kill = commands.add_parser("kills", help="SIGKILL the worker holding a job, N times")
    kill.add_argument("--n", type=int, default=100)
    kill.add_argument("--lease", type=float, default=2.0, help="worker.lease_s")
    kill.add_argument("--heartbeat", type=float, default=0.5, help="worker.heartbeat_interval_s")
    kill.add_argument("--seed", type=int, default=1)
    stall = commands.add_parser("stalls", help="stall the worker holding a job past its lease, then kill its successor")
    stall.add_argument("--n", type=int, default=20)
    stall.add_argument("--lease", type=float, default=2.0, help="worker.lease_s")
    stall.add_argument("--heartbeat", type=float, default=0.5, help="worker.heartbeat_interval_s")
    stall.add_argument("--seed", type=int, default=1)
    outage = commands.add_parser("redis", help="kill and stop Redis under a live client")
    outage.add_argument("--n", type=int, default=3)
    restarts = commands.add_parser("rolling", help="restart every worker under steady load")
    restarts.add_argument("--rounds", type=int, default=2)
    restarts.add_argument("--clients", type=int, default=4)
    restarts.add_argument("--grace", type=float, default=1.0, help="worker.shutdown_grace_s")
    resumes = commands.add_parser("resume", help="drop and resume SSE streams through the gateway")
    resumes.add_argument("--streams", type=int, default=1000)
    resumes.add_argument("--drop", type=float, default=0.1, help="share of readers that drop")
    resumes.add_argument("--clients", type=int, default=4)
    resumes.add_argument("--seed", type=int, default=1)
    accept = commands.add_parser("accepts", help="SIGKILL Redis under a producer; count lost accepts")
    accept.add_argument("--n", type=int, default=3)
    accept.add_argument("--fsync", choices=["everysec", "always"], default="everysec")
    accept.add_argument("--stop", choices=["kill", "term"], default="kill", help="SIGKILL or SIGTERM")
    accept.add_argument("--seed", type=int, default=1)
    failover = commands.add_parser("sentinel", help="SIGKILL the master behind Sentinel under a producer")
    failover.add_argument("--n", type=int, default=3)
    failover.add_argument("--seed", type=int, default=1)
    silent = commands.add_parser("silent-master", help="SIGSTOP the master behind Sentinel after a chat")
    silent.add_argument("--n", type=int, default=8)
    fuzz = commands.add_parser("openapi", help="schemathesis against the gateway's own schema")
    fuzz.add_argument("--examples", type=int, default=200)
    fuzz.add_argument("--seed", type=int, default=1)
    fuzz.add_argument("--admin", action="store_true", help="the admin API only, with a master key")
    args = parser.parse_args()
    make_models()
    if args.command == "kills":
        kills(args.n, args.lease, args.heartbeat, args.seed)
    elif args.command == "stalls":
        stalls(args.n, args.lease, args.heartbeat, args.seed)
    elif args.command == "redis":
        redis_restarts(args.n)
    elif args.command == "rolling":
        rolling(args.rounds, args.clients, args.grace)
    elif args.command == "accepts":
        accepts(args.n, args.fsync, args.stop, args.seed)
    elif args.command == "sentinel":
        sentinel_run(args.n, args.seed)
    elif args.command == "silent-master":
        silent_master_run(args.n)
    elif args.command == "openapi":
        openapi_run(args.examples, args.seed, args.admin)
    else:
        resume_run(args.streams, args.drop, args.clients, args.seed)


if __name__ == "__main__":
    main()
