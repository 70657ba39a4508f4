"""studio-agent: runs StudioML experiments from RabbitMQ, SQS, Pub/Sub and local queues.

Commands: run, check-config, status, gpus, submit, metadata, version; and, to a running agent,
drain, pause, resume, abort (agent.cli_control).

Exit codes follow sysexits: 0 clean stop, 2 bad usage, 64 submit input error, 69 a required
backend (the configured broker) did not answer within start_budget, 70 unexpected crash, 75 a
submitted experiment did not finish in time, 78 configuration error (systemd's unit sets
RestartPreventExitStatus=78 so a bad config does not crash-loop).
"""

import argparse
import contextlib
import logging
import signal
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from agent import __version__, cli_control
from agent.errors import BadRequest, ConfigError
from agent.log import setup_logging
from agent.queues.base import QueueBackend
from agent.settings import Settings, effective_config, load_settings

if TYPE_CHECKING:
    from agent.report.events import Events, Sink
    from agent.report.metrics import Metrics
    from agent.report.slack import SlackSink

EX_OK, EX_USAGE, EX_DATAERR, EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 0, 2, 64, 70, 75, 78
EX_UNAVAILABLE = 69
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
log = logging.getLogger("agent")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, help="agent.yaml (default /etc/studio-agent/agent.yaml)"
    )
    parser = argparse.ArgumentParser(prog="studio-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"studio-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[common], help="serve queues until stopped")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    check = commands.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("file", nargs="?", type=Path)
    commands.add_parser("version", help="print the version")
    status = commands.add_parser("status", parents=[common], help="what the running agent does")
    status.add_argument("--json", action="store_true")
    gpus = commands.add_parser("gpus", parents=[common], help="the GPUs and who holds them")
    gpus.add_argument("--json", action="store_true")
    metadata = commands.add_parser("metadata", help="summarize scrape-*.json documents")
    metadata.add_argument("files", nargs="+", type=Path, help="scrape documents or folders of them")
    metadata.add_argument("--project")
    metadata.add_argument("--status", help="e.g. completed, failed, running")
    metadata.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _submit_parser(commands.add_parser("submit", parents=[common], help="enqueue a directory"))
    cli_control.add_parsers(commands, common)
    return parser


def _submit_parser(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("workspace", type=Path, help="directory to send; script arguments follow --")
    sub.add_argument("--script", default="train.py", help="file to run, relative to the workspace")
    sub.add_argument("--queue", default="local_demo")
    sub.add_argument("--key", default="", help="experiment key (default <time>_<uuid4>)")
    sub.add_argument("--storage", type=Path, help="local store (default <state_dir>/storage)")
    sub.add_argument(
        "--requirements", type=Path, help="pip requirements (default <ws>/requirements.txt)"
    )
    sub.add_argument("--pip", action="append", default=[], help="extra package (config.pip)")
    sub.add_argument("--env", action="append", default=[], metavar="K=V", help="config.env entry")
    sub.add_argument("--max-duration")
    sub.add_argument("--lifetime", help="config.experimentLifetime")
    sub.add_argument("--checkpoint", help="config.saveWorkspaceFrequency")
    sub.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the result")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # argparse sub-commands mishandle "--": split the script's arguments off by hand.
    script_args = words[words.index("--") + 1 :] if "--" in words else []
    options = _parser().parse_args(words[: words.index("--")] if "--" in words else words)
    options.args = script_args
    try:
        if options.command == "version":
            print(__version__)
            return EX_OK
        if options.command == "check-config":
            return check_config(options.file)
        if options.command == "metadata":
            return metadata_command(options)
        settings = load_settings(options.config)
        if options.command == "submit":
            return submit_command(settings, options)
        if options.command == "status":
            return status_command(settings, options.json)
        if options.command == "gpus":
            return gpus_command(settings, options.json)
        if options.command in cli_control.CONTROL_VERBS:
            return cli_control.control_command(settings, options)
        return run_command(settings, options.log_level, options.config)
    except ConfigError as exc:
        print(f"studio-agent: configuration error:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except Exception:
        log.exception("studio-agent crashed")
        return EX_SOFTWARE


def _progress() -> "Callable[[str, float], None]":
    """A progress line for long waits, on a terminal only (a pipe gets the result alone)."""

    def show(status: str, waited: float) -> None:
        print(f"\r{status}, {waited:.0f}s ", end="", file=sys.stderr, flush=True)

    return show if sys.stderr.isatty() else (lambda status, waited: None)


def check_config(file: Path | None) -> int:
    from agent.sandbox import Sandbox

    settings = load_settings(file)
    print(yaml.safe_dump(effective_config(settings), sort_keys=True), end="")
    # What experiments would run in here, as comments: the output stays the config's YAML.
    for name, why in Sandbox.from_settings(settings, enable=False).protections().items():
        print(f"# isolation {name}: {'enforced' if not why else 'off: ' + why}")
    return EX_OK


def run_command(settings: Settings, level: str | None, config: Path | None = None) -> int:
    from agent.executors import build_executor
    from agent.queues.factory import static_backends
    from agent.reload import ConfigReload
    from agent.report.metrics import Resources
    from agent.subscriptions import Subscriptions
    from agent.supervisor import Supervisor
    from agent.watch import FolderWatcher

    setup_logging(level or settings.log_level)
    with reporting(settings) as (events, metrics):
        backends = static_backends(settings)
        why = wait_for_required(backends, settings.start_budget)
        if why is None:
            log.info("stopped while waiting for the broker")
            return EX_OK
        if why:
            log.error("a required backend did not answer within start_budget: %s", why)
            return EX_UNAVAILABLE
        subscriptions = Subscriptions(settings, backends, events=events)
        watcher = None
        if settings.certs_dir is not None:
            watcher = FolderWatcher(settings.certs_dir, lambda: None)
        supervisor = Supervisor(settings, subscriptions, build_executor(settings), watcher)
        if watcher is not None:
            watcher.wake = supervisor.wake
        pool = supervisor.sandbox.pool
        supervisor.reload_config = ConfigReload(
            config,
            level or settings.log_level,
            pinned=level is not None,
            slots=pool.size if pool is not None else None,
        )
        if metrics is not None:
            metrics.resources.probe = Resources(settings.effective_work_dir, supervisor.admission)
            metrics.queues.probe = supervisor.served_queues
        return supervisor.run()


@contextlib.contextmanager
def reporting(settings: Settings) -> Iterator["tuple[Events, Metrics | None]"]:
    """The event sinks: Prometheus on metrics_address, Slack when slack_hook is set.

    A metrics_address that cannot be bound is a ConfigError (exit 78). At the end Slack gets a
    few seconds to post what is queued.
    """
    from agent.report import metrics as metrics_seam
    from agent.report.events import Events

    sinks: list[Sink] = []
    metrics = None
    slack: SlackSink | None = None
    if settings.metrics_address:
        metrics = metrics_seam.Metrics()
        metrics.serve(settings.metrics_address)
        metrics_seam.enable(metrics)
        sinks.append(metrics)
    try:
        if settings.slack_hook:
            # Only then: requests (with ssl, urllib3, email) is 16 MiB an agent without Slack
            # does not need.
            from agent.report import slack as slack_sink

            slack = slack_sink.SlackSink(settings.slack_hook, settings.slack_room).start()
            sinks.append(slack)
        yield Events(sinks), metrics
    finally:
        if slack is not None:
            slack.stop(flush_seconds=5.0)
        if metrics is not None:
            metrics_seam.enable(None)
            metrics.close()


def wait_for_required(backends: list[QueueBackend], budget: float) -> str | None:
    """Connect each required backend (the configured broker): "" once all answered; why not
    once ``budget`` seconds have passed; None if SIGTERM/SIGINT came meanwhile (a clean stop).

    Certs-dir credentials are not required: a refused one is retried while the agent runs.
    Meanwhile the broker is ticked, so its queue discovery (and its problems) show in the log.
    """
    if not any(b.kind == "rabbitmq" for b in backends):
        return ""
    from agent.queues.rabbitmq import RabbitQueue  # pika loads only when a broker is configured

    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, _f: stop.append(n)) for sig in STOP_SIGNALS}
    try:
        deadline = time.monotonic() + budget
        for backend in (b for b in backends if isinstance(b, RabbitQueue)):
            backend.tick()  # discovery first, in the running loop's order
            while not backend.connect():
                backend.tick()
                if stop:
                    return None
                if time.monotonic() >= deadline:
                    return f"{backend.name}: {backend.problem} (start_budget {budget:g}s)"
                time.sleep(0.2)
        return ""
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def submit_command(settings: Settings, options: argparse.Namespace) -> int:
    from agent.storage import allowed_root
    from agent.submit import Submission, submit, wait_for

    workspace: Path = options.workspace
    requirements_file = options.requirements or workspace / "requirements.txt"
    requirements = []
    if requirements_file.is_file():
        requirements = [
            ln.strip() for ln in requirements_file.read_text().splitlines() if ln.strip()
        ]
    env = dict(item.split("=", 1) for item in options.env if "=" in item)
    sub = Submission(
        workspace=workspace,
        script=options.script,
        args=list(options.args),
        queue=options.queue,
        queue_root=settings.local.root,
        storage=(options.storage or settings.state_dir / "storage").resolve(),
        key=options.key,
        requirements=requirements,
        pip=list(options.pip),
        env=env,
        max_duration=options.max_duration,
        lifetime=options.lifetime,
        checkpoint=options.checkpoint,
    )
    try:
        request = submit(sub)
    except FileNotFoundError as exc:
        print(f"studio-agent: {exc}", file=sys.stderr)
        return EX_DATAERR
    print(f"submitted experiment {request.key} to {settings.local.root / sub.queue}")
    try:
        allowed_root(sub.storage, settings.effective_local_storage, "the store")
    except BadRequest as exc:
        print(
            f"studio-agent: warning: agents with these settings refuse it: {exc}", file=sys.stderr
        )
    if options.wait is None:
        return EX_OK
    record = wait_for(request.config, request.key, options.wait, sub.storage, _progress())
    if record is None:
        print(
            f"experiment {request.key} did not finish within {options.wait:.0f}s", file=sys.stderr
        )
        return EX_TEMPFAIL
    folder = sub.storage / "artifacts" / "experiments" / request.key
    _print_results(folder, str(record.get("status")))
    return EX_OK


def _print_results(folder: Path, status: str = "finished") -> None:
    print(f"{status}; results in {folder}/")
    for tar_path in sorted(folder.glob("*.tar")):
        print(f"  {tar_path.name}")
    output = folder / "output.tar"
    if output.is_file():
        with tarfile.open(output) as tar:
            member = tar.extractfile("output")
            if member is not None:
                print("--- output ---")
                print(member.read().decode(errors="replace"), end="")


def metadata_command(options: argparse.Namespace) -> int:
    import json

    from agent.metadata_report import load_documents, render_table, summarize

    paths: list[Path] = []
    for given in options.files:
        paths += sorted(given.rglob("scrape-*.json")) if given.is_dir() else [given]
    rows = summarize(load_documents(paths), project=options.project, status=options.status)
    if options.json:
        for row in rows:
            print(json.dumps(row, default=str))
    else:
        print(render_table(rows), end="")
    return EX_OK


def status_command(settings: Settings, as_json: bool) -> int:
    import json

    from agent.status import STATUS_FILE, render

    path = settings.state_dir / STATUS_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"studio-agent: no status in {path}: is the agent running with this config?")
        return EX_TEMPFAIL
    print(
        json.dumps(document, indent=1) if as_json else render(document),
        end="" if not as_json else "\n",
    )
    return EX_OK


def gpus_command(settings: Settings, as_json: bool) -> int:
    """The cards this agent would manage and, from status.json, which experiment holds each."""
    import json
    import os

    from agent.gpus import describe_card, load_inventory
    from agent.status import STATUS_FILE

    inventory = load_inventory(settings.gpu_inventory_file, settings.cpu_only, os.environ)
    holders: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        status = json.loads((settings.state_dir / STATUS_FILE).read_text())
        for held in status.get("resources", {}).get("assignments", []):
            holders.update({uuid: held["key"] for uuid in held.get("gpus", [])})
    if as_json:
        cards = [{**c.to_json(), "assigned_to": holders.get(c.uuid)} for c in inventory.cards]
        print(json.dumps({"gpus": cards, "problem": inventory.problem}, indent=1))
        return EX_OK
    if not inventory.cards:
        print(f"no GPU: {inventory.problem}")
    for card in inventory.cards:
        holder = holders.get(card.uuid)
        print(describe_card(card) + (f"  assigned to {holder}" if holder else "  free"))
    return EX_OK
