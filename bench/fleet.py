"""What a fleet of agents costs the queue layer, idle and busy, against the previous queue code.

Starts one private RabbitMQ node, one moto server (SQS) and the Pub/Sub emulator (tests/services),
then, for each fleet size, N real agents (``python -m agent run``, ``max_concurrent`` 2, isolation
off) of this tree and then of ``--baseline`` (a ``git worktree`` on PYTHONPATH), each given every
broker through credential files in its certs dir and serving the same ``--queues`` queues per kind.
For each fleet it measures:

- idle, 50 RabbitMQ queues; then 50 queues of each kind (local, RabbitMQ, SQS, Pub/Sub): each
  agent's CPU (utime + stime from /proc) and RSS, the broker's basic.get calls and received
  packets (management API), the requests in moto's log, and the CPU of each service;
- busy, per kind in ``--busy``: experiments one at a time onto the idle fleet (free slot), then
  ``--experiments`` at once; pickup latency (enqueue -> the experiment's first line), drain time,
  and each experiment's runs counted (duplicates and lost).

Usage: ``python bench/fleet.py [--agents 1,10,30] [--runs 3] [--experiments 1000]
[--baseline 0ecc094 | --skip-baseline]`` (project venv). Progress on stderr, tables on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from fleet_support import (
    ROOT,
    TICKS,
    Agent,
    Messages,
    Services,
    agent_config,
    create_queues,
    land,
    moto_requests,
    proc_ticks,
    purge,
    queue_names,
    queued,
    rabbit_counters,
    rss_mib,
    send,
    served_name,
    service_ticks,
    start_agent,
    start_services,
    starting_times,
    stop_all,
    wait_all,
    withdraw,
)

from agent import __version__

BROKERS = ("rabbitmq", "sqs", "pubsub")
CURRENT, BASELINE = "this tree", "baseline"
SETTLE = 2.0  # after a drain, how long a late duplicate has to show up
TARGET_AGENTS, TARGET_QUEUES = 1000, 10  # the extrapolation
MONTH_MIN = 30 * 24 * 60
SQS_PRICE = 0.40 / 1e6  # dollars per request
Samples = dict[str, list[float]]  # "<phase>.<metric>" -> one value per window or run
STARTED = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.0f} s] {text}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    options: argparse.Namespace
    root: Path
    services: Services
    messages: Messages
    codes: dict[str, Path | None]  # version -> the code its agents run (None: this tree)
    queues: dict[str, list[str]]


# -- the fleet ---------------------------------------------------------------------------------


@contextmanager
def fleet(bench: Bench, version: str, count: int) -> Iterator[list[Agent]]:
    """``count`` agents of ``version``, ready; all stopped, and their traces removed, after."""
    slug = version.replace(" ", "-")
    root, agents = bench.root / f"fleet-{slug}-{count}", []
    try:
        for index in range(count):
            home = root / f"agent{index:02d}"
            home.mkdir(parents=True)
            cache, store = bench.root / f"cache-{slug}", bench.messages.store
            config = agent_config(bench.services, home, cache, bench.options.slots, store)
            agents.append(start_agent(home, config, bench.codes[version]))
        wait_all(agents, lambda agent: "studio-agent ready" in agent.text(), "ready line")
        yield agents
    finally:
        stop_all(agents)
        shutil.rmtree(root, ignore_errors=True)
        purge(bench.services, bench.queues)


def serving(queue: str) -> Callable[[Agent], bool]:
    def done(agent: Agent) -> bool:
        return any("serving" in line and queue in line for line in agent.text().splitlines())

    return done


def closed(kind: str, offsets: dict[int, int]) -> Callable[[Agent], bool]:
    def done(agent: Agent) -> bool:
        return f"{kind} backend closed" in agent.text(offsets[id(agent)])

    return done


def subscribe(bench: Bench, agents: list[Agent], kinds: Sequence[str]) -> None:
    """Local queue folders appear; credential files land; wait until every agent serves all."""
    for kind in kinds:
        if kind == "local":
            for name in bench.queues["local"]:
                (bench.services.queue_root / name).mkdir(parents=True, exist_ok=True)
        else:
            for agent in agents:
                land(bench.services, agent.certs, kind)
    for kind in kinds:
        if kind != "local":
            last = served_name(kind, bench.queues[kind][-1])
            wait_all(agents, serving(last), f"'serving ... {last}'")
    time.sleep(bench.options.warmup)


def unsubscribe(bench: Bench, agents: list[Agent], kinds: Sequence[str]) -> None:
    offsets = {id(agent): agent.log.stat().st_size for agent in agents}
    for kind in kinds:
        for agent in agents:
            withdraw(agent.certs, kind)
    for kind in kinds:
        wait_all(agents, closed(kind, offsets), f"'{kind} backend closed'")


# -- idle --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    at: float
    agents: int  # CPU ticks of the whole fleet
    polls: int
    packets: dict[str, int]  # per connection
    requests: int  # moto's log lines
    services: dict[str, int]  # CPU ticks


def snapshot(services: Services, agents: list[Agent]) -> Snapshot:
    polls, packets = rabbit_counters(services.broker)
    ticks = sum(proc_ticks(agent.proc.pid) for agent in agents)
    requests = moto_requests(services.moto_log)
    return Snapshot(time.monotonic(), ticks, polls, packets, requests, service_ticks(services))


def idle_window(bench: Bench, agents: list[Agent]) -> dict[str, float]:
    """One window: per-agent CPU, RSS and broker requests; each service's CPU."""
    before = snapshot(bench.services, agents)
    time.sleep(bench.options.window)
    after = snapshot(bench.services, agents)
    seconds, count = after.at - before.at, len(agents)
    packets = sum(n - before.packets[c] for c, n in after.packets.items() if c in before.packets)
    values = {
        "cpu": 100 * (after.agents - before.agents) / TICKS / seconds / count,
        "rss": statistics.mean(rss_mib(agent.proc.pid) for agent in agents),
        "polls": (after.polls - before.polls) / seconds / count,
        "packets": packets / seconds / count,
        "sqs": (after.requests - before.requests) / seconds * 60 / count / bench.options.queues,
    }
    for name, ticks in after.services.items():
        values[name] = 100 * (ticks - before.services[name]) / TICKS / seconds
    return values


def measure_idle(bench: Bench, agents: list[Agent], phase: str) -> Samples:
    samples: Samples = defaultdict(list)
    for _ in range(bench.options.runs):
        for name, value in idle_window(bench, agents).items():
            samples[f"{phase}.{name}"].append(value)
    progress(f"  idle {phase}: CPU {statistics.median(samples[f'{phase}.cpu']):.2f} % per agent")
    return samples


# -- busy --------------------------------------------------------------------------------------


def read_starts(lines: Path) -> dict[str, list[float]]:
    """Experiment key -> the start time of each of its runs, from the shared file."""
    starts: dict[str, list[float]] = defaultdict(list)
    if lines.exists():
        for line in lines.read_text().splitlines():
            key, _, stamp = line.partition(" ")
            starts[key].append(float(stamp))
    return starts


def check_alive(agents: list[Agent]) -> None:
    for agent in agents:
        if agent.proc.poll() is not None:
            raise RuntimeError(f"{agent.root}: the agent exited with {agent.proc.returncode}")


def settled(bench: Bench, agents: list[Agent], kind: str) -> bool:
    return not any(a.held() for a in agents) and not queued(
        bench.services, kind, bench.queues[kind]
    )


def wait_drained(bench: Bench, agents: list[Agent], kind: str, lines: Path, keys: set[str]) -> bool:
    """Until every key has run and no message is queued or held; False after the time limit."""
    deadline = time.monotonic() + 60 + len(keys)
    while time.monotonic() < deadline:
        check_alive(agents)
        if keys <= read_starts(lines).keys() and settled(bench, agents, kind):
            return True
        time.sleep(0.05)
    return False


def enqueue_all(bench: Bench, kind: str, tag: str, count: int) -> tuple[Path, dict[str, float]]:
    """Build ``count`` messages, then send them round-robin over the queues; key -> sent at."""
    lines, queues = bench.root / "lines" / f"{tag}.txt", bench.queues[kind]
    lines.parent.mkdir(exist_ok=True)
    keys = [(f"{tag}-{i:05d}", queues[i % len(queues)]) for i in range(count)]
    bodies = [bench.messages.body(key, lines, queue) for key, queue in keys]
    sent = {}
    for (key, queue), body in zip(keys, bodies, strict=True):
        sent[key] = time.time()
        send(bench.services, kind, queue, body)
    return lines, sent


def drain(bench: Bench, agents: list[Agent], kind: str, tag: str, count: int) -> dict[str, float]:
    lines, sent = enqueue_all(bench, kind, tag, count)
    if not wait_drained(bench, agents, kind, lines, set(sent)):
        progress(f"  {tag}: not drained in time")
    seconds = time.time() - min(sent.values())
    time.sleep(SETTLE)
    starts = read_starts(lines)
    pickups = [1000 * (min(starts[k]) - t) for k, t in sent.items() if k in starts] or [0.0]
    return {
        "drain": seconds,
        "p50": statistics.median(pickups),
        "p99": statistics.quantiles(pickups, n=100, method="inclusive")[98],
        "duplicates": sum(len(times) - 1 for key, times in starts.items() if key in sent),
        "lost": sum(1 for key in sent if key not in starts),
    }


def trickle(bench: Bench, agents: list[Agent], kind: str, tag: str) -> dict[str, float]:
    """Experiments one at a time onto the idle fleet: pickup with a free slot."""
    free, taken = [], []
    for index in range(bench.options.trickle):
        time.sleep(random.uniform(0.1, 0.3))  # off any poll's rhythm
        lines, sent = enqueue_all(bench, kind, f"{tag}-{index:03d}", 1)
        [(key, at)] = sent.items()
        if not wait_drained(bench, agents, kind, lines, {key}):
            raise RuntimeError(f"{key}: not run within a minute")
        free.append(1000 * (read_starts(lines)[key][0] - at))
        taken.append(1000 * (starting_times(agents)[key] - at))
    return {"free": statistics.median(free), "taken": statistics.median(taken)}


def measure_busy(bench: Bench, agents: list[Agent], kind: str, tag: str) -> Samples:
    samples: Samples = defaultdict(list)
    drain(bench, agents, kind, f"{tag}-warm", 2 * len(agents))  # env cache, first imports
    for run in range(bench.options.runs):
        found = trickle(bench, agents, kind, f"{tag}-t{run}")
        found |= drain(bench, agents, kind, f"{tag}-d{run}", bench.options.experiments)
        for name, value in found.items():
            samples[f"{kind}.{name}"].append(value)
        progress(f"  busy {kind} run {run + 1}: drained in {found['drain']:.1f} s")
    return samples


def measure_fleet(bench: Bench, version: str, count: int) -> Samples:
    progress(f"{version}: {count} agent(s)")
    samples: Samples = {}
    with fleet(bench, version, count) as agents:
        subscribe(bench, agents, ["rabbitmq"])
        samples |= measure_idle(bench, agents, "rmq")
        subscribe(bench, agents, ["local", "sqs", "pubsub"])
        samples |= measure_idle(bench, agents, "all")
        unsubscribe(bench, agents, [k for k in ("sqs", "pubsub") if k not in bench.options.busy])
        for kind in bench.options.busy:
            tag = f"{version.replace(' ', '')}-{count}-{kind}"
            samples |= measure_busy(bench, agents, kind, tag)
    return samples


# -- reporting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str  # "<phase>.<metric>"
    label: str
    unit: str
    goal: str = ""
    meets: Callable[[float], bool] | None = None


IDLE = (
    ("idle, 50 RabbitMQ queues per agent", "rmq"),
    ("idle, 50 queues per agent of each kind: local, RabbitMQ, SQS, Pub/Sub", "all"),
)


def idle_rows(phase: str) -> list[Row]:
    rows = [
        Row(f"{phase}.cpu", "agent CPU, per agent", "% core"),
        Row(f"{phase}.rss", "agent RSS, per agent", "MiB"),
        Row(f"{phase}.polls", "RabbitMQ basic.get, per agent", "/s"),
        Row(f"{phase}.packets", "RabbitMQ packets in at the broker, per agent", "/s"),
        Row(f"{phase}.broker_cpu", "RabbitMQ node CPU (whole node)", "% core"),
    ]
    if phase == "rmq":
        rows[0] = Row("rmq.cpu", rows[0].label, rows[0].unit, "<= 0.5", lambda v: v <= 0.5)
        rows[2] = Row("rmq.polls", rows[2].label, "/s", "0, heartbeats only", lambda v: v == 0)
    else:
        rows += [
            Row(
                "all.sqs", "SQS requests at moto, per idle queue", "/min", "<= 3", lambda v: v <= 3
            ),
            Row("all.moto_cpu", "moto CPU (SQS)", "% core"),
            Row("all.emulator_cpu", "Pub/Sub emulator CPU (it logs no requests)", "% core"),
        ]
    return rows


def busy_rows(kind: str, experiments: int) -> list[Row]:
    free = Row(f"{kind}.free", "one at a time: enqueue -> experiment start", "ms p50")
    if kind in ("local", "rabbitmq"):
        free = Row(free.key, free.label, free.unit, "<= 20", lambda v: v <= 20)
    return [
        free,
        Row(f"{kind}.taken", "  of which enqueue -> 'starting' logged", "ms p50"),
        Row(f"{kind}.drain", f"{experiments} at once: drain time", "s"),
        Row(f"{kind}.p50", "  pickup (enqueue -> experiment start)", "ms p50"),
        Row(f"{kind}.p99", "  pickup (enqueue -> experiment start)", "ms p99"),
        Row(
            f"{kind}.duplicates", "  duplicates (runs beyond the first)", "", "0", lambda v: v == 0
        ),
        Row(f"{kind}.lost", "  lost (never run)", "", "0", lambda v: v == 0),
    ]


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def figure(samples: Samples | None, key: str) -> float | None:
    values = (samples or {}).get(key)
    return statistics.median(values) if values else None


def line(label: str, unit: str, ours: float | None, base: float | None, goal: str = "") -> str:
    ratio = f"{ours / base:.2f}x" if ours is not None and base else "-"
    return f"{label:<52} {unit:<7} {fmt(ours):>11} {fmt(base):>11} {ratio:>8}  {goal}".rstrip()


def section(results: dict[tuple[str, int], Samples], title: str, rows: list[Row]) -> list[str]:
    out = [title]
    for count in sorted({count for _, count in results}):
        ours, base = results.get((CURRENT, count)), results.get((BASELINE, count))
        for index, row in enumerate(rows):
            value = figure(ours, row.key)
            verdict = ""
            if row.meets is not None and value is not None:
                verdict = f"{row.goal}: {'pass' if row.meets(value) else 'FAIL'}"
            name = f"  {count:>2} agent(s)  " if index == 0 else " " * 16
            out.append(line(name + row.label, row.unit, value, figure(base, row.key), verdict))
    return out


def extrapolate(samples: Samples | None, queues: int) -> list[float | None]:
    """1,000 agents x 10 queues: polls scale with queues, other packets with agents."""
    polls, packets, sqs = (figure(samples, k) for k in ("rmq.polls", "rmq.packets", "all.sqs"))
    pairs = TARGET_AGENTS * TARGET_QUEUES
    rmq = polls / queues * pairs if polls is not None else None
    frames = (packets - polls) * TARGET_AGENTS + rmq if packets is not None and rmq else rmq
    month = sqs * pairs * MONTH_MIN if sqs is not None else None
    return [rmq, frames, month / 1e6 if month else month, month * SQS_PRICE if month else month]


def extrapolation(results: dict[tuple[str, int], Samples], queues: int) -> list[str]:
    out = [f"extrapolated to {TARGET_AGENTS:,} agents x {TARGET_QUEUES} queues of each kind"]
    labels = (
        ("RabbitMQ basic.get at the broker", "/s"),
        ("RabbitMQ packets in at the broker", "/s"),
        ("SQS requests (30-day month)", "M/month"),
        ("SQS cost at $0.40 per million requests", "$/month"),
    )
    for count in sorted({count for _, count in results}):
        ours = extrapolate(results.get((CURRENT, count)), queues)
        base = extrapolate(results.get((BASELINE, count)), queues)
        for index, (label, unit) in enumerate(labels):
            name = f"  from {count:>2} agent(s)  " if index == 0 else " " * 20
            out.append(line(name + label, unit, ours[index], base[index]))
    return out


def report(results: dict[tuple[str, int], Samples], options: argparse.Namespace) -> str:
    head = f"{'':<52} {'unit':<7} {CURRENT:>11} {BASELINE:>11} {'ratio':>8}  goal"
    lines = [head]
    for title, phase in IDLE:
        lines += section(results, title, idle_rows(phase))
    for kind in options.busy:
        title = f"busy, {kind} queues ({options.trickle} one at a time, then {options.experiments})"
        lines += section(results, title, busy_rows(kind, options.experiments))
    lines += extrapolation(results, options.queues)
    return "\n".join(lines)


def header(options: argparse.Namespace, baseline: str) -> str:
    return (
        f"studio-agent {__version__}: Python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} CPUs, {platform.platform()}; {date.today()}\n"
        f"fleets of {options.agents} agent(s), max_concurrent {options.slots}, "
        f"{options.queues} queues per kind; idle: {options.runs} windows of {options.window:g} s "
        f"after {options.warmup:g} s; busy: {options.runs} runs; medians. baseline: {baseline}\n"
        "RabbitMQ figures from its management API (basic.get counters, connections' recv_cnt); "
        "SQS: request lines in moto's log; Pub/Sub: the emulator's CPU only."
    )


# -- command line ------------------------------------------------------------------------------


def add_worktree(root: Path, revision: str, stack: ExitStack) -> Path:
    """The baseline's code: a detached worktree, removed on the way out."""
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "-q", str(root), revision], check=True)
    stack.callback(subprocess.run, [*git, "prune"], check=False)
    stack.callback(subprocess.run, [*git, "remove", "--force", str(root)], check=False)
    return root


def make_bench(root: Path, options: argparse.Namespace, stack: ExitStack) -> Bench:
    codes: dict[str, Path | None] = {CURRENT: None}
    if not options.skip_baseline:
        codes[BASELINE] = add_worktree(root / "baseline", options.baseline, stack)
    progress("starting RabbitMQ, moto and the Pub/Sub emulator")
    services = start_services(root / "services", stack)
    queues = {kind: queue_names(kind, options.queues) for kind in ("local", *BROKERS)}
    for kind in BROKERS:
        create_queues(services, kind, queues[kind])
    return Bench(options, root, services, Messages(root), codes, queues)


def sizes(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of positive counts")
    return values


def kinds(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or set(chosen) - {"local", "rabbitmq", "sqs"}:
        raise argparse.ArgumentTypeError(f"{text!r}: some of local, rabbitmq, sqs")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--agents", type=sizes, default=[1, 10, 30], help="fleet sizes (1,10,30)")
    add("--runs", type=int, default=3, help="idle windows and busy runs per fleet (3)")
    add("--experiments", type=int, default=1000, help="experiments per drain (1000)")
    add("--trickle", type=int, default=20, help="experiments sent one at a time per run (20)")
    add("--busy", type=kinds, default=["local", "rabbitmq"], help="kinds to drain (local,rabbitmq)")
    add("--queues", type=int, default=50, help="queues per kind (50)")
    add("--slots", type=int, default=2, help="max_concurrent of each agent (2)")
    add("--window", type=float, default=15.0, help="seconds per idle window (15)")
    add("--warmup", type=float, default=5.0, help="seconds after subscribing, before windows (5)")
    add("--baseline", default="0ecc094", help="revision of the previous queue code (0ecc094)")
    add("--skip-baseline", action="store_true", help="measure this tree only")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: no process is left behind


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    results: dict[tuple[str, int], Samples] = {}
    with tempfile.TemporaryDirectory(prefix="studio-agent-fleet-") as tmp, ExitStack() as stack:
        bench = make_bench(Path(tmp), options, stack)
        for count in options.agents:
            for version in bench.codes:
                results[version, count] = measure_fleet(bench, version, count)
        progress("stopping the services")
    baseline = "skipped" if options.skip_baseline else options.baseline
    print(header(options, baseline))
    print(report(results, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
