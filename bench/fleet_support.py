"""Services, queues, credential files, agent processes and /proc readings for bench/fleet.py.

The services are the test suite's own (tests/services): a private RabbitMQ node, a moto server
(SQS; its log has one line per request) and the Google Pub/Sub emulator. Queues are made as the
studioml client makes them; agents get their brokers from credential files in their certs dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika
import services as bench_services
import yaml

from agent.queues.local import LOCK_NAME, enqueue
from agent.settings import GO_ALIASES
from agent.storage.local import LocalStorage
from agent.submit import Submission, build_message, pack_workspace

if TYPE_CHECKING:
    from tests.services.pubsub import PubSubEmulator
    from tests.services.rabbitmq import RabbitBroker
    from tests.services.s3 import S3Server

ROOT = Path(__file__).resolve().parent.parent
PREFIX = {"local": "local_fleet_", "rabbitmq": "rmq_fleet_", "sqs": "sqs_fleet_"}
PREFIX["pubsub"] = "pubsub_fleet_"
QUEUE_MATCH = r"^(local|rmq|sqs|pubsub)_fleet_\d+$"
EXCHANGE = "StudioML.topic"  # the studioml 0.0.49 client's exchange (protocol spec A.1)
CREDENTIAL = "fleet"  # every credential file's name in the certs dir
TICKS = os.sysconf("SC_CLK_TCK")
WAIT = 120.0  # the most any agent may take to start, subscribe or let go
# The experiment: one line "<key> <start time>" appended (O_APPEND) to the file in argv[1].
TRAIN = """import time

started = time.time()
import os, sys  # noqa: E401,E402

fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, f"{sys.argv[2]} {started!r}\\n".encode())
os.close(fd)
"""


def queue_names(kind: str, count: int) -> list[str]:
    return [f"{PREFIX[kind]}{index:02d}" for index in range(count)]


def served_name(kind: str, queue: str) -> str:
    """How the agent's 'serving ...' log line names a queue (Pub/Sub: the subscription)."""
    return f"{queue}_sub" if kind == "pubsub" else queue


# -- services ----------------------------------------------------------------------------------


@dataclass
class Services:
    broker: RabbitBroker
    s3: S3Server
    emulator: PubSubEmulator
    moto_log: Path
    queue_root: Path  # the fleet's shared local queue root
    channel: Any  # the bench's own pika channel (heartbeat 0, confirms)
    sqs: Any  # a boto3 SQS client on moto
    sqs_urls: dict[str, str] = field(default_factory=dict)


def start_services(root: Path, stack: ExitStack) -> Services:
    """Broker, moto and emulator from tests/services; ``stack`` stops each on the way out."""
    started = bench_services.start(root, stack)
    return Services(
        started.broker,
        started.s3,
        started.emulator,
        root / "moto.log",
        root / "queues",
        started.channel,
        bench_services.sqs_client(started.s3),
    )


def create_queues(services: Services, kind: str, names: Iterable[str]) -> None:
    """Queues as the studioml client makes them (local ones are folders, made per phase)."""
    for name in names:
        if kind == "rabbitmq":
            services.channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=True)
            services.channel.queue_declare(name, durable=False)
            services.channel.queue_bind(name, EXCHANGE, routing_key=f"StudioML.{name}")
        elif kind == "sqs":
            services.sqs_urls[name] = services.sqs.create_queue(QueueName=name)["QueueUrl"]
        elif kind == "pubsub":
            services.emulator.create_topic_and_subscription(name)


def send(services: Services, kind: str, queue: str, body: bytes) -> None:
    """Enqueue ``body`` as the client does; returns once the queue has it."""
    if kind == "local":
        enqueue(services.queue_root, queue, body)
    elif kind == "rabbitmq":
        properties = pika.BasicProperties(app_id="studioml", content_type="application/json")
        services.channel.basic_publish(
            EXCHANGE, f"StudioML.{queue}", body, properties, mandatory=True
        )
    elif kind == "sqs":
        services.sqs.send_message(QueueUrl=services.sqs_urls[queue], MessageBody=body.decode())
    else:
        services.emulator.publish(queue, body)


def queued(services: Services, kind: str, queues: Iterable[str]) -> int:
    """Messages still in the queues (SQS: in flight too), as the service or the folder says."""
    if kind == "local":
        folders = [services.queue_root / q for q in queues]
        return sum(1 for f in folders if f.is_dir() for p in f.iterdir() if p.name != LOCK_NAME)
    if kind == "rabbitmq":
        declare = services.channel.queue_declare
        return sum(int(declare(q, passive=True).method.message_count) for q in queues)
    names = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
    total = 0
    for queue in queues:
        url = services.sqs_urls[queue]
        found = services.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
        total += sum(int(found["Attributes"][n]) for n in names)
    return total


def purge(services: Services, queues: dict[str, list[str]]) -> None:
    """Empty the broker queues and the local queue root: nothing left for the next fleet."""
    for name in queues.get("rabbitmq", []):
        services.channel.queue_purge(name)
    for name in queues.get("sqs", []):
        if queued(services, "sqs", [name]):  # SQS takes one purge a minute per queue
            services.sqs.purge_queue(QueueUrl=services.sqs_urls[name])
    shutil.rmtree(services.queue_root, ignore_errors=True)


# -- counters at the services ------------------------------------------------------------------


def rabbit_counters(broker: RabbitBroker) -> tuple[int, dict[str, int]]:
    """basic.get calls so far (empty or not), and packets received per connection."""
    stats = broker.api("/api/overview").get("message_stats", {})
    polls = sum(int(stats.get(k, 0)) for k in ("get", "get_empty", "get_no_ack"))
    connections = broker.api("/api/connections")
    return polls, {c["name"]: int(c.get("recv_cnt", 0)) for c in connections}


def moto_requests(log: Path) -> int:
    """Request lines moto has logged (werkzeug: ``127.0.0.1 - - [date] "POST / ..." 200``)."""
    with log.open("rb") as lines:
        return sum(1 for line in lines if b'] "' in line)


def service_ticks(services: Services) -> dict[str, int]:
    """CPU ticks so far of the broker (its session: the VM and helpers), moto and the emulator."""
    broker, emulator = services.broker._proc, services.emulator._proc
    return {
        "broker_cpu": session_ticks(broker.pid) if broker else 0,
        "moto_cpu": proc_ticks(services.s3._proc.pid) if services.s3._proc else 0,
        "emulator_cpu": session_ticks(emulator.pid) if emulator else 0,
    }


def proc_ticks(pid: int) -> int:
    """utime + stime of a process (all of its threads), in clock ticks; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def session_ticks(session: int) -> int:
    """utime + stime of every live process of a session (a service and its helpers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            total += int(fields[11]) + int(fields[12])
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- credential files --------------------------------------------------------------------------


def credential_path(certs: Path, kind: str) -> Path:
    return certs / kind / (f"{CREDENTIAL}.json" if kind == "pubsub" else CREDENTIAL)


def _private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def land(services: Services, certs: Path, kind: str) -> None:
    """Write the credential under a dot name (ignored by the agent), then rename it in place."""
    final = credential_path(certs, kind)
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp")
    if kind == "rabbitmq":
        _private(staging, f"{services.broker.amqp_url}\n{services.broker.mgmt_url}\n")
    elif kind == "sqs":
        s3 = services.s3
        staging.mkdir(mode=0o700)
        keys = f"aws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n"
        _private(staging / "credentials", f"[default]\n{keys}")
        _private(
            staging / "config", f"[default]\nregion = {s3.region}\nendpoint_url = {s3.endpoint}\n"
        )
    else:
        key = {"type": "service_account", "project_id": services.emulator.project}
        _private(staging, json.dumps(key))
    os.rename(staging, final)


def withdraw(certs: Path, kind: str) -> None:
    """Remove the credential at once: rename it away, then delete it."""
    final = credential_path(certs, kind)
    gone = final.with_name(f".{final.name}.gone")
    os.rename(final, gone)
    if gone.is_dir():
        shutil.rmtree(gone)
    else:
        gone.unlink()


# -- messages ----------------------------------------------------------------------------------


class Messages:
    """0.0.49-style requests for the experiment, all naming one workspace in a local store
    (local queues may name it through ``local_storage``, brokers through
    ``broker_local_storage``)."""

    def __init__(self, root: Path) -> None:
        self.store = root / "store"
        workspace = root / "workspace"
        workspace.mkdir(parents=True)
        (workspace / "train.py").write_text(TRAIN)
        self.workspace = workspace
        self.workspace_key = pack_workspace(workspace, LocalStorage(self.store / "artifacts"))

    def body(self, key: str, lines: Path, queue: str) -> bytes:
        sub = Submission(
            self.workspace, "train.py", [str(lines), key], queue, Path("/"), self.store
        )
        sub.key = key
        return json.dumps(build_message(sub, self.workspace_key)).encode()


# -- agents ------------------------------------------------------------------------------------


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    root: Path  # its state dir, certs dir, config and log

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def text(self, offset: int = 0) -> str:
        return self.log.read_bytes()[offset:].decode(errors="replace")

    def held(self) -> int:
        """Messages in its custody: local in-flight files and journal bodies."""
        files = (self.state / "inflight").rglob("*")
        return sum(1 for p in files if p.suffix != ".json" and p.name[0] != "." and p.is_file())


def agent_config(services: Services, root: Path, cache: Path, slots: int, store: Path) -> Path:
    """Every broker from the certs dir; the shared queue root and store; no sandbox, no metrics."""
    config = {
        "queue_root": str(services.queue_root),
        "queue_match": QUEUE_MATCH,
        "state_dir": str(root / "state"),
        "cache_dir": str(cache),
        "certs_dir": str(root / "certs"),
        "pubsub_emulator_host": services.emulator.host,
        "max_concurrent": slots,
        "isolation": "off",
        "metrics_address": "",
        "local_storage": [str(store)],
        "broker_local_storage": [str(store)],
        "update_local_db": False,
        "drain_timeout": "10s",
        "kill_grace": "2s",
    }
    path = root / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def agent_env(code: Path | None) -> dict[str, str]:
    """Ours, less what would override the config file; ``code`` first on the path if given."""
    drop = set(GO_ALIASES.values()) | {"PYTHONPATH", "JOURNAL_STREAM"}
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("STUDIO_AGENT")
    }
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return env


def start_agent(root: Path, config: Path, code: Path | None) -> Agent:
    """``python -m agent run`` from this tree, or from ``code`` (a worktree of another commit)."""
    (root / "certs").mkdir(mode=0o700, parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "agent", "run", "--config", str(config)]
    with (root / "agent.log").open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=code or ROOT,
            env=agent_env(code),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Agent(proc, root)


def stop_all(agents: Iterable[Agent]) -> None:
    """SIGTERM to all (they drain), then SIGKILL to the process group of any still running."""
    procs = [a.proc for a in agents]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_all(agents: list[Agent], done: Callable[[Agent], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    for agent in agents:
        while not done(agent):
            if agent.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(agent.text().splitlines()[-20:])
                raise RuntimeError(f"{agent.root}: no {what} (rc {agent.proc.poll()}):\n{tail}")
            time.sleep(0.05)


def log_time(line: str) -> float:
    """The wall-clock time of an agent log line (``%(asctime)s``: local time, milliseconds)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def starting_times(agents: Iterable[Agent]) -> dict[str, float]:
    """Experiment key -> the first ``experiment <key> from ...: starting`` line's time."""
    found: dict[str, float] = {}
    for agent in agents:
        for line in agent.text().splitlines():
            if ": starting (attempt " in line and " experiment " in line:
                key = line.split(" experiment ", 1)[1].split(" ", 1)[0]
                found[key] = min(found.get(key, float("inf")), log_time(line))
    return found
