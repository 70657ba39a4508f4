"""The certs directory with a running agent: credentials start, rotate and stop subscriptions."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentProcess, Layout, wait_until
from tests.integration.test_rabbitmq_agent import COUNTED, finished, queue_depth, submit_rmq
from tests.services.rabbitmq import RabbitBroker

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

Start = Callable[[Layout], AgentProcess]
# COUNTED, but running until the file named by its second argument exists.
WAITS_FOR_RELEASE = COUNTED.replace(
    "time.sleep(float(sys.argv[2]))",
    "import pathlib\nwhile not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.05)",
)


def drop_credential(certs: Path, name: str, broker: RabbitBroker, mode: int = 0o600) -> Path:
    folder = certs / "rabbitmq"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / name
    temporary = folder / f".{name}.tmp"  # editors and deploy tools rename into place
    temporary.write_text(f"{broker.amqp_url}\n{broker.mgmt_url}\n")
    temporary.chmod(mode)
    temporary.rename(path)
    return path


def status(lay: Layout) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--config", str(lay.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def rabbit_backends(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in report["backends"] if b["kind"] == "rabbitmq"]


def test_a_dropped_credential_starts_work_within_a_second(
    rabbitmq: RabbitBroker, layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(queue_match="^rmq_certs1$", amqp_refresh="1s")
    runs = tmp_path / "runs"
    request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_certs1")
    agent = start_agent(lay)
    agent.wait_for_log("ready")
    dropped = time.monotonic()
    drop_credential(lay.root / "certs", "team1", rabbitmq)
    agent.wait_for_log("credential rabbitmq/team1: subscribing")
    assert time.monotonic() - dropped < 2.0
    wait_until(lambda: finished(lay, request.key), what="experiment finished")
    wait_until(lambda: rabbit_backends(status(lay)), what="the credential in status.json")
    [backend] = rabbit_backends(status(lay))
    assert backend["name"] == "team1"
    assert backend["served"] == ["rmq_certs1"]
    assert agent.stop() == 0
    assert "guest:guest" not in agent.log()


def test_a_readable_credential_is_refused(
    rabbitmq: RabbitBroker, layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(queue_match="^rmq_certs2$", amqp_refresh="1s")
    submit_rmq(rabbitmq, lay, COUNTED, str(tmp_path / "runs"), "0", queue="rmq_certs2")
    drop_credential(lay.root / "certs", "open", rabbitmq, mode=0o644)
    agent = start_agent(lay)
    agent.wait_for_log("credential rabbitmq/open refused")
    assert "mode 0644 lets group or others read it" in agent.log()
    time.sleep(2)
    assert queue_depth(rabbitmq, "rmq_certs2") == 1  # nothing was taken with it
    wait_until(lambda: "rabbitmq/open" in status(lay)["refused"], what="refusal in status.json")
    assert agent.stop() == 0
    rabbitmq.delete_queue("rmq_certs2")


def test_removing_a_credential_lets_running_work_finish_and_takes_no_more(
    rabbitmq: RabbitBroker, layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(queue_match="^rmq_certs3$", amqp_refresh="1s", max_concurrent=1)
    runs, release = tmp_path / "runs", tmp_path / "release"
    first = submit_rmq(
        rabbitmq, lay, WAITS_FOR_RELEASE, str(runs), str(release), queue="rmq_certs3"
    )
    credential = drop_credential(lay.root / "certs", "team3", rabbitmq)
    agent = start_agent(lay)
    wait_until(lambda: runs.exists(), what="experiment started")
    submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_certs3")
    credential.unlink()
    agent.wait_for_log("credential rabbitmq/team3: no new work")
    release.touch()
    wait_until(lambda: finished(lay, first.key), what="running experiment finished")
    agent.wait_for_log("backend closed")
    time.sleep(1.5)
    assert runs.read_text().splitlines() == [first.key]  # the second message was not taken
    assert queue_depth(rabbitmq, "rmq_certs3") == 1
    journal = lay.state_dir / "inflight" / "rabbitmq" / "team3"
    assert not [p for p in journal.rglob("*") if p.is_file()]  # the first one was acknowledged
    assert agent.stop() == 0
    rabbitmq.delete_queue("rmq_certs3")


def test_rotating_a_credential_keeps_running_work(
    rabbitmq: RabbitBroker, layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(queue_match="^rmq_certs4$", amqp_refresh="1s", max_concurrent=2)
    runs, release = tmp_path / "runs", tmp_path / "release"
    first = submit_rmq(
        rabbitmq, lay, WAITS_FOR_RELEASE, str(runs), str(release), queue="rmq_certs4"
    )
    credential = drop_credential(lay.root / "certs", "team4", rabbitmq)
    agent = start_agent(lay)
    wait_until(lambda: runs.exists(), what="experiment started")
    # Rotation: the same broker, new file content (as a new password would be).
    temporary = credential.with_name(".team4.new")
    temporary.write_text(f"{rabbitmq.amqp_url}?heartbeat=20\n{rabbitmq.mgmt_url}\n")
    os.chmod(temporary, 0o600)
    temporary.rename(credential)
    agent.wait_for_log("its file changed (rotation)")
    second = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_certs4")
    wait_until(lambda: finished(lay, second.key), what="new work under the new credential")
    release.touch()
    wait_until(lambda: finished(lay, first.key), what="the first finished under the old one")
    assert agent.stop() == 0
    assert sorted(runs.read_text().splitlines()) == sorted([first.key, second.key])
    assert queue_depth(rabbitmq, "rmq_certs4") == 0


def test_a_kubernetes_style_secret_swap_is_a_rotation(
    rabbitmq: RabbitBroker, layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    """A Kubernetes secret volume: ``team -> ..data/team``, ``..data -> ..<timestamp>``; an
    update writes a new timestamped folder and renames a new ``..data`` link over the old one."""
    lay = layout(queue_match="^rmq_certs5$", amqp_refresh="1s")
    mount = lay.root / "certs" / "rabbitmq"
    mount.mkdir(parents=True, mode=0o700)

    def publish_secret(version: str, text: str) -> None:
        folder = mount / f"..{version}"
        folder.mkdir(mode=0o700)
        private_file = folder / "team5"
        private_file.write_text(text)
        private_file.chmod(0o600)
        link = mount / "..data_tmp"
        link.symlink_to(folder.name)
        link.rename(mount / "..data")  # the atomic swap

    publish_secret("v1", f"{rabbitmq.amqp_url}\n{rabbitmq.mgmt_url}\n")
    (mount / "team5").symlink_to("..data/team5")
    agent = start_agent(lay)
    agent.wait_for_log("credential rabbitmq/team5: subscribing")
    publish_secret("v2", f"{rabbitmq.amqp_url}?heartbeat=20\n{rabbitmq.mgmt_url}\n")
    agent.wait_for_log("its file changed (rotation)")
    request = submit_rmq(rabbitmq, lay, COUNTED, str(tmp_path / "runs"), "0", queue="rmq_certs5")
    wait_until(lambda: finished(lay, request.key), what="served after the swap")
    assert agent.stop() == 0
    assert "..data" not in agent.log().replace("..data/team5", "")  # no credential named ..data
