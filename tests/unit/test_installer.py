"""One installer step with real (tiny) processes: how failures are told apart, bounded output."""

import io
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
