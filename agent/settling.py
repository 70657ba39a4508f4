"""Carrying out a Settlement (agent.settlement), and the settlement a run's outcome calls for.
Only the supervisor calls these."""

import logging

from agent.experiment import Outcome
from agent.gate import Gate
from agent.queues.base import Delivery, QueueBackend
from agent.settlement import Settlement, acknowledge, give_back, set_aside

log = logging.getLogger(__name__)

MAX_RETRY_PAUSE = 600.0


def carry_out(gate: Gate, backend: QueueBackend, delivery: Delivery, settle: Settlement) -> None:
    """Acknowledge, return or set aside ``delivery``, and keep its ledger record in step."""
    record = settle.record
    if settle.action == "set_aside":
        gate.keep_aside(delivery, settle.kind, settle.reason, record)
        delivery.ack()
    elif settle.action == "return":
        delivery.requeue()
        if settle.pause:
            backend.pause(delivery.queue, settle.pause)
    else:
        delivery.ack()
    if record is None:
        return
    if settle.action != "return":
        gate.ledger.settled(record)
    elif settle.excused:
        gate.ledger.excuse(record)
    else:
        gate.ledger.returned(record)


def of_outcome(
    delivery: Delivery, outcome: Outcome, stopping: bool, retry_backoff: float
) -> Settlement:
    """What a finished run's message calls for."""
    if outcome.status == "expired":
        return set_aside(outcome.detail, "expired")
    if not outcome.transient:
        return acknowledge()  # a result, whatever the exit status: uploaded and done
    if stopping:  # cut or never started by our own shutdown: not an attempt
        return give_back(excused=True)
    # The same trouble (storage down, disk full) would hit the next try at once.
    backoff = min(retry_backoff * 2 ** (delivery.delivery_count - 1), MAX_RETRY_PAUSE)
    log.info("queue %s paused for %.0fs after a failed attempt", delivery.queue, backoff)
    return give_back(backoff, outcome.detail)
