"""One installer step (uv venv, uv pip install, pip): run, its output copied to the run's log,
the end kept for the error, a failure of the network or the index told apart.

Its output is the request's code talking (a package's ``setup.py``): it goes to the log as it
comes, and only the last ``TAIL_LINES`` lines of at most ``LINE_MAX`` bytes are kept, so a build
that prints gigabytes with no newline cannot fill the agent's memory.
"""

import os
import select
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from agent.errors import EnvironmentFailed, TransientError

TAIL_LINES = 20
LINE_MAX = 8192
READ_SIZE = 65536
LEFTOVER_GRACE = 2.0  # seconds the output may stay open after the step itself has exited
# What an installer prints when the network or the index failed, not the request: another
# try later may work, so the message goes back instead of being acknowledged as failed.
_TRANSIENT_OUTPUT = (
    "temporary failure in name resolution",
    "name or service not known",
    "failed to establish a new connection",
    "connection refused",
    "connection reset",
    "network is unreachable",
    "timed out",
    "read timeout",
    "dns error",
    "error sending request",
    "503 service unavailable",
    "502 bad gateway",
    "504 gateway",
    "500 internal server error",
    "http status server error",
)


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def flush(self) -> None: ...


class LastBytes:
    """A sink that keeps only the last ``limit`` bytes written to it."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit, self.kept = limit, b""

    def write(self, data: bytes, /) -> int:
        self.kept = (self.kept + data)[-self.limit :]
        return len(data)

    def flush(self) -> None:
        pass


def run_step(
    step: str,
    argv: list[str],
    log: Sink,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float,
    end_leftovers: Callable[[], None] = lambda: None,
) -> None:
    """Run ``argv``; raise EnvironmentFailed (or TransientError) with its last lines if it fails.

    ``end_leftovers`` ends whatever the step started that is still running once it is over
    (the run's cgroup or slot): a backgrounded build process holding the output pipe open must
    not keep the agent reading, or running, past the step.
    """
    tail: deque[bytes] = deque(maxlen=TAIL_LINES)
    cwd.mkdir(parents=True, exist_ok=True)
    # Its own session, so that killing it also kills the build backends pip and uv start.
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            timed_out = _copy_output(proc, proc.stdout.fileno(), log, tail, timeout)
        finally:
            _kill_group(proc)  # what it left in its session ...
            end_leftovers()  # ... and anywhere else in the run
            log.flush()
    if proc.returncode != 0:
        message = _failure_message(step, proc.returncode, tail, timed_out)
        if _is_transient(tail):
            raise TransientError(f"{message}\n(the network or the index failed: try later)")
        raise EnvironmentFailed(message)


def _copy_output(
    proc: "subprocess.Popen[bytes]", fd: int, log: Sink, tail: deque[bytes], timeout: float
) -> bool:
    """Copy the step's output until it exits (and its output ends, or LEFTOVER_GRACE passes)
    or ``timeout`` does; True when it was killed for the latter."""
    deadline = time.monotonic() + timeout
    lines = _Lines(log, tail)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ended_at: float | None = None
    while True:
        now = time.monotonic()
        if ended_at is None and proc.poll() is not None:
            ended_at = now
        if ended_at is not None and now - ended_at > LEFTOVER_GRACE:
            break  # its output is held open by something it left behind
        if now >= deadline:
            _kill_group(proc)
            proc.wait()
            lines.flush()
            return True
        if poller.poll(250) and not lines.feed(os.read(fd, READ_SIZE)):
            break
    proc.wait()
    lines.flush()
    return False


class _Lines:
    """Output cut into lines of at most LINE_MAX bytes, written to the log, the last kept."""

    def __init__(self, log: Sink, tail: deque[bytes]) -> None:
        self.log, self.tail, self.pending = log, tail, b""

    def feed(self, chunk: bytes) -> bool:
        """Take ``chunk``; False at the end of the output."""
        if not chunk:
            return False
        self.log.write(chunk)
        data = self.pending + chunk
        *done, self.pending = data.split(b"\n")
        self.tail.extend(line[-LINE_MAX:] + b"\n" for line in done[-TAIL_LINES:])
        self.pending = self.pending[-LINE_MAX:]
        return True

    def flush(self) -> None:
        if self.pending:
            self.tail.append(self.pending)
            self.pending = b""


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # gone already, or (EPERM) only zombies are left in it


def _is_transient(tail: deque[bytes]) -> bool:
    text = b"".join(tail).decode(errors="replace").lower()
    return any(sign in text for sign in _TRANSIENT_OUTPUT)


def _failure_message(step: str, code: int, tail: deque[bytes], timed_out: bool) -> str:
    what = "timed out and was killed" if timed_out else f"failed with exit code {code}"
    output = b"".join(tail).decode(errors="replace").rstrip()
    return f"{step} {what}; last lines of its output:\n{output}"
