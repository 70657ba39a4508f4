"""One run of one experiment, end to end: fetch, prepare, execute, checkpoint, upload, outcome.

This module knows no queue: it takes a parsed request and returns an ``Outcome``; the supervisor
decides what that means for the message. An experiment can therefore run with no broker at all.
"""

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent import process, trust
from agent.errors import AgentError, PermanentError, TransientError
from agent.executors.base import Executor, Launch, RunContext
from agent.recorder import RunRecorder
from agent.request import Request
from agent.settings import Settings
from agent.storage import archive, database, transfer
from agent.storage.base import StorageOptions

log = logging.getLogger(__name__)

Status = Literal["completed", "failed", "timeout", "expired", "cancelled", "error"]
# Variables a child may inherit from the agent; everything else stays out (the job never sees
# the agent's own secrets, virtualenv or GPU assignment).
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "SHELL", "TERM")
BASE_ENV_PREFIXES = ("LC_",)
PROXY_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
_PERCENT_VAR = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
# Not an input: the container image reference is the executor's business.
SKIP_FETCH = frozenset({"_singularity"})


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


def clean_env(settings: Settings, tmpdir: Path) -> dict[str, str]:
    """The environment every child starts from: a short allow-list, never the agent's own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k in BASE_ENV
        or k in PROXY_ENV
        or k in settings.pass_env
        or k.startswith(BASE_ENV_PREFIXES)
    }
    agent_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p != agent_bin]
    env["PATH"] = os.pathsep.join(path)
    env["TMPDIR"] = str(tmpdir)
    return env


def gpu_env(uuids: tuple[str, ...]) -> dict[str, str]:
    """What makes the child see exactly its assigned cards (none when ``uuids`` is empty)."""
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(uuids),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # CUDA's numbering then matches NVML's
        "NVIDIA_VISIBLE_DEVICES": ",".join(uuids) or "void",
    }


def expand_percent(value: str, env: Mapping[str, str]) -> str:
    """Expand ``%VAR%`` the way the Go runner does; an unknown variable becomes empty."""
    return _PERCENT_VAR.sub(lambda m: env.get(m.group(1), ""), value)


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
    ):
        self.request = request
        self.queue = queue  # only to label the run's metadata; the run knows no queue
        self.settings = settings
        self.executor = executor
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.home = settings.effective_work_dir / self.run_id
        # A run made without a source (tests, benchmarks) is trusted as a local queue's.
        self.storage = storage or trust.storage_options(settings, local_source=True)
        self.ctx = RunContext(
            request,
            self.home,
            self.home / "experiments" / request.key / "output" / "output",
            gpus,
            self.storage,
        )
        self._cancelled = threading.Event()
        self._fingerprints: dict[str, str] = {}
        self.recorder: RunRecorder | None = None
        self._fetched: tuple[int, float] = (0, 0.0)  # bytes and seconds, for the runner log
        self.on_phase = on_phase

    def cancel(self) -> None:
        self._cancelled.set()

    def run(self) -> Outcome:
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
            self._layout()
            self._fetch_inputs()
            self._start_recording()
            self.on_phase("installing")
            launch = self._prepare()
            self._record(f"environment ready: {launch.argv[0]}")
            if self._cancelled.is_set():
                launch.release()
                raise TransientError("stopped by the agent's shutdown before it started")
            try:
                self._execute(launch, limit, outcome)
            finally:
                launch.release()
        except (TransientError, OSError) as exc:
            # Disk full, permissions, storage down: not the experiment's fault; another try.
            outcome.status, outcome.detail, outcome.transient = "error", str(exc), True
            self._record(f"infrastructure error, the message goes back: {exc}")
        except PermanentError as exc:
            outcome.status, outcome.detail = "failed", str(exc)
            self._note(f"experiment failed before it ran: {exc}")
            self._record(f"failed before it ran: {exc}")
        return self._finish(outcome, upload=True)

    def _layout(self) -> None:
        for label in self.request.experiment.artifacts:
            self.ctx.artifact_dir(label).mkdir(parents=True, exist_ok=True)
        for needed in ("workspace", "output"):
            self.ctx.artifact_dir(needed).mkdir(parents=True, exist_ok=True)
        (self.home / "tmp").mkdir(exist_ok=True)
        mapping = self.home / "artifact_mappings" / self.request.key / "artifacts.json"
        mapping.parent.mkdir(parents=True, exist_ok=True)
        labels = set(self.request.experiment.artifacts) | {"workspace", "output"}
        mapping.write_text(
            json.dumps({lb: str(self.ctx.artifact_dir(lb)) for lb in sorted(labels)})
        )

    def _fetch_inputs(self) -> None:
        budget = self.request.experiment.resources_needed.size("hdd")
        fetched, began = 0, time.monotonic()
        for label, artifact in self.request.experiment.artifacts.items():
            if label in SKIP_FETCH:
                continue
            left = max(budget - fetched, 1) if budget else 0
            fetched += transfer.fetch(
                label,
                artifact,
                self.request.config,
                self.ctx.artifact_dir(label),
                left,
                self.storage,
            )
        for label in self.request.mutable_labels():
            self._fingerprints[label] = archive.tree_fingerprint(self.ctx.artifact_dir(label))
        self._note(f"experiment {self.request.key} on {socket.gethostname()} (run {self.run_id})")
        self._fetched = (fetched, time.monotonic() - began)

    def _start_recording(self) -> None:
        """The run's ``_metadata`` files, when the request has that artifact."""
        if "_metadata" not in self.request.experiment.artifacts:
            return
        self.recorder = RunRecorder(
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
        return clean_env(self.settings, self.home / "tmp")

    def _prepare(self) -> Launch:
        return self.executor.prepare(self.ctx, self.base_env)

    def child_env(self, launch: Launch) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(launch.env)
        for name, value in self.request.config.env.items():
            env[name] = expand_percent(value, env)
        env.update(
            STUDIOML_EXPERIMENT=self.request.key,
            STUDIOML_HOME=str(self.home),
            STUDIOML_ARTIFACT_MAPPING=str(
                self.home / "artifact_mappings" / self.request.key / "artifacts.json"
            ),
            PYTHONUNBUFFERED="TRUE",
        )
        env.update(gpu_env(self.ctx.gpus))  # last: neither config.env nor the executor may widen it
        return env

    def _execute(self, launch: Launch, limit: float, outcome: Outcome) -> None:
        if self.settings.update_local_db:
            database.mark_running(self.request.config, self.request.key, self.storage.local_roots)
        argv, env = launch.command(self.child_env(launch))
        self.on_phase("running")
        proc = process.spawn(argv, self.ctx.workspace, env, self.ctx.output_file)
        process.record(proc, self.home / "process.json")
        log.info(
            "experiment %s started as pid %d: %s", self.request.key, proc.pid, launch.argv[1:2]
        )
        self._record(f"started as pid {proc.pid}, time limit {limit:.0f}s")
        status, code = self._watch(proc, time.monotonic() + limit)
        # Whatever the experiment left running in the background dies with it.
        process.kill_tree(proc.pid, self.settings.kill_grace, proc)
        outcome.status, outcome.exit_code = status, code
        outcome.transient = status == "cancelled"
        outcome.detail = {
            "completed": "exit status 0",
            "failed": f"exit status {code}",
            "timeout": f"killed after its time limit of {limit:.0f}s",
            "cancelled": "stopped by the agent's shutdown; the message goes back to its queue",
        }[status]
        self._record(f"stopped: {status}, {outcome.detail}")
        if status != "completed":
            self._note(outcome.detail)

    def _watch(self, proc: subprocess.Popen[bytes], deadline: float) -> tuple[Status, int | None]:
        interval = self._checkpoint_interval()
        next_checkpoint = time.monotonic() + interval
        while True:
            now = time.monotonic()
            try:
                code = proc.wait(timeout=max(0.0, min(0.25, deadline - now, next_checkpoint - now)))
                return ("completed" if code == 0 else "failed"), code
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self._cancelled.is_set():
                process.kill_tree(proc.pid, self.settings.kill_grace, proc)
                return "cancelled", proc.returncode
            if now >= deadline:
                process.kill_tree(proc.pid, self.settings.kill_grace, proc)
                return "timeout", proc.returncode
            if now >= next_checkpoint:
                self.checkpoint()
                next_checkpoint = time.monotonic() + interval

    def _checkpoint_interval(self) -> float:
        requested = self.request.checkpoint_interval() or self.settings.checkpoint_interval
        return max(requested, self.settings.checkpoint_min_interval, 0.1)

    def checkpoint(self, final: bool = False) -> int:
        """Upload each mutable artifact that has content and changed since its last upload.

        A checkpoint tries once and leaves failures to the next one; the final pass retries
        within ``upload_budget`` and then raises, so the message goes back rather than being
        acknowledged with results missing.
        """
        sent = 0
        if self.recorder is not None and not final:
            self.recorder.update("running")
        deadline = time.monotonic() + self.settings.upload_budget
        labels = sorted(self.request.mutable_labels(), key=lambda lb: lb != "output")
        for label in labels:
            directory = self.ctx.artifact_dir(label)
            fingerprint = archive.tree_fingerprint(directory)
            if not archive.has_content(directory) or self._fingerprints.get(label) == fingerprint:
                continue
            try:
                sent += self._upload(label, deadline if final else 0.0)
            except AgentError as exc:
                if final:
                    raise
                log.warning("checkpoint of %s/%s failed: %s", self.request.key, label, exc)
                continue
            self._fingerprints[label] = fingerprint
        return sent

    def _upload(self, label: str, deadline: float) -> int:
        """Upload one artifact, retrying transient failures with backoff until ``deadline``."""
        artifact = self.request.experiment.artifacts[label]
        attempt = 0
        while True:
            attempt += 1
            try:
                if label == "_metadata" and self.settings.metadata_layout == "go":
                    # Only this run's own files: the experiment can write into the folder, and
                    # must not plant another run's name at the bucket's root.
                    own = self.recorder.names() if self.recorder is not None else ()
                    return transfer.upload_each(
                        label,
                        artifact,
                        self.request.config,
                        self.ctx.artifact_dir(label),
                        "metadata/",
                        self.storage,
                        own,
                    )
                return transfer.upload(
                    label, artifact, self.request.config, self.ctx.artifact_dir(label), self.storage
                )
            except (OSError, TransientError) as exc:
                delay = min(30.0, 0.5 * 2**attempt)
                if time.monotonic() + delay > deadline:
                    raise TransientError(f"upload of {label} failed: {exc}") from exc
                log.warning("upload of %s/%s failed (%s); retrying", self.request.key, label, exc)
                time.sleep(delay)

    def _finish(self, outcome: Outcome, upload: bool) -> Outcome:
        self.on_phase("uploading")
        if self.recorder is not None:
            self.recorder.runner["outcome"] = outcome.status
            status = "completed" if outcome.status == "completed" else "failed"
            self.recorder.update(status, outcome.exit_code, final=True)
        if upload and self.home.exists():
            try:
                outcome.uploaded_bytes = self.checkpoint(final=True)
            except AgentError as exc:
                outcome.status, outcome.transient = "error", True
                outcome.detail = f"results not saved: {exc}"
        outcome.finished = time.time()
        outcome.output_tail = self._output_tail()
        if self.settings.update_local_db and not outcome.transient:
            roots = self.storage.local_roots
            database.mark_finished(self.request.config, self.request.key, "finished", roots)
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
