"""Every Lua script of a job's record and its event log, in one place.

Each runs atomically on Redis, which is what makes a job's life safe when the broker delivers it
twice: a claim, a lease renewal and a fenced finish are each one compare-and-set (a first
delivery's claim is a plain `SET NX`: job_record.py). `attempt.py`
runs them (see its state diagram); nothing else writes a job record or an event log, but for
the caller's CANCEL mark (client.py).
Leases are timed by Redis's own clock, so workers on other hosts agree on every one: a record's
TTL is set anew at each claim and renewal, so how long ago its owner last renewed is that TTL
(the record's `ttl_ms`) less what is left of it (PTTL). No script calls TIME.
"""

from __future__ import annotations

#: A job record's fields (job_record.py), as a table ({} for none): `local record = load(key)`.
_LOAD_BODY = """
local function load(key)
  local raw = redis.call('GET', key)
  if raw then return cjson.decode(raw) end
  return {}
end
"""

#: Claim a job's record for one delivery, where its first claim (`SET NX`, Deliveries.claim)
#: found a record there: a redelivery, a finished or cancelled job. (The lease that brings the job
#: back should its worker die is its message's, in kombu's index of taken messages:
#: celery_ext.renew_held_messages; the record's lease tells another delivery that this one is
#: alive.) A record that a worker of before session 20 wrote, as a hash, is read and rewritten.
#: KEYS[1] record; ARGV: owner, lease_ms, max_attempts, record_ttl_s.
#: Answers {outcome, value}: 'claimed' or 'exhausted' with the attempt number, 'busy' with the
#: ms until the other owner's lease ends, 'finished' or 'cancelled' (by its caller: CANCEL) with 0.
CLAIM = _LOAD_BODY + """
local function from_hash(key)
  local f = redis.call('HMGET', key, 'state', 'owner', 'lease_ms', 'attempt', 'cancelled', 'ttl_ms',
                       'lease_until')
  return {state = f[1] or nil, owner = f[2] or nil, lease_ms = tonumber(f[3]), attempt = tonumber(f[4]),
          cancelled = f[5] and 1 or nil, ttl_ms = tonumber(f[6]), lease_until = tonumber(f[7])}
end
local function lease_left(record)
  if record.ttl_ms then return (record.lease_ms or 0) - (record.ttl_ms - redis.call('PTTL', KEYS[1])) end
  local now = redis.call('TIME')  -- a hash of before session 19, which timed its lease by TIME
  return (record.lease_until or 0) - (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
end
local record
if redis.call('TYPE', KEYS[1]).ok == 'hash' then record = from_hash(KEYS[1]) else record = load(KEYS[1]) end
if record.cancelled then return {'cancelled', 0} end
local state = record.state
if state == 'DONE' or state == 'FAILED' then return {'finished', 0} end
if state == 'RUNNING' and record.owner ~= ARGV[1] then
  local left = lease_left(record)
  if left > 0 then return {'busy', left} end
end
local attempt = (record.attempt or 0) + 1
if attempt > tonumber(ARGV[3]) then state = 'EXHAUSTED' else state = 'RUNNING' end
local ttl_ms = tonumber(ARGV[4]) * 1000
redis.call('SET', KEYS[1], cjson.encode({state = state, owner = ARGV[1], attempt = attempt,
                                         lease_ms = tonumber(ARGV[2]), ttl_ms = ttl_ms}), 'PX', ttl_ms)
if state == 'EXHAUSTED' then return {'exhausted', attempt} end
return {'claimed', attempt}
"""

#: A caller no longer wants a job's result (its HTTP client left, say): mark its record, which
#: the claim and the running attempt read (Attempt.write), creating it if the job has not
#: started (so that its first claim finds it), and keep it at least ARGV[1] seconds (never
#: shorten a running job's). A hash is a record of a worker of before session 20.
#: KEYS[1] record.
CANCEL = _LOAD_BODY + """
local ttl = redis.call('TTL', KEYS[1])
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  redis.call('HSET', KEYS[1], 'cancelled', 1)
else
  local record = load(KEYS[1])
  record.cancelled = 1
  redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
end
if ttl < tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
"""

#: Extend a running job's lease, if `owner` still holds it and has not given it up (RELEASE)
#: (answers 1, else 0), by setting its record's TTL anew (see the top: the TTL is the lease's
#: clock), which also keeps the record record_ttl_s from now: a job that runs longer than that
#: would otherwise lose its record, and with it its fenced finish.
#: KEYS[1] record; ARGV: owner, record_ttl_s (the claim's).
RENEW = _LOAD_BODY + """
local record = load(KEYS[1])
if record.owner ~= ARGV[1] or record.state ~= 'RUNNING' or record.lease_ms == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: `append(event, seq)`: append one event to the log (a capped Stream whose entry ids are
#: `<seq>-0`) and publish it, prefixed with the job id, on its producer's reply channel: the
#: producer reads it live there, anyone else tails the log (client.AsyncClient.replay). Shared
#: by APPEND and FINISH, which call it with ARGV[1], ARGV[2].
#: KEYS[1] log; ARGV[1..6]: event json, seq, maxlen, ttl_s, reply channel ('' for none), job id.
_APPEND_BODY = """
local function append(event, seq)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'e', event)
  if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6] .. ' ' .. event) end
end
"""

#: Append and publish one event; when asked (ARGV[7], ARGV[8]: '1' or '0'), set the log's TTL
#: and answer whether the caller cancelled the job (CANCEL marked its record). The worker asks
#: for each only now and then (attempt.Attempt.write): per event, each was one more command on
#: the Redis every worker and gateway shares.
#: KEYS[1] log, KEYS[2] record; ARGV[1..6] as _APPEND_BODY.
APPEND = _APPEND_BODY + _LOAD_BODY + """
append(ARGV[1], ARGV[2])
if ARGV[7] == '1' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
if ARGV[8] == '1' and load(KEYS[2]).cancelled then return 1 end
return 0
"""

#: Mark the job DONE or FAILED and write its terminal event, only if `owner` and `attempt` still
#: hold the record (answers 1, else 0): a stale worker can never end a stream, nor overwrite the
#: result. With a result (ARGV[10], Celery's encoded meta) it is stored as Celery's Redis backend
#: would (KEYS[3], for ARGV[11] seconds), so that Celery's AsyncResult reads it, and no second
#: round trip or dedup read is needed. It is published for Celery's waiters only where the job
#: has no reply channel (a plain Celery producer's): the SDK and the gateway have the `end`
#: event, and a waiter of their jobs looks for the result each second
#: (celery_ext.ResultBackend).
#: A reply's last delta, when it came with its end (ARGV[12], its seq ARGV[13]), is appended and
#: published first, in the same call. With a delivery tag (ARGV[14]), the job's message is
#: removed from kombu's bookkeeping of taken messages (its hash KEYS[4] and index KEYS[5]) as its
#: ack would (celery_ext.held_message): the ack then only forgets it in the worker.
#: KEYS[1] log, KEYS[2] record, KEYS[3] result key, KEYS[4..5] kombu's unacked hash and index;
#: ARGV[1..6] as _APPEND_BODY, ARGV[7] owner, ARGV[8] attempt, ARGV[9] final state, ARGV[10]
#: result ('' for none), ARGV[11] result TTL, ARGV[12] the last delta ('' for none), ARGV[13]
#: its seq, ARGV[14] the message's delivery tag ('' for none).
FINISH = _APPEND_BODY + _LOAD_BODY + """
local record = load(KEYS[2])
if record.owner ~= ARGV[7] or record.attempt ~= tonumber(ARGV[8]) then return 0 end
record.state = ARGV[9]
redis.call('SET', KEYS[2], cjson.encode(record), 'KEEPTTL')
if ARGV[12] ~= '' then append(ARGV[12], ARGV[13]) end
append(ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[10] ~= '' then
  redis.call('SET', KEYS[3], ARGV[10], 'EX', ARGV[11])
  if ARGV[5] == '' then redis.call('PUBLISH', KEYS[3], ARGV[10]) end
end
if ARGV[14] ~= '' then
  redis.call('HDEL', KEYS[4], ARGV[14])
  redis.call('ZREM', KEYS[5], ARGV[14])
end
return 1
"""

#: Give up a running job's lease at once, if `owner` still holds it (answers 1, else 0): a worker
#: that stops before its job ended, so that the next delivery of the job claims it at once
#: instead of finding it busy until the lease would have run out (its message comes back by
#: celery_ext.give_back_held_messages).
#: KEYS[1] record; ARGV: owner.
RELEASE = _LOAD_BODY + """
local record = load(KEYS[1])
if record.owner ~= ARGV[1] or record.state ~= 'RUNNING' then return 0 end
record.lease_ms = 0
redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
return 1
"""
