"""``studio runs stop KEY`` from the StudioML client: it sets the experiment's record to
``stopped`` (``db.stop_experiment``, local or S3 database). While an experiment runs, its record
is read every ``stop_check`` (10 s; the StudioML worker did the same) and a stopped one is
aborted: its tree ended, what it made uploaded, its message settled and not run again."""

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from agent.request import Request
from agent.storage import database
from agent.storage.base import StorageOptions

log = logging.getLogger(__name__)

WHY = "stopped by `studio runs stop` (its record says stopped)"


def stopped(request: Request, options: StorageOptions) -> bool:
    """Whether the record says stopped now (before the experiment starts, then every interval)."""
    if database.read_status(request.config, request.key, options) != database.STOPPED:
        return False
    log.info("experiment %s: its record says stopped (studio runs stop)", request.key)
    return True


class StopCheck:
    def __init__(
        self,
        request: Request,
        options: StorageOptions,
        interval: float,
        abort: Callable[[str], None],
    ):
        self.request, self.options, self.interval, self.abort = request, options, interval, abort
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name=f"stop-check-{request.key}", daemon=True
        )

    def __enter__(self) -> "StopCheck":
        if self.interval > 0 and self.request.config.database is not None:
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            try:
                if stopped(self.request, self.options):
                    self.abort(WHY)
                    return
            except Exception:  # a reader bug must not end the run
                log.exception("reading the record of %s failed", self.request.key)
