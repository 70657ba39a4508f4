"""AWS SQS queues, as the StudioML client creates them (protocol §B).

Delivery semantics:
- Queues are found with ``ListQueues`` (paginated), named by the last segment of their URL,
  filtered by the regexes, and refreshed every ``refresh`` seconds.
- Long polls (``wait_time``, 1..20 s, 20 by default) from receiver threads, as many as the agent
  has free slots and none while it has none (agent.queues.sqs_receiver): an idle queue costs about
  3 requests a minute (AWS bills per request), a message starts as soon as SQS hands it out, and
  the supervisor's loop never waits on SQS for one. ``receive`` takes what they received. A message
  a poll brought in after its slot went elsewhere goes back at once (``ChangeMessageVisibility``
  0), and this agent does not count that hand-out if it gets the message again.
- Lease: a message received is invisible for ``visibility`` seconds, renewed from the tick when
  half of that has passed. A failed renewal or settlement is retried every second and logged
  once. A killed agent just stops renewing: its messages reappear within ``visibility`` seconds.
- SQS caps invisibility at 12 h. Past ``max_invisible`` (11h30m) the agent takes custody as
  ``rabbitmq.py`` does: it writes the message to its journal (fsync), then deletes it from SQS.
  Then ack drops the entry, and return sends the body back (with a ``studio-agent-attempts``
  attribute) and drops the entry; ``recover`` sends back what a killed agent held. So an
  experiment of any length runs once.
- Before custody, ack is ``DeleteMessage``; return is ``ChangeMessageVisibility(0)``, and needs no
  retry when that fails: the message reappears by itself when its lease lapses.
- Nothing is lost while SQS is unreachable: deletes and send-backs are retried from the tick, and
  journal entries stay until SQS takes them. Duplicates remain possible (at least once): a crash
  between the journal write and the delete, or between a send-back and the entry's removal, and
  SQS unreachable through a message's last 30 minutes of 12 h. Each case is logged.
- Delivery count = ``ApproximateReceiveCount`` plus the attempts recorded on a copy sent back.
- SQS trouble never raises out of ``receive``, ``tick``, ``ack`` or ``requeue``: refused
  credentials and network errors are logged once per outage (never the secret) and back off,
  capped exponential with full jitter.
"""

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError
from agent.queues.base import Delivery, QueueBackend, QueueFilter
from agent.queues.journal import Entry, Journal
from agent.queues.outage import BACKOFF_MAX, Outage
from agent.queues.sqs_calls import RETRY as _RETRY
from agent.queues.sqs_calls import Failed as _Failure
from agent.queues.sqs_calls import call, new_client
from agent.queues.sqs_delivery import ATTEMPTS_ATTRIBUTE, SqsDelivery
from agent.queues.sqs_receiver import Received, Receiver
from agent.report import metrics

log = logging.getLogger(__name__)

SQS_CAP = 12 * 3600  # the most a message can stay invisible after a receive
RETRY_GAP = 1.0  # seconds between tries of a failed renewal or settlement of one message
T = TypeVar("T")
POLL_CONNECTIONS = 256  # max_concurrent's ceiling: one connection per long poll in flight
UNSTARTED_MEMORY = 10_000  # message ids whose unstarted return this agent remembers


class SqsQueue(QueueBackend):
    kind = "sqs"
    polls = False  # its receiver threads wake the supervisor

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
        wait_time: int = 20,
    ):
        if not 1 <= wait_time <= 20:
            raise ConfigError(f"sqs {name}: wait_time {wait_time} is outside SQS's 1..20 s")
        if visibility < 2 or max_invisible + visibility >= SQS_CAP:
            raise ConfigError(f"sqs {name}: visibility + max_invisible must stay below 12 h")
        self.name, self.region, self.endpoint_url = name, region, endpoint_url
        self._keys = (access_key, secret_key, session_token)
        self.filter, self.refresh, self.wait_time = queue_filter, refresh, wait_time
        self.visibility, self.max_invisible = visibility, max_invisible
        self.journal = Journal(state_dir / "inflight" / "sqs" / name)
        self._client: Any = None  # a botocore SQS client (no SQS stubs among the dev tools)
        self._queues: dict[str, str] = {}  # served name -> URL
        self._denied: set[str] = set()
        self._next, self._next_refresh = 0, 0.0
        self._outage = Outage(log, name)
        self._held: dict[str, SqsDelivery] = {}  # by receipt handle, until settled in SQS
        self._returns: list[Entry] = []  # journal entries SQS could not take back yet
        self._unstarted: dict[str, int] = {}  # message id -> hand-outs given back unstarted
        self._told = False  # whether the supervisor has said how many slots are free
        self._pollers: Any = None  # the receiver threads' client, made by the first of them
        self._pollers_lock = threading.Lock()
        self._receiver = Receiver(
            self._poll,
            self._pollers_client,
            lambda: self._queues,
            lambda queue: not self.paused(queue) and queue not in self._denied,
            lambda: self.wake(),
            wait_time,
            self._release_late,
        )

    # -- calls and failures ----------------------------------------------------------------------

    def _new_client(self, connections: int = 10) -> Any:
        return new_client(
            self.region, self.endpoint_url, self._keys, self.wait_time + 10, connections
        )

    def _pollers_client(self) -> Any:
        """One client for every receiver thread (botocore clients are thread-safe), with a
        connection for each poll that may be in flight."""
        with self._pollers_lock:
            if self._pollers is None:
                self._pollers = self._new_client(connections=POLL_CONNECTIONS)
            return self._pollers

    def _sqs(self) -> Any:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _request(self, client: Any, request: Callable[[Any], T]) -> T:
        return call(client, request, self._keys[1])

    def _call(self, request: Callable[[Any], T]) -> T:
        """``request`` on the loop's client; a success ends an outage."""
        result = self._request(self._sqs(), request)
        self._outage.ok("SQS answers again")
        return result

    def _trouble(self, failure: _Failure, what: str) -> None:
        """Back off from this credential's SQS, logging once per kind of trouble."""
        level, why = logging.ERROR, "SQS refused the request"
        if failure.kind == "transient":
            level, why = logging.WARNING, f"SQS at {self.endpoint_url or self.region} failed"
        elif failure.kind in ("credentials", "denied"):
            why = f"SQS refused the credential (access key {self._keys[0]})"
        self._outage.failed(f"{what}: {why}: {failure.text}", failure.kind, level)

    # -- discovery -------------------------------------------------------------------------------

    def _list_urls(self, client: Any) -> list[str]:
        pages = client.get_paginator("list_queues").paginate(PaginationConfig={"PageSize": 1000})
        return [url for page in pages for url in page.get("QueueUrls", [])]

    def _refresh_queues(self) -> None:
        try:
            urls = self._call(self._list_urls)
        except _Failure as failure:
            self._trouble(failure, "listing queues")
            metrics.record_refresh(self.name or self.kind, ok=False)
            self._next_refresh = time.monotonic() + min(self.refresh, 5.0)
            return
        self._next_refresh = time.monotonic() + self.refresh
        names = {url.rstrip("/").rsplit("/", 1)[-1]: url for url in urls}
        served = {n: u for n, u in sorted(names.items()) if self.filter.allows(n)}
        skipped = {n: self.filter.why_not(n) for n in names if n not in served}
        self.announce(log, list(served), list(self._queues), skipped)
        self._queues = served

    def served_queues(self) -> list[str]:
        return list(self._queues)

    # -- taking ----------------------------------------------------------------------------------

    def capacity(self, free: int) -> None:
        self._told = True
        for received in self._receiver.excess(free):
            self._give_back_unstarted(received)
        self._receiver.capacity(free)

    def receive(self) -> Delivery | None:
        if not self._told:
            self.capacity(1)  # until the supervisor says otherwise: one free slot
        self._housekeep()
        received, passed_over = self._receiver.take(unwanted=self.paused)
        for paused in passed_over:
            self._give_back_unstarted(paused)  # polled before the pause began
        if received is None:
            return None
        delivery = SqsDelivery(self, received.queue, received.url, received.message, received.at)
        excused = self._unstarted.pop(delivery.message_id, 0)
        delivery.delivery_count = max(1, delivery.delivery_count - excused)
        self._denied.discard(delivery.queue)
        self._held[delivery.receipt] = delivery
        return delivery

    def _housekeep(self) -> None:
        """The receivers' failures logged, and the queue list refreshed when it is due."""
        while self._receiver.failures:
            self._receive_failed(*self._receiver.failures.popleft())
        if time.monotonic() >= max(self._next_refresh, self._outage.retry_at):
            self._refresh_queues()

    def _poll(self, client: Any, url: str, wait: int) -> list[dict[str, Any]]:
        """One long poll, on a receiver thread with its own client."""
        reply = self._request(
            client,
            lambda c: c.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=wait,
                VisibilityTimeout=int(self.visibility),
                AttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
                MessageAttributeNames=["All"],
            ),
        )
        messages = reply.get("Messages") or []
        return [m for m in messages if isinstance(m, dict)]

    def _release_late(self, client: Any, received: Received) -> None:
        """On a receiver thread, after close: visible again at once, or when its lease lapses."""
        with contextlib.suppress(_Failure):
            self._make_visible(client, received)

    def _give_back_unstarted(self, received: Received) -> None:
        """A message received with no slot left for it: visible again at once, and its
        hand-out not counted if it comes back to this agent."""
        message_id = str(received.message.get("MessageId", ""))
        if len(self._unstarted) >= UNSTARTED_MEMORY:
            self._unstarted.clear()
        self._unstarted[message_id] = self._unstarted.get(message_id, 0) + 1
        try:
            self._make_visible(self._sqs(), received)
        except _Failure as failure:
            why = f"back when its lease lapses ({failure.text})"
            log.warning("%s: unstarted message %s comes %s", self.name, message_id, why)

    def _make_visible(self, client: Any, received: Received) -> None:
        receipt = received.message.get("ReceiptHandle")
        self._request(
            client,
            lambda c: c.change_message_visibility(
                QueueUrl=received.url, ReceiptHandle=receipt, VisibilityTimeout=0
            ),
        )

    def _receive_failed(self, queue: str, failure: _Failure) -> None:
        if failure.kind == "queue_gone":
            log.info("%s: queue %s is gone; refreshing the queue list", self.name, queue)
            self._queues = {n: u for n, u in self._queues.items() if n != queue}
            self._next_refresh = 0.0
        elif failure.kind == "denied":
            # Listing worked: this credential lacks rights on this queue only.
            if queue not in self._denied:
                log.error("%s: not allowed to receive from %s: %s", self.name, queue, failure.text)
                self._denied.add(queue)
            self.pause(queue, BACKOFF_MAX)  # listing worked: only this queue waits
        else:
            self._trouble(failure, f"receiving from {queue}")

    # -- leases and settling -----------------------------------------------------------------

    def tick(self) -> None:
        """Renew leases, take custody, finish settlements and returns, refresh the queue list."""
        now = time.monotonic()
        for delivery in list(self._held.values()):
            if now >= delivery.next_try and not self._advance_safely(delivery):
                break  # SQS is unreachable: one timeout per tick is enough
        if self._returns and now >= self._outage.retry_at:
            pending, self._returns = self._returns, []
            self._send_all(pending)
        self._housekeep()

    def settle(self, delivery: SqsDelivery, how: str) -> None:
        """The supervisor's ack ("ack") or requeue ("return"); SQS trouble never raises."""
        if how == "return" and delivery.entry is None:
            self._held.pop(delivery.receipt, None)
            try:
                self._call(lambda c: self._set_visibility(c, delivery, 0))
            except _Failure as failure:
                why = f"back when its lease lapses ({failure.text})"
                log.warning("%s: message %s comes %s", self.name, delivery.message_id, why)
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
        if d.in_sqs and d.entry is None and d.pending is None:
            if now - d.received_at >= self.max_invisible:
                d.entry = self.journal.keep(d.queue, d.body, d.custody_meta())  # before delete
                held = f"held {now - d.received_at:.0f}s, near SQS's 12 h cap"
                log.info("%s: message %s %s: in custody", self.name, d.message_id, held)
            elif now - d.extended_at >= self.visibility / 2:
                self._call(lambda c: self._set_visibility(c, d, int(self.visibility)))
                d.extended_at = now
        if d.in_sqs and (d.entry is not None or d.pending == "ack"):
            self._call(lambda c: c.delete_message(QueueUrl=d.url, ReceiptHandle=d.receipt))
            d.in_sqs = False
        if not d.in_sqs and d.pending is not None:
            if d.pending == "return" and d.entry is not None:
                self._send_back(d.entry)
            self._held.pop(d.receipt, None)
        if d.complained:
            log.info("%s: message %s: SQS answers again", self.name, d.message_id)
            d.complained = False

    def extend(self, delivery: SqsDelivery, seconds: float) -> None:
        if not delivery.in_sqs or delivery.entry is not None:
            return  # in our custody: no lease left to extend
        limit = max(2, min(int(seconds), SQS_CAP - 60))
        try:
            self._call(lambda c: self._set_visibility(c, delivery, limit))
        except _Failure as failure:
            log.warning("%s: extending %s failed: %s", self.name, delivery.message_id, failure)
            return
        delivery.extended_at = time.monotonic() + max(0.0, limit - self.visibility)

    def _set_visibility(self, client: Any, delivery: SqsDelivery, seconds: int) -> Any:
        return client.change_message_visibility(
            QueueUrl=delivery.url, ReceiptHandle=delivery.receipt, VisibilityTimeout=seconds
        )

    def _step_failed(self, d: SqsDelivery, failure: _Failure) -> bool:
        d.next_try = time.monotonic() + RETRY_GAP
        if failure.kind in _RETRY:
            self._complain(d, failure.text)
            self._trouble(failure, f"message {d.message_id}")
            return False
        if not d.in_sqs:  # SQS refuses the copy sent back: the entry stays for the next start
            self._kept(d.message_id, d.queue, failure)
            self._held.pop(d.receipt, None)
            return True
        d.next_try = 0.0
        if failure.kind == "cap" and d.entry is None and d.pending is None:
            d.received_at = time.monotonic() - self.max_invisible  # custody while still ours
            return True
        # Deleted with its queue, or its lease lapsed and SQS may have handed it out again.
        why = f"no longer ours in SQS ({failure.text}); it may run twice"
        log.warning("%s: message %s from %s is %s", self.name, d.message_id, d.queue, why)
        d.in_sqs = False
        return True

    def _complain(self, d: SqsDelivery, why: str) -> None:
        if not d.complained:
            state = "in custody" if d.entry is not None else "leased"
            log.warning("%s: message %s (%s): %s; retrying", self.name, d.message_id, state, why)
            d.complained = True

    # -- custody returns -----------------------------------------------------------------------

    def _send_back(self, entry: Entry) -> None:
        """Send a journaled message back to its queue, then forget it; raises ``_Failure``."""
        meta = entry.meta
        attributes = dict(meta.get("attributes") or {})
        attempts = str(int(meta.get("delivery_count", 1)))
        attributes[ATTEMPTS_ATTRIBUTE] = {"DataType": "Number", "StringValue": attempts}
        params: dict[str, Any] = {
            "QueueUrl": meta["url"],
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
                if failure.kind not in _RETRY:
                    self._kept(entry.entry_id, entry.queue, failure)
                    continue
                self._trouble(failure, f"sending back to {entry.queue}")
                self._returns.extend(entries[index:])
                break
        return sent

    def _kept(self, message: str, queue: str, failure: _Failure) -> None:
        where = f"{failure.text}; kept in {self.journal.folder(queue)}"
        log.error("%s: %s refuses message %s back: %s", self.name, queue, message, where)

    def recover(self) -> int:
        """Send back what a killed predecessor held in custody; entries SQS refuses stay."""
        return self._send_all(list(self.journal.entries()))

    def close(self) -> None:
        for received in self._receiver.stop():
            self._give_back_unstarted(received)
        for d in self._held.values():
            if d.pending is not None:  # settled by the supervisor, not yet done in SQS
                log.warning("%s: closing before the %s of %s", self.name, d.pending, d.message_id)
        self._client = None
