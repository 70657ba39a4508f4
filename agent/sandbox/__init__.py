"""The sandbox every experiment (and every package build it asks for) runs in.

Two kernel mechanisms, no new ones: a slot identity (agent.sandbox.identity), so file modes,
/proc and kill(2) keep a run away from the agent and its neighbours, and a cgroup per run
(agent.sandbox.cgroups), so memory, tasks, CPU and devices are enforced and the run's whole tree
ends with it. ``Sandbox`` is made once per agent and says which protections this host gives;
``confine`` makes one run's ``Confinement``.
"""

import logging
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.childenv import split_for_privileged
from agent.errors import ConfigError
from agent.sandbox import devices
from agent.sandbox.cgroups import Hierarchy, Limits, RunCgroup
from agent.sandbox.identity import (
    Slot,
    SlotPool,
    chown_tree,
    discover_slots,
    kill_all_of,
    missing_capabilities,
    remove_files_of,
)
from agent.settings import Settings

log = logging.getLogger(__name__)

PROTECTIONS = ("identity", "memory", "tasks", "cpu", "devices", "tree")
# Joins every cgroup of the run, then execs the rest: the experiment's first instruction
# already runs inside them, so nothing it forks can be left outside.
JOIN = 'for f do case $f in --) shift; break;; esac; echo $$ > "$f" || exit 125; shift; done; '
JOIN += 'exec "$@"'
# Writable by every user even under the unit (PrivateTmp= gives the service one /tmp, not one
# per run): what a run leaves there is removed with it, before its slot is reused.
SHARED_SCRATCH = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/dev/mqueue"))
ENV = shutil.which("env", path="/usr/bin:/bin") or "/usr/bin/env"


@dataclass
class Confinement:
    """One run's identity and cgroup; ``close`` ends what is left and frees both."""

    scratch: Path  # the run's private TMPDIR (and HOME, under a slot)
    slot: Slot | None = None
    cgroup: RunCgroup | None = None
    _pool: SlotPool | None = field(default=None, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """What to spawn so that ``argv`` runs inside this confinement."""
        argv = self.slot.command(argv) if self.slot is not None else list(argv)
        if self.cgroup is None or not self.cgroup.procs_files:
            return argv
        files = [str(p) for p in self.cgroup.procs_files]
        return ["/bin/sh", "-c", JOIN, "studio-join", *files, "--", *argv]

    def launch(
        self, argv: Sequence[str], env: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """``command`` and its environment for a child whose environment a request chose.

        The join and setpriv run as the agent, with its capabilities, so the loader's variables
        (LD_PRELOAD and kin) are set only once the child is its slot: by ``env``, after setpriv.
        """
        if self.slot is None:
            return self.command(argv), dict(env)  # no privilege to gain: it is the agent already
        outer, inner = split_for_privileged(env)
        if inner:
            argv = [ENV, "--", *(f"{name}={value}" for name, value in inner.items()), *argv]
        return self.command(argv), outer

    @property
    def home(self) -> Path | None:
        return self.scratch if self.slot is not None else None

    def give(self, path: Path) -> None:
        """Hand ``path`` (a tree the agent made) to the run's identity."""
        if self.slot is not None:
            chown_tree(path, self.slot.uid, self.slot.gid)

    def reclaim(self, path: Path) -> None:
        """Take ``path`` back from the run: the agent's, readable by every run, writable by none.

        The run's processes are ended first, so none can swap an entry for a link meanwhile.
        """
        if self.slot is not None:
            self.settle()
            chown_tree(path, os.getuid(), os.getgid(), readable=True)

    def settle(self, grace: float = 0.0) -> None:
        """End every process the run has started so far (a build's leftovers, a finished run's
        background children)."""
        if self.cgroup is not None:
            self.cgroup.kill(grace)
        elif self.slot is not None:
            kill_all_of(self.slot.uid)

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    def record(self) -> dict[str, object]:
        return {"cgroup": self.cgroup.to_record() if self.cgroup else None}

    def close(self, grace: float = 0.0, owned: Path | None = None) -> None:
        """End the run's processes, give ``owned`` (its run dir) back to the agent, so the next
        run with this slot finds nothing of this one, then free the slot and the cgroup."""
        if self.cgroup is not None:
            try:
                self.cgroup.kill(grace)
                self.cgroup.remove()
            except OSError as exc:  # the slot below still ends every process of the run
                log.error("cgroup of run %s not removed: %s", self.cgroup.run_id, exc)
            self.cgroup = None
        if self.slot is None:
            return
        kill_all_of(self.slot.uid)  # nothing of this run may outlive it, cgroup or not
        remove_files_of(self.slot.uid, SHARED_SCRATCH)  # nor anything it left in shared /tmp
        try:
            if owned is not None and owned.exists():
                chown_tree(owned, os.getuid(), os.getgid())
        except OSError as exc:
            # Kept out of the pool: a slot whose last run's files it still owns is not free.
            log.error("slot %s not reused: taking back %s failed: %s", self.slot.name, owned, exc)
            self.slot = None
            return
        if self._pool is not None:
            self._pool.give_back(self.slot)
        self.slot = None


@dataclass(frozen=True)
class Policy:
    """How a request's resources become kernel limits (settings, frozen at start)."""

    memory_factor: float = 1.25
    memory_floor: int = 256 << 20
    memory_default: int = 0  # when the request names no ram: the agent's max_mem, else none
    max_tasks: int = 4096
    cpu_quota: bool = False
    device_allow: tuple[str, ...] = ()

    def limits(self, ram: int, cpus: int, cards: Sequence[str]) -> Limits:
        memory = max(round(ram * self.memory_factor), self.memory_floor) if ram else 0
        return Limits(
            memory=memory or self.memory_default or None,
            tasks=self.max_tasks or None,
            cpu_weight=float(cpus) or None,
            cpu_quota=float(cpus) if self.cpu_quota and cpus else None,
            devices=devices.rules(cards, self.device_allow),
        )


class Sandbox:
    """What this host lets the agent enforce, and the slots runs take."""

    def __init__(
        self,
        hierarchy: Hierarchy | None = None,
        pool: SlotPool | None = None,
        policy: Policy = Policy(),
        problems: dict[str, str] | None = None,
    ) -> None:
        self.hierarchy = hierarchy
        self.pool = pool
        self.policy = policy
        self.problems = dict(problems or {})

    @classmethod
    def off(cls, why: str = "isolation: off") -> "Sandbox":
        return cls(problems={name: why for name in PROTECTIONS})

    @classmethod
    def from_settings(cls, settings: Settings, enable: bool = True) -> "Sandbox":
        """What this host gives; ``enable`` False only looks (check-config changes nothing)."""
        if settings.isolation == "off":
            return cls.off("isolation is off in the configuration")
        problems: dict[str, str] = {}
        pool = _slot_pool(settings, problems)
        hierarchy = Hierarchy.detect(enable=enable)
        problems.update(hierarchy.problems)
        if not hierarchy.membership:
            problems["tree"] = "no cgroup to hold the run's processes: ended by session instead"
        policy = Policy(
            settings.memory_factor,
            settings.memory_floor,
            settings.max_mem,
            settings.max_tasks,
            settings.cpu_quota,
            tuple(settings.device_allow),
        )
        if settings.isolation == "required" and problems:
            what = "; ".join(f"{name}: {why}" for name, why in problems.items())
            raise ConfigError(f"isolation is required but not available: {what}")
        return cls(hierarchy, pool, policy, problems)

    def protections(self) -> dict[str, str]:
        """Each protection and "" when it is enforced, else why not."""
        return {name: self.problems.get(name, "") for name in PROTECTIONS}

    def describe(self) -> str:
        off = [f"{name} ({why})" for name, why in self.protections().items() if why]
        return "every protection is on" if not off else "not enforced: " + "; ".join(off)

    def confine(
        self, run_id: str, scratch: Path, ram: int, cpus: int, cards: Sequence[str]
    ) -> Confinement:
        """A new run's confinement: its slot, its cgroup with the request's limits."""
        slot = self.pool.take() if self.pool is not None else None
        try:
            group = None
            if self.hierarchy is not None and self.hierarchy.membership:
                limits = self.policy.limits(ram, cpus, cards)
                group = self.hierarchy.create(run_id, limits)
        except BaseException:
            if slot is not None and self.pool is not None:
                self.pool.give_back(slot)
            raise
        return Confinement(scratch, slot, group, self.pool)


def _slot_pool(settings: Settings, problems: dict[str, str]) -> SlotPool | None:
    slots = discover_slots(settings.slot_users)
    lacking = missing_capabilities()
    if not slots:
        problems["identity"] = "no slot users (the package creates studio-slot0..); runs as agent"
    elif lacking:
        problems["identity"] = f"the agent lacks {', '.join(lacking)}; runs as the agent"
    elif unreachable := _unreachable(settings.effective_work_dir):
        problems["identity"] = unreachable
    elif len(slots) < settings.max_concurrent:
        raise ConfigError(
            f"max_concurrent is {settings.max_concurrent} but there are only {len(slots)} slot "
            "users (slot_users, or the studio-slot<N> accounts)"
        )
    else:
        return SlotPool(slots)
    return None


def _unreachable(work_dir: Path) -> str:
    """Why a slot user could not reach its run directory below ``work_dir``; "" if it can."""
    for parent in [*reversed(work_dir.parents)]:
        try:
            mode = parent.stat().st_mode
        except OSError:
            break  # made by the agent later, with the modes it needs
        if not mode & stat.S_IXOTH:
            return f"slot users cannot reach work_dir {work_dir}: {parent} is mode {mode & 0o777:o}"
    return ""
