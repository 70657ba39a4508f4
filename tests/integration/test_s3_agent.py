"""The agent with S3 storage: an outage during the final upload, and a message that always fails."""

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.queues.local import enqueue
from tests.conftest import AgentProcess, Layout, wait_until
from tests.s3_requests import s3_message
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.s3]

Start = Callable[[Layout], AgentProcess]

WAIT_FOR_RELEASE = """
import os, sys, time
print("working", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print("released")
"""


def output_in_bucket(s3: S3Server, key: str) -> str | None:
    client = s3.client()
    try:
        body = client.get_object(Bucket="agent-tests", Key=f"experiments/{key}/output.tar")[
            "Body"
        ].read()
    except client.exceptions.NoSuchKey:
        return None
    except client.exceptions.NoSuchBucket:
        return None
    return body.decode(errors="replace")


def test_results_arrive_after_an_s3_outage_during_the_final_upload(
    s3_server: S3Server,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = layout(upload_budget="2m")
    release = tmp_path / "release"
    enqueue(
        lay.queue_root,
        "local_s3",
        s3_message(s3_server, "outage1", WAIT_FOR_RELEASE, [str(release)], tmp_path),
    )
    agent = start_agent(lay)
    agent.wait_for_log("started as pid")
    s3_server.stop()
    release.touch()
    agent.wait_for_log("retrying")
    assert lay.queue_files("local_s3") == []
    time.sleep(2)
    s3_server.start()  # moto starts empty: the bucket comes back, the objects do not
    s3_server.make_bucket("agent-tests")
    wait_until(lambda: output_in_bucket(s3_server, "outage1"), timeout=120, what="output uploaded")
    wait_until(lambda: "completed" in agent.log(), what="completed")
    assert agent.stop() == 0
    assert "released" in (output_in_bucket(s3_server, "outage1") or "")
    assert lay.queue_files("local_s3") == []  # acknowledged only once the results were safe


def test_results_that_cannot_be_saved_send_the_message_back(
    s3_server: S3Server,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = layout(upload_budget="3s", retry_backoff="60s")
    release = tmp_path / "release"
    body = s3_message(s3_server, "outage2", WAIT_FOR_RELEASE, [str(release)], tmp_path)
    enqueue(lay.queue_root, "local_s3", body)
    agent = start_agent(lay)
    agent.wait_for_log("started as pid")
    s3_server.stop()
    try:
        release.touch()
        agent.wait_for_log("results not saved")
        wait_until(lambda: lay.queue_files("local_s3"), what="message back in its queue")
        assert agent.stop() == 0
    finally:
        s3_server.start()
    [returned] = lay.queue_files("local_s3")
    assert returned.read_bytes() == body  # never acknowledged with its results missing


def test_a_message_that_always_fails_stops_looping(
    s3_server: S3Server,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = layout(max_attempts=3, upload_budget="1s", retry_backoff="0.5s")
    body = s3_message(s3_server, "poison1", "print('never')\n", [], tmp_path)
    # Storage that refuses connections: every attempt fails before the experiment can run.
    endpoint = s3_server.endpoint
    enqueue(
        lay.queue_root,
        "local_s3",
        body.replace(endpoint.removeprefix("http://").encode(), b"127.0.0.1:9"),
    )
    agent = start_agent(lay)
    rejected = lay.state_dir / "rejected"
    wait_until(lambda: any(rejected.glob("*.reason.json")), timeout=180, what="set aside")
    assert agent.stop() == 0
    [reason] = rejected.glob("*.reason.json")
    assert "handed out 4 times (max_attempts 3)" in reason.read_text()
    assert lay.queue_files("local_s3") == []
    assert agent.log().count("starting (attempt") == 3
