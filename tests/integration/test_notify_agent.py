"""``studio-agent run`` under a real notify socket: READY, status, watchdog, STOPPING, extend."""

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AgentProcess, Layout, submit_script, wait_until

pytestmark = pytest.mark.integration


def collect(
    listener: socket.socket, until: Callable[[list[str]], bool], timeout: float = 60
) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(messages):
        if time.monotonic() > deadline:
            raise AssertionError(f"notify messages so far: {messages}")
        try:
            messages.append(listener.recv(4096).decode())
        except TimeoutError:
            continue
    return messages


def test_the_agent_speaks_sd_notify(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    lay = layout(drain_timeout="2s")
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.5)
    started = tmp_path / "started"
    script = f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(300)\n"
    try:
        agent = start_agent(lay, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        seen = collect(listener, lambda m: any("READY=1" in x for x in m))
        assert any("STATUS=idle" in x for x in seen)
        watchdog = collect(listener, lambda m: m.count("WATCHDOG=1") >= 2, timeout=10)
        assert watchdog.count("WATCHDOG=1") >= 2  # pinged about every second from the loop
        request = submit_script(lay, script)
        wait_until(started.exists, what="experiment started")
        running = collect(
            listener,
            lambda m: any(f"STATUS=running 1 experiment(s): {request.key}" in x for x in m),
        )
        assert running
        agent.proc.terminate()
        stopping = collect(listener, lambda m: any("EXTEND_TIMEOUT_USEC=" in x for x in m))
        assert any(x.startswith("STOPPING=1\nSTATUS=draining, 1 experiment(s)") for x in stopping)
        assert agent.proc.wait(60) == 0
    finally:
        listener.close()
