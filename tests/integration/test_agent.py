"""``studio-agent run`` as a real process: concurrency, drain, kill -9, malformed messages."""

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.queues.local import enqueue
from tests.conftest import AgentProcess, Layout, submit_script, wait_until

pytestmark = pytest.mark.integration

Start = Callable[[Layout], AgentProcess]

WAIT_FOR_FILE = """
import os, sys, time
print("started", flush=True)
open(os.path.join(sys.argv[1], os.environ["STUDIOML_EXPERIMENT"]), "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
print("released")
"""


def finished(lay: Layout, key: str) -> bool:
    record = lay.storage / "meta" / "experiments" / key
    return record.exists() and json.loads(record.read_text()).get("status") == "finished"


def test_runs_experiments_concurrently(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(max_concurrent=2)
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    keys = [submit_script(lay, WAIT_FOR_FILE, str(started), str(release)).key for _ in range(3)]
    agent = start_agent(lay)
    # Two start and block; the third must wait for a free slot.
    wait_until(lambda: len(list(started.iterdir())) == 2, what="two experiments running at once")
    time.sleep(0.5)
    assert len(list(started.iterdir())) == 2
    release.touch()
    wait_until(lambda: all(finished(lay, k) for k in keys), what="all three finished")
    assert agent.stop() == 0
    assert lay.queue_files("local_test") == []


BIG_MODEL = """
import json, os, sys, time
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
with open(os.path.join(mapping["modeldir"], "weights"), "wb") as out:
    for _ in range(256):
        out.write(os.urandom(2**20))  # not compressible: saving it takes a while
open(sys.argv[1], "w").write(repr(time.time()))
"""

STAMP = """
import sys, time
open(sys.argv[1], "w").write(repr(time.time()))
"""


def test_the_next_experiment_starts_while_the_last_ones_results_are_saved(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(max_concurrent=1)
    first_end, second_start = tmp_path / "first-end", tmp_path / "second-start"
    first = submit_script(lay, BIG_MODEL, str(first_end)).key
    second = submit_script(lay, STAMP, str(second_start)).key
    agent = start_agent(lay)
    agent.wait_for_log(f"experiment {first} completed")
    log = agent.log()
    # One slot: the second ran after the first's process had ended ...
    assert float(second_start.read_text()) > float(first_end.read_text())
    # ... and was taken before the first's results were saved and its message settled.
    assert log.index(f"experiment {second} from") < log.index(f"experiment {first} completed")
    assert (lay.results(first) / "modeldir.tar").exists()
    assert agent.stop() == 0
    assert lay.queue_files("local_test") == []


def test_sigterm_drain_returns_a_cut_off_message(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(drain_timeout="1s")
    started = tmp_path / "started"
    started.mkdir()
    request = submit_script(lay, WAIT_FOR_FILE, str(started), str(tmp_path / "never"))
    message = lay.queue_files("local_test")[0]
    body = message.read_bytes()
    agent = start_agent(lay)
    wait_until(lambda: any(started.iterdir()), what="experiment started")
    assert not message.exists()
    assert agent.stop() == 0
    assert message.read_bytes() == body  # back in its queue, byte for byte
    assert "their messages go back" in agent.log()
    output = lay.results(request.key) / "output.tar"
    assert output.exists()  # what it produced before the cut was uploaded


def test_drain_lets_a_running_experiment_finish(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(drain_timeout="60s")
    started = tmp_path / "started"
    started.mkdir()
    release = tmp_path / "release"
    request = submit_script(lay, WAIT_FOR_FILE, str(started), str(release))
    agent = start_agent(lay)
    wait_until(lambda: any(started.iterdir()), what="experiment started")
    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_for_log("draining")
    release.touch()
    assert agent.stop() == 0
    assert finished(lay, request.key)
    assert lay.queue_files("local_test") == []


def test_kill_9_loses_no_message(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout()
    started = tmp_path / "started"
    started.mkdir()
    release = tmp_path / "release"
    request = submit_script(lay, WAIT_FOR_FILE, str(started), str(release))
    first = start_agent(lay)
    wait_until(lambda: any(started.iterdir()), what="experiment started")
    first.kill()
    assert lay.queue_files("local_test") == []  # the message is held in the state dir, not lost
    (started / request.key).unlink()
    second = start_agent(lay)
    second.wait_for_log("returned to their queues")
    assert "killed an experiment left running" in second.log()
    wait_until(lambda: any(started.iterdir()), what="experiment restarted")
    release.touch()
    wait_until(lambda: finished(lay, request.key), what="finished after restart")
    assert second.stop() == 0
    assert "released\n" in (lay.results(request.key) / "output.tar").read_text(errors="replace")


def test_malformed_message_is_kept_under_rejected(
    layout: Callable[..., Layout], start_agent: Start
) -> None:
    lay = layout()
    enqueue(lay.queue_root, "local_test", b'{"experiment": {"filename": "no-key.py"}}')
    enqueue(lay.queue_root, "local_test", b"\x00not json at all")
    agent = start_agent(lay)
    rejected = lay.state_dir / "rejected"
    wait_until(lambda: len(list(rejected.glob("*.reason.json"))) == 2, what="two rejections")
    assert agent.stop() == 0
    reasons = sorted(json.loads(p.read_text())["reason"] for p in rejected.glob("*.reason.json"))
    assert "not JSON" in reasons[0]
    assert "experiment.key: Field required" in reasons[1]
    bodies = sorted(p.read_bytes() for p in rejected.iterdir() if not p.name.endswith(".json"))
    assert bodies == [b"\x00not json at all", b'{"experiment": {"filename": "no-key.py"}}']
    assert lay.queue_files("local_test") == []
    assert "set aside" in agent.log()
    assert oct(os.stat(lay.state_dir).st_mode & 0o777) == "0o700"


def test_expired_message_is_recorded_and_not_run(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout()
    marker = tmp_path / "ran"
    submit_script(lay, f"open({str(marker)!r}, 'w')\n", lifetime="1s")
    time.sleep(1.2)
    agent = start_agent(lay)
    wait_until(
        lambda: any((lay.state_dir / "expired").glob("*.reason.json")), what="expired record"
    )
    assert agent.stop() == 0
    assert not marker.exists()
    assert lay.queue_files("local_test") == []


def test_a_second_agent_on_the_same_state_dir_is_refused(
    layout: Callable[..., Layout], start_agent: Start
) -> None:
    lay = layout()
    first = start_agent(lay)
    first.wait_for_log("ready")
    second = start_agent(lay)
    assert second.proc.wait(30) == 78
    assert "another studio-agent is using this state_dir" in second.log()
    assert first.stop() == 0


def test_a_message_handed_out_too_often_is_set_aside(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(max_attempts=2)
    marker = tmp_path / "ran"
    submit_script(lay, f"open({str(marker)!r}, 'w')\n")
    [message] = lay.queue_files("local_test")
    # Two earlier agents took it and never settled it (killed, or their results never saved).
    counter = lay.state_dir / "attempts" / "local" / "local_test" / message.name
    counter.parent.mkdir(parents=True)
    counter.write_text("2")
    agent = start_agent(lay)
    wait_until(lambda: any((lay.state_dir / "rejected").glob("*.reason.json")), what="poison")
    assert agent.stop() == 0
    [reason] = (lay.state_dir / "rejected").glob("*.reason.json")
    assert "handed out 3 times (max_attempts 2)" in reason.read_text()
    assert not marker.exists()
