"""Where an agent's milliseconds per experiment go: py-spy on a real agent draining a local queue.

Starts one agent as bench/overhead.py does (local queue, warm environment, 1 slot), runs one
experiment to warm it, then records the agent process with py-spy while it drains
``--experiments`` trivial experiments: by default only samples where a thread holds the GIL
(it runs Python), with ``--wall`` every sample, waits included. It prints the agent's CPU time
per experiment and the functions that hold the samples (inclusive, as a share of them). The
experiments' own processes are not recorded.

Usage: ``.venv/bin/python bench/profile_experiment.py [--experiments 200] [--py-spy PATH]``.
py-spy is not a dependency: ``pip download py-spy`` and unzip the wheel, or ``pip install``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import overhead  # bench/ is on the path when this runs as a script
from idle import cpu_seconds


def functions(raw: Path, top: int) -> list[tuple[float, str]]:
    """(share of samples, function) for the ``top`` functions, inclusive of their callees."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue  # the tail of a frame name that held a newline
        total += int(count)
        names = {frame.split(" (")[0] + " " + _where(frame) for frame in stack.split(";")}
        for name in names:
            inclusive[name] += int(count)
    return [(n / max(1, total), name) for name, n in inclusive.most_common(top)]


def _where(frame: str) -> str:
    inside = frame.partition(" (")[2].rstrip(")")
    return "(" + inside.rsplit(":", 1)[0].replace(str(overhead.ROOT) + "/", "") + ")"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument(
        "--wall", action="store_true", help="wall clock: waiting samples too, not only the GIL's"
    )
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        layout = overhead.make_layout(Path(tmp) / "agent")
        with overhead.running_agent(layout, 1) as proc:
            overhead.run_one(layout, proc)  # builds the environment
            prepared = [overhead.prepare(layout) for _ in range(options.experiments)]
            raw = Path(tmp) / "profile.raw"
            spy = subprocess.Popen(
                [options.py_spy, "record", "--pid", str(proc.pid), "--rate", "500",
                 "--idle" if options.wall else "--gil",
                 "--format", "raw", "--output", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
            cpu_before, started = cpu_seconds(proc.pid), time.perf_counter()
            for _, body in prepared:
                overhead.enqueue(layout.root / "queue", overhead.QUEUE, body)
            overhead.wait_until(lambda: not overhead.pending(layout), proc, 600)
            elapsed, cpu = time.perf_counter() - started, cpu_seconds(proc.pid) - cpu_before
            spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
            spy.wait(timeout=60)
        count = options.experiments
        print(f"{count} trivial experiments on a local queue, 1 slot, warm environment")
        print(f"drain {elapsed:.2f} s: {1000 * elapsed / count:.1f} ms per experiment")
        print(f"agent CPU (all its threads) {1000 * cpu / count:.1f} ms per experiment")
        samples = "all samples (wall clock)" if options.wall else "GIL-holding samples"
        print(f"{'share':>6}  function (inclusive: with what it calls), {samples}")
        for share, name in functions(raw, options.top):
            print(f"{100 * share:>5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
