"""AWS SQS queues, as the StudioML client creates them (protocol §B).

Delivery semantics:
- Queues are found with ``ListQueues`` (paginated), named by the last segment of their URL and
  filtered by the regexes; refreshed every ``refresh`` seconds from the tick.
- ``receive`` long-polls one served queue per call (round-robin, ``WaitTimeSeconds=wait_time``),
  so one call blocks the supervisor's loop for at most ``wait_time`` seconds. Longer waits cost
  fewer requests on idle queues (AWS bills per request) but delay signals, settling and the other
  backends by as much; the default of 1 s keeps an idle queue at about one request a second.
- Lease: a received message is invisible for ``visibility`` seconds; the tick renews that when
  half of it has passed, so a lapse needs SQS to be unreachable for ``visibility / 2``. A failed
  renewal is retried every second and logged once. A killed agent simply stops renewing: its
  messages become visible again within ``visibility`` seconds.
- SQS caps a message's invisibility at 12 h from its receive. Past ``max_invisible`` (11h30m)
  the agent takes custody, as ``rabbitmq.py`` does: it writes the message to its journal (fsync),
  then deletes it from SQS. From then on acknowledging drops the entry, and returning sends the
  body back (``SendMessage``, with a ``studio-agent-attempts`` attribute) and then drops the
  entry; an agent killed in between sends back what it held when it starts again (``recover``).
  So an experiment of any length runs once.
- Before custody, ack is ``DeleteMessage`` and return is ``ChangeMessageVisibility(0)``.
- Nothing SQS cannot be reached for is lost: a delete or a send that fails is retried from the
  tick (the lease kept renewed meanwhile); a failed return before custody needs no retry, since
  the message becomes visible by itself when its lease lapses. What may happen instead is a
  second copy: a crash between the journal write and the delete, or between a send-back and the
  entry's removal, returns a message that is also still (or again) in SQS. At least once, never
  lost; and a message not deleted when its 12 h are up is handed out again (logged).
- Delivery count = ``ApproximateReceiveCount`` plus the attempts recorded on a copy sent back.
- Errors never leave ``receive``/``tick``: refused credentials and network trouble are logged once
  per outage (never the secret) and back off, capped exponential with full jitter.
"""

import base64
import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from agent import __version__
from agent.errors import ConfigError
from agent.queues.base import Delivery, QueueBackend, QueueFilter
from agent.queues.journal import Entry, Journal

log = logging.getLogger(__name__)

ATTEMPTS_ATTRIBUTE = "studio-agent-attempts"
MAX_INVISIBLE = 12 * 3600  # SQS's cap, from a message's receive
BACKOFF_MAX = 60.0
RETRY_GAP = 1.0  # seconds between tries of a failed renewal or settlement of one message
_CREDENTIALS = frozenset(
    {"InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
     "InvalidAccessKeyId", "ExpiredToken", "IncompleteSignature", "MissingAuthenticationToken"}
)  # fmt: skip
_DENIED = frozenset({"AccessDenied", "AccessDeniedException"})
_QUEUE_GONE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_HANDLE_GONE = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue"})
_THROTTLED = frozenset({"Throttling", "ThrottlingException", "RequestThrottled", "OverLimit"})
T = TypeVar("T")


class _Failure(Exception):
    """An SQS call failed; ``kind`` says what to do about it."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind  # credentials, denied, queue_gone, handle_gone, transient, refused
        self.text = text


def _classify(exc: Exception) -> tuple[str, str]:
    if not isinstance(exc, ClientError):
        return "transient", f"{type(exc).__name__}: {exc}"
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    # moto (and some proxies) put an XML error document where the JSON protocol expects a code.
    inner = re.search(r"<Code>([^<]+)</Code>(?:.*?<Message>([^<]*)</Message>)?", message, re.S)
    if inner:
        code, message = inner.group(1), inner.group(2) or ""
    text = f"{code}: {message}".rstrip(": ")
    if code in _DENIED:
        return "denied", text
    if code in _CREDENTIALS or status in (401, 403):
        return "credentials", text
    if code in _QUEUE_GONE:
        return "queue_gone", text
    if code in _HANDLE_GONE:
        return "handle_gone", text
    if status >= 500 or status == 429 or code in _THROTTLED:
        return "transient", text
    return "refused", text


class SqsDelivery(Delivery):
    backend = "sqs"

    def __init__(self, owner: "SqsQueue", queue: str, url: str, message: dict[str, Any]):
        self._owner = owner
        self.queue, self.url = queue, url
        self.message_id = str(message["MessageId"])
        self.receipt = str(message["ReceiptHandle"])
        self.body = str(message["Body"]).encode()
        self.attributes = {
            k: v for k, v in (message.get("MessageAttributes") or {}).items()
            if k != ATTEMPTS_ATTRIBUTE
        }  # fmt: skip
        system = message.get("Attributes") or {}
        self.group_id = system.get("MessageGroupId")  # FIFO queues need it to send back
        earlier = (message.get("MessageAttributes") or {}).get(ATTEMPTS_ATTRIBUTE, {})
        self.delivery_count = _int(system.get("ApproximateReceiveCount"), 1) + _int(
            earlier.get("StringValue"), 0
        )
        self.received_at = self.extended_at = time.monotonic()
        self.entry: Entry | None = None  # set once in the agent's custody
        self.in_sqs = True  # SQS still holds it under our receipt handle
        self.pending: str | None = None  # "ack" or "return" once settled, until that is done
        self.next_try = 0.0
        self.complained = False

    def ack(self) -> None:
        self._owner.settle(self, "ack")

    def requeue(self) -> None:
        self._owner.settle(self, "return")

    def custody_meta(self) -> dict[str, Any]:
        attributes = {}
        for name, value in self.attributes.items():
            kept = {k: v for k, v in value.items() if k in ("DataType", "StringValue")}
            if "BinaryValue" in value:  # bytes: base64 in the JSON journal
                kept["BinaryValue"] = base64.b64encode(value["BinaryValue"]).decode()
            attributes[name] = kept
        return {
            "queue_url": self.url,
            "message_id": self.message_id,
            "attempts": self.delivery_count,
            "attributes": attributes,
            "group_id": self.group_id,
        }


def _int(value: object, default: int) -> int:
    try:
        return int(str(value))
    except ValueError:
        return default


class SqsQueue(QueueBackend):
    kind = "sqs"

    def __init__(
        self,
        name: str,
        access_key: str,
        secret_key: str,
        region: str,
        queue_filter: QueueFilter,
        state_dir: Path,
        *,
        session_token: str | None = None,
        endpoint_url: str | None = None,
        refresh: float = 30.0,
        visibility: float = 60.0,
        max_invisible: float = 11.5 * 3600,
        wait_time: int = 1,
    ):
        if not 0 <= wait_time <= 20:
            raise ConfigError(f"sqs {name}: wait_time {wait_time} is outside SQS's 0..20 s")
        if visibility < 2 or max_invisible + visibility >= MAX_INVISIBLE:
            raise ConfigError(f"sqs {name}: visibility + max_invisible must stay below 12 h")
        self.name, self.region, self.endpoint_url = name, region, endpoint_url
        self._keys = (access_key, secret_key, session_token)
        self.filter = queue_filter
        self.refresh, self.wait_time = refresh, wait_time
        self.visibility, self.max_invisible = visibility, max_invisible
        self.journal = Journal(state_dir / "inflight" / "sqs" / name)
        self._client: Any = None  # botocore client; no SQS stubs in the dev dependencies
        self._queues: dict[str, str] = {}  # served name -> URL
        self._ignored: set[str] = set()
        self._denied: set[str] = set()
        self._next, self._next_refresh = 0, 0.0
        self._retry_at, self._failures = 0.0, 0
        self._outage: str | None = None  # the failure kind being logged; None when healthy
        self._held: dict[str, SqsDelivery] = {}  # by receipt handle, until settled for good
        self._returns: list[Entry] = []  # journal entries SQS could not take back yet

    # -- calls and failures ----------------------------------------------------------------------

    def _sqs(self) -> Any:
        if self._client is None:
            access_key, secret_key, token = self._keys
            config = Config(
                retries={"total_max_attempts": 2, "mode": "standard"},  # we back off ourselves
                connect_timeout=5,
                read_timeout=self.wait_time + 10,
                user_agent_extra=f"studio-agent/{__version__}",
            )
            self._client = boto3.session.Session().client(
                "sqs",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                aws_session_token=token,
                config=config,
            )
        return self._client

    def _call(self, request: Callable[[Any], T]) -> T:
        """Run ``request(client)``; raise ``_Failure`` instead of botocore's errors."""
        try:
            result = request(self._sqs())
        except (ClientError, BotoCoreError, ValueError) as exc:
            kind, text = _classify(exc)
            raise _Failure(kind, text.replace(self._keys[1], "***")) from exc
        if self._outage is not None:
            log.info("%s: SQS answers again", self.name)
            self._outage = None
        self._failures = 0
        return result

    def _trouble(self, failure: _Failure, what: str) -> None:
        """Back off from the whole credential, logging once per outage."""
        self._failures += 1
        self._retry_at = time.monotonic() + random.uniform(
            0, min(BACKOFF_MAX, 0.5 * 2**self._failures)
        )
        if failure.kind in ("credentials", "denied"):
            line = (
                f"SQS refused credential {self.name!r} (access key {self._keys[0]}): "
                f"{failure.text}; fix or replace it, retrying with backoff"
            )
        else:
            where = self.endpoint_url or f"region {self.region}"
            line = f"SQS ({where}) failed: {failure.text}; retrying with backoff"
        level = logging.DEBUG if self._outage == failure.kind else logging.ERROR
        log.log(level, "%s: %s: %s", self.name, what, line)
        self._outage = failure.kind

    # -- discovery -------------------------------------------------------------------------------

    def _list_urls(self, client: Any) -> list[str]:
        pages = client.get_paginator("list_queues").paginate(PaginationConfig={"PageSize": 1000})
        return [url for page in pages for url in page.get("QueueUrls", [])]

    def _refresh_queues(self) -> None:
        try:
            urls = self._call(self._list_urls)
        except _Failure as failure:
            self._trouble(failure, "listing queues")
            self._next_refresh = time.monotonic() + min(self.refresh, 5.0)
            return
        self._next_refresh = time.monotonic() + self.refresh
        names = {url.rstrip("/").rsplit("/", 1)[-1]: url for url in urls}
        served = {n: u for n, u in sorted(names.items()) if self.filter.allows(n)}
        for name in sorted(set(names) - set(served) - self._ignored):
            log.info("%s: not serving %s: %s", self.name, name, self.filter.why_not(name))
            self._ignored.add(name)
        if served != self._queues:
            log.info("%s: serving queues %s", self.name, ", ".join(served) or "(none)")
        self._queues = served

    def served_queues(self) -> list[str]:
        return list(self._queues)

    # -- taking ----------------------------------------------------------------------------------

    def receive(self) -> Delivery | None:
        now = time.monotonic()
        if now >= self._next_refresh and now >= self._retry_at:
            self._refresh_queues()
        if time.monotonic() < self._retry_at:
            return None
        names = list(self._queues)
        for offset in range(len(names)):
            queue = names[(self._next + offset) % len(names)]
            if not self.paused(queue):
                # One queue per call: a call blocks the loop for one long poll at most.
                self._next = (self._next + offset + 1) % len(names)
                return self._receive_from(queue)
        return None

    def _receive_from(self, queue: str) -> SqsDelivery | None:
        url = self._queues[queue]
        try:
            reply = self._call(
                lambda c: c.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=self.wait_time,
                    VisibilityTimeout=int(self.visibility),
                    AttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
                    MessageAttributeNames=["All"],
                )
            )
        except _Failure as failure:
            self._receive_failed(queue, failure)
            return None
        self._denied.discard(queue)
        messages = reply.get("Messages") or []
        if not messages:
            return None
        delivery = SqsDelivery(self, queue, url, messages[0])
        self._held[delivery.receipt] = delivery
        return delivery

    def _receive_failed(self, queue: str, failure: _Failure) -> None:
        if failure.kind == "queue_gone":
            log.info("%s: queue %s is gone; refreshing the queue list", self.name, queue)
            self._queues.pop(queue, None)
            self._next_refresh = 0.0
        elif failure.kind == "denied":
            # Listing worked, so this credential lacks rights on this queue only.
            if queue not in self._denied:
                log.error("%s: not allowed to receive from %s: %s", self.name, queue, failure.text)
                self._denied.add(queue)
            self.pause(queue, BACKOFF_MAX)
        else:
            self._trouble(failure, f"receiving from {queue}")

    # -- leases and settling -----------------------------------------------------------------

    def tick(self) -> None:
        """Renew leases, finish settlements, send back returns, refresh the queue list."""
        now = time.monotonic()
        for delivery in list(self._held.values()):
            if now >= delivery.next_try and not self._advance_safely(delivery):
                break  # SQS is unreachable: one timeout per tick is enough
        if self._returns and now >= self._retry_at:
            pending, self._returns = self._returns, []
            self._send_all(pending)
        if now >= self._next_refresh and now >= self._retry_at:
            self._refresh_queues()

    def settle(self, delivery: SqsDelivery, how: str) -> None:
        """The supervisor's ack ("ack") or requeue ("return"); never raises for SQS trouble."""
        if how == "return" and delivery.entry is None:
            self._held.pop(delivery.receipt, None)
            try:
                self._call(lambda c: self._set_visibility(c, delivery, 0))
            except _Failure as failure:
                log.warning(
                    "%s: could not return message %s at once (%s); it returns when its lease "
                    "lapses, within %.0fs",
                    self.name,
                    delivery.message_id,
                    failure.text,
                    self.visibility,
                )
            return
        if how == "ack" and delivery.entry is not None:
            self.journal.drop(delivery.entry)
            delivery.entry = None
        delivery.pending, delivery.next_try = how, 0.0
        self._advance_safely(delivery)

    def _advance_safely(self, delivery: SqsDelivery) -> bool:
        """Take the next step for ``delivery``; False when SQS looks unreachable."""
        try:
            self._advance(delivery, time.monotonic())
        except _Failure as failure:
            return self._step_failed(delivery, failure)
        except OSError as exc:  # the journal: a full disk must not stop the loop
            self._complain(delivery, f"cannot write the journal: {exc}")
            delivery.next_try = time.monotonic() + RETRY_GAP
        return True

    def _advance(self, d: SqsDelivery, now: float) -> None:
        if d.in_sqs:
            if d.entry is None and d.pending is None and now - d.received_at >= self.max_invisible:
                meta = d.custody_meta()
                d.entry = self.journal.keep(d.queue, d.body, meta)  # before the delete
                log.info(
                    "%s: message %s from %s held %.0fs, near SQS's 12 h cap: in custody now",
                    self.name,
                    d.message_id,
                    d.queue,
                    now - d.received_at,
                )
            if d.entry is not None or d.pending == "ack":
                self._call(lambda c: c.delete_message(QueueUrl=d.url, ReceiptHandle=d.receipt))
                d.in_sqs = False
            elif d.pending is None and now - d.extended_at >= self.visibility / 2:
                self._call(lambda c: self._set_visibility(c, d, int(self.visibility)))
                d.extended_at = now
        if d.complained:
            log.info("%s: message %s: SQS answers again", self.name, d.message_id)
            d.complained = False
        if not d.in_sqs and d.pending is not None:
            if d.pending == "return" and d.entry is not None:
                self._send_back(d.entry)
            self._held.pop(d.receipt, None)

    def _set_visibility(self, client: Any, delivery: SqsDelivery, seconds: int) -> Any:
        return client.change_message_visibility(
            QueueUrl=delivery.url, ReceiptHandle=delivery.receipt, VisibilityTimeout=seconds
        )

    def _step_failed(self, d: SqsDelivery, failure: _Failure) -> bool:
        d.next_try = time.monotonic() + RETRY_GAP
        if failure.kind in ("queue_gone", "handle_gone") and d.in_sqs:
            # Deleted with its queue, or its lease lapsed and SQS gave it to someone else.
            log.warning(
                "%s: message %s from %s is no longer ours in SQS (%s); it may run twice",
                self.name,
                d.message_id,
                d.queue,
                failure.text,
            )
            d.in_sqs, d.next_try = False, 0.0
            return True
        if failure.kind == "queue_gone":  # a send-back: the entry stays for the next start
            log.error(
                "%s: queue %s is gone; message %s kept in %s",
                self.name,
                d.queue,
                d.message_id,
                self.journal.root / d.queue,
            )
            self._held.pop(d.receipt, None)
            return True
        self._complain(d, failure.text)
        if failure.kind in ("credentials", "transient"):
            self._trouble(failure, f"message {d.message_id}")
            return False
        return True

    def _complain(self, d: SqsDelivery, why: str) -> None:
        if not d.complained:
            state = "in custody" if d.entry is not None else "its lease"
            log.warning("%s: message %s (%s): %s; retrying", self.name, d.message_id, state, why)
            d.complained = True

    # -- custody returns -----------------------------------------------------------------------

    def _send_back(self, entry: Entry) -> None:
        """Send a journaled message back to its queue, then forget it; raises ``_Failure``."""
        meta = entry.meta
        attributes = {}
        for name, value in (meta.get("attributes") or {}).items():
            kept = dict(value)
            if "BinaryValue" in kept:
                kept["BinaryValue"] = base64.b64decode(kept["BinaryValue"])
            attributes[name] = kept
        attempts = str(int(meta.get("attempts", 1)))
        attributes[ATTEMPTS_ATTRIBUTE] = {"DataType": "Number", "StringValue": attempts}
        params: dict[str, Any] = {
            "QueueUrl": meta["queue_url"],
            "MessageBody": entry.body.decode(),
            "MessageAttributes": attributes,
        }
        if meta.get("group_id"):  # FIFO: same group, and a fresh deduplication id
            params.update(MessageGroupId=meta["group_id"], MessageDeduplicationId=uuid.uuid4().hex)
        self._call(lambda c: c.send_message(**params))
        self.journal.drop(entry)

    def _send_all(self, entries: list[Entry]) -> int:
        """Send entries back; those SQS cannot take now are retried from the tick."""
        sent = 0
        for index, entry in enumerate(entries):
            try:
                self._send_back(entry)
                sent += 1
            except _Failure as failure:
                if failure.kind == "queue_gone" or failure.kind == "refused":
                    log.error(
                        "%s: cannot send message %s back to %s (%s); it stays in %s",
                        self.name,
                        entry.entry_id,
                        entry.queue,
                        failure.text,
                        self.journal.root / entry.queue,
                    )
                    continue
                self._trouble(failure, f"sending back to {entry.queue}")
                self._returns.extend(entries[index:])
                break
        return sent

    def recover(self) -> int:
        """Send back what a killed predecessor held in custody; entries SQS refuses stay."""
        return self._send_all(list(self.journal.entries()))

    def close(self) -> None:
        for delivery in self._held.values():
            if delivery.pending is not None:
                log.warning(
                    "%s: message %s closed before its %s reached SQS",
                    self.name,
                    delivery.message_id,
                    delivery.pending,
                )
        self._client = None
