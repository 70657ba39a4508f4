"""The queue contract every backend meets.

A backend hands out ``Delivery`` objects; the supervisor is the only caller of ``ack`` and
``requeue``, and calls them only after the experiment's results are safe (ack) or when the
message must go back for another agent (requeue).
"""

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.report import metrics


@dataclass(frozen=True)
class QueueFilter:
    """The ``queue_match`` / ``queue_mismatch`` regexes, as the Go runner applies them."""

    match: str
    mismatch: str = ""

    def allows(self, name: str) -> bool:
        if name.endswith("_response"):
            return False
        if not re.search(self.match, name):
            return False
        return not (self.mismatch and re.search(self.mismatch, name))

    def why_not(self, name: str) -> str:
        if name.endswith("_response"):
            return "response queue"
        if not re.search(self.match, name):
            return f"does not match queue_match {self.match!r}"
        return f"matches queue_mismatch {self.mismatch!r}"


def count_from(value: object) -> int:
    """A hand-out count carried by a message (a header, an attribute): untrusted, so anything
    but a small non-negative integer is 0."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0


class Delivery(ABC):
    """One message taken from a queue and not yet settled."""

    backend: str
    queue: str
    message_id: str
    body: bytes
    delivery_count: int  # 1 the first time this message is handed out
    # Where the whole message lies when ``body`` may be cut short (a local queue file larger
    # than the agent reads): a message set aside is copied from here, whole.
    raw_path: Path | None = None

    @abstractmethod
    def ack(self) -> None:
        """The message is done with: remove it for good."""

    @abstractmethod
    def requeue(self) -> None:
        """Give the message back, intact, for this or another agent."""

    def extend_lease(self, seconds: float) -> None:  # noqa: B027 - optional hook
        """Keep the message ours for ``seconds`` more; a no-op where leases do not expire."""


@dataclass(frozen=True)
class Hold:
    """What the operator's pause holds of one backend: these queues, or all of them."""

    queues: frozenset[str] = frozenset()
    everything: bool = False

    def holds(self, queue: str) -> bool:
        return self.everything or queue in self.queues


NO_HOLD = Hold()


class QueueBackend(ABC):
    kind: str
    name: str = ""  # the credential (or config entry) it serves, for logs and status
    problem: str | None = None  # what stops it now (unreachable, refused), for status
    _paused: dict[str, float]
    _operator_holds: "Hold"
    _not_served: dict[str, str]

    def not_serving(self, queue: str, reason: str) -> bool:
        """Record why a visible queue is not served; True the first time (log it then)."""
        if not hasattr(self, "_not_served"):
            self._not_served = {}
        first = self._not_served.get(queue) != reason
        self._not_served[queue] = reason
        return first

    def announce(
        self,
        logger: logging.Logger,
        served: list[str],
        previous: list[str],
        skipped: Mapping[str, str],
        noun: str = "queues",
    ) -> None:
        """After a discovery: log why each visible queue is not served (once per reason, and
        kept for ``studio-agent status``) and the served list whenever it changes."""
        who = self.name or self.kind
        metrics.record_refresh(who, ok=True)
        metrics.record_queues(self.kind, served, skipped)
        # Only what is visible and skipped now: status must not list a queue gone or now served.
        kept = getattr(self, "_not_served", {})
        self._not_served = {q: r for q, r in kept.items() if q in skipped}
        for queue, reason in sorted(skipped.items()):
            if self.not_serving(queue, reason):
                logger.info("%s: not serving %s: %s", who, queue, reason)
        if served != previous:
            logger.info("%s: serving %s %s", who, noun, ", ".join(served) or "(none)")

    def describe(self) -> dict[str, object]:
        """What ``studio-agent status`` shows for this backend."""
        now = time.monotonic()
        paused = {q: round(t - now) for q, t in getattr(self, "_paused", {}).items() if t > now}
        return {
            "kind": self.kind,
            "name": self.name or self.kind,
            "served": self.served_queues(),
            "not_served": dict(getattr(self, "_not_served", {})),
            "paused": paused,
            "held": [q for q in self.served_queues() if self.held(q)],
            "problem": self.problem,
        }

    def pause(self, queue: str, seconds: float) -> None:
        """Take nothing from ``queue`` for ``seconds`` (after a failure, or no capacity)."""
        if not hasattr(self, "_paused"):
            self._paused = {}
        self._paused[queue] = time.monotonic() + seconds

    def paused(self, queue: str) -> bool:
        if self.held(queue):
            return True
        until = getattr(self, "_paused", {}).get(queue)
        return until is not None and time.monotonic() < until

    def held(self, queue: str) -> bool:
        """Whether the operator's pause holds ``queue`` (any queue, served yet or not)."""
        return getattr(self, "_operator_holds", NO_HOLD).holds(queue)

    def hold(self, hold: "Hold") -> None:
        """The operator's pause, which no timed pause or admission's reopening lifts; a queue
        it no longer holds is looked at again at once."""
        before = getattr(self, "_operator_holds", NO_HOLD)
        if hold == before:
            return
        self._operator_holds = hold
        for queue in self.served_queues():
            if before.holds(queue) and not self.paused(queue):
                self.pause(queue, 0.0)  # a pause that ends now

    def pause_ended_since(self, moment: float) -> bool:
        """Whether a queue's pause ran out after ``moment`` (monotonic): look at it again."""
        now = time.monotonic()
        return any(moment < until <= now for until in getattr(self, "_paused", {}).values())

    # Whether the supervisor must call ``receive`` every poll_interval to find work. A backend
    # that is told of work (a consumer's socket in ``fileno``, a watcher calling ``wake``) is not.
    polls: bool = True
    # How long the supervisor may go between two ticks while nothing runs: what this backend's
    # housekeeping needs (heartbeats, refreshes, retries, leases given back).
    quiet_tick: float = 1.0
    # Set by the supervisor: cuts its sleep short, from any thread, when work has arrived.
    wake: Callable[[], None] = staticmethod(lambda: None)

    def capacity(self, free: int) -> None:  # noqa: B027 - optional hook
        """How many messages the agent could start now (from the supervisor's loop, each pass).
        A backend that is pushed work limits what it is sent to this."""

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when work (or housekeeping) arrives, or None."""
        return None

    @abstractmethod
    def receive(self) -> Delivery | None:
        """Take one message from one of the served queues, or None at once if there is none."""

    @abstractmethod
    def served_queues(self) -> list[str]:
        """The queue names this backend pulls from now."""

    def tick(self) -> None:  # noqa: B027 - optional hook
        """Housekeeping from the supervisor's loop: heartbeats, discovery, lease renewals."""

    def recover(self) -> int:
        """Put back messages a previous run of the agent took and never settled; return how many."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
