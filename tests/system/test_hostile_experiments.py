"""Hostile experiments against the installed .deb under a real systemd (PID 1 of a container).

The package's own postinst makes the slot users and the modes, the shipped unit runs the agent
as studio-agent with its ambient capabilities and a delegated cgroup; an experiment submitted
to its local queue then tries every escape the issue lists, while a second one (its neighbour)
runs beside it. Each escape must fail, the results must still arrive. Memory and task limits
are proven with the agent on the host (tests/integration/test_sandbox.py): systemd inside
systemd-nspawn on this host gets no memory or pids controller to delegate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.deb import studio_agent_deb_fixture  # noqa: F401
from tests.services.nspawn import Container
from tests.system.test_systemd import PROXY_DROPIN, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.integration]

UNIT = "studio-agent.service"
STATE = "/var/lib/studio-agent"
QUEUE = "local_hostile"
CONFIG = f"""\
queue_root: {STATE}/queue
max_concurrent: 2
kill_grace: 2s
metrics_address: ""
pass_env: [SSL_CERT_FILE]
"""
# What an operator leaves around the agent: each is a secret an experiment must not reach.
SECRETS = {
    "/etc/studio-agent/certs/rabbitmq/team": "amqp://team:hunter2@127.0.0.1:1/",
    "/etc/studio-agent/conf.d/50-team.yaml": "slack_room: '#team-secret-room'\n",
    "/etc/default/studio-agent": "AWS_SECRET_ACCESS_KEY=agent-own-secret\n",
}
NEIGHBOUR = """\
import time
time.sleep(45)
"""
HOSTILE = """\
import errno, json, os, sys, time
report = {"uid": os.getuid(), "env": sorted(os.environ)}
status = open("/proc/self/status").read().splitlines()
report["caps"] = {l.split(":")[0]: l.split()[1] for l in status if l.startswith(("Cap", "NoNew"))}
def attempt(name, action):
    try:
        action()
        report[name] = "allowed"
    except OSError as exc:
        report[name] = errno.errorcode[exc.errno]
agent = os.getppid()  # setpriv and sh exec'd into this process: the parent is the agent
neighbours = []
for _ in range(60):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"neighbour.py" in open(f"/proc/{pid}/cmdline", "rb").read():
                neighbours.append(int(pid))
        except OSError:
            pass
    if neighbours:
        break
    time.sleep(0.5)
report["neighbour_found"] = bool(neighbours)
attempt("read_credential", lambda: open("/etc/studio-agent/certs/rabbitmq/team").read())
attempt("list_certs", lambda: os.listdir("/etc/studio-agent/certs"))
attempt("read_config", lambda: open("/etc/studio-agent/agent.yaml").read())
attempt("list_conf_d", lambda: os.listdir("/etc/studio-agent/conf.d"))
attempt("read_conf_d", lambda: open("/etc/studio-agent/conf.d/50-team.yaml").read())
attempt("read_default_env", lambda: open("/etc/default/studio-agent").read())
attempt("list_state", lambda: os.listdir("/var/lib/studio-agent"))
attempt("list_ledger", lambda: os.listdir("/var/lib/studio-agent/ledger"))
attempt("list_queue", lambda: os.listdir("/var/lib/studio-agent/queue"))
attempt("read_status", lambda: open("/var/lib/studio-agent/status.json").read())
attempt("list_work", lambda: os.listdir("/var/lib/studio-agent/work"))
attempt("read_agent_environ", lambda: open(f"/proc/{agent}/environ").read())
attempt("signal_agent", lambda: os.kill(agent, 0))
attempt("signal_neighbour", lambda: os.kill(neighbours[0], 0))
attempt("neighbour_cwd", lambda: os.listdir(f"/proc/{neighbours[0]}/cwd"))
attempt("write_cache", lambda: open("/var/cache/studio-agent/planted", "w"))
attempt("write_venvs", lambda: open("/var/cache/studio-agent/venvs/planted", "w"))
attempt("write_own_env", lambda: open(sys.prefix + "/bin/planted", "w"))
attempt("write_state", lambda: open("/var/lib/studio-agent/planted", "w"))
attempt("write_etc", lambda: open("/etc/studio-agent/planted", "w"))
attempt("write_run_lock", lambda: open("/run/lock/planted", "w"))  # mode 1777 on the host
attempt("write_var_tmp", lambda: open("/var/tmp/planted", "w"))  # PrivateTmp= too
attempt("write_tmp", lambda: open("/tmp/mine", "w"))
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
path = os.path.join(mapping["modeldir"], "report.json")
open(path, "w").write(json.dumps(report))
os.chmod(path, 0)
print("escapes tried", flush=True)
"""


@pytest.fixture(scope="module")
def deployed(nspawn: Container, studio_agent_deb: Path) -> Iterator[Container]:
    """The .deb installed (its postinst: users, modes), the shipped unit started."""
    nspawn.copy_in(studio_agent_deb, "/tmp/studio-agent.deb")
    nspawn.run(["apt-get", "install", "-y", "-q", "/tmp/studio-agent.deb"], timeout=600)
    nspawn.write_file("/etc/studio-agent/agent.yaml", CONFIG, mode="0640")
    nspawn.run(["chgrp", "studio-agent", "/etc/studio-agent/agent.yaml"])
    for path, text in SECRETS.items():
        nspawn.write_file(path, text, mode="0600")
    nspawn.run(["chown", "studio-agent:studio-agent", "/etc/studio-agent/certs/rabbitmq/team"])
    nspawn.run("chown -R studio-agent:studio-agent /etc/studio-agent/certs")
    nspawn.run(["chgrp", "studio-agent", "/etc/studio-agent/conf.d/50-team.yaml"])
    nspawn.run(["chmod", "0640", "/etc/studio-agent/conf.d/50-team.yaml"])
    nspawn.write_file(f"/etc/systemd/system/{UNIT}.d/proxy-ca.conf", PROXY_DROPIN)
    nspawn.write_file("/srv/exp/train.py", HOSTILE)
    nspawn.write_file("/srv/exp/neighbour.py", NEIGHBOUR)
    nspawn.run(["systemctl", "daemon-reload"])
    nspawn.run(["systemctl", "restart", UNIT], timeout=120)
    yield nspawn
    print(nspawn.run(["journalctl", "--no-pager", "-u", UNIT], check=False).stdout[-6000:])


def submit(c: Container, key: str, script: str) -> None:
    c.run(
        [
            "runuser", "-u", "studio-agent", "--", "env", f"STATE_DIRECTORY={STATE}",
            "studio-agent", "submit", "/srv/exp", "--config", "/etc/studio-agent/agent.yaml",
            "--queue", QUEUE, "--key", key, "--script", script,
        ]
    )  # fmt: skip


def result(c: Container, key: str, label: str, member: str) -> str:
    tar = f"{STATE}/storage/artifacts/experiments/{key}/{label}.tar"
    return c.run(["tar", "-xOf", tar, member]).stdout


def test_the_package_makes_slot_users_and_keeps_its_config_from_them(deployed: Container) -> None:
    slots = deployed.run("getent passwd | grep -c '^studio-slot[0-9]*:'").stdout.strip()
    assert int(slots) == 16
    modes = deployed.run(
        ["stat", "-c", "%n %a %U:%G", "/etc/studio-agent/conf.d", STATE, "/var/cache/studio-agent"]
    ).stdout.split("\n")
    assert modes[:3] == [
        "/etc/studio-agent/conf.d 750 root:studio-agent",
        f"{STATE} 711 studio-agent:studio-agent",
        "/var/cache/studio-agent 711 studio-agent:studio-agent",
    ]
    said = deployed.run(["journalctl", "--no-pager", "-u", UNIT, "-g", "experiment isolation"])
    line = said.stdout.strip().splitlines()[-1]  # said once per start: the latest start's
    assert "experiment isolation:" in line
    for enforced in ("identity (", "tree ("):  # what systemd in this container gives
        assert enforced not in line, line


def test_a_hostile_experiment_under_systemd_reaches_nothing_and_its_results_arrive(
    deployed: Container,
) -> None:
    key = f"hostile-{time.monotonic_ns()}"
    submit(deployed, f"neighbour-{key}", "neighbour.py")
    submit(deployed, key, "train.py")
    tar = f"{STATE}/storage/artifacts/experiments/{key}/modeldir.tar"
    wait_for(deployed, lambda: deployed.run(["test", "-s", tar], check=False).returncode == 0,
             "the hostile experiment's results", timeout=240)  # fmt: skip
    report = json.loads(result(deployed, key, "modeldir", "report.json"))
    slot_uids = deployed.run("getent passwd | awk -F: '/^studio-slot/ {print $3}'").stdout.split()
    agent_uid = deployed.run(["id", "-u", "studio-agent"]).stdout.strip()
    assert str(report["uid"]) in slot_uids
    assert str(report["uid"]) != agent_uid
    assert report["caps"]["CapEff"] == report["caps"]["CapAmb"] == "0000000000000000"
    assert report["caps"]["NoNewPrivs"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in report["env"]
    assert report["neighbour_found"]
    refused = [
        "read_credential",
        "list_certs",
        "read_config",
        "list_conf_d",
        "read_conf_d",
        "read_default_env",
        "list_state",
        "list_ledger",
        "list_queue",
        "read_status",
        "list_work",
        "read_agent_environ",
        "neighbour_cwd",
        "write_cache",
        "write_venvs",
        "write_own_env",
        "write_state",
    ]
    assert {k: report[k] for k in refused} == dict.fromkeys(refused, "EACCES"), report
    assert report["signal_agent"] == report["signal_neighbour"] == "EPERM"
    assert report["write_etc"] == "EACCES"
    assert report["write_run_lock"] == "EACCES"  # world-writable on the host; not in the unit
    assert report["write_tmp"] == "allowed"  # the unit's PrivateTmp=, not the host's /tmp
    assert report["write_var_tmp"] == "allowed"  # likewise private to the unit
    status = json.loads(deployed.run(["cat", f"{STATE}/status.json"]).stdout)
    assert status["protections"]["identity"] == ""
