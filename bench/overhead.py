"""How much time studio-agent adds around a trivial experiment, and how fast it drains a queue.

Runs a real agent (``python -m agent run``) in a temporary directory on two transports:
``local`` (a StudioML local queue, local storage) and ``rmq-s3`` (a private RabbitMQ node and a
moto S3 server on loopback, both from ``tests/services``, started once). It measures, with a warm
environment cache and the default ``poll_interval``:

- latency, one worker, one experiment at a time: enqueue -> the child's first line, and the
  child's last line -> the acknowledgement (local: the in-flight message file disappearing;
  rmq-s3: the custody-journal entry disappearing, which the agent drops once the results are in
  S3);
- throughput: a batch of experiments enqueued at once and drained with 1 and then 2 workers;
- on ``local`` only, the same batch drained by the studioml 0.0.49 ``studio-local-worker`` (the
  baseline); on ``rmq-s3``, by ``bench/reference_consumer.py``, a minimal pika + boto3 runner
  (the 0.0.49 python remote worker is broken, protocol spec J.10).
- on ``local`` only, the latency of encrypted, signed messages (the client's envelope, a 4096-bit
  key; an agent of its own with the keys in its certs dir) against the clear runs, and the
  in-process cost of opening one (``bench/encrypted.py``).

Usage: ``python bench/overhead.py [--transport {local,rmq-s3,all}] [--runs N] [--experiments N]
[--skip-baseline] [--skip-encrypted]`` (``make bench`` runs it with the project venv). It prints
one table of medians.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import itertools
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
from typing import TYPE_CHECKING, Any, NamedTuple

import pika
import yaml

from agent import __version__
from agent.queues.local import LOCK_NAME, enqueue
from agent.settings import Settings
from agent.storage.archive import pack_directory
from agent.submit import Submission, submit

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tests.services.rabbitmq import RabbitBroker
    from tests.services.s3 import S3Server

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(os.environ.get("STUDIOML_CLIENT", ROOT / ".cache" / "studioml-client"))
QUEUE = "local_bench"
TRAIN = 'import time\nprint("start", time.time())\nprint("end", time.time())\n'
POLL = 0.002  # seconds between two looks at the queue and in-flight folders
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
DEFAULT_POLL = Settings.model_fields["poll_interval"].default
TRANSPORTS = ("local", "rmq-s3")
RMQ_QUEUE = "rmq_bench"
RMQ_BUCKET = "bench"
EXCHANGE = "StudioML.topic"  # the studioml 0.0.49 client's exchange and routing keys
ROUTING_KEY = f"StudioML.{RMQ_QUEUE}"
PYTHONVER = f"{sys.version_info.major}.{sys.version_info.minor}"


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
    def journal_dir(self) -> Path:
        """Where the agent keeps the rmq-s3 messages in its custody (its config-named backend)."""
        return self.state_dir / "inflight" / "rabbitmq" / "config" / RMQ_QUEUE

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


def agent_config(layout: Layout, slots: int, name: str, extra: dict[str, Any]) -> Path:
    config: dict[str, Any] = {
        "queue_root": str(layout.root / "queue"),
        "state_dir": str(layout.state_dir),
        "cache_dir": str(layout.root / "cache"),
        "max_concurrent": slots,
        "drain_timeout": "30s",
        "update_local_db": True,
        "local_storage": [str(layout.storage)],  # where prepare() stores (agent.trust)
    }
    config.update(extra)
    path = layout.root / f"agent-{name}-{slots}.yaml"
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
def running_agent(
    layout: Layout, slots: int, name: str = "local", extra: dict[str, Any] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A real agent serving the bench queue; always stopped on the way out."""
    log = layout.root / f"agent-{name}-{slots}.log"
    config = agent_config(layout, slots, name, extra or {})
    argv = [sys.executable, "-m", "agent", "run", "--config", str(config)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_line(log, "studio-agent ready", proc, READY_TIMEOUT)
        yield proc
    finally:
        stop(proc)


# -- the local side ----------------------------------------------------------------------------


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
    return read_stamps(layout.results(key).read_bytes(), key)


def read_stamps(output_tar: bytes, key: str) -> dict[str, float]:
    """The ``start`` and ``end`` times the experiment printed, from its uploaded output."""
    with tarfile.open(fileobj=io.BytesIO(output_tar)) as tar:
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


def timeline(enqueued: float, taken: float, acked: float, times: dict[str, float]) -> Latency:
    return Latency(
        times["start"] - enqueued, taken - enqueued, acked - times["end"], acked - enqueued
    )


def run_one(
    layout: Layout, proc: subprocess.Popen[bytes], seal: Callable[[bytes], bytes] | None = None
) -> Latency:
    """Enqueue one experiment on an idle agent and follow it until it is acknowledged."""
    key, body = prepare(layout)
    body = seal(body) if seal else body
    enqueued = time.time()
    queued = enqueue(layout.root / "queue", QUEUE, body)
    held = layout.inflight_dir / queued.name
    taken = wait_until(lambda: not queued.exists(), proc, 60)
    acked = wait_until(lambda: not held.exists(), proc, 60)
    return timeline(enqueued, taken, acked, stamps(layout, key))


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


# -- the RabbitMQ + S3 side --------------------------------------------------------------------


@dataclass
class Rmq:
    """The broker, the S3 server, and the bench's own publisher channel and S3 client."""

    layout: Layout
    broker: RabbitBroker
    s3: S3Server
    channel: Any  # a pika BlockingChannel with publisher confirms
    client: S3Client
    workspace_tar: bytes
    versions: str
    serial: Iterator[int] = field(default_factory=itertools.count)


@contextmanager
def rmq_services(root: Path) -> Iterator[tuple[RabbitBroker, S3Server]]:
    """A private RabbitMQ node and a moto S3 server (the tests' own); always stopped."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/services is project code, not an installed package
    from tests.services.rabbitmq import RABBITMQ_BIN, RabbitBroker, _free_port_block
    from tests.services.s3 import S3Server

    if not (RABBITMQ_BIN / "rabbitmq-server").is_file():
        raise SystemExit(f"no rabbitmq-server in {RABBITMQ_BIN}: install it or --transport local")
    (root / "rabbitmq").mkdir(parents=True)
    broker = RabbitBroker(root / "rabbitmq", _free_port_block())
    s3 = S3Server(root / "moto.log")
    try:
        broker.start()
        s3.start()
        yield broker, s3
    finally:
        s3.stop()
        broker.close()


def declare(channel: Any) -> Any:
    """The studioml 0.0.49 client's exchange, queue and binding (protocol spec A.1)."""
    channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=True)
    channel.queue_declare(RMQ_QUEUE, durable=False)
    channel.queue_bind(RMQ_QUEUE, EXCHANGE, routing_key=ROUTING_KEY)
    channel.confirm_delivery()
    return channel


def workspace_tar(layout: Layout) -> bytes:
    buffer = io.BytesIO()
    pack_directory(layout.workspace, buffer)
    return buffer.getvalue()


@contextmanager
def rmq_bench(layout: Layout) -> Iterator[Rmq]:
    """Services started once for every rmq-s3 measurement; the queue exists before any agent."""
    with rmq_services(layout.root / "services") as (broker, s3):
        s3.make_bucket(RMQ_BUCKET)
        overview = broker.api("/api/overview")
        versions = f"RabbitMQ {overview['rabbitmq_version']}, moto {moto_version()}"
        params = pika.URLParameters(f"{broker.amqp_url}?heartbeat=0")  # idle between rounds
        connection = pika.BlockingConnection(params)
        try:
            channel = declare(connection.channel())
            yield Rmq(layout, broker, s3, channel, s3.client(), workspace_tar(layout), versions)
        finally:
            connection.close()


def moto_version() -> str:
    return importlib.metadata.version("moto")


def rmq_settings(rmq: Rmq) -> dict[str, Any]:
    """What makes the agent serve the broker's bench queue (and nothing else)."""
    return {
        "amqp_url": rmq.broker.amqp_url,
        "amqp_mgmt_url": rmq.broker.mgmt_url,
        "amqp_refresh": "1s",
        "queue_match": f"^{RMQ_QUEUE}$",
    }


def s3_artifacts(s3: S3Server, key: str) -> dict[str, dict[str, Any]]:
    """The request's artifacts as the 0.0.49 client writes them for S3 (tests/s3_requests.py)."""
    host = s3.endpoint.removeprefix("http://")
    aws = {"access_key": s3.access_key, "secret_access_key": s3.secret_key, "region": s3.region}
    paths = {"workspace": f"blobstore/{key}.tar"} | {
        label: f"experiments/{key}/{label}.tar" for label in ("output", "modeldir", "_metadata")
    }
    return {
        label: {
            "key": path,
            "mutable": label != "workspace",
            "bucket": RMQ_BUCKET,
            "qualified": f"s3://{host}/{RMQ_BUCKET}/{path}",
            "unpack": True,
            "credentials": {"aws": aws},
        }
        for label, path in paths.items()
    }


def rmq_message(rmq: Rmq, key: str) -> bytes:
    """Upload the workspace for ``key``; return its 0.0.49-style request with S3 artifacts."""
    rmq.client.put_object(Bucket=RMQ_BUCKET, Key=f"blobstore/{key}.tar", Body=rmq.workspace_tar)
    storage = {"type": "s3", "endpoint": rmq.s3.endpoint, "bucket": RMQ_BUCKET}
    experiment = {
        "key": key,
        "filename": "train.py",
        "args": [],
        "pythonver": PYTHONVER,
        "time_added": time.time(),
        "artifacts": s3_artifacts(rmq.s3, key),
    }
    config = {"storage": storage, "database": storage, "env": {}}
    return json.dumps({"experiment": experiment, "config": config}).encode()


def publish(rmq: Rmq, body: bytes) -> None:
    """basic.publish as the studioml 0.0.49 client does; returns once the broker confirmed."""
    properties = pika.BasicProperties(app_id="studioml", content_type="application/json")
    rmq.channel.basic_publish(EXCHANGE, ROUTING_KEY, body, properties, mandatory=True)


def journaled(layout: Layout) -> bool:
    """Does the agent hold a message? An entry is ``<id>`` plus ``<id>.json``; dot files are
    writes in progress. The body is written last and deleted first."""
    folder = layout.journal_dir
    return folder.is_dir() and any(
        not p.name.endswith(".json") and not p.name.startswith(".") for p in folder.iterdir()
    )


def output_tar(rmq: Rmq, key: str) -> bytes:
    response = rmq.client.get_object(Bucket=RMQ_BUCKET, Key=f"experiments/{key}/output.tar")
    return response["Body"].read()


def outputs_in_bucket(rmq: Rmq, prefix: str) -> int:
    listing = rmq.client.list_objects_v2(Bucket=RMQ_BUCKET, Prefix=prefix)
    return sum(1 for item in listing.get("Contents", []) if item["Key"].endswith("/output.tar"))


def rmq_run_one(rmq: Rmq, proc: subprocess.Popen[bytes]) -> Latency:
    """Publish one experiment to an idle agent and follow it until its results are safe."""
    key = f"rmq{next(rmq.serial)}"
    body = rmq_message(rmq, key)
    enqueued = time.time()
    publish(rmq, body)
    taken = wait_until(lambda: journaled(rmq.layout), proc, 60)
    acked = wait_until(lambda: not journaled(rmq.layout), proc, 60)
    return timeline(enqueued, taken, acked, read_stamps(output_tar(rmq, key), key))


def wait_drained(rmq: Rmq, proc: subprocess.Popen[bytes], prefix: str, count: int) -> float:
    """perf_counter() when the journal was seen empty with all ``count`` outputs in the bucket.

    The journal is looked at every POLL seconds, the bucket only when the journal is empty.
    """
    deadline = time.monotonic() + 30 + 10 * count
    while time.monotonic() < deadline:
        wait_until(lambda: not journaled(rmq.layout), proc, max(0.0, deadline - time.monotonic()))
        empty = time.perf_counter()
        if outputs_in_bucket(rmq, prefix) >= count:
            return empty
        time.sleep(POLL)
    raise TimeoutError(f"{prefix}*: not drained after {30 + 10 * count}s")


def rmq_drain_round(
    rmq: Rmq,
    proc: subprocess.Popen[bytes],
    count: int,
    drained: Callable[[], float] | None = None,
) -> float:
    """Publish ``count`` experiments at once; seconds until every result is safe in S3, or
    until ``drained`` (which returns perf_counter() once the consumer is done) returns."""
    tag = f"rmq{next(rmq.serial)}"
    keys = [f"{tag}-{index}" for index in range(count)]
    bodies = [rmq_message(rmq, key) for key in keys]
    started = time.perf_counter()
    for body in bodies:
        publish(rmq, body)
    done = drained() if drained else wait_drained(rmq, proc, f"experiments/{tag}-", count)
    elapsed = done - started
    for key in keys:
        read_stamps(output_tar(rmq, key), key)  # each one really ran
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


@dataclass(frozen=True)
class Transport:
    """How one transport is measured: the agent settings that serve it, and its two probes."""

    name: str
    settings: dict[str, Any]
    one: Callable[[subprocess.Popen[bytes]], Latency]  # one experiment on an idle agent
    drain: Callable[[subprocess.Popen[bytes], int], float]  # seconds to drain a batch


def local_transport(layout: Layout) -> Transport:
    return Transport(
        "local", {}, lambda proc: run_one(layout, proc), lambda p, n: drain_round(layout, p, n)
    )


def rmq_transport(rmq: Rmq) -> Transport:
    return Transport(
        "rmq-s3",
        rmq_settings(rmq),
        lambda proc: rmq_run_one(rmq, proc),
        lambda proc, count: rmq_drain_round(rmq, proc, count),
    )


@dataclass
class Results:
    latency: dict[str, list[Latency]] = field(default_factory=dict)  # transport -> runs
    # (transport, slots) -> seconds per experiment, one value a round
    agent: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    worker: list[float] = field(default_factory=list)  # seconds per experiment, steady state
    floor: list[float] = field(default_factory=list)  # the script alone, back to back: s/exp
    worker_wall: list[float] = field(default_factory=list)  # the same, launch to exit
    services: str = ""  # versions of the rmq-s3 broker and S3 server
    opening: list[tuple[str, str, list[float]]] = field(default_factory=list)  # bench/encrypted
    reference: list[float] = field(default_factory=list)  # rmq-s3: bench/reference_consumer.py


def measure_agent(
    layout: Layout, transport: Transport, options: argparse.Namespace, results: Results
) -> None:
    for slots in (1, 2):
        with running_agent(layout, slots, transport.name, transport.settings) as proc:
            transport.one(proc)  # warm-up: builds the env cache, finds the broker's queue
            if slots == 1:
                results.latency[transport.name] = [transport.one(proc) for _ in range(options.runs)]
            rounds = results.agent.setdefault((transport.name, slots), [])
            for _ in range(options.rounds):
                rounds.append(transport.drain(proc, options.experiments) / options.experiments)
            print(f"  {transport.name}: studio-agent, {slots} worker(s): done", file=sys.stderr)


def env_python(layout: Layout) -> str:
    """The interpreter of the environment the agent built for the bench's experiment."""
    pythons = sorted((layout.root / "cache").glob("**/bin/python"))
    if not pythons:
        raise SystemExit(f"no environment under {layout.root / 'cache'} to take python from")
    return str(pythons[0])


def floor_round(layout: Layout, count: int) -> float:
    """Seconds per run of the experiment's script, run back to back by a bare loop with the
    interpreter of the environment the agent built for it: what no runner can go below."""
    python = env_python(layout)
    started = time.perf_counter()
    for _ in range(count):
        argv = [python, "train.py"]
        subprocess.run(argv, cwd=layout.workspace, stdout=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - started) / count


def measure_floor(layout: Layout, options: argparse.Namespace, results: Results) -> None:
    results.floor = [floor_round(layout, options.experiments) for _ in range(options.rounds)]
    print("  floor (the script alone, back to back): done", file=sys.stderr)


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


def measure_sealed(layout: Layout, options: argparse.Namespace, results: Results) -> None:
    """Latency of envelopes (4096-bit key) on the local queue, and the in-process cost."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import encrypted
    from tests.sealing import Keys, install_decryption_key, install_signing_key, seal

    keys = Keys.generate(4096)
    certs = layout.root / "certs"
    install_decryption_key(certs, keys, passphrase=b"bench")
    install_signing_key(certs, QUEUE, keys)

    def sealed(body: bytes) -> bytes:
        return json.dumps(seal(json.loads(body), keys)).encode()

    with running_agent(layout, 1, "local-enc", {"certs_dir": str(certs)}) as proc:
        run_one(layout, proc, sealed)  # warm-up
        results.latency["local-enc"] = [run_one(layout, proc, sealed) for _ in range(options.runs)]
    results.opening = encrypted.measure(options.rounds, 100)
    print("  local-enc: studio-agent, 1 worker: done", file=sys.stderr)


def measure_rmq(layout: Layout, options: argparse.Namespace, results: Results) -> None:
    with rmq_bench(layout) as rmq:
        results.services = rmq.versions
        measure_agent(layout, rmq_transport(rmq), options, results)
        measure_reference(rmq, options, results)


def acked_count(acks: Path) -> int:
    return acks.read_bytes().count(b"\n") if acks.exists() else 0


def reference_round(rmq: Rmq, proc: subprocess.Popen[bytes], acks: Path, count: int) -> float:
    """Publish ``count`` experiments at once; seconds until the reference acked them all."""
    target = acked_count(acks) + count

    def drained() -> float:
        wait_until(lambda: acked_count(acks) >= target, proc, 30 + 10 * count)
        return time.perf_counter()

    return rmq_drain_round(rmq, proc, count, drained)


def measure_reference(rmq: Rmq, options: argparse.Namespace, results: Results) -> None:
    """bench/reference_consumer.py (pika + boto3, no safety) on the same broker and bucket."""
    acks = rmq.layout.root / "reference-acks"
    argv = [sys.executable, str(ROOT / "bench" / "reference_consumer.py"), rmq.broker.amqp_url]
    argv += [RMQ_QUEUE, env_python(rmq.layout), str(acks)]
    log = rmq.layout.root / "reference.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        reference_round(rmq, proc, acks, 1)  # warm-up: imports, connections, the first get
        for _ in range(options.rounds):
            seconds = reference_round(rmq, proc, acks, options.experiments)
            results.reference.append(seconds / options.experiments)
    finally:
        stop(proc)
    print("  rmq-s3: reference consumer (pika + boto3): done", file=sys.stderr)


# -- reporting ---------------------------------------------------------------------------------

NAME = 54  # width of the row names: the transport, then what is measured


def row(name: str, unit: str, values: Sequence[float], digits: int = 1) -> str:
    def fmt(value: float) -> str:
        return f"{value:>9.{digits}f}"

    spread = f"{fmt(min(values))} {fmt(max(values))}" if len(values) > 1 else " " * 19
    return f"{name:<{NAME}} {unit:<8} {fmt(statistics.median(values))} {spread} {len(values):>4}"


def throughput_rows(name: str, seconds: Sequence[float]) -> list[str]:
    return [row(name, "exp/min", [60 / s for s in seconds]), row("", "s/exp", seconds, 3)]


LATENCY_ROWS = {
    "local": (
        ("latency, 1 worker: enqueue -> process start", "to_start"),
        ("  of which enqueue -> taken from the queue", "to_take"),
        ("latency, 1 worker: process end -> ack", "to_ack"),
        ("latency, 1 worker: enqueue -> ack", "total"),
    ),
    "rmq-s3": (
        ("latency, 1 worker: publish -> process start", "to_start"),
        ("  of which publish -> taken (journaled)", "to_take"),
        ("latency, 1 worker: process end -> results safe", "to_ack"),
        ("latency, 1 worker: publish -> results safe", "total"),
    ),
}
NOTES = {
    "rmq-s3": (
        "rmq-s3: results safe = results uploaded to S3 and the custody-journal entry dropped;",
        "        the broker's ack comes earlier, once the message is journaled.",
        "rmq-s3: reference = bench/reference_consumer.py (pika + boto3: get, workspace, run,",
        "        upload output.tar, ack); the 0.0.49 python remote worker is broken (spec J.10).",
    ),
}


def transport_rows(results: Results, transport: str) -> list[str]:
    lines = []
    for label, name in LATENCY_ROWS[transport]:
        values = [1000 * getattr(s, name) for s in results.latency[transport]]
        lines.append(row(f"{transport:<7} {label}", "ms", values))
    for slots in (1, 2):
        name = f"{transport:<7} throughput, studio-agent, {slots} worker(s)"
        lines += throughput_rows(name, results.agent[transport, slots])
    if results.floor:
        lines += floor_rows(results, transport)
    if transport == "rmq-s3" and results.reference:
        lines += reference_rows(results)
    return lines


def reference_rows(results: Results) -> list[str]:
    """The minimal pika + boto3 runner, and studio-agent's 1-worker throughput against it."""
    lines = throughput_rows(
        "rmq-s3  throughput, reference consumer (pika+boto3)", results.reference
    )
    ratio = statistics.median(results.reference) / statistics.median(results.agent["rmq-s3", 1])
    lines.append(row("rmq-s3  ratio studio-agent 1 worker / reference", "x", [ratio], 2))
    return lines


def floor_rows(results: Results, transport: str) -> list[str]:
    """The floor, the agent's time per experiment above it, and the throughput ratio."""
    floor = statistics.median(results.floor)
    one = results.agent[transport, 1]
    lines = throughput_rows(f"{transport:<7} floor: the script alone, back to back", results.floor)
    if transport == "local":
        above = [1000 * (s - floor) for s in one]
        lines.append(row(f"{transport:<7} agent time per experiment above the floor", "ms", above))
    ratio = floor / statistics.median(one)
    lines.append(row(f"{transport:<7} ratio studio-agent 1 worker / floor", "x", [ratio], 2))
    return lines


def baseline_rows(results: Results) -> list[str]:
    lines = throughput_rows("local   throughput, studio-local-worker 0.0.49", results.worker)
    lines += throughput_rows("local     same, launch -> exit (with start-up)", results.worker_wall)
    baseline = statistics.median(60 / s for s in results.worker)
    for slots in (1, 2):
        ratio = statistics.median(60 / s for s in results.agent["local", slots]) / baseline
        lines.append(
            row(f"local   ratio studio-agent {slots} worker(s) / studioml", "x", [ratio], 2)
        )
    return lines


def sealed_rows(results: Results) -> list[str]:
    """Envelopes on the local queue against the clear runs of the same bench run."""
    sealed = [1000 * s.to_start for s in results.latency["local-enc"]]
    clear = statistics.median(1000 * s.to_start for s in results.latency["local"])
    lines = [
        row("local   encrypted 4096-bit: enqueue -> process start", "ms", sealed),
        row("          added against clear text", "ms", [s - clear for s in sealed]),
    ]
    for name, unit, values in results.opening:
        lines.append(row(f"in-proc {name}", unit, values, 3))
    return lines


def report(results: Results) -> str:
    lines = [f"{'':<{NAME}} {'unit':<8} {'median':>9} {'min':>9} {'max':>9} {'n':>4}"]
    notes: list[str] = []
    for transport in TRANSPORTS:
        if transport in results.latency:
            lines += transport_rows(results, transport)
            notes += NOTES.get(transport, ())
        if transport == "local" and "local-enc" in results.latency:
            lines += sealed_rows(results)
        if transport == "local" and results.worker:
            lines += baseline_rows(results)
    if results.services:
        notes.append(f"rmq-s3: {results.services}, on loopback; amqp_refresh 1s.")
    return "\n".join(lines + notes)


def header(options: argparse.Namespace) -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"studio-agent {__version__}: Python {platform.python_version()} "
        f"({platform.python_implementation()}), {cpus} CPUs, {platform.platform()}\n"
        f"trivial experiment, warm env cache, poll_interval {DEFAULT_POLL} s (default); "
        f"{options.runs} latency runs; throughput: {options.experiments} experiments a round, "
        f"{options.rounds} rounds per setting{baseline_note(options)}; "
        f"transports: {', '.join(selected(options))}"
    )


def baseline_note(options: argparse.Namespace) -> str:
    if options.skip_baseline or "local" not in selected(options):
        return ""
    return f", {options.baseline_rounds} for studioml"


# -- command line ------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--transport", choices=[*TRANSPORTS, "all"], default="all", help="what to measure (all)"
    )
    parser.add_argument("--runs", type=positive, default=10, help="latency runs (10)")
    parser.add_argument(
        "--experiments", type=positive, default=20, help="experiments per throughput round (20)"
    )
    parser.add_argument("--rounds", type=positive, default=5, help="agent rounds per setting (5)")
    parser.add_argument("--baseline-rounds", type=positive, default=3, help="studioml rounds (3)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run studioml")
    parser.add_argument(
        "--skip-encrypted", action="store_true", help="no encrypted-message rows (local)"
    )
    options = parser.parse_args(argv)
    if options.experiments < 2:
        parser.error("--experiments must be at least 2")
    return options


def selected(options: argparse.Namespace) -> tuple[str, ...]:
    return TRANSPORTS if options.transport == "all" else (options.transport,)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: no process is left behind


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    print(header(options), flush=True)
    results = Results()
    with tempfile.TemporaryDirectory(prefix="studio-agent-bench-") as tmp:
        layout = make_layout(Path(tmp) / "agent")
        if "local" in selected(options):
            measure_agent(layout, local_transport(layout), options, results)
            measure_floor(layout, options, results)
            if not options.skip_encrypted:
                measure_sealed(layout, options, results)
            if not options.skip_baseline:
                measure_worker(Path(tmp), layout, options, results)
        if "rmq-s3" in selected(options):
            measure_rmq(layout, options, results)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
