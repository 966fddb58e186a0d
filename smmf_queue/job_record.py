"""A job's record, as Redis keeps it: one JSON string with a TTL.

The record is the truth of a job's life (attempt.py draws it; lua.py moves it). It is a string,
not a hash, so that a first delivery claims it with one command, `SET NX PX`: it writes the
record and its TTL (the lease's clock, lua.py) only if no record is there. Anything else there
(a redelivery's record, a finished job's, a caller's cancel mark) makes the SET do nothing, and
the delivery claims through lua.CLAIM, which reads it. A hash claim took a script call, a read,
a write and an EXPIRE: four commands of every job on the Redis that every worker shares.

Fields: `state` (RUNNING, EXHAUSTED, DONE, FAILED), `owner` (the delivery holding it),
`attempt`, `lease_ms` (0 once given up), `ttl_ms` (the TTL set at the claim and each renewal),
and `cancelled` (1) once its caller cancelled it. Workers of before session 20 wrote a hash;
lua.CLAIM converts one it meets.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from . import keys


def first_claim(owner: str, lease_ms: int, ttl_ms: int) -> str:
    """The record a first delivery writes with `SET NX PX ttl_ms` (Deliveries.claim)."""
    return json.dumps({"state": "RUNNING", "owner": owner, "attempt": 1, "lease_ms": lease_ms,
                       "ttl_ms": ttl_ms}, separators=(",", ":"))


def decode(raw: bytes | str | None) -> dict[str, Any]:
    """A record's fields ({} for none)."""
    return json.loads(raw) if raw else {}


def read(client: redis.Redis, job_id: str) -> dict[str, Any]:
    """A job's record's fields ({} for none), for tools and tests: workers read it in lua.py."""
    return decode(client.get(keys.job_record(job_id)))
