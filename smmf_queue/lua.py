"""Every Lua script of a job's record and its event log, in one place.

Each runs atomically on Redis, which is what makes a job's life safe when the broker delivers it
twice: a claim, a lease renewal and a fenced finish are each one compare-and-set. `attempt.py`
runs them (see its state diagram); nothing else writes a job record or an event log.
Times come from Redis's own clock (`TIME`), so workers on other hosts agree on every lease.
"""

from __future__ import annotations

#: Claim a job's record for one delivery.
#: KEYS[1] record, KEYS[2] cancel flag; ARGV: owner, lease_ms, max_attempts, record_ttl_s.
#: Answers {outcome, value}: 'claimed' or 'exhausted' with the attempt number, 'busy' with the
#: ms until the other owner's lease ends, 'finished' or 'cancelled' with 0.
CLAIM = """
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

#: Extend a running job's lease, if `owner` still holds it (answers 1, else 0).
#: KEYS[1] record; ARGV: owner, lease_ms.
RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', now_ms + tonumber(ARGV[2]))
return 1
"""

#: Append one event to the log (a capped Stream whose entry ids are `<seq>-0`), refresh the
#: log's TTL, publish the event on the job's channel and, prefixed with the job id, on its
#: producer's reply channel. Shared by APPEND and FINISH.
#: KEYS[1] log; ARGV[1..7]: event json, seq, maxlen, ttl_s, job channel, reply channel ('' for
#: none), job id.
_APPEND_BODY = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[2] .. '-0', 'e', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[1])
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7] .. ' ' .. ARGV[1]) end
"""

#: Append and publish one event, answering whether the caller cancelled the job (KEYS[2], the
#: cancel flag): the check costs no round trip of its own.
#: KEYS[1] log, KEYS[2] cancel flag; ARGV as _APPEND_BODY.
APPEND = _APPEND_BODY + "return redis.call('EXISTS', KEYS[2])"

#: Mark the job DONE or FAILED and write its terminal event, only if `owner` and `attempt` still
#: hold the record (answers 1, else 0): a stale worker can never end a stream.
#: KEYS[1] log, KEYS[2] record; ARGV[1..7] as _APPEND_BODY, ARGV[8] owner, ARGV[9] attempt,
#: ARGV[10] final state.
FINISH = """
if redis.call('HGET', KEYS[2], 'owner') ~= ARGV[8]
   or redis.call('HGET', KEYS[2], 'attempt') ~= ARGV[9] then return 0 end
redis.call('HSET', KEYS[2], 'state', ARGV[10])
""" + _APPEND_BODY + "return 1"
