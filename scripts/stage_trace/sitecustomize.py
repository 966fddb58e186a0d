"""Stage tracer for diagnosing where a streamed chat's first token spends its time.

A diagnostic, not a benchmark: it wraps private functions of smmf-queue and kombu (last checked
against kombu 5.6 and this repo on 2026-11-25), so it may need mending when they change. Put
this folder first on PYTHONPATH and name an output folder in SMMF_TRACE; every Python process
then writes `<time> <stage> <job id>` lines to `<folder>/<pid>.log`. Then `report.py <folder>`
prints the p50 of each stage. Sequential chats only: the client's first and last stage are
matched to jobs by order.

    mkdir /tmp/trace && SMMF_TRACE=/tmp/trace PYTHONPATH=scripts/stage_trace \\
        .venv/bin/python scripts/bench_dispatch.py --n 200
    .venv/bin/python scripts/stage_trace/report.py /tmp/trace
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable


def _install(folder: str) -> None:
    out = open(os.path.join(folder, f"{os.getpid()}.log"), "w", buffering=1)  # noqa: SIM115

    def mark(stage: str, job: Any = "-") -> None:
        out.write(f"{time.time():.6f} {stage} {job}\n")

    def around(owner: Any, name: str, before: Callable[..., None] | None = None,
               after: Callable[..., None] | None = None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def traced(*args: Any, **kwargs: Any) -> Any:
            if before:
                before(*args)
            result = original(*args, **kwargs)
            if after:
                after(*args)
            return result
        setattr(owner, name, traced)

    import kombu.transport.redis as kombu_redis

    from smmf_queue import attempt, client, worker

    # client: the call, the send, the first text handed to the caller
    stream_chat = client.Client.stream_chat

    def traced_stream_chat(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark("1_call")
        first = True
        for delta in stream_chat(self, *args, **kwargs):
            if first and delta.text:
                mark("9_caller_has_text")
                first = False
            yield delta
    client.Client.stream_chat = traced_stream_chat  # type: ignore[method-assign]
    around(client.AsyncClient, "_send", before=lambda _, kind, request, *rest: mark("2_send", request["job_id"]))
    # worker: kombu took the message (after BRPOP) and wrote its unacked bookkeeping; our code
    around(kombu_redis.QoS, "append", before=lambda _, message, *rest: mark("3_taken", message.headers.get("id")),
           after=lambda _, message, *rest: mark("4_bookkept", message.headers.get("id")))
    around(worker.WorkerRuntime, "execute", before=lambda _, task, *rest: mark("5_execute", task.request.id))
    around(worker.WorkerRuntime, "_resolve", after=lambda _, kind, payload, job_id: mark("6_resolved", job_id))

    def first_text(attempt_: Any, *rest: Any) -> None:
        if attempt_.seq == 0:
            mark("7_first_text", attempt_.job_id)
    around(attempt.Attempt, "delta", before=first_text)


if os.environ.get("SMMF_TRACE"):
    _install(os.environ["SMMF_TRACE"])
