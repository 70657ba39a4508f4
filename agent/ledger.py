"""What the agent remembers about a message across its own deaths, to count attempts fairly.

A queue counts hand-outs, and every death of an agent that held a message is one more hand-out.
Whose fault the death was depends on what the agent was doing with the message then:
- ``parsing`` or ``fetching`` (its own code working on the message's bytes and artifacts): the
  message is suspected of crashing the agent. Past ``max_crashes`` such deaths it is set aside,
  and the agent says which message it was.
- ``installing``, ``running`` or ``uploading`` (a child process did the work, or the agent was
  moving results): the death was not the message's fault (kill -9, power, OOM killer), so that
  hand-out is excused and does not count towards ``max_attempts``.
Returns for lack of room (admission), and runs cut by the agent's own shutdown, are excused the
same way, and all of it survives restarts.

One small JSON file per message, ``<state>/ledger/<digest>``, named by a digest of the queue and
the body (the one thing every backend gives back intact). A phase change is one rename; no fsync,
since a process death keeps the page cache, and power loss is nobody's fault.
"""

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.queues.base import Delivery

log = logging.getLogger(__name__)

SUSPECT_PHASES = frozenset({"parsing", "fetching"})
# Excused deaths still have a ceiling: until experiments run under their own identity (issue 12)
# one can kill its agent, and it must not do so forever. Far above any honest run of bad luck.
MAX_EXCUSED_DEATHS = 50
KEEP_FOR = 30 * 86400.0  # a record not touched for this long belongs to a message long gone


@dataclass
class Record:
    digest: str
    queue: str
    message_id: str
    key: str = ""
    phase: str = ""  # what the agent is doing with the message now; "" when it holds it not
    crashes: int = 0  # deaths of the agent in a suspect phase
    excused: int = 0  # hand-outs that were not the message's fault (agent deaths, no room)
    deaths: int = 0  # deaths of the agent while it held the message, in any phase
    updated: float = 0.0

    def where(self) -> str:
        key = f" (experiment {self.key})" if self.key else ""
        return f"{self.queue}/{self.message_id}{key}"


def digest_of(delivery: Delivery) -> str:
    return hashlib.sha256(delivery.queue.encode() + b"\0" + delivery.body).hexdigest()


class Ledger:
    def __init__(self, root: Path):
        self.root = root

    def begin(self, delivery: Delivery) -> Record:
        """The record of a delivery just taken, now in phase ``parsing``."""
        digest = digest_of(delivery)
        record = self._read(digest) or Record(digest, delivery.queue, delivery.message_id)
        record.message_id = delivery.message_id
        self.enter(record, "parsing")
        return record

    def enter(self, record: Record, phase: str, key: str = "") -> None:
        record.phase = phase
        record.key = key or record.key
        self._write(record)

    def excuse(self, record: Record) -> None:
        """The delivery goes back, and this hand-out is not to count against it (no room)."""
        record.excused += 1
        self.returned(record)

    def returned(self, record: Record) -> None:
        """The delivery went back to its queue: no phase, counters kept for its next hand-out."""
        self.enter(record, "")

    def settled(self, record: Record) -> None:
        """Acknowledged or set aside: the message is gone, and so is its record."""
        with contextlib.suppress(FileNotFoundError):
            (self.root / record.digest).unlink()

    def recover(self) -> list[Record]:
        """After a start: charge each message the last agent died holding; return the suspects.

        Old records are dropped on the way.
        """
        suspects: list[Record] = []
        for record in self._records():
            if not record.phase:
                if time.time() - record.updated > KEEP_FOR:
                    self.settled(record)
                continue
            record.deaths += 1
            if record.phase in SUSPECT_PHASES:
                record.crashes += 1
                suspects.append(record)
                log.warning(
                    "the last agent died while %s message %s: suspected of crashing it (%d)",
                    record.phase,
                    record.where(),
                    record.crashes,
                )
            else:
                record.excused += 1
            self.returned(record)
        return suspects

    def _records(self) -> list[Record]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            if name.startswith("."):  # a write cut short by a death: its record is intact
                with contextlib.suppress(FileNotFoundError):
                    (self.root / name).unlink()
            elif (record := self._read(name)) is not None:
                records.append(record)
        return records

    def _read(self, digest: str) -> Record | None:
        try:
            data = json.loads((self.root / digest).read_bytes())
            return Record(**{**data, "digest": digest})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:  # a torn write: start the count afresh
            log.warning("ledger record %s unreadable (%s); starting it afresh", digest, exc)
            return None

    def _write(self, record: Record) -> None:
        record.updated = time.time()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A temporary name of its own: two copies of one message may be written at once.
        fd, tmp = tempfile.mkstemp(prefix=f".{record.digest}.", dir=self.root)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(record)))
        os.replace(tmp, self.root / record.digest)
