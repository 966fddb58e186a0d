"""Flower against live smmf-queue workers: workers and finished tasks visible, no prompt shown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from smmf_queue import Client

from .conftest import CHAT, FLOWER_AUTH, WorkerProcess, free_port, start_service, wait_until

SECRET_PROMPT = "my private prompt 7f3a"


@pytest.fixture(scope="module")
def flower_url(config_path: Path, chat_worker: WorkerProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    # A port chosen now (SMMF_FLOWER__PORT): the one in the session's config was chosen minutes
    # earlier, and another test's server that took it meanwhile answered for Flower.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMMF_FLOWER__PORT", str(port))
        process = start_service("flower", config_path, log, f"{url}/healthcheck")
    yield url
    process.terminate()
    process.wait(timeout=15)


def test_flower_shows_live_workers_and_finished_tasks(flower_url: str, client: Client,
                                                      chat_worker: WorkerProcess) -> None:
    auth = tuple(FLOWER_AUTH.split(":"))
    assert httpx.get(f"{flower_url}/api/workers").status_code == 401  # basic auth is on
    # Given Flower watching, when a job runs
    def run_and_fetch() -> dict | None:  # type: ignore[type-arg]
        result = client.chat(CHAT, [{"role": "user", "content": SECRET_PROMPT}], max_tokens=4)

        def task_seen() -> bool:
            tasks = httpx.get(f"{flower_url}/api/tasks", auth=auth, timeout=5).json()
            return tasks.get(result.job_id, {}).get("state") == "SUCCESS"

        try:
            wait_until(task_seen, 10, "Flower to see the task")
        except AssertionError:
            return None
        return httpx.get(f"{flower_url}/api/task/info/{result.job_id}", auth=auth).json()  # type: ignore[no-any-return]

    # Flower answers HTTP before its event receiver is subscribed: a job that ran in between is
    # missing, or shows without its task-received event (no name). Run another then.
    task = None
    for _ in range(6):
        task = run_and_fetch()
        if task is not None and task["name"] is not None:
            break
    assert task is not None, "Flower saw none of six jobs"
    # Then Flower lists the worker and the finished task, named for its model, without the prompt
    assert task["name"] == "smmf.chat" and CHAT in task["kwargs"]
    assert SECRET_PROMPT not in str(task)
    workers = httpx.get(f"{flower_url}/api/workers", params={"refresh": 1}, auth=auth,
                        timeout=15).json()
    assert any(chat_worker.worker_id in name for name in workers)
