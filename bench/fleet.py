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
from pathlib import Path

import fleet_support as fs
from fleet_report import BASELINE, CURRENT, KINDS, Results, Samples, header, report
from fleet_support import Agent

BROKERS = ("rabbitmq", "sqs", "pubsub")
SETTLE = 2.0  # after a drain, how long a late duplicate has to show up
STARTED = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.0f} s] {text}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    options: argparse.Namespace
    root: Path
    services: fs.Services
    messages: fs.Messages
    codes: dict[str, Path]  # version -> the code its agents run (on PYTHONPATH)
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
            config = fs.agent_config(bench.services, home, cache, bench.options.slots, store)
            agents.append(fs.start_agent(home, config, bench.codes[version]))
        fs.wait_all(agents, lambda agent: "studio-agent ready" in agent.text(), "ready line")
        yield agents
    finally:
        fs.stop_all(agents)
        shutil.rmtree(root, ignore_errors=True)
        fs.purge(bench.services, bench.queues)


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
                fs.land(bench.services, agent.certs, kind)
    for kind in kinds:
        if kind != "local":
            last = fs.served_name(kind, bench.queues[kind][-1])
            fs.wait_all(agents, serving(last), f"'serving ... {last}'")
    time.sleep(bench.options.warmup)


def unsubscribe(bench: Bench, agents: list[Agent], kinds: Sequence[str]) -> None:
    offsets = {id(agent): agent.log.stat().st_size for agent in agents}
    for kind in kinds:
        for agent in agents:
            fs.withdraw(agent.certs, kind)
    for kind in kinds:
        fs.wait_all(agents, closed(kind, offsets), f"'{kind} backend closed'")


# -- idle --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    at: float
    agents: int  # CPU ticks of the whole fleet
    polls: int
    packets: dict[str, int]  # per connection
    requests: int  # moto's log lines
    services: dict[str, int]  # CPU ticks


def snapshot(services: fs.Services, agents: list[Agent]) -> Snapshot:
    polls, packets = fs.rabbit_counters(services.broker)
    ticks = sum(fs.proc_ticks(agent.proc.pid) for agent in agents)
    requests = fs.moto_requests(services.moto_log)
    return Snapshot(time.monotonic(), ticks, polls, packets, requests, fs.service_ticks(services))


def idle_window(bench: Bench, agents: list[Agent]) -> dict[str, float]:
    """One window: per-agent CPU, RSS and broker requests; each service's CPU."""
    before = snapshot(bench.services, agents)
    time.sleep(bench.options.window)
    after = snapshot(bench.services, agents)
    seconds, count = after.at - before.at, len(agents)
    packets = sum(n - before.packets[c] for c, n in after.packets.items() if c in before.packets)
    values = {
        "cpu": 100 * (after.agents - before.agents) / fs.TICKS / seconds / count,
        "rss": statistics.mean(fs.rss_mib(agent.proc.pid) for agent in agents),
        "polls": (after.polls - before.polls) / seconds / count,
        "packets": packets / seconds / count,
        "sqs": (after.requests - before.requests) / seconds * 60 / count / bench.options.queues,
    }
    for name, ticks in after.services.items():
        values[name] = 100 * (ticks - before.services[name]) / fs.TICKS / seconds
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
    return not any(a.held() for a in agents) and not fs.queued(
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
        fs.send(bench.services, kind, queue, body)
    return lines, sent


def drain(bench: Bench, agents: list[Agent], kind: str, tag: str, count: int) -> dict[str, float]:
    """``count`` experiments at once: drain time, pickups, CPU per experiment, runs counted."""
    before = snapshot(bench.services, agents)
    lines, sent = enqueue_all(bench, kind, tag, count)
    if not wait_drained(bench, agents, kind, lines, set(sent)):
        progress(f"  {tag}: not drained in time")
    seconds = time.time() - min(sent.values())
    after = snapshot(bench.services, agents)
    broker = before.services["broker_cpu"], after.services["broker_cpu"]
    time.sleep(SETTLE)
    starts = read_starts(lines)
    pickups = [1000 * (min(starts[k]) - t) for k, t in sent.items() if k in starts] or [0.0]
    return {
        "drain": seconds,
        "agent_cpu": 1000 * (after.agents - before.agents) / fs.TICKS / count,
        "broker_cpu": 1000 * (broker[1] - broker[0]) / fs.TICKS / count,
        "p50": statistics.median(pickups),
        "p99": statistics.quantiles(pickups, n=100, method="inclusive")[98],
        "duplicates": sum(len(times) - 1 for key, times in starts.items() if key in sent),
        "lost": sum(1 for key in sent if key not in starts),
    }


def trickle(bench: Bench, agents: list[Agent], kind: str, tag: str) -> dict[str, float]:
    """Experiments one at a time onto the idle fleet: pickup with a free slot."""
    sent: dict[str, float] = {}
    started: dict[str, float] = {}
    for index in range(bench.options.trickle):
        time.sleep(random.uniform(0.1, 0.3))  # off any poll's rhythm
        lines, one = enqueue_all(bench, kind, f"{tag}-{index:03d}", 1)
        if not wait_drained(bench, agents, kind, lines, set(one)):
            raise RuntimeError(f"{tag}-{index:03d}: not run within a minute")
        sent |= one
        started |= {key: times[0] for key, times in read_starts(lines).items()}
    logged = fs.starting_times(agents)
    return {
        "free": statistics.median(1000 * (started[k] - t) for k, t in sent.items()),
        "taken": statistics.median(1000 * (logged[k] - t) for k, t in sent.items() if k in logged),
    }


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


def measure_fleet(bench: Bench, version: str, count: int, samples: Samples) -> None:
    """Idle with RabbitMQ only, idle with every kind, then busy; ``samples`` fills as it goes."""
    progress(f"{version}: {count} agent(s)")
    with fleet(bench, version, count) as agents:
        subscribe(bench, agents, ["rabbitmq"])
        samples |= measure_idle(bench, agents, "rmq")
        subscribe(bench, agents, ["local", "sqs", "pubsub"])
        samples |= measure_idle(bench, agents, "all")
        unsubscribe(bench, agents, [k for k in ("sqs", "pubsub") if k not in bench.options.busy])
        for kind in bench.options.busy:
            tag = f"{version.replace(' ', '')}-{count}-{kind}"
            samples |= measure_busy(bench, agents, kind, tag)


# -- command line ------------------------------------------------------------------------------


def add_worktree(root: Path, revision: str, stack: ExitStack) -> Path:
    """The baseline's code: a detached worktree, removed on the way out."""
    git = ["git", "-C", str(fs.ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "-q", str(root), revision], check=True)
    stack.callback(subprocess.run, [*git, "prune"], check=False)
    stack.callback(subprocess.run, [*git, "remove", "--force", str(root)], check=False)
    return root


def versions(options: argparse.Namespace) -> str:
    def describe(*args: str) -> str:
        git = ["git", "-C", str(fs.ROOT), *args]
        return subprocess.run(git, capture_output=True, text=True).stdout.strip() or "?"

    ours = f"this tree: {describe('describe', '--always', '--dirty=+changes')}"
    if options.skip_baseline:
        return f"{ours}, no baseline"
    return f"{ours}, baseline: {describe('rev-parse', '--short', options.baseline)}"


def make_bench(root: Path, options: argparse.Namespace, stack: ExitStack) -> Bench:
    # A copy of this tree's agent/, so that edits made while the bench runs do not reach it.
    shutil.copytree(
        fs.ROOT / "agent", root / "current" / "agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    codes = {CURRENT: root / "current"}
    if not options.skip_baseline:
        codes[BASELINE] = add_worktree(root / "baseline", options.baseline, stack)
    progress("starting RabbitMQ, moto and the Pub/Sub emulator")
    services = fs.start_services(root / "services", stack)
    queues = {kind: fs.queue_names(kind, options.queues) for kind in ("local", *BROKERS)}
    for kind in BROKERS:
        fs.create_queues(services, kind, queues[kind])
    return Bench(options, root, services, fs.Messages(root), codes, queues)


def counts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of positive counts")
    return values


def positive(text: str) -> int:
    [value] = counts(text)
    return value


def kinds(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or set(chosen) - set(KINDS):
        raise argparse.ArgumentTypeError(f"{text!r}: some of local, rabbitmq, sqs")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--agents", type=counts, default=[1, 10, 30], help="fleet sizes (1,10,30)")
    add("--runs", type=positive, default=3, help="idle windows and busy runs per fleet (3)")
    add("--experiments", type=positive, default=1000, help="experiments per drain (1000)")
    add("--trickle", type=positive, default=20, help="experiments sent one at a time per run (20)")
    add("--busy", type=kinds, default=["local", "rabbitmq"], help="kinds to drain (local,rabbitmq)")
    add("--queues", type=positive, default=50, help="queues per kind (50)")
    add("--slots", type=positive, default=2, help="max_concurrent of each agent (2)")
    add("--window", type=float, default=15.0, help="seconds per idle window (15)")
    add("--warmup", type=float, default=5.0, help="seconds after subscribing, before windows (5)")
    add("--baseline", default="0ecc094", help="revision of the previous queue code (0ecc094)")
    add("--skip-baseline", action="store_true", help="measure this tree only")
    options = parser.parse_args(argv)
    if options.experiments < 2:
        parser.error("--experiments must be at least 2 (for the p99)")
    return options


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: no process is left behind


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    results: Results = {}
    described = versions(options)  # before the copy of agent/ that the agents of this tree run
    try:
        with tempfile.TemporaryDirectory(prefix="studio-agent-fleet-") as tmp, ExitStack() as stack:
            bench = make_bench(Path(tmp), options, stack)
            for count in options.agents:
                for version in bench.codes:
                    measure_fleet(bench, version, count, results.setdefault((version, count), {}))
            progress("stopping the services")
    finally:  # what was measured is printed even when a later fleet failed
        print(f"command: {' '.join(sys.argv)}")
        print(header(options, described))
        print(report(results, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
