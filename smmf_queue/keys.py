"""Every Redis key, channel and queue name smmf-queue uses, in one place.

Model names come from users' configs; `safe_name` maps them onto characters that are safe in
Redis keys and AMQP queue names, so "Qwen/Qwen2.5-7B" and "qwen:7b" both make valid names.
"""

from __future__ import annotations

import re

PREFIX = "smmf"

#: Celery's default queue: no job is ever sent there (each goes to its model's queue); named so
#: that nothing of ours lands in Celery's own default, "celery".
DEFAULT_QUEUE = f"{PREFIX}.default"

#: Celery task names: one per job kind; the model travels in the queue name and the request.
CHAT_TASK = "smmf.chat"
EMBED_TASK = "smmf.embed"
RERANK_TASK = "smmf.rerank"
#: the Celery task of each model kind.
TASK_OF_KIND = {"llm": CHAT_TASK, "embedding": EMBED_TASK, "reranker": RERANK_TASK}

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(model: str) -> str:
    """Map a model name onto [A-Za-z0-9._-] so it can sit inside any key or queue name."""
    return _UNSAFE.sub("_", model)


def queue_name(kind: str, model: str) -> str:
    """The Celery queue of one model: `smmf.llm.<model>` or `smmf.embedding.<model>`."""
    return f"{PREFIX}.{kind}.{safe_name(model)}"


#: priority lanes of a model's queue on Redis: interactive jobs (chat, `embed`) take lane 0,
#: batch embedding chunks lane 9, and a worker always takes from the lower lane first.
INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = 9
PRIORITY_STEPS = [INTERACTIVE_PRIORITY, BATCH_PRIORITY]
#: kombu's separator between a queue's name and its lane (lane 0 is the plain name). It is
#: kombu's default, and must stay so: kombu also uses it in its exchange binding table, which
#: every kombu client of the broker reads.
LANE_SEPARATOR = "\x06\x16"


def queue_lanes(kind: str, model: str) -> list[str]:
    """The Redis lists behind one model's queue, highest priority first."""
    name = queue_name(kind, model)
    return [name] + [f"{name}{LANE_SEPARATOR}{step}" for step in PRIORITY_STEPS if step]


def reply_channel(producer_id: str) -> str:
    """Pub/sub channel on which one producer (SDK client, gateway) receives all its jobs' events,
    each prefixed with its job id and a space."""
    return f"{PREFIX}:reply:{producer_id}"


def is_reply_channel(channel: str) -> bool:
    return channel.startswith(f"{PREFIX}:reply:")


def event_log(job_id: str) -> str:
    """Redis Stream keeping one job's events for replay (capped, with a TTL)."""
    return f"{PREFIX}:events:{job_id}"


def job_record(job_id: str) -> str:
    """JSON string holding one job's state, owner, attempt and lease, and its caller's cancel
    mark (job_record.py)."""
    return f"{PREFIX}:job:{job_id}"


#: Sorted set of dead letters (job id → unix time it was given up), newest last.
DEAD_LETTERS = f"{PREFIX}:dead"


def dead_letter(job_id: str) -> str:
    """JSON of one dead letter (see dead_letters.py)."""
    return f"{PREFIX}:dead:{job_id}"


def stream_reader(job_id: str) -> str:
    """Token of the last HTTP reader that resumed a job's SSE stream (see gateway_resume.py)."""
    return f"{PREFIX}:reader:{job_id}"


def worker_heartbeat(worker_id: str) -> str:
    """Key (with TTL) that says a worker is alive and what it serves."""
    return f"{PREFIX}:worker:{worker_id}"


#: Set of the ids of workers that beat (a reader drops those whose heartbeat key expired).
WORKERS = f"{PREFIX}:workers"


def virtual_key(key_hash: str) -> str:
    """Hash holding one virtual key's record (virtual_keys.py), under the SHA-256 of the key."""
    return f"{PREFIX}:vkey:{key_hash}"


#: the set of every virtual key's hash, and the hash from alias to key hash.
VIRTUAL_KEYS = f"{PREFIX}:vkeys"
VIRTUAL_KEY_ALIASES = f"{PREFIX}:vkeys:aliases"


def virtual_key_counters(token: str) -> str:
    """Prefix of one virtual key's counters: requests and tokens per minute window, tokens per
    budget period, and its usage (the admission script adds the rest of each name)."""
    return f"{PREFIX}:vkey:{token}:"


#: hashes of one UTC day's usage by virtual key and model, this prefix and the day's number
#: (days since 1970-01-01); fields `<token>|<model>|<measure>` (virtual_keys.py).
USAGE_DAY_PREFIX = f"{PREFIX}:usage:"


def usage_day(day: int) -> str:
    return f"{USAGE_DAY_PREFIX}{day}"


#: the stream of finished jobs' rows on their way to the usage ledger (usage_ledger.py).
USAGE_LEDGER = f"{PREFIX}:usage:ledger"


def model_limits(model: str) -> str:
    """Prefix of one model's requests and tokens per minute window (model_limits.py)."""
    return f"{PREFIX}:limit:{safe_name(model)}:"


def account_limits(account: str) -> str:
    """Prefix of one upstream account's requests and tokens per minute window (upstream_accounts.py)."""
    return f"{PREFIX}:account:{safe_name(account)}:"


def account_cooldown(account: str) -> str:
    """Set, with a time to live, while an upstream account asked (429) not to be called."""
    return f"{PREFIX}:cooldown:{safe_name(account)}"
