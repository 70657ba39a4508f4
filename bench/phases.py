"""Where a trivial experiment's wall time goes inside the agent, phase by phase.

Runs a real agent (as bench/overhead.py configures it: local queue, 1 slot, warm environment)
in a child process whose code is this file: it wraps the agent's phase functions in timers
before it starts the agent as ``studio-agent run`` would. The parent drains ``--experiments``
trivial experiments through it and prints each phase's median wall time and count. The timers
add a few microseconds each; the figures are for comparing phases, not for the overhead goal
(bench/overhead.py measures that without them).

Usage: ``.venv/bin/python bench/phases.py [--experiments 60]``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIMES: dict[str, list[float]] = collections.defaultdict(list)
REPORT = "phases:"  # the child's table starts after this line


def timed(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[label].append((time.perf_counter() - started) * 1000)

    setattr(owner, name, wrapper)


def instrument() -> None:
    """Timers on the phases; module attributes are wrapped where their callers look them up."""
    from agent import checkpoint, execution, experiment, gate, process, rundir, supervisor
    from agent.executors import DispatchingExecutor
    from agent.queues.local import LocalQueue
    from agent.storage import database

    run = experiment.ExperimentRun
    for name in ("run", "_fetch_inputs", "_start_recording", "_confine", "_execute", "_finish"):
        timed(run, name, f"experiment {name}")
    timed(execution.Execution, "_watch", "  child running (exit seen)")
    timed(execution.Execution, "_stop", "  child's tree ended")
    timed(rundir, "lay_out", "run dir laid out")
    timed(process, "spawn", "  child spawned")
    timed(DispatchingExecutor, "prepare", "environment lease")
    timed(database, "mark_running", "  database: running")
    timed(database, "mark_finished", "  database: finished")
    timed(checkpoint.Checkpointer, "checkpoint", "  results saved (and checkpoints)")
    timed(gate.Gate, "admit", "message admitted (gate)")
    timed(LocalQueue, "receive", "message taken (local queue)")
    timed(supervisor.Supervisor, "_write_status", "status.json written")
    timed(supervisor.Supervisor, "_launch", "experiment thread started")


def agent_main(config: str, seconds: float) -> None:
    instrument()

    def report_then_exit() -> None:
        time.sleep(seconds)
        lines = [REPORT] + [
            f"  {name:<40} {statistics.median(values):>8.2f} {len(values):>5}"
            for name, values in sorted(TIMES.items(), key=lambda kv: -statistics.median(kv[1]))
        ]
        print("\n".join(lines), flush=True)
        os._exit(0)

    threading.Thread(target=report_then_exit, daemon=True).start()
    from agent.cli import main

    sys.argv = ["studio-agent", "run", "--config", config]
    main()


def drive(experiments: int) -> None:
    import overhead

    with tempfile.TemporaryDirectory(prefix="bench-phases-") as tmp:
        layout = overhead.make_layout(Path(tmp) / "agent")
        config = overhead.agent_config(layout, 1, "phases", {})
        log = layout.root / "phases.log"
        seconds = 20 + experiments * 0.2  # the child reports after this long
        argv = [sys.executable, __file__, "--agent", str(config), "--seconds", str(seconds)]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=overhead.ROOT, stdout=out, stderr=subprocess.STDOUT)
        overhead.wait_for_line(log, "studio-agent ready", proc, 60)
        overhead.run_one(layout, proc)  # builds the environment
        prepared = [overhead.prepare(layout) for _ in range(experiments)]
        started = time.perf_counter()
        for _, body in prepared:
            overhead.enqueue(layout.root / "queue", overhead.QUEUE, body)
        overhead.wait_until(lambda: not overhead.pending(layout), proc, 600)
        per = (time.perf_counter() - started) * 1000 / experiments
        proc.wait(timeout=seconds + 60)
        text = log.read_text()
        print(f"{experiments} trivial experiments, local queue, 1 slot: {per:.1f} ms each")
        print(f"  {'phase (nested ones indented)':<40} {'ms p50':>8} {'n':>5}")
        print(text[text.index(REPORT) + len(REPORT) + 1 :].rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=60)
    parser.add_argument("--agent", help=argparse.SUPPRESS)  # the child's mode: this config
    parser.add_argument("--seconds", type=float, default=40.0, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.agent:
        agent_main(options.agent, options.seconds)
    else:
        drive(options.experiments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
