"""Repeated ``kill -9`` and restarts of the agent: whose fault each was decides what it costs.

A death while an experiment runs is not the message's fault, however often it happens; a death
while the agent itself works on the message (parsing, fetching its artifacts) makes the message a
suspect, and after ``max_crashes`` such deaths it is set aside, named in the log, while innocent
messages behind it run.
"""

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.queues.local import enqueue
from tests.conftest import AgentProcess, Layout, submit_script, wait_until
from tests.integration.test_agent import finished
from tests.integration.test_rabbitmq_agent import publish, queue_depth, rmq_layout
from tests.s3_requests import s3_message
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

pytestmark = pytest.mark.integration

Start = Callable[[Layout], AgentProcess]

SLOW = """
import os, sys, time
open(os.path.join(sys.argv[1], os.environ["STUDIOML_EXPERIMENT"] + "-%d" % os.getpid()), "w")
time.sleep(float(sys.argv[2]))
print("done")
"""


def test_agent_deaths_while_experiments_run_set_no_innocent_message_aside(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(max_attempts=3)
    runs = tmp_path / "runs"
    runs.mkdir()
    keys = [submit_script(lay, SLOW, str(runs), "1.5").key for _ in range(3)]
    for kill in range(6):  # twice max_attempts, each while an experiment runs
        agent = start_agent(lay)
        wait_until(lambda n=kill: len(list(runs.iterdir())) > n, timeout=120, what="a run")
        agent.kill()
    agent = start_agent(lay)
    wait_until(lambda: all(finished(lay, k) for k in keys), timeout=180, what="all finished")
    assert agent.stop() == 0
    rejected = lay.state_dir / "rejected"
    assert not rejected.exists() or not any(rejected.iterdir())
    assert lay.queue_files("local_test") == []
    assert not list((lay.state_dir / "ledger").iterdir())  # settled: nothing remembered
    # A returned local message keeps its place in line, so one message took every death.
    per_key = [sum(p.name.startswith(k) for p in runs.iterdir()) for k in keys]
    assert max(per_key) > 3, per_key


@pytest.fixture
def stalling_server() -> Iterator[str]:
    """host:port of a TCP server that accepts and never answers: a fetch from it hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.s3
def test_a_message_the_agent_keeps_dying_on_is_set_aside_and_named(
    s3_server: S3Server,
    stalling_server: str,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = layout(max_crashes=2)
    host = s3_server.endpoint.partition("://")[2]
    stuck = s3_message(s3_server, "stuck1", "print('never')\n", [], tmp_path)
    enqueue(lay.queue_root, "local_test", stuck.replace(host.encode(), stalling_server.encode()))
    runs = tmp_path / "runs"
    runs.mkdir()
    innocent = submit_script(lay, SLOW, str(runs), "0").key
    for deaths in range(2):  # each time while fetching from the stalled server
        agent = start_agent(lay)
        agent.wait_for_log("experiment stuck1 from")  # then it fetches, and hangs there
        agent.kill()
        assert "stuck1" not in "".join(p.name for p in runs.iterdir()), deaths
    agent = start_agent(lay)
    wait_until(lambda: finished(lay, innocent), timeout=120, what="the innocent one finished")
    assert agent.stop() == 0
    log = agent.log()
    assert "suspected of crashing it (2)" in log  # which message, said at start
    assert "local_test/" in log
    assert "(experiment stuck1)" in log
    [reason] = (lay.state_dir / "rejected").glob("*.reason.json")
    text = json.loads(reason.read_text())["reason"]
    assert "the agent died 2 times while parsing or fetching this message" in text
    kept = reason.with_name(reason.name.removesuffix(".reason.json"))
    assert b"stuck1" in kept.read_bytes()  # kept whole, never dropped


@pytest.mark.s3
@pytest.mark.rabbitmq
def test_a_broker_message_in_custody_cannot_crash_agents_in_a_loop(
    rabbitmq: RabbitBroker,
    s3_server: S3Server,
    stalling_server: str,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    """The reported loop: the message is in custody, the next start publishes it back, and it
    would take the agent down again. After max_crashes it is set aside instead."""
    lay = rmq_layout(layout, rabbitmq, "rmq_stuck", max_crashes=2, broker_local_storage=[])
    host = s3_server.endpoint.partition("://")[2]
    stuck = s3_message(s3_server, "stuck2", "print('never')\n", [], tmp_path)
    publish(rabbitmq, "rmq_stuck", stuck.replace(host.encode(), stalling_server.encode()))
    for _ in range(2):
        agent = start_agent(lay)
        agent.wait_for_log("experiment stuck2 from")
        agent.kill()
    agent = start_agent(lay)
    rejected = lay.state_dir / "rejected"
    wait_until(lambda: any(rejected.glob("*.reason.json")), timeout=60, what="set aside")
    honest = s3_message(s3_server, "honest2", "print('served')\n", [], tmp_path)
    publish(rabbitmq, "rmq_stuck", honest)
    listing = lambda: s3_server.client().list_objects_v2(Bucket="agent-tests")  # noqa: E731
    keys = lambda: [o["Key"] for o in listing().get("Contents", [])]  # noqa: E731
    wait_until(lambda: "experiments/honest2/output.tar" in keys(), 120, "served after it")
    assert agent.stop() == 0
    [reason] = rejected.glob("*.reason.json")
    assert "died 2 times while parsing or fetching" in json.loads(reason.read_text())["reason"]
    assert queue_depth(rabbitmq, "rmq_stuck") == 0
    rabbitmq.delete_queue("rmq_stuck")


UNTIL_RELEASED = """
import os, sys, time
open(os.path.join(sys.argv[1], "run-%d" % os.getpid()), "w")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
print("released")
"""


def test_restarts_that_cut_an_experiment_are_not_its_attempts(
    layout: Callable[..., Layout], start_agent: Start, tmp_path: Path
) -> None:
    lay = layout(max_attempts=2, drain_timeout="0.5s")
    runs, release = tmp_path / "runs", tmp_path / "release"
    runs.mkdir()
    key = submit_script(lay, UNTIL_RELEASED, str(runs), str(release)).key
    for restart in range(4):  # systemctl restart, four times, while it runs
        agent = start_agent(lay)
        wait_until(lambda n=restart: len(list(runs.iterdir())) > n, what="running")
        assert agent.stop() == 0  # drains: cut at drain_timeout, the message goes back
    release.touch()
    agent = start_agent(lay)
    wait_until(lambda: finished(lay, key), what="finished")
    assert agent.stop() == 0
    assert "(attempt 1)" in agent.log()
    rejected = lay.state_dir / "rejected"
    assert not rejected.exists() or not any(rejected.iterdir())
