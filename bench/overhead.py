"""How much time studio-agent adds around a trivial experiment, and how fast it drains a queue.

Runs a real agent (``python -m agent run``) on a local queue in a temporary directory and
measures, with a warm environment cache and the default ``poll_interval``:

- latency, one worker, one experiment at a time: enqueue -> the child's first line, and the
  child's last line -> the acknowledgement (the in-flight message file disappearing);
- throughput: a batch of experiments enqueued at once and drained with 1 and then 2 workers;
- the same batch drained by the studioml 0.0.49 ``studio-local-worker`` (the baseline).

Usage: ``python bench/overhead.py [--runs N] [--experiments N] [--skip-baseline]``
(``make bench`` runs it with the project venv). It prints one table of medians.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from agent import __version__
from agent.queues.local import LOCK_NAME, enqueue
from agent.settings import Settings
from agent.submit import Submission, submit

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(os.environ.get("STUDIOML_CLIENT", ROOT / ".cache" / "studioml-client"))
QUEUE = "local_bench"
TRAIN = 'import time\nprint("start", time.time())\nprint("end", time.time())\n'
POLL = 0.002  # seconds between two looks at the queue and in-flight folders
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
DEFAULT_POLL = Settings.model_fields["poll_interval"].default


# -- layout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue" / QUEUE

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def inflight_dir(self) -> Path:
        return self.state_dir / "inflight" / "local" / QUEUE

    @property
    def storage(self) -> Path:
        return self.root / "store"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    def results(self, key: str) -> Path:
        return self.storage / "artifacts" / "experiments" / key / "output.tar"


def make_layout(root: Path) -> Layout:
    layout = Layout(root)
    layout.workspace.mkdir(parents=True)
    (layout.workspace / "train.py").write_text(TRAIN)
    return layout


def agent_config(layout: Layout, slots: int) -> Path:
    config = {
        "queue_root": str(layout.root / "queue"),
        "state_dir": str(layout.state_dir),
        "cache_dir": str(layout.root / "cache"),
        "max_concurrent": slots,
        "drain_timeout": "30s",
        "update_local_db": True,
    }
    path = layout.root / f"agent-{slots}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- processes ---------------------------------------------------------------------------------


def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (the agent drains and exits), then SIGKILL to the whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} in {log}:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


@contextmanager
def running_agent(layout: Layout, slots: int) -> Iterator[subprocess.Popen[bytes]]:
    """A real agent serving the bench queue; always stopped on the way out."""
    log = layout.root / f"agent-{slots}.log"
    argv = [sys.executable, "-m", "agent", "run", "--config", str(agent_config(layout, slots))]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_line(log, "studio-agent ready", proc, READY_TIMEOUT)
        yield proc
    finally:
        stop(proc)


# -- the agent's side --------------------------------------------------------------------------


def prepare(layout: Layout) -> tuple[str, bytes]:
    """Submit into a staging root that no agent watches; return the key and the message body."""
    staging = layout.root / "staging"
    sub = Submission(layout.workspace, "train.py", [], QUEUE, staging, layout.storage)
    request = submit(sub)
    [message] = [p for p in (staging / QUEUE).iterdir() if p.name != LOCK_NAME]
    body = message.read_bytes()
    message.unlink()
    return request.key, body


def pending(layout: Layout) -> bool:
    """Is a message still queued or in flight? Queue first: a take moves it queue -> in flight."""
    for folder in (layout.queue_dir, layout.inflight_dir):
        if folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir()):
            return True
    return False


def wait_until(done: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Poll ``done`` every POLL seconds; return the wall-clock time it first held."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout:.0f}s")
        time.sleep(POLL)
    return time.time()


def stamps(layout: Layout, key: str) -> dict[str, float]:
    """The ``start`` and ``end`` times the experiment printed, from its uploaded output."""
    with tarfile.open(layout.results(key)) as tar:
        member = tar.extractfile("output")
        text = member.read().decode() if member else ""
    found = dict(
        line.split()[:2] for line in text.splitlines() if line.startswith(("start", "end"))
    )
    if set(found) != {"start", "end"}:
        raise RuntimeError(f"experiment {key} did not run to its end:\n{text}")
    return {name: float(value) for name, value in found.items()}


class Latency(NamedTuple):
    """One experiment's timeline, in seconds."""

    to_start: float  # enqueue -> the child's "start" line
    to_take: float  # enqueue -> the message leaving the queue folder (the agent took it)
    to_ack: float  # the child's "end" line -> the in-flight file gone (acknowledged)
    total: float  # enqueue -> acknowledged


def run_one(layout: Layout, proc: subprocess.Popen[bytes]) -> Latency:
    """Enqueue one experiment on an idle agent and follow it until it is acknowledged."""
    key, body = prepare(layout)
    enqueued = time.time()
    queued = enqueue(layout.root / "queue", QUEUE, body)
    held = layout.inflight_dir / queued.name
    taken = wait_until(lambda: not queued.exists(), proc, 60)
    acked = wait_until(lambda: not held.exists(), proc, 60)
    times = stamps(layout, key)
    return Latency(
        times["start"] - enqueued, taken - enqueued, acked - times["end"], acked - enqueued
    )


def drain_round(layout: Layout, proc: subprocess.Popen[bytes], count: int) -> float:
    """Enqueue ``count`` experiments at once; seconds until every one is acknowledged."""
    prepared = [prepare(layout) for _ in range(count)]
    started = time.perf_counter()
    for _, body in prepared:
        enqueue(layout.root / "queue", QUEUE, body)
    wait_until(lambda: not pending(layout), proc, 30 + 10 * count)
    elapsed = time.perf_counter() - started
    for key, _ in prepared:
        stamps(layout, key)  # each one really ran
    return elapsed


# -- the studioml 0.0.49 worker ----------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    root: Path

    @property
    def home(self) -> Path:
        return self.root / "studiohome"

    @property
    def store(self) -> Path:
        return self.root / "clientstore"

    @property
    def config(self) -> Path:
        return self.root / "client.yaml"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env.update(
            PATH=f"{CLIENT / 'bin'}:{env['PATH']}",
            HOME=str(self.root / "home"),
            STUDIOML_HOME=str(self.home),
            STUDIOML_DUMMY_MODE="1",
        )
        return env

    def record(self, key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.store / "meta" / "experiments" / key).read_text())
        return data


def make_client(root: Path) -> Client:
    client = Client(root)
    config = {
        "database": {"type": "local", "endpoint": str(client.store), "bucket": "meta"},
        "storage": {"type": "local", "endpoint": str(client.store), "bucket": "artifacts"},
        "resources_needed": {"cpus": 1, "gpus": 0, "ram": "2gb", "hdd": "3gb"},
        "verbose": "error",
    }
    for folder in (client.store, client.home, root / "home"):
        folder.mkdir(parents=True, exist_ok=True)
    client.config.write_text(yaml.safe_dump(config))
    return client


def client_submit(client: Client, workspace: Path, key: str) -> None:
    argv = [
        str(CLIENT / "bin" / "studio-run"),
        f"--config={client.config}",
        "--queue",
        "local",
        "-e",
        key,
        "train.py",
    ]
    subprocess.run(
        argv, cwd=workspace, env=client.env(), check=True, capture_output=True, timeout=120
    )


def worker_round(client: Client, workspace: Path, tag: str, count: int) -> tuple[float, float]:
    """Submit ``count`` with studio-run, let the worker drain them; seconds per experiment.

    Two figures: between the first and the last ``time_finished`` the worker records (count - 1
    experiments, the worker's start-up left out), and from its launch to its exit.
    """
    keys = [f"{tag}-{i}" for i in range(count)]
    for key in keys:
        client_submit(client, workspace, key)
    log = client.root / f"worker-{tag}.log"
    argv = [str(CLIENT / "bin" / "studio-local-worker"), f"--config={client.config}"]
    launched = time.time()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=client.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        proc.wait(30 + 10 * count)  # it exits (TypeError, a 0.0.49 bug) once the queue is dry
        exited = time.time()
    finally:
        stop(proc, timeout=5)
    records = [client.record(key) for key in keys]
    if any(r.get("status") != "finished" for r in records):
        raise RuntimeError(f"studio-local-worker left experiments unfinished; see {log}")
    finished = sorted(float(r["time_finished"]) for r in records)
    return (finished[-1] - finished[0]) / (count - 1), (exited - launched) / count


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Results:
    latency: list[Latency] = field(default_factory=list)
    agent: dict[int, list[float]] = field(default_factory=dict)  # slots -> seconds per experiment
    worker: list[float] = field(default_factory=list)  # seconds per experiment, steady state
    worker_wall: list[float] = field(default_factory=list)  # the same, launch to exit


def measure_agent(layout: Layout, options: argparse.Namespace, results: Results) -> None:
    for slots in (1, 2):
        with running_agent(layout, slots) as proc:
            run_one(layout, proc)  # warm-up: builds the env cache the first time
            if slots == 1:
                results.latency = [run_one(layout, proc) for _ in range(options.runs)]
            rounds = results.agent.setdefault(slots, [])
            for _ in range(options.rounds):
                rounds.append(drain_round(layout, proc, options.experiments) / options.experiments)
            print(f"  studio-agent, {slots} worker(s): done", file=sys.stderr)


def measure_worker(
    root: Path, layout: Layout, options: argparse.Namespace, results: Results
) -> None:
    if not (CLIENT / "bin" / "studio-local-worker").exists():
        raise SystemExit(f"no studioml client in {CLIENT}: run `make studioml-client`")
    client = make_client(root / "client")
    for index in range(options.baseline_rounds):
        steady, wall = worker_round(client, layout.workspace, f"bench{index}", options.experiments)
        results.worker.append(steady)
        results.worker_wall.append(wall)
        print(f"  studio-local-worker round {index + 1}: done", file=sys.stderr)


# -- reporting ---------------------------------------------------------------------------------


def row(name: str, unit: str, values: Sequence[float], digits: int = 1) -> str:
    def fmt(value: float) -> str:
        return f"{value:>9.{digits}f}"

    spread = f"{fmt(min(values))} {fmt(max(values))}" if len(values) > 1 else " " * 19
    return f"{name:<44} {unit:<8} {fmt(statistics.median(values))} {spread} {len(values):>4}"


def throughput_rows(name: str, seconds: Sequence[float]) -> list[str]:
    return [row(name, "exp/min", [60 / s for s in seconds]), row("", "s/exp", seconds, 3)]


LATENCY_ROWS = (
    ("latency, 1 worker: enqueue -> process start", "to_start"),
    ("  of which enqueue -> taken from the queue", "to_take"),
    ("latency, 1 worker: process end -> ack", "to_ack"),
    ("latency, 1 worker: enqueue -> ack", "total"),
)


def report(results: Results) -> str:
    lines = [f"{'':<44} {'unit':<8} {'median':>9} {'min':>9} {'max':>9} {'n':>4}"]
    for label, name in LATENCY_ROWS:
        lines.append(row(label, "ms", [1000 * getattr(s, name) for s in results.latency]))
    for slots, seconds in sorted(results.agent.items()):
        lines += throughput_rows(f"throughput, studio-agent, {slots} worker(s)", seconds)
    if results.worker:
        lines += throughput_rows("throughput, studio-local-worker 0.0.49", results.worker)
        lines += throughput_rows("  same, launch -> exit (with start-up)", results.worker_wall)
        baseline = statistics.median(60 / s for s in results.worker)
        for slots, seconds in sorted(results.agent.items()):
            ratio = statistics.median(60 / s for s in seconds) / baseline
            lines.append(row(f"ratio studio-agent {slots} worker(s) / studioml", "x", [ratio], 2))
    return "\n".join(lines)


def header(options: argparse.Namespace) -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"studio-agent {__version__}: Python {platform.python_version()} "
        f"({platform.python_implementation()}), {cpus} CPUs, {platform.platform()}\n"
        f"trivial experiment, warm env cache, poll_interval {DEFAULT_POLL} s (default); "
        f"{options.runs} latency runs; throughput: {options.experiments} experiments a round, "
        f"{options.rounds} rounds per setting, {options.baseline_rounds} for studioml"
    )


# -- command line ------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive, default=10, help="latency runs (10)")
    parser.add_argument(
        "--experiments", type=positive, default=20, help="experiments per throughput round (20)"
    )
    parser.add_argument("--rounds", type=positive, default=5, help="agent rounds per setting (5)")
    parser.add_argument("--baseline-rounds", type=positive, default=3, help="studioml rounds (3)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run studioml")
    options = parser.parse_args(argv)
    if options.experiments < 2:
        parser.error("--experiments must be at least 2")
    return options


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: no process is left behind


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    print(header(options), flush=True)
    results = Results()
    with tempfile.TemporaryDirectory(prefix="studio-agent-bench-") as tmp:
        layout = make_layout(Path(tmp) / "agent")
        measure_agent(layout, options, results)
        if not options.skip_baseline:
            measure_worker(Path(tmp), layout, options, results)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
