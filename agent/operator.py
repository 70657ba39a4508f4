"""What the operator asked of the running agent: drain, pauses, aborts (``agent.control`` brings
the commands). Applied by the supervisor's loop alone; kept in ``<state_dir>/control.json`` when
a command says ``--persist``, so a restart comes back drained or paused.

A pause names a queue, a credential (``rabbitmq/main``, or its name alone) or everything; it
holds the queue in its backend (``QueueBackend.hold``), which no failure backoff or admission
lifts. A drain takes nothing new and stays up; ``resume`` with no target ends the drain and
every pause. Every change is one event: a journal line and a Slack message.
"""

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.control import Command
from agent.queues.base import Hold, QueueBackend
from agent.report.events import Event, Events
from agent.settings import Settings

log = logging.getLogger(__name__)

STATE_FILE = "control.json"
EVERYTHING = "*"


class Operator:
    def __init__(self, state_dir: Path, events: Events):
        self.file = state_dir / STATE_FILE
        self.events = events
        self.draining = False
        self.paused: set[str] = set()
        self._load()

    # -- what the loop asks ----------------------------------------------------------------

    def mode(self, running: int) -> str:
        if self.draining:
            return "draining" if running else "drained"
        return "paused" if EVERYTHING in self.paused else "running"

    def hold_for(self, backend: QueueBackend) -> Hold:
        """What the pauses hold of ``backend``: the queues they name, or all (it or "*")."""
        paused = frozenset(self.paused)
        names = {backend.name, f"{backend.kind}/{backend.name}", backend.kind, EVERYTHING}
        return Hold(paused, everything=bool(names & paused))

    def describe(self) -> dict[str, Any]:
        return {
            "draining": self.draining,
            "paused": sorted(self.paused),
            "persisted": self.file.exists(),
        }

    # -- commands ----------------------------------------------------------------------------

    def apply(self, command: Command, abort: Callable[[str, str], bool], status: Any) -> None:
        """Carry out ``command`` and answer it; ``abort(key, why)`` ends a running experiment."""
        who = f"uid {command.peer_uid}"
        if command.verb == "status":
            command.reply(True, "status", status=status())
            return
        if command.verb == "abort":
            why = f"aborted by the operator ({who})"
            if abort(command.target, why):
                self._say(f"operator ({who}): abort {command.target}")
                command.reply(True, f"aborting {command.target}: its results are being saved")
            else:
                command.reply(False, f"no experiment {command.target} runs here")
            return
        text = self._change(command.verb, command.target)
        if command.persist:
            self._save()
            text += " (persisted)"
        self._say(f"operator ({who}): {text}")
        command.reply(True, text, control=self.describe())

    def _change(self, verb: str, target: str) -> str:
        if verb == "drain":
            self.draining = True
            return "drain: finishing what runs, taking nothing new"
        if verb == "pause":
            self.paused.add(target or EVERYTHING)
            return f"pause {target or 'every queue'}"
        if target:
            self.paused.discard(target)
            return f"resume {target}"
        self.draining, self.paused = False, set()
        return "resume: taking work on every queue"

    def _say(self, text: str) -> None:
        self.events.emit(Event("operator_control", text, {"CONTROL": text}, level=logging.WARNING))

    # -- persistence -------------------------------------------------------------------------

    def _save(self) -> None:
        temporary = self.file.with_name(f".{STATE_FILE}.tmp")
        temporary.write_text(json.dumps({"draining": self.draining, "paused": sorted(self.paused)}))
        os.replace(temporary, self.file)

    def _load(self) -> None:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("%s: not read (%s); starting without the saved state", self.file, exc)
            return
        self.draining = data.get("draining") is True
        self.paused = {p for p in data.get("paused", []) if isinstance(p, str)}
        if self.draining or self.paused:
            log.warning("operator state from %s: %s", self.file, self.describe())


class Limits:
    """``max_experiments`` and ``max_idle``: when the agent should take nothing more and exit."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tasks = 0  # experiments started
        self._idle_since = time.monotonic()

    def started(self) -> None:
        self.tasks += 1

    def settled(self, running: int) -> None:
        if not running:
            self._idle_since = time.monotonic()

    def until_idle_limit(self) -> float:
        """Seconds until max_idle would be reached with nothing running (inf without one)."""
        if not self.settings.max_idle:
            return math.inf
        return max(0.0, self._idle_since + self.settings.max_idle - time.monotonic())

    def reached(self, running: int) -> str:
        """Why to stop taking work ("" while neither limit is reached)."""
        settings = self.settings
        if settings.max_experiments and self.tasks >= settings.max_experiments:
            return f"max_experiments {settings.max_experiments} reached"
        idle = time.monotonic() - self._idle_since
        if settings.max_idle and not running and idle >= settings.max_idle:
            return f"idle for {idle:.0f}s (max_idle {settings.max_idle:.0f}s)"
        return ""
