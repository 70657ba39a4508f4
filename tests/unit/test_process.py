import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import process
from tests.conftest import alive, wait_until

# A child that starts a grandchild in its session and another that escapes with setsid.
FAMILY = """
import os, subprocess, sys, time
a = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
b = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(sys.argv[1], "w").write(f"{a.pid} {b.pid}")
time.sleep(300)
"""


def start_family(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    pids_file = tmp_path / "pids"
    proc = process.spawn(
        [sys.executable, "-c", FAMILY, str(pids_file)], tmp_path, dict(os.environ), tmp_path / "out"
    )
    wait_until(lambda: pids_file.exists() and pids_file.read_text(), what="grandchildren")
    return proc, [int(p) for p in pids_file.read_text().split()]


def test_kill_tree_reaches_grandchildren_that_left_the_session(tmp_path: Path) -> None:
    proc, grandchildren = start_family(tmp_path)
    leader = proc.pid
    assert process.tree(leader) >= {leader, *grandchildren}
    process.kill_tree(leader, grace=2, proc=proc)
    wait_until(
        lambda: not any(alive(p) for p in [leader, *grandchildren]), timeout=10, what="tree gone"
    )


def test_kill_orphan_only_kills_the_recorded_process(tmp_path: Path) -> None:
    proc, grandchildren = start_family(tmp_path)
    leader = proc.pid
    record = tmp_path / "process.json"
    record.write_text(f'{{"pid": {leader}, "start": {process.start_time(leader) + 1}}}')
    assert not process.kill_orphan(record, grace=1)  # same pid, other start time: not ours
    assert alive(leader)
    record.write_text(f'{{"pid": {leader}, "start": {process.start_time(leader)}}}')
    assert process.kill_orphan(record, grace=2)
    proc.wait(10)
    wait_until(
        lambda: not any(alive(p) for p in [leader, *grandchildren]), timeout=10, what="tree gone"
    )


def test_spawn_appends_both_streams_to_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"before\n")
    code = (
        "import sys; print('line1'); print('err', file=sys.stderr); sys.stdout.write('no newline')"
    )
    proc = process.spawn([sys.executable, "-c", code], tmp_path, dict(os.environ), out)
    assert proc.wait(10) == 0
    time.sleep(0.05)
    assert out.read_bytes().replace(b"err\n", b"") == b"before\nline1\nno newline"
    assert b"err\n" in out.read_bytes()


def test_exit_watch_reports_the_status_once_the_child_ends() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; time.sleep(0.2); sys.exit(7)"]
    )
    watch = process.ExitWatch(proc)
    try:
        assert watch.wait(0) is None  # still running
        assert watch.wait(30) == 7
        assert proc.returncode == 7  # reaped
    finally:
        watch.close()
        watch.close()  # twice is harmless


def test_exit_watch_without_pidfds_falls_back_to_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    watch = process.ExitWatch(proc)
    assert watch.wait(0) is None
    assert watch.wait(30) == 0
    watch.close()
