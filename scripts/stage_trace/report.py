"""p50 of each stage written by the stage tracer (see sitecustomize.py in this folder).

    .venv/bin/python scripts/stage_trace/report.py /tmp/trace [--by-worker]

With --by-worker, one table per worker process (two workers on one queue: an A/B in one run).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

STAGES = ["1_call", "2_send", "3_taken", "4_bookkept", "5_execute", "6_resolved", "7_first_text",
          "9_caller_has_text"]
CLIENT_ONLY = {"1_call", "9_caller_has_text"}  # written without a job id


def read(folder: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(job id → stage → time, job id → the log file of the worker that ran it)."""
    rows = []
    worker_of: dict[str, str] = {}
    for log in folder.glob("*.log"):
        for line in log.read_text().splitlines():
            when, stage, job = line.split()
            rows.append((float(when), stage, job))
            if stage == "5_execute":
                worker_of[job] = log.stem
    rows.sort()
    jobs: dict[str, dict[str, float]] = defaultdict(dict)
    call, current = None, None
    for when, stage, job in rows:
        if stage == "1_call":
            call = when
        elif stage == "9_caller_has_text" and current is not None:
            jobs[current].setdefault(stage, when)
        elif stage not in CLIENT_ONLY and job not in ("-", "None"):
            if stage == "2_send":
                current = job
                if call is not None:
                    jobs[job]["1_call"] = call
            jobs[job].setdefault(stage, when)
    return jobs, worker_of


def report(jobs: list[dict[str, float]], title: str) -> None:
    whole = [j for j in jobs if all(stage in j for stage in STAGES)]
    print(f"{title}: {len(whole)} chats")
    for start, end in zip(STAGES, STAGES[1:]):
        p50 = statistics.median((j[end] - j[start]) * 1000 for j in whole)
        print(f"  {start:>18} -> {end:<18} p50 {p50:6.2f} ms")
    total = statistics.median((j[STAGES[-1]] - j[STAGES[0]]) * 1000 for j in whole)
    print(f"  {'call -> caller has text':>39} p50 {total:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--by-worker", action="store_true")
    args = parser.parse_args()
    jobs, worker_of = read(args.folder)
    if not args.by_worker:
        report(list(jobs.values()), "all workers")
        return
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for job, stages in jobs.items():
        if job in worker_of:
            groups[worker_of[job]].append(stages)
    for pid, group in sorted(groups.items()):
        report(group, f"worker pid {pid}")


if __name__ == "__main__":
    main()
