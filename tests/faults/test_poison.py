"""Fault: a prompt that kills every worker that runs it (each attempt SIGKILLed mid-reply).

It must end after exactly `max_attempts` attempts as a dead letter, its caller told why, while
other jobs of the same queue keep flowing; an operator lists, requeues and purges it with
`smmf-queue jobs`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from smmf_queue import Client, JobFailed, job_record, keys
from smmf_queue.cli import app
from smmf_queue.embedded_redis import EmbeddedRedis

from ..conftest import StartWorker
from . import fault_config

MODEL = "tiny-chat-poison"
POISON = [{"role": "user", "content": "the prompt that kills its worker"}]
HELLO = [{"role": "user", "content": "hi"}]
runner = CliRunner()


@pytest.fixture(scope="module")
def poison_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                  tiny_models: Path) -> Path:
    return fault_config(tmp_path_factory.mktemp("poison") / "poison.toml", redis_server.url,
                        tiny_models, MODEL)


def test_a_prompt_that_kills_its_worker_ends_as_a_dead_letter_after_max_attempts(
        poison_config: Path, start_worker: StartWorker, redis_client: redis.Redis) -> None:
    workers = {w.process.pid: w for w in (start_worker(MODEL, config=poison_config),
                                          start_worker(MODEL, config=poison_config))}
    job_id = f"poison-{time.time_ns()}"
    killed: list[int] = []

    def kill_whoever_runs_it() -> None:
        """The poison: SIGKILL each worker that starts the job, and start a replacement."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(killed) < 3:
            record = job_record.read(redis_client, job_id)
            if record.get("state") == "RUNNING" and record["attempt"] > len(killed):
                pid = int(record["owner"].split("/")[0].split("-")[-2])
                workers[pid].kill()
                killed.append(pid)
                replacement = start_worker(MODEL, config=poison_config, wait=False)
                workers[replacement.process.pid] = replacement
            time.sleep(0.05)

    killer = threading.Thread(target=kill_whoever_runs_it)
    killer.start()
    with Client(poison_config) as client:
        # Given the poison job, streamed by its caller
        with pytest.raises(JobFailed) as failed:
            list(client.stream_chat(MODEL, POISON, max_tokens=3000, temperature=0, job_id=job_id,
                                    timeout=120))
        killer.join(10)
        # Then it ended after exactly max_attempts (3) attempts, its caller told why
        assert failed.value.error_type == "WorkerLost" and len(killed) == 3
        assert job_record.read(redis_client, job_id)["state"] == "FAILED"
        # and other jobs of the same queue still flow
        assert client.chat(MODEL, HELLO, max_tokens=3).usage.completion_tokens == 3
        # And an operator finds it among the dead letters, with its request
        listed = runner.invoke(app, ["jobs", "list", "--json", "-c", str(poison_config)])
        assert listed.exit_code == 0, listed.output
        [row] = [r for r in json.loads(listed.stdout) if r["job_id"] == job_id]
        assert (row["model"], row["attempts"], row["error_type"], row["size"]) == (
            MODEL, 3, "WorkerLost", "1 messages")
        assert POISON[0]["content"] not in listed.output  # a listing shows no prompt
        shown = runner.invoke(app, ["jobs", "show", job_id, "-c", str(poison_config)])
        assert POISON[0]["content"] in shown.output
        # When it is requeued (the poison is gone now), then it runs again as a new job
        requeued = runner.invoke(app, ["jobs", "requeue", job_id, "-c", str(poison_config)])
        assert requeued.exit_code == 0, requeued.output
        replay = list(client.replay(job_id, MODEL))  # (returns at the job's terminal event)
        assert replay and not any(d.restart for d in replay)
        assert job_record.read(redis_client, job_id)["state"] == "DONE"
        assert job_record.read(redis_client, job_id)["attempt"] == 1
        # and its letter is gone; purge drops the rest
        assert job_id not in runner.invoke(app, ["jobs", "list", "--json", "-c", str(poison_config)]).output
        assert runner.invoke(app, ["jobs", "purge", "--all", "-c", str(poison_config)]).exit_code == 0
        assert redis_client.zcard(keys.DEAD_LETTERS) == 0
    for worker in workers.values():
        worker.stop()


def test_jobs_purge_wants_names_or_all(poison_config: Path) -> None:
    result = runner.invoke(app, ["jobs", "purge", "-c", str(poison_config)])
    assert result.exit_code == 1 and "--all" in result.output
