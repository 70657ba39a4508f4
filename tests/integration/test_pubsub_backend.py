"""The Pub/Sub backend against the official emulator: discovery, settling, leases, deletions."""

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.errors import ConfigError
from agent.intake import parse_message
from agent.queues import backend_class
from agent.queues.base import Delivery, QueueFilter
from agent.queues.pubsub import HOLD_GRACE, PubSubQueue
from agent.submit import Submission, prepare
from tests.conftest import write_workspace
from tests.services.pubsub import PubSubEmulator

pytestmark = [pytest.mark.integration, pytest.mark.pubsub]

Make = Callable[..., PubSubQueue]


@pytest.fixture
def tag() -> str:
    """A prefix of this test's own: the emulator, and so its project, is the whole session's."""
    return f"ps{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make(pubsub_emulator: PubSubEmulator, tmp_path: Path, tag: str) -> Iterator[Make]:
    made: list[PubSubQueue] = []

    def build(match: str = "", mismatch: str = "", **kwargs: object) -> PubSubQueue:
        kwargs.setdefault("emulator_host", pubsub_emulator.host)
        backend = PubSubQueue(
            "test",
            None,
            pubsub_emulator.project,
            QueueFilter(match or f"^{tag}_", mismatch),
            tmp_path / "state",
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(backend)
        backend.tick()  # the first tick lists the subscriptions, as the supervisor's loop does
        return backend

    yield build
    for backend in made:
        backend.close()


def take(backend: PubSubQueue, timeout: float = 10.0) -> Delivery:
    """Poll as the supervisor does (tick, then receive while a slot is free) until a delivery."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        backend.tick()
        delivery = backend.receive()
        if delivery is not None:
            return delivery
        time.sleep(0.05)
    raise AssertionError(f"no delivery within {timeout}s from {backend.served_queues()}")


def nothing_for(backend: PubSubQueue, seconds: float, renew: bool = True) -> None:
    """Keep polling for ``seconds`` (renewing leases when ``renew``); fail on any delivery."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if renew:
            backend.tick()
        delivery = backend.receive()
        assert delivery is None, f"unexpected delivery of {delivery.message_id}"
        time.sleep(0.05)


def test_registered_under_its_kind() -> None:
    assert backend_class("pubsub") is PubSubQueue


def test_discovery_filters_on_the_queue_name(
    pubsub_emulator: PubSubEmulator, make: Make, tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    emu = pubsub_emulator
    emu.create_topic_and_subscription(f"{tag}_a")  # served: topic {tag}_a matches
    emu.create_topic_and_subscription(f"{tag}_skip")  # topic matches queue_mismatch
    emu.create_topic_and_subscription(f"{tag}_a_response")  # a response queue
    emu.create_subscription(f"{tag}_extra", f"{tag}_a")  # not <topic>_sub: its own name decides
    emu.create_subscription(f"other{tag}", f"{tag}_a")  # ... and that does not match
    emu.create_topic_and_subscription(f"other{tag}")  # topic does not match, whatever the sub
    caplog.set_level(logging.INFO, logger="agent.queues.pubsub")

    backend = make(mismatch="_skip$", refresh=0.2)

    assert backend.served_queues() == [f"{tag}_a_sub", f"{tag}_extra"]
    logged = caplog.text
    assert f"serving subscriptions {tag}_a_sub, {tag}_extra" in logged
    assert f"not serving {tag}_skip_sub: matches queue_mismatch '_skip$'" in logged
    assert f"not serving {tag}_a_response_sub: response queue" in logged
    assert f"not serving other{tag}: does not match queue_match" in logged
    assert f"not serving other{tag}_sub: does not match queue_match" in logged

    # A subscription created later is served from the next refresh; reasons are not repeated.
    emu.create_topic_and_subscription(f"{tag}_b")
    time.sleep(0.3)
    backend.tick()
    assert backend.served_queues() == [f"{tag}_a_sub", f"{tag}_b_sub", f"{tag}_extra"]
    assert caplog.text.count(f"not serving {tag}_skip_sub") == 1


def test_ack_removes_the_message(pubsub_emulator: PubSubEmulator, make: Make, tag: str) -> None:
    pubsub_emulator.create_topic_and_subscription(f"{tag}_q", ack_deadline=1)
    message_id = pubsub_emulator.publish(f"{tag}_q", b'{"experiment": {"key": "k1"}}')
    backend = make()

    delivery = take(backend)
    assert (delivery.backend, delivery.queue) == ("pubsub", f"{tag}_q_sub")
    assert (delivery.message_id, delivery.delivery_count) == (message_id, 1)
    delivery.ack()

    nothing_for(backend, 2.5)  # well past the 1 s deadline: it was not handed out again
    assert json.loads(backend.attempts.path.read_text()) == {}


def test_requeue_redelivers_at_once_and_counts(
    pubsub_emulator: PubSubEmulator, make: Make, tag: str
) -> None:
    # The client's 20 s deadline: coming back within a few seconds means it was given back.
    pubsub_emulator.create_topic_and_subscription(f"{tag}_q")
    message_id = pubsub_emulator.publish(f"{tag}_q", b"body")
    backend = make()

    first = take(backend)
    first.requeue()
    started = time.monotonic()
    second = take(backend)
    assert time.monotonic() - started < 5
    assert (second.message_id, second.body, second.delivery_count) == (message_id, b"body", 2)

    # The count survives a restart of the agent.
    second.requeue()
    backend.close()
    third = take(make())
    assert (third.message_id, third.delivery_count) == (message_id, 3)
    third.ack()


def test_dead_letter_policy_counts_on_the_server(
    pubsub_emulator: PubSubEmulator, make: Make, tag: str
) -> None:
    emu = pubsub_emulator
    emu.publisher.create_topic(name=emu.topic(f"{tag}_dead"))
    emu.publisher.create_topic(name=emu.topic(f"{tag}_q"))
    policy = {"dead_letter_topic": emu.topic(f"{tag}_dead"), "max_delivery_attempts": 5}
    emu.subscriber.create_subscription(
        request={
            "name": emu.subscription(f"{tag}_q_sub"),
            "topic": emu.topic(f"{tag}_q"),
            "dead_letter_policy": policy,
        }
    )
    emu.publish(f"{tag}_q", b"body")
    backend = make(mismatch="_dead$")

    take(backend).requeue()
    second = take(backend)
    assert second.delivery_count == 2
    second.ack()
    assert not backend.attempts.path.exists()  # Pub/Sub counted: nothing kept on disk


def test_a_message_no_slot_claims_goes_back(
    pubsub_emulator: PubSubEmulator, make: Make, tag: str
) -> None:
    path = pubsub_emulator.create_topic_and_subscription(f"{tag}_q")  # 20 s deadline
    message_id = pubsub_emulator.publish(f"{tag}_q", b"body")
    backend = make()
    assert backend.receive() is None  # a slot was free: a pull starts
    # The slot went to another queue: the supervisor only ticks now.
    started = time.monotonic()
    while time.monotonic() - started < HOLD_GRACE + 1:
        backend.tick()
        time.sleep(0.05)
    response = pubsub_emulator.subscriber.pull(subscription=path, max_messages=1, timeout=5)
    assert [m.message.message_id for m in response.received_messages] == [message_id]
    assert not backend.attempts.path.exists()  # never handed out, so never counted


def test_lease_is_renewed_past_the_deadline(
    pubsub_emulator: PubSubEmulator, make: Make, tag: str
) -> None:
    pubsub_emulator.create_topic_and_subscription(f"{tag}_q", ack_deadline=2)
    pubsub_emulator.publish(f"{tag}_q", b"long experiment")
    backend = make(ack_deadline=2)

    held = take(backend)
    # Three times the subscription's deadline, polling as an agent with a free slot would.
    nothing_for(backend, 6.0)
    # Without the tick's renewals the same message comes back once the lease lapses.
    started = time.monotonic()
    deadline = started + 6.0
    again = None
    while again is None and time.monotonic() < deadline:
        again = backend.receive()
        time.sleep(0.05)
    assert again is not None, "the message did not come back once its lease was left to lapse"
    assert again.message_id == held.message_id
    assert time.monotonic() - started <= 3.5
    again.ack()


def test_deleted_subscription_is_dropped_and_others_served(
    pubsub_emulator: PubSubEmulator, make: Make, tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    emu = pubsub_emulator
    gone = emu.create_topic_and_subscription(f"{tag}_gone")
    emu.create_topic_and_subscription(f"{tag}_kept")
    emu.publish(f"{tag}_gone", b"held when deleted")
    backend = make()  # refresh: 30 s, so the deletion is found by pulling
    held = take(backend)
    assert held.queue == f"{tag}_gone_sub"

    emu.subscriber.delete_subscription(subscription=gone)
    emu.publish(f"{tag}_kept", b"still served")
    caplog.set_level(logging.INFO, logger="agent.queues.pubsub")
    for _ in range(4):  # more than one pull of each: the deleted one fails, the other answers
        delivery = take(backend)
        assert (delivery.queue, delivery.body) == (f"{tag}_kept_sub", b"still served")
        delivery.requeue()
    delivery = take(backend)
    delivery.ack()
    held.ack()  # its subscription is gone: logged, not raised

    assert backend.served_queues() == [f"{tag}_kept_sub"]
    assert f"subscription {tag}_gone_sub no longer exists" in caplog.text
    assert f"a message from {tag}_gone_sub could not be acknowledged" in caplog.text
    assert "Traceback" not in caplog.text


def test_studioml_body_round_trips_byte_for_byte(
    pubsub_emulator: PubSubEmulator, make: Make, tag: str, tmp_path: Path
) -> None:
    workspace = write_workspace(tmp_path / "ws", "print('hi')\n")
    submission = Submission(
        workspace,
        "train.py",
        ["10", "--flag", "héllo wörld ✓"],
        f"{tag}_q",
        tmp_path / "q",
        tmp_path / "store",
    )
    # UTF-8 as it is, indented, a final newline: whatever the bytes, the agent sees them all.
    body = json.dumps(prepare(submission), indent=1, ensure_ascii=False).encode() + b"\n"
    pubsub_emulator.create_topic_and_subscription(f"{tag}_q")
    pubsub_emulator.publish(f"{tag}_q", body)

    delivery = take(make())
    assert delivery.body == body
    assert parse_message(delivery.body).key == submission.key
    delivery.ack()


def test_unreachable_service_is_logged_once_and_never_raises(
    make: Make, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.queues.pubsub")
    backend = make(emulator_host="127.0.0.1:1")  # nothing listens there
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        backend.tick()
        assert backend.receive() is None
        time.sleep(0.05)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "listing the subscriptions of project test-project failed: ServiceUnavailable" in (
        warnings[0].getMessage()
    )


def test_key_files(tmp_path: Path) -> None:
    """What a service-account key can be checked for here (Google's service is not reachable)."""
    queue_filter = QueueFilter("^ps")
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "service_account", "private_key": "-----BEGIN SECRET"}')
    with pytest.raises(ConfigError, match="not a usable service-account key") as raised:
        PubSubQueue("k", broken, "p", queue_filter, tmp_path)
    assert "SECRET" not in str(raised.value)
    with pytest.raises(ConfigError, match="key file or an emulator host is required"):
        PubSubQueue("k", None, "p", queue_filter, tmp_path)

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "p",
                "private_key_id": "1",
                "private_key": pem,
                "client_email": "agent@p.iam.gserviceaccount.com",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    backend = PubSubQueue("k", good, "p", queue_filter, tmp_path)  # builds without the network
    backend.close()
