"""Trouble with one service, the same way for every backend: capped exponential backoff with
full jitter, and one log line per outage (at DEBUG while it lasts, and a line when it ends).
Each backend keeps only its own list of what counts as trouble (agent.queues.sqs_calls, ...)."""

import logging
import random
import time

BACKOFF_MAX = 60.0  # seconds: the longest wait between two tries


def backoff(failures: int, cap: float = BACKOFF_MAX) -> float:
    """How long to wait after ``failures`` failures in a row (full jitter)."""
    return random.uniform(0, min(cap, 0.5 * 2 ** min(failures, 32)))


class Outage:
    def __init__(self, logger: logging.Logger, who: str) -> None:
        self.log, self.who = logger, who
        self.failures = 0
        self.retry_at = 0.0  # monotonic: no try before this
        self.kind: str | None = None  # the trouble already logged; None while healthy

    def failed(self, text: str, kind: str = "down", level: int = logging.WARNING) -> float:
        """Record a failure and back off; logged once per kind of trouble. The delay."""
        self.failures += 1
        delay = backoff(self.failures)
        self.retry_at = time.monotonic() + delay
        said = self.kind == kind
        self.log.log(
            logging.DEBUG if said else level, "%s: %s; retrying with backoff", self.who, text
        )
        self.kind = kind
        return delay

    def ok(self, text: str = "answers again") -> None:
        if self.kind is not None:
            self.log.info("%s: %s", self.who, text)
        self.kind, self.failures = None, 0

    def waiting(self) -> bool:
        return time.monotonic() < self.retry_at
