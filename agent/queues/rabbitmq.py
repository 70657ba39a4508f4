"""RabbitMQ queues, as the StudioML client creates them.

Delivery semantics:
- Queues are found through the management API (``/api/bindings/<vhost>``): bindings from the
  ``StudioML.topic`` exchange with a ``StudioML.<queue>`` routing key, filtered by the regexes,
  ``*_response`` queues ignored; refreshed every ``refresh`` seconds and after any channel error.
  Where the broker runs the event exchange plugin (``rabbitmq_event_exchange``), a new binding
  or a deleted queue makes the agent look again within a second instead of at the next refresh.
- One long-lived connection per broker with heartbeats, serviced from the supervisor's tick, so
  every call (consume, ack, publish) happens on the thread that owns the connection; its socket
  is in the supervisor's select (``fileno``), so a delivery wakes the agent at once.
- Push, not poll: while the queues are idle, a consumer (``basic.consume``) on every served queue
  while the agent has a free slot, under one channel-wide prefetch equal to the free slots
  (``capacity``), so the broker never hands this agent more than it can start. Taking a
  delivery lowers the prefetch before the ack that would free its credit; a delivery still
  unstarted when the slots are gone goes back at once (``basic.nack``). An idle agent costs the
  broker its heartbeats only. While they are busy (once a delivery took the last free slot),
  cancelling and registering 50 consumers for every experiment would cost the broker more than
  it saves: a freed slot takes its next message with ``basic.get`` (round-robin), and only a
  round that finds every queue empty turns the consumers back on.
- Custody: a message taken is written to the agent's journal (fsync) and then acknowledged to
  the broker. RabbitMQ closes a channel whose delivery stays unacknowledged past
  ``consumer_timeout`` (30 min by default) and hands the message to someone else while the first
  run goes on; a broker restart or a dropped connection does the same. Holding the message in the
  journal instead makes an experiment of any length run exactly once, with nothing for operators
  to configure. Returning a message publishes it back to its queue (with an attempt counter in
  a header); an agent that was killed publishes back what it held when it starts again.
- The queue is never declared by the agent (the client owns its flags); the exchange is declared
  with exactly the client's flags only when the agent must publish through it.
"""

import functools
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from agent.queues.base import Delivery, QueueBackend, QueueFilter, count_from
from agent.queues.journal import Entry, Journal
from agent.queues.outage import Outage
from agent.queues.rabbitmq_discovery import (
    fetch_bindings,
    listen_for_events,
    management_url,
    redact_url,
    studioml_queues,
)
from agent.report import metrics

log = logging.getLogger(__name__)

EVENT_REFRESH_GAP = 1.0  # seconds: a burst of events costs one listing
ATTEMPTS_HEADER = "x-studio-agent-attempts"
_CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError)


class RabbitDelivery(Delivery):
    backend = "rabbitmq"

    def __init__(self, owner: "RabbitQueue", entry: Entry, count: int):
        self._owner = owner
        self.entry = entry
        self.queue = entry.queue
        self.message_id = entry.entry_id
        self.body = entry.body
        self.delivery_count = count

    def ack(self) -> None:
        self._owner.journal.drop(self.entry)

    def requeue(self) -> None:
        self._owner.publish_back(self.entry)


class RabbitQueue(QueueBackend):
    kind = "rabbitmq"
    polls = False  # pushed: its socket wakes the supervisor

    def __init__(
        self,
        name: str,
        amqp_url: str,
        queue_filter: QueueFilter,
        state_dir: Path,
        mgmt_url: str | None = None,
        ca_file: Path | None = None,
        refresh: float = 30.0,
    ):
        self.name = name
        self.amqp_url = amqp_url
        self.mgmt_url = mgmt_url or management_url(amqp_url)
        self.filter = queue_filter
        self.ca_file = ca_file
        self.refresh = refresh
        self.journal = Journal(state_dir / "inflight" / "rabbitmq" / name)
        self.vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:] or "%2f")
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._queues: list[str] = []
        self._next_refresh = 0.0
        self._outage = Outage(log, name)
        self._returns: list[Entry] = []  # messages to publish back once the broker takes them
        self._mgmt_down = False
        self._free = 1  # slots the supervisor could fill now (``capacity``)
        # Busy queues (at start, and after the last free slot was filled): a freed slot asks
        # with basic.get until a round finds them all empty; then consumers push (docstring).
        self._draining = True
        self._next = 0
        self._prefetch = 0  # the channel's prefetch as last set; 0: none set yet
        self._consumers: dict[str, str] = {}  # queue -> consumer tag on the open channel
        self._arrived: deque[tuple[str, Any, Any, bytes]] = deque()  # delivered, not yet taken
        self._events_said = False  # whether "no event exchange" was logged
        self._last_refresh = 0.0

    # -- connection ----------------------------------------------------------------------------

    def _parameters(self) -> pika.URLParameters:
        params = pika.URLParameters(self.amqp_url)
        params.heartbeat = 30
        params.blocked_connection_timeout = 60
        params.connection_attempts = 1
        params.socket_timeout = 10
        if self.amqp_url.startswith("amqps://"):
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            host = urllib.parse.urlsplit(self.amqp_url).hostname
            params.ssl_options = pika.SSLOptions(context, server_hostname=host)
        return params

    def _ensure_channel(self) -> Any:
        """The open channel, connecting first if needed; None while backing off after a failure."""
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._outage.waiting():
            return None
        try:
            if self._connection is None or not self._connection.is_open:
                self._connection = pika.BlockingConnection(self._parameters())
                log.info("%s: connected to %s", self.name, redact_url(self.amqp_url))
                self._outage.ok()
                self.problem = None
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            self._channel.add_on_cancel_callback(self._cancelled_by_broker)
            self._channel_reset()
            self._listen_for_events(self._connection)
        except _CONNECTION_ERRORS as exc:
            self._lost(f"cannot connect to {redact_url(self.amqp_url)}: {exc!r}")
            return None
        return self._channel

    def connect(self) -> bool:
        """Connect now unless backing off (the start-up check); False while unreachable."""
        return self._ensure_channel() is not None

    def _lost(self, why: str) -> None:
        """Forget the connection and back off; said once per outage."""
        self.problem = why
        self._outage.failed(why)
        self._channel = None
        self._channel_reset()
        if self._connection is not None:
            try:
                if self._connection.is_open:
                    self._connection.close()
            except _CONNECTION_ERRORS:
                pass
        self._connection = None
        self._next_refresh = 0.0

    def _channel_reset(self) -> None:
        """A new (or no) channel: deliveries and consumers of the old one are void (the broker
        requeues what it had delivered there)."""
        self._consumers.clear()
        self._arrived.clear()
        self._prefetch = 0

    def fileno(self) -> int | None:
        """The connection's socket, for the supervisor's select; None when not connected."""
        impl = getattr(self._connection, "_impl", None)
        sock = getattr(getattr(impl, "_transport", None), "_sock", None)
        try:
            return int(sock.fileno()) if sock is not None else None
        except (OSError, ValueError):
            return None

    def _pump(self) -> None:
        """Heartbeats, deliveries and cancellations that have arrived, without waiting."""
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.process_data_events(time_limit=0)
            except _CONNECTION_ERRORS as exc:
                self._lost(f"connection lost: {exc!r}")

    def tick(self) -> None:
        """Service heartbeats and refresh the queue list; called from the supervisor's loop."""
        self._pump()
        if time.monotonic() >= self._next_refresh:
            self._refresh_queues()
        if self._returns and self._ensure_channel() is not None:
            pending, self._returns = self._returns, []
            for entry in pending:
                self.publish_back(entry)
        self._subscribe()

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.close()
            except _CONNECTION_ERRORS:
                pass
        self._connection = self._channel = None

    # -- discovery -----------------------------------------------------------------------------

    def _listen_for_events(self, connection: pika.BlockingConnection) -> None:
        why = listen_for_events(connection, self._on_event)
        if why and not self._events_said:
            log.info(
                "%s: no event exchange on the broker (%s): new queues are found at the next "
                "refresh (every %.0fs)",
                self.name,
                why,
                self.refresh,
            )
            self._events_said = True

    def _on_event(self, _channel: Any, _method: Any, _properties: Any, _body: bytes) -> None:
        self._next_refresh = min(self._next_refresh, self._last_refresh + EVENT_REFRESH_GAP)

    def _refresh_queues(self) -> None:
        self._last_refresh = time.monotonic()
        self._next_refresh = time.monotonic() + self.refresh
        try:
            bindings = fetch_bindings(self.mgmt_url, self.vhost, self.ca_file)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            # Once per outage: the refresh is retried every few seconds until it answers.
            level = logging.DEBUG if self._mgmt_down else logging.WARNING
            log.log(level, "%s: management API %s: %r", self.name, redact_url(self.mgmt_url), exc)
            metrics.record_refresh(self.name, ok=False)
            self._mgmt_down = True
            self._next_refresh = time.monotonic() + min(self.refresh, 5.0)
            return
        self._mgmt_down = False
        names = studioml_queues(bindings)
        served = [n for n in names if self.filter.allows(n)]
        skipped = {n: self.filter.why_not(n) for n in names if n not in served}
        self.announce(log, served, self._queues, skipped)
        self._queues = served
        self._subscribe()

    def served_queues(self) -> list[str]:
        return list(self._queues)

    # -- taking and returning ------------------------------------------------------------------

    def capacity(self, free: int) -> None:
        """How many messages the agent could start now: what the broker may deliver to it."""
        self._free = max(0, free)
        self._subscribe()

    def _subscribe(self) -> None:
        """Prefetch, consumers and unstarted deliveries brought in line with the free slots."""
        channel = self._channel if self._channel is not None and self._channel.is_open else None
        if channel is None:
            return
        try:
            while len(self._arrived) > self._free:  # lost the race for a slot: back at once
                _queue, method, _properties, _body = self._arrived.pop()
                channel.basic_nack(method.delivery_tag, requeue=True)
            for arrived in [a for a in self._arrived if self.paused(a[0])]:  # paused since
                self._arrived.remove(arrived)
                channel.basic_nack(arrived[1].delivery_tag, requeue=True)
            wanted = self._queues if self._free > 0 and not self._draining else []
            for queue in [q for q in self._consumers if q not in wanted or self.paused(q)]:
                channel.basic_cancel(self._consumers.pop(queue))
            if wanted and self._prefetch != self._free:
                # Channel-wide (RabbitMQ's "global"): one limit over every queue's consumer.
                channel.basic_qos(prefetch_count=self._free, global_qos=True)
                self._prefetch = self._free
            for queue in [q for q in wanted if q not in self._consumers and not self.paused(q)]:
                on_message = functools.partial(self._arrive, queue)
                self._consumers[queue] = channel.basic_consume(queue, on_message, auto_ack=False)
        except pika.exceptions.ChannelClosedByBroker as exc:
            log.info("%s: a queue is gone (%s); refreshing the queue list", self.name, exc)
            self._channel = None
            self._channel_reset()
            self._next_refresh = 0.0
        except _CONNECTION_ERRORS as exc:
            self._lost(f"subscribing failed: {exc!r}")

    def _arrive(self, queue: str, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._arrived.append((queue, method, properties, body))

    def _cancelled_by_broker(self, frame: Any) -> None:
        """A queue was deleted under its consumer: forget it, and look again."""
        tag = getattr(frame.method, "consumer_tag", None)
        self._consumers = {q: t for q, t in self._consumers.items() if t != tag}
        self._next_refresh = 0.0

    def receive(self) -> Delivery | None:
        channel = self._ensure_channel()
        if channel is None:
            return None
        self._pump()
        if not self._arrived:
            return self._get_one(channel) if self._draining else None
        queue, method, properties, body = self._arrived.popleft()
        # One slot fewer before the ack frees the delivery's credit, or the broker sends another.
        self._free = max(0, self._free - 1)
        # The last free slot: the next one asks first (the queues are likely busy now), instead
        # of registering and cancelling a consumer on every queue for every experiment.
        self._draining = self._free == 0
        self._subscribe()
        if self._channel is not channel or not channel.is_open:
            return None  # the channel went meanwhile; the broker requeues the delivery
        return self._take(channel, queue, method, properties, body)

    def _get_one(self, channel: Any) -> RabbitDelivery | None:
        """While the queues are busy: one ``basic.get`` round, from the queue after the last
        one served; a round that finds every queue empty turns the consumers back on."""
        names = [q for q in self._queues if not self.paused(q)]
        for offset in range(len(names)):
            queue = names[(self._next + offset) % len(names)]
            try:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
            except pika.exceptions.ChannelClosedByBroker as exc:
                log.info("%s: queue %s is gone (%s)", self.name, queue, exc.reply_text)
                self._channel = None
                self._channel_reset()
                self._next_refresh = 0.0
                return None
            except _CONNECTION_ERRORS as exc:
                self._lost(f"basic.get on {queue} failed: {exc!r}")
                return None
            if method is not None:
                self._next = (self._next + offset + 1) % len(names)
                self._free = max(0, self._free - 1)
                return self._take(channel, queue, method, properties, body)
        self._draining = False  # all empty: pushed from now on
        self._subscribe()
        return None

    def _take(
        self, channel: Any, queue: str, method: Any, properties: Any, body: bytes
    ) -> RabbitDelivery | None:
        headers = dict(properties.headers or {})
        # Only what a run started counts: a redelivery never ran, since it runs only in custody.
        attempts = count_from(headers.get(ATTEMPTS_HEADER, 0)) + 1
        meta = {
            "attempts": attempts,
            "content_type": properties.content_type,
            "app_id": properties.app_id,
            "delivery_mode": properties.delivery_mode,
            "headers": {
                k: v for k, v in headers.items() if isinstance(v, str | int | float | bool)
            },
        }
        # Custody first, then the broker's ack: from here on the journal holds the message.
        entry = self.journal.keep(queue, body, meta)
        try:
            channel.basic_ack(method.delivery_tag)
        except _CONNECTION_ERRORS as exc:
            # The broker keeps its copy and will hand it out again: ours must not run.
            self.journal.drop(entry)
            self._lost(f"ack of a message from {queue} failed: {exc!r}")
            return None
        return RabbitDelivery(self, entry, attempts)

    def publish_back(self, entry: Entry) -> bool:
        """Return a message to its queue; while the broker cannot take it, it stays journaled
        and is tried again from the tick."""
        channel = self._ensure_channel()
        if channel is None:
            log.warning(
                "%s: broker unreachable; message %s stays in the journal", self.name, entry.entry_id
            )
            self._returns.append(entry)
            return False
        meta = entry.meta
        headers = dict(meta.get("headers") or {})
        headers[ATTEMPTS_HEADER] = int(meta.get("attempts", 1))
        properties = pika.BasicProperties(
            content_type=meta.get("content_type") or "application/json",
            app_id=meta.get("app_id") or "studioml",
            delivery_mode=meta.get("delivery_mode"),
            headers=headers,
        )
        try:
            # The default exchange routes by queue name; mandatory + confirms tell us it arrived.
            channel.basic_publish("", entry.queue, entry.body, properties, mandatory=True)
        except pika.exceptions.UnroutableError:
            log.error(
                "%s: queue %s no longer exists; message %s kept in %s",
                self.name,
                entry.queue,
                entry.entry_id,
                self.journal.folder(entry.queue),
            )
            return False
        except _CONNECTION_ERRORS as exc:
            self._lost(f"publishing back to {entry.queue} failed: {exc!r}")
            self._returns.append(entry)
            return False
        self.journal.drop(entry)
        return True

    def recover(self) -> int:
        """Publish back what a killed predecessor held; entries the broker refuses stay."""
        return sum(1 for entry in list(self.journal.entries()) if self.publish_back(entry))
