"""Every private or semi-private part of Celery, kombu and redis-py that smmf-queue relies on,
in one place, with the versions it was checked against. The speed of a job's path leans on
them (BENCHMARKS.md): a release that renames one would break us quietly, so
tests/test_hooks.py fails, naming the hook, when one is gone, and pyproject.toml pins the three
to the minor versions in CHECKED.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

#: the minor versions every hook below was checked against (pyproject.toml pins these).
CHECKED = {"celery": "5.7", "kombu": "5.7", "redis": "8.1"}


@dataclass(frozen=True)
class Hook:
    """One attribute of a library class that we override, call or read."""

    #: "module:Class"
    owner: str
    attribute: str
    #: where we use it, and why
    used_by: str

    def present(self) -> bool:
        module, _, name = self.owner.partition(":")
        return hasattr(getattr(importlib.import_module(module), name), self.attribute)


HOOKS = (
    Hook("kombu.transport.redis:Channel", "_create_client",
         "celery_ext.Channel: one redis client per channel instead of one per publish and ack"),
    Hook("kombu.transport.redis:Channel", "pool", "celery_ext.Channel: the client is kept while this pool is"),
    Hook("kombu.transport.virtual.base:QoS", "_delivered",
         "celery_ext.QoS.stamp_held: the messages a worker holds, renewed by its heartbeat"),
    Hook("kombu.transport.virtual.base:QoS", "_dirty",
         "celery_ext.QoS: the tags acknowledged but still in `_delivered`, which the heartbeat skips"),
    Hook("kombu.transport.redis:QoS", "ack",
         "celery_ext.QoS.ack: a delivery that lost its job leaves the later delivery's lease, "
         "and a message is forgotten here even when Redis does not hear its ack"),
    Hook("kombu.transport.virtual.base:QoS", "ack",
         "celery_ext.QoS.ack and reject: forgetting a message here, apart from Redis"),
    Hook("kombu.transport.redis:QoS", "restore_visible",
         "queues.make_celery_app: kombu's restore hands back a dead worker's messages after its lease"),
    Hook("kombu.transport.redis:Channel", "unacked_mutex_expire",
         "queues.make_celery_app: the restore's lock, left by a killed worker, expires in a heartbeat"),
    Hook("kombu.transport.redis:Channel", "conn_or_acquire", "celery_ext.QoS.stamp_held: its client"),
    Hook("kombu.transport.redis:Channel", "QoS", "celery_ext.Channel: its QoS class is celery_ext.QoS"),
    Hook("kombu.transport.redis:SentinelChannel", "QoS",
         "celery_ext.SentinelChannel: celery_ext.QoS behind Sentinel too (held messages renewed)"),
    Hook("kombu.transport.redis:SentinelTransport", "Channel",
         "celery_ext.SentinelTransport: its channel is celery_ext.SentinelChannel"),
    Hook("kombu.transport.redis:QoS", "pipe_or_acquire",
         "celery_ext.QoS: the unacked bookkeeping in plain pipelines, not MULTI/EXEC"),
    Hook("kombu.transport.redis:QoS", "_remove_from_indices",
         "celery_ext.QoS: the ack removes the message, then its index entry"),
    Hook("kombu.transport.redis:QoS", "unacked_index_key", "celery_ext.QoS: the index of unacked messages"),
    Hook("kombu.transport.redis:QoS", "unacked_key",
         "celery_ext.held_message: the hash of unacked messages, which lua.FINISH clears for the ack"),
    Hook("kombu.transport.redis:QoS", "append",
         "celery_ext.QoS.append: which job each taken message brings (celery_ext.held_message)"),
    Hook("kombu.transport.redis:QoS", "reject", "celery_ext.QoS.reject: a rejected message is no longer held"),
    Hook("kombu.transport.virtual.base:QoS", "restore_unacked_once",
         "celery_ext.QoS.restore_unacked_once: a closed channel's messages are no longer held"),
    Hook("kombu.transport.redis:Channel", "global_keyprefix",
         "celery_ext.held_message: kombu's key prefix, for the keys lua.FINISH writes itself"),
    Hook("celery.backends.redis:RedisBackend", "_set",
         "celery_ext.ResultBackend: a result stored and published without MULTI/EXEC"),
    Hook("celery.backends.asynchronous:AsyncBackendMixin", "_wait_for_pending",
         "celery_ext.ResultBackend: a waiter looks for its result each interval (not every result is published)"),
    Hook("celery.backends.redis:ResultConsumer", "on_wait_for_pending",
         "celery_ext.ResultBackend: that look, as Celery makes it when a wait begins"),
    Hook("celery.backends.base:Backend", "_get_result_meta",
         "celery_ext.ResultBackend.result_copy: the meta Celery would store, written by lua.FINISH"),
    Hook("celery.worker.consumer:Consumer", "on_send_event_buffered",
         "celery_ext.Consumer: task events published on a timer instead of at once"),
    Hook("celery.worker.consumer:Consumer", "_flush_events", "celery_ext.Consumer: the timer's flush"),
    Hook("celery.concurrency.thread:TaskPool", "on_apply",
         "celery_ext.ThreadPool: a task whose trace raised still ends (Celery's pool dropped it)"),
    Hook("celery.worker.consumer:Consumer", "on_decode_error",
         "celery_ext.Consumer: an undecodable message becomes a dead letter"),
    Hook("celery.app.amqp:AMQP", "create_task_message", "queues.JobSender: Celery's own message, built once"),
    Hook("celery.app.amqp:AMQP", "send_task_message", "queues.JobSender: sent through one kept producer"),
    Hook("celery:Celery", "producer_pool", "queues.JobSender: the producer it keeps"),
    Hook("redis.connection:ConnectionPool", "get_connection", "attempt.PendingClaim: a connection of its own"),
    Hook("redis.connection:Connection", "send_command", "attempt.PendingClaim: the claim sent ahead"),
    Hook("redis.connection:Connection", "read_response", "attempt.PendingClaim: its answer read later"),
)


def missing() -> list[Hook]:
    """The hooks the installed Celery, kombu and redis-py no longer have."""
    return [hook for hook in HOOKS if not hook.present()]
