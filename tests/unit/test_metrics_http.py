"""The /metrics server: serves scrapes, sleeps between them, and closes promptly."""

import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from agent.report.metrics_http import MetricsServer


def wakeups(thread: threading.Thread) -> int:
    """How often the thread has been switched out of its own accord (each sleep, each wait)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    [line] = [x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches")]
    return int(line.split()[1])


def test_it_serves_the_registry_and_sleeps_until_a_scrape_comes() -> None:
    registry = CollectorRegistry()
    Counter("bench_things", "things", registry=registry).inc(3)
    server = MetricsServer("127.0.0.1", 0, registry)
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
            assert "bench_things_total 3.0" in reply.read().decode()
        time.sleep(0.2)
        before = wakeups(server._thread)
        time.sleep(1.5)  # serve_forever would have woken three times by now
        assert wakeups(server._thread) == before
    finally:
        started = time.monotonic()
        server.close()
    assert not server._thread.is_alive()
    assert time.monotonic() - started < 1.0


def test_an_ipv6_loopback_address_is_served_too() -> None:
    server = MetricsServer("::1", 0, CollectorRegistry())
    try:
        host, port = server.address
        assert host == "::1"
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.close()
