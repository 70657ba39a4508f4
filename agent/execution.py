"""The experiment's process: started inside its confinement, watched, and ended with its tree.

With a cgroup, "the tree" is the cgroup: every process the experiment forks, whatever it does
with sessions, ends with it, and the kernel's OOM kill is told apart from a crash. Without one
(``isolation: off``, or no hierarchy the agent may use) it is the session and its descendants,
found through /proc (agent.process).
"""

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent import process
from agent.executors.base import RunContext
from agent.sandbox import Confinement
from agent.units import format_size

Ended = Literal["completed", "failed", "timeout", "cancelled"]


@dataclass
class Result:
    status: Ended
    exit_code: int | None
    detail: str


class Execution:
    """One start of the experiment's command; ``run`` returns when it and its tree are gone."""

    def __init__(
        self,
        ctx: RunContext,
        confinement: Confinement | None,
        kill_grace: float,
        cancelled: threading.Event,
        checkpoint: Callable[[], object],
        interval: float,
    ) -> None:
        self.ctx = ctx
        self.confinement = confinement
        self.kill_grace = kill_grace
        self.cancelled = cancelled
        self.checkpoint = checkpoint
        self.interval = interval
        self.pid = 0

    def run(
        self,
        argv: list[str],
        env: dict[str, str],
        limit: float,
        on_start: Callable[[int], None] = lambda pid: None,
    ) -> Result:
        argv, env = self._launch(argv, env)
        proc = process.spawn(argv, self.ctx.workspace, env, self.ctx.output_file)
        self.pid = proc.pid
        self._record(proc, self.ctx.home / "process.json")
        on_start(proc.pid)
        try:
            status, code = self._watch(proc, time.monotonic() + limit)
        finally:
            self._stop(proc)  # whatever it left running in the background dies with it
        return Result(status, code, self._detail(status, code, limit))

    def _launch(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return self.confinement.launch(argv, env) if self.confinement is not None else (argv, env)

    def _record(self, proc: "subprocess.Popen[bytes]", path: Path) -> None:
        """Remember the child, so that an agent started after this one was killed ends it."""
        extra = self.confinement.record() if self.confinement is not None else {}
        path.write_text(
            json.dumps({"pid": proc.pid, "start": process.start_time(proc.pid), **extra})
        )

    def _stop(self, proc: "subprocess.Popen[bytes]") -> None:
        group = self.confinement.cgroup if self.confinement is not None else None
        if group is not None:
            group.kill(self.kill_grace)
            proc.wait()
        else:
            process.kill_tree(proc.pid, self.kill_grace, proc)

    def _watch(self, proc: "subprocess.Popen[bytes]", deadline: float) -> tuple[Ended, int | None]:
        exit_watch = process.ExitWatch(proc)
        try:
            return self._watch_until_end(proc, exit_watch, deadline)
        finally:
            exit_watch.close()

    def _watch_until_end(
        self, proc: "subprocess.Popen[bytes]", exit_watch: process.ExitWatch, deadline: float
    ) -> tuple[Ended, int | None]:
        next_checkpoint = time.monotonic() + self.interval
        while True:
            now = time.monotonic()
            code = exit_watch.wait(max(0.0, min(0.25, deadline - now, next_checkpoint - now)))
            if code is not None:
                return ("completed" if code == 0 else "failed"), code
            now = time.monotonic()
            if self.cancelled.is_set():
                self._stop(proc)
                return "cancelled", proc.returncode
            if now >= deadline:
                self._stop(proc)
                return "timeout", proc.returncode
            if now >= next_checkpoint:
                self.checkpoint()
                next_checkpoint = time.monotonic() + self.interval

    def _detail(self, status: Ended, code: int | None, limit: float) -> str:
        if status == "failed" and self.confinement is not None and self.confinement.oom_killed():
            memory = self.confinement.cgroup.limits.memory if self.confinement.cgroup else None
            over = f" of {format_size(memory)}" if memory else ""
            return f"killed by the kernel: it went over its memory limit{over} (exit status {code})"
        return {
            "completed": "exit status 0",
            "failed": f"exit status {code}",
            "timeout": f"killed after its time limit of {limit:.0f}s",
            "cancelled": "stopped by the agent's shutdown; the message goes back to its queue",
        }[status]
