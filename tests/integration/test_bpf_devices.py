"""agent.sandbox.bpf_devices against the real kernel: a child cgroup v2 fenced to a few devices.

Stand-in device nodes tell the verdicts apart without any driver: opening a char or block node
whose major has no driver fails with ENXIO (or ENODEV) *after* the device check, while a node
the cgroup's filter denies fails with EPERM *before* it. mknod(2) is checked the same way.
"""

import errno
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sandbox.bpf_devices import MAX_RULES, attach_device_filter, supported

pytestmark = pytest.mark.integration

NVIDIA_MAJOR = 195  # what the NVIDIA driver registers; no driver here, so no such device exists.

# Runs inside (or outside) the fenced cgroup: try each path, print {path: "ok" | errno name}.
# argv: "open" paths... then "mknod" dir:minor pairs (char nodes of NVIDIA_MAJOR).
PROBE = f"""
import errno, json, os, sys
result, mode = {{}}, None
for arg in sys.argv[1:]:
    if arg in ("open", "mknod"):
        mode = arg
        continue
    try:
        if mode == "open":
            os.close(os.open(arg, os.O_RDWR))
        else:
            path, minor = arg.rsplit(":", 1)
            os.mknod(path, 0o600 | 0o020000, os.makedev({NVIDIA_MAJOR}, int(minor)))
        result[arg] = "ok"
    except OSError as error:
        result[arg] = errno.errorcode[error.errno]
print(json.dumps(result))
"""

# "Not EPERM" is the pass mark for an allowed node: the driver's absence is what stops it.
NO_DRIVER = {"ENXIO", "ENODEV"}


def cgroup2_root() -> Path:
    """Where the cgroup2 hierarchy is mounted: /sys/fs/cgroup, or .../unified on hybrid hosts."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1].replace("\\040", " "))
    pytest.fail("no cgroup2 hierarchy is mounted (see /proc/self/mounts)")


def own_cgroup() -> Path:
    """This process's cgroup v2 directory: a child of it is one we may create on any host,
    under systemd (a scope we run in) or in a container (its namespace root)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cgroup2_root() / line[3:].lstrip("/")
    pytest.fail("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A fresh, empty child cgroup with no controllers enabled; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creating cgroups, mknod and loading BPF programs")
    path = own_cgroup() / f"studio-bpf-devices-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        # A probe that outlived a failed assertion would keep the cgroup busy.
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError as error:
                if error.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
        else:
            path.rmdir()


@pytest.fixture
def nodes(tmp_path: Path) -> dict[str, Path]:
    """Stand-in device nodes on a filesystem that honours them (tmp_path: not nodev)."""
    made = {
        "gpu0": (stat.S_IFCHR, NVIDIA_MAJOR, 0),
        "gpu1": (stat.S_IFCHR, NVIDIA_MAJOR, 1),
        "block0": (stat.S_IFBLK, NVIDIA_MAJOR, 0),  # same numbers, other type: must be denied
    }
    paths = {}
    for name, (kind, major, minor) in made.items():
        paths[name] = tmp_path / name
        os.mknod(paths[name], 0o666 | kind, os.makedev(major, minor))
    return paths


def probe(args: list[str], cgroup: Path | None) -> dict[str, str]:
    """Run PROBE as a fresh process, joined to cgroup before it execs when one is given."""
    command = [sys.executable, "-I", "-c", PROBE, *args]
    if cgroup is not None:
        # The shell moves itself in, then execs: the probe is fenced from its first instruction.
        join = 'echo $$ > "$1" && shift && exec "$@"'
        command = ["sh", "-c", join, "sh", str(cgroup / "cgroup.procs"), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"probe failed ({done.returncode}): {done.stderr}"
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_only_the_listed_devices_open_inside_the_cgroup(
    cgroup: Path, nodes: dict[str, Path], tmp_path: Path
) -> None:
    assert supported(), "this root process cannot load a BPF_PROG_TYPE_CGROUP_DEVICE program"
    # Attach before anything joins: no controller is enabled anywhere on the way to cgroup.
    attach_device_filter(cgroup, [("c", 1, 3), ("c", NVIDIA_MAJOR, 0)])
    gpu0, gpu1, block0 = str(nodes["gpu0"]), str(nodes["gpu1"]), str(nodes["block0"])
    made0, made1 = str(tmp_path / "made0") + ":0", str(tmp_path / "made1") + ":1"
    args = ["open", "/dev/null", gpu0, gpu1, block0, "mknod", made0, made1]

    inside = probe(args, cgroup)
    assert inside["/dev/null"] == "ok"
    assert inside[gpu0] in NO_DRIVER, inside  # allowed: reaches the (missing) driver
    assert inside[gpu1] == "EPERM", inside
    assert inside[block0] == "EPERM", inside
    assert inside[made0] == "ok", inside  # mknod is an access like any other
    assert inside[made1] == "EPERM", inside

    # The fence is the cgroup's, not the host's: the same probe outside it meets no filter.
    outside = probe(["open", "/dev/null", gpu0, gpu1, block0], None)
    assert outside["/dev/null"] == "ok"
    for node in (gpu0, gpu1, block0):
        assert outside[node] in NO_DRIVER, outside


def test_none_is_any_minor_and_filters_stack(cgroup: Path, nodes: dict[str, Path]) -> None:
    gpu0, gpu1 = str(nodes["gpu0"]), str(nodes["gpu1"])
    attach_device_filter(cgroup, [("c", 1, 3), ("c", NVIDIA_MAJOR, None)])
    wide = probe(["open", "/dev/null", gpu0, gpu1], cgroup)
    assert wide[gpu0] in NO_DRIVER, wide
    assert wide[gpu1] in NO_DRIVER, wide

    # A second filter adds to the first (BPF_F_ALLOW_MULTI): every one must allow, so it narrows.
    attach_device_filter(cgroup, [("c", 1, 3), ("c", NVIDIA_MAJOR, 1)])
    narrow = probe(["open", "/dev/null", gpu0, gpu1], cgroup)
    assert narrow["/dev/null"] == "ok"
    assert narrow[gpu0] == "EPERM", narrow
    assert narrow[gpu1] in NO_DRIVER, narrow


def test_a_directory_that_is_no_cgroup_is_refused_with_errno(cgroup: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a cgroup v2 directory") as refused:
        attach_device_filter(tmp_path, [("c", 1, 3)])
    assert refused.value.errno == errno.EBADF


@pytest.mark.parametrize(
    "rules",
    [
        [("x", 1, 3)],
        [("c", -1, 3)],
        [("c", 4096, 0)],
        [("c", 1, 1 << 20)],
        [("c", True, 3)],
        [("c", 1)],
        [("c", 1, i % 1000) for i in range(MAX_RULES + 1)],
    ],
)
def test_malformed_rules_are_refused_before_the_kernel_sees_them(rules: list[object]) -> None:
    with pytest.raises(ValueError, match=r"rule|at most"):
        attach_device_filter(Path("/nonexistent"), rules)  # type: ignore[arg-type]
