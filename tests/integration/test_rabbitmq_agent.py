"""The agent against a real (private) RabbitMQ broker: discovery, custody, restarts, deletion."""

import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from agent.queues import build_backend
from agent.queues.base import Delivery, QueueFilter
from agent.request import Request
from agent.submit import Submission, prepare
from tests.conftest import AgentProcess, Layout, wait_until, write_workspace
from tests.services.rabbitmq import RabbitBroker

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

Start = Callable[[Layout], AgentProcess]

# Appends one line per run, so a test can count how often the experiment ran.
COUNTED = """
import os, sys, time
with open(sys.argv[1], "a") as runs:
    runs.write(os.environ["STUDIOML_EXPERIMENT"] + "\\n")
print("running", flush=True)
time.sleep(float(sys.argv[2]))
print("finished")
"""


def declare(broker: RabbitBroker, queue: str, durable: bool = False) -> None:
    """Create and bind ``queue`` with the studioml 0.0.49 client's flags (protocol spec A.1)."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = connection.channel()
        channel.exchange_declare("StudioML.topic", "topic", durable=True, auto_delete=True)
        channel.queue_declare(queue, durable=durable)
        channel.queue_bind(queue, "StudioML.topic", routing_key=f"StudioML.{queue}")
    finally:
        connection.close()


def publish(broker: RabbitBroker, queue: str, body: bytes, durable: bool = False) -> None:
    """Publish the way the studioml 0.0.49 client does."""
    declare(broker, queue, durable)
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(
            app_id="studioml", content_type="application/json", delivery_mode=2 if durable else None
        )
        channel.basic_publish(
            "StudioML.topic", f"StudioML.{queue}", body, properties, mandatory=True
        )
    finally:
        connection.close()


def submit_rmq(
    broker: RabbitBroker,
    lay: Layout,
    script: str,
    *args: str,
    queue: str = "rmq_test",
    durable: bool = False,
) -> Request:
    workspace = write_workspace(lay.root / f"ws-{time.monotonic_ns()}", script)
    sub = Submission(workspace, "train.py", list(args), queue, lay.queue_root, lay.storage)
    message = prepare(sub)
    publish(broker, queue, json.dumps(message).encode(), durable)
    return Request.model_validate(message)


def finished(lay: Layout, key: str) -> bool:
    record = lay.storage / "meta" / "experiments" / key
    return record.exists() and json.loads(record.read_text()).get("status") == "finished"


def queue_depth(broker: RabbitBroker, name: str) -> int:
    """Ready messages, from a passive declare (the management API's counts lag by seconds)."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        result = connection.channel().queue_declare(name, passive=True)
        return int(result.method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return -1
    finally:
        if connection.is_open:
            connection.close()


def rmq_layout(
    layout: Callable[..., Layout], broker: RabbitBroker, *queues: str, **extra: object
) -> Layout:
    """An agent config for this broker that serves only ``queues``: the broker is shared by the
    whole session, and a queue another test left behind must not take this test's slot."""
    match = "^(" + "|".join(queues) + ")$"
    return layout(
        amqp_url=broker.amqp_url,
        amqp_mgmt_url=broker.mgmt_url,
        amqp_refresh="1s",
        queue_match=match,
        **extra,
    )


def test_serves_a_queue_found_through_the_management_api(
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = rmq_layout(layout, rabbitmq, "rmq_served", "other_queue")
    runs = tmp_path / "runs"
    request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_served")
    publish(rabbitmq, "other_queue", b"{}")  # matches no default rule: must stay untouched
    agent = start_agent(layout(amqp_url=rabbitmq.amqp_url, amqp_mgmt_url=rabbitmq.mgmt_url))
    wait_until(lambda: finished(lay, request.key), what="experiment finished")
    assert agent.stop() == 0
    assert runs.read_text().splitlines() == [request.key]
    assert queue_depth(rabbitmq, "rmq_served") == 0
    assert queue_depth(rabbitmq, "other_queue") == 1
    log = agent.log()
    assert "serving queues" in log
    assert "not serving other_queue" in log
    assert "guest:guest" not in log  # the broker password never reaches the log


def test_an_experiment_longer_than_consumer_timeout_runs_once(
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = rmq_layout(layout, rabbitmq, "rmq_long")
    rabbitmq.set_consumer_timeout(1000, check_interval_ms=500)
    try:
        runs = tmp_path / "runs"
        request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "5", queue="rmq_long")
        agent = start_agent(lay)
        wait_until(lambda: finished(lay, request.key), what="experiment finished")
        time.sleep(1)
        assert agent.stop() == 0
    finally:
        rabbitmq.set_consumer_timeout(30 * 60 * 1000)
    assert runs.read_text().splitlines() == [request.key]
    assert queue_depth(rabbitmq, "rmq_long") == 0


def test_broker_restart_while_an_experiment_runs(
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = rmq_layout(layout, rabbitmq, "rmq_restart")
    runs = tmp_path / "runs"
    first = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "4", queue="rmq_restart", durable=True)
    agent = start_agent(lay)
    wait_until(lambda: runs.exists(), what="experiment started")
    rabbitmq.restart()
    wait_until(lambda: finished(lay, first.key), what="experiment finished")
    # Served again after the restart: the agent reconnected by itself.
    second = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_restart", durable=True)
    wait_until(lambda: finished(lay, second.key), timeout=90, what="second experiment finished")
    time.sleep(1)
    assert agent.stop() == 0
    assert runs.read_text().splitlines() == [first.key, second.key]  # each exactly once
    assert queue_depth(rabbitmq, "rmq_restart") == 0


def test_drain_returns_the_message_to_the_broker(
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = rmq_layout(layout, rabbitmq, "rmq_drain", drain_timeout="1s")
    runs = tmp_path / "runs"
    submit_rmq(rabbitmq, lay, COUNTED, str(runs), "300", queue="rmq_drain")
    agent = start_agent(lay)
    wait_until(lambda: runs.exists(), what="experiment started")
    assert queue_depth(rabbitmq, "rmq_drain") == 0
    assert agent.stop() == 0
    assert queue_depth(rabbitmq, "rmq_drain") == 1
    assert not any((lay.state_dir / "inflight" / "rabbitmq").rglob("*.json"))
    rabbitmq.delete_queue("rmq_drain")


def test_kill_9_then_restart_publishes_the_message_back(
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = rmq_layout(layout, rabbitmq, "rmq_kill", drain_timeout="1s")
    runs = tmp_path / "runs"
    request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "300", queue="rmq_kill")
    first = start_agent(lay)
    wait_until(lambda: runs.exists(), what="experiment started")
    first.kill()
    assert queue_depth(rabbitmq, "rmq_kill") == 0  # acked to the broker, held in the journal
    second = start_agent(lay)
    wait_until(lambda: len(runs.read_text().splitlines()) == 2, timeout=90, what="run again")
    assert "killed an experiment left running" in second.log()
    # The agent died while the experiment ran: not the message's fault, so not an attempt.
    assert "(attempt 1)" in second.log()
    assert second.stop() == 0  # the drain cuts it short and returns it
    assert queue_depth(rabbitmq, "rmq_kill") == 1
    assert runs.read_text().splitlines() == [request.key, request.key]
    rabbitmq.delete_queue("rmq_kill")


def test_a_queue_deleted_while_listening(
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = rmq_layout(layout, rabbitmq, "rmq_gone", "rmq_alive")
    runs = tmp_path / "runs"
    declare(rabbitmq, "rmq_gone")
    agent = start_agent(lay)
    agent.wait_for_log("serving queues rmq_gone")
    rabbitmq.delete_queue("rmq_gone")
    request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_alive")
    wait_until(lambda: finished(lay, request.key), what="the other queue still served")
    assert agent.stop() == 0


def test_a_queue_made_after_start_is_served_through_the_event_exchange(
    rabbitmq: RabbitBroker, tmp_path: Path
) -> None:
    name = f"rmq_new_{uuid.uuid4().hex[:8]}"
    backend = build_backend(
        "rabbitmq",
        name="events",
        amqp_url=rabbitmq.amqp_url,
        mgmt_url=rabbitmq.mgmt_url,
        queue_filter=QueueFilter(f"^{re.escape(name)}$"),
        state_dir=tmp_path / "state",
        refresh=3600,  # no timed listing would find it during this test
    )
    try:
        backend.capacity(1)
        backend.tick()
        assert backend.served_queues() == []
        publish(rabbitmq, name, b'{"new": true}')  # the client declares, binds and publishes
        found: list[Delivery] = []

        def delivered() -> bool:
            backend.tick()
            if (delivery := backend.receive()) is not None:
                found.append(delivery)
            return bool(found)

        wait_until(delivered, timeout=15, what="the new queue's message")
        assert (found[0].queue, found[0].body) == (name, b'{"new": true}')
        found[0].ack()
    finally:
        backend.close()
        rabbitmq.delete_queue(name)
