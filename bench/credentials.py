"""How soon a credential dropped into the certs directory gets work, and what idle queues cost.

Runs one real agent (``python -m agent run``, ``max_concurrent`` 1, default ``poll_interval``)
in a temporary directory, with a private RabbitMQ node, a moto server (SQS) and the Google
Pub/Sub emulator on loopback, all from ``tests/services`` and started once. It measures:

- per backend (rabbitmq, sqs, pubsub), ``--runs`` times: a message waits in a matching queue,
  the credential lands in ``certs_dir`` (mode 0600, renamed into place), and the clock runs
  until the agent takes the message: for RabbitMQ the custody-journal entry appearing, for all
  three the agent's ``starting (attempt 1)`` log line (its own timestamp). Then the credential
  is removed again (renamed away), timed to the agent's ``no new work`` line, and the backend
  closes. The first drop of each kind is reported apart (it may import the vendor SDK).
- the idle agent's CPU (utime + stime from /proc/<pid>/stat, percent of one core) and VmRSS:
  with no credential, with ``--queues`` RabbitMQ queues bound as the studioml client binds them,
  and with the same number split between RabbitMQ, SQS and Pub/Sub.

Usage: ``python bench/credentials.py [--runs 5] [--queues 50] [--idle-seconds 20]`` (with the
project venv). It prints one table; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika
import services as bench_services
import yaml

from agent import __version__
from agent.settings import GO_ALIASES, Settings
from agent.submit import Submission, prepare

if TYPE_CHECKING:
    from tests.services.pubsub import PubSubEmulator
    from tests.services.rabbitmq import RabbitBroker
    from tests.services.s3 import S3Server

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("rabbitmq", "sqs", "pubsub")
PREFIX = {"rabbitmq": "rmq_cb_", "sqs": "sqs_cb_", "pubsub": "pubsub_cb_"}
QUEUE_MATCH = r"^(rmq|sqs|pubsub)_cb_.*$"
CREDENTIAL = {"rabbitmq": "cb-rmq", "sqs": "cb-sqs", "pubsub": "cb-pubsub"}  # the names in certs
EXCHANGE = "StudioML.topic"  # the studioml 0.0.49 client's exchange (protocol spec A.1)
TRAIN = 'print("hello")\n'
POLL = 0.002  # seconds between two looks at the custody journal
WAIT = 60.0  # the most any one step may take
SETTLE = 1.0  # pause after a backend closed, before the next message is sent
WINDOW = 5.0  # seconds per idle CPU sample
DEFAULT_POLL = Settings.model_fields["poll_interval"].default


def latency_queue(kind: str) -> str:
    return f"{PREFIX[kind]}latency"


def idle_queue(kind: str, index: int) -> str:
    return f"{PREFIX[kind]}idle_{index:02d}"


# -- services ----------------------------------------------------------------------------------


@dataclass
class Services:
    """The three brokers, and the bench's own clients of each."""

    broker: RabbitBroker
    s3: S3Server
    emulator: PubSubEmulator
    channel: Any  # a pika BlockingChannel with publisher confirms
    sqs: Any  # a boto3 SQS client on the moto server
    sqs_urls: dict[str, str] = field(default_factory=dict)

    def versions(self) -> str:
        rabbit = self.broker.api("/api/overview")["rabbitmq_version"]
        return (
            f"RabbitMQ {rabbit}, moto {importlib.metadata.version('moto')}, "
            f"Pub/Sub emulator {emulator_version()}, on loopback"
        )


def emulator_version() -> str:
    from tests.services.pubsub import EMULATOR

    jars = sorted((EMULATOR.parent.parent / "lib").glob("cloud-pubsub-emulator-*-all.jar"))
    return jars[0].name.split("-")[3] if jars else "?"


def start_services(root: Path, stack: ExitStack) -> Services:
    """Start the broker, moto and the emulator; ``stack`` stops each of them on the way out."""
    started = bench_services.start(root, stack)
    return Services(
        started.broker,
        started.s3,
        started.emulator,
        started.channel,
        bench_services.sqs_client(started.s3),
    )


def create_queue(services: Services, kind: str, name: str) -> None:
    """A queue as the studioml client makes it: RabbitMQ binding, SQS queue, topic + ``_sub``."""
    if kind == "rabbitmq":
        services.channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=True)
        services.channel.queue_declare(name, durable=False)
        services.channel.queue_bind(name, EXCHANGE, routing_key=f"StudioML.{name}")
    elif kind == "sqs":
        services.sqs_urls[name] = services.sqs.create_queue(QueueName=name)["QueueUrl"]
    else:
        services.emulator.create_topic_and_subscription(name)


def delete_queue(services: Services, kind: str, name: str) -> None:
    if kind == "rabbitmq":
        services.broker.delete_queue(name)
    elif kind == "sqs":
        services.sqs.delete_queue(QueueUrl=services.sqs_urls.pop(name))
    else:
        emulator = services.emulator
        emulator.subscriber.delete_subscription(subscription=emulator.subscription(f"{name}_sub"))
        emulator.publisher.delete_topic(topic=emulator.topic(name))


def publish(services: Services, kind: str, queue: str, body: bytes) -> None:
    """Send ``body`` as the client does; returns once the service has it."""
    if kind == "rabbitmq":
        properties = pika.BasicProperties(app_id="studioml", content_type="application/json")
        routing_key = f"StudioML.{queue}"
        services.channel.basic_publish(EXCHANGE, routing_key, body, properties, mandatory=True)
    elif kind == "sqs":
        services.sqs.send_message(QueueUrl=services.sqs_urls[queue], MessageBody=body.decode())
    else:
        services.emulator.publish(queue, body)


# -- credential files --------------------------------------------------------------------------


def private_file(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def credential_path(certs: Path, kind: str) -> Path:
    name = CREDENTIAL[kind] + (".json" if kind == "pubsub" else "")
    return certs / kind / name


def stage(services: Services, kind: str, final: Path) -> Path:
    """Write the credential beside ``final`` under a dot name, which the agent ignores."""
    staging = final.with_name(f".{final.name}.tmp")
    if kind == "rabbitmq":
        broker = services.broker
        private_file(staging, f"{broker.amqp_url}\n{broker.mgmt_url}\n")
    elif kind == "sqs":
        s3 = services.s3
        staging.mkdir(mode=0o700)
        keys = f"aws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n"
        private_file(staging / "credentials", f"[default]\n{keys}")
        config = f"[default]\nregion = {s3.region}\nendpoint_url = {s3.endpoint}\n"
        private_file(staging / "config", config)
    else:
        key = {"type": "service_account", "project_id": services.emulator.project}
        private_file(staging, json.dumps(key))
    return staging


def land(services: Services, kind: str, final: Path) -> float:
    """Drop the credential (rename into place, as deploy tools do); the time it landed."""
    staging = stage(services, kind, final)
    os.rename(staging, final)
    return time.time()


def withdraw(final: Path) -> float:
    """Remove the credential at once (rename away, then delete); the time it disappeared."""
    gone = final.with_name(f".{final.name}.gone")
    os.rename(final, gone)
    removed = time.time()
    if gone.is_dir():
        shutil.rmtree(gone)
    else:
        gone.unlink()
    return removed


# -- the agent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def storage(self) -> Path:
        return self.root / "store"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def journal(self, queue: str) -> Path:
        """Where the agent keeps the RabbitMQ messages in its custody."""
        return self.state / "inflight" / "rabbitmq" / CREDENTIAL["rabbitmq"] / queue


def make_layout(root: Path) -> Layout:
    layout = Layout(root)
    layout.workspace.mkdir(parents=True)
    (layout.workspace / "train.py").write_text(TRAIN)
    for kind in KINDS:
        (layout.certs / kind).mkdir(parents=True, mode=0o700)
    layout.certs.chmod(0o700)
    return layout


def agent_config(layout: Layout, services: Services) -> Path:
    config = {
        "queue_root": str(layout.root / "queue"),
        "state_dir": str(layout.state),
        "cache_dir": str(layout.root / "cache"),
        "certs_dir": str(layout.certs),
        "queue_match": QUEUE_MATCH,
        "pubsub_emulator_host": services.emulator.host,
        "max_concurrent": 1,
        "drain_timeout": "30s",
    }
    path = layout.root / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def agent_env() -> dict[str, str]:
    """Ours, less what would override the config file (the Go runner's names, STUDIO_AGENT_*)."""
    aliases = set(GO_ALIASES.values())
    return {
        k: v
        for k, v in os.environ.items()
        if k not in aliases and not k.startswith("STUDIO_AGENT_")
    }


def log_time(line: str) -> float:
    """The wall-clock time of an agent log line (``%(asctime)s``: local time, milliseconds)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    log: Path

    def offset(self) -> int:
        return self.log.stat().st_size

    def lines(self, offset: int) -> list[str]:
        return self.log.read_bytes()[offset:].decode(errors="replace").splitlines()

    def wait_line(self, offset: int, match: Callable[[str], bool], what: str) -> str:
        """The first line after ``offset`` that ``match``es, waiting up to WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while True:
            found = next((line for line in self.lines(offset) if match(line)), None)
            if found is not None:
                return found
            self.check(deadline, what)
            time.sleep(0.02)

    def wait(self, done: Callable[[], bool], what: str, poll: float = 0.02) -> float:
        """Poll ``done`` every ``poll`` seconds; the wall-clock time it first held."""
        deadline = time.monotonic() + WAIT
        while not done():
            self.check(deadline, what)
            time.sleep(poll)
        return time.time()

    def check(self, deadline: float, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {self.proc.returncode}; see {self.log}")
        if time.monotonic() > deadline:
            tail = "\n".join(self.lines(0)[-30:])
            raise TimeoutError(f"{what}: not within {WAIT:.0f} s; agent log ends:\n{tail}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the agent drains and exits), then SIGKILL to its whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def running_agent(layout: Layout, services: Services) -> Iterator[Agent]:
    """One agent for the whole bench; always stopped on the way out."""
    argv = [sys.executable, "-m", "agent", "run", "--config", str(agent_config(layout, services))]
    with layout.log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=agent_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        agent = Agent(proc, layout.log)
        agent.wait_line(0, lambda line: "studio-agent ready" in line, "studio-agent ready")
        yield agent
    finally:
        stop(proc)


# -- credential latency ------------------------------------------------------------------------


@dataclass
class Bench:
    layout: Layout
    services: Services
    agent: Agent


@dataclass(frozen=True)
class Run:
    """One drop and removal of a credential, in seconds."""

    kind: str
    to_subscribe: float  # landed -> the agent's "credential <ident>: subscribing" line
    to_log: float  # landed -> the agent's "starting (attempt 1)" line
    to_journal: float | None  # landed -> the custody-journal entry (RabbitMQ only)
    to_stop: float  # removed -> the agent's "no new work" line


def fresh_message(layout: Layout, queue: str) -> tuple[str, bytes]:
    """A 0.0.49-style request with local storage; the key and the body."""
    submission = Submission(
        layout.workspace, "train.py", [], queue, layout.root / "staging", layout.storage
    )
    message = prepare(submission)
    return str(message["experiment"]["key"]), json.dumps(message).encode()


def finished(layout: Layout, key: str) -> bool:
    record = layout.storage / "meta" / "experiments" / key
    return record.exists() and json.loads(record.read_text()).get("status") == "finished"


def journaled(folder: Path) -> bool:
    """An entry is ``<id>`` plus ``<id>.json``; dot files are writes in progress."""
    return folder.is_dir() and any(
        not p.name.endswith(".json") and not p.name.startswith(".") for p in folder.iterdir()
    )


def started_at(bench: Bench, offset: int, key: str) -> float:
    """The log time of the experiment's start; it must be the message's first delivery."""
    line = bench.agent.wait_line(
        offset, lambda text: f"experiment {key} from " in text and "starting" in text, key
    )
    if "starting (attempt 1)" not in line:
        raise RuntimeError(f"not a first delivery, so not a fresh message: {line}")
    return log_time(line)


def subscribed_at(bench: Bench, offset: int, kind: str) -> float:
    needle = f"credential {kind}/{CREDENTIAL[kind]}: subscribing"
    return log_time(bench.agent.wait_line(offset, lambda text: needle in text, needle))


def take_back(bench: Bench, kind: str, final: Path) -> float:
    """Remove the credential; seconds to the "no new work" line. Returns once it is closed."""
    agent, ident = bench.agent, f"{kind}/{CREDENTIAL[kind]}"
    offset = agent.offset()
    removed = withdraw(final)
    line = agent.wait_line(offset, lambda text: f"credential {ident}: no new work" in text, ident)
    agent.wait_line(offset, lambda text: f"{kind} backend closed" in text, f"{ident} closed")
    time.sleep(SETTLE)  # a Pub/Sub pull cut short by the close must not take the next message
    return log_time(line) - removed


def one_run(bench: Bench, kind: str) -> Run:
    """Queue a message, drop the credential, follow the message to its end, remove it."""
    layout, queue = bench.layout, latency_queue(kind)
    key, body = fresh_message(layout, queue)
    publish(bench.services, kind, queue, body)
    final = credential_path(layout.certs, kind)
    offset = bench.agent.offset()
    landed = land(bench.services, kind, final)
    to_journal = None
    if kind == "rabbitmq":
        journal = layout.journal(queue)
        to_journal = bench.agent.wait(lambda: journaled(journal), "journal", POLL) - landed
    bench.agent.wait(lambda: finished(layout, key), f"{kind} experiment {key} finished")
    to_log = started_at(bench, offset, key) - landed
    to_subscribe = subscribed_at(bench, offset, kind) - landed
    return Run(kind, to_subscribe, to_log, to_journal, take_back(bench, kind, final))


def measure_latency(bench: Bench, runs: int) -> tuple[list[Run], list[Run]]:
    """Round 0 (shown apart: SDK imports, the env cache) then ``runs`` rounds, kinds in turn."""
    for kind in KINDS:
        create_queue(bench.services, kind, latency_queue(kind))
    cold = [one_run(bench, kind) for kind in KINDS]
    warm = []
    for index in range(runs):
        warm += [one_run(bench, kind) for kind in KINDS]
        print(f"  credential round {index + 1}/{runs}: done", file=sys.stderr)
    for kind in KINDS:
        delete_queue(bench.services, kind, latency_queue(kind))
    return cold, warm


# -- idle cost ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Idle:
    label: str
    cpu: list[float]  # percent of one core, one value per WINDOW
    rss: list[float]  # MiB, at the end of each window


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def sample_idle(agent: Agent, label: str, seconds: float) -> Idle:
    cpu, rss = [], []
    pid = agent.proc.pid
    for _ in range(max(1, round(seconds / WINDOW))):
        before, start = cpu_seconds(pid), time.monotonic()
        time.sleep(WINDOW)
        cpu.append(100 * (cpu_seconds(pid) - before) / (time.monotonic() - start))
        rss.append(rss_mib(pid))
    print(f"  idle, {label}: done", file=sys.stderr)
    return Idle(label, cpu, rss)


def serving_line(kind: str) -> str:
    what = "subscriptions" if kind == "pubsub" else "queues"
    return f"{CREDENTIAL[kind]}: serving {what} "


def subscribe(bench: Bench, counts: dict[str, int]) -> None:
    """Make ``counts[kind]`` idle queues of each kind, drop the credentials, and return once the
    agent serves all of them."""
    offset = bench.agent.offset()
    for kind, count in counts.items():
        for index in range(count):
            create_queue(bench.services, kind, idle_queue(kind, index))
        land(bench.services, kind, credential_path(bench.layout.certs, kind))
    for kind, count in counts.items():
        needle = serving_line(kind)

        def complete(text: str, needle: str = needle, count: int = count) -> bool:
            return needle in text and len(text.split(needle, 1)[1].split(", ")) == count

        bench.agent.wait_line(offset, complete, f"{kind}: serving {count}")


def unsubscribe(bench: Bench, counts: dict[str, int]) -> None:
    """Remove the credentials, then the queues ``subscribe`` made."""
    for kind, count in counts.items():
        take_back(bench, kind, credential_path(bench.layout.certs, kind))
        for index in range(count):
            delete_queue(bench.services, kind, idle_queue(kind, index))


def split(queues: int) -> dict[str, int]:
    """The mixed case: 30 % SQS, 30 % Pub/Sub, the rest RabbitMQ."""
    third = queues * 3 // 10
    return {"rabbitmq": queues - 2 * third, "sqs": third, "pubsub": third}


def describe(counts: dict[str, int]) -> str:
    return " + ".join(f"{count} {kind}" for kind, count in counts.items() if count) + " queues"


def measure_fresh(agent: Agent, seconds: float) -> Idle:
    """The agent just started, before any credential (no vendor SDK loaded yet)."""
    time.sleep(2 * SETTLE)
    return sample_idle(agent, "fresh start, no credential yet", seconds)


def measure_idle(bench: Bench, queues: int, seconds: float) -> list[Idle]:
    """After the runs: no credential (the baseline of the ratios), then ``queues`` RabbitMQ
    queues, then ``queues`` split between the three kinds."""
    time.sleep(2 * SETTLE)
    results = [sample_idle(bench.agent, "no credential (0 queues), after the runs", seconds)]
    for counts in ({"rabbitmq": queues}, split(queues)):
        subscribe(bench, counts)
        time.sleep(2 * SETTLE)
        results.append(sample_idle(bench.agent, describe(counts), seconds))
        unsubscribe(bench, counts)
    return results


# -- reporting ---------------------------------------------------------------------------------

NAME = 56  # width of the row names


def row(name: str, unit: str, values: Sequence[float], digits: int = 1) -> str:
    def fmt(value: float) -> str:
        return f"{value:>9.{digits}f}"

    spread = f"{fmt(min(values))} {fmt(max(values))}" if len(values) > 1 else " " * 19
    return f"{name:<{NAME}} {unit:<9} {fmt(statistics.median(values))} {spread} {len(values):>4}"


def latency_rows(cold: list[Run], warm: list[Run]) -> list[str]:
    lines = []
    journal = [1000 * r.to_journal for r in warm if r.to_journal is not None]
    lines.append(row("rabbitmq  landed -> taken (custody journal entry)", "ms", journal))
    for kind in KINDS:
        values = [1000 * r.to_log for r in warm if r.kind == kind]
        lines.append(row(f"{kind:<9} landed -> 'starting (attempt 1)' logged", "ms", values))
        values = [1000 * r.to_subscribe for r in warm if r.kind == kind]
        lines.append(row("            of which landed -> 'subscribing' logged", "ms", values))
    for kind in KINDS:
        values = [1000 * r.to_stop for r in warm if r.kind == kind]
        lines.append(row(f"{kind:<9} removed -> 'no new work' logged", "ms", values))
    for run in cold:
        name = f"{run.kind:<9} first drop of its kind: landed -> 'starting'"
        lines.append(row(name, "ms", [1000 * run.to_log]))
    return lines


def idle_rows(fresh: Idle, idle: list[Idle]) -> list[str]:
    """Each case's CPU and RSS; after each subscribed case, its ratio to the baseline."""
    lines = idle_case(fresh)
    for index, result in enumerate(idle):
        lines += idle_case(result)
        if index:
            lines += ratio_rows(result, idle[0])
    return lines


def idle_case(result: Idle) -> list[str]:
    return [
        row(f"idle, {result.label}", "CPU %", result.cpu, 2),
        row("", "RSS MiB", result.rss),
    ]


def ratio_rows(result: Idle, base: Idle) -> list[str]:
    """CPU: whole intervals (the windows are equal, so their means); RSS: medians."""
    cpu = statistics.fmean(result.cpu) / max(statistics.fmean(base.cpu), 1e-9)
    rss = statistics.median(result.rss) / statistics.median(base.rss)
    return [
        row("  ratio to no credential, after the runs", "CPU x", [cpu], 2),
        row("", "RSS x", [rss], 2),
    ]


@dataclass
class Results:
    cold: list[Run]  # the first drop of each kind
    warm: list[Run]  # the counted runs
    fresh: Idle
    idle: list[Idle]
    versions: str = ""


def report(results: Results) -> str:
    head = f"{'':<{NAME}} {'unit':<9} {'median':>9} {'min':>9} {'max':>9} {'n':>4}"
    notes = [
        "log times are the agent's own (milliseconds, truncated); the clock starts when the",
        "rename into certs_dir returns. CPU % is of one core, per window; CPU ratio: whole",
        "interval (mean of the windows); RSS ratio: medians.",
        f"{results.versions}.",
    ]
    latency = latency_rows(results.cold, results.warm)
    return "\n".join([head, *latency, *idle_rows(results.fresh, results.idle), *notes])


def header(options: argparse.Namespace) -> str:
    cpus = len(os.sched_getaffinity(0))
    return (
        f"studio-agent {__version__}: Python {platform.python_version()} "
        f"({platform.python_implementation()}), {cpus} CPUs, {platform.platform()}\n"
        f"one agent, max_concurrent 1, poll_interval {DEFAULT_POLL} s (default), trivial "
        f"experiment; {options.runs} runs per backend after a first drop of each, shown apart; "
        f"idle: {options.idle_seconds:g} s in {WINDOW:g} s windows"
    )


# -- command line ------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive, default=5, help="runs per backend (5)")
    parser.add_argument("--queues", type=positive, default=50, help="idle queues (50)")
    parser.add_argument(
        "--idle-seconds", type=float, default=20.0, help="idle sample per case, seconds (20)"
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: no process is left behind


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    print(header(options), flush=True)
    with tempfile.TemporaryDirectory(prefix="studio-agent-bench-") as tmp, ExitStack() as stack:
        services = start_services(Path(tmp) / "services", stack)
        layout = make_layout(Path(tmp) / "agent")
        with running_agent(layout, services) as agent:
            bench = Bench(layout, services, agent)
            fresh = measure_fresh(agent, options.idle_seconds)
            cold, warm = measure_latency(bench, options.runs)
            idle = measure_idle(bench, options.queues, options.idle_seconds)
        results = Results(cold, warm, fresh, idle, services.versions())
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
