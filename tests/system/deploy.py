"""What a deployed runner must do, whoever deployed it (Ansible or Salt): shared checks.

Each check runs inside a booted container (tests/services/nspawn.py) where the .deb has been
installed and the service started. Experiments are published to the session's private RabbitMQ
broker (on the host's 127.0.0.1, which the container shares) the way the studioml client does,
from inside the container as the agent's user, with local storage under the agent's
StateDirectory (the only place ProtectSystem=strict lets the service write).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pika

from tests.conftest import wait_until
from tests.services.nspawn import Container
from tests.services.rabbitmq import RabbitBroker

UNIT = "studio-agent.service"
STATE = "/var/lib/studio-agent"
STORAGE = f"{STATE}/storage"
CERTS = "/etc/studio-agent/certs"
WORKSPACE = "/srv/deploy-test"
VENV_PYTHON = "/opt/venvs/studio-agent/bin/python"
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
# Prints, then runs for argv[1] seconds.
SCRIPT = """\
import sys, time
print("deployed runner says hello", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    time.sleep(0.2)
"""
# Prepares the experiment in local storage and publishes it as studioml 0.0.49 does (spec A.1).
PUBLISH = f"""\
import json, sys
from pathlib import Path
import pika
from agent.submit import Submission, prepare
url, queue, key, seconds = sys.argv[1:5]
sub = Submission(Path("{WORKSPACE}"), "train.py", [seconds], queue, Path("{STATE}/queue"),
                 Path("{STORAGE}"), key=key)
body = json.dumps(prepare(sub)).encode()
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.exchange_declare("StudioML.topic", "topic", durable=True, auto_delete=True)
channel.queue_declare(queue)
channel.queue_bind(queue, "StudioML.topic", routing_key="StudioML." + queue)
channel.confirm_delivery()
props = pika.BasicProperties(app_id="studioml", content_type="application/json")
channel.basic_publish("StudioML.topic", "StudioML." + queue, body, props, mandatory=True)
connection.close()
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


def publish(c: Container, broker: RabbitBroker, queue: str, key: str, seconds: float) -> None:
    c.run(["install", "-d", "-m", "0755", WORKSPACE])
    c.write_file(f"{WORKSPACE}/train.py", SCRIPT)
    c.run(
        ["runuser", "-u", "studio-agent", "--", VENV_PYTHON, "-c", PUBLISH,
         broker.amqp_url, queue, key, str(seconds)]
    )  # fmt: skip


def experiment_status(c: Container, key: str) -> str:
    record = c.run(["cat", f"{STORAGE}/meta/experiments/{key}"], check=False)
    return str(json.loads(record.stdout).get("status")) if record.returncode == 0 else ""


def queue_depth(broker: RabbitBroker, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def check_serves_a_credential(c: Container, broker: RabbitBroker, queue: str) -> None:
    """A credential dropped into the certs dir subscribes; an experiment on it completes."""
    drop_credential(c, broker, "deploytest")
    publish(c, broker, queue, f"{queue}-hello", 0)  # declares the queue the agent discovers
    wait_for(lambda: journal_has(c, "credential rabbitmq/deploytest: subscribing"), "subscribe")
    wait_for(lambda: experiment_status(c, f"{queue}-hello") == "finished", "experiment", 180)
    assert queue_depth(broker, queue) == 0  # acknowledged
    log = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert "guest:guest" not in log  # the broker password never reaches the journal


def check_stop_drains(c: Container, broker: RabbitBroker, queue: str, drain_timeout: float) -> None:
    """``systemctl stop`` while an experiment runs: the drain ends it and returns its message."""
    key = f"{queue}-long"
    publish(c, broker, queue, key, 600)
    wait_for(
        lambda: key in c.show(UNIT, "StatusText")["StatusText"], "the experiment to start", 120
    )
    started = time.monotonic()
    c.run(["systemctl", "stop", UNIT], timeout=300)  # blocks until the agent has exited
    took = time.monotonic() - started
    state = c.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, state
    assert took >= drain_timeout, took
    assert journal_has(c, "studio-agent stopping: draining 1 experiment(s)")
    wait_for(lambda: queue_depth(broker, queue) == 1, "the message back in its queue", 30)
    broker.delete_queue(queue)
