"""One cgroup per run, on whichever hierarchy the host has: the kernel enforces, the agent asks.

The seam is small on purpose. ``Hierarchy.detect`` finds, for this process, its cgroup2 directory
(the unified hierarchy: pure v2 hosts, and the v1/v2 hybrid's ``unified`` mount) and its
directory in each v1 controller hierarchy. Each controller the agent uses (memory, pids, cpu,
devices) is then taken from v2 when the agent can enable it there, else from v1 when that is
mounted and writable, else it is missing and ``missing`` says why. A run's group is one
directory per hierarchy in use, each named ``studio-exp-<run id>`` below the agent's own.

Membership (what "the experiment's tree" is) needs no controller: a cgroup2 directory, or else
a v1 pids/freezer/memory one, holds every process the experiment forks, whatever it does with
sessions, and ``kill`` ends them all without walking /proc.
"""

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.sandbox import bpf_devices
from agent.sandbox.devices import DeviceRule

CONTROLLERS = ("memory", "pids", "cpu", "devices")
V1_USED = ("memory", "pids", "cpu", "devices", "freezer")
PREFIX = "studio-exp-"
LEAF = "studio-agent"  # where the agent moves itself on v2, to enable controllers for its runs


@dataclass(frozen=True)
class Limits:
    """What the kernel is asked to enforce for one run; None leaves that resource alone."""

    memory: int | None = None  # bytes; over it the run is OOM-killed
    tasks: int | None = None  # processes and threads
    cpu_weight: float | None = None  # CPUs the request asked for: a relative share
    cpu_quota: float | None = None  # CPUs as a hard ceiling
    devices: tuple[DeviceRule, ...] | None = None  # the only devices it may open


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, filesystem type, super options) of every cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            point = fields[4].replace("\\040", " ")
            found.append((point, tail[0], set(tail[2].split(","))))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller (or "" for cgroup2) -> this process's path in that hierarchy."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name.removeprefix("name=")] = path
    return paths


@dataclass
class Hierarchy:
    unified: Path | None = None  # this agent's cgroup2 directory, if it may create below it
    v2: frozenset[str] = frozenset()  # controllers its children get on cgroup2
    v1: dict[str, Path] = field(default_factory=dict)  # controller -> this agent's v1 directory
    problems: dict[str, str] = field(default_factory=dict)  # controller -> why it is missing
    bpf_devices: bool = False  # v2 device fence: a BPF program per run

    @classmethod
    def detect(cls, proc: Path = Path("/proc/self"), enable: bool = True) -> "Hierarchy":
        """What this process may use; ``enable`` False only looks (check-config), changing
        nothing, and reports the v2 controllers it could enable."""
        found = cls()
        own = _own_paths(_read(proc / "cgroup"))
        for point, kind, options in _mounts(_read(proc / "mountinfo")):
            if kind == "cgroup2" and "" in own and found.unified is None:
                found.unified = _usable(Path(point) / own[""].lstrip("/"))
            elif kind == "cgroup":
                for name in options & set(V1_USED):
                    if name in own and name not in found.v1:
                        directory = _usable(Path(point) / own[name].lstrip("/"))
                        if directory is not None:
                            found.v1[name] = directory
        if found.unified is not None:
            found.v2 = _enable_v2(found.unified) if enable else _available_v2(found.unified)
            found.bpf_devices = bpf_devices.supported()
        found.problems = {name: found._why_missing(name) for name in CONTROLLERS}
        found.problems = {name: why for name, why in found.problems.items() if why}
        return found

    def _why_missing(self, name: str) -> str:
        if name in self.v2 or name in self.v1:
            return ""
        if name == "devices" and self.unified is not None and self.bpf_devices:
            return ""
        if self.unified is None and not self.v1:
            return "no writable cgroup hierarchy (outside systemd, or not delegated)"
        return f"no {name} controller this agent may use"

    @property
    def membership(self) -> bool:
        return self.unified is not None or any(c in self.v1 for c in ("pids", "freezer", "memory"))

    def create(self, run_id: str, limits: Limits) -> "RunCgroup":
        """The run's group with ``limits`` written; the caller ``remove``s it."""
        group = RunCgroup(run_id, limits=limits)
        try:
            if self.unified is not None:
                base = self.unified.parent if self.unified.name == LEAF else self.unified
                group.unified = _make(base / f"{PREFIX}{run_id}")
                _write_v2(group.unified, limits, self.v2)
                if limits.devices is not None and "devices" not in self.v1 and self.bpf_devices:
                    bpf_devices.attach_device_filter(group.unified, limits.devices)
            for name, base in self.v1.items():
                if name in self.v2 or (name == "devices" and limits.devices is None):
                    continue
                directory = _make(base / f"{PREFIX}{run_id}")
                group.v1[name] = directory
                _write_v1(name, directory, limits)
        except BaseException:
            group.remove()
            raise
        return group


def _usable(directory: Path) -> Path | None:
    return directory if directory.is_dir() and os.access(directory, os.W_OK) else None


def _available_v2(own: Path) -> frozenset[str]:
    return frozenset(set(_read(own / "cgroup.controllers").split()) & {"memory", "pids", "cpu"})


def _enable_v2(own: Path) -> frozenset[str]:
    """The controllers this agent can hand to its runs on cgroup2.

    A cgroup2 directory cannot both hold processes and give its children controllers, so
    the agent first moves itself into a leaf below its own (systemd's Delegate= expects it).
    """
    available = _available_v2(own)
    if not available:
        return frozenset()
    enabled = set(_read(own / "cgroup.subtree_control").split())
    if available - enabled:
        with contextlib.suppress(OSError):
            if own.name != LEAF and _read(own / "cgroup.procs").strip():
                leaf = _make(own / LEAF)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
            text = " ".join(f"+{name}" for name in sorted(available - enabled))
            (own / "cgroup.subtree_control").write_text(text)
        enabled = set(_read(own / "cgroup.subtree_control").split())
    return frozenset(available & enabled)


def _make(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    return directory


def v2_files(limits: Limits, controllers: Iterable[str]) -> dict[str, str]:
    """What a run's cgroup2 directory gets written, for the controllers it has."""
    have, files = set(controllers), {}
    if "memory" in have and limits.memory is not None:
        # No swap: over its limit the run is OOM-killed (and its whole group with it), not
        # slowed to a crawl; memory.oom.group so no half of a tree survives.
        files.update({"memory.max": str(limits.memory), "memory.swap.max": "0"})
        files["memory.oom.group"] = "1"
    if "pids" in have and limits.tasks is not None:
        files["pids.max"] = str(limits.tasks)
    if "cpu" in have and limits.cpu_weight:
        files["cpu.weight"] = str(min(max(round(100 * limits.cpu_weight), 1), 10000))
    if "cpu" in have and limits.cpu_quota:
        files["cpu.max"] = f"{round(limits.cpu_quota * 100_000)} 100000"
    return files


def v1_files(name: str, limits: Limits) -> list[tuple[str, str]]:
    """What a run's directory in v1 hierarchy ``name`` gets written, in order."""
    if name == "memory" and limits.memory is not None:
        # memsw (memory + swap) after it, as the kernel wants: no swapping past the limit.
        value = str(limits.memory)
        return [("memory.limit_in_bytes", value), ("memory.memsw.limit_in_bytes", value)]
    if name == "pids" and limits.tasks is not None:
        return [("pids.max", str(limits.tasks))]
    if name == "cpu":
        files = []
        if limits.cpu_weight:
            files.append(("cpu.shares", str(max(round(1024 * limits.cpu_weight), 2))))
        if limits.cpu_quota:
            files += [("cpu.cfs_period_us", "100000")]
            files += [("cpu.cfs_quota_us", str(round(limits.cpu_quota * 100_000)))]
        return files
    if name == "devices" and limits.devices is not None:
        return [("devices.deny", "a")] + [("devices.allow", _v1_rule(r)) for r in limits.devices]
    return []


def _v1_rule(rule: DeviceRule) -> str:
    kind, major, minor = rule
    return f"{kind} {'*' if major is None else major}:{'*' if minor is None else minor} rwm"


def _write_v2(directory: Path, limits: Limits, controllers: Iterable[str]) -> None:
    for name, value in v2_files(limits, controllers).items():
        if name == "memory.swap.max" and not (directory / name).exists():
            continue  # a kernel without swap accounting
        (directory / name).write_text(value)


def _write_v1(name: str, directory: Path, limits: Limits) -> None:
    for file, value in v1_files(name, limits):
        if file == "memory.memsw.limit_in_bytes" and not (directory / file).exists():
            continue  # a kernel without swap accounting
        (directory / file).write_text(value)


@dataclass
class RunCgroup:
    """One run's directories; ``procs_files`` are what a new process writes its pid into."""

    run_id: str
    unified: Path | None = None
    v1: dict[str, Path] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)

    @property
    def directories(self) -> list[Path]:
        return ([self.unified] if self.unified else []) + list(self.v1.values())

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.directories]

    def _members_dir(self) -> Path | None:
        if self.unified is not None:
            return self.unified
        for name in ("pids", "freezer", "memory", "cpu", "devices"):
            if name in self.v1:
                return self.v1[name]
        return None

    def pids(self) -> set[int]:
        where = self._members_dir()
        if where is None:
            return set()
        return {int(p) for p in _read(where / "cgroup.procs").split()}

    def signal(self, sig: signal.Signals) -> int:
        reached = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                reached += 1
        return reached

    def kill(self, grace: float) -> None:
        """SIGTERM every member, wait up to ``grace``, then kill what is left until none is."""
        if grace > 0 and self.signal(signal.SIGTERM):
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        while self.pids() and time.monotonic() < deadline:
            self._kill_now()
            time.sleep(0.02)

    def _kill_now(self) -> None:
        if self.unified is not None and (self.unified / "cgroup.kill").exists():
            (self.unified / "cgroup.kill").write_text("1")  # atomic: forks cannot outrun it
            return
        frozen = self._freeze(True)
        try:
            self.signal(signal.SIGKILL)
        finally:
            if frozen:
                self._freeze(False)

    def _freeze(self, on: bool) -> bool:
        with contextlib.suppress(OSError):
            if self.unified is not None and (self.unified / "cgroup.freeze").exists():
                (self.unified / "cgroup.freeze").write_text("1" if on else "0")
                return True
            if "freezer" in self.v1:
                (self.v1["freezer"] / "freezer.state").write_text("FROZEN" if on else "THAWED")
                return True
        return False

    def oom_killed(self) -> bool:
        """Whether the kernel killed a member for going over the memory limit."""
        for events in (
            self.unified / "memory.events" if self.unified else None,
            self.v1["memory"] / "memory.oom_control" if "memory" in self.v1 else None,
        ):
            if events is not None:
                for line in _read(events).splitlines():
                    name, _, value = line.partition(" ")
                    if name == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                        return True
        return False

    def remove(self) -> None:
        """Remove the (empty) directories; a group that cannot be removed yet is left."""
        for directory in self.directories:
            with contextlib.suppress(FileNotFoundError):
                try:
                    directory.rmdir()
                except OSError:
                    time.sleep(0.05)  # the last members are still being reaped
                    with contextlib.suppress(OSError):
                        directory.rmdir()

    def to_record(self) -> dict[str, object]:
        return {
            "unified": str(self.unified) if self.unified else None,
            "v1": {k: str(v) for k, v in self.v1.items()},
        }

    @classmethod
    def from_record(cls, run_id: str, record: object) -> "RunCgroup | None":
        """The group a killed agent recorded, when it names run directories and nothing else."""
        if not isinstance(record, dict):
            return None
        unified, v1 = record.get("unified"), record.get("v1") or {}
        paths = ([unified] if isinstance(unified, str) else []) + list(v1.values())
        if not isinstance(v1, dict) or not all(
            isinstance(p, str) and Path(p).name.startswith(PREFIX) for p in paths
        ):
            return None
        return cls(
            run_id,
            Path(unified) if isinstance(unified, str) else None,
            {str(k): Path(v) for k, v in v1.items()},
        )
