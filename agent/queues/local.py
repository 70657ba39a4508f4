"""StudioML local queues: ``<root>/<queue>/<uuid4>`` files, shared with the studioml client.

Delivery semantics:
- The same lock as the client (``filelock.SoftFileLock`` on ``<queue>/lock.lock``: the file's
  existence, created with O_EXCL, is the lock), so the client and any number of agents can use one
  root safely.
- Oldest mtime first within a queue; queues are served round-robin, and a queue folder created
  while the agent runs is picked up on the next receive.
- Not polled: an inotify watch on the root (agent.watch) wakes the agent when a message or a
  queue appears, and only the queue folders it names are then looked at (with many agents on
  one root, every enqueue wakes each of them: one folder each, not all fifty); a scan of every
  queue each ``rescan`` seconds covers what a watch can miss (a root on a network file system,
  an overflowed event queue).
- A taken message is *moved* to ``<state>/inflight/<queue>/<name>``, never deleted before ack, so
  a ``kill -9`` loses nothing: ``recover`` puts such messages back at start-up. Requeue restores
  the file under its own name and mtime, so it keeps its place in line.
- A file is read up to ``max_body`` + 1 bytes: the rest of a larger one is never loaded (it
  is refused by size, and set aside whole from ``raw_path``).
- No lease: a message stays ours until it is settled. The delivery count lives in
  ``<state>/attempts/<queue>/<name>`` because the file itself must stay byte-identical.
"""

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from agent.errors import TransientError
from agent.queues.base import Delivery, QueueBackend, QueueFilter
from agent.watch import FolderWatcher

log = logging.getLogger(__name__)

LOCK_NAME = "lock.lock"
LOCK_WAIT = 10.0  # seconds; the client holds the lock for one file operation only
STALE_LOCK = 120.0  # a lock older than this was left by a process that died holding it
RESCAN = 5.0  # seconds between scans when no change was seen (``local.rescan``)


@contextlib.contextmanager
def queue_lock(queue_dir: Path, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold ``lock.lock`` in ``queue_dir`` the way ``filelock.SoftFileLock`` does."""
    lock = queue_dir / LOCK_NAME
    deadline = time.monotonic() + wait
    delay = 0.001
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            _break_if_stale(lock)
            if time.monotonic() > deadline:
                raise TransientError(
                    f"queue lock {lock} is held for more than {wait:.0f}s"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _break_if_stale(lock: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK:
            log.warning("removing stale queue lock %s (%.0f s old)", lock, age)
            lock.unlink()


def enqueue(root: Path, queue: str, body: bytes) -> Path:
    """Write a message the way ``studio run --queue <queue>`` does; return its path."""
    queue_dir = root / queue
    # Private by default: a message carries its submitter's storage credentials. An agent that
    # runs experiments under slot identities reads it all the same (CAP_DAC_OVERRIDE).
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    queue_dir.mkdir(mode=0o700, exist_ok=True)
    path = queue_dir / str(uuid.uuid4())
    with queue_lock(queue_dir):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(body)
    return path


def _messages(queue_dir: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(queue_dir) as entries:
            return [
                e
                for e in entries
                if e.name != LOCK_NAME and not e.name.startswith(".") and e.is_file()
            ]
    except FileNotFoundError:
        return []


def _move(src: Path, dst: Path) -> None:
    """Rename, or copy (mtime kept) and fsync then unlink when the two are on other filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(src, dst)
        with open(dst, "rb") as copy:
            os.fsync(copy.fileno())
        src.unlink()


class LocalDelivery(Delivery):
    backend = "local"

    def __init__(self, owner: "LocalQueue", queue: str, held: Path, body: bytes, count: int):
        self._owner = owner
        self.queue = queue
        self.message_id = held.name
        self.body = body
        self.delivery_count = count
        self.raw_path = held

    def ack(self) -> None:
        self._owner.settle(self, requeue=False)

    def requeue(self) -> None:
        self._owner.settle(self, requeue=True)


class LocalQueue(QueueBackend):
    kind = "local"
    polls = False  # watched: a change wakes the supervisor

    def __init__(
        self,
        root: Path,
        state_dir: Path,
        queue_filter: QueueFilter,
        max_body: int = 64 * 2**20,
        rescan: float = RESCAN,
    ):
        self.root = root
        self.max_body = max_body
        self.rescan = rescan
        self.quiet_tick = rescan  # a change wakes the agent; only the rescan is due by time
        self.filter = queue_filter
        self.inflight = state_dir / "inflight" / "local"
        self.attempts = state_dir / "attempts" / "local"
        self._next = 0
        self.name = f"local:{root}"
        self._watcher: FolderWatcher | None = None
        self._more = True  # the last look took a message: others may wait, in any queue
        self._next_scan = 0.0

    def served_queues(self) -> list[str]:
        try:
            names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        except FileNotFoundError:
            return []
        served = []
        for name in names:
            if self.filter.allows(name):
                served.append(name)
            elif self.not_serving(name, self.filter.why_not(name)):
                log.info("not serving local queue %s: %s", name, self.filter.why_not(name))
        return served

    def receive(self) -> Delivery | None:
        look = self._to_look_at()
        if look is not None and not look:
            return None
        queues = [q for q in self.served_queues() if look is None or q in look]
        for offset in range(len(queues)):
            queue = queues[(self._next + offset) % len(queues)]
            if self.paused(queue) or not _messages(self.root / queue):
                continue
            delivery = self._take_oldest(queue)
            if delivery:
                self._next = (self._next + offset + 1) % len(queues)
                self._more = True
                return delivery
        self._more = False  # (a look at only some queues happens only when it was False)
        return None

    def _to_look_at(self) -> set[str] | None:
        """The queues that may hold something new: those a change was seen in, or None for all
        of them (at start, while messages are being taken, a pause ended, the rescan)."""
        if self._watcher is None:
            # Late-bound: the supervisor sets ``wake`` after the backend is made.
            self._watcher = FolderWatcher(self.root, lambda: self.wake())
            self._watcher.start()
        now, last = time.monotonic(), self._next_scan - self.rescan
        changed = self._watcher.take_changed()
        everything = changed is None or self._more or self.pause_ended_since(last)
        if everything or now >= self._next_scan:
            self._next_scan = now + self.rescan
            return None
        return changed

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _take_oldest(self, queue: str) -> LocalDelivery | None:
        queue_dir = self.root / queue
        with queue_lock(queue_dir):
            entries = _messages(queue_dir)
            if not entries:
                return None
            oldest = min(entries, key=lambda e: (e.stat().st_mtime_ns, e.name))
            held = self.inflight / queue / oldest.name
            _move(Path(oldest.path), held)
        count = self._count_attempt(queue, oldest.name)
        with held.open("rb") as message:
            body = message.read(self.max_body + 1)
        return LocalDelivery(self, queue, held, body, count)

    def _count_attempt(self, queue: str, name: str) -> int:
        counter = self.attempts / queue / name
        try:
            count = int(counter.read_text()) + 1
        except (FileNotFoundError, ValueError):
            count = 1
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(count))
        return count

    def settle(self, delivery: LocalDelivery, requeue: bool) -> None:
        held = self.inflight / delivery.queue / delivery.message_id
        if requeue:
            self._put_back(delivery.queue, held)
            return
        held.unlink(missing_ok=True)
        (self.attempts / delivery.queue / delivery.message_id).unlink(missing_ok=True)

    def _put_back(self, queue: str, held: Path) -> None:
        queue_dir = self.root / queue
        # A queue folder deleted meanwhile is recreated: losing the message would be worse.
        queue_dir.mkdir(parents=True, exist_ok=True)
        with queue_lock(queue_dir):
            if (queue_dir / held.name).exists():
                held.unlink()  # a copy is already back in line (crash between copy and unlink)
            else:
                _move(held, queue_dir / held.name)

    def recover(self) -> int:
        """Return every message a previous, killed, run of this agent left in flight."""
        restored = 0
        if not self.inflight.is_dir():
            return 0
        for queue_dir in sorted(p for p in self.inflight.iterdir() if p.is_dir()):
            for held in sorted(p for p in queue_dir.iterdir() if p.is_file()):
                self._put_back(queue_dir.name, held)
                log.warning(
                    "restored unsettled message %s to local queue %s", held.name, queue_dir.name
                )
                restored += 1
        return restored
