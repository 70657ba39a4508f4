"""Admission in a real ``studio-agent run``: a request that does not fit now waits in its queue,
one that can never fit is returned with the reason, and GPUs (a static inventory: no NVIDIA
hardware here) are handed out whole, one experiment per card, and come back after a timeout."""

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.queues.local import enqueue
from agent.submit import Submission, prepare
from tests.conftest import ROOT, AgentProcess, Layout, wait_until, write_workspace

pytestmark = pytest.mark.integration

Start = Callable[..., AgentProcess]
CARDS = [
    {
        "index": 0,
        "uuid": "GPU-11111111-aaaa-bbbb-cccc-000000000000",
        "name": "T4",
        "memory": "16GiB",
    },
    {
        "index": 1,
        "uuid": "GPU-22222222-aaaa-bbbb-cccc-000000000000",
        "name": "T4",
        "memory": "16GiB",
    },
]
UUIDS = {card["uuid"] for card in CARDS}
# Whatever the host says, the agent under test manages every card of its inventory file.
ALL_CARDS = {"CUDA_VISIBLE_DEVICES": "all"}

# Prints its GPU variables, leaves them in <argv[1]>/<key>.json, then waits for <argv[2]>.
SHOW_ENV_AND_WAIT = """
import json, os, sys, time
names = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES")
seen = {name: os.environ.get(name) for name in names}
print("gpu env", json.dumps(seen), flush=True)
path = os.path.join(sys.argv[1], os.environ["STUDIOML_EXPERIMENT"] + ".json")
with open(path + ".tmp", "w") as out:  # renamed into place: the test waits for the name
    json.dump(seen, out)
os.replace(path + ".tmp", path)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
print("released")
"""


def submit_needing(
    lay: Layout, resources: dict[str, Any], *args: str, queue: str = "local_test", **extra: Any
) -> str:
    """Enqueue SHOW_ENV_AND_WAIT as the client would, with ``resources_needed`` changed."""
    workspace = write_workspace(lay.root / f"ws-{time.monotonic_ns()}", SHOW_ENV_AND_WAIT)
    sub = Submission(workspace, "train.py", list(args), queue, lay.queue_root, lay.storage, **extra)
    message = prepare(sub)
    message["experiment"]["resources_needed"].update(resources)
    enqueue(lay.queue_root, queue, json.dumps(message).encode())
    time.sleep(0.02)  # the local queue hands out the oldest first: keep the order certain
    return sub.key


def gpu_layout(layout: Callable[..., Layout], tmp_path: Path, **overrides: object) -> Layout:
    inventory = tmp_path / "gpus.json"
    inventory.write_text(json.dumps({"cards": CARDS}))
    return layout(gpu_inventory_file=str(inventory), **overrides)


def finished(lay: Layout, key: str) -> bool:
    record = lay.storage / "meta" / "experiments" / key
    return record.exists() and json.loads(record.read_text()).get("status") == "finished"


def status(lay: Layout) -> dict[str, Any]:
    path = lay.state_dir / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def paused_for(lay: Layout, queue: str) -> int | None:
    for backend in status(lay).get("backends", []):
        if queue in backend.get("paused", {}):
            return int(backend["paused"][queue])
    return None


def seen_env(folder: Path, key: str) -> dict[str, str]:
    result: dict[str, str] = json.loads((folder / f"{key}.json").read_text())
    return result


def test_a_request_that_does_not_fit_now_waits_in_its_queue(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    # One CPU for experiments; a return for lack of room must not count against max_attempts 1.
    lay = layout(max_concurrent=2, max_cores=1, max_attempts=1, admission_backoff="1h")
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    first = submit_needing(lay, {"cpus": 1}, str(started), str(release))
    second = submit_needing(lay, {"cpus": 1}, str(started), str(release))
    agent = start_agent(lay)
    agent.wait_for_log(f"experiment {second} from local:local_test does not fit now: needs 1 CPUs")
    wait_until(lambda: (started / f"{first}.json").exists(), what="the first running")
    assert len(lay.queue_files("local_test")) == 1  # the second: back in line, intact
    assert not (lay.state_dir / "rejected").exists()
    wait_until(lambda: paused_for(lay, "local_test"), what="queue paused in status.json")
    assert status(lay)["resources"]["waiting"] == {"local_test": "needs 1 CPUs; 0 free"}
    # The first's CPU comes back when it ends, and that reopens the queue (not an hour later).
    release.touch()
    wait_until(lambda: finished(lay, first) and finished(lay, second), what="both finished")
    assert agent.stop() == 0
    assert lay.queue_files("local_test") == []
    assert f"experiment {second} from local:local_test/" in agent.log()
    assert re.search(rf"experiment {second} from \S+: starting \(attempt 1\)", agent.log())


def test_a_request_that_can_never_fit_is_returned_with_the_reason(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = gpu_layout(layout, tmp_path, max_concurrent=2)
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    release.touch()
    greedy = submit_needing(lay, {"gpus": 1, "gpuCount": 3}, str(started), str(release))
    other = submit_needing(lay, {}, str(started), str(release), queue="local_other")
    agent = start_agent(lay, ALL_CARDS)
    agent.wait_for_log(f"experiment {greedy} from local:local_test can never run")
    line = next(ln for ln in agent.log().splitlines() if "can never run" in ln)
    assert " ERROR " in line
    assert "needs 3 GPU(s) (gpuCount 3; gpus 1 is not a card count when gpuCount is set)" in line
    assert "this machine has 2 such card(s) of 2" in line
    wait_until(lambda: finished(lay, other), what="the other queue still served")
    assert len(lay.queue_files("local_test")) == 1  # returned, not rejected
    assert not (lay.state_dir / "rejected").exists()
    wait_until(lambda: (paused_for(lay, "local_test") or 0) > 500, what="paused ~10 minutes")
    shown = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--config", str(lay.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "queue local_test waits for room: never fits: needs 3 GPU(s)" in shown
    assert agent.stop() == 0
    assert not (started / f"{greedy}.json").exists()


def test_gpus_are_whole_cards_and_come_back_after_a_timeout(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = gpu_layout(layout, tmp_path, max_concurrent=3, admission_backoff="1h")
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    cut = submit_needing(lay, {"gpus": 1, "cpus": 0}, str(started), str(release), max_duration="3s")
    kept = submit_needing(lay, {"gpus": 1, "cpus": 0}, str(started), str(release))
    later = submit_needing(lay, {"gpus": 1, "cpus": 0}, str(started), str(release))
    agent = start_agent(lay, ALL_CARDS)
    wait_until(lambda: (started / f"{cut}.json").exists(), what="first running")
    wait_until(lambda: (started / f"{kept}.json").exists(), what="second running")
    first, second = seen_env(started, cut), seen_env(started, kept)
    assert {first["CUDA_VISIBLE_DEVICES"], second["CUDA_VISIBLE_DEVICES"]} == UUIDS
    for seen in (first, second):
        assert seen["NVIDIA_VISIBLE_DEVICES"] == seen["CUDA_VISIBLE_DEVICES"]
        assert seen["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    agent.wait_for_log(f"experiment {later} from local:local_test does not fit now: needs 1 GPU")
    # The first is killed at its time limit; its card goes to the third, which was waiting.
    wait_until(lambda: (started / f"{later}.json").exists(), what="third running", timeout=90)
    third = seen_env(started, later)
    assert third["CUDA_VISIBLE_DEVICES"] == first["CUDA_VISIBLE_DEVICES"]
    assert f"experiment {cut} timeout" in agent.log()

    def held() -> dict[str, list[str]]:
        return {a["key"]: a["gpus"] for a in status(lay)["resources"]["assignments"]}

    wait_until(lambda: set(held()) == {kept, later}, what="status.json after the timeout")
    assert held() == {
        kept: [second["CUDA_VISIBLE_DEVICES"]],
        later: [third["CUDA_VISIBLE_DEVICES"]],
    }
    listing = subprocess.run(
        [sys.executable, "-m", "agent", "gpus", "--config", str(lay.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={**os.environ, **ALL_CARDS},
    ).stdout
    assert f"assigned to {kept}" in listing
    assert f"assigned to {later}" in listing
    release.touch()
    wait_until(lambda: finished(lay, kept) and finished(lay, later), what="both finished")
    assert agent.stop() == 0
    output = (lay.results(later) / "output.tar").read_text(errors="replace")
    assert f'"CUDA_VISIBLE_DEVICES": "{third["CUDA_VISIBLE_DEVICES"]}"' in output
