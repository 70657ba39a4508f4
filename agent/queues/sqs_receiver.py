"""Long polls on a credential's SQS queues, from threads: never from the supervisor's loop.

As many polls are in flight as the agent has free slots (``capacity``), each on the next served
queue in turn that no other poll is waiting on, with ``MaxNumberOfMessages=1``: so the agent is
never handed more messages than it can start, except by a poll already in flight when its slot
went to another backend's message (``SqsQueue`` gives such a message back at once).

A poll waits up to ``wait`` seconds (SQS answers as soon as a message is there). With fewer
polls than queues they take turns, each wait shortened in proportion (to 1 s at least), so an
idle queue costs at most 60 / ``wait`` requests a minute (3 at the default 20 s), instead of one
a second. The price is the time before a queue is asked again: max(``wait``, queues / free
slots) seconds, 25 s for 50 queues and 2 free slots (bench/fleet.py measured a 23.5 s pickup
there, against 5 s for the old 1 s polls at 60 requests a minute per queue).

Failures are handed to the owner (``failures``), which logs and classifies them on the
supervisor's thread; the pollers only back off.
"""

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.queues.outage import backoff
from agent.queues.sqs_calls import Failed


@dataclass
class Received:
    queue: str
    url: str
    message: dict[str, Any]
    at: float  # monotonic time of the receive: its lease runs from here


class Receiver:
    """The polling threads of one SqsQueue, and what they have received but nobody took yet."""

    def __init__(
        self,
        poll: Callable[[Any, str, int], list[dict[str, Any]]],
        new_client: Callable[[], Any],
        queues: Callable[[], Mapping[str, str]],
        may_poll: Callable[[str], bool],
        wake: Callable[[], None],
        wait: int,
        release: Callable[[Any, Received], None],
    ) -> None:
        self._poll, self._new_client, self._queues = poll, new_client, queues
        self._may_poll, self._wake, self.wait = may_poll, wake, wait
        self._release = release  # gives back, on a poller's client, what came in after stop
        self.arrived: deque[Received] = deque()
        self.failures: deque[tuple[str, Failed]] = deque()
        self._cond = threading.Condition()
        self._target = 0  # polls that may be in flight (the agent's free slots)
        self._polling: set[str] = set()  # queues a poll waits on now
        self._threads: list[threading.Thread] = []
        self._cursor = 0
        self._retry_at, self._failures = 0.0, 0
        self._stopped = False

    @property
    def target(self) -> int:
        return self._target

    def capacity(self, free: int) -> None:
        with self._cond:
            self._target = max(0, free)
            self._cond.notify_all()
            while len(self._threads) < self._target:
                thread = threading.Thread(target=self._run, name="sqs-receive", daemon=True)
                self._threads.append(thread)
                thread.start()

    def take(self, unwanted: Callable[[str], bool]) -> tuple[Received | None, list[Received]]:
        """The next received message whose queue is not ``unwanted``, its slot claimed, and the
        unwanted ones passed over (the caller gives those back).

        The slot is claimed under the same lock the pollers read it under: lowering it after
        the lock is released let a poller start one long poll too many in between, which then
        held a message no slot was free for.
        """
        with self._cond:
            skipped = []
            while self.arrived and unwanted(self.arrived[0].queue):
                skipped.append(self.arrived.popleft())
            found = self.arrived.popleft() if self.arrived else None
            if found is not None:
                self._target = max(0, self._target - 1)
            self._cond.notify_all()  # a poll may start in a passed-over message's place
            return found, skipped

    def excess(self, free: int) -> list[Received]:
        """Messages received beyond ``free`` slots: the caller gives them back."""
        with self._cond:
            extra = []
            while len(self.arrived) > free:
                extra.append(self.arrived.pop())
            return extra

    def stop(self) -> list[Received]:
        """Stop polling; what was received and not taken is the caller's to give back."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            left, self.arrived = list(self.arrived), deque()
            return left

    def _run(self) -> None:
        client = self._new_client()
        while True:
            with self._cond:
                chosen = self._next_poll()
                while chosen is None and not self._stopped:
                    self._cond.wait(1.0)  # a refresh, a pause running out, a retry time
                    chosen = self._next_poll()
                if chosen is None:
                    return
                queue, url, wait = chosen
                self._polling.add(queue)
            try:
                messages = self._poll(client, url, wait)
            except Failed as failure:
                self._failed(queue, failure)
                messages = []
            now = time.monotonic()
            received = [Received(queue, url, m, now) for m in messages]
            with self._cond:
                if messages:
                    self._failures = 0
                self._polling.discard(queue)
                late = self._stopped
                if not late:
                    self.arrived.extend(received)
                self._cond.notify_all()
            for message in received if late else ():
                self._release(client, message)  # nobody will take it: visible again at once
            if received and not late:
                self._wake()

    def _next_poll(self) -> tuple[str, str, int] | None:
        """(queue, url, wait) for a poll that may start now, or None; under the lock."""
        if self._stopped or time.monotonic() < self._retry_at:
            return None
        if len(self._polling) + len(self.arrived) >= self._target:
            return None
        queues = dict(self._queues())
        names = [n for n in queues if n not in self._polling and self._may_poll(n)]
        if not names:
            return None
        name = names[self._cursor % len(names)]
        self._cursor += 1
        # Every queue asked about once per ``wait``: polls share the queues between them.
        share = self.wait * self._target / max(1, len(queues))
        return name, queues[name], max(1, min(self.wait, math.ceil(share)))

    def _failed(self, queue: str, failure: Failed) -> None:
        with self._cond:
            self._failures += 1
            delay = backoff(self._failures)
            self._retry_at = max(self._retry_at, time.monotonic() + delay)
            self.failures.append((queue, failure))
        self._wake()  # the owner logs it from the supervisor's loop
