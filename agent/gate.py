"""The gate every delivery passes before it runs: bounded parse, the trust of its source, a fair
count of its attempts, and room on this machine.

What fails here never runs and is never lost: ``admit`` says to set it aside, and the supervisor
keeps it under ``<state>/rejected/`` with the reason (``keep_aside``), reports it and
acknowledges it. Nothing a message holds can raise out of ``admit``.
"""

import logging
from dataclasses import dataclass, replace

from agent import envelope, setaside, trust
from agent.envelope import Sealed
from agent.errors import BadRequest
from agent.intake import parse_message, read_message
from agent.ledger import MAX_EXCUSED_DEATHS, Ledger, Record
from agent.message_keys import SIGNING, KeyRing
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
        self.keys = KeyRing(events)  # synced with the certs directory by the supervisor

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
            message, storage = self._take(backend, delivery)
        except BadRequest as exc:
            return set_aside(f"malformed message: {exc}")
        except Exception as exc:  # a bug in intake: never a crash, never a loop
            log.exception("taking message %s failed", delivery.message_id)
            return set_aside(f"agent error while taking it: {exc!r}")
        if isinstance(message, Request):
            self.ledger.enter(record, "fetching", message.key)
        attempts = delivery.delivery_count - record.excused
        if attempts > self.settings.max_attempts:
            return set_aside(
                f"handed out {attempts} times (max_attempts {self.settings.max_attempts})"
            )
        # An envelope is admitted on its clear fields, as the Go runner did: no decryption for
        # a message that has to wait anyway.
        if isinstance(message, Request):
            label, resources = message.key, message.experiment.resources_needed
        else:
            label, resources = f"(sealed message {delivery.message_id})", message.resources
        grant = self.admission.take(backend, delivery, label, resources)
        if isinstance(grant, Settlement):
            return grant  # no room now: back to its queue, the hand-out excused
        if isinstance(message, Sealed):
            opened = self._open(delivery, message, storage, grant)
            if isinstance(opened, Settlement):
                return opened
            message = opened
            self.ledger.enter(record, "fetching", message.key)
        return Ticket(message, storage, record, grant, attempts)

    def _open(
        self, delivery: Delivery, sealed: Sealed, storage: StorageOptions, grant: Grant
    ) -> Request | Settlement:
        """The admitted envelope's request; or, its grant given back, why it is set aside."""
        try:
            request = self._unseal(sealed, storage)
        except BadRequest as exc:
            self.admission.release(grant)
            return set_aside(f"encrypted message refused: {exc}")
        except Exception as exc:  # a bug: never a crash, never a loop, never the clear text
            self.admission.release(grant)
            log.error("opening message %s failed: %s", delivery.message_id, type(exc).__name__)
            return set_aside(f"agent error while opening it: {type(exc).__name__}")
        grant.key = request.key
        log.info(
            "message %s from %s: signed by %s, decrypted: experiment %s",
            delivery.message_id,
            delivery.queue,
            sealed.fingerprint,
            request.key,
        )
        return request

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

    def _take(
        self, backend: QueueBackend, delivery: Delivery
    ) -> tuple[Request | Sealed, StorageOptions]:
        """Parse (bounded) and check the message against the trust of where it came from: a
        clear request against the queue's policy and the storage rules, an envelope against
        the signing key of its queue (it is opened later, once admitted)."""
        message = read_message(delivery.body, self.settings.max_message_size)
        storage = trust.storage_options(self.settings, local_source=backend.kind == "local")
        signer = self.keys.keys.signer_for(delivery.queue)
        if isinstance(message, Sealed):
            envelope.verify(message, delivery.queue, signer)
            return message, storage
        if signer is not None:
            raise BadRequest(
                f"clear text on queue {delivery.queue[:120]!r}, which has a signing key "
                f"({SIGNING}/{signer.prefix}): only signed, encrypted messages are taken there"
            )
        if self.settings.clear_text == "refuse":
            raise BadRequest("clear text refused (clear_text: refuse): only encrypted messages")
        trust.check_request(message, storage)
        return message, storage

    def _unseal(self, sealed: Sealed, storage: StorageOptions) -> Request:
        """The encrypted request, checked as a clear one is and against its envelope."""
        clear = envelope.decrypt(sealed, self.keys.keys.decryption)
        request = parse_message(clear, self.settings.max_message_size)
        envelope.check_agrees(sealed, request)
        trust.check_request(request, storage)
        return request

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
