"""``salt-call state.apply studio_agent`` inside a booted bookworm (systemd as PID 1).

Salt runs masterless in the container (on the host its service states would pass without doing
anything: no systemd there). Salt itself is pip-installed once into /opt/salt and cached as a
tarball beside the rootfs (it needs gcc and python3-dev to build, about 60 s). The checks are
those of the Ansible test: READY, check-config, a credential serves, an experiment completes,
a second apply changes nothing, credentials from pillar, ``systemctl stop`` drains; then
``studio_agent.clean`` purges what the package created.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services.deb import studio_agent_deb_fixture  # noqa: F401
from tests.services.nspawn import Container, cache_dir
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server
from tests.system import deploy

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
SALT_VERSION = "3008.3"
SALT_BUILD_DEPS = ["gcc", "libc6-dev", "python3-dev"]  # timelib has no wheel
QUEUE = "rmq_deploy_salt"
DRAIN = 5.0
DEB_ON_MINION = "/var/cache/studio-agent-deploy/studio-agent.deb"
MINION = """\
file_client: local
file_roots: {base: [/srv/salt]}
pillar_roots: {base: [/srv/pillar]}
"""


@dataclass
class Apply:
    changed: list[str]
    failed: list[str]
    seconds: float
    output: str


def base_pillar() -> dict[str, Any]:
    return {
        "deb": DEB_ON_MINION,
        "config": {"settings": deploy.agent_settings(QUEUE, DRAIN)},
        "environment": dict(deploy.AGENT_ENVIRONMENT),
    }


def install_salt(c: Container) -> None:
    """/opt/salt from the cached tarball, building (and caching) it first when missing."""
    tarball = cache_dir() / f"salt-{SALT_VERSION}-venv.tar"
    with open(cache_dir() / f"salt-{SALT_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tarball.exists():
            started = time.monotonic()
            c.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *SALT_BUILD_DEPS],
                  timeout=600)  # fmt: skip
            c.run(["python3", "-m", "venv", "/opt/salt"])
            pip = ["/opt/salt/bin/pip", "install", "-q", "--disable-pip-version-check"]
            c.run([*pip, f"salt=={SALT_VERSION}"], timeout=900)
            partial = tarball.with_suffix(".partial")
            pack = ["tar", "-C", str(c.root / "opt"), "-cf", str(partial), "salt"]
            subprocess.run(pack, check=True)
            partial.rename(tarball)  # atomic: a half-written tarball is never used
            print(f"salt {SALT_VERSION} installed and cached in {time.monotonic() - started:.0f} s")
            return
    subprocess.run(["tar", "-C", str(c.root / "opt"), "-xf", str(tarball)], check=True)


def write_pillar(c: Container, pillar: dict[str, Any]) -> None:
    c.write_file("/srv/pillar/top.sls", "base:\n  '*':\n    - studio_agent\n")
    c.write_file("/srv/pillar/studio_agent.sls", yaml.safe_dump({"studio_agent": pillar}), "0600")


def salt_apply(c: Container, sls: str, pillar: dict[str, Any]) -> Apply:
    write_pillar(c, pillar)
    started = time.monotonic()
    proc = c.run(
        ["/opt/salt/bin/salt-call", "--local", "--out=json", "--retcode-passthrough",
         "-l", "quiet", "state.apply", sls],
        check=False,
        timeout=600,
    )  # fmt: skip
    seconds = time.monotonic() - started
    try:
        states: dict[str, dict[str, Any]] = json.loads(proc.stdout)["local"]
    except (ValueError, KeyError, TypeError):
        pytest.fail(f"salt-call exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr}")
    if not isinstance(states, dict):
        pytest.fail(f"salt-call rendering failed: {states}")
    changed = [name for name, s in states.items() if s.get("changes")]
    failed = [f"{name}: {s.get('comment')}" for name, s in states.items() if s["result"] is False]
    print(f"salt-call state.apply {sls}: {seconds:.1f} s, changed={len(changed)}/{len(states)}")
    for name in changed:
        print(f"  changed: {name.split('_|-')[1]}")
    return Apply(changed, failed, seconds, proc.stdout)


@pytest.fixture(scope="module")
def minion(nspawn: Container, studio_agent_deb: Path) -> Container:
    install_salt(nspawn)
    nspawn.write_file("/etc/salt/minion", MINION)
    nspawn.copy_in(REPO / "salt" / "studio_agent", "/srv/salt/studio_agent")
    # The formula links the repository's install-apptainer.sh; put the script itself there.
    script = "/srv/salt/studio_agent/files/install-apptainer.sh"
    nspawn.run(["rm", "-f", script])
    nspawn.copy_in(REPO / "scripts" / "install-apptainer.sh", script)
    nspawn.copy_in(studio_agent_deb, DEB_ON_MINION)
    return nspawn


@pytest.fixture(scope="module")
def applied(minion: Container) -> tuple[Container, Apply]:
    return minion, salt_apply(minion, "studio_agent", base_pillar())


def test_first_apply_installs_configures_and_starts(applied: tuple[Container, Apply]) -> None:
    c, first = applied
    assert first.failed == []
    assert first.changed
    deploy.assert_ready(c)
    deploy.assert_layout(c)
    dropin = "/etc/studio-agent/conf.d/50-salt.yaml"
    assert c.run(["stat", "-c", "%U %G %a", dropin]).stdout.strip() == "root studio-agent 640"
    effective = yaml.safe_load(c.run(["studio-agent", "check-config"]).stdout)
    assert effective["queue_match"] == f"^{QUEUE}$"
    env = c.show(deploy.UNIT, "Environment")["Environment"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in env


def test_a_dropped_credential_serves_its_queue(
    applied: tuple[Container, Apply], rabbitmq: RabbitBroker, s3_server: S3Server
) -> None:
    c, _ = applied
    deploy.check_serves_a_credential(c, rabbitmq, s3_server, QUEUE)


def test_second_apply_changes_nothing(applied: tuple[Container, Apply]) -> None:
    c, _ = applied
    again = salt_apply(c, "studio_agent", base_pillar())
    assert again.failed == []
    assert again.changed == []
    deploy.assert_ready(c)


def test_a_bad_setting_is_refused_before_it_is_written(applied: tuple[Container, Apply]) -> None:
    c, _ = applied
    pillar = base_pillar()
    pillar["config"]["settings"]["no_such_setting"] = 1
    bad = salt_apply(c, "studio_agent", pillar)
    assert any("no_such_setting" in f or "check_cmd" in f for f in bad.failed), bad.failed
    text = c.run(["cat", "/etc/studio-agent/conf.d/50-salt.yaml"]).stdout
    assert "no_such_setting" not in text
    deploy.assert_ready(c)  # the running agent was not disturbed


def test_credentials_from_pillar(applied: tuple[Container, Apply], rabbitmq: RabbitBroker) -> None:
    c, _ = applied
    pillar = base_pillar()
    pillar["credentials"] = {"rabbitmq/frompillar": f"{rabbitmq.amqp_url}\n{rabbitmq.mgmt_url}\n"}
    run = salt_apply(c, "studio_agent", pillar)
    assert run.failed == []
    assert "guest:guest" not in run.output  # show_changes off: the secret is not in the report
    path = f"{deploy.CERTS}/rabbitmq/frompillar"
    assert c.run(["stat", "-c", "%U %G %a", path]).stdout.strip() == "studio-agent studio-agent 600"
    deploy.wait_for(
        lambda: deploy.journal_has(c, "credential rabbitmq/frompillar: subscribing"), "subscribe"
    )
    pillar["credentials"] = {"rabbitmq/frompillar": None}
    assert salt_apply(c, "studio_agent", pillar).failed == []
    assert c.run(["test", "-e", path], check=False).returncode == 1


def test_stop_drains(
    applied: tuple[Container, Apply], rabbitmq: RabbitBroker, s3_server: S3Server
) -> None:
    c, _ = applied
    deploy.check_stop_drains(c, rabbitmq, s3_server, QUEUE)


def test_clean_removes_everything(applied: tuple[Container, Apply]) -> None:
    c, _ = applied
    cleaned = salt_apply(c, "studio_agent.clean", base_pillar())
    assert cleaned.failed == []
    assert c.run(["dpkg-query", "-W", "studio-agent"], check=False).returncode != 0
    assert c.run(["getent", "passwd", "studio-agent"], check=False).returncode == 2
    for gone in (*deploy.PACKAGE_PATHS, "/etc/systemd/system/studio-agent.service.d/50-salt.conf"):
        assert c.run(["test", "-e", gone], check=False).returncode == 1, gone
