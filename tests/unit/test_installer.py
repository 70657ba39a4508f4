"""One installer step with real (tiny) processes: how failures are told apart, bounded output."""

import io
import os
import signal
import threading
from pathlib import Path

import pytest

from agent.errors import EnvironmentFailed, TransientError
from agent.executors.installer import LINE_MAX, TAIL_LINES, run_step


def step(tmp_path: Path, script: str) -> io.BytesIO:
    log = io.BytesIO()
    run_step("uv pip install", ["sh", "-c", script], log, {"PATH": "/usr/bin:/bin"}, tmp_path, 30)
    return log


def test_a_network_failure_is_transient_and_a_bad_request_is_not(tmp_path: Path) -> None:
    refused = "echo 'error: Failed to fetch'; echo '  Caused by: Connection refused'; exit 2"
    with pytest.raises(TransientError, match="the network or the index failed"):
        step(tmp_path, refused)
    with pytest.raises(EnvironmentFailed, match="No solution found") as failed:
        step(tmp_path, "echo 'No solution found when resolving dependencies'; exit 1")
    assert not isinstance(failed.value, TransientError)
    assert "failed with exit code 1" in str(failed.value)


def test_output_without_newlines_is_copied_whole_but_kept_bounded(tmp_path: Path) -> None:
    size = 40 * LINE_MAX  # one endless "line", as a hostile setup.py can print
    with pytest.raises(EnvironmentFailed) as failed:
        step(tmp_path, f"head -c {size} /dev/zero | tr '\\0' x; exit 3")
    assert len(str(failed.value)) < (TAIL_LINES + 1) * LINE_MAX
    assert step(tmp_path, f"head -c {size} /dev/zero").getvalue() == b"\0" * size


def test_a_step_ends_when_it_exits_though_what_it_left_holds_its_output(tmp_path: Path) -> None:
    ended: list[str] = []
    pidfile = tmp_path / "leftover.pid"
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & echo built"
    log = io.BytesIO()

    def end_leftovers() -> None:
        ended.append("called")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)

    done = threading.Event()

    def build() -> None:
        env = {"PATH": "/usr/bin:/bin"}
        run_step("pip", ["sh", "-c", script], log, env, tmp_path, 600, end_leftovers)
        done.set()

    worker = threading.Thread(target=build)
    worker.start()
    worker.join(timeout=60)  # liveness, not timing: the old reader waited for the sleep's 300s
    assert done.is_set(), "the step was held open by a process it left behind"
    assert b"built" in log.getvalue()
    assert ended == ["called"]  # and what it left was handed to the run's confinement to end


def test_a_step_past_its_time_is_killed_and_says_so(tmp_path: Path) -> None:
    log = io.BytesIO()
    with pytest.raises(EnvironmentFailed, match="timed out and was killed"):
        run_step("pip", ["sh", "-c", "echo slow; exec sleep 300"], log, {}, tmp_path, 1)
    assert b"slow" in log.getvalue()
