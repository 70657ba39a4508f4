"""What a deployed runner must do, whoever deployed it (Ansible or Salt): shared checks.

Each check runs inside a booted container (tests/services/nspawn.py) where the .deb has been
installed and the service started. Experiments are published to the session's private RabbitMQ
broker the way the studioml client does, with their artifacts in the session's S3 server: a
message from a broker may not name local storage (agent.trust). Both servers listen on the
host's 127.0.0.1, which the container shares.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pika

from tests.conftest import wait_until
from tests.s3_requests import s3_message
from tests.services.nspawn import Container
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

UNIT = "studio-agent.service"
STATE = "/var/lib/studio-agent"
CERTS = "/etc/studio-agent/certs"
# What purging the package must remove (the postrm's list, plus dpkg's own files).
PACKAGE_PATHS = (
    "/etc/studio-agent",
    "/var/lib/studio-agent",
    "/var/cache/studio-agent",
    "/opt/venvs/studio-agent",
    "/usr/bin/studio-agent",
    "/lib/systemd/system/studio-agent.service",
    "/etc/systemd/system/multi-user.target.wants/studio-agent.service",
)
# Prints, then runs for argv[1] seconds, the first time only: it leaves a mark in its modeldir,
# which is uploaded even when the run is cut, and downloaded again by the next run.
SCRIPT = """\
import os, sys, time
print("deployed runner says hello", flush=True)
mark = os.path.join("..", "modeldir", "ran-once")
if not os.path.exists(mark):
    open(mark, "w").close()
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        time.sleep(0.2)
print("finished")
"""


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
    # Each probe runs a command inside the container: poll gently.
    wait_until(predicate, timeout, what, interval=0.3)


def agent_settings(queue: str, drain: float) -> dict[str, object]:
    """The agent settings both deploy tests give their tool (Ansible variables, Salt pillar)."""
    return {
        "queue_match": f"^{queue}$",  # the session's broker is shared with other tests
        "amqp_refresh": "1s",
        "drain_timeout": f"{drain:.0f}s",
        "kill_grace": "2s",
        "metrics_address": "",  # the container shares the host's ports
        "pass_env": ["SSL_CERT_FILE"],
    }


# uv trusts its own roots; this machine's PyPI proxy CA is only in the system bundle.
AGENT_ENVIRONMENT = {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}


def assert_ready(c: Container) -> None:
    """Active and READY (Type=notify: active/running only after READY=1), idle, as its user."""
    state = c.show(
        UNIT, "ActiveState", "SubState", "StatusText", "Type", "MainPID", "UnitFileState"
    )
    assert state["Type"] == "notify", state
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert state["StatusText"].startswith("idle"), state  # sent with READY=1
    assert state["UnitFileState"] == "enabled", state
    user = c.run(["ps", "-o", "user=", "-p", state["MainPID"]]).stdout.strip()
    assert user == "studio-agent"
    # From an operator's shell (no STATE_DIRECTORY): agent.yaml names the state dir.
    status = c.run(["studio-agent", "status"]).stdout
    assert f"agent pid {state['MainPID']}: idle" in status, status


def assert_layout(c: Container) -> None:
    """What the package created: user and groups, private certs dir, conffile, PATH entry."""
    groups = c.run(["id", "-nG", "studio-agent"]).stdout.split()
    assert "video" in groups, groups  # GPU device nodes; bookworm has no render group by default
    certs = c.run(["stat", "-c", "%U %G %a", CERTS]).stdout.strip()
    assert certs == "studio-agent studio-agent 700"
    conffiles = c.run(["dpkg-query", "-W", "-f=${Conffiles}", "studio-agent"]).stdout
    assert "/etc/studio-agent/agent.yaml" in conffiles
    assert c.run(["sh", "-c", "command -v studio-agent"]).stdout.strip() == "/usr/bin/studio-agent"
    c.run(["studio-agent", "check-config"])


def drop_credential(c: Container, broker: RabbitBroker, name: str) -> None:
    """A RabbitMQ credential in the certs dir, as an operator would put it there."""
    folder = f"{CERTS}/rabbitmq"
    c.run(["install", "-d", "-o", "studio-agent", "-g", "studio-agent", "-m", "0700", folder])
    # Written under a hidden name (the agent ignores those), then renamed into place.
    write = 'umask 077 && cat > "$0/.$1" && chown studio-agent: "$0/.$1" && mv "$0/.$1" "$0/$1"'
    c.run(["sh", "-c", write, folder, name], input=f"{broker.amqp_url}\n{broker.mgmt_url}\n")


def journal_has(c: Container, text: str) -> bool:
    return any(text in str(e.get("MESSAGE", "")) for e in c.journal(UNIT))


def publish(broker: RabbitBroker, s3: S3Server, queue: str, key: str, seconds: float) -> None:
    """Upload the workspace to S3 and publish the request as studioml 0.0.49 does (spec A.1)."""
    with tempfile.TemporaryDirectory() as scratch:
        body = s3_message(s3, key, SCRIPT, [str(seconds)], Path(scratch))
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = connection.channel()
        channel.exchange_declare("StudioML.topic", "topic", durable=True, auto_delete=True)
        channel.queue_declare(queue)
        channel.queue_bind(queue, "StudioML.topic", routing_key=f"StudioML.{queue}")
        channel.confirm_delivery()
        props = pika.BasicProperties(app_id="studioml", content_type="application/json")
        channel.basic_publish("StudioML.topic", f"StudioML.{queue}", body, props, mandatory=True)
    finally:
        connection.close()


def finished(s3: S3Server, key: str) -> bool:
    """The experiment's output is in the bucket and says it ran to its end."""
    try:
        tar = s3.client().get_object(Bucket="agent-tests", Key=f"experiments/{key}/output.tar")
    except Exception:  # not there yet
        return False
    return b"finished" in tar["Body"].read()


def queue_depth(broker: RabbitBroker, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def check_serves_a_credential(c: Container, broker: RabbitBroker, s3: S3Server, queue: str) -> None:
    """A credential dropped into the certs dir subscribes; an experiment on it completes."""
    drop_credential(c, broker, "deploytest")
    publish(broker, s3, queue, f"{queue}-hello", 0)  # declares the queue the agent discovers
    wait_for(lambda: journal_has(c, "credential rabbitmq/deploytest: subscribing"), "subscribe")
    wait_for(lambda: finished(s3, f"{queue}-hello"), "experiment", 180)
    assert queue_depth(broker, queue) == 0  # acknowledged
    log = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert "guest:guest" not in log  # the broker password never reaches the journal


def check_stop_drains(c: Container, broker: RabbitBroker, s3: S3Server, queue: str) -> None:
    """``systemctl stop`` while an experiment runs: the drain ends it and returns its message."""
    key = f"{queue}-long"
    publish(broker, s3, queue, key, 600)
    wait_for(
        lambda: key in c.show(UNIT, "StatusText")["StatusText"], "the experiment to start", 120
    )
    c.run(["systemctl", "stop", UNIT], timeout=300)  # blocks until the agent has exited
    state = c.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, state
    assert journal_has(c, "studio-agent stopping: draining 1 experiment(s)")
    assert journal_has(c, "drain time is up")  # cut at drain_timeout, not finished
    wait_for(lambda: queue_depth(broker, queue) == 1, "the message back in its queue", 30)
    broker.delete_queue(queue)
