"""Watching a folder for changes without polling it (inotify, through watchfiles)."""

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class FolderWatcher:
    """Tells its owner when a folder may have changed (inotify via watchfiles): the certs
    directory, a local queue root.

    The owner rescans on ``take_change``; a rescan is cheap, so events are only a trigger and
    the owner's periodic rescan covers anything a watch can miss (a directory that appears
    later, a whole tree swapped at once). ``wake`` is called on every change, from the watch's
    thread.
    """

    def __init__(self, folder: Path, wake: Callable[[], None], latency_ms: int = 100):
        self.folder = folder
        self.wake = wake
        self.latency_ms = latency_ms
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch {folder}", daemon=True)

    def start(self) -> None:
        self._changed.set()  # the first scan
        self._thread.start()

    def take_change(self) -> bool:
        """True (once) when something changed since the last call."""
        if self._changed.is_set():
            self._changed.clear()
            return True
        return False

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        from watchfiles import watch

        while not self._stop.is_set():
            if not self.folder.is_dir():
                self._stop.wait(0.5)
                continue
            self._signal()  # it may have just appeared, with files in it
            try:
                self._watch_once(watch)
            except (FileNotFoundError, RuntimeError, OSError) as exc:
                log.debug("watch of %s restarting: %r", self.folder, exc)
                self._stop.wait(0.5)

    def _watch_once(self, watch: Callable[..., Any]) -> None:
        """Signal on every change until the folder goes away or the agent stops."""
        settled = False
        for changes in watch(
            self.folder,
            stop_event=self._stop,
            debounce=self.latency_ms,
            step=max(1, self.latency_ms // 2),
            rust_timeout=500,
            yield_on_timeout=True,
            recursive=True,
        ):
            # The first (empty) yield means the watch is in place: one more scan covers
            # anything written between the scan before it and now.
            if changes or not settled:
                self._signal()
            settled = True
            if not self.folder.is_dir():
                return

    def _signal(self) -> None:
        self._changed.set()
        self.wake()
