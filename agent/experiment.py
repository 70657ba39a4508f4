"""One run of one experiment, end to end: fetch, prepare, execute under its sandbox, checkpoint,
upload, outcome.

This module knows no queue: it takes a parsed request and returns an ``Outcome``; the supervisor
decides what that means for the message. An experiment can therefore run with no broker at all.
Each step has its own module: agent.rundir (layout and inputs), the executor (the environment),
agent.execution (the process in its confinement), agent.checkpoint (uploads).
"""

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from agent import childenv, process, rundir, stop_check, trust
from agent.checkpoint import Checkpointer
from agent.errors import AgentError, PermanentError, TransientError
from agent.execution import Execution
from agent.executors.base import Executor, Launch, RunContext
from agent.recorder import RunRecorder
from agent.request import Request
from agent.sandbox import Confinement, Sandbox
from agent.settings import Settings
from agent.stop_check import StopCheck
from agent.storage import database
from agent.storage.base import StorageOptions

log = logging.getLogger(__name__)

MEMORY_EVERY = 10.0  # seconds between two looks at an experiment's memory
# A save still going after this long frees the run's slot for the next message. Not at once:
# a short save (a small output to local storage) overlapped with the next run's start gained
# nothing and made the ack later, the two threads taking turns at the GIL (bench/overhead.py,
# alternating runs: process end -> ack 29 ms against 18-24 ms), while a long one (a model to S3)
# would idle a GPU for minutes.
SAVE_ALONE = 0.1
Status = Literal["completed", "failed", "timeout", "expired", "cancelled", "aborted", "error"]


@dataclass
class Outcome:
    key: str
    status: Status
    detail: str = ""
    exit_code: int | None = None
    transient: bool = False  # True: the message goes back to its queue for another try
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    uploaded_bytes: int = 0
    output_tail: str = ""  # the last lines of the experiment's output, for reports


class ExperimentRun:
    """Runs one request; ``cancel`` (from another thread) stops it and keeps what it produced."""

    def __init__(
        self,
        request: Request,
        settings: Settings,
        executor: Executor,
        queue: str = "",
        gpus: tuple[str, ...] = (),  # UUIDs of the cards admission assigned to this run
        storage: StorageOptions | None = None,  # the request's source's policy (agent.trust)
        on_phase: Callable[[str], None] = lambda phase: None,  # fetching, installing, ...
        sandbox: Sandbox | None = None,  # None: unconfined, as the agent (isolation: off)
        devices: tuple[str, ...] = (),  # the /dev nodes of the assigned cards
    ):
        self.request = request
        self.queue = queue  # only to label the run's metadata; the run knows no queue
        self.settings = settings
        self.executor = executor
        self.sandbox = sandbox
        self.devices = devices
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.home = settings.effective_work_dir / self.run_id
        # A run made without a source (tests, benchmarks) is trusted as a local queue's.
        self.storage = storage or trust.storage_options(settings, local_source=True)
        self.fetcher = rundir.Fetcher(request, self.storage)
        self.ctx = RunContext(
            request,
            self.home,
            self.home / "experiments" / request.key / "output" / "output",
            gpus,
            fetch=self.fetcher,
        )
        self.confinement: Confinement | None = None
        self._cancelled = threading.Event()
        self.aborted = ""  # why, once abort() was called
        self.pid = 0  # the experiment's process, once started (for studio-agent status)
        self._memory = (-MEMORY_EVERY, 0)  # (when measured, resident bytes of its tree)
        self.saver = Checkpointer(self.ctx, settings, self.storage)
        self._fetched: tuple[int, float] = (0, 0.0)  # bytes and seconds, for the runner log
        self.on_phase = on_phase
        # Called, from a timer thread, once nothing of the run is left on its slot (processes,
        # cgroup, identity, GPUs) and its results have been saving for SAVE_ALONE: the
        # supervisor starts the next run meanwhile.
        self.on_free: Callable[[], None] = lambda: None

    @property
    def recorder(self) -> RunRecorder | None:
        return self.saver.recorder

    def cancel(self) -> None:
        self._cancelled.set()

    def memory(self) -> int:
        """Resident bytes of the experiment's tree, measured at most every MEMORY_EVERY: without
        a children index in /proc a measure scans every process, and status is written at each
        start and settle (the fleet bench's busy drains showed it in the agents' CPU)."""
        now = time.monotonic()
        if self.pid and now - self._memory[0] >= MEMORY_EVERY:
            self._memory = (now, process.tree_memory(self.pid))
        return self._memory[1]

    def abort(self, why: str) -> None:
        """End the run for good: its tree is killed, what it made is uploaded, and its message
        is settled, not run again (``cancel`` gives the message back instead)."""
        self.aborted = why
        self._cancelled.set()

    def run(self) -> Outcome:
        try:
            return self._run()
        finally:
            self._release_confinement()  # whatever failed: never leave a slot or a cgroup behind

    def _run(self) -> Outcome:
        outcome = Outcome(self.request.key, "failed")
        limit = min(self.request.time_limit(time.time()), self.settings.max_runtime)
        if limit <= 0:
            outcome.status, outcome.detail = (
                "expired",
                "experimentLifetime passed before it started",
            )
            return self._finish(outcome, upload=False)
        try:
            # Phase "fetching" was entered by the gate, which checked and admitted the request.
            rundir.lay_out(self.ctx)
            self._fetch_inputs()
            self._start_recording()
            self._confine()
            self.on_phase("installing")
            launch = self.executor.prepare(self.ctx, self.base_env)
            self._record(f"environment ready: {launch.argv[0]}")
            if self._cancelled.is_set():
                launch.release()
                if self.aborted:
                    raise PermanentError(f"{self.aborted} before it started")
                raise TransientError("stopped by the agent's shutdown before it started")
            try:
                self._execute(launch, limit, outcome)
            finally:
                launch.release()
        except (TransientError, OSError) as exc:
            # Disk full, permissions, storage or index down: not the experiment's fault.
            outcome.status, outcome.detail, outcome.transient = "error", str(exc), True
            self._record(f"infrastructure error, the message goes back: {exc}")
        except PermanentError as exc:
            outcome.status, outcome.detail = ("aborted" if self.aborted else "failed"), str(exc)
            self._note(f"experiment failed before it ran: {exc}")
            self._record(f"failed before it ran: {exc}")
        return self._finish(outcome, upload=True)

    def _fetch_inputs(self) -> None:
        fetched, seconds, prints = self.fetcher.inputs(self.ctx)
        self.saver.fingerprints.update(prints)
        self._note(f"experiment {self.request.key} on {socket.gethostname()} (run {self.run_id})")
        self._fetched = (fetched, seconds)

    def _confine(self) -> None:
        """The run's identity and cgroup, before anything of the request's runs (its builds)."""
        if self.sandbox is None:
            return
        need = self.request.experiment.resources_needed
        self.confinement = self.sandbox.confine(
            self.run_id, self.ctx.scratch, need.size("ram"), need.cpus, self.devices
        )
        self.ctx = dataclasses.replace(self.ctx, confine=self.confinement)
        self.saver.ctx = self.ctx
        # Before the first process of the request's (its package build): an agent started
        # after this one was killed finds the cgroup and ends whatever is in it.
        process.record_run(self.home / "process.json", 0, self.confinement.record())
        rundir.hand_over(self.ctx, self.confinement)

    def _release_confinement(self) -> None:
        """End what is left of the run, take its folders back, free its slot and cgroup."""
        if self.confinement is not None:
            self.confinement.close(self.settings.kill_grace, owned=self.home)
            self.confinement = None

    def _start_recording(self) -> None:
        """The run's ``_metadata`` files, when the request has that artifact."""
        if "_metadata" not in self.request.experiment.artifacts:
            return
        self.saver.recorder = RunRecorder(
            self.request,
            self.ctx.artifact_dir("_metadata"),
            self.ctx.output_file,
            self.queue,
            self.settings.metadata_max_bytes,
        )
        fetched, seconds = self._fetched
        self._record(f"artifacts fetched: {fetched} bytes in {seconds:.2f}s")

    def _record(self, text: str) -> None:
        if self.recorder is not None:
            self.recorder.note(text)

    @functools.cached_property
    def base_env(self) -> dict[str, str]:
        """The clean environment both the executor and the child start from."""
        home = self.ctx.child.home
        return childenv.base_env(self.settings.pass_env, self.ctx.scratch, home)

    def child_env(self, launch: Launch) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(launch.env)
        for name, value in self.request.config.env.items():
            env[name] = childenv.expand_percent(value, env)
        env.update(
            STUDIOML_EXPERIMENT=self.request.key,
            STUDIOML_HOME=str(self.home),
            STUDIOML_ARTIFACT_MAPPING=str(rundir.mapping_file(self.ctx)),
            PYTHONUNBUFFERED="TRUE",
        )
        # Last: neither config.env nor the executor may widen it.
        env.update(childenv.gpu_env(self.ctx.gpus))
        return env

    def _execute(self, launch: Launch, limit: float, outcome: Outcome) -> None:
        if self.settings.stop_check and stop_check.stopped(self.request, self.storage):
            self.aborted = stop_check.WHY  # while it waited or its environment was built
            raise PermanentError(f"{stop_check.WHY}, before it started")
        if self.settings.update_local_db:
            database.mark_running(self.request.config, self.request.key, self.storage.local_roots)
        argv, env = launch.command(self.child_env(launch))
        self.on_phase("running")
        execution = Execution(
            self.ctx,
            self.confinement,
            self.settings.kill_grace,
            self._cancelled,
            self.saver.checkpoint,
            self.saver.interval(),
        )
        started = functools.partial(self._started, launch, limit)
        with StopCheck(self.request, self.storage, self.settings.stop_check, self.abort):
            result = execution.run(argv, env, limit, started)
        outcome.status, outcome.exit_code, outcome.detail = (
            result.status,
            result.exit_code,
            result.detail,
        )
        outcome.transient = result.status == "cancelled"
        if outcome.transient and self.aborted:
            outcome.status, outcome.detail, outcome.transient = "aborted", self.aborted, False
        self._record(f"stopped: {outcome.status}, {outcome.detail}")
        if result.status != "completed":
            self._note(outcome.detail)

    def _started(self, launch: Launch, limit: float, pid: int) -> None:
        self.pid = pid
        log.info("experiment %s started as pid %d: %s", self.request.key, pid, launch.argv[1:2])
        self._record(f"started as pid {pid}, time limit {limit:.0f}s")

    def checkpoint(self, final: bool = False) -> int:
        return self.saver.checkpoint(final)

    def _finish(self, outcome: Outcome, upload: bool) -> Outcome:
        self.on_phase("uploading")
        # The slot first: the run's processes end, its files come back to the agent (so the tar
        # reads what no process of the run can still change), and the next run may start while
        # these results are saved. The message is acknowledged only after they are.
        self._release_confinement()
        with self._slot_freed_if_slow():
            return self._save(outcome, upload)

    @contextlib.contextmanager
    def _slot_freed_if_slow(self) -> Iterator[None]:
        timer = threading.Timer(SAVE_ALONE, self.on_free)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _save(self, outcome: Outcome, upload: bool) -> Outcome:
        """The final checkpoint, the record, the run directory removed."""
        if self.recorder is not None:
            self.recorder.runner["outcome"] = outcome.status
            status = "completed" if outcome.status == "completed" else "failed"
            self.recorder.update(status, outcome.exit_code, final=True)
        if upload and self.home.exists():
            try:
                outcome.uploaded_bytes = self.saver.checkpoint(final=True)
            except AgentError as exc:
                outcome.status, outcome.transient = "error", True
                outcome.detail = f"results not saved: {exc}"
        outcome.finished = time.time()
        outcome.output_tail = self._output_tail()
        if self.settings.update_local_db and not outcome.transient:
            roots = self.storage.local_roots
            status = database.STOPPED if outcome.status == "aborted" else "finished"
            database.mark_finished(self.request.config, self.request.key, status, roots)
        if not self.settings.keep_workdir:
            shutil.rmtree(self.home, ignore_errors=True)
        return outcome

    def _output_tail(self, limit: int = 2000) -> str:
        """The end of the output file (read before the run directory is removed)."""
        try:
            with self.ctx.output_file.open("rb") as out:
                out.seek(max(out.seek(0, os.SEEK_END) - limit, 0))
                return out.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _note(self, text: str) -> None:
        """A line from the agent in the experiment's own output, where its user will look."""
        with contextlib.suppress(OSError), self.ctx.output_file.open("ab") as out:
            out.write(f"studio-agent: {text}\n".encode())
