"""Linux inotify through libc: a file descriptor that becomes readable when a watched folder
changes, so a watcher can block in ``select`` and cost nothing while nothing happens.

Python has no binding in its standard library; the calls are three and their one structure is
fixed by the kernel ABI (``struct inotify_event``: int wd, u32 mask, u32 cookie, u32 len, then
``len`` bytes of NUL-padded name), so ctypes is enough and far lighter than a watch library
(watchfiles cost 5 MiB of RSS and a 5 ms poll of its own on a thread).
"""

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

CLOSE_WRITE: Final = 0x00000008
ATTRIB: Final = 0x00000004
MOVED_FROM: Final = 0x00000040
MOVED_TO: Final = 0x00000080
CREATE: Final = 0x00000100
DELETE: Final = 0x00000200
DELETE_SELF: Final = 0x00000400
MOVE_SELF: Final = 0x00000800
Q_OVERFLOW: Final = 0x00004000
IGNORED: Final = 0x00008000
ONLYDIR: Final = 0x01000000
DONT_FOLLOW: Final = 0x02000000
EXCL_UNLINK: Final = 0x04000000
ISDIR: Final = 0x40000000

# A folder's entries written, replaced, removed or re-permissioned, and the folder itself going.
FOLDER_CHANGES: Final = (
    CLOSE_WRITE | ATTRIB | MOVED_FROM | MOVED_TO | CREATE | DELETE | DELETE_SELF | MOVE_SELF
)
_WATCH_FLAGS: Final = ONLYDIR | DONT_FOLLOW | EXCL_UNLINK
_CLOEXEC: Final = 0o2000000
_NONBLOCK: Final = 0o4000
_HEADER: Final = struct.Struct("iIII")
READ_SIZE: Final = 64 * 1024  # one read's bound; the kernel keeps the rest for the next


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str  # the entry's name inside the watched folder; "" for the folder itself


class Inotify:
    """One inotify instance. Not thread-safe: one watcher thread owns it."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(_CLOEXEC | _NONBLOCK)
        if fd < 0:
            raise _os_error("inotify_init1")
        self.fd: int = fd

    def add_watch(self, path: str, mask: int = FOLDER_CHANGES) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask | _WATCH_FLAGS)
        if wd < 0:
            raise _os_error(f"inotify_add_watch {path}")
        return int(wd)

    def read(self) -> list[Event]:
        """The events waiting now (none if there are none: the descriptor does not block)."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return []
        return list(parse(data))

    def close(self) -> None:
        os.close(self.fd)


def parse(data: bytes) -> Iterator[Event]:
    """The events in one read; a truncated tail (which the kernel never writes) is dropped."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        if start + length > len(data):
            return
        raw = data[start : start + length].split(b"\0", 1)[0]
        yield Event(wd, mask, os.fsdecode(raw))
        offset = start + length


def _os_error(call: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{call}: {os.strerror(errno)}")
