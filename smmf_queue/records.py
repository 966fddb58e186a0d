"""Job records: the truth about who runs a job, which attempt it is on, and whether it is done.

The Celery message is only the wake-up. Redis may deliver a message twice (a crashed worker's
unacknowledged job comes back; so does a long one after the visibility timeout, celery #5935),
so each delivery first claims the job's record by an atomic compare-and-set:

    (none) ──claim──> RUNNING(owner, attempt, lease) ──finish──> DONE | FAILED
      └ cancelled by its caller before it ran: nothing runs
                          │ lease expired: the next delivery claims it again, attempt + 1
                          └ attempt > max_attempts: FAILED (the job keeps killing workers)

A delivery that finds another owner's live lease runs nothing and checks back when that lease
would expire. Only the current owner and attempt may finish the job, and finishing also writes
the terminal event, in the same script, so a stale worker can never end a stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import redis

from . import keys
from .errors import SmmfError
from .jobs import StreamEvent
from .streaming import APPEND_LUA_BODY, EventWriter

ClaimOutcome = Literal["claimed", "busy", "finished", "exhausted", "cancelled"]

# KEYS[1] record, KEYS[2] cancel flag; ARGV: owner, lease_ms, max_attempts, record_ttl_s
_CLAIM_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', 0} end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'DONE' or state == 'FAILED' then return {'finished', 0} end
if state == 'RUNNING' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until'))
  if owner ~= ARGV[1] and lease > now_ms then return {'busy', lease - now_ms} end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_until', now_ms + tonumber(ARGV[2]))
if attempt > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'EXHAUSTED')
  return {'exhausted', attempt}
end
redis.call('HSET', KEYS[1], 'state', 'RUNNING')
return {'claimed', attempt}
"""

# KEYS[1] record; ARGV: owner, lease_ms
_RENEW_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', now_ms + tonumber(ARGV[2]))
return 1
"""

# KEYS[1] log, KEYS[2] record; ARGV[1..7] as APPEND_LUA_BODY, ARGV[8] owner, ARGV[9] attempt,
# ARGV[10] final state
_FINISH_LUA = """
if redis.call('HGET', KEYS[2], 'owner') ~= ARGV[8]
   or redis.call('HGET', KEYS[2], 'attempt') ~= ARGV[9] then return 0 end
redis.call('HSET', KEYS[2], 'state', ARGV[10])
""" + APPEND_LUA_BODY + "return 1"


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    #: the attempt number when claimed or exhausted; ms until the other lease ends when busy.
    value: int


class ClaimRefused(SmmfError):
    """A job started ahead of its claim (see PendingClaim) turned out not to be this delivery's
    first attempt to run: nothing was published, and the worker handles `claim` the ordinary way.
    Never reaches a caller."""

    def __init__(self, claim: Claim):
        super().__init__(f"claim came back {claim.outcome} (attempt {claim.value})")
        self.claim = claim


class JobRecords:
    """Claims, renews and finishes job records for one worker."""

    def __init__(self, client: redis.Redis, *, lease_s: float, max_attempts: int, ttl_s: int):
        self.client = client
        self.lease_ms = int(lease_s * 1000)
        self.max_attempts = max_attempts
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._finish = client.register_script(_FINISH_LUA)

    def claim(self, job_id: str, owner: str) -> Claim:
        script_keys, args = self._claim_argv(job_id, owner)
        return _decode_claim(self._claim(keys=script_keys, args=args))

    def send_claim(self, job_id: str, owner: str) -> PendingClaim:
        """Send the claim and return at once; its answer is read later (see PendingClaim)."""
        return PendingClaim(self, job_id, owner)

    def _claim_argv(self, job_id: str, owner: str) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of _CLAIM_LUA."""
        return ([keys.job_record(job_id), keys.cancel_flag(job_id)],
                [owner, self.lease_ms, self.max_attempts, self.ttl_s])

    def renew(self, leases: dict[str, str]) -> None:
        """Extend the leases of running jobs (job id → owner) in one round trip."""
        if not leases:
            return
        pipe = self.client.pipeline(transaction=False)
        for job_id, owner in leases.items():
            self._renew(keys=[keys.job_record(job_id)], args=[owner, self.lease_ms], client=pipe)
        pipe.execute()

    def finish(self, writer: EventWriter, owner: str, event: StreamEvent) -> bool:
        """Mark the job DONE or FAILED and write its terminal event, if `owner` still owns it."""
        state = "DONE" if event.type == "end" else "FAILED"
        done = self._finish(keys=[keys.event_log(writer.job_id), keys.job_record(writer.job_id)],
                            args=[*writer.log_args(event), owner, writer.attempt, state])
        return bool(done)


class PendingClaim:
    """A claim on its way to Redis while the worker starts the model: `result()` reads the answer.

    Claiming first and then starting the model put a whole Redis round trip (0.75 ms on this
    machine) before the first token; sent ahead, it overlaps the model's work (first token
    0.4–0.5 ms p50 sooner, BENCHMARKS.md).
    The worker reads the answer before it publishes anything. Should reading fail (a broken
    connection; NOSCRIPT after a Redis restart), the same owner claims again the ordinary way.
    """

    def __init__(self, records: JobRecords, job_id: str, owner: str):
        self._records, self._job_id, self._owner = records, job_id, owner
        self._claim: Claim | None = None
        self._pool = records.client.connection_pool
        script_keys, args = records._claim_argv(job_id, owner)
        self._connection: Any = self._pool.get_connection()
        try:  # what redis-py's Script does, minus waiting for the answer
            self._connection.send_command("EVALSHA", records._claim.sha, len(script_keys),
                                          *script_keys, *args)
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
                return _decode_claim(reply)
        return self._records.claim(self._job_id, self._owner)  # not sent, or its answer lost

    def _release(self, broken: bool = False) -> None:
        connection, self._connection = self._connection, None
        if broken:
            connection.disconnect()
        self._pool.release(connection)


def _decode_claim(reply: list[Any]) -> Claim:
    outcome, value = reply
    return Claim(outcome.decode(), int(value))
