"""``studio-agent drain | pause | resume | abort``: the operator's commands to a running agent,
over its control socket (agent.control). Each prints the agent's answer; ``drain --wait`` follows
the drain until nothing runs, with a progress line on a terminal."""

import argparse
import sys
import time
from typing import Any

from agent.control import ControlError, send
from agent.settings import Settings

EX_OK, EX_FAILED, EX_UNAVAILABLE = 0, 1, 69
CONTROL_VERBS = ("drain", "pause", "resume", "abort")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    keep = argparse.ArgumentParser(add_help=False)
    keep.add_argument(
        "--persist", action="store_true", help="keep the change across restarts (control.json)"
    )
    drain = commands.add_parser(
        "drain", parents=[common, keep], help="finish what runs, take nothing new, stay up"
    )
    drain.add_argument("--wait", action="store_true", help="return once nothing runs")
    for verb, what in (("pause", "take nothing from"), ("resume", "take work again from")):
        sub = commands.add_parser(
            verb, parents=[common, keep], help=f"{what} a queue, a credential, or every queue"
        )
        sub.add_argument("target", nargs="?", default="", help="queue or credential (all)")
    abort = commands.add_parser(
        "abort", parents=[common], help="end a running experiment; its results are kept"
    )
    abort.add_argument("key", help="the experiment key")


def control_command(settings: Settings, options: argparse.Namespace) -> int:
    path = settings.effective_control_socket
    target = getattr(options, "target", "") or getattr(options, "key", "")
    try:
        answer = send(path, options.command, target, getattr(options, "persist", False))
    except ControlError as exc:
        print(f"studio-agent: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(answer.get("message", answer))
    if not answer.get("ok"):
        return EX_FAILED
    if options.command == "drain" and options.wait:
        return _wait_for_drain(settings)
    return EX_OK


def _wait_for_drain(settings: Settings) -> int:
    """Ask the agent every second until nothing runs; a progress line on a terminal."""
    began, terminal = time.monotonic(), sys.stdout.isatty()
    while True:
        try:
            status = send(settings.effective_control_socket, "status").get("status", {})
        except ControlError as exc:
            print(f"\nstudio-agent: {exc}", file=sys.stderr)
            return EX_UNAVAILABLE
        running = status.get("experiments", [])
        if status.get("mode") != "draining":
            print(("\r" if terminal else "") + f"drained after {time.monotonic() - began:.0f}s")
            return EX_OK
        if terminal:
            line = f"\rdraining: {len(running)} running ({', '.join(running)[:60]}), "
            print(f"{line}{time.monotonic() - began:.0f}s", end="", flush=True)
        time.sleep(1.0)
