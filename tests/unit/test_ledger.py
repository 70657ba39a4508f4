"""The ledger: what a dead agent was doing with each message decides whose fault its death was."""

from pathlib import Path

from agent.ledger import Ledger
from agent.queues.base import Delivery


class Held(Delivery):
    backend = "local"

    def __init__(self, body: bytes, count: int = 1, queue: str = "local_q") -> None:
        self.queue, self.message_id, self.body, self.delivery_count = queue, "m1", body, count

    def ack(self) -> None:
        pass

    def requeue(self) -> None:
        pass


def restart(root: Path) -> tuple[Ledger, list[str]]:
    """A new agent's ledger after the old one died; the suspects it names."""
    ledger = Ledger(root)
    return ledger, [record.where() for record in ledger.recover()]


def test_a_death_while_running_is_excused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    record = ledger.begin(Held(b"m"))
    ledger.enter(record, "fetching", "k1")
    ledger.enter(record, "running")
    ledger, suspects = restart(tmp_path)  # kill -9 here
    assert suspects == []
    again = ledger.begin(Held(b"m", count=2))
    assert (again.excused, again.crashes, again.key) == (1, 0, "k1")


def test_a_death_while_parsing_or_fetching_makes_the_message_a_suspect(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.begin(Held(b"m"))
    ledger, suspects = restart(tmp_path)
    assert suspects == ["local_q/m1"]
    record = ledger.begin(Held(b"m", count=2))
    ledger.enter(record, "fetching", "k1")
    ledger, suspects = restart(tmp_path)
    assert suspects == ["local_q/m1 (experiment k1)"]
    assert ledger.begin(Held(b"m", count=3)).crashes == 2


def test_twenty_deaths_while_running_never_count(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    for count in range(1, 21):
        record = ledger.begin(Held(b"m", count=count))
        assert count - record.excused == 1  # what the gate compares with max_attempts
        ledger.enter(record, "running")
        ledger, _ = restart(tmp_path)


def test_settled_messages_leave_no_record_and_returns_keep_theirs(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    first = ledger.begin(Held(b"a"))
    ledger.excuse(first)  # no room: back to its queue, not an attempt
    assert ledger.begin(Held(b"a", count=2)).excused == 1
    ledger.settled(first)
    other = ledger.begin(Held(b"b"))
    ledger.returned(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.digest]
    _, suspects = restart(tmp_path)
    assert suspects == []  # returned cleanly: nothing charged


def test_the_same_body_on_another_queue_is_another_message(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    one = ledger.begin(Held(b"m", queue="local_a"))
    two = ledger.begin(Held(b"m", queue="local_b"))
    assert one.digest != two.digest


def test_a_torn_record_starts_afresh(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    record = ledger.begin(Held(b"m"))
    (tmp_path / record.digest).write_text("{not json")
    _, suspects = restart(tmp_path)
    assert suspects == []
    assert Ledger(tmp_path).begin(Held(b"m")).crashes == 0


def test_every_death_is_counted_even_when_excused(tmp_path: Path) -> None:
    """So an experiment that kills its agent is set aside at last (agent.gate)."""
    ledger = Ledger(tmp_path)
    for count in range(1, 4):
        record = ledger.begin(Held(b"m", count=count))
        ledger.enter(record, "running")
        ledger, _ = restart(tmp_path)
    assert ledger.begin(Held(b"m", count=4)).deaths == 3
