"""The operator's controls on a running agent, through its control socket and the CLI: drain,
pause and resume of one queue, abort, a persisted pause across a restart, reload, idle exit and
the experiment limit."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable

import pytest
import yaml

from tests.conftest import ROOT, AgentProcess, Layout, submit_script, wait_until

pytestmark = pytest.mark.integration

SLEEP = """import sys, time
print("before", flush=True)
time.sleep(float(sys.argv[1]))
print("after")
"""


def control(lay: Layout, *words: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``studio-agent WORDS --config ...`` as an operator types it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *words, "--config", str(lay.config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def status(lay: Layout) -> dict[str, object]:
    data: dict[str, object] = json.loads((lay.state_dir / "status.json").read_text())
    return data


def started(agent: AgentProcess, key: str) -> bool:
    return f"experiment {key} from" in agent.log()


def finished(agent: AgentProcess, key: str, how: str = "completed") -> bool:
    return f"experiment {key} {how}" in agent.log()


def ready(agent: AgentProcess, lay: Layout) -> None:
    agent.wait_for_log("studio-agent ready")
    wait_until(lambda: (lay.state_dir / "control.sock").exists(), 10, "the control socket")


def test_drain_finishes_what_runs_takes_nothing_new_and_stays_up(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout()
    agent = start_agent(lay)
    ready(agent, lay)
    running = submit_script(lay, SLEEP, "3").key
    wait_until(lambda: started(agent, running), 120, "the first run")

    def shown() -> list[dict[str, object]]:
        jobs = status(lay)["experiments"]
        assert isinstance(jobs, list)
        return jobs

    # status answers what runs, for how long, with how much memory
    wait_until(lambda: [j for j in shown() if int(j["memory_bytes"]) > 2**20], 30, "its memory")
    assert shown()[0]["key"] == running
    drained = control(lay, "drain")
    assert drained.returncode == 0, drained.stderr
    assert "drain: finishing what runs, taking nothing new" in drained.stdout
    waiting = submit_script(lay, SLEEP, "0").key
    waited = control(lay, "drain", "--wait")
    assert waited.returncode == 0, waited.stderr
    assert "drained after" in waited.stdout
    assert finished(agent, running)
    assert not started(agent, waiting)
    assert agent.proc.poll() is None  # up, and says so
    wait_until(lambda: status(lay)["state"] == "drained", 10, "status.json: drained")
    assert "operator (uid" in agent.log()
    assert control(lay, "resume").returncode == 0
    wait_until(lambda: finished(agent, waiting), 60, "the waiting run after resume")
    assert agent.stop() == 0


def test_pause_and_resume_one_queue(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout()
    agent = start_agent(lay)
    ready(agent, lay)
    paused = control(lay, "pause", "local_held")
    assert paused.returncode == 0, paused.stderr
    held = submit_script(lay, SLEEP, "0", queue="local_held").key
    free = submit_script(lay, SLEEP, "0", queue="local_free").key
    wait_until(lambda: finished(agent, free), 120, "the run on the free queue")
    time.sleep(1.5)  # a few passes of the loop: the held queue stays untouched
    assert not started(agent, held)
    assert len(lay.queue_files("local_held")) == 1
    assert control(lay, "resume", "local_held").returncode == 0
    wait_until(lambda: finished(agent, held), 60, "the held run after resume")
    log = agent.log()
    for said in ("operator (uid", "pause local_held", "resume local_held"):
        assert said in log
    assert agent.stop() == 0


def test_abort_ends_a_run_keeps_its_output_and_settles_it(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout()
    agent = start_agent(lay)
    ready(agent, lay)
    key = submit_script(lay, SLEEP, "120").key
    wait_until(lambda: started(agent, key), 120, "the run")
    output = "work/*/experiments/*/output/output"
    wait_until(lambda: any(lay.state_dir.glob(output)), 30, "its output")
    time.sleep(1)  # its first line printed
    aborted = control(lay, "abort", key)
    assert aborted.returncode == 0, aborted.stderr
    assert f"aborting {key}" in aborted.stdout
    wait_until(lambda: finished(agent, key, "aborted"), 60, "the abort")
    assert "aborted by the operator (uid" in agent.log()
    with tarfile.open(lay.results(key) / "output.tar") as tar:
        member = tar.extractfile("output")
        assert member is not None
        output = member.read().decode()
    assert "before" in output
    assert "after" not in output
    assert lay.queue_files("local_test") == []  # settled: acknowledged, not given back
    time.sleep(1.5)
    assert agent.log().count(f"experiment {key} from") == 1  # and never run again
    unknown = control(lay, "abort", "no-such-key")
    assert unknown.returncode == 1
    assert "no experiment no-such-key runs here" in unknown.stdout
    assert agent.stop() == 0


def test_a_persisted_pause_survives_a_restart(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout()
    first = start_agent(lay)
    ready(first, lay)
    assert control(lay, "pause", "--persist").returncode == 0
    assert first.stop() == 0
    second = start_agent(lay)
    ready(second, lay)
    key = submit_script(lay, SLEEP, "0").key
    time.sleep(2)
    assert not started(second, key)
    assert status(lay)["state"] == "paused"
    assert "operator state from" in second.log()
    assert control(lay, "resume", "--persist").returncode == 0
    wait_until(lambda: finished(second, key), 60, "the run after resume")
    assert json.loads((lay.state_dir / "control.json").read_text())["paused"] == []
    assert second.stop() == 0


def test_the_control_socket_is_for_the_owner_and_group_only(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout()
    agent = start_agent(lay)
    ready(agent, lay)
    mode = (lay.state_dir / "control.sock").stat().st_mode & 0o777
    assert mode == 0o660
    assert agent.stop() == 0
    assert not (lay.state_dir / "control.sock").exists()
    refused = control(lay, "drain")
    assert refused.returncode == 69
    assert "no agent listens on" in refused.stderr


def test_reload_applies_what_it_can_and_names_the_rest(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout()
    agent = start_agent(lay)
    ready(agent, lay)
    config = yaml.safe_load(lay.config.read_text())
    config.update(max_concurrent=2, queue_match="^local_other_.*$")
    lay.config.write_text(yaml.safe_dump(config))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for_log("SIGHUP: applied max_concurrent 1 -> 2", timeout=10)
    agent.wait_for_log("applied only at the next start: queue_match", timeout=10)
    first, second = (submit_script(lay, SLEEP, "3").key for _ in range(2))
    wait_until(lambda: started(agent, first) and started(agent, second), 120, "two at once")
    assert agent.stop() == 0


def test_idle_exit_after_max_idle(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout(max_idle="2s")
    agent = start_agent(lay)
    key = submit_script(lay, SLEEP, "1").key
    assert agent.proc.wait(120) == 79
    log = agent.log()
    assert finished(agent, key)  # the idle clock runs only without an experiment
    assert "studio-agent exiting: idle for" in log


def test_the_experiment_limit_exits_after_settling(
    layout: Callable[..., Layout], start_agent: Callable[[Layout], AgentProcess]
) -> None:
    lay = layout(max_experiments=2)
    keys = [submit_script(lay, SLEEP, "0").key for _ in range(3)]
    agent = start_agent(lay)
    assert agent.proc.wait(180) == 79
    assert sum(finished(agent, key) for key in keys) == 2
    assert len(lay.queue_files("local_test")) == 1  # the third waits for another agent
    assert "max_experiments 2 reached; 2 experiment(s) run" in agent.log()
