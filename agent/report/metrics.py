"""Prometheus metrics on ``metrics_address`` (``/metrics``), on a registry of their own.

The Go runner's names are kept where they apply (dashboards built for it keep working). Its
counters are exposed under their exact Go names, without the ``_total`` suffix the Python client
adds, as untyped samples (PromQL's ``rate()`` does not care). ``runner_project_completed`` drops
Go's ``experiment`` label: one series per experiment grows without bound; the journal has the
per-experiment record. ``runner_project_running`` keeps it, since its series are removed when the
experiment ends. The ``studio_agent_*`` metrics are new, with the client's usual naming.

Code elsewhere reports through the module's ``record_*`` functions, which do nothing until
``enable`` is called, so the queue, cache and transfer code needs no metrics object passed in.
"""

import functools
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ParamSpec, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.errors import ConfigError
from agent.report.events import Event
from agent.report.metrics_http import MetricsServer

log = logging.getLogger(__name__)
P = ParamSpec("P")

DURATION_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
QUEUE_LABELS = ("host", "queue_type", "queue_name")
PROJECT_LABELS = (*QUEUE_LABELS, "project")


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or ``:port`` for all (IPv4) interfaces as the Go runner.

    Port 0 picks a free port (the log line says which).
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"metrics_address: {address!r} is not host:port (e.g. 127.0.0.1:9090)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Capacity(Protocol):
    def disk_room(self) -> tuple[int, int]: ...


class _Admission(Protocol):
    """What is read from ``agent.resources.Admission`` (not imported: it imports the queues)."""

    @property
    def capacity(self) -> _Capacity: ...

    def describe(self) -> dict[str, Any]: ...


class Resources:
    """Free capacity for the ``runner_resource_*`` gauges, read at each scrape: what admission
    has not granted (CPUs, RAM, GPUs) and the disk above its reserve. Without an admission (tests),
    the machine's own numbers."""

    def __init__(self, work_dir: Path, admission: _Admission | None = None):
        self.work_dir = work_dir
        self.admission = admission

    def __call__(self) -> Mapping[str, float]:
        if self.admission is None:
            return {
                "cpu_free_slots": len(os.sched_getaffinity(0)),
                "cpu_ram_free_bytes": _mem_available(),
                "disk_free_bytes": _disk_free(self.work_dir),
                "gpu_free_slots": 0,
            }
        state = self.admission.describe()
        granted = state.get("assignments", [])
        capacity = state.get("capacity", {})
        in_use = sum(len(g.get("gpus", [])) for g in granted)
        return {
            "cpu_free_slots": capacity.get("cpus", 0) - sum(g.get("cpus", 0) for g in granted),
            "cpu_ram_free_bytes": capacity.get("ram", 0) - sum(g.get("ram", 0) for g in granted),
            "disk_free_bytes": max(self.admission.capacity.disk_room()[0], 0),
            "gpu_free_slots": len(state.get("gpus", [])) - in_use,
        }


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def _disk_free(path: Path) -> float:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return float(shutil.disk_usage(candidate).free)
    return float("nan")


class _ResourceCollector(Collector):
    def __init__(self, host: str, probe: Callable[[], Mapping[str, float]]):
        self.host, self.probe = host, probe

    def collect(self) -> Iterator[Metric]:
        try:
            free = self.probe()
        except Exception:
            log.exception("metrics: reading free resources failed")
            return
        for name, value in free.items():
            family = GaugeMetricFamily(f"runner_resource_{name}", f"free {name}", labels=["host"])
            family.add_metric([self.host], value)
            yield family


class _QueueCollector(Collector):
    """``studio_agent_queue_served{backend, queue}``: 1 for each queue the agent takes work
    from, 0 while the operator holds it; read at each scrape, so the alert rules can tell a
    backlog that no agent serves (packaging/monitoring)."""

    def __init__(self) -> None:
        self.probe: Callable[[], Iterable[tuple[str, str, bool]]] = list

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "studio_agent_queue_served",
            "queues served (0: held by the operator)",
            labels=["backend", "queue"],
        )
        try:
            for backend, queue, taking in self.probe():
                family.add_metric([backend, queue], 1.0 if taking else 0.0)
        except Exception:
            log.exception("metrics: listing the served queues failed")
        yield family


class _GoNames(Collector):
    """Re-exports counters under their exact Go names (no ``_total``, no ``_created``)."""

    def __init__(self, counters: Iterable[Counter]):
        self.counters = list(counters)

    def collect(self) -> Iterator[Metric]:
        for counter in self.counters:
            for family in counter.collect():
                metric = Metric(family.name, family.documentation, "unknown")
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        metric.add_sample(family.name, sample.labels, sample.value)
                yield metric


class Metrics:
    """The registry, and the event sink that counts experiments."""

    def __init__(self, host: str | None = None, probe: Callable[[], Mapping[str, float]] = dict):
        self.host = host or socket.gethostname()
        self.registry = CollectorRegistry()
        go = self._go_counters()
        self.registry.register(_GoNames(go))
        self.resources = _ResourceCollector(self.host, probe)  # its probe may be replaced later
        self.registry.register(self.resources)
        self.queues = _QueueCollector()  # its probe is set once the supervisor exists
        self.registry.register(self.queues)
        # process_start_time_seconds and friends: the rules count restarts (watchdog included)
        ProcessCollector(registry=self.registry)
        self.running = Gauge(
            "runner_project_running",
            "experiments running now",
            [*PROJECT_LABELS, "experiment"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "studio_agent_experiment_duration_seconds",
            "experiment run time, fetch to final upload",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.experiments = Counter(
            "studio_agent_experiments", "experiments finished", ["outcome"], registry=self.registry
        )
        self.artifact_bytes = Counter(
            "studio_agent_artifact_bytes",
            "artifact payload bytes moved",
            ["direction"],
            registry=self.registry,
        )
        self.artifact_seconds = Counter(
            "studio_agent_artifact_seconds",
            "time spent moving artifacts",
            ["direction"],
            registry=self.registry,
        )
        self.gpu_assigned = Gauge(
            "studio_agent_gpu_assigned",
            "GPUs assigned to running experiments",
            registry=self.registry,
        )
        self._running_labels: dict[str, tuple[tuple[str, ...], int]] = {}
        self._server: MetricsServer | None = None

    def _go_counters(self) -> list[Counter]:
        def counter(name: str, doc: str, labels: Iterable[str]) -> Counter:
            return Counter(name, doc, list(labels), registry=None)

        self.refresh_success = counter(
            "runner_queue_refresh_success", "queue list refreshes", ["host", "project"]
        )
        self.refresh_fail = counter(
            "runner_queue_refresh_fail", "failed queue list refreshes", ["host", "project"]
        )
        self.checked = counter("runner_queue_checked", "queues found and served", QUEUE_LABELS)
        self.ignored = counter("runner_queue_ignored", "queues found and not served", QUEUE_LABELS)
        self.completed = counter("runner_project_completed", "experiments done", PROJECT_LABELS)
        self.cache_hits = counter("runner_cache_hits", "environment cache hits", ["host", "hash"])
        self.cache_misses = counter("runner_cache_misses", "environment builds", ["host", "hash"])
        return [
            self.refresh_success,
            self.refresh_fail,
            self.checked,
            self.ignored,
            self.completed,
            self.cache_hits,
            self.cache_misses,
        ]

    # -- the event sink ---------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        fields = event.fields
        key = fields.get("EXPERIMENT_KEY", "")
        labels = (
            self.host,
            fields.get("BACKEND", ""),
            fields.get("QUEUE", ""),
            fields.get("PROJECT", ""),
        )
        if event.kind == "experiment_started" and key:
            gpus = len([g for g in fields.get("GPU_UUIDS", "").split(",") if g])
            self._running_labels[key] = (labels, gpus)
            self.running.labels(*labels, key).set(1)
            self.gpu_assigned.inc(gpus)
        elif event.kind == "experiment_finished" and key:
            outcome = fields.get("OUTCOME", "unknown")
            self._stop_running(key)
            self.completed.labels(*labels).inc()
            self.experiments.labels(outcome).inc()
            self.duration.labels(outcome).observe(float(fields.get("DURATION_S", "0") or 0))

    def _stop_running(self, key: str) -> None:
        labels, gpus = self._running_labels.pop(key, ((), 0))
        if labels:
            self.running.remove(*labels, key)  # bounded: only running experiments have series
            self.gpu_assigned.dec(gpus)

    # -- serving ----------------------------------------------------------------------------------

    def serve(self, address: str) -> tuple[str, int]:
        """Serve ``/metrics`` on ``address``; ConfigError naming it if it cannot be bound."""
        host, port = parse_address(address)
        try:
            self._server = MetricsServer(host, port, self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics_address {address!r}: cannot listen: {exc}") from None
        bound = self._server.address
        log.info("metrics on http://%s:%d/metrics", *bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


# -- the seam for code that has no metrics object ------------------------------------------------

_enabled: Metrics | None = None


def enable(metrics: Metrics | None) -> None:
    """Route the ``record_*`` calls to ``metrics`` (None: back to no-ops)."""
    global _enabled
    _enabled = metrics


def record_refresh(project: str, ok: bool) -> None:
    if _enabled is not None:
        counter = _enabled.refresh_success if ok else _enabled.refresh_fail
        counter.labels(_enabled.host, project).inc()


def record_queues(queue_type: str, served: Iterable[str], skipped: Iterable[str]) -> None:
    if _enabled is not None:
        for name in served:
            _enabled.checked.labels(_enabled.host, queue_type, name).inc()
        for name in skipped:
            _enabled.ignored.labels(_enabled.host, queue_type, name).inc()


def record_cache(hit: bool, env_hash: str) -> None:
    if _enabled is not None:
        counter = _enabled.cache_hits if hit else _enabled.cache_misses
        counter.labels(_enabled.host, env_hash).inc()


def record_transfer(direction: str, nbytes: int, seconds: float) -> None:
    if _enabled is not None:
        _enabled.artifact_bytes.labels(direction).inc(nbytes)
        _enabled.artifact_seconds.labels(direction).inc(seconds)


def measured(direction: str) -> Callable[[Callable[P, int]], Callable[P, int]]:
    """Decorate a transfer returning its byte count: bytes and seconds are recorded."""

    def wrap(function: Callable[P, int]) -> Callable[P, int]:
        @functools.wraps(function)
        def timed(*args: P.args, **kwargs: P.kwargs) -> int:
            began = time.monotonic()
            moved = function(*args, **kwargs)
            record_transfer(direction, moved, time.monotonic() - began)
            return moved

        return timed

    return wrap
