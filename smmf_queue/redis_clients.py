"""Our own Redis clients (streams, job records, the registry), for one Redis or a Redis behind
Sentinel.

`queue.redis_url` (or a Redis `broker_url`) is `redis://HOST:PORT/DB`, or for Sentinel kombu's
form, `sentinel://HOST:PORT;sentinel://HOST:PORT/DB`, with `queue.sentinel_master` naming the
master the sentinels watch. Then every client asks the sentinels for the current master, and
for the new one after a failover (redis-py's Sentinel); kombu and Celery's result backend do
the same with the same URL (queues.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from .config import QueueSettings

SENTINEL_PORT = 26379


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def sentinel_nodes(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    """(sentinel addresses, db, password) from a `sentinel://...;sentinel://.../DB` URL."""
    nodes, db, password = [], 0, None
    for part in filter(None, url.split(";")):
        parsed = urlparse(part)
        nodes.append((parsed.hostname or "127.0.0.1", parsed.port or SENTINEL_PORT))
        db = int(parsed.path.strip("/") or db)
        password = parsed.password or password
    return nodes, db, password


def timeouts(queue: QueueSettings, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the config's socket timeouts where they name none (QueueSettings)."""
    return {"socket_timeout": queue.socket_timeout_s, "socket_connect_timeout": queue.socket_timeout_s,
            **options}


def connect(queue: QueueSettings, **options: Any) -> redis.Redis:
    """A blocking client of the Redis that `queue` names (its master, behind Sentinel)."""
    options = timeouts(queue, options)
    if not is_sentinel(queue.redis):
        return redis.Redis.from_url(queue.redis, **options)
    nodes, db, password = sentinel_nodes(queue.redis)
    sentinels = redis.sentinel.Sentinel(nodes, socket_timeout=options["socket_connect_timeout"])
    return sentinels.master_for(str(queue.sentinel_master), db=db, password=password, **options)


def connect_async(queue: QueueSettings, **options: Any) -> redis.asyncio.Redis:
    """connect() for an event loop."""
    options = timeouts(queue, options)
    if not is_sentinel(queue.redis):
        return redis.asyncio.from_url(queue.redis, **options)
    nodes, db, password = sentinel_nodes(queue.redis)
    sentinels = redis.asyncio.sentinel.Sentinel(nodes, socket_timeout=options["socket_connect_timeout"])
    return sentinels.master_for(str(queue.sentinel_master), db=db, password=password, **options)
