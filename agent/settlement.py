"""What becomes of a delivery: decided where the reason is known (the gate, admission, the run's
outcome) and carried out in one place, ``Supervisor.carry_out``: no other code acknowledges,
returns or sets aside a message.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from agent.ledger import Record


@dataclass(frozen=True)
class Settlement:
    action: Literal["ack", "return", "set_aside"]
    reason: str = ""
    pause: float = 0.0  # return: how long its queue gives this agent nothing more
    excused: bool = False  # return: not the message's fault (no room, this agent's shutdown)
    kind: str = "rejected"  # set_aside: the folder under the state dir it is kept in
    record: "Record | None" = None  # the message's ledger record, where it has one


def acknowledge() -> Settlement:
    return Settlement("ack")


def give_back(pause: float = 0.0, reason: str = "", excused: bool = False) -> Settlement:
    return Settlement("return", reason, pause, excused)


def set_aside(reason: str, kind: str = "rejected") -> Settlement:
    return Settlement("set_aside", reason, kind=kind)
