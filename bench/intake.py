"""What the bounded intake costs per message, and how fast it refuses hostile bodies.

Baseline (in the same process): ``json.loads`` then ``Request.model_validate`` on the real 0.0.49
message in tests/fixtures, which is what the agent did before every message got its bounds. Then
``parse_message`` (the depth scan, the bounds, the catch-all) and ``parse_message`` plus
``trust.check_request`` (what the gate adds before a run), on the same message; then the time to
refuse bodies of ``max_message_size`` (4 MiB) built to be slow: all brackets, flat brackets, one
long string, and 10 000 args.

Usage: ``python bench/intake.py [--runs 7] [--loops 2000]`` (with the project venv). It prints one
table: the median of ``--runs`` runs of ``--loops`` calls each, per call, with the ratio to the
baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.errors import BadRequest  # noqa: E402
from agent.intake import MAX_BODY, parse_message  # noqa: E402
from agent.request import Request  # noqa: E402
from agent.storage.base import StorageOptions  # noqa: E402
from agent.trust import check_request  # noqa: E402

EXAMPLE = (ROOT / "tests" / "fixtures" / "example_message_redacted.json").read_bytes()


def per_call(work: Callable[[], object], loops: int, runs: int) -> float:
    """Median over ``runs`` of the mean seconds per call of ``loops`` calls."""
    return statistics.median(samples(work, loops, runs))


def samples(work: Callable[[], object], loops: int, runs: int) -> list[float]:
    """The mean seconds per call of ``loops`` calls, once for each of ``runs`` runs."""
    found = []
    for _ in range(runs):
        began = time.perf_counter()
        for _ in range(loops):
            work()
        found.append((time.perf_counter() - began) / loops)
    return found


def refusing(body: bytes) -> Callable[[], object]:
    def work() -> object:
        try:
            return parse_message(body)
        except BadRequest as exc:
            return exc

    return work


def hostile_bodies() -> dict[str, bytes]:
    head = b'{"experiment": {"key": "k", "info": '
    fill = MAX_BODY - len(head) - 2
    args = {"experiment": {"key": "k", "args": ["a" * 100] * 10_000}}
    return {
        "4 MiB nested brackets": head + b"[" * fill + b"}}",
        "4 MiB flat brackets": head + b"[" + b"[]," * (fill // 3 - 1) + b"[]]}}",
        "4 MiB one string": head + b'"' + b"x" * (fill - 2) + b'"}}',
        "10 000 args of 100 B": json.dumps(args).encode(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--loops", type=int, default=2000)
    options = parser.parse_args()
    runs, loops = options.runs, options.loops
    baseline = per_call(lambda: Request.model_validate(json.loads(EXAMPLE)), loops, runs)
    request = parse_message(EXAMPLE)
    rows = [
        ("real message: json.loads + model_validate (baseline)", baseline),
        ("real message: parse_message", per_call(lambda: parse_message(EXAMPLE), loops, runs)),
        (
            "real message: parse_message + check_request",
            per_call(lambda: check_request(parse_message(EXAMPLE), StorageOptions()), loops, runs),
        ),
    ]
    assert request.key
    for name, body in hostile_bodies().items():
        rows.append((f"refuse {name}", per_call(refusing(body), max(loops // 500, 1), runs)))
    print(f"intake, {len(EXAMPLE)} B real message, median of {runs} runs")
    print(f"| {'case':<54} | {'per call':>10} | {'ratio':>8} |")
    print(f"|{'-' * 56}|{'-' * 12}|{'-' * 10}|")
    for name, seconds in rows:
        print(f"| {name:<54} | {seconds * 1e6:>7.0f} us | {seconds / baseline:>7.1f}x |")


if __name__ == "__main__":
    main()
