"""The daemon: takes deliveries, runs experiments in worker threads, settles every message.

One thread (the caller of ``run``) owns the queues: it receives, acks and requeues. Worker
threads only run experiments and hand back an ``Outcome`` through a queue, then wake the loop
through a self-pipe, which is also what signal handlers write to (``signal.set_wakeup_fd``), so a
handler does nothing but set a flag.

Rules for a delivery:
- unparseable, refused by the rules of its source (agent.trust), handed out more than
  ``max_attempts`` times (hand-outs that were not its fault excused, agent.ledger), or held when
  the agent died while parsing or fetching it ``max_crashes`` times: its raw bytes are kept under
  ``<state>/rejected/`` with the reason, then it is acknowledged;
- expired: kept under ``<state>/expired/`` and acknowledged, never run;
- an outcome (success, failure, timeout): acknowledged after the final upload;
- infrastructure trouble or shutdown: requeued for another try.
"""

import contextlib
import functools
import logging
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import IO

from agent import settling, startup
from agent.control import ControlServer
from agent.credentials import scan
from agent.errors import AgentError
from agent.executors.base import Executor
from agent.experiment import ExperimentRun, Outcome
from agent.gate import Gate, Ticket
from agent.ledger import Record
from agent.operator import Limits, Operator
from agent.queues.base import Delivery, QueueBackend
from agent.report import jobs
from agent.report.events import Event, Events
from agent.report.journal import follow_output, journal_context
from agent.report.notify import Notifier
from agent.resources import Grant, admission_for
from agent.sandbox import Sandbox
from agent.settings import Settings
from agent.settlement import Settlement, give_back
from agent.shutdown import Shutdown
from agent.status import write_status
from agent.subscriptions import Subscriptions
from agent.watch import FolderWatcher

log = logging.getLogger(__name__)

# How long the loop sleeps when every backend is pushed work: it is woken for everything else.
IDLE_TICK = 1.0
QUIET_TICK = 5.0  # the same, with nothing running, at most (a backend may ask for less)
STATUS_BUSY, STATUS_IDLE = 2.0, 10.0  # seconds between two writes of status.json
# max_idle or max_experiments reached: the unit neither restarts nor counts it a failure.
EX_LIMIT = 79


@dataclass
class Job:
    backend: QueueBackend
    delivery: Delivery
    run: ExperimentRun
    record: Record  # the message's ledger entry: its phase, crashes and excused hand-outs
    thread: threading.Thread | None = None
    grant: Grant | None = None  # CPUs, RAM, disk and GPUs held until its slot is free
    started: float = field(default_factory=time.time)
    saving: bool = False  # its processes are gone; its results are being saved, then settled


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        subscriptions: Subscriptions,
        executor: Executor,
        watcher: FolderWatcher | None = None,
        notifier: Notifier | None = None,
        events: Events | None = None,
        sandbox: Sandbox | None = None,
    ):
        self.settings = settings
        # What each experiment runs in (agent.sandbox); None finds out what this host gives.
        self.sandbox = sandbox or Sandbox.from_settings(settings)
        self.events = events or subscriptions.events
        self.subscriptions = subscriptions
        self.executor = executor
        self.watcher = watcher
        self.notifier = notifier or Notifier()
        self._hup = False
        self._next_scan = 0.0
        self._next_status = 0.0
        self.jobs: dict[int, Job] = {}
        self.finished: queue.Queue[tuple[Job, Outcome]] = queue.Queue()
        self.freed: queue.Queue[Job] = queue.Queue()  # slots free, results still being saved
        self._stop_requests = 0
        self.shutdown = Shutdown(settings, self.notifier, self.events)
        self._next_backend = 0
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._state_lock: IO[bytes] | None = None
        self.admission = admission_for(settings)
        self.gate = Gate(settings, self.admission, self.events)
        self.operator = Operator(settings.state_dir, self.events)
        self.control: ControlServer | None = None
        self.limits = Limits(settings)
        self.exit_code = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def backends(self) -> list[QueueBackend]:
        """The backends that may be given new work."""
        return self.subscriptions.active()

    def run(self) -> int:
        """Serve until stopped by a signal; return the process exit code."""
        self._state_lock = startup.prepare_state_dir(self.settings, self.sandbox)
        self._say_protections()
        self._install_signal_handlers()
        self.recover()
        if self.watcher is not None:
            self.watcher.start()
        self._open_control()
        self.notifier.ready(self.status_text())
        text = (
            f"studio-agent ready: {self.settings.max_concurrent} slot(s), "
            f"queues matching {self.settings.queue_match!r}, {self.status_text()}"
        )
        self.events.emit(Event("agent_started", text))
        while self.step():
            pass
        if self.watcher is not None:
            self.watcher.stop()
        if self.control is not None:
            self.control.close()
        for backend in self.subscriptions.everything():
            backend.close()
        self._write_status("stopped")
        self.notifier.close()
        self.events.emit(Event("agent_stopped", "studio-agent stopped"))
        return self.exit_code

    def _open_control(self) -> None:
        server = ControlServer(self.settings.effective_control_socket, self._wake)
        try:
            server.start()
        except OSError as exc:  # the agent serves on; only its operator commands are lost
            log.error("no control channel at %s: %s", server.path, exc)
            return
        self.control = server

    def step(self) -> bool:
        """One pass of the loop; False once a drain has finished."""
        self._settle_finished()
        self._obey()
        if not self._stop_requests:
            self._sync_credentials()
        for backend in self.subscriptions.everything():
            backend.tick()
        self.subscriptions.close_idle(job.backend for job in self.jobs.values())
        self._maybe_write_status()
        self.notifier.watchdog()  # from the loop itself: a hung loop stops the pings
        if self.notifier.enabled:
            self.notifier.status(self.status_text())
        limit = self.limits.reached(len(self.jobs))
        taking = not (self._stop_requests or self.operator.draining or limit)
        free = self._free_slots() if taking else 0
        for backend in self.subscriptions.everything():
            backend.wake = self._wake  # set each pass: credential backends come and go
            backend.hold(self.operator.hold_for(backend))
            backend.capacity(free if backend in self.backends else 0)
        if self._stop_requests:
            if not self.shutdown.step(self._stop_requests, self.jobs, self.status_text()):
                return False
        elif limit and not self.jobs:
            return self._exit_at_limit(limit)
        elif free > 0:
            taken = self._receive()
            if taken is not None:
                self._start(*taken)
                return True
        self._sleep(self._pause_length())
        return True

    def _free_slots(self) -> int:
        """max_concurrent runs at once; as many more may be saving their results meanwhile."""
        running = sum(not job.saving for job in self.jobs.values())
        slots = self.settings.max_concurrent
        return max(0, min(slots - running, 2 * slots - len(self.jobs)))

    def _pause_length(self) -> float:
        """Polling backends are asked every poll_interval; pushed ones wake the loop themselves,
        which then only needs to come round for housekeeping (heartbeats, status, refreshes):
        each second while experiments run, and with none as seldom as the backends' own
        housekeeping, the watchdog and max_idle allow (each pass costs about 1 ms of CPU)."""
        backends = list(self.subscriptions.everything())
        if any(backend.polls for backend in backends):
            return self.settings.poll_interval
        tick = IDLE_TICK
        if not (self.jobs or self._stop_requests):
            waits = [QUIET_TICK, self.limits.until_idle_limit(), *(b.quiet_tick for b in backends)]
            if self.notifier.watchdog_interval is not None:
                waits.append(self.notifier.watchdog_interval / 4)
            tick = min(waits)
        return max(self.settings.poll_interval, tick)

    def request_stop(self) -> None:
        self._stop_requests += 1
        self._wake()

    def _say_protections(self) -> None:
        """Once at start: which protections this host gives experiments, which it does not."""
        if any(self.sandbox.protections().values()):
            log.warning("experiment isolation: %s (README: Security)", self.sandbox.describe())
        else:
            log.info("experiment isolation: %s", self.sandbox.describe())

    def recover(self) -> None:
        """Undo what a killed predecessor left: its experiments' processes, then its messages."""
        startup.end_orphans(self.settings)
        self.gate.ledger.recover()  # before any message comes back: charge what the dead agent held
        for backend in self.backends:
            restored = backend.recover()
            if restored:
                log.warning(
                    "%s: %d unsettled message(s) returned to their queues", backend.kind, restored
                )

    # -- signals and waking --------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requests += 1  # only a flag: the loop does the work on its next pass

    # Set by the CLI: re-reads the config file on SIGHUP (the supervisor knows no file).
    reload_config: Callable[[Settings], None] | None = None

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup = True

    # -- the operator ----------------------------------------------------------------------------

    def _obey(self) -> None:
        """Carry out the operator's commands (agent.control), from the loop."""
        if self.control is None:
            return
        for command in self.control.take():
            try:
                self.operator.apply(command, self.abort, self._control_status)
            except Exception as exc:  # a bug here must not take the loop down
                log.exception("operator command %s failed", command.verb)
                command.reply(False, f"agent error: {type(exc).__name__}")
            self._next_status = 0.0

    def abort(self, key: str, why: str) -> bool:
        """End the running experiment ``key`` for good; False if none runs here."""
        for job in self.jobs.values():
            if job.run.request.key == key:
                job.run.abort(why)
                return True
        return False

    def served_queues(self) -> list[tuple[str, str, bool]]:
        """(backend, queue, taking work) for each queue served, for the metrics (any thread)."""
        found = []
        for backend in list(self.backends):
            name = f"{backend.kind}/{backend.name}" if backend.name else backend.kind
            found += [(name, q, not backend.held(q)) for q in backend.served_queues()]
        return found

    def _control_status(self) -> dict[str, object]:
        return {
            "mode": self.operator.mode(len(self.jobs)),
            "experiments": [job.run.request.key for job in self.jobs.values()],
            **self.operator.describe(),
        }

    def _exit_at_limit(self, why: str) -> bool:
        """Everything is settled and a limit is reached: stop, with the code the unit keeps."""
        self.exit_code = EX_LIMIT
        text = f"studio-agent exiting: {why}; {self.limits.tasks} experiment(s) run"
        self.events.emit(Event("agent_stopping", text))
        return False

    # -- credentials and status ------------------------------------------------------------------

    def _sync_credentials(self) -> None:
        """On SIGHUP re-read the log level; rescan the certs directory on a change, on SIGHUP,
        and every 30 s in any case."""
        hup, self._hup = self._hup, False
        if hup and self.reload_config is not None:
            try:
                self.reload_config(self.settings)
            except Exception:  # a reload must never take the agent down
                log.exception("SIGHUP: reloading the config failed; the running settings stay")
        if self.watcher is None:
            return
        now = time.monotonic()
        changed = self.watcher.take_change()
        if not (changed or hup or now >= self._next_scan):
            return
        self._next_scan = now + 30.0
        found, refused = scan(self.watcher.folder)
        keys_changed = self.gate.keys.sync(self.watcher.folder)
        if self.subscriptions.sync(found, refused) or keys_changed:
            self._next_status = 0.0  # show the change in status.json at once

    def status_text(self) -> str:
        """One line for ``systemctl status``."""
        if self._stop_requests:
            left = self.shutdown.time_left()
            return f"draining, {len(self.jobs)} experiment(s), {left:.0f} s left"
        if self.jobs:
            keys = ", ".join(job.run.request.key for job in self.jobs.values())
            gpus = self.admission.gpus_in_use()
            on = f" on {', '.join(gpus)}" if gpus else ""
            return f"running {len(self.jobs)} experiment(s){on}: {keys}"
        queues = sum(len(b.served_queues()) for b in self.backends)
        return f"idle, {queues} queue(s)"

    def _maybe_write_status(self) -> None:
        """Every 2 s while experiments run (their elapsed times move); every 10 s when idle,
        where nothing in it moves but the time: every change (a credential, a command, an
        experiment starting or ending) writes it at once. Writing it was most of an idle
        agent's CPU."""
        if time.monotonic() >= self._next_status:
            self._next_status = time.monotonic() + (STATUS_BUSY if self.jobs else STATUS_IDLE)
            self._write_status(self._state())

    def _state(self) -> str:
        if self._stop_requests:
            return "stopping"
        mode = self.operator.mode(len(self.jobs))
        if mode != "running":
            return mode
        return "running" if self.jobs else "idle"

    def _write_status(self, state: str) -> None:
        write_status(
            self.settings.state_dir,
            state,
            self.subscriptions,
            self.jobs.values(),
            self.admission.describe(),
            self.sandbox.protections(),
            self.gate.keys.keys.describe(),
            self.operator.describe(),
        )

    def wake(self) -> None:
        """Cut the loop's sleep short (from any thread)."""
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _sleep(self, seconds: float) -> None:
        sockets = [fd for b in self.subscriptions.everything() if (fd := b.fileno()) is not None]
        readable, _, _ = select.select([self._wake_r, *sockets], [], [], seconds)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)

    # -- taking work ---------------------------------------------------------------------------

    def _receive(self) -> tuple[QueueBackend, Delivery] | None:
        for offset in range(len(self.backends)):
            index = (self._next_backend + offset) % len(self.backends)
            try:
                delivery = self.backends[index].receive()
            except (AgentError, OSError) as exc:
                # One broken backend (a stuck lock, a full disk) must not stop the others.
                log.warning("%s: receive failed: %s", self.backends[index].kind, exc)
                continue
            if delivery is not None:
                self._next_backend = index + 1
                return self.backends[index], delivery
        return None

    def _start(self, backend: QueueBackend, delivery: Delivery) -> None:
        try:
            ticket = self.gate.admit(backend, delivery)
            if isinstance(ticket, Ticket):
                self._launch(backend, delivery, ticket)
            else:
                self.carry_out(backend, delivery, ticket)
        except (AgentError, OSError) as exc:
            # The disk (set aside, ledger) or the queue failed, not the message: return it.
            log.error("could not take message %s: %s; returning it", delivery.message_id, exc)
            with contextlib.suppress(AgentError, OSError):
                self.carry_out(backend, delivery, give_back(self.settings.retry_backoff))

    def carry_out(self, backend: QueueBackend, delivery: Delivery, settle: Settlement) -> None:
        """The one place a delivery is acknowledged, returned or set aside."""
        settling.carry_out(self.gate, backend, delivery, settle)

    def _launch(self, backend: QueueBackend, delivery: Delivery, ticket: Ticket) -> None:
        where = f"{delivery.backend}:{delivery.queue}/{delivery.message_id}"
        request, attempts = ticket.request, ticket.attempts
        try:
            run = ExperimentRun(
                request,
                self.settings,
                self.executor,
                delivery.queue,
                gpus=ticket.grant.uuids,
                storage=ticket.storage,
                on_phase=functools.partial(self.gate.ledger.enter, ticket.record),
                sandbox=self.sandbox,
                devices=ticket.grant.devices,
            )
        except BaseException:
            self.admission.release(ticket.grant)
            raise
        job = Job(backend, delivery, run, ticket.record, grant=ticket.grant)
        run.on_free = functools.partial(self._slot_freed, job)
        job.thread = threading.Thread(
            target=self._work, args=(job,), name=f"exp-{request.key}", daemon=True
        )
        self.jobs[id(job)] = job
        self.limits.started()
        self._next_status = 0.0
        text = f"experiment {request.key} from {where}: starting (attempt {attempts})"
        self.events.emit(
            Event(
                "experiment_started",
                text,
                {**self._job_fields(job), "ATTEMPT": str(attempts)},
                destination=jobs.slack_destination(request),
            )
        )
        job.thread.start()

    def _work(self, job: Job) -> None:
        fields = self._job_fields(job)
        # Every log record of this thread carries the experiment's journal fields.
        with (
            journal_context(fields),
            follow_output(job.run.ctx.output_file, fields, self.settings.journal_output) as output,
        ):
            try:
                outcome = job.run.run()
            except Exception as exc:  # a bug must not kill the agent or lose the message
                log.exception("experiment %s crashed the worker", job.run.request.key)
                why = f"agent error: {exc!r}"
                outcome = Outcome(job.run.request.key, "error", why, transient=True)
                outcome.started, outcome.finished = job.started, time.time()
            if output is not None:
                output.tail = outcome.output_tail  # for a run too short to be followed
        self.finished.put((job, outcome))
        self._wake()

    def _slot_freed(self, job: Job) -> None:
        """From the run's thread: its slot may take the next message (in the loop's thread)."""
        self.freed.put(job)
        self._wake()

    # -- settling ------------------------------------------------------------------------------

    def _release_freed(self) -> None:
        while True:
            try:
                job = self.freed.get_nowait()
            except queue.Empty:
                return
            job.saving = True
            self.admission.release(job.grant)  # idempotent: the settle below releases it too
            self._next_status = 0.0

    def _settle_finished(self) -> None:
        self._release_freed()
        while True:
            try:
                job, outcome = self.finished.get_nowait()
            except queue.Empty:
                return
            self.jobs.pop(id(job), None)
            self.limits.settled(len(self.jobs))
            self._next_status = 0.0  # studio-agent status shows it at once, not within 2 s
            if job.thread is not None:
                job.thread.join()
            # After the worker thread, so after kill_tree: the cards are free of its processes
            # (already released where the run freed its slot before saving its results).
            self.admission.release(job.grant)
            try:
                self._settle(job, outcome)
            except (AgentError, OSError) as exc:
                # The message stays in the agent's custody; the next start returns it.
                log.error("could not settle the message of %s: %s", outcome.key, exc)
            except Exception:  # a bug while reporting must not take the loop down
                log.exception("settling the message of %s failed", outcome.key)

    def _settle(self, job: Job, outcome: Outcome) -> None:
        try:
            self._report_outcome(job, outcome)
        except Exception:  # the report is best effort; the message must still be settled
            log.exception("reporting the outcome of %s failed", outcome.key)
        stopping = bool(self._stop_requests)
        settle = settling.of_outcome(job.delivery, outcome, stopping, self.settings.retry_backoff)
        settle = replace(settle, record=job.record)
        self.carry_out(job.backend, job.delivery, settle)

    def _job_fields(self, job: Job) -> dict[str, str]:
        credential = job.backend.name or job.backend.kind
        return jobs.job_fields(
            job.run.request, job.delivery.queue, job.delivery.backend, credential, job.run.ctx.gpus
        )

    def _report_outcome(self, job: Job, outcome: Outcome) -> None:
        self.events.emit(jobs.outcome_event(job.run.request, outcome, self._job_fields(job)))
