"""A job's life on a worker: one delivery claims the job's record, writes its events, keeps its
lease and finishes it, fenced. The worker only says what to run (`Deliveries.run`).

The Celery message is only the wake-up. Redis may deliver a message twice (a crashed worker's
unacknowledged job comes back; so does a live worker's whose heartbeat stalled past its lease),
so each delivery first claims the job's record by an atomic compare-and-set (lua.CLAIM):

    (none) ──claim──> RUNNING(owner, attempt, lease) ──finish──> DONE | FAILED
      │                   │ lease expired: the next delivery claims it again, attempt + 1
      │                   └ attempt > max_attempts: EXHAUSTED, then FAILED (WorkerLost)
      └ cancelled by its caller before it ran: nothing runs

A delivery that finds another owner's live lease runs nothing and checks back when that lease
would expire (`LeaseBusy`). The heartbeat renews the leases of running jobs. Only the current
owner and attempt may finish the job, and finishing also writes the terminal event, in the same
script, so a stale worker can never end a stream: its next event finds the log numbered past it,
or its finish is refused, and it stops (`JobLost`).

Every event goes out in one round trip that appends it to the job's event log and publishes it
(lua.APPEND). A new attempt continues the log's numbering and starts with a `restart` event, so
readers drop the text of the attempt before it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar, cast

import redis

from . import job_record, keys, lua
from .errors import JobFailed, SmmfError
from .jobs import StreamEvent, ToolCallDelta

if TYPE_CHECKING:
    from .celery_ext import ResultBackend

log = logging.getLogger("smmf_queue.attempt")

R = TypeVar("R")
#: the error type of a job that was delivered more than `max_attempts` times.
WORKER_LOST = "WorkerLost"
ClaimOutcome = Literal["claimed", "busy", "finished", "exhausted", "cancelled"]


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    #: the attempt number when claimed or exhausted; ms until the other lease ends when busy.
    value: int


class LeaseBusy(SmmfError):
    """Raised when another replica holds a live lease on the job: the delivery runs nothing and
    should come back in `retry_in_s` (the worker's task retries). Never reaches a caller."""

    def __init__(self, job_id: str, retry_in_s: float):
        super().__init__(f"job {job_id} is running elsewhere; check back in {retry_in_s:.1f}s",
                         job_id=job_id)
        self.retry_in_s = retry_in_s


class JobLost(SmmfError):
    """Raised when a later delivery took the job over while this attempt ran (its worker
    stalled past the lease): its next event found the log past it, or its finish was refused.
    The attempt stops and writes nothing more; the later one streams on. Never reaches a
    caller."""

    def __init__(self, job_id: str, attempt: int):
        super().__init__(f"attempt {attempt} lost the job to a later delivery; stopped",
                         job_id=job_id)


#: the end of what Redis answers an XADD whose id is not past the log's newest entry.
_LOG_IS_PAST = "equal or smaller than the target stream top item"


class ClaimRefused(SmmfError):
    """Raised when a job started ahead of its claim (see PendingClaim) turns out not to be this
    delivery's first attempt: nothing was published, and the delivery goes on the ordinary way
    with `claim`. Never leaves `Deliveries.run`."""

    def __init__(self, claim: Claim):
        super().__init__(f"claim came back {claim.outcome} (attempt {claim.value})")
        self.claim = claim


class Deliveries:
    """How one worker takes deliveries of jobs: claims, leases, events and fenced finishes."""

    def __init__(self, client: redis.Redis, worker_id: str, *, lease_s: float, max_attempts: int,
                 record_ttl_s: int, event_ttl_s: int, max_events: int):
        self.client = client
        self.worker_id = worker_id
        self.lease_ms = int(lease_s * 1000)
        self.max_attempts = max_attempts
        self.record_ttl_s = record_ttl_s
        #: seconds an event log lives after its last event, and the events it keeps.
        self.event_ttl_s = event_ttl_s
        self.max_events = max_events
        #: where set (WorkerRuntime.write_results_with_finish), each finish also writes the
        #: job's Celery result, and the worker's tasks store none.
        self.results: ResultBackend | None = None
        #: called with the job's id when an attempt finds that a later delivery holds the job
        #: (its finish refused, or its next event past the log): on Redis its message's ack
        #: then leaves kombu's lease, the later delivery's (celery_ext.keep_lease_of).
        self.on_lost: Callable[[str], None] = lambda job_id: None
        #: where set (WorkerRuntime.settle_messages_with_finish): kombu's bookkeeping of the
        #: message of a job held here (its hash, its index, its tag), which the job's finish
        #: removes (lua.FINISH), then telling `on_settled` the tag, so that its ack only
        #: forgets it.
        self.held_message: Callable[[str], tuple[str, str, str] | None] = lambda job_id: None
        self.on_settled: Callable[[str], None] = lambda job_id: None
        self._claim = client.register_script(lua.CLAIM)
        self._renew = client.register_script(lua.RENEW)
        self._release = client.register_script(lua.RELEASE)
        self._append = client.register_script(lua.APPEND)
        self._finish = client.register_script(lua.FINISH)
        #: owner → job id of each delivery running here, for lease renewal. By owner: a second
        #: delivery of a running job (a visibility timeout's) must not hide the first's lease.
        self._running: dict[str, str] = {}
        self._running_lock = threading.Lock()

    def run(self, job_id: str, reply_to: str | None, work: Callable[[Attempt], R], *,
            ahead: bool = False) -> R | None:
        """One delivery of a job: claim it, and if it is ours run `work` on its attempt.

        None when there is nothing to run (finished, cancelled); LeaseBusy when another replica
        holds it. With `ahead` (a chat's first delivery) the claim is sent and `work` starts at
        once; the answer is read before the first event is written, and should it say anything
        but "first attempt" the delivery goes on as if it had claimed first. Everything else
        claims first: a redelivery (a job that killed its worker must be counted before it runs
        again) and embeddings (a resumed batch sends finished chunks again).
        """
        owner = f"{self.worker_id}/{uuid.uuid4().hex[:8]}"
        with self._holding(job_id, owner):
            if ahead:
                pending = PendingClaim(self, job_id, owner)
                try:
                    return work(Attempt(self, job_id, owner, 1, reply_to, gate=pending.confirm))
                except ClaimRefused as refused:
                    claim = refused.claim
                finally:
                    pending.release()
            else:
                claim = self.claim(job_id, owner)
            return self._run_claimed(job_id, owner, claim, reply_to, work)

    def _run_claimed(self, job_id: str, owner: str, claim: Claim, reply_to: str | None,
                     work: Callable[[Attempt], R]) -> R | None:
        if claim.outcome in ("finished", "cancelled"):
            log.info("job %s is %s; not running it", job_id, claim.outcome)
            return None
        if claim.outcome == "busy":
            raise LeaseBusy(job_id, claim.value / 1000 + 1)
        attempt = Attempt(self, job_id, owner, claim.value, reply_to,
                          last_seq=self.last_seq(job_id) if claim.value > 1 else 0)
        if claim.outcome == "exhausted":
            attempt.fail(JobFailed(f"job was delivered {claim.value - 1} times and its worker died "
                                   "each time", error_type=WORKER_LOST, job_id=job_id))
        if claim.value > 1:
            attempt.restart()
        return work(attempt)

    def claim(self, job_id: str, owner: str) -> Claim:
        """Claim a job's record: a first delivery's with one `SET NX` (job_record.py), any other
        through lua.CLAIM."""
        if self.client.set(*self._first_claim(job_id, owner), nx=True, px=self.record_ttl_ms):
            return Claim("claimed", 1)
        return self.claim_again(job_id, owner)

    def claim_again(self, job_id: str, owner: str) -> Claim:
        """Claim a job whose record is there already (lua.CLAIM)."""
        return _decode_claim(self._claim(keys=[keys.job_record(job_id)],
                                         args=[owner, self.lease_ms, self.max_attempts, self.record_ttl_s]))

    def _first_claim(self, job_id: str, owner: str) -> tuple[str, str]:
        """The key and value of a first claim's SET (with NX, PX record_ttl_ms)."""
        return keys.job_record(job_id), job_record.first_claim(owner, self.lease_ms, self.record_ttl_ms)

    @property
    def record_ttl_ms(self) -> int:
        return self.record_ttl_s * 1000

    def renew_leases(self) -> None:
        """Extend the leases of this worker's running jobs, and keep their records, in one round
        trip."""
        with self._running_lock:
            leases = dict(self._running)
        if not leases:
            return
        pipe = self.client.pipeline(transaction=False)
        for owner, job_id in leases.items():
            self._renew(keys=[keys.job_record(job_id)], args=[owner, self.record_ttl_s], client=pipe)
        pipe.execute()

    def release_leases(self) -> int:
        """Give up the leases of this worker's running jobs at once (it is stopping before they
        ended), so that their next deliveries claim them at once (their messages go back with
        celery_ext.give_back_held_messages). How many."""
        with self._running_lock:
            leases = dict(self._running)
        pipe = self.client.pipeline(transaction=False)
        for owner, job_id in leases.items():
            self._release(keys=[keys.job_record(job_id)], args=[owner], client=pipe)
        return sum(pipe.execute()) if leases else 0

    def result_copy(self, job_id: str, result: Any, failure: JobFailed | None) -> tuple[str, str, int]:
        """KEYS[3], ARGV[10] and ARGV[11] of lua.FINISH: the Celery result's key, meta and TTL,
        or an empty meta (the record's key standing in for the unused key) where the tasks
        store their results themselves."""
        if self.results is None:
            return keys.job_record(job_id), "", 0
        return (*self.results.result_copy(job_id, result, failure), int(self.results.expires))

    @property
    def in_flight(self) -> int:
        with self._running_lock:
            return len(self._running)

    def last_seq(self, job_id: str) -> int:
        """The seq of the newest logged event of a job (0 when none), so a new attempt continues it."""
        newest = cast(list[tuple[bytes, Any]], self.client.xrevrange(keys.event_log(job_id), count=1))
        return int(newest[0][0].split(b"-")[0]) if newest else 0

    @contextlib.contextmanager
    def _holding(self, job_id: str, owner: str) -> Iterator[None]:
        """Count the job as running here (its lease renewed by the heartbeat) while it runs."""
        with self._running_lock:
            self._running[owner] = job_id
        try:
            yield
        finally:
            with self._running_lock:
                self._running.pop(owner, None)


#: seconds between an attempt's looks for its caller's cancel (Attempt.write).
CANCEL_CHECK_S = 0.1


class Attempt:
    """One attempt at one job on this worker: writes its events, numbered from `last_seq + 1`,
    and finishes it if its owner still holds the record."""

    def __init__(self, deliveries: Deliveries, job_id: str, owner: str, number: int,
                 reply_to: str | None, *, last_seq: int = 0, gate: Callable[[], None] | None = None):
        self._deliveries = deliveries
        self.job_id = job_id
        self.owner = owner
        self.number = number
        self.reply_to = reply_to or ""
        self.seq = last_seq
        #: called once, before anything is written: raises ClaimRefused to stop the job unpublished.
        self._gate = gate
        #: when this attempt last set its log's TTL and looked for a cancel (monotonic s): a
        #: first attempt's log needs no TTL before its finish, and the claim, just made, looked.
        now = time.monotonic()
        self._ttl_set_at: float | None = now if number == 1 else None
        self._cancel_seen_at = now
        #: the reply's last delta, kept for the finish to write in its round trip (`delta`).
        self._last_delta: StreamEvent | None = None

    def next_event(self, type_: str, **fields: Any) -> StreamEvent:
        """Build the next event in order (not yet written)."""
        self.seq += 1
        return StreamEvent(seq=self.seq, attempt=self.number, type=type_, **fields)  # type: ignore[arg-type]

    def write(self, event: StreamEvent) -> bool:
        """Append and publish one event; True when the caller has cancelled the job; JobLost
        when a later delivery wrote past this attempt's numbering (it took the job over).

        A first attempt's log gets its TTL from the finish; a later attempt's (its worker died
        before the finish) with its first event; a long attempt's again each half TTL, so a log
        never expires under a running job. The cancel mark, which the claim read, is read again
        at most every CANCEL_CHECK_S: a cancelled job stops within that, at an event."""
        now = time.monotonic()
        set_ttl = self._ttl_set_at is None or now - self._ttl_set_at >= self._deliveries.event_ttl_s / 2
        check = now - self._cancel_seen_at >= CANCEL_CHECK_S
        try:
            cancelled = self._deliveries._append(
                keys=[keys.event_log(self.job_id), keys.job_record(self.job_id)],
                args=[*self._log_args(event), int(set_ttl), int(check)])
        except redis.ResponseError as exc:
            if _LOG_IS_PAST not in str(exc):
                raise
            self._lost()
        if set_ttl:
            self._ttl_set_at = now
        if check:
            self._cancel_seen_at = now
        return bool(cancelled)

    def delta(self, text: str, reasoning: str = "", tool_calls: list[ToolCallDelta] | None = None,
              logprobs: list[dict[str, Any]] | None = None, *, last: bool = False) -> bool:
        """Write a delta; True when the caller has cancelled the job. The `last` one (the
        reply's end came with it) is kept and written by the finish, in its round trip."""
        event = self.next_event("delta", text=text, reasoning=reasoning,
                                tool_calls=tool_calls or None, logprobs=logprobs or None)
        if last:
            self._last_delta = event
            return False
        return self.write(event)

    def restart(self) -> None:
        """Tell readers that a new attempt begins and the text so far is void."""
        self.write(self.next_event("restart", worker=self._deliveries.worker_id))

    def finish(self, event: StreamEvent, result: Any = None, failure: JobFailed | None = None) -> None:
        """Mark the job DONE or FAILED and write its terminal event, after the last delta if
        one was kept (`delta`), and its result or failure (Deliveries.result_copy), and remove
        its message's bookkeeping where the worker holds it (Deliveries.held_message), if this
        attempt still owns it; JobLost if a later delivery holds it (the fence refused: nothing
        was written), as from an event."""
        deliveries = self._deliveries
        state = "DONE" if event.type == "end" else "FAILED"
        result_key, meta, ttl_s = deliveries.result_copy(self.job_id, result, failure)
        last, self._last_delta = self._last_delta, None
        last_args: list[Any] = [last.encode(), last.seq] if last is not None else ["", 0]
        record = keys.job_record(self.job_id)
        unacked, index, tag = deliveries.held_message(self.job_id) or (record, record, "")
        if not deliveries._finish(
                keys=[keys.event_log(self.job_id), record, result_key, unacked, index],
                args=[*self._log_args(event), self.owner, self.number, state, meta, ttl_s, *last_args, tag]):
            self._lost()
        if tag:
            deliveries.on_settled(tag)

    def fail(self, exc: JobFailed) -> NoReturn:
        """End the job with an `error` event (fenced like any finish), then raise `exc`
        (JobLost instead if a later delivery holds the job: its outcome is that one's)."""
        self.finish(self.next_event("error", error_type=exc.error_type, error_message=exc.message,
                                    worker=self._deliveries.worker_id), failure=exc)
        raise exc

    def _lost(self) -> NoReturn:
        """A later delivery holds the job: tell the worker (Deliveries.on_lost) and stop."""
        self._deliveries.on_lost(self.job_id)
        raise JobLost(self.job_id, self.number) from None

    def _log_args(self, event: StreamEvent) -> list[Any]:
        """ARGV of lua._APPEND_BODY; every write, terminal ones too, passes the gate first."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate()
        deliveries = self._deliveries
        return [event.encode(), event.seq, deliveries.max_events, deliveries.event_ttl_s,
                self.reply_to, self.job_id]


class PendingClaim:
    """A claim on its way to Redis while the worker starts the model: `result()` reads the answer.

    Claiming first and then starting the model put a whole Redis round trip before the first
    token; sent ahead, it overlaps the model's work (the first token sooner by most of that
    round trip: docs/performance-log.md).
    What is sent is a first claim's `SET NX`; where it finds a record there, the claim goes on
    through lua.CLAIM when the answer is read. The worker reads the answer before it publishes
    anything. Should reading fail (a broken connection), the same owner claims again the
    ordinary way.
    """

    def __init__(self, deliveries: Deliveries, job_id: str, owner: str):
        self._deliveries, self._job_id, self._owner = deliveries, job_id, owner
        self._claim: Claim | None = None
        self._pool = deliveries.client.connection_pool
        self._connection: Any = self._pool.get_connection()
        try:  # what redis-py's set(nx=True, px=...) does, minus waiting for the answer
            self._connection.send_command("SET", *deliveries._first_claim(job_id, owner), "NX",
                                          "PX", deliveries.record_ttl_ms)
        except (OSError, redis.RedisError):
            self._release(broken=True)

    def confirm(self) -> None:
        """Raise ClaimRefused unless this delivery claimed the job's first attempt."""
        claim = self.result()
        if (claim.outcome, claim.value) != ("claimed", 1):
            raise ClaimRefused(claim)

    def release(self) -> None:
        """Give the connection back if the answer was never read (the job stopped before)."""
        if self._connection is not None:
            self._release(broken=True)  # an unread reply is on it

    def result(self) -> Claim:
        """Redis's answer (read once; later calls return the same claim)."""
        if self._claim is None:
            self._claim = self._read()
        return self._claim

    def _read(self) -> Claim:
        if self._connection is not None:
            try:
                reply = self._connection.read_response()
            except (OSError, redis.RedisError):
                self._release(broken=True)
            else:
                self._release()
                if reply is None:  # a record is there: not a first delivery, or cancelled
                    return self._deliveries.claim_again(self._job_id, self._owner)
                return Claim("claimed", 1)
        return self._deliveries.claim(self._job_id, self._owner)  # not sent, or its answer lost

    def _release(self, broken: bool = False) -> None:
        connection, self._connection = self._connection, None
        if broken:
            connection.disconnect()
        self._pool.release(connection)


def _decode_claim(reply: list[Any]) -> Claim:
    outcome, value = reply
    return Claim(outcome.decode(), int(value))
