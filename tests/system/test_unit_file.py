"""The shipped unit file passes ``systemd-analyze verify`` without a single warning.

``verify`` exits 0 on unknown keys and only warns (infra.md section 6), so any output fails. It
runs against a throwaway root holding the host's systemd units and stubs for the binaries the
unit names, so that it needs neither PID 1 systemd nor the agent installed.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

UNIT = Path(__file__).resolve().parents[2] / "packaging/studio-agent.service"
HOST_UNITS = Path("/lib/systemd/system")


def verify(root: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify --root=root`` of ``unit_text`` installed as studio-agent."""
    target = root / "etc/systemd/system/studio-agent.service"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/studio-agent.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if not shutil.which("systemd-analyze") or not HOST_UNITS.is_dir():
        pytest.fail("systemd-analyze and the systemd units are missing: apt-get install systemd")
    shutil.copytree(HOST_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "usr/bin").mkdir()
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "lib").symlink_to("usr/lib")
    for stub in ("studio-agent", "kill"):  # ExecStart= and ExecReload= must be executables
        path = tmp_path / "usr/bin" / stub
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return tmp_path


def test_the_unit_file_verifies_without_any_output(root: Path) -> None:
    result = verify(root, UNIT.read_text())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_check_catches_an_unknown_key(root: Path) -> None:
    """What the test above relies on: verify exits 0 on a typo but says so on stderr."""
    result = verify(root, UNIT.read_text().replace("\nRestartSec=", "\nRestartSecc="))
    assert "Unknown key 'RestartSecc'" in result.stderr


def test_the_check_catches_a_missing_executable(root: Path) -> None:
    (root / "usr/bin/studio-agent").unlink()
    result = verify(root, UNIT.read_text())
    assert result.returncode != 0
    assert "/usr/bin/studio-agent" in result.stderr
