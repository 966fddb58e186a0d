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
from typing import Literal

import redis

from . import keys
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
        outcome, value = self._claim(keys=[keys.job_record(job_id), keys.cancel_flag(job_id)],
                                     args=[owner, self.lease_ms, self.max_attempts, self.ttl_s])
        return Claim(outcome.decode(), int(value))

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
