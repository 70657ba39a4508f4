"""One SQS message handed out and not yet settled."""

import time
from typing import TYPE_CHECKING, Any

from agent.queues.base import Delivery, count_from
from agent.queues.journal import Entry

if TYPE_CHECKING:
    from agent.queues.sqs import SqsQueue

ATTEMPTS_ATTRIBUTE = "studio-agent-attempts"


def _int(value: object, default: int) -> int:
    return count_from(value) or default


class SqsDelivery(Delivery):
    backend = "sqs"

    def __init__(
        self,
        owner: "SqsQueue",
        queue: str,
        url: str,
        message: dict[str, Any],
        received_at: float | None = None,
    ):
        self._owner, self.queue, self.url = owner, queue, url
        self.message_id = str(message["MessageId"])
        self.receipt = str(message["ReceiptHandle"])
        self.body = str(message["Body"]).encode()
        given = message.get("MessageAttributes") or {}
        # Kept across custody: String and Number attributes (StudioML sets none).
        self.attributes = {
            k: {"DataType": v["DataType"], "StringValue": v["StringValue"]}
            for k, v in given.items()
            if k != ATTEMPTS_ATTRIBUTE and "StringValue" in v
        }
        system = message.get("Attributes") or {}
        self.group_id = system.get("MessageGroupId")  # FIFO queues need it to send back
        earlier = _int(given.get(ATTEMPTS_ATTRIBUTE, {}).get("StringValue"), 0)
        self.delivery_count = _int(system.get("ApproximateReceiveCount"), 1) + earlier
        self.received_at = self.extended_at = received_at or time.monotonic()
        self.entry: Entry | None = None  # set once in the agent's custody
        self.in_sqs = True  # SQS still holds it under our receipt handle
        self.pending: str | None = None  # "ack" or "return", until SQS has done it
        self.next_try = 0.0
        self.complained = False

    def ack(self) -> None:
        self._owner.settle(self, "ack")

    def requeue(self) -> None:
        self._owner.settle(self, "return")

    def extend_lease(self, seconds: float) -> None:
        """The tick renews leases by itself; this asks for ``seconds`` at once (best effort)."""
        self._owner.extend(self, seconds)

    def custody_meta(self) -> dict[str, Any]:
        names = ("url", "message_id", "delivery_count", "attributes", "group_id")
        return {name: getattr(self, name) for name in names}
