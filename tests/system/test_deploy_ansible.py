"""``ansible-playbook deploy-runner.yml`` against a booted bookworm (systemd as PID 1).

The playbook reaches the container through our nsenter connection plugin
(ansible/connection_plugins/nsenter_pid.py), installs the .deb built from this checkout, and
configures the agent from role variables. Then, from inside: the unit is active and READY,
check-config passes, a RabbitMQ credential makes it serve, an experiment completes, a second run
changes nothing, credentials from variables land with the right owner and mode and never in
Ansible's output, and ``systemctl stop`` drains. The tests run in order on one deployment.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services.deb import studio_agent_deb_fixture, with_version  # noqa: F401
from tests.services.nspawn import Container
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server
from tests.system import deploy

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_BIN = REPO / ".cache" / "ansible" / "bin"
QUEUE = "rmq_deploy_ansible"
DRAIN = 5.0
_RECAP = re.compile(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


@dataclass
class Run:
    ok: int
    changed: int
    failed: int
    seconds: float
    output: str


def base_vars(deb: Path) -> dict[str, Any]:
    return {
        "studio_agent_deb": str(deb),
        "studio_agent_config": deploy.agent_settings(QUEUE, DRAIN),
        "studio_agent_environment": dict(deploy.AGENT_ENVIRONMENT),
    }


def playbook(container: Container, workdir: Path, variables: dict[str, Any]) -> Run:
    """Run deploy-runner.yml against the container; fail with Ansible's output if it fails."""
    if not (ANSIBLE_BIN / "ansible-playbook").exists():
        pytest.fail(f"{ANSIBLE_BIN}/ansible-playbook is missing: run `make deploy-tools`")
    inventory = workdir / "inventory"
    inventory.write_text(
        "[studio_agents]\n"
        f"deploytest ansible_connection=nsenter_pid ansible_nsenter_pid={container.leader}"
        " ansible_become=false\n"  # nsenter already enters as root; the image has no sudo
    )
    extra = workdir / "vars.yml"
    extra.write_text(yaml.safe_dump(variables))
    env = {
        **os.environ,
        "PATH": f"{ANSIBLE_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(workdir / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
    }
    command = [str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(inventory), "-e", f"@{extra}"]
    started = time.monotonic()
    proc = subprocess.run(
        [*command, str(REPO / "deploy-runner.yml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    recap = _RECAP.search(output)
    if proc.returncode != 0 or recap is None:
        pytest.fail(f"ansible-playbook exited {proc.returncode}:\n{output[-8000:]}")
    ok, changed, _, failed = map(int, recap.groups())
    print(f"ansible-playbook: {seconds:.1f} s, ok={ok} changed={changed}")
    return Run(ok, changed, failed, seconds, output)


@pytest.fixture(scope="module")
def deployed(
    nspawn: Container, studio_agent_deb: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Container, Path, Run]:
    workdir = tmp_path_factory.mktemp("ansible")
    first = playbook(nspawn, workdir, base_vars(studio_agent_deb))
    return nspawn, workdir, first


def test_first_run_installs_configures_and_starts(deployed: tuple[Container, Path, Run]) -> None:
    c, _, first = deployed
    assert first.changed > 0
    assert first.failed == 0
    deploy.assert_ready(c)
    deploy.assert_layout(c)
    dropin = "/etc/studio-agent/conf.d/50-ansible.yaml"
    assert c.run(["stat", "-c", "%U %G %a", dropin]).stdout.strip() == "root studio-agent 640"
    effective = yaml.safe_load(c.run(["studio-agent", "check-config"]).stdout)
    assert effective["queue_match"] == f"^{QUEUE}$"
    assert effective["drain_timeout"] == DRAIN
    env = c.show(deploy.UNIT, "Environment")["Environment"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in env
    # The package's unit is untouched: the role only adds drop-ins.
    fragment = c.show(deploy.UNIT, "FragmentPath")["FragmentPath"]
    assert fragment == "/lib/systemd/system/studio-agent.service"


def test_a_dropped_credential_serves_its_queue(
    deployed: tuple[Container, Path, Run], rabbitmq: RabbitBroker, s3_server: S3Server
) -> None:
    c, _, _ = deployed
    deploy.check_serves_a_credential(c, rabbitmq, s3_server, QUEUE)


def test_second_run_changes_nothing(
    deployed: tuple[Container, Path, Run], studio_agent_deb: Path
) -> None:
    c, workdir, _ = deployed
    again = playbook(c, workdir, base_vars(studio_agent_deb))
    assert (again.changed, again.failed) == (0, 0), again.output[-4000:]
    deploy.assert_ready(c)


def test_credentials_from_variables(
    deployed: tuple[Container, Path, Run], studio_agent_deb: Path, rabbitmq: RabbitBroker
) -> None:
    c, workdir, _ = deployed
    secret = f"{rabbitmq.amqp_url}\n{rabbitmq.mgmt_url}\n"
    variables = base_vars(studio_agent_deb)
    variables["studio_agent_credentials"] = [{"path": "rabbitmq/fromvars", "content": secret}]
    run = playbook(c, workdir, variables)
    assert run.changed >= 1
    assert "guest:guest" not in run.output  # no_log: the secret never reaches Ansible's output
    path = f"{deploy.CERTS}/rabbitmq/fromvars"
    assert c.run(["stat", "-c", "%U %G %a", path]).stdout.strip() == "studio-agent studio-agent 600"
    deploy.wait_for(
        lambda: deploy.journal_has(c, "credential rabbitmq/fromvars: subscribing"), "subscribe"
    )
    variables["studio_agent_credentials"] = [{"path": "rabbitmq/fromvars", "state": "absent"}]
    playbook(c, workdir, variables)
    assert c.run(["test", "-e", path], check=False).returncode == 1


def test_upgrade_drains_then_restarts_and_keeps_config_and_certs(
    deployed: tuple[Container, Path, Run],
    studio_agent_deb: Path,
    rabbitmq: RabbitBroker,
    s3_server: S3Server,
) -> None:
    c, workdir, _ = deployed
    newer = with_version(studio_agent_deb, "0.1.0+systest1", workdir)
    # An operator's edit of the conffile, and a credential: both must survive.
    c.run(["sed", "-i", "s/^# log_level: info/log_level: debug/", "/etc/studio-agent/agent.yaml"])
    c.run(["systemctl", "restart", deploy.UNIT])
    certs_before = c.run(["find", deploy.CERTS, "-printf", "%P %u %m\\n"]).stdout
    # Runs for 600 s the first time, far longer than the playbook takes to reach the upgrade:
    # the upgrade's stop finds it running, cuts it at drain_timeout and returns its message,
    # and the new version runs it again (a second run ends at once, see deploy.SCRIPT).
    key = f"{QUEUE}-upgrade"
    deploy.publish(rabbitmq, s3_server, QUEUE, key, 600)
    running = lambda: key in c.show(deploy.UNIT, "StatusText")["StatusText"]  # noqa: E731
    deploy.wait_for(running, "the experiment to start", 120)
    variables = base_vars(studio_agent_deb)
    variables["studio_agent_deb"] = str(newer)
    run = playbook(c, workdir, variables)
    assert run.changed >= 1
    version = c.run(["dpkg-query", "-W", "-f=${Version}", "studio-agent"]).stdout
    assert version == "0.1.0+systest1"
    deploy.assert_ready(c)
    assert "log_level: debug" in c.run(["cat", "/etc/studio-agent/agent.yaml"]).stdout
    assert c.run(["find", deploy.CERTS, "-printf", "%P %u %m\\n"]).stdout == certs_before
    assert deploy.journal_has(c, "studio-agent stopping: draining 1 experiment(s)")
    assert deploy.journal_has(c, "drain time is up")
    deploy.wait_for(lambda: deploy.finished(s3_server, key), "re-run", 180)


def test_stop_drains(
    deployed: tuple[Container, Path, Run], rabbitmq: RabbitBroker, s3_server: S3Server
) -> None:
    c, _, _ = deployed
    deploy.check_stop_drains(c, rabbitmq, s3_server, QUEUE)


def test_purge_removes_what_the_package_created(deployed: tuple[Container, Path, Run]) -> None:
    c, _, _ = deployed
    c.run(["apt-get", "purge", "-y", "-q", "studio-agent"], timeout=300)
    assert c.run(["getent", "passwd", "studio-agent"], check=False).returncode == 2
    assert c.run(["getent", "group", "studio-agent"], check=False).returncode == 2
    for gone in deploy.PACKAGE_PATHS:
        assert c.run(["test", "-e", gone], check=False).returncode == 1, gone
    # What the role wrote outside the package's paths is the role's to remove.
    assert (
        c.run(["test", "-e", "/etc/systemd/system/studio-agent.service.d"], check=False).returncode
        == 0
    )
