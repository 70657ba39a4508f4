"""The shipped unit under a real systemd (PID 1 of a bookworm container): readiness, status,
journal fields, watchdog, drain on stop, and no restart loop on a bad config.

The agent is installed from this checkout's wheels into /opt/venvs/studio-agent, as the .deb
lays it out, and runs as user studio-agent with packaging/studio-agent.service unchanged; tests
change it only through drop-ins, as an operator would.
"""

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services.nspawn import Container, install_agent_from_source

# integration too: `make unit` (-m "not integration") must not boot containers.
pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.integration]

UNIT = "studio-agent.service"
UNIT_FILE = Path(__file__).resolve().parents[2] / "packaging/studio-agent.service"
STATE = "/var/lib/studio-agent"
QUEUE = "local_sys"
CONFIG = f"""\
queue_root: {STATE}/queue
drain_timeout: 20s
kill_grace: 3s
metrics_address: ""
pass_env: [SSL_CERT_FILE]
"""
# This machine reaches PyPI through a TLS-intercepting proxy whose CA is only in the system
# bundle; uv (which builds experiments' venvs) trusts its own roots unless told otherwise.
PROXY_DROPIN = "[Service]\nEnvironment=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n"
# Runs for argv[1] seconds, printing as it goes.
SCRIPT = """\
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    print("working", flush=True)
    time.sleep(0.5)
print("done", flush=True)
"""
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.d"
WATCHDOG_DROPIN = f"{DROPIN_DIR}/watchdog.conf"


@pytest.fixture(scope="module")
def agent(nspawn: Container, agent_wheelhouse: Path) -> Iterator[Container]:
    """The container with the agent installed and its unit started."""
    install_agent_from_source(nspawn, agent_wheelhouse)
    nspawn.copy_in(UNIT_FILE, f"/etc/systemd/system/{UNIT}")
    nspawn.write_file("/etc/studio-agent/agent.yaml", CONFIG)
    nspawn.run("install -d -o studio-agent -g studio-agent -m 0700 /etc/studio-agent/certs")
    nspawn.write_file("/srv/exp/train.py", SCRIPT)
    nspawn.write_file(f"{DROPIN_DIR}/proxy-ca.conf", PROXY_DROPIN)
    nspawn.run(["systemctl", "daemon-reload"])
    yield nspawn
    print(nspawn.run(["journalctl", "--no-pager", "-u", UNIT], check=False).stdout[-6000:])


@pytest.fixture
def fresh(agent: Container) -> Container:
    """The service (re)started on the shipped unit and config, with empty queues."""
    agent.run(["systemctl", "stop", UNIT], timeout=120)
    agent.run(["rm", "-rf", WATCHDOG_DROPIN, f"{STATE}/queue/{QUEUE}"])
    agent.write_file("/etc/studio-agent/agent.yaml", CONFIG)
    agent.run(["systemctl", "daemon-reload"])
    agent.run(["systemctl", "reset-failed", UNIT], check=False)
    agent.run(["systemctl", "start", UNIT])
    return agent


def show(c: Container, *props: str) -> dict[str, str]:
    return c.show(UNIT, *props)


def wait_for(c: Container, predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll ``predicate``; on timeout fail with the unit's state and the end of its journal."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            state = show(c, "ActiveState", "SubState", "StatusText", "NRestarts")
            log = c.run(["journalctl", "--no-pager", "-u", UNIT, "-n", "40"], check=False)
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; {state}\n{log.stdout}"
            )
        time.sleep(0.2)


def submit(c: Container, key: str, seconds: float) -> None:
    """``studio-agent submit`` inside, as the agent's user, onto the agent's local queue."""
    c.run(
        [
            "runuser", "-u", "studio-agent", "--", "env", f"STATE_DIRECTORY={STATE}",
            "studio-agent", "submit", "/srv/exp", "--config", "/etc/studio-agent/agent.yaml",
            "--queue", QUEUE, "--key", key, "--", str(seconds),
        ]
    )  # fmt: skip


def status_text(c: Container) -> str:
    return show(c, "StatusText")["StatusText"]


def queued(c: Container) -> list[str]:
    """Messages waiting in the local queue (not taken by the agent)."""
    out = c.run(["find", f"{STATE}/queue/{QUEUE}", "-type", "f", "!", "-name", "*.lock"])
    return out.stdout.split()


def test_start_returns_once_the_agent_is_ready(agent: Container) -> None:
    agent.run(["systemctl", "stop", UNIT], timeout=120)
    agent.run(["systemctl", "start", UNIT])
    # Type=notify: start returned, so READY=1 (with its STATUS=) has already arrived.
    state = show(agent, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert re.fullmatch(r"idle, \d+ queue\(s\)", state["StatusText"]), state
    pid = state["MainPID"]
    proc = agent.run(["cat", f"/proc/{pid}/status"]).stdout
    assert re.search(r"^NoNewPrivs:\s+1$", proc, re.M)
    user = agent.run(["ps", "-o", "user=", "-p", pid]).stdout.strip()
    assert user == "studio-agent"
    # StateDirectory= is the agent's default state_dir: its lock is there, private.
    lock = agent.run(["stat", "-c", "%U %a", STATE, f"{STATE}/agent.lock"]).stdout.split("\n")
    assert lock[0] == "studio-agent 700"
    assert lock[1].startswith("studio-agent ")
    # ExecReload= sends SIGHUP: the same process keeps serving.
    agent.run(["systemctl", "reload", UNIT])
    time.sleep(1)
    after = show(agent, "ActiveState", "MainPID", "NRestarts")
    assert (after["ActiveState"], after["MainPID"], after["NRestarts"]) == (
        "active",
        pid,
        state["NRestarts"],
    )


def test_status_and_journal_fields_follow_an_experiment(fresh: Container) -> None:
    key = "systest-status"
    submit(fresh, key, 6)
    wait_for(
        fresh, lambda: status_text(fresh).startswith("running 1 experiment(s)"), "running status"
    )
    assert key in status_text(fresh)
    wait_for(fresh, lambda: status_text(fresh).startswith("idle"), "idle again", timeout=120)
    assert not queued(fresh)  # completed and acknowledged
    entries = fresh.journal(UNIT, f"EXPERIMENT_KEY={key}")
    assert entries, f"no journal entry with EXPERIMENT_KEY={key}"
    outcomes = [e.get("OUTCOME") for e in entries]
    assert "completed" in outcomes, outcomes
    finished = next(e for e in entries if e.get("OUTCOME") == "completed")
    assert finished["QUEUE"] == QUEUE
    assert finished["_SYSTEMD_UNIT"] == UNIT


def test_the_watchdog_restarts_a_frozen_agent(fresh: Container) -> None:
    fresh.write_file(WATCHDOG_DROPIN, "[Service]\nWatchdogSec=3s\n")
    fresh.run(["systemctl", "daemon-reload"])
    fresh.run(["systemctl", "restart", UNIT])
    before = show(fresh, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "3s"
    time.sleep(8)  # the loop's own pings keep a 3 s watchdog happy
    assert show(fresh, "MainPID", "NRestarts") == {
        "MainPID": before["MainPID"],
        "NRestarts": before["NRestarts"],
    }
    fresh.run(["kill", "-STOP", before["MainPID"]])  # the loop hangs; the process lives

    def restarted() -> bool:
        now = show(fresh, "MainPID", "NRestarts", "SubState")
        return now["NRestarts"] != before["NRestarts"] and now["SubState"] == "running"

    # 3 s without a ping, SIGABRT (pending: the process is stopped), SIGKILL after
    # TimeoutAbortSec=20, RestartSec=5, then READY again.
    wait_for(fresh, restarted, "a restart by the watchdog", timeout=90)
    after = show(fresh, "MainPID", "NRestarts", "StatusText")
    assert after["MainPID"] != before["MainPID"]
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert after["StatusText"].startswith("idle")
    messages = [e.get("MESSAGE", "") for e in fresh.journal(UNIT)]
    assert any("Watchdog timeout" in m for m in messages), messages[-20:]


def test_stop_waits_for_a_running_experiment_to_finish(fresh: Container) -> None:
    key = "systest-drain-finish"
    submit(fresh, key, 8)
    wait_for(fresh, lambda: key in status_text(fresh), "the experiment to start")
    fresh.run(["systemctl", "stop", "--no-block", UNIT])
    wait_for(fresh, lambda: status_text(fresh).startswith("draining, 1 experiment(s)"), "draining")
    assert show(fresh, "ActiveState")["ActiveState"] == "deactivating"
    wait_for(fresh, lambda: show(fresh, "ActiveState")["ActiveState"] == "inactive", "stop", 120)
    state = show(fresh, "Result", "ExecMainStatus")
    assert state == {"Result": "success", "ExecMainStatus": "0"}, state
    events = [e.get("EVENT") for e in fresh.journal(UNIT) if e.get("EVENT")]
    # In this order: the drain began, the experiment ran to its end, then the agent stopped.
    stopping = len(events) - 1 - events[::-1].index("agent_stopping")
    assert events[stopping:][-2:] == ["experiment_finished", "agent_stopped"], events[-6:]
    entries = fresh.journal(UNIT, f"EXPERIMENT_KEY={key}")
    assert "completed" in [e.get("OUTCOME") for e in entries]
    assert "drain time is up" not in " ".join(e.get("MESSAGE", "") for e in fresh.journal(UNIT))
    assert not queued(fresh)  # acknowledged


def test_stop_ends_the_drain_at_drain_timeout_and_returns_the_message(fresh: Container) -> None:
    key = "systest-drain-timeout"
    submit(fresh, key, 600)
    wait_for(fresh, lambda: key in status_text(fresh), "the experiment to start")
    fresh.run(["systemctl", "stop", UNIT], timeout=200)  # blocks until the agent has exited
    state = show(fresh, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    messages = [e.get("MESSAGE", "") for e in fresh.journal(UNIT)]
    assert any("drain time is up" in m for m in messages), messages[-10:]
    outcomes = [e.get("OUTCOME") for e in fresh.journal(UNIT, f"EXPERIMENT_KEY={key}")]
    assert "cancelled" in outcomes  # cut by the drain, not finished: 600 s were asked
    assert len(queued(fresh)) == 1  # returned to its queue for another agent
    fresh.run(["rm", "-rf", f"{STATE}/queue/{QUEUE}"])  # or the next start would run it again


def test_a_bad_config_exits_78_and_is_not_restarted(fresh: Container) -> None:
    fresh.write_file("/etc/studio-agent/agent.yaml", CONFIG + "no_such_setting: 1\n")
    before = show(fresh, "NRestarts")["NRestarts"]
    failed = fresh.run(["systemctl", "restart", UNIT], check=False)
    assert failed.returncode != 0
    time.sleep(5 + 3)  # RestartSec=5 and then some: no restart comes
    state = show(fresh, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": before,
    }
    log = fresh.run(["journalctl", "--no-pager", "-u", UNIT, "-n", "30"]).stdout
    assert "no_such_setting" in log
