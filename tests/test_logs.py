"""Logs a pipeline can parse (#19): `--log-format json` (SMMF_LOG_FORMAT=json) gives one JSON
object per line, with the job's id, model and attempt wherever a job is in scope, and the
gateway's access line (method, route, status, duration, job id) at INFO. A real worker and
gateway, the session's Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from smmf_queue import Client, JobFailed, logs
from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import CHAT, GATEWAY_KEY, StartWorker, WorkerProcess, free_port, gateway_process, write_config

REFUSED = "log-refused-upstream"
ASK = [{"role": "user", "content": "hello"}]


def json_lines(path: Path) -> list[dict[str, object]]:
    """The log's JSON objects (a worker's file also holds Celery's banner, printed to stdout)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def logs_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                tiny_models: Path) -> Path:
    return write_config(tmp_path_factory.mktemp("logs") / "logs.toml", redis_server.url, tiny_models,
                        extra=f"""
[[models.llms]]
name = "{REFUSED}"
provider = "proxy/openai"
api_base = "http://127.0.0.1:{free_port()}/v1"
api_key = "unused"
max_retries = 0
""")


@pytest.fixture(scope="module")
def json_worker(logs_config: Path, start_worker: StartWorker) -> Iterator[WorkerProcess]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(logs.LOG_FORMAT_ENV, "json")
        yield start_worker(REFUSED, config=logs_config)


def test_a_workers_json_log_names_the_job_it_is_about(logs_config: Path, json_worker: WorkerProcess) -> None:
    # When a job fails at a worker logging JSON
    with Client(logs_config) as client, pytest.raises(JobFailed) as failed:
        client.chat(REFUSED, ASK)
    # Then its log is JSON lines, and the failure's line carries the job, model and attempt
    lines = json_lines(json_worker.log)
    assert any(line["logger"] == "smmf_queue.worker" and "loading llm model" in str(line["message"])
               for line in lines)
    [about] = [line for line in lines if line.get("job_id") == failed.value.job_id]
    assert about["model"] == REFUSED and about["attempt"] == 1 and about["level"] == "WARNING"
    assert "APIConnectionError" in str(about["message"]) and {"time", "logger"} <= set(about)


def test_the_gateways_access_log_in_json(logs_config: Path, chat_worker: WorkerProcess,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")
    with gateway_process(logs_config, tmp_path, loglevel="info") as url:
        answer = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
                            json={"model": CHAT, "messages": ASK, "max_tokens": 2}, timeout=60)
        refused = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 200 and refused.status_code == 401
    access = [line for line in json_lines(tmp_path / "gateway.log") if line["logger"] == "smmf_queue.access"]
    chat = next(line for line in access if line["route"] == "/v1/chat/completions")
    assert chat["method"] == "POST" and chat["status"] == 200 and chat["level"] == "INFO"
    assert chat["job_id"] == answer.headers["x-request-id"] and float(chat["duration_ms"]) > 0
    assert any(line["route"] == "/v1/models" and line["status"] == 401 for line in access)

