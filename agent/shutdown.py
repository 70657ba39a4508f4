"""Stopping on SIGTERM: let running experiments finish for ``drain_timeout``, keep systemd's
stop timeout ahead of the drain, then stop what still runs (its message goes back). A second
SIGTERM cuts the drain short."""

import logging
import time
from collections.abc import Mapping
from typing import Protocol

from agent.report.events import Event, Events
from agent.report.notify import Notifier
from agent.settings import Settings

log = logging.getLogger("agent.supervisor")

EXTEND_EVERY = 5.0  # seconds between two EXTEND_TIMEOUT_USEC= while experiments remain
UPLOAD_ROOM = 60.0  # what the stopped experiments' final uploads may take


class _Run(Protocol):
    def cancel(self) -> None: ...


class _Job(Protocol):
    @property
    def run(self) -> _Run: ...


class Shutdown:
    def __init__(self, settings: Settings, notifier: Notifier, events: Events):
        self.settings, self.notifier, self.events = settings, notifier, events
        self.deadline: float | None = None
        self._next_extend = 0.0
        self._cancelled = False

    def time_left(self) -> float:
        return max((self.deadline or time.monotonic()) - time.monotonic(), 0.0)

    def step(self, requests: int, jobs: Mapping[int, _Job], status: str) -> bool:
        """Advance the drain; False when nothing is left running."""
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.settings.drain_timeout
            self.notifier.stopping(status)
            text = (
                f"studio-agent stopping: draining {len(jobs)} experiment(s), "
                f"up to {self.settings.drain_timeout:.0f}s"
            )
            self.events.emit(Event("agent_stopping", text))
        if requests > 1:
            self.deadline = min(self.deadline, now)
        if not jobs:
            return False
        if now >= self._next_extend:
            # Ask systemd for the drain's remaining time plus room to stop and upload, so its
            # TimeoutStopSec= need not cover the longest drain.
            self._next_extend = now + EXTEND_EVERY
            left = max(self.deadline - now, 0.0)
            self.notifier.extend_timeout(left + self.settings.kill_grace + UPLOAD_ROOM)
        if now >= self.deadline and not self._cancelled:
            log.warning(
                "drain time is up: stopping %d experiment(s); their messages go back", len(jobs)
            )
            for job in jobs.values():
                job.run.cancel()
            self._cancelled = True
        return True
