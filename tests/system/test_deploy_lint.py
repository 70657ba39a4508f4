"""The deploy artefacts pass their linters: lintian (the .deb), ansible-lint's production
profile (role and playbook), salt-lint (the state). ``make lint-deploy`` runs the same tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.services.deb import studio_agent_deb_fixture  # noqa: F401

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".cache"
PATH = f"{TOOLS}/ansible/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tool(path: Path) -> str:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make deploy-tools`")
    return str(path)


def test_lintian_reports_no_errors(studio_agent_deb: Path) -> None:
    # Overrides, each with its reason: debian/studio-agent.lintian-overrides.
    proc = subprocess.run(
        ["lintian", "--fail-on", "error", "--tag-display-limit", "0", str(studio_agent_deb)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": PATH, "LANG": "C.UTF-8"},
    )
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("E:")]
    assert proc.returncode == 0, "\n".join(errors[:40]) or proc.stderr[-3000:]


def test_ansible_lint_production_profile() -> None:
    lint = tool(TOOLS / "ansible" / "bin" / "ansible-lint")
    proc = subprocess.run(
        [lint, "--profile", "production", "--nocolor", "deploy-runner.yml", "roles/studio_agent"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": str(TOOLS / "ansible")},
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]


def test_salt_lint() -> None:
    lint = tool(TOOLS / "salt-lint" / "bin" / "salt-lint")
    states = sorted(str(p.relative_to(REPO)) for p in (REPO / "salt").rglob("*.sls"))
    proc = subprocess.run([lint, *states], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr
