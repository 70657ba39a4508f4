"""Watching a folder tree for changes without polling it (inotify, see agent.inotify)."""

import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path

from agent import inotify

log = logging.getLogger(__name__)

MAX_WATCHES = 1024  # folders watched per tree: a queue root or a certs dir has far fewer
ABSENT_RECHECK = 0.5  # seconds between looks for a watched folder that does not exist (yet)


class FolderWatcher:
    """Tells its owner when a folder may have changed: the certs directory, a local queue root.

    The owner rescans on ``take_change``; a rescan is cheap, so events are only a trigger and
    the owner's periodic rescan covers anything a watch can miss (a directory that appears
    later, a whole tree swapped at once, a full event queue, a network file system, a host
    without inotify). ``wake`` is called on every change, from the watch's thread, which
    otherwise sleeps in ``select``: an idle watch costs no CPU.
    """

    def __init__(self, folder: Path, wake: Callable[[], None]):
        self.folder = folder
        self.wake = wake
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self._names: set[str] | None = None  # top-level entries changed; None: anything may have
        self._stop = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name=f"watch {folder}", daemon=True)
        self._unavailable_said = False

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
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._stop_w, b"\0")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if not self._thread.is_alive():  # else it may still poll the pipe: leave it open
            os.close(self._stop_r)
            os.close(self._stop_w)

    def _watch(self) -> None:
        while not self._stop.is_set():
            if not self.folder.is_dir():
                self._stop.wait(ABSENT_RECHECK)
                continue
            try:
                self._watch_tree()
            except OSError as exc:
                self._say_unavailable(exc)
                self._stop.wait()  # the owner's rescan is all there is

    def _watch_tree(self) -> None:
        """Signal every change under the folder until it goes away or the agent stops."""
        tree = _Tree(self.folder)
        try:
            tree.add(self.folder, self._say_unavailable)
            # The watch is in place: one more scan covers anything written before it was.
            self._signal(None)
            poller = select.poll()
            poller.register(tree.notify.fd, select.POLLIN)
            poller.register(self._stop_r, select.POLLIN)
            while not self._stop.is_set():
                if tree.notify.fd not in {fd for fd, _ in poller.poll()}:
                    continue
                names, gone = tree.changes(self._say_unavailable)
                if names != set():
                    self._signal(names)
                if gone:
                    return
        finally:
            tree.notify.close()

    def _say_unavailable(self, exc: OSError) -> None:
        if not self._unavailable_said:
            self._unavailable_said = True
            log.warning(
                "cannot watch all of %s (%s): changes there are seen at the next rescan",
                self.folder,
                exc.strerror or exc,
            )

    def _signal(self, names: set[str] | None) -> None:
        with self._lock:
            self._names = None if names is None or self._names is None else self._names | names
            self._changed.set()
        self.wake()


class _Tree:
    """The inotify watches on one folder and the folders under it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.notify = inotify.Inotify()
        self.folders: dict[int, Path] = {}  # watch descriptor -> folder, relative to root

    def add(self, folder: Path, refused: Callable[[OSError], None]) -> None:
        """Watch ``folder`` and the folders under it (symbolic links are not followed)."""
        pending = [folder]
        while pending and len(self.folders) < MAX_WATCHES:
            here = pending.pop()
            try:
                wd = self.notify.add_watch(str(here))
                with os.scandir(here) as entries:
                    pending += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                continue  # gone again already: its parent's event said so
            except OSError as exc:  # ENOSPC (the user's watch limit), EACCES
                refused(exc)
                continue
            self.folders[wd] = here.relative_to(self.root)
        if pending:
            refused(OSError(0, f"more than {MAX_WATCHES} folders"))

    def changes(self, refused: Callable[[OSError], None]) -> tuple[set[str] | None, bool]:
        """(the root's entries that changed, or None for anything; whether the root is gone)."""
        names: set[str] | None = set()
        for event in self.notify.read():
            if event.mask & inotify.Q_OVERFLOW:
                names = None
                continue
            where = self.folders.get(event.wd)
            if where is None:
                continue
            if event.mask & inotify.IGNORED:
                del self.folders[event.wd]  # the kernel dropped the watch: the folder is gone
            if not where.parts and (event.mask & (inotify.DELETE_SELF | inotify.MOVE_SELF)):
                return None, True
            if event.mask & inotify.ISDIR and event.mask & (inotify.CREATE | inotify.MOVED_TO):
                self.add(self.root / where / event.name, refused)
            entry = where.parts[0] if where.parts else event.name
            if not entry:
                names = None  # the root itself changed (its mode, say): look at everything
            elif names is not None:
                names.add(entry)
        return names, False
