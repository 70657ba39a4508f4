"""Child processes: start in their own session, kill the whole tree, find orphans after a crash.

An experiment runs as the leader of a new session. Its descendants stay in that session unless
they call setsid themselves, so "the tree" is: every process of the session, plus every
descendant found by walking parent links in /proc (which catches the ones that left it).
"""

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.sandbox.cgroups import RunCgroup

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Clock ticks since boot when ``pid`` started; with the pid it names a process uniquely."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) for every live process."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def tree(leader: int) -> set[int]:
    """The session led by ``leader`` and every descendant of it, ``leader`` included if alive."""
    table = _processes()
    members = {pid for pid, (_, sid) in table.items() if sid == leader}
    if leader in table:
        members.add(leader)
    frontier = list(members)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in members:
                members.add(pid)
                frontier.append(pid)
    return members


def tree_memory(leader: int) -> int:
    """Resident bytes of ``leader``'s tree now (0 when it is gone)."""
    total = 0
    for pid in tree(leader):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((PROC / str(pid) / "statm").read_text().split()[1])
    return total * os.sysconf("SC_PAGE_SIZE")


def signal_tree(leader: int, sig: signal.Signals) -> int:
    """Send ``sig`` to the whole tree; return how many processes it reached."""
    reached = 0
    for pid in tree(leader):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            reached += 1
    return reached


def kill_tree(leader: int, grace: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the tree, wait up to ``grace`` seconds, then SIGKILL whatever is left.

    ``proc``, the leader's Popen when it is our child, is reaped before returning.
    """
    if signal_tree(leader, signal.SIGTERM):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and tree(leader):
            if proc is not None:
                proc.poll()  # reap the leader, or it stays a zombie in the table
            time.sleep(0.05)
    signal_tree(leader, signal.SIGKILL)
    if proc is not None:
        proc.wait()


def spawn(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], output: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a session leader with stdout and stderr appended to ``output``."""
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)


class ExitWatch:
    """Waits for a child to end, woken by the kernel when it does (its pidfd turns readable).

    ``Popen.wait(timeout)`` polls instead, sleeping in steps that double up to 50 ms: a child
    that ended after 16 ms was seen at 31.5 ms, which was most of the agent's time per short
    experiment. Without pidfds (Linux before 5.3) it falls back to that.
    """

    def __init__(self, proc: "subprocess.Popen[bytes]") -> None:
        self.proc = proc
        self._poll: select.poll | None = None
        try:
            self._fd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self._fd = None
        else:
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)

    def wait(self, timeout: float) -> int | None:
        """The exit status if the child ends within ``timeout`` seconds, else None."""
        if self._poll is None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        if not self._poll.poll(math.ceil(max(0.0, timeout) * 1000)):
            return None
        return self.proc.wait()  # it has ended: this only reaps it

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._poll = None


def record_run(path: Path, pid: int, extra: dict[str, object]) -> None:
    """What ``kill_orphan`` reads: the run's leader (0: none yet) and its cgroup, if any."""
    started = start_time(pid) if pid else None
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"pid": pid, "start": started, **extra}))
    os.replace(temporary, path)


def kill_orphan(path: Path, grace: float) -> bool:
    """End the run recorded in ``path`` (agent.execution) if any of it still runs.

    Its cgroup when it had one: every process in it, even those whose leader is gone. Else
    the tree of the recorded process, if that very process (pid and start time) still runs.
    True if something was killed.
    """
    try:
        info = json.loads(path.read_text())
        pid, started = int(info["pid"]), info["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    group = RunCgroup.from_record(path.parent.name, info.get("cgroup"))
    if group is not None:
        found = bool(group.pids())
        group.kill(grace)
        group.remove()
        return found
    if started is None or start_time(pid) != started:
        return False
    kill_tree(pid, grace)
    return True
