"""The gateway's CPU per request at an earlier revision (A) against the checkout's (B), on one
stack: how session 18 measured each change to the gateway (docs/performance-log.md).

Starts bench_cpu.py's stack (a private Redis, the fast FAKE backend, one worker serving
`fast-proxy` and `fast-embed`), then two gateways on it: A runs the code of `--base` (checked
out into a temporary git worktree), B the code of this checkout. Each round sends `--n`
requests to each, 8 at a time, alternating which goes first, and reads each gateway process's
CPU (user + system, /proc) around its requests. Prints each round's figures and B/A, then the
median of the rounds' ratios: the machine's speed drifts between rounds, not within a pair.

    .venv/bin/python scripts/bench_gateway_ab.py --base HEAD~1 [--path chat|embedding] [--n 600] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench_cpu import EMBED, cpu_s, embedding, embedding_toml, run_gateway, running, streamed_chat
from bench_gateway_load import MODEL, _healthy, fake_backend, models_toml
from benchkit import free_port, worker_stack

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = {"chat": streamed_chat, "embedding": embedding}


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """`revision`'s tree in a temporary git worktree, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="smmf-ab-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(folder), revision],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)


@contextmanager
def gateway_from(source: Path, config: Path) -> Iterator[tuple[int, int]]:
    """A gateway running the smmf_queue package in `source`: its port and pid."""
    port = free_port()
    with open(config.with_name(f"gateway-{source.name}.log"), "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "smmf_queue", "gateway", "-c", str(config),
                                    "--port", str(port)], cwd=source, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(source)})
    with running(process) as pid:
        asyncio.run(_healthy(port))
        yield port, pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision gateway A runs")
    parser.add_argument("--path", choices=sorted(REQUESTS), default="chat")
    parser.add_argument("--n", type=int, default=600, help="requests per gateway per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    request = REQUESTS[args.path]
    with ExitStack() as stack:
        base = stack.enter_context(worktree(args.base))
        backend = stack.enter_context(fake_backend())
        config, _ = stack.enter_context(worker_stack(models_toml(backend) + embedding_toml(backend), [MODEL, EMBED]))
        gateways = {"A": stack.enter_context(gateway_from(base, config)),
                    "B": stack.enter_context(gateway_from(ROOT, config))}
        for port, _ in gateways.values():
            run_gateway(port, request, 100, 8)  # warm both
        ms: dict[str, list[float]] = {"A": [], "B": []}
        for round_ in range(args.rounds):
            for name in (("A", "B") if round_ % 2 == 0 else ("B", "A")):
                port, pid = gateways[name]
                before = cpu_s(pid)
                run_gateway(port, request, args.n, 8)
                ms[name].append((cpu_s(pid) - before) * 1000 / args.n)
            print(f"round {round_ + 1}: A {ms['A'][-1]:.3f} ms, B {ms['B'][-1]:.3f} ms per {args.path}, "
                  f"B/A {ms['B'][-1] / ms['A'][-1]:.3f}", flush=True)
    ratios = [b / a for a, b in zip(ms["A"], ms["B"])]
    print(f"{args.path}: A ({args.base}) {statistics.median(ms['A']):.3f} ms, B (this checkout) "
          f"{statistics.median(ms['B']):.3f} ms of gateway CPU per request; B/A {statistics.median(ratios):.3f} "
          f"(median of the rounds' ratios)")


if __name__ == "__main__":
    main()
