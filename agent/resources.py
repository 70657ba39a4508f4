"""Admission: does a request fit this machine now, later, or never; and which GPUs it gets.

The rule for GPUs (one rule for every client; see the README section "GPUs and resource
admission"): a request gets ``gpuCount`` whole cards when ``gpuCount > 0``, else ``gpus`` cards,
else one card when only ``gpuMem`` is set, else none. Every card given must be unassigned, have
no ECC failure and at least ``gpuMem`` of memory; among those, the smallest adequate cards
(least memory, then lowest index) are taken, so big cards stay free for big requests. The
StudioML 0.0.49 client means ``gpus`` as a card count, and so does this rule; the Go runner's
slot arithmetic (GO21: ``gpus`` must equal a card's slot count and ``gpuCount`` cards are taken;
GO23: swapped) is not copied, so a GO23-style ``gpuCount`` holding a slot number asks for that
many cards and is refused as never fitting, with both numbers in the reason.

CPU, RAM and disk are soft accounting against what running experiments reserved:
- CPUs: ``max_cores``, or every CPU this process may run on (0 or more than there are);
- RAM: ``max_mem``, or MemTotal from /proc/meminfo (0 or more than that). MemTotal, not
  MemAvailable: the budget is what experiments reserve between them, and a number read once at
  start-up from a moving target would make admission depend on the moment the agent started;
- disk: as the Go runner, ``max_disk`` is the free space to keep on the work_dir volume, at
  least 10 % of the volume; a request fits when its ``hdd`` plus what running experiments
  reserved fits in the free space above that reserve (read at each admission).

Admissions happen on the supervisor thread; releases may come from any thread: one lock.
"""

import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.gpus import Card, Inventory, load_inventory
from agent.queues.base import Delivery, QueueBackend
from agent.request import Resources
from agent.settings import Settings
from agent.settlement import Settlement, give_back

log = logging.getLogger(__name__)

DISK_FLOOR = 0.10  # the Go runner keeps at least this share of the volume free


@dataclass(frozen=True)
class Need:
    cpus: int = 0
    ram: int = 0
    hdd: int = 0
    gpus: int = 0  # whole cards
    gpu_mem: int = 0
    why_gpus: str = ""  # how the card count was read from the request, for reasons

    @classmethod
    def of(cls, resources: Resources) -> "Need":
        gpu_mem = resources.size("gpuMem")
        if resources.gpuCount > 0:
            cards, why = resources.gpuCount, f"gpuCount {resources.gpuCount}"
            if resources.gpus > 0:
                why += f"; gpus {resources.gpus} is not a card count when gpuCount is set"
        elif resources.gpus > 0:
            cards, why = resources.gpus, f"gpus {resources.gpus}"
        else:
            cards, why = (1, "gpuMem alone asks for one card") if gpu_mem else (0, "")
        return cls(
            resources.cpus, resources.size("ram"), resources.size("hdd"), cards, gpu_mem, why
        )


@dataclass
class Grant:
    """What one admitted experiment holds until it is released."""

    key: str
    need: Need
    cards: tuple[Card, ...] = ()
    released: bool = False

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(card.uuid for card in self.cards)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(card.device for card in self.cards if card.device)


@dataclass(frozen=True)
class Verdict:
    grant: Grant | None
    need: Need
    reason: str = ""  # why not, when grant is None
    never: bool = False  # True: this machine can never run it


@dataclass
class Capacity:
    cpus: int
    ram: int
    work_dir: Path
    min_free_disk: int  # max_disk as given (the 10 % floor is applied at each reading)
    disk: Callable[[Path], tuple[int, int]] = field(default=lambda p: _disk_usage(p))

    @classmethod
    def of_machine(cls, max_cores: int, max_mem: int, max_disk: int, work_dir: Path) -> "Capacity":
        cpus = len(os.sched_getaffinity(0))
        ram = _mem_total()
        return cls(
            max_cores if 0 < max_cores < cpus else cpus,
            max_mem if 0 < max_mem < ram else ram,
            work_dir,
            max_disk,
        )

    def disk_room(self) -> tuple[int, int]:
        """(bytes usable above the reserve now, bytes usable above it on an empty volume)."""
        total, free = self.disk(self.work_dir)
        reserve = max(self.min_free_disk, int(total * DISK_FLOOR))
        return free - reserve, total - reserve


def _mem_total() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemTotal")


def _disk_usage(path: Path) -> tuple[int, int]:
    """(total, free to unprivileged users) of the volume holding ``path`` or its nearest parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return usage.total, usage.free


class Admission:
    def __init__(
        self,
        inventory: Inventory,
        capacity: Capacity,
        backoff: float = 30.0,
        never_backoff: float = 600.0,
    ):
        self.inventory = inventory
        self.capacity = capacity
        self.backoff, self.never_backoff = backoff, never_backoff
        self._lock = threading.Lock()
        self._grants: list[Grant] = []
        # Per queue, the last request it could not run: (backend, need, reason, never).
        self._waiting: dict[tuple[int, str], tuple[QueueBackend, Need, str, bool]] = {}

    # -- the supervisor's two calls ------------------------------------------------------------

    def take(
        self, backend: QueueBackend, delivery: Delivery, key: str, res: Resources
    ) -> Grant | Settlement:
        """Reserve what the request needs; or say to give it back and pause its queue for a
        while (much longer when it can never fit), the hand-out excused (agent.ledger)."""
        verdict = self.admit(key, res)
        slot = (id(backend), delivery.queue)
        if verdict.grant is not None:
            with self._lock:
                self._waiting.pop(slot, None)
            return verdict.grant
        with self._lock:
            self._waiting[slot] = (backend, verdict.need, verdict.reason, verdict.never)
        return self._defer(delivery, key, verdict)

    def release(self, grant: Grant | None) -> None:
        """Give back what ``grant`` held (idempotent, any thread), and reopen waiting queues."""
        if grant is None:
            return
        with self._lock:
            if grant.released:
                return
            grant.released = True
            self._grants.remove(grant)
            # A queue's last refused request may fit now: take from it again without waiting
            # out admission_backoff (the Go runner's per-queue Fit cache, the other way round).
            reopen = [
                (slot, backend)
                for slot, (backend, need, _, never) in self._waiting.items()
                if not never and not self._busy(need)
            ]
            for slot, _ in reopen:
                del self._waiting[slot]
        for slot, backend in reopen:
            backend.pause(slot[1], 0.0)

    # -- deciding ----------------------------------------------------------------------------

    def admit(self, key: str, resources: Resources) -> Verdict:
        """Reserve what ``resources`` asks for, or say why not (and whether ever)."""
        need = Need.of(resources)
        never = self._never_fits(need)
        if never:
            return Verdict(None, need, never, never=True)
        with self._lock:
            busy = self._busy(need)
            if busy:
                return Verdict(None, need, busy)
            grant = Grant(key, need, self._pick_cards(need))
            self._grants.append(grant)
        return Verdict(grant, need)

    def _never_fits(self, need: Need) -> str:
        capacity = self.capacity
        if need.cpus > capacity.cpus:
            return f"needs {need.cpus} CPUs; this agent has {capacity.cpus} (max_cores)"
        if need.ram > capacity.ram:
            return f"needs {_gb(need.ram)} of RAM; this agent has {_gb(capacity.ram)} (max_mem)"
        _, at_best = capacity.disk_room()
        if need.hdd > at_best:
            return (
                f"needs {_gb(need.hdd)} of disk; the work_dir volume has {_gb(max(at_best, 0))} "
                "above its reserve (max_disk, at least 10 %)"
            )
        return self._never_fits_gpus(need)

    def _never_fits_gpus(self, need: Need) -> str:
        if not need.gpus:
            return ""
        cards = self.inventory.cards
        if not cards:
            return (
                f"needs {need.gpus} GPU(s) ({need.why_gpus}); no GPU here: {self.inventory.problem}"
            )
        usable = [c for c in cards if not c.ecc_failed and c.memory >= need.gpu_mem]
        if len(usable) < need.gpus:
            mem = f" with at least {_gb(need.gpu_mem)} (gpuMem)" if need.gpu_mem else ""
            return (
                f"needs {need.gpus} GPU(s){mem} ({need.why_gpus}); this machine has "
                f"{len(usable)} such card(s) of {len(cards)} (ECC-failed cards excluded)"
            )
        return ""

    def _busy(self, need: Need) -> str:
        """Why ``need`` does not fit beside the running experiments ("" when it does); locked."""
        held = [g.need for g in self._grants]
        cpus, ram, hdd = (sum(getattr(n, a) for n in held) for a in ("cpus", "ram", "hdd"))
        if cpus + need.cpus > self.capacity.cpus:
            return f"needs {need.cpus} CPUs; {self.capacity.cpus - cpus} free"
        if ram + need.ram > self.capacity.ram:
            return f"needs {_gb(need.ram)} of RAM; {_gb(self.capacity.ram - ram)} free"
        room, _ = self.capacity.disk_room()
        if hdd + need.hdd > room:
            return f"needs {_gb(need.hdd)} of disk; {_gb(max(room - hdd, 0))} free above reserve"
        if len(self._pick_cards(need)) < need.gpus:
            return f"needs {need.gpus} GPU(s) ({need.why_gpus}); not enough are free"
        return ""

    def _pick_cards(self, need: Need) -> tuple[Card, ...]:
        """The smallest adequate free cards (least memory, then lowest index); locked."""
        if not need.gpus:
            return ()
        taken = {card.uuid for grant in self._grants for card in grant.cards}
        fit = [
            c
            for c in self.inventory.cards
            if c.uuid not in taken and not c.ecc_failed and c.memory >= need.gpu_mem
        ]
        fit.sort(key=lambda c: (c.memory, c.index))
        return tuple(fit[: need.gpus]) if len(fit) >= need.gpus else ()

    def _defer(self, delivery: Delivery, key: str, verdict: Verdict) -> Settlement:
        pause = self.never_backoff if verdict.never else self.backoff
        where = f"{delivery.backend}:{delivery.queue}"
        if verdict.never:
            log.error(
                "experiment %s from %s can never run on this machine: %s; returned to its "
                "queue, which is paused for %.0fs",
                key,
                where,
                verdict.reason,
                pause,
            )
        else:
            log.info(
                "experiment %s from %s does not fit now: %s; returned, queue paused for %.0fs",
                key,
                where,
                verdict.reason,
                pause,
            )
        return give_back(pause, verdict.reason, excused=True)

    # -- reporting -----------------------------------------------------------------------------

    def gpus_in_use(self) -> list[str]:
        with self._lock:
            return [uuid for grant in self._grants for uuid in grant.uuids]

    def describe(self) -> dict[str, Any]:
        """For status.json: the cards, who holds what, and which queues wait for room."""
        with self._lock:
            return {
                "gpus": [card.to_json() for card in self.inventory.cards],
                "gpu_problem": self.inventory.problem,
                "capacity": {"cpus": self.capacity.cpus, "ram": self.capacity.ram},
                "assignments": [
                    {"key": g.key, "gpus": list(g.uuids), "cpus": g.need.cpus, "ram": g.need.ram}
                    for g in self._grants
                ],
                "waiting": {
                    queue: ("never fits: " if never else "") + reason
                    for (_, queue), (_, _, reason, never) in self._waiting.items()
                },
            }


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def admission_for(settings: Settings) -> Admission:
    """The agent's admission: its GPUs (read once) and the machine's CPU, RAM and disk."""
    inventory = load_inventory(settings.gpu_inventory_file, settings.cpu_only, os.environ)
    capacity = Capacity.of_machine(
        settings.max_cores, settings.max_mem, settings.max_disk, settings.effective_work_dir
    )
    log.info(
        "admission: %d CPU(s), %s of RAM, %d GPU(s) for experiments",
        capacity.cpus,
        _gb(capacity.ram),
        len(inventory.cards),
    )
    return Admission(inventory, capacity, settings.admission_backoff, settings.never_fit_backoff)
