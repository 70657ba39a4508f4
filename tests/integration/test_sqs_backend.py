"""The SQS backend against moto's SQS: the session's moto server, with IAM authentication on.

Every test uses queues of its own (a random prefix) and a filter that matches only those, since
all tests share one account on one server.
"""

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from agent.queues import build_backend
from agent.queues.base import QueueFilter
from agent.queues.journal import Entry, Journal
from agent.queues.sqs import ATTEMPTS_ATTRIBUTE, SqsDelivery, SqsQueue
from agent.submit import Submission, prepare
from tests.conftest import wait_until, write_workspace
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.sqs]

MakeBackend = Callable[..., SqsQueue]
LOGGER = "agent.queues.sqs"
AGAIN = {"AttributeNames": ["All"], "WaitTimeSeconds": 1}


@pytest.fixture
def prefix() -> str:
    return f"sqs_{uuid.uuid4().hex[:8]}"


def sqs_client(server: S3Server, keys: tuple[str, str] | None = None) -> Any:
    access_key, secret_key = keys or (server.access_key, server.secret_key)
    return boto3.client(
        "sqs",
        endpoint_url=server.endpoint,
        region_name=server.region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
    )


@pytest.fixture
def admin(s3_server: S3Server) -> Any:
    """The submitter's view: a client with every right, as ``studio run`` would use."""
    return sqs_client(s3_server)


@pytest.fixture
def make_backend(s3_server: S3Server, tmp_path: Path, prefix: str) -> Iterator[MakeBackend]:
    made: list[SqsQueue] = []

    def make(server: S3Server = s3_server, **overrides: Any) -> SqsQueue:
        options: dict[str, Any] = {
            "name": "cred",
            "access_key": server.access_key,
            "secret_key": server.secret_key,
            "region": server.region,
            "queue_filter": QueueFilter(f"^{prefix}_"),
            "state_dir": tmp_path / "state",
            "endpoint_url": server.endpoint,
        }
        options.update(overrides)
        backend = SqsQueue(**options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def journal(tmp_path: Path) -> list[Entry]:
    return list(Journal(tmp_path / "state" / "inflight" / "sqs" / "cred").entries())


def counts(admin: Any, url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attrs = admin.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return int(attrs[names[0]]), int(attrs[names[1]])


def take(backend: SqsQueue, timeout: float = 10) -> SqsDelivery:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        backend.capacity(1)  # the supervisor's loop with a free slot
        delivery = backend.receive()
        if delivery is not None:
            assert isinstance(delivery, SqsDelivery)
            return delivery
    raise AssertionError(f"nothing received from {backend.served_queues()} in {timeout}s")


def tick_for(backend: SqsQueue, seconds: float) -> None:
    """The supervisor's loop, as far as the backend sees it: a tick every 0.1 s."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        backend.tick()
        time.sleep(0.1)


def hold_into_custody(backend: SqsQueue, tmp_path: Path) -> None:
    deadline = time.monotonic() + 10
    while not journal(tmp_path):
        assert time.monotonic() < deadline, "the message was not taken into custody"
        backend.tick()
        time.sleep(0.1)


def studioml_body(tmp_path: Path, queue: str) -> str:
    """The message ``studio run --queue <queue>`` (0.0.49) sends: raw JSON text."""
    workspace = write_workspace(tmp_path / "ws", "print('hi')\n")
    sub = Submission(workspace, "train.py", ["--name", "naïve run"], queue, tmp_path, tmp_path)
    return json.dumps(prepare(sub))


def test_discovery_serves_the_matching_queues(
    admin: Any, make_backend: MakeBackend, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("a", "b", "a_response"):
        admin.create_queue(QueueName=f"{prefix}_{name}")
    admin.create_queue(QueueName=f"x{prefix}_a")
    caplog.set_level(logging.INFO, LOGGER)
    backend = make_backend(queue_filter=QueueFilter(f"^{prefix}_", "_b$"), refresh=0.2)
    backend.tick()
    assert backend.served_queues() == [f"{prefix}_a"]
    logged = caplog.text
    assert f"serving queues {prefix}_a" in logged
    assert f"not serving {prefix}_b: matches queue_mismatch '_b$'" in logged
    assert f"not serving {prefix}_a_response: response queue" in logged
    assert f"not serving x{prefix}_a: does not match queue_match" in logged

    admin.create_queue(QueueName=f"{prefix}_c")
    wait_until(
        lambda: (backend.tick(), backend.served_queues())[1] == [f"{prefix}_a", f"{prefix}_c"]
    )
    assert logged.count(f"not serving {prefix}_b") == caplog.text.count(f"not serving {prefix}_b")


def test_queues_are_served_round_robin(admin: Any, make_backend: MakeBackend, prefix: str) -> None:
    for name in ("a", "b"):
        url = admin.create_queue(QueueName=f"{prefix}_{name}")["QueueUrl"]
        for n in range(2):
            admin.send_message(QueueUrl=url, MessageBody=f'{{"n": {n}}}')
    backend = make_backend(wait_time=1)
    first, second = take(backend), take(backend)
    assert {first.queue, second.queue} == {f"{prefix}_a", f"{prefix}_b"}
    backend.pause(f"{prefix}_a", 60)
    assert take(backend).queue == f"{prefix}_b"
    assert backend.receive() is None  # one message is left, in the paused queue


def test_receive_then_ack_deletes(
    admin: Any, make_backend: MakeBackend, prefix: str, tmp_path: Path
) -> None:
    url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
    body = studioml_body(tmp_path, f"{prefix}_q")
    admin.send_message(QueueUrl=url, MessageBody=body)  # as the client: no attributes
    backend = make_backend()
    delivery = take(backend)
    assert (delivery.queue, delivery.delivery_count) == (f"{prefix}_q", 1)
    assert delivery.body == body.encode()  # byte for byte
    assert counts(admin, url) == (0, 1)
    delivery.ack()
    assert counts(admin, url) == (0, 0)
    assert backend.receive() is None


def test_requeue_makes_it_visible_at_once(
    admin: Any, make_backend: MakeBackend, prefix: str
) -> None:
    url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
    admin.send_message(QueueUrl=url, MessageBody='{"experiment": {"key": "k"}}')
    backend = make_backend(visibility=600)
    take(backend).requeue()
    assert counts(admin, url) == (1, 0)
    again = take(backend, timeout=2)
    assert again.delivery_count == 2  # ApproximateReceiveCount
    again.ack()


def test_the_lease_is_renewed_from_the_tick(
    admin: Any, make_backend: MakeBackend, prefix: str
) -> None:
    url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
    admin.send_message(QueueUrl=url, MessageBody="{}")
    backend = make_backend(visibility=2)
    delivery = take(backend)
    tick_for(backend, 5)  # 2.5 visibility timeouts
    other = admin.receive_message(QueueUrl=url, WaitTimeSeconds=0)
    assert not other.get("Messages"), "a second consumer got a message whose lease was renewed"
    assert counts(admin, url) == (0, 1)
    # Stop renewing, as a killed agent would: the message comes back within the visibility.
    deadline = time.monotonic() + 5
    while not (got := admin.receive_message(QueueUrl=url, **AGAIN)).get("Messages"):
        assert time.monotonic() < deadline, "the message did not come back after its lease"
    assert got["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "2"
    assert delivery.delivery_count == 1


def test_custody_past_max_invisible_then_ack(
    admin: Any, make_backend: MakeBackend, prefix: str, tmp_path: Path
) -> None:
    url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
    admin.send_message(QueueUrl=url, MessageBody='{"experiment": {"key": "long"}}')
    backend = make_backend(visibility=2, max_invisible=3)
    delivery = take(backend)
    assert journal(tmp_path) == []
    hold_into_custody(backend, tmp_path)
    [entry] = journal(tmp_path)
    assert (entry.queue, entry.body) == (f"{prefix}_q", delivery.body)
    assert counts(admin, url) == (0, 0)  # deleted from SQS: its 12 h cap no longer applies
    tick_for(backend, 1)
    delivery.ack()
    assert journal(tmp_path) == []
    assert counts(admin, url) == (0, 0)


def test_custody_then_requeue_sends_it_back_once(
    admin: Any, make_backend: MakeBackend, prefix: str, tmp_path: Path
) -> None:
    url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
    body = studioml_body(tmp_path, f"{prefix}_q")
    body = body[:-1] + ', "note": "ünïcödé ✓"}'  # raw UTF-8 too, not only \\u escapes
    admin.send_message(QueueUrl=url, MessageBody=body)
    backend = make_backend(visibility=2, max_invisible=3)
    delivery = take(backend)
    hold_into_custody(backend, tmp_path)
    delivery.requeue()
    assert journal(tmp_path) == []
    assert counts(admin, url) == (1, 0)
    again = take(backend)
    assert again.body == body.encode()  # byte for byte through the journal and back
    assert again.delivery_count == 2  # one attempt recorded on the copy, plus this receive
    again.ack()
    assert counts(admin, url) == (0, 0)


def test_recover_sends_back_what_a_killed_agent_held(
    admin: Any,
    make_backend: MakeBackend,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
    gone = admin.create_queue(QueueName=f"{prefix}_gone")["QueueUrl"]
    for queue in (url, gone):
        admin.send_message(QueueUrl=queue, MessageBody='{"experiment": {"key": "k"}}')
    crashed = make_backend(visibility=2, max_invisible=3, wait_time=1)
    take(crashed), take(crashed)
    hold_into_custody(crashed, tmp_path)
    wait_until(lambda: (crashed.tick(), len(journal(tmp_path)))[1] == 2, timeout=10)
    assert counts(admin, url) == counts(admin, gone) == (0, 0)
    admin.delete_queue(QueueUrl=gone)
    # The agent is killed here: nothing settled, nothing closed. A new one starts.
    caplog.set_level(logging.INFO, LOGGER)
    assert make_backend().recover() == 1
    assert counts(admin, url) == (1, 0)
    assert [e.queue for e in journal(tmp_path)] == [f"{prefix}_gone"]  # kept, and said so
    assert f"{prefix}_gone refuses message" in caplog.text
    got = admin.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"][0]
    assert got["MessageAttributes"][ATTEMPTS_ATTRIBUTE]["StringValue"] == "1"


@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_refused_credentials_are_logged_once_without_the_secret(
    admin: Any,
    make_backend: MakeBackend,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    wrong: str,
) -> None:
    admin.create_queue(QueueName=f"{prefix}_q")
    secret = f"not-the-secret-{uuid.uuid4().hex}"
    keys = {"secret_key": secret}
    if wrong == "access key":
        keys["access_key"] = "AKIAEXAMPLEUNKNOWN00"
    caplog.set_level(logging.DEBUG, LOGGER)
    backend = make_backend(refresh=0.2, **keys)
    deadline = time.monotonic() + 2  # the second listing comes within 1 s (backoff, jitter)
    while time.monotonic() < deadline:
        backend.tick()
        assert backend.receive() is None
        time.sleep(0.05)
    records = [r for r in caplog.records if r.name == LOGGER]
    loud = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, loud
    code = "SignatureDoesNotMatch" if wrong == "secret" else "InvalidClientTokenId"
    assert "refused the credential" in loud[0], loud[0]
    assert code in loud[0], loud[0]
    assert len(records) >= 2, "the listing was not retried"
    assert all(secret not in r.getMessage() for r in records)
    assert secret not in caplog.text


def test_a_queue_the_credential_may_not_read_is_set_aside(
    s3_server: S3Server,
    admin: Any,
    make_backend: MakeBackend,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
    admin.send_message(QueueUrl=url, MessageBody="{}")
    access_key, secret_key = s3_server.make_user(f"list-{prefix}", ["sqs:ListQueues"])
    backend = make_backend(access_key=access_key, secret_key=secret_key)
    caplog.set_level(logging.INFO, LOGGER)

    def denials() -> list[int]:
        assert backend.receive() is None  # the receivers' failure is logged from the loop
        backend.tick()
        return [r.levelno for r in caplog.records if "not allowed to receive" in r.getMessage()]

    wait_until(lambda: denials() != [], timeout=10)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # and only once, however often it is tried again
        assert denials() == [logging.ERROR]
        time.sleep(0.05)
    assert backend.served_queues() == [f"{prefix}_q"]
    assert counts(admin, url) == (1, 0)


def test_an_unreachable_endpoint_backs_off_without_raising(
    make_backend: MakeBackend, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    closed = S3Server(tmp_path / "never-started.log")  # a free port nobody listens on
    caplog.set_level(logging.DEBUG, LOGGER)
    backend = make_backend(endpoint_url=closed.endpoint, refresh=0.2)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        backend.tick()
        assert backend.receive() is None
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, loud
    assert "SQS at http://127.0.0.1" in loud[0]


def test_a_return_sqs_cannot_take_stays_in_the_journal(
    make_backend: MakeBackend, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = S3Server(tmp_path / "moto.log")  # a server of our own, to stop and start
    server.start()
    try:
        admin = sqs_client(server)
        url = admin.create_queue(QueueName=f"{prefix}_q")["QueueUrl"]
        admin.send_message(QueueUrl=url, MessageBody='{"experiment": {"key": "k"}}')
        backend = make_backend(server, visibility=2, max_invisible=3, wait_time=1)
        delivery = take(backend)
        hold_into_custody(backend, tmp_path)
        tick_for(backend, 0.5)  # the delete from SQS is done
        server.stop()
        caplog.set_level(logging.INFO, LOGGER)
        delivery.requeue()  # SQS is down: must neither raise nor lose the message
        tick_for(backend, 1.5)  # the send-back is tried again after 1 s
        assert len(journal(tmp_path)) == 1
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 2, [r.getMessage() for r in warned]  # the outage; the message

        server.start()  # empty again (moto keeps nothing): the client recreates its queue
        assert sqs_client(server).create_queue(QueueName=f"{prefix}_q")["QueueUrl"] == url
        wait_until(lambda: (backend.tick(), journal(tmp_path))[1] == [], timeout=10)
        assert counts(sqs_client(server), url) == (1, 0)
        assert "SQS answers again" in caplog.text
    finally:
        server.stop()


def test_the_registry_builds_it(s3_server: S3Server, tmp_path: Path) -> None:
    backend = build_backend(
        "sqs",
        name="cred",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
        queue_filter=QueueFilter("^sqs_"),
        state_dir=tmp_path,
    )
    assert isinstance(backend, SqsQueue)
    assert backend.kind == "sqs"
