"""The queue contract of agent/queues/base.py, proved once for every backend: local, RabbitMQ,
SQS and Pub/Sub, each against the real service the other integration tests use.

Every test gets a queue of its own (a random name) and a filter serving only that queue, since
the services are shared by the whole session. ``put`` enqueues as the StudioML client does on
that transport. Leases are short (``LEASE``) so that "longer than the lease" takes seconds.

Documented differences, asserted explicitly where they show (``Kit.lease``):

* local and RabbitMQ have no lease: a message taken is held in the agent's state dir until it is
  settled (local.py: "No lease", the file moved to ``inflight/``; rabbitmq.py: "Custody", the
  journal, then the broker's ack). So a restarted agent's ``recover()`` puts it back.
* SQS and Pub/Sub lease the message and the tick renews the lease. Nothing is journaled before
  SQS's 12 h custody point, so ``recover()`` returns nothing: a killed agent's message comes
  back from the service once its lease lapses (sqs.py: "A killed agent just stops renewing";
  pubsub.py: "Crash safety").
"""

import json
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from agent.queues import build_backend
from agent.queues.base import Delivery, QueueBackend, QueueFilter
from agent.queues.local import LOCK_NAME, enqueue
from agent.submit import Submission, build_message
from tests.conftest import wait_until
from tests.integration.test_rabbitmq_agent import declare, publish, queue_depth
from tests.integration.test_sqs_backend import sqs_client
from tests.services.pubsub import PubSubEmulator
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

pytestmark = pytest.mark.integration

LEASE = 2  # SQS visibility and Pub/Sub ack deadline (the emulator takes 1 s; SQS needs 2)
REFRESH = 0.2  # seconds between queue listings, so that a new queue is served at once
POLL = 0.05  # the supervisor's loop period while idle
PROMPT = 1.5  # a returned message is back sooner than a lease: given back, not left to lapse
UNLEASED_HOLD = 2.0  # how long a backend without leases is watched for a second hand-out
BODY_TEXT = "naïve run ✓ 試験"  # raw UTF-8 in the body, not \\u escapes


class Kit(ABC):
    """One backend kind on one fresh queue: agents on state dirs, and the client's side."""

    kind: str
    prefix: str  # what the queue name starts with, by the client's conventions
    lease: float | None = None  # how long a taken message stays ours unrenewed; None: until settled

    def __init__(self, state_dir: Path) -> None:
        self.name = f"{self.prefix}_{uuid.uuid4().hex[:10]}"
        self.queue = self.name  # the name the backend serves it under
        self.filter = QueueFilter(f"^{re.escape(self.name)}$")
        self.state_dir = state_dir
        self.made: list[QueueBackend] = []

    @cached_property
    def backend(self) -> QueueBackend:
        """The agent under test."""
        return self.new_backend()

    def new_backend(self, state_dir: Path | None = None) -> QueueBackend:
        """Another agent: a restart of the first one by default, with the same state dir."""
        backend = self.build(state_dir or self.state_dir)
        self.made.append(backend)
        return backend

    @abstractmethod
    def build(self, state_dir: Path) -> QueueBackend: ...

    @abstractmethod
    def put(self, body: bytes) -> None: ...

    def depth(self) -> int | None:
        """Messages waiting in the queue, where the service tells it cheaply."""
        return None

    def close(self) -> None:
        for backend in self.made:
            backend.close()
        self.remove_queue()

    def remove_queue(self) -> None:  # noqa: B027 - local queues go with tmp_path
        pass

    @abstractmethod
    def recreate_queue(self) -> None:
        """The queue again, empty, after ``remove_queue``."""


class LocalKit(Kit):
    kind, prefix = "local", "local"

    def __init__(self, state_dir: Path, root: Path) -> None:
        super().__init__(state_dir)
        self.root = root

    def build(self, state_dir: Path) -> QueueBackend:
        return build_backend("local", root=self.root, state_dir=state_dir, queue_filter=self.filter)

    def put(self, body: bytes) -> None:
        enqueue(self.root, self.name, body)

    def depth(self) -> int:
        folder = self.root / self.name
        return sum(1 for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else 0

    def remove_queue(self) -> None:
        shutil.rmtree(self.root / self.name, ignore_errors=True)

    def recreate_queue(self) -> None:
        (self.root / self.name).mkdir(parents=True, exist_ok=True)


class RabbitKit(Kit):
    kind, prefix = "rabbitmq", "rmq"

    def __init__(self, state_dir: Path, broker: RabbitBroker) -> None:
        super().__init__(state_dir)
        self.broker = broker
        declare(broker, self.name)

    def build(self, state_dir: Path) -> QueueBackend:
        return build_backend(
            "rabbitmq",
            name="contract",
            amqp_url=self.broker.amqp_url,
            mgmt_url=self.broker.mgmt_url,
            queue_filter=self.filter,
            state_dir=state_dir,
            refresh=REFRESH,
        )

    def put(self, body: bytes) -> None:
        publish(self.broker, self.name, body)

    def depth(self) -> int:
        return queue_depth(self.broker, self.name)

    def remove_queue(self) -> None:
        self.broker.delete_queue(self.name)

    def recreate_queue(self) -> None:
        declare(self.broker, self.name)


class SqsKit(Kit):
    kind, prefix, lease = "sqs", "sqs", LEASE

    def __init__(self, state_dir: Path, server: S3Server) -> None:
        super().__init__(state_dir)
        self.server = server
        self.admin: Any = sqs_client(server)  # the submitter's client (no SQS stubs here)
        self.url = str(self.admin.create_queue(QueueName=self.name)["QueueUrl"])

    def build(self, state_dir: Path) -> QueueBackend:
        return build_backend(
            "sqs",
            name="contract",
            access_key=self.server.access_key,
            secret_key=self.server.secret_key,
            region=self.server.region,
            queue_filter=self.filter,
            state_dir=state_dir,
            endpoint_url=self.server.endpoint,
            refresh=REFRESH,
            visibility=LEASE,
            wait_time=1,  # short polls: a closed agent's receivers finish within a second
        )

    def put(self, body: bytes) -> None:
        self.admin.send_message(QueueUrl=self.url, MessageBody=body.decode())  # raw JSON text

    def depth(self) -> int:
        name = "ApproximateNumberOfMessages"  # visible ones; moto's count is exact
        reply = self.admin.get_queue_attributes(QueueUrl=self.url, AttributeNames=[name])
        return int(reply["Attributes"][name])

    def remove_queue(self) -> None:
        self.admin.delete_queue(QueueUrl=self.url)

    def recreate_queue(self) -> None:
        self.url = str(self.admin.create_queue(QueueName=self.name)["QueueUrl"])

    def close(self) -> None:
        super().close()
        self.admin.close()


class PubSubKit(Kit):
    kind, prefix, lease = "pubsub", "pubsub", LEASE

    def __init__(self, state_dir: Path, emulator: PubSubEmulator) -> None:
        super().__init__(state_dir)
        self.emulator = emulator
        self.subscription = emulator.create_topic_and_subscription(self.name, ack_deadline=LEASE)
        self.queue = f"{self.name}_sub"  # the client's <queue>_sub subscription

    def build(self, state_dir: Path) -> QueueBackend:
        return build_backend(
            "pubsub",
            name="contract",
            key_file=None,
            project=self.emulator.project,
            queue_filter=self.filter,
            state_dir=state_dir,
            emulator_host=self.emulator.host,
            refresh=REFRESH,
            ack_deadline=LEASE,
        )

    def put(self, body: bytes) -> None:
        self.emulator.publish(self.name, body)

    def remove_queue(self) -> None:
        self.emulator.subscriber.delete_subscription(subscription=self.subscription)
        self.emulator.publisher.delete_topic(topic=self.emulator.topic(self.name))

    def recreate_queue(self) -> None:
        self.subscription = self.emulator.create_topic_and_subscription(
            self.name, ack_deadline=LEASE
        )


def make_kit(kind: str, request: pytest.FixtureRequest, state_dir: Path) -> Kit:
    """The kit for ``kind``; a service fixture is asked for only by its own kind's tests."""
    if kind == "local":
        return LocalKit(state_dir, state_dir.parent / "queue")
    if kind == "rabbitmq":
        return RabbitKit(state_dir, request.getfixturevalue("rabbitmq"))
    if kind == "sqs":
        return SqsKit(state_dir, request.getfixturevalue("s3_server"))
    return PubSubKit(state_dir, request.getfixturevalue("pubsub_emulator"))


@pytest.fixture(
    params=[
        pytest.param("local", id="local"),
        pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("sqs", id="sqs", marks=pytest.mark.sqs),
        pytest.param("pubsub", id="pubsub", marks=pytest.mark.pubsub),
    ]
)
def backend_kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kit]:
    """A fresh queue of one kind and its first agent; every agent made is closed afterwards."""
    kit = make_kit(request.param, request, tmp_path / "state")
    try:
        assert kit.backend.kind == request.param
        yield kit
    finally:
        kit.close()


# -- helpers ---------------------------------------------------------------------------------------


def receive_within(backend: QueueBackend, seconds: float) -> Delivery | None:
    """The supervisor's loop with a free slot (tick, then receive) until a delivery or timeout."""
    deadline = time.monotonic() + seconds
    while True:
        backend.capacity(1)
        backend.tick()
        delivery = backend.receive()
        if delivery is not None or time.monotonic() >= deadline:
            return delivery
        time.sleep(POLL)


def take(backend: QueueBackend, seconds: float = 10.0) -> Delivery:
    delivery = receive_within(backend, seconds)
    assert delivery is not None, f"nothing received within {seconds}s from {backend.kind}"
    return delivery


def assert_nothing(backend: QueueBackend, seconds: float) -> None:
    delivery = receive_within(backend, seconds)
    assert delivery is None, f"{backend.kind} handed out {delivery.message_id!r} again"


def request_body(tmp_path: Path, queue: str) -> bytes:
    """A request shaped as studioml 0.0.49 sends it, with non-ASCII text left as raw UTF-8."""
    args = ["--name", BODY_TEXT]
    key = f"{int(time.time())}_{uuid.uuid4()}"
    sub = Submission(tmp_path / "ws", "train.py", args, queue, tmp_path, tmp_path, key=key)
    message = build_message(sub, f"blobstore/{'0' * 64}.tar")
    message["experiment"]["info"] = {"note": BODY_TEXT}
    return json.dumps(message, ensure_ascii=False).encode()


def hold_for(kit: Kit, other: QueueBackend, seconds: float) -> None:
    """The first agent only ticks (its slot is busy) while another agent polls for work."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kit.backend.capacity(0)
        kit.backend.tick()
        other.capacity(1)
        other.tick()
        delivery = other.receive()
        assert delivery is None, f"a second agent got {delivery.message_id!r} while it was held"
        time.sleep(POLL)


# -- the contract ----------------------------------------------------------------------------------


def test_receive_hands_out_the_body_byte_for_byte(backend_kit: Kit, tmp_path: Path) -> None:
    kit = backend_kit
    body = request_body(tmp_path, kit.name)
    assert BODY_TEXT.encode() in body
    kit.put(body)
    delivery = take(kit.backend)
    assert (delivery.backend, delivery.queue, delivery.delivery_count) == (kit.kind, kit.queue, 1)
    assert delivery.body == body
    assert kit.backend.served_queues() == [kit.queue]
    assert kit.depth() in (0, None)  # taken: no longer waiting
    delivery.ack()


def test_an_acked_message_never_comes_back(backend_kit: Kit, tmp_path: Path) -> None:
    kit = backend_kit
    kit.put(request_body(tmp_path, kit.name))
    take(kit.backend).ack()
    assert_nothing(kit.backend, PROMPT)
    # Then the agent stops and starts again: an ack that did not take would now show, as an
    # entry left in the state dir or, once no tick renews its lease, as a redelivery.
    kit.backend.close()
    restarted = kit.new_backend()
    assert restarted.recover() == 0
    assert_nothing(restarted, (kit.lease or 0) + 1.5)  # past the lease it would have had
    assert kit.depth() in (0, None)


def test_a_requeued_message_comes_back_promptly_counted(backend_kit: Kit, tmp_path: Path) -> None:
    kit = backend_kit
    body = request_body(tmp_path, kit.name)
    kit.put(body)
    take(kit.backend).requeue()
    again = take(kit.backend, PROMPT)
    assert (again.body, again.queue, again.delivery_count) == (body, kit.queue, 2)
    again.ack()


def test_a_held_message_is_not_handed_to_another_agent(backend_kit: Kit, tmp_path: Path) -> None:
    kit = backend_kit
    kit.put(request_body(tmp_path, kit.name))
    held = take(kit.backend)
    other = kit.new_backend(tmp_path / "other-agent")  # another agent on the same queue
    # Leased: two and a half leases, renewed by the tick only. Unleased: held until settled.
    hold_for(kit, other, 2.5 * kit.lease if kit.lease else UNLEASED_HOLD)
    held.ack()  # still ours to settle after all those renewals
    assert_nothing(other, PROMPT)
    assert kit.depth() in (0, None)


def test_a_killed_agent_s_message_comes_back_after_restart(
    backend_kit: Kit, tmp_path: Path
) -> None:
    kit = backend_kit
    body = request_body(tmp_path, kit.name)
    kit.put(body)
    take(kit.backend)  # then kill -9: nothing settled, renewed or closed from here on
    restarted = kit.new_backend()  # the same state dir
    restored = restarted.recover()
    # Unleased backends held it in the state dir, and recover() puts it back; leased ones left it
    # with the service, which hands it out again when the lease lapses (module docstring).
    assert restored == (0 if kit.lease else 1)
    again = take(restarted, (kit.lease or 0) + 5)
    assert (again.body, again.queue) == (body, kit.queue)
    assert again.delivery_count >= 2
    again.ack()


def test_work_returned_at_shutdown_goes_to_the_next_agent(backend_kit: Kit, tmp_path: Path) -> None:
    kit = backend_kit
    body = request_body(tmp_path, kit.name)
    kit.put(body)
    take(kit.backend).requeue()  # the supervisor's drain gives unfinished work back ...
    kit.backend.close()  # ... then closes its backends
    assert kit.depth() in (1, None)
    restarted = kit.new_backend()
    assert restarted.recover() == 0  # nothing was left unsettled
    again = take(restarted, PROMPT)  # before any lease could have lapsed
    assert (again.body, again.queue, again.delivery_count) == (body, kit.queue, 2)
    again.ack()


def test_n_free_slots_never_hold_more_than_n_messages(backend_kit: Kit, tmp_path: Path) -> None:
    kit = backend_kit
    for _ in range(5):
        kit.put(request_body(tmp_path, kit.name))
    held: list[Delivery] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kit.backend.capacity(2 - len(held))  # the supervisor's count of free slots, each pass
        kit.backend.tick()
        if len(held) < 2 and (delivery := kit.backend.receive()) is not None:
            held.append(delivery)
        time.sleep(POLL)
    assert len(held) == 2
    # Nothing more was taken or kept: the other three wait in the queue (a poll that was in
    # flight when the second slot filled may bring one in, which goes back at once).
    kit.backend.capacity(0)
    wait_until(lambda: (kit.backend.capacity(0), kit.depth())[1] in (3, None), timeout=PROMPT)
    other = kit.new_backend(tmp_path / "other-agent")
    others = [take(other) for _ in range(3)]
    assert len({d.body for d in held + others}) == 5
    for delivery in held + others:
        delivery.ack()


def test_a_message_pushed_when_no_slot_is_free_goes_back_at_once(
    backend_kit: Kit, tmp_path: Path
) -> None:
    kit = backend_kit
    body = request_body(tmp_path, kit.name)
    kit.backend.capacity(1)  # a free slot: a pushed backend may be delivered the message now
    kit.backend.tick()
    assert kit.backend.receive() is None  # a look at the empty queue: from now on, pushed
    kit.put(body)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # delivered into the agent, not yet taken by the loop
        kit.backend.tick()
        time.sleep(POLL)
    kit.backend.capacity(0)  # then the slot went to another queue's message
    kit.backend.tick()

    # Given back, not held by an agent that cannot start it: waiting in the queue again ...
    # (ticking, as the agent's loop does: a poll that was still in flight when the slot went
    # elsewhere, on a slow machine, is given back at the next tick)
    def back_in_line() -> bool:
        kit.backend.tick()
        return kit.depth() in (1, None)

    wait_until(back_in_line, timeout=PROMPT)
    again = take(kit.backend, PROMPT)
    assert (again.body, again.delivery_count) == (body, 1)  # ... and not counted as an attempt
    again.ack()


def test_a_queue_deleted_under_the_agent_is_survived(backend_kit: Kit, tmp_path: Path) -> None:
    kit = backend_kit
    kit.put(request_body(tmp_path, kit.name))
    take(kit.backend).ack()
    kit.remove_queue()  # the broker cancels its consumer, or the listing loses it
    assert_nothing(kit.backend, 1.0)
    kit.recreate_queue()
    body = request_body(tmp_path, kit.name)
    kit.put(body)
    assert take(kit.backend, 10).body == body
