"""The gate every delivery passes before it runs: bounded parse, the trust of its source, a fair
count of its attempts, and room on this machine.

What fails here never runs and is never lost: ``admit`` says to set it aside, and the supervisor
keeps it under ``<state>/rejected/`` with the reason (``keep_aside``), reports it and
acknowledges it. Nothing a message holds can raise out of ``admit``.
"""

import logging
from dataclasses import dataclass, replace

from agent import setaside, trust
from agent.errors import BadRequest
from agent.intake import parse_message
from agent.ledger import MAX_EXCUSED_DEATHS, Ledger, Record
from agent.queues.base import Delivery, QueueBackend
from agent.report.events import Event, Events
from agent.request import Request
from agent.resources import Admission, Grant
from agent.settings import Settings
from agent.settlement import Settlement, set_aside
from agent.storage.base import StorageOptions

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """A delivery let through: what it asks, where it may point, what it holds."""

    request: Request
    storage: StorageOptions
    record: Record
    grant: Grant
    attempts: int


class Gate:
    def __init__(self, settings: Settings, admission: Admission, events: Events):
        self.settings = settings
        self.admission = admission
        self.events = events
        self.ledger = Ledger(settings.state_dir / "ledger")

    def admit(self, backend: QueueBackend, delivery: Delivery) -> Ticket | Settlement:
        """A ticket to run, or what to do with the delivery instead (set aside, or give back
        to wait for room); the supervisor carries that out."""
        record = self.ledger.begin(delivery)
        try:
            verdict = self._admit(backend, delivery, record)
        except BaseException:
            self.ledger.returned(record)  # the take failed (disk, queue): no phase to charge
            raise
        return verdict if isinstance(verdict, Ticket) else replace(verdict, record=record)

    def _admit(
        self, backend: QueueBackend, delivery: Delivery, record: Record
    ) -> Ticket | Settlement:
        reason = self._suspicion(record)
        if reason:
            return set_aside(reason)
        try:
            request, storage = self._take(backend, delivery)
        except BadRequest as exc:
            return set_aside(f"malformed message: {exc}")
        except Exception as exc:  # a bug in intake: never a crash, never a loop
            log.exception("taking message %s failed", delivery.message_id)
            return set_aside(f"agent error while taking it: {exc!r}")
        self.ledger.enter(record, "fetching", request.key)
        attempts = delivery.delivery_count - record.excused
        if attempts > self.settings.max_attempts:
            return set_aside(
                f"handed out {attempts} times (max_attempts {self.settings.max_attempts})"
            )
        resources = request.experiment.resources_needed
        grant = self.admission.take(backend, delivery, request.key, resources)
        if isinstance(grant, Settlement):
            return grant  # no room now: back to its queue, the hand-out excused
        return Ticket(request, storage, record, grant, attempts)

    def _suspicion(self, record: Record) -> str:
        """Why the agent's deaths with this message set it aside, or ""."""
        if record.crashes >= self.settings.max_crashes:
            return (
                f"the agent died {record.crashes} times while parsing or fetching this message "
                f"(max_crashes {self.settings.max_crashes}): suspected of crashing it"
            )
        if record.deaths >= MAX_EXCUSED_DEATHS:
            return f"the agent died {record.deaths} times while holding this message"
        return ""

    def _take(self, backend: QueueBackend, delivery: Delivery) -> tuple[Request, StorageOptions]:
        """Parse (bounded) and check the message against the trust of where it came from."""
        request = parse_message(delivery.body, self.settings.max_message_size)
        storage = trust.storage_options(self.settings, local_source=backend.kind == "local")
        trust.check_request(request, storage)
        return request, storage

    def keep_aside(self, delivery: Delivery, kind: str, reason: str, record: Record | None) -> None:
        """Keep the raw message and why under ``<state>/<kind>/``, and report it (the
        supervisor then acknowledges it)."""
        kept = setaside.keep(self.settings.state_dir, kind, delivery, reason)
        where = record.where() if record else f"{delivery.queue}/{delivery.message_id}"
        text = f"message {where} set aside in {kept}: {reason}"
        fields = {"QUEUE": delivery.queue, "BACKEND": delivery.backend, "SET_ASIDE": kind}
        if record is not None and record.key:
            fields["EXPERIMENT_KEY"] = record.key
        self.events.emit(Event("message_rejected", text, fields, level=logging.ERROR))
