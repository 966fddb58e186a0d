"""What the gateway counts for each request: a virtual key's admission before its job and
settlement after it (virtual_keys.py), and the job's row for the usage ledger (usage_ledger.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from starlette.datastructures import State

from . import keys, redis_clients
from .config import SmmfConfig
from .errors import SmmfError
from .jobs import ChatDelta, Usage
from .usage_ledger import LedgerWriter, ledger_row
from .virtual_keys import Admission, Gatekeeper, may_call

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """An admitted request, until its job ends."""

    job_id: str
    model: str
    kind: str
    inputs: int
    started: float
    admission: Admission | None

    def fallbacks(self, configured: list[str]) -> list[str]:
        """The model's fallbacks that the request's virtual key (if any) may call too."""
        allowed = self.admission.models if self.admission else []
        return [name for name in configured if may_call(allowed, name)]


class Accounting:
    """Virtual keys (with a master key) and the usage ledger (with `[usage] database_url`)."""

    def __init__(self, config: SmmfConfig, master: str | None):
        database = config.usage.database_url
        self.redis = redis_clients.connect_async(config.queue) if master or database else None
        self.gatekeeper = Gatekeeper(self.redis) if master and self.redis else None
        self.ledger = LedgerWriter(self.redis, database.get_secret_value()) if database and self.redis else None
        #: left streams whose jobs run on, waited for to settle (_follow).
        self._following: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self.ledger is not None:
            self.ledger.start()

    async def aclose(self) -> None:
        for task in list(self._following):
            task.cancel()
        if self.ledger is not None:
            await self.ledger.aclose()
        if self.redis is not None:
            await self.redis.aclose()

    async def admit(self, state: State, model: str, job_id: str, kind: str = "llm",
                    reserve: int = 0, inputs: int = 0) -> Ticket:
        """A request's ticket; a virtual key (`state.virtual_key`, set by the guard) is admitted
        first, and its `x-ratelimit-*` headers put on `state` for the response."""
        key = getattr(state, "virtual_key", None)
        admission = None
        if key is not None and self.gatekeeper is not None:
            admission = await self.gatekeeper.admit(key, model, reserve)
            state.ratelimit_headers = admission.headers
        return Ticket(job_id, model, kind, inputs, time.monotonic(), admission)

    async def check(self, state: State, model: str = "") -> list[str]:
        """A route that runs no job: a virtual key must still exist, be in date, and (with a
        model) be allowed it. The models it may call (names or patterns); empty for all."""
        key = getattr(state, "virtual_key", None)
        if key is None or self.gatekeeper is None:
            return []
        return await self.gatekeeper.check(key, model)

    async def settle(self, ticket: Ticket, usage: Usage | None) -> None:
        """Count what the ticket's job used (None: it failed)."""
        admission = ticket.admission
        row = None
        if self.ledger is not None:
            row = ledger_row(ticket.job_id, ticket.model, ticket.kind, usage, ticket.inputs,
                             time.monotonic() - ticket.started,
                             admission.token if admission else None, admission.alias if admission else None)
        if admission is not None and self.gatekeeper is not None:
            await self.gatekeeper.settle(admission, usage, row)
        elif row is not None and self.redis is not None:
            await self.redis.xadd(keys.USAGE_LEDGER, {"row": row})

    def on_end(self, ticket: Ticket, follow: Callable[[], AsyncIterator[ChatDelta]] | None = None,
               ) -> Callable[[Usage | None], Awaitable[None]] | None:
        """What a stream calls when it ends (its usage), or None where nothing is counted (no
        virtual key, no ledger): the stream then goes without the wrapper that watches it.
        With `follow` (a resumable stream's job, read again from its log): a stream that ended
        without usage, its reader gone while the job runs on, is settled once the job ends."""
        if ticket.admission is None and self.ledger is None:
            return None
        if follow is None:
            return partial(self.settle, ticket)
        return partial(self._settle_or_follow, ticket, follow)

    async def _settle_or_follow(self, ticket: Ticket, follow: Callable[[], AsyncIterator[ChatDelta]],
                                usage: Usage | None) -> None:
        if usage is not None:
            await self.settle(ticket, usage)
            return
        task = asyncio.get_running_loop().create_task(self._follow(ticket, follow))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow(self, ticket: Ticket, follow: Callable[[], AsyncIterator[ChatDelta]]) -> None:
        """Settle a left stream with the usage its job ends with (none if it failed or was
        cancelled, unresumed)."""
        usage = None
        try:
            with contextlib.suppress(SmmfError):
                async for delta in follow():
                    usage = delta.usage or usage
            await self.settle(ticket, usage)
        except (OSError, redis.RedisError) as exc:
            log.warning("job %s: usage of its left stream not counted: %s", ticket.job_id, exc)

    async def settled(self, ticket: Ticket, call: Awaitable[Any]) -> Any:
        """`call`'s result, its usage counted (none, if it fails; a result without usage, such as
        an `end` event that has none, used none)."""
        try:
            result = await call
        except BaseException:
            await self.settle(ticket, None)
            raise
        await self.settle(ticket, result.usage or Usage())
        return result
