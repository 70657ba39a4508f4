"""The private RabbitMQ fixture does what the agent's RabbitMQ tests will rely on."""

import json
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from tests.services.rabbitmq import DEFAULT_CONSUMER_TIMEOUT_MS, RabbitBroker

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

EXCHANGE = "StudioML.topic"


@contextmanager
def connect(broker: RabbitBroker) -> Iterator[BlockingConnection]:
    conn = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()


def declare_like_studioml(ch: BlockingChannel, queue: str, durable: bool = False) -> None:
    """What studioml 0.0.49's RMQ client declares before it publishes (protocol A.1)."""
    ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
    ch.queue_declare(queue, durable=durable)
    ch.queue_bind(queue, EXCHANGE, routing_key=f"StudioML.{queue}")


def publish_like_studioml(ch: BlockingChannel, queue: str, body: bytes, mode: int = 1) -> None:
    props = pika.BasicProperties(
        app_id="studioml", content_type="application/json", delivery_mode=mode
    )
    ch.basic_publish(EXCHANGE, f"StudioML.{queue}", body, props, mandatory=True)


def queue_exists(broker: RabbitBroker, queue: str) -> bool:
    with connect(broker) as conn:
        try:
            conn.channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
    return True


def bindings(broker: RabbitBroker) -> set[tuple[str, str, str]]:
    return {(b["source"], b["destination"], b["routing_key"]) for b in broker.api("/api/bindings")}


def test_studioml_round_trip(rabbitmq: RabbitBroker) -> None:
    body = json.dumps({"experiment": {"key": "e1"}, "config": {}}).encode()
    with connect(rabbitmq) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        declare_like_studioml(ch, "rmq_x")
        publish_like_studioml(ch, "rmq_x", body)

        method, props, got = ch.basic_get("rmq_x", auto_ack=False)
        assert method is not None, "the published message did not arrive in rmq_x"
        assert (got, method.exchange, method.routing_key) == (body, EXCHANGE, "StudioML.rmq_x")
        assert (props.app_id, props.content_type) == ("studioml", "application/json")
        ch.basic_ack(method.delivery_tag)
        assert ch.basic_get("rmq_x")[0] is None

    assert (EXCHANGE, "rmq_x", "StudioML.rmq_x") in bindings(rabbitmq)
    assert any(q["name"] == "rmq_x" and not q["durable"] for q in rabbitmq.queues())
    rabbitmq.delete_queue("rmq_x")
    assert not queue_exists(rabbitmq, "rmq_x")


def test_restart_keeps_durable_queues_and_persistent_messages_only(
    rabbitmq: RabbitBroker,
) -> None:
    durable, transient = "rmq_restart_durable", "rmq_restart_transient"
    with connect(rabbitmq) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        declare_like_studioml(ch, durable, durable=True)
        declare_like_studioml(ch, transient)
        for queue in (durable, transient):
            publish_like_studioml(ch, queue, f"{queue} persistent".encode(), mode=2)
            publish_like_studioml(ch, queue, f"{queue} transient".encode(), mode=1)

    rabbitmq.restart()

    # A non-durable queue (studioml's default) vanishes with its messages and binding.
    assert not queue_exists(rabbitmq, transient)
    assert (EXCHANGE, transient, f"StudioML.{transient}") not in bindings(rabbitmq)
    assert (EXCHANGE, durable, f"StudioML.{durable}") in bindings(rabbitmq)
    with connect(rabbitmq) as conn:
        ch = conn.channel()
        # The durable auto-delete exchange survives the restart.
        ch.exchange_declare(EXCHANGE, exchange_type="topic", passive=True)
        # A durable queue keeps only its persistent messages.
        _, _, body = ch.basic_get(durable, auto_ack=True)
        assert body == f"{durable} persistent".encode()
        assert ch.basic_get(durable, auto_ack=True)[0] is None
    rabbitmq.delete_queue(durable)


def test_stop_refuses_connections_until_start(rabbitmq: RabbitBroker) -> None:
    rabbitmq.stop()
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(pika.URLParameters(rabbitmq.amqp_url))
        with pytest.raises(urllib.error.URLError, match="Connection refused"):
            rabbitmq.api("/api/overview")
    finally:
        rabbitmq.start()
    with connect(rabbitmq) as conn:
        assert conn.is_open


def test_consumer_timeout_closes_channel_holding_unacked_delivery(
    rabbitmq: RabbitBroker,
) -> None:
    queue = "rmq_consumer_timeout"
    rabbitmq.set_consumer_timeout(2000)
    try:
        assert rabbitmq.ctl("eval", "application:get_env(rabbit, consumer_timeout).").strip() == (
            "{ok,2000}"
        )
        with connect(rabbitmq) as conn:
            closed = hold_unacked_until_closed(conn, queue)
            assert conn.is_open, "only the channel is closed, not the connection"
            method, _, _ = conn.channel().basic_get(queue, auto_ack=True)
            assert method is not None, "the message is requeued"
            assert method.redelivered
    finally:
        rabbitmq.set_consumer_timeout(DEFAULT_CONSUMER_TIMEOUT_MS)
        rabbitmq.delete_queue(queue)
    reason = closed
    assert reason.reply_code == 406
    assert "delivery acknowledgement on channel 1 timed out" in reason.reply_text


def hold_unacked_until_closed(
    conn: BlockingConnection, queue: str
) -> pika.exceptions.ChannelClosedByBroker:
    """basic.get one message without acking; return why the broker closed the channel."""
    ch = conn.channel()  # opened after set_consumer_timeout: channels read it when they open
    reasons: list[pika.exceptions.ChannelClosedByBroker] = []
    ch._impl.add_on_close_callback(lambda _ch, exc: reasons.append(exc))
    ch.confirm_delivery()
    ch.queue_declare(queue)
    ch.basic_publish("", queue, b"hold me")
    assert ch.basic_get(queue, auto_ack=False)[0] is not None
    start = time.monotonic()
    while ch.is_open and time.monotonic() - start < 30:
        conn.process_data_events(time_limit=0.05)
    assert reasons, "the broker did not close the channel within 30 s"
    return reasons[0]
