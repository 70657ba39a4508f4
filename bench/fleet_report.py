"""The tables of bench/fleet.py: medians per fleet size, this tree against the baseline, goals
next to the figures, and the extrapolation to a large fleet."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from datetime import date

from agent import __version__

CURRENT, BASELINE = "this tree", "baseline"
KINDS = ("local", "rabbitmq", "sqs")  # what may be drained
TARGET_AGENTS, TARGET_QUEUES = 1000, 10  # the extrapolation
MONTH_MIN = 30 * 24 * 60
SQS_PRICE = 0.40 / 1e6  # dollars per request
Samples = dict[str, list[float]]  # "<phase>.<metric>" -> one value per window or run
Results = dict[tuple[str, int], Samples]  # (version, agents) -> its samples

IDLE_ROWS = (  # metric, label, unit; the phase "all" adds ALL_ROWS
    ("cpu", "agent CPU, per agent", "% core"),
    ("rss", "agent RSS, per agent", "MiB"),
    ("polls", "RabbitMQ basic.get, per agent", "/s"),
    ("packets", "RabbitMQ packets in at the broker, per agent", "/s"),
    ("broker_cpu", "RabbitMQ node CPU (the whole node)", "% core"),
)
ALL_ROWS = (
    ("sqs", "SQS requests at moto, per idle queue", "/min"),
    ("moto_cpu", "moto CPU (SQS)", "% core"),
    ("emulator_cpu", "Pub/Sub emulator CPU (it logs no requests)", "% core"),
)
BUSY_ROWS = (
    ("free", "one at a time: enqueue -> experiment start", "ms p50"),
    ("taken", "  of which enqueue -> 'starting' logged", "ms p50"),
    ("drain", "{experiments} at once: drain time", "s"),
    ("agent_cpu", "  agents' own CPU (whole fleet), per experiment", "ms"),
    ("broker_cpu", "  RabbitMQ node CPU, per experiment", "ms"),
    ("p50", "  pickup (enqueue -> experiment start)", "ms p50"),
    ("p99", "  pickup (enqueue -> experiment start)", "ms p99"),
    ("duplicates", "  duplicates (runs beyond the first)", "runs"),
    ("lost", "  lost (never run)", "runs"),
)
GOALS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "rmq.cpu": ("<= 0.5", lambda v: v <= 0.5),
    "rmq.polls": ("0", lambda v: v == 0),
    "all.sqs": ("<= 3", lambda v: v <= 3),
    **{f"{kind}.free": ("<= 20", lambda v: v <= 20) for kind in ("local", "rabbitmq")},
    **{
        f"{kind}.{what}": ("0", lambda v: v == 0)
        for kind in KINDS
        for what in ("duplicates", "lost")
    },
}


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.2f}"


def figure(samples: Samples | None, key: str) -> float | None:
    values = (samples or {}).get(key)
    return statistics.median(values) if values else None


def line(
    count: str, label: str, unit: str, ours: float | None, base: float | None, goal: str
) -> str:
    ratio = f"{ours / base:.2f}x" if ours is not None and base else "-"
    figures = f"{fmt(ours):>11} {fmt(base):>11} {ratio:>8}"
    return f"{count:>6}  {label:<48} {unit:<7} {figures}  {goal}".rstrip()


def verdict(key: str, value: float | None) -> str:
    if key not in GOALS or value is None:
        return ""
    text, meets = GOALS[key]
    return f"{text}: {'pass' if meets(value) else 'FAIL'}"


def section(results: Results, title: str, phase: str, rows: Sequence[tuple[str, ...]]) -> list[str]:
    out = [title]
    for count in sorted({count for _, count in results}):
        ours, base = results.get((CURRENT, count)), results.get((BASELINE, count))
        for index, (metric, label, unit) in enumerate(rows):
            key = f"{phase}.{metric}"
            value, shown = figure(ours, key), str(count) if index == 0 else ""
            out.append(line(shown, label, unit, value, figure(base, key), verdict(key, value)))
    return out


def extrapolate(samples: Samples | None, queues: int) -> list[float | None]:
    """To 1,000 agents x 10 queues: polls and SQS requests scale with queues, other packets
    (heartbeats) with agents."""
    polls, packets, sqs = (figure(samples, k) for k in ("rmq.polls", "rmq.packets", "all.sqs"))
    if polls is None or packets is None or sqs is None:
        return [None] * 4
    pairs = TARGET_AGENTS * TARGET_QUEUES
    month = sqs * pairs * MONTH_MIN
    gets = polls / queues * pairs
    others = max(0.0, packets - polls) * TARGET_AGENTS  # heartbeats
    return [gets, others + gets, month / 1e6, month * SQS_PRICE]


def extrapolation(results: Results, queues: int) -> list[str]:
    out = [f"{TARGET_AGENTS:,} agents x {TARGET_QUEUES} queues, from each fleet's idle rates"]
    labels = (
        ("RabbitMQ basic.get at the broker", "/s"),
        ("RabbitMQ packets in at the broker", "/s"),
        ("SQS requests (30-day month)", "M/month"),
        ("SQS cost at $0.40 per million requests", "$/month"),
    )
    for count in sorted({count for _, count in results}):
        ours = extrapolate(results.get((CURRENT, count)), queues)
        base = extrapolate(results.get((BASELINE, count)), queues)
        for index, (label, unit) in enumerate(labels):
            shown = str(count) if index == 0 else ""
            out.append(line(shown, label, unit, ours[index], base[index], ""))
    return out


def report(results: Results, options: argparse.Namespace) -> str:
    out = [f"{'agents':>6}  {'':<48} {'unit':<7} {CURRENT:>11} {BASELINE:>11} {'ratio':>8}  goal"]
    out += section(results, "idle, 50 RabbitMQ queues per agent", "rmq", IDLE_ROWS)
    title = "idle, 50 queues per agent of each kind: local, RabbitMQ, SQS, Pub/Sub"
    out += section(results, title, "all", IDLE_ROWS + ALL_ROWS)
    busy = [(m, label.format(experiments=options.experiments), u) for m, label, u in BUSY_ROWS]
    for kind in options.busy:
        title = f"busy, {kind} queues: {options.trickle} one at a time, then {options.experiments}"
        out += section(results, title, kind, busy)
    return "\n".join(out + extrapolation(results, options.queues))


def header(options: argparse.Namespace, versions: str) -> str:
    fleets = ", ".join(str(count) for count in options.agents)
    return (
        f"studio-agent {__version__}: Python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} CPUs, {platform.platform()}; {date.today()}\n"
        f"{versions}; fleets of {fleets} agent(s), max_concurrent {options.slots}, "
        f"{options.queues} queues per kind\n"
        f"idle: median of {options.runs} windows of {options.window:g} s, "
        f"{options.warmup:g} s after subscribing; busy: median of {options.runs} runs\n"
        "RabbitMQ: its management API (basic.get counters, connections' recv_cnt); "
        "SQS: request lines in moto's log; Pub/Sub: the emulator's CPU only"
    )
