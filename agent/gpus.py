"""The GPUs this agent may hand out: NVML's list of cards, narrowed by the agent's environment.

Two sources meet one narrow protocol (``GpuInventory``): ``NvmlInventory`` asks the NVIDIA
driver through nvidia-ml-py (module ``pynvml``, imported only here), and ``StaticInventory``
reads a JSON description (settings key ``gpu_inventory_file``: for tests and for hosts whose
driver has no NVML). Either way the list is then narrowed by the agent's own
``CUDA_VISIBLE_DEVICES``, or ``NVIDIA_VISIBLE_DEVICES`` when that is unset, as the Go runner does.

A host without a driver is not an error: the inventory is empty, one log line says why, the
agent runs CPU work and refuses GPU requests with that reason (the Go runner refused to start
unless ``cpu-only``; an empty machine serving CPU queues is more useful than one that exits).
"""

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.errors import ConfigError
from agent.units import parse_size

NVML_LIBRARY = "libnvidia-ml.so.1"  # the name pynvml loads (the driver's soname)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Card:
    index: int  # NVML's index: PCI bus order, which CUDA_DEVICE_ORDER=PCI_BUS_ID also uses
    uuid: str  # "GPU-8932f937-..."
    name: str
    memory: int  # total bytes
    ecc_failed: bool = False  # uncorrected ECC errors, or pages waiting to be retired
    device: str = ""  # its node, /dev/nvidia<minor>: the one a run on it may open

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class GpuInventory(Protocol):
    """Where the list of cards comes from."""

    problem: str  # why the list is empty when it should not be ("" when all is well)

    def cards(self) -> list[Card]: ...


class StaticInventory:
    """Cards described in JSON: ``{"cards": [{"index", "uuid", "name", "memory", "ecc_failed"}]}``.

    ``memory`` is bytes or a size such as "16GiB"; a bare list of cards is accepted too.
    """

    def __init__(self, cards: list[Card], source: str = "static"):
        self._cards = list(cards)
        self.source = source
        self.problem = "" if cards else f"{source} lists no card"

    def cards(self) -> list[Card]:
        return list(self._cards)

    @classmethod
    def from_file(cls, path: Path) -> "StaticInventory":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"gpu_inventory_file {path}: cannot read: {exc}") from None
        entries = data.get("cards") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ConfigError(f"gpu_inventory_file {path}: expected a list under 'cards'")
        try:
            cards = [_card_from_json(position, entry) for position, entry in enumerate(entries)]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"gpu_inventory_file {path}: bad card: {exc}") from None
        return cls(cards, f"gpu_inventory_file {path}")


def _card_from_json(position: int, entry: Mapping[str, Any]) -> Card:
    uuid = str(entry["uuid"])
    if not uuid.startswith(("GPU-", "MIG-")):
        raise ValueError(f"card {position}: uuid {uuid!r} must start with GPU-")
    return Card(
        index=int(entry.get("index", position)),
        uuid=uuid,
        name=str(entry.get("name", "GPU")),
        memory=parse_size(entry.get("memory", 0)),
        ecc_failed=bool(entry.get("ecc_failed", False)),
        device=str(entry.get("device") or f"/dev/nvidia{int(entry.get('index', position))}"),
    )


class NvmlInventory:
    """The cards NVML reports, read once (cards do not come and go while the agent runs)."""

    def __init__(self) -> None:
        self.problem = ""
        self._cards: list[Card] | None = None

    def cards(self) -> list[Card]:
        if self._cards is None:
            self._cards = self._query()
        return list(self._cards)

    def _query(self) -> list[Card]:
        if not _driver_library_loads():
            # pynvml would fail the same way, after costing 4 MiB of RSS to import.
            self.problem = f"NVML unavailable ({NVML_LIBRARY} not found): no NVIDIA driver here?"
            return []
        try:
            import pynvml
        except ImportError as exc:  # the package is a dependency; a broken install still runs
            self.problem = f"nvidia-ml-py is not importable: {exc}"
            return []
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.problem = f"NVML unavailable ({exc}): no NVIDIA driver on this host?"
            return []
        try:
            count = pynvml.nvmlDeviceGetCount()
            found = [_nvml_card(pynvml, index) for index in range(count)]
        except pynvml.NVMLError as exc:
            self.problem = f"NVML failed while listing the cards: {exc}"
            return []
        finally:
            pynvml.nvmlShutdown()
        if not found:
            self.problem = "NVML reports no GPU"
        return found


def _driver_library_loads() -> bool:
    """Whether the driver's NVML library can be loaded, as pynvml loads it on Linux."""
    import ctypes

    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return False
    return True


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # old bindings return bytes


def _nvml_card(pynvml: Any, index: int) -> Card:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return Card(
        index=index,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        ecc_failed=_ecc_failed(pynvml, handle),
        device=_device_node(pynvml, handle, index),
    )


def _device_node(pynvml: Any, handle: Any, index: int) -> str:
    """The card's /dev node: its minor number, which is not always its index."""
    try:
        return f"/dev/nvidia{int(pynvml.nvmlDeviceGetMinorNumber(handle))}"
    except pynvml.NVMLError:
        return f"/dev/nvidia{index}"


def _ecc_failed(pynvml: Any, handle: Any) -> bool:
    """Uncorrected ECC errors since boot, or retired pages awaiting a reboot: do not use it.

    Consumer cards have no ECC (NotSupported): that is not a failure. Any other NVML error
    leaves the card usable, with a warning: a card refused for a failed query would be lost.
    """
    uncorrected = (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
    readings = (
        (pynvml.nvmlDeviceGetTotalEccErrors, (handle, *uncorrected)),
        (pynvml.nvmlDeviceGetRetiredPagesPendingStatus, (handle,)),
    )
    failed = False
    for read, args in readings:
        try:
            failed = failed or int(read(*args)) > 0
        except pynvml.NVMLError_NotSupported:
            pass
        except pynvml.NVMLError as exc:
            log.warning("cannot read the ECC state of a GPU (%s): taken as healthy", exc)
    return failed


# -- which cards the agent's environment lets it manage ------------------------------------------

NONE_WORDS = frozenset({"", "none", "void", "nodevfiles"})


def visibility(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The variable that narrows the cards and its value; None when neither is set."""
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if name in environ:
            return name, environ[name]
    return None


def visible_cards(cards: list[Card], environ: Mapping[str, str]) -> list[Card]:
    """The cards ``CUDA_VISIBLE_DEVICES`` (else ``NVIDIA_VISIBLE_DEVICES``) names, in its order.

    ``all`` (or neither set) keeps every card; an empty value, ``none`` or ``void`` keeps none.
    Entries are UUIDs (``GPU-...``, a unique prefix is enough, the ``GPU-`` may be left out) or
    NVML indexes, which work but are warned about: an index means another card once CUDA's
    default ordering or a reboot reorders the bus.
    """
    given = visibility(environ)
    if given is None or given[1].strip().lower() == "all":
        return list(cards)
    name, value = given
    if value.strip().lower() in NONE_WORDS:
        log.info("%s=%r: no GPU is managed by this agent", name, value)
        return []
    chosen: list[Card] = []
    for token in (t.strip() for t in value.split(",")):
        card = _match(cards, token, name)
        if card is not None and card not in chosen:
            chosen.append(card)
    return chosen


def _match(cards: list[Card], token: str, variable: str) -> Card | None:
    if token.isdigit():
        log.warning("%s names GPU %s by index: use its UUID instead", variable, token)
        found = [c for c in cards if c.index == int(token)]
    else:
        prefix = token if token.upper().startswith(("GPU-", "MIG-")) else f"GPU-{token}"
        found = [c for c in cards if c.uuid.lower().startswith(prefix.lower())]
    if len(found) != 1:
        why = "matches no card" if not found else "matches more than one card"
        log.warning("%s entry %r %s: ignored", variable, token, why)
        return None
    return found[0]


@dataclass(frozen=True)
class Inventory:
    """The cards this agent manages, and why there are none when there are none."""

    cards: tuple[Card, ...]
    problem: str = ""


def load_inventory(
    inventory_file: Path | None, cpu_only: bool, environ: Mapping[str, str]
) -> Inventory:
    """Read the cards once at start-up; log one line about what was found."""
    if cpu_only:
        return Inventory((), "cpu_only is set: GPUs are not used")
    source: GpuInventory = (
        StaticInventory.from_file(inventory_file) if inventory_file else NvmlInventory()
    )
    every = source.cards()
    managed = tuple(visible_cards(every, environ))
    if not every:
        log.info("no GPU: %s; running CPU-only work", source.problem)
        return Inventory((), source.problem)
    if not managed:
        name, value = visibility(environ) or ("", "")
        problem = f"{name}={value!r} leaves none of the {len(every)} card(s)"
        log.info("no GPU: %s; running CPU-only work", problem)
        return Inventory((), problem)
    log.info("GPUs: %s", ", ".join(describe_card(card) for card in managed))
    return Inventory(managed)


def describe_card(card: Card) -> str:
    flag = ", ECC FAILED" if card.ecc_failed else ""
    return f"#{card.index} {card.uuid} {card.name} {card.memory / 2**30:.1f} GiB{flag}"
