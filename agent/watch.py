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
        self._lock = threading.Lock()
        self._names: set[str] | None = None  # top-level entries changed; None: anything may have
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch {folder}", daemon=True)

    def start(self) -> None:
        self._changed.set()  # the first scan
        self._thread.start()

    def take_change(self) -> bool:
        """True (once) when something changed since the last call."""
        return self.take_changed() != set()

    def take_changed(self) -> set[str] | None:
        """What changed since the last call: the names of the folder's entries that did (a
        local queue's folder, say), None when anything may have, or an empty set."""
        with self._lock:
            if not self._changed.is_set():
                return set()
            self._changed.clear()
            names, self._names = self._names, set()
            return names

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
                self._signal(self._entries(changes) if settled else None)
            settled = True
            if not self.folder.is_dir():
                return

    def _entries(self, changes: set[tuple[Any, str]]) -> set[str] | None:
        """The folder's own entries the changed paths are in; None if one is not in it."""
        names = set()
        for _change, path in changes:
            try:
                parts = Path(path).relative_to(self.folder).parts
            except ValueError:
                return None
            if not parts:
                return None  # the folder itself
            names.add(parts[0])
        return names

    def _signal(self, names: set[str] | None = None) -> None:
        with self._lock:
            self._names = None if names is None or self._names is None else self._names | names
            self._changed.set()
        self.wake()
