"""`n` choices of one chat request: one job per choice on the model's queue, run by whichever
workers are free (at once where there are several), merged into one reply.

Every provider honours `n` this way, so it is not in any provider's table. A seeded request
gives choice i the seed `seed + i` (past the largest seed, counting on from 0): the choices
differ as sampling makes them, and the request stays reproducible (unseeded, they differ by
chance; at temperature 0 they are alike, as OpenAI's are). Each choice processes the prompt
again; usage counts it once, as OpenAI's does.
A streamed reply of several choices carries no SSE ids: it cannot be resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .client import AsyncClient
from .errors import JobFailed, SmmfError
from .gateway_errors import classify
from .gateway_sse import KEEPALIVE, chat_choice, data, next_or_none, queued_stream, whole_choice
from .jobs import SEED_MAX, ChatDelta, ChatResult, Usage, new_job_id


def per_choice(fields: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The fields of each choice's job: the request's, with `seed + i` where it is seeded (a
    seed near SEED_MAX wraps to 0 rather than making a choice's job one that no engine takes)."""
    seed = fields.get("seed")
    return [{**fields, **({"seed": (seed + i) % (SEED_MAX + 1)} if seed is not None else {})}
            for i in range(n)]


async def whole(client: AsyncClient, model: str, messages: list[dict[str, Any]],
                fields: dict[str, Any], n: int, **call: Any) -> dict[str, Any]:
    """The reply of n choices, whole; a choice that fails fails the request (and the others
    stop: their jobs are cancelled)."""
    tasks = [asyncio.ensure_future(client.chat(model, messages, job_id=new_job_id(), **call, **f))
             for f in per_choice(fields, n)]
    try:
        results: list[ChatResult] = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    choices = [{**whole_choice(result, bool(fields.get("logprobs"))), "index": index}
               for index, result in enumerate(results)]
    return {"id": f"chatcmpl-{results[0].job_id}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage([result.usage for result in results]).model_dump()}


async def start(client: AsyncClient, model: str, messages: list[dict[str, Any]],
                fields: dict[str, Any], n: int,
                **call: Any) -> tuple[list[AsyncIterator[ChatDelta]], list[asyncio.Future[Any]]]:
    """Enqueue the n jobs of a streamed reply; a refusal (before anything was queued) raises
    here, so that it is a plain 4xx/5xx."""
    streams: list[AsyncIterator[ChatDelta]] = []
    firsts: list[asyncio.Future[Any]] = []
    try:
        for choice_fields in per_choice(fields, n):
            stream, first = await queued_stream(client, model, messages, job_id=new_job_id(),
                                                **call, **choice_fields)
            streams.append(stream)
            firsts.append(first)
    except BaseException:
        await _close(streams, firsts)
        raise
    return streams, firsts


async def streamed(model: str, streams: list[AsyncIterator[ChatDelta]],
                   firsts: list[asyncio.Future[Any]], include_usage: bool, keepalive_s: float,
                   on_end: Callable[[Usage | None], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
    """SSE frames of chat.completion.chunk objects whose choices carry their index, in the
    order the choices' deltas arrive; `[DONE]` once every choice has ended. `on_end` gets the
    usage of the choices that finished, however the reply ends (None if none did)."""
    merged: asyncio.Queue[tuple[int, ChatDelta | SmmfError | None]] = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(index, streams[index], firsts[index], merged))
             for index in range(len(streams))]
    chunk_id, created = f"chatcmpl-{new_job_id()}", int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return data({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": choices, **extra})

    for index in range(len(streams)):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}])
    usages: list[Usage] = []
    sent: set[int] = set()
    ended = 0
    try:
        while ended < len(streams):
            try:
                index, item = await asyncio.wait_for(merged.get(), timeout=keepalive_s)
            except asyncio.TimeoutError:
                yield KEEPALIVE
                continue
            if item is None:
                ended += 1
                continue
            if isinstance(item, ChatDelta) and item.restart and index in sent:
                item = JobFailed("the worker streaming a choice of this reply was lost after part "
                                 "of it was sent; retry the request", error_type="WorkerLost",
                                 model=model)
            if isinstance(item, SmmfError):
                _, kind, code = classify(item)
                yield data({"error": {"message": item.message, "type": kind, "param": None,
                                      "code": code}})
                break
            if item.text or item.reasoning or item.tool_calls or item.logprobs:
                sent.add(index)
                yield chunk([{**chat_choice(item, None), "index": index}])
            if item.finish_reason is not None:
                yield chunk([{**chat_choice(None, item.finish_reason), "index": index}])
                usages.append(item.usage or Usage())
        else:
            if include_usage:
                yield chunk([], usage=_usage(usages).model_dump())
    finally:
        for pump in pumps:
            pump.cancel()
        await _close(streams, firsts)
        if on_end is not None:
            await on_end(_usage(usages) if usages else None)
    yield b"data: [DONE]\n\n"


async def _pump(index: int, stream: AsyncIterator[ChatDelta], first: asyncio.Future[Any],
                merged: asyncio.Queue[tuple[int, ChatDelta | SmmfError | None]]) -> None:
    """One choice's deltas into the merged queue, then None (an error in its place)."""
    try:
        delta = await first
        while delta is not None:
            await merged.put((index, delta))
            delta = await next_or_none(stream)
    except SmmfError as exc:
        await merged.put((index, exc))
    finally:
        await merged.put((index, None))


async def _close(streams: list[AsyncIterator[ChatDelta]], firsts: list[asyncio.Future[Any]]) -> None:
    """Stop reading every choice; a job that has not ended is cancelled (the SDK's leave)."""
    for first in firsts:
        first.cancel()
    await asyncio.gather(*firsts, return_exceptions=True)
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


def _usage(usages: list[Usage]) -> Usage:
    """The usage of n choices of one prompt: the prompt once, every choice's completion."""
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(usage.completion_tokens for usage in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
