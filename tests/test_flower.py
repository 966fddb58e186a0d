"""Flower against live smmf-queue workers: workers and finished tasks visible, no prompt shown."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from smmf_queue import Client
from smmf_queue.config import SmmfConfig

from .conftest import CHAT, FLOWER_AUTH, WorkerProcess, wait_until

SECRET_PROMPT = "my private prompt 7f3a"


@pytest.fixture(scope="module")
def flower_url(config: SmmfConfig, config_path: Path, chat_worker: WorkerProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    process = subprocess.Popen([sys.executable, "-m", "smmf_queue", "flower", "-c", str(config_path)],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{config.flower.port}"

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, 60, "Flower")
    yield url
    process.terminate()
    process.wait(timeout=15)


def test_flower_shows_live_workers_and_finished_tasks(flower_url: str, client: Client,
                                                      chat_worker: WorkerProcess) -> None:
    auth = tuple(FLOWER_AUTH.split(":"))
    assert httpx.get(f"{flower_url}/api/workers").status_code == 401  # basic auth is on
    # Given Flower watching, when a job runs
    result = client.chat(CHAT, [{"role": "user", "content": SECRET_PROMPT}], max_tokens=4)

    def task_seen() -> bool:
        tasks = httpx.get(f"{flower_url}/api/tasks", auth=auth, timeout=5).json()
        return tasks.get(result.job_id, {}).get("state") == "SUCCESS"

    # Then Flower lists the worker and the finished task, named for its model, without the prompt
    wait_until(task_seen, 30, "Flower to see the task")
    task = httpx.get(f"{flower_url}/api/task/info/{result.job_id}", auth=auth).json()
    assert task["name"] == "smmf.chat" and CHAT in task["kwargs"]
    assert SECRET_PROMPT not in str(task)
    workers = httpx.get(f"{flower_url}/api/workers", params={"refresh": 1}, auth=auth,
                        timeout=15).json()
    assert any(chat_worker.worker_id in name for name in workers)
