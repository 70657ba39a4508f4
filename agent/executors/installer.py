"""One installer step (uv venv, uv pip install, pip): run, its output copied to the run's log,
the end kept for the error, a failure of the network or the index told apart.

Its output is the request's code talking (a package's ``setup.py``): lines are read at most
``LINE_MAX`` bytes at a time, so a build that prints gigabytes with no newline cannot fill the
agent's memory.
"""

import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from agent.errors import EnvironmentFailed, TransientError

TAIL_LINES = 20
LINE_MAX = 8192
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


def run_step(
    step: str,
    argv: list[str],
    log: BinaryIO,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float,
) -> None:
    """Run ``argv``; raise EnvironmentFailed (or TransientError) with its last lines if it fails."""
    tail: deque[bytes] = deque(maxlen=TAIL_LINES)
    timed_out = threading.Event()
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
        timer = threading.Timer(timeout, _time_out, (proc, timed_out))
        timer.start()
        try:
            assert proc.stdout is not None
            while line := proc.stdout.readline(LINE_MAX):
                log.write(line)
                tail.append(line)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            timer.cancel()
            log.flush()
    if proc.returncode != 0:
        message = _failure_message(step, proc.returncode, tail, timed_out.is_set())
        if _is_transient(tail):
            raise TransientError(f"{message}\n(the network or the index failed: try later)")
        raise EnvironmentFailed(message)


def _time_out(proc: "subprocess.Popen[bytes]", timed_out: threading.Event) -> None:
    timed_out.set()
    _kill_group(proc)


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_transient(tail: deque[bytes]) -> bool:
    text = b"".join(tail).decode(errors="replace").lower()
    return any(sign in text for sign in _TRANSIENT_OUTPUT)


def _failure_message(step: str, code: int, tail: deque[bytes], timed_out: bool) -> str:
    what = "timed out and was killed" if timed_out else f"failed with exit code {code}"
    output = b"".join(tail).decode(errors="replace").rstrip()
    return f"{step} {what}; last lines of its output:\n{output}"
