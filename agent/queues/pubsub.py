"""Google Pub/Sub subscriptions, as the StudioML client creates them.

- Discovery lists the project's subscriptions. The client (protocol C) names the topic after the
  queue and the subscription ``<queue>_sub``, so the regexes see the topic's short name when the
  subscription is ``<topic>_sub``, else the subscription's. A queue name is the subscription's
  short name (unique, unlike topics). Push, export and detached subscriptions are skipped.
- Pulling: one ``pull(max_messages=1)`` at a time, started only from ``receive()`` (so only with a
  free slot: flow control by free capacity), on a helper thread so the supervisor's loop never
  waits on the network; subscriptions take turns. The deprecated ``return_immediately`` is not
  used: a pull waits on the server up to ``PULL_WAIT`` and is answered as soon as a message is
  there; its end wakes the supervisor (not polled), and a pull that came back empty sooner than
  ``PULL_GAP`` is not followed by another before it. A message that lands after the slot went
  elsewhere goes back at once (``capacity``), or after ``HOLD_GRACE`` if nobody takes it.
  StreamingPull is not used: see the README ("Pub/Sub: why unary pulls").
- Lease: the tick renews each held message's ack deadline to ``ack_deadline`` once half of the
  current one has passed. Pub/Sub sets no cap on renewals, so no custody journal is needed: ack
  is ``acknowledge`` (a failed one is retried from the tick), requeue ``modify_ack_deadline(0)``.
- Crash safety: a killed agent loses nothing: its messages come back when their deadlines lapse,
  and a restarted agent may run them again (so may anyone, if a lease lapses during an outage).
- Delivery count: ``delivery_attempt`` where the subscription has a dead-letter policy (counted
  by Pub/Sub for every agent); otherwise this agent's own count, kept in
  ``<state_dir>/inflight/pubsub/<name>/attempts.json`` so that it survives a restart.
- Errors never leave ``receive()`` or ``tick()``: an outage is logged once and retried with capped
  exponential backoff and full jitter. Credentials come only from the key file, never from the
  environment, and no key material is logged.
"""

import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.api_core import exceptions as api
from google.auth.exceptions import GoogleAuthError
from google.oauth2 import service_account
from google.pubsub_v1 import ReceivedMessage, SubscriberClient, Subscription
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from agent.errors import ConfigError
from agent.queues.base import Delivery, QueueBackend, QueueFilter
from agent.queues.journal import write_atomically as write_atomically
from agent.queues.outage import BACKOFF_MAX, Outage
from agent.report import metrics

log = logging.getLogger(__name__)

PULL_WAIT = 3.0  # how long a pull waits on the server for a message
PULL_GAP = 1.0  # the least time from one pull's start to the next after an empty answer
RPC_TIMEOUT = 10.0  # every other call
HOLD_GRACE = 2.0  # a pulled message nobody claims within this goes back
RETENTION = 7 * 86400.0  # Pub/Sub's default message retention: older counts are moot
SCOPES = ["https://www.googleapis.com/auth/pubsub"]
_ERRORS = (api.GoogleAPIError, GoogleAuthError, OSError)


def subscriber_client(key_file: Path | None, emulator_host: str | None) -> SubscriberClient:
    """A client on an explicit transport, so ``PUBSUB_EMULATOR_HOST`` in the environment can
    neither redirect a real credential to an emulator nor be needed to reach one."""
    if emulator_host:
        # The emulator speaks plaintext gRPC and checks no credentials: the same insecure channel
        # the library builds when PUBSUB_EMULATOR_HOST is set, never through an http proxy.
        channel = grpc.insecure_channel(emulator_host, options=[("grpc.enable_http_proxy", 0)])
        return SubscriberClient(
            transport=SubscriberGrpcTransport(host=emulator_host, channel=channel)
        )
    if key_file is None:
        raise ConfigError("pubsub: a service-account key file or an emulator host is required")
    try:
        credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            str(key_file), scopes=SCOPES
        )
    except (OSError, ValueError) as exc:  # the message names a field, never key material
        raise ConfigError(f"{key_file}: not a usable service-account key: {exc}") from None
    transport = SubscriberGrpcTransport(credentials=credentials, always_use_jwt_access=True)
    return SubscriberClient(transport=transport)


def why_not_served(sub: Subscription, queue_filter: QueueFilter) -> str:
    """'' for a subscription to serve. The regexes see the topic's short name when the
    subscription is ``<topic>_sub`` (the StudioML client's naming), else the subscription's."""
    if (
        sub.push_config.push_endpoint
        or sub.bigquery_config.table
        or sub.cloud_storage_config.bucket
    ):
        return "not a pull subscription"
    if sub.detached:
        return "detached from its topic"
    short, topic = sub.name.rsplit("/", 1)[-1], sub.topic.rsplit("/", 1)[-1]
    name = topic if short == f"{topic}_sub" else short
    return "" if queue_filter.allows(name) else queue_filter.why_not(name)


class AttemptCounts:
    """How often this agent handed each message out, kept on disk across restarts."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        horizon = time.time() - RETENTION
        self._counts: dict[str, list[float]] = {
            k: v for k, v in data.items() if isinstance(v, list) and len(v) == 2 and v[1] > horizon
        }

    def take(self, key: str) -> int:
        count = int(self._counts.get(key, [0, 0.0])[0]) + 1
        self._counts[key] = [count, time.time()]
        self._save()
        return count

    def forget(self, key: str) -> None:
        if self._counts.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self.path, json.dumps(self._counts).encode())


@dataclass(frozen=True)
class _Sub:
    name: str  # short name: the queue name
    path: str
    deadline: int  # the subscription's own ack deadline, which applies to a fresh pull
    counted: bool  # a dead-letter policy: Pub/Sub counts delivery attempts itself


@dataclass
class _Lease:
    sub: _Sub
    ack_id: str
    key: str  # for AttemptCounts
    expires: float  # monotonic
    due: float  # when to renew it (or retry its acknowledgement)
    acked: bool = False
    lapsed: bool = False


@dataclass
class _Pulled:
    sub: _Sub
    started: float
    message: ReceivedMessage
    arrived: float


class PubSubDelivery(Delivery):
    backend = "pubsub"

    def __init__(self, owner: "PubSubQueue", lease: _Lease, pulled: _Pulled, count: int):
        self._owner = owner
        self._lease = lease
        self.queue = lease.sub.name
        self.message_id = pulled.message.message.message_id
        self.body = pulled.message.message.data
        self.delivery_count = count

    def ack(self) -> None:
        self._owner.acknowledge(self._lease)

    def requeue(self) -> None:
        self._owner.release(self._lease)

    def extend_lease(self, seconds: float) -> None:
        self._owner.renew(self._lease, int(seconds))


class PubSubQueue(QueueBackend):
    kind = "pubsub"
    polls = False  # a pull's end wakes the supervisor

    def __init__(
        self,
        name: str,
        key_file: Path | None,
        project: str,
        queue_filter: QueueFilter,
        state_dir: Path,
        *,
        emulator_host: str | None = None,
        refresh: float = 30.0,
        ack_deadline: int = 60,
    ):
        if not 0 < ack_deadline <= 600:  # Pub/Sub's own bounds (10..600; the emulator takes 1)
            raise ConfigError(f"pubsub: ack_deadline {ack_deadline} is not within 1..600 s")
        self.name = name
        self.project = project
        self.filter = queue_filter
        self.refresh = refresh
        self.ack_deadline = ack_deadline
        self.attempts = AttemptCounts(state_dir / "inflight" / "pubsub" / name / "attempts.json")
        self._client = subscriber_client(key_file, emulator_host)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pubsub-{name}")
        self._pull: Future[list[ReceivedMessage]] | None = None
        self._pulling: tuple[_Sub, float] | None = None
        self._ready: deque[_Pulled] = deque()
        self._held: dict[str, _Lease] = {}
        self._subs: list[_Sub] = []
        self._next = 0
        self._next_refresh = 0.0
        self._outage = Outage(log, name)
        self._next_pull = 0.0  # monotonic: no pull before this (after an empty one)

    # -- failures ------------------------------------------------------------------------------

    def _failed(self, what: str, exc: BaseException) -> None:
        """Back off (capped exponential, full jitter); say so once per outage."""
        self._outage.failed(f"{what} failed: {_describe(exc)}")
        self._next_refresh = 0.0  # after an outage, look at the subscriptions again first

    def _ok(self) -> None:
        self._outage.ok("Pub/Sub answers again")

    def _gone(self, sub: _Sub) -> None:
        # Once: a listing that still shows it (eventual consistency) must not repeat the line.
        if self.not_serving(sub.name, "the subscription no longer exists"):
            log.warning("%s: subscription %s no longer exists; not serving it", self.name, sub.name)
        self._subs = [s for s in self._subs if s.path != sub.path]

    # -- discovery -----------------------------------------------------------------------------

    def _refresh(self) -> None:
        self._next_refresh = time.monotonic() + self.refresh
        try:
            found = list(
                self._client.list_subscriptions(
                    project=f"projects/{self.project}", timeout=RPC_TIMEOUT, retry=None
                )
            )
        except _ERRORS as exc:
            self._failed(f"listing the subscriptions of project {self.project}", exc)
            metrics.record_refresh(self.name or self.kind, ok=False)
            return
        self._ok()
        served, skipped = [], {}
        for sub in sorted(found, key=lambda s: s.name):
            short = sub.name.rsplit("/", 1)[-1]
            why = why_not_served(sub, self.filter)
            if not why:
                counted = bool(sub.dead_letter_policy.dead_letter_topic)
                served.append(_Sub(short, sub.name, sub.ack_deadline_seconds or 10, counted))
            else:
                skipped[short] = why
        previous = [s.name for s in self._subs]
        self.announce(log, [s.name for s in served], previous, skipped, "subscriptions")
        self._subs = served

    def served_queues(self) -> list[str]:
        return [s.name for s in self._subs]

    # -- taking --------------------------------------------------------------------------------

    def capacity(self, free: int) -> None:
        while len(self._ready) > max(0, free):  # pulled, then its slot went elsewhere
            pulled = self._ready.pop()
            self._modify(pulled.sub, pulled.message.ack_id, 0)

    def receive(self) -> Delivery | None:
        self._collect()
        while self._ready:
            pulled = self._ready.popleft()
            if not self.paused(pulled.sub.name):
                return self._hand_out(pulled)
            self._modify(pulled.sub, pulled.message.ack_id, 0)  # paused since the pull began
        self._start_pull()
        return None

    def _start_pull(self) -> None:
        now = time.monotonic()
        if self._pull is not None or self._outage.waiting() or now < self._next_pull:
            return
        for offset in range(len(self._subs)):
            sub = self._subs[(self._next + offset) % len(self._subs)]
            if not self.paused(sub.name):
                self._next = (self._next + offset + 1) % len(self._subs)
                self._pulling = (sub, now)
                self._pull = self._pool.submit(self._pull_one, sub.path)
                self._pull.add_done_callback(lambda _done: self.wake())
                return

    def _pull_one(self, path: str) -> list[ReceivedMessage]:
        """On the helper thread: one message, or none after ``PULL_WAIT``."""
        try:
            response = self._client.pull(
                subscription=path, max_messages=1, timeout=PULL_WAIT, retry=None
            )
        except api.DeadlineExceeded:
            return []  # the real service holds an empty pull until the deadline
        return list(response.received_messages)

    def _collect(self) -> None:
        """Take in the outstanding pull if it has finished."""
        if self._pull is None or not self._pull.done() or self._pulling is None:
            return
        (sub, started), future = self._pulling, self._pull
        self._pull = self._pulling = None
        try:
            received = future.result()
        except api.NotFound:
            self._gone(sub)
            return
        except api.PermissionDenied as exc:
            log.warning("%s: may not pull from %s: %s", self.name, sub.name, _describe(exc))
            self.pause(sub.name, BACKOFF_MAX)
            return
        except _ERRORS as exc:
            self._failed(f"pulling from {sub.name}", exc)
            return
        self._ok()
        now = time.monotonic()
        if not received:
            self._next_pull = started + PULL_GAP  # an emulator answers an empty pull at once
        self._ready.extend(_Pulled(sub, started, message, now) for message in received)

    def _hand_out(self, pulled: _Pulled) -> PubSubDelivery:
        sub, message = pulled.sub, pulled.message
        key = f"{sub.name}/{message.message.message_id}"
        count = message.delivery_attempt if sub.counted else 0
        count = count or self.attempts.take(key)
        # A fresh pull carries the subscription's deadline, counted from when the pull started.
        expires = pulled.started + sub.deadline
        lease = _Lease(sub, message.ack_id, key, expires, pulled.started + sub.deadline / 2)
        self._held[lease.ack_id] = lease
        return PubSubDelivery(self, lease, pulled, count)

    # -- leases and settling -------------------------------------------------------------------

    def tick(self) -> None:
        """Renew leases, retry acknowledgements, return unclaimed messages, refresh the list."""
        self._collect()
        now = time.monotonic()
        self._give_back_unclaimed(now - HOLD_GRACE)  # no free slot took them: not ours to keep
        for lease in list(self._held.values()):
            if now >= lease.due:
                if lease.acked:
                    self.acknowledge(lease)
                else:
                    self.renew(lease, self.ack_deadline)
        if now >= self._next_refresh and not self._outage.waiting():
            self._refresh()

    def renew(self, lease: _Lease, seconds: int) -> None:
        started = time.monotonic()
        if self._modify(lease.sub, lease.ack_id, seconds):
            lease.expires, lease.due = started + seconds, started + seconds / 2
            return
        lease.due = started + 1.0
        if started > lease.expires and lease.ack_id in self._held and not lease.lapsed:
            lease.lapsed = True
            why = f"the lease of a message from {lease.sub.name} has lapsed"
            log.warning("%s: %s: Pub/Sub may hand it out again", self.name, why)

    def acknowledge(self, lease: _Lease) -> None:
        """Done with the message; an acknowledgement that fails is retried from the tick."""
        lease.acked = True
        try:
            request = {"subscription": lease.sub.path, "ack_ids": [lease.ack_id]}
            self._client.acknowledge(request=request, timeout=RPC_TIMEOUT, retry=None)
        except (api.NotFound, api.InvalidArgument) as exc:
            why = f"a message from {lease.sub.name} could not be acknowledged ({_describe(exc)})"
            log.warning("%s: %s: it may be handed out again", self.name, why)
        except _ERRORS as exc:
            self._failed(f"acknowledging a message from {lease.sub.name}", exc)
            lease.due = time.monotonic() + 1.0
            return
        else:
            self._ok()
        self._held.pop(lease.ack_id, None)
        self.attempts.forget(lease.key)

    def release(self, lease: _Lease) -> None:
        """Give the message back at once; if that fails it comes back when its lease lapses."""
        self._held.pop(lease.ack_id, None)
        self._modify(lease.sub, lease.ack_id, 0)

    def _give_back_unclaimed(self, arrived_before: float) -> None:
        while self._ready and self._ready[0].arrived < arrived_before:
            pulled = self._ready.popleft()
            self._modify(pulled.sub, pulled.message.ack_id, 0)

    def _modify(self, sub: _Sub, ack_id: str, seconds: int) -> bool:
        try:
            request = {
                "subscription": sub.path,
                "ack_ids": [ack_id],
                "ack_deadline_seconds": seconds,
            }
            self._client.modify_ack_deadline(request=request, timeout=RPC_TIMEOUT, retry=None)
        except (api.NotFound, api.InvalidArgument) as exc:
            # The subscription is gone or the lease already lapsed: nothing left to keep alive.
            log.warning("%s: lease on %s: %s", self.name, sub.name, _describe(exc))
            self._held.pop(ack_id, None)
            return False
        except _ERRORS as exc:
            self._failed(f"setting an ack deadline on {sub.name}", exc)
            return False
        self._ok()
        return True

    def close(self) -> None:
        """Give back unclaimed messages and close the channel; held leases simply lapse."""
        self._collect()
        self._give_back_unclaimed(float("inf"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.transport.close()  # type: ignore[no-untyped-call]


def _describe(exc: BaseException) -> str:
    """A one-line reason: the error class and its message (which carry no key material)."""
    lines = str(getattr(exc, "message", None) or exc).splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
