"""The broker URL is the only change that moves the Celery queues to RabbitMQ (quorum queues).

Streams, job records, the registry and results stay on Redis (`queue.redis_url`). Uses the
RabbitMQ on 127.0.0.1:5672 where one is reachable, and skips, saying why, elsewhere.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from smmf_queue import Client
from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import CHAT, EMBED, StartWorker

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not rabbitmq_reachable(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_chat_and_embedding_through_rabbitmq_quorum_queues(
        tmp_path: Path, redis_server: EmbeddedRedis, config_path: Path,
        start_worker: StartWorker) -> None:
    # Given the test config with only the broker URL changed (model names get a suffix, so
    # runs never share queues on the long-lived RabbitMQ)
    suffix = uuid.uuid4().hex[:6]
    text = config_path.read_text()
    for name in (CHAT, EMBED):
        text = text.replace(f'name = "{name}"', f'name = "{name}-{suffix}"')
        text = text.replace(f'default_llm = "{name}"', f'default_llm = "{name}-{suffix}"')
        text = text.replace(f'default_embedding = "{name}"', f'default_embedding = "{name}-{suffix}"')
    text = text.replace(f'broker_url = "{redis_server.url}"',
                        f'broker_url = "{RABBITMQ}"\nredis_url = "{redis_server.url}"')
    config = tmp_path / "rabbit.toml"
    config.write_text(text)
    # When a worker serves both models from RabbitMQ
    worker = start_worker(f"{CHAT}-{suffix}", f"{EMBED}-{suffix}", config=config)
    try:
        with Client(config) as client:
            # Then a streamed chat and an embedding come back as they do on Redis
            deltas = list(client.stream_chat(f"{CHAT}-{suffix}", [{"role": "user", "content": "hi"}],
                                             max_tokens=8, temperature=0))
            assert "".join(d.text for d in deltas) and deltas[-1].finish_reason == "length"
            assert len(client.embed(f"{EMBED}-{suffix}", ["a", "b", "c"]).vectors) == 3
    finally:
        worker.stop()
    _assert_quorum(f"smmf.llm.{CHAT}-{suffix}")
    _assert_quorum(f"smmf.embedding.{EMBED}-{suffix}")


def _assert_quorum(queue: str) -> None:
    """The queue RabbitMQ holds is a quorum queue (declaring it as classic must fail)."""
    from kombu import Connection, Queue

    with Connection(RABBITMQ) as connection:
        channel = connection.channel()
        with pytest.raises(Exception, match="x-queue-type|PRECONDITION"):
            Queue(queue, channel=channel, durable=True,
                  queue_arguments={"x-queue-type": "classic"}).declare()
        connection.channel().queue_delete(queue)
