"""The sd_notify client against a real AF_UNIX datagram socket, as systemd listens on one."""

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.report.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(2)
    yield listener, path
    listener.close()


def test_ready_status_stopping_and_extend(notify_socket: tuple[socket.socket, str]) -> None:
    listener, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("idle, 0 queue(s)")
    assert listener.recv(4096).decode().split("\n") == [
        "READY=1",
        f"MAINPID={os.getpid()}",
        "STATUS=idle, 0 queue(s)",
    ]
    notifier.status("idle, 0 queue(s)")  # unchanged: nothing sent
    notifier.status("running 1 experiment(s): k")
    assert listener.recv(4096) == b"STATUS=running 1 experiment(s): k"
    notifier.stopping("draining")
    assert listener.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    notifier.extend_timeout(90.5)
    assert listener.recv(4096) == b"EXTEND_TIMEOUT_USEC=90500000"
    notifier.close()


def test_watchdog_pings_at_most_every_half_interval(
    notify_socket: tuple[socket.socket, str],
) -> None:
    listener, path = notify_socket
    notifier = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000000", "WATCHDOG_PID": str(os.getpid())}
    )
    for _ in range(5):
        notifier.watchdog()
    assert listener.recv(4096) == b"WATCHDOG=1"
    listener.settimeout(0.2)
    with pytest.raises(TimeoutError):
        listener.recv(4096)  # the other four calls were within the half interval
    notifier.close()


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    notifier = Notifier(
        {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert notifier.watchdog_interval is None


def test_off_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.ready("idle")
    notifier.watchdog()


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.send("READY=1") is False
    notifier.close()
