"""The fault suite: real Redis, real worker processes, faults made for real (SIGKILL, SIGTERM,
Redis killed and restarted, hostile messages). RELIABILITY.md states what each proves."""

from __future__ import annotations

from pathlib import Path

from ..conftest import write_config


def fault_config(path: Path, redis_url: str, tiny_models: Path, model: str, *,
                 lease_s: float = 1, worker_extra: str = "", model_extra: str = "") -> Path:
    """The tests' config plus a tiny chat model of the fault's own (its own queue, so no other
    test's worker takes its jobs) and a lease of `lease_s`: the time after which a dead worker's
    job comes back."""
    write_config(path, redis_url, tiny_models, extra=f"""
[[models.llms]]
name = "{model}"
provider = "hf"
path = "{tiny_models / 'tiny-noise-chat'}"
device = "cpu"
{model_extra}
""")
    path.write_text(path.read_text().replace("lease_s = 3", f"lease_s = {lease_s}\n{worker_extra}"))
    return path
