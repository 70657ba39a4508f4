"""Slot identities: each running experiment is a user that is neither the agent nor another run.

As HTCondor's ``SLOT<N>_USER``: the package creates ``studio-slot0`` .. ``studio-slotN`` (system
users, no login, each its own group), and a run borrows a free one for its whole life. A slot
may also be written as a bare uid (``61184`` or ``61184:61184``), for hosts and tests that keep
no passwd entry, as systemd's DynamicUser= does.

The agent needs a few capabilities to do this without being root (the unit grants them as
ambient capabilities): CAP_SETUID/CAP_SETGID to become the slot, CAP_CHOWN to hand the run
its directories, CAP_DAC_OVERRIDE to read back what the run wrote whatever modes it chose and
remove it afterwards, CAP_KILL to stop a run. The child drops them all before it execs.
"""

import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError, TransientError

SLOT_NAME = re.compile(r"studio-slot\d+")
# capability numbers (linux/capability.h)
NEEDED_CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SETGID": 6}
NEEDED_CAPS["CAP_SETUID"] = 7


@dataclass(frozen=True)
class Slot:
    name: str  # the passwd name, or the uid as written
    uid: int
    gid: int
    named: bool  # has a passwd entry: its supplementary groups (video, render) come along

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as this slot with no capabilities and no way to gain privileges.

        setpriv (util-linux, in every Debian) rather than Popen(user=...): the agent's ambient
        capabilities would otherwise survive into the experiment.
        """
        groups = ["--init-groups"] if self.named else ["--clear-groups"]
        return [
            SETPRIV,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            *groups,
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--no-new-privs",
            "--",
            *argv,
        ]


SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin") or "/usr/bin/setpriv"


def parse_slot(text: str) -> Slot:
    if re.fullmatch(r"\d+(:\d+)?", text):
        uid, _, gid = text.partition(":")
        return Slot(text, int(uid), int(gid or uid), False)
    try:
        entry = pwd.getpwnam(text)
    except KeyError:
        raise ConfigError(f"slot_users: no such user {text!r}") from None
    return Slot(text, entry.pw_uid, entry.pw_gid, True)


def discover_slots(configured: Sequence[str]) -> list[Slot]:
    """The configured slots, or else every ``studio-slot<N>`` user, in number order."""
    if configured:
        slots = [parse_slot(text) for text in configured]
    else:
        names = [e.pw_name for e in pwd.getpwall() if SLOT_NAME.fullmatch(e.pw_name)]
        slots = [parse_slot(n) for n in sorted(names, key=lambda n: int(n[11:]))]
    agent = os.getuid()
    for slot in slots:
        if slot.uid in (0, agent) or slot.gid == 0:
            raise ConfigError(f"slot_users: {slot.name} is root or the agent's own user")
    if len({s.uid for s in slots}) != len(slots):
        raise ConfigError("slot_users: two slots share a uid")
    return slots


def missing_capabilities(status: str | None = None) -> list[str]:
    """The capabilities in NEEDED_CAPS this process does not hold in its effective set."""
    if status is None:
        status = Path("/proc/self/status").read_text()
    effective = 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
    return [name for name, bit in NEEDED_CAPS.items() if not effective >> bit & 1]


class SlotPool:
    """Hands each run a slot no other run holds."""

    def __init__(self, slots: Iterable[Slot]) -> None:
        self._free = list(slots)
        self.size = len(self._free)
        self._lock = threading.Lock()

    def take(self) -> Slot:
        with self._lock:
            if not self._free:
                raise TransientError("every slot user is busy")
            return self._free.pop(0)

    def give_back(self, slot: Slot) -> None:
        with self._lock:
            self._free.append(slot)


def chown_tree(root: Path, uid: int, gid: int, readable: bool = False) -> None:
    """Give ``root`` and everything below it to ``uid``, never following a symlink.

    Only called while no process of the previous owner runs (before a run starts, after its
    group is empty), so nothing can swap an entry for a link in between. ``readable`` also
    opens it to every slot for reading (a built env that all runs share), and no one but
    its owner may write it.
    """
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            _chown_entry(Path(directory) / name, uid, gid, readable)
    _chown_entry(root, uid, gid, readable)


def _chown_entry(path: Path, uid: int, gid: int, readable: bool) -> None:
    """Through a descriptor opened without following links, checked to be the entry listed:
    a path-based chmod would follow a link swapped in since, to a file the agent owns."""
    info = os.lstat(path)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        os.chown(path, uid, gid, follow_symlinks=False)  # links, fifos, sockets: never opened
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise OSError(f"{path} changed while it was being taken back")
        os.fchown(fd, uid, gid)
        if readable:
            mode = stat.S_IMODE(now.st_mode) & ~0o7022  # no set-id or sticky, no g/o write
            mode |= 0o755 if stat.S_ISDIR(now.st_mode) or mode & 0o100 else 0o644
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def kill_all_of(uid: int, rounds: int = 50) -> None:
    """SIGKILL every process of ``uid``: where no cgroup holds a run, its slot user is the run
    (only one run holds a slot at a time), as HTCondor ends a slot without cgroups."""
    for _ in range(rounds):
        found = [pid for pid in _pids_of(uid) if pid != os.getpid()]
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _pids_of(uid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    found.append(int(entry.name))
    return found


def remove_files_of(uid: int, folders: Iterable[Path]) -> None:
    """Remove what ``uid`` owns at the top of each of ``folders`` (a finished run's leftovers)."""
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # not on this host, or not readable: nothing of the run's to find there
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)  # fd-based: a link inside is removed, not followed
                else:
                    os.unlink(entry.path)
            except OSError:
                continue  # gone meanwhile
