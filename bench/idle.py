"""What an idle agent costs on a local queue: start to READY, CPU and RSS (issue 16's footprint).

Each run starts one real agent (``python -m agent run``) in a temporary directory: a local queue
root with ``--queues`` empty queues, a certs dir (watched, empty), local storage, metrics on an
ephemeral loopback port, as the ``.deb`` runs it less the sandbox. The bench listens on a
``NOTIFY_SOCKET`` of its own, so start to READY is the time from ``Popen`` to the agent's
``READY=1`` datagram (systemd's own definition of started). Then, after ``--settle`` seconds,
it samples CPU (every thread's run time, from /proc/<pid>/task/*/schedstat) over ``--windows``
windows of ``--window`` seconds and VmRSS at the end; the agent is stopped with SIGTERM.

Baselines in the same run: a bare interpreter (``python -c pass`` to exit, for the start; one
sleeping, for RSS), and, with ``--against PATH``, the same runs of another checkout's code
(``PATH`` goes first on PYTHONPATH; add more paths with ``:``, say for a dependency the
other code needs). Runs alternate between the two so drift affects both alike.

Usage: ``.venv/bin/python bench/idle.py [--runs 5] [--against /tmp/old:/tmp/old-deps]``.
Prints one table (medians of ``--runs``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from fleet_support import rss_mib

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"start": 300.0, "cpu": 0.1, "rss": 40.0}  # ms to READY, % of a core, MiB


@dataclass
class Sample:
    start_ms: float
    cpu_pct: float
    rss_mib: float


def cpu_seconds(pid: int) -> float:
    """Time on a CPU of every thread of ``pid``, in ns from schedstat (utime and stime count
    10 ms ticks: too coarse for a process that runs a few ms a second)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between the listing and the read
    return total / 1e9


def write_config(root: Path, queues: int) -> Path:
    for index in range(queues):
        (root / "queues" / f"idle_{index:02d}").mkdir(parents=True)
    (root / "certs").mkdir(mode=0o700)
    (root / "store").mkdir()
    config = {
        "queue_root": str(root / "queues"),
        "queue_match": ".*",
        "state_dir": str(root / "state"),
        "cache_dir": str(root / "cache"),
        "certs_dir": str(root / "certs"),
        "local_storage": [str(root / "store")],
        "metrics_address": "127.0.0.1:0",
        "isolation": "off",
    }
    path = root / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def agent_env(notify: Path, code: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDIO_AGENT", "PYTHON"))}
    env["NOTIFY_SOCKET"] = str(notify)
    if code:
        env["PYTHONPATH"] = code
    return env


def wait_ready(listener: socket.socket, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode} before READY")
        listener.settimeout(0.2)
        try:
            datagram = listener.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in datagram.split(b"\n"):
            return
    raise RuntimeError("no READY=1 within the timeout")


def one_run(code: str | None, options: argparse.Namespace) -> Sample:
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        root = Path(tmp)
        config = write_config(root, options.queues)
        notify = root / "notify.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify))
        argv = [sys.executable, "-m", "agent", "run", "--config", str(config)]
        log = (root / "agent.log").open("wb")
        began = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=code.split(":")[0] if code else ROOT, env=agent_env(notify, code),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_ready(listener, proc, timeout=30)
            start_ms = (time.perf_counter() - began) * 1000
            time.sleep(options.settle)
            cpu = []
            for _ in range(options.windows):
                before, at = cpu_seconds(proc.pid), time.monotonic()
                time.sleep(options.window)
                cpu.append(100 * (cpu_seconds(proc.pid) - before) / (time.monotonic() - at))
            return Sample(start_ms, statistics.mean(cpu), rss_mib(proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            listener.close()


def bare_interpreter() -> Sample:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    start_ms = (time.perf_counter() - began) * 1000
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)
        return Sample(start_ms, 0.0, rss_mib(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()


def median(samples: list[Sample], field: str) -> float:
    return statistics.median(getattr(s, field) for s in samples)


def table(results: dict[str, list[Sample]], options: argparse.Namespace) -> str:
    names = list(results)
    head = f"{'':34}" + "".join(f"{n:>14}" for n in names)
    lines = [
        f"idle agent on {options.queues} local queue(s), certs dir watched, metrics on; "
        f"median of {options.runs} runs; CPU over {options.windows} x {options.window:g} s "
        f"after {options.settle:g} s",
        head + f"{'goal':>10}" + ("       ratio" if "against" in results else ""),
    ]
    rows = [("start to READY (ms)", "start_ms", 1), ("idle CPU (% of a core)", "cpu_pct", 3),
            ("idle RSS (MiB)", "rss_mib", 1)]  # fmt: skip
    for label, field, digits in rows:
        values = [median(results[n], field) for n in names]
        line = f"{label:34}" + "".join(f"{v:>14.{digits}f}" for v in values)
        line += f"{GOALS[field.split('_')[0]]:>10g}"
        if "against" in results and values[names.index("against")]:
            line += f"{values[0] / values[names.index('against')]:>11.2f}x"
        lines.append(line)
    lines.append("ratio: this code / --against code; bare = the interpreter alone (no agent)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--against", help="another checkout to compare with (PYTHONPATH form)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    results: dict[str, list[Sample]] = {"this": [], "bare": []}
    if options.against:
        results["against"] = []
    for run in range(options.runs):
        results["bare"].append(bare_interpreter())
        results["this"].append(one_run(None, options))
        if options.against:
            results["against"].append(one_run(options.against, options))
        print(f"run {run + 1}/{options.runs} done", file=sys.stderr)
    print(table(results, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
