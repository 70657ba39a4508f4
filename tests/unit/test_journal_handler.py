"""The journal handler against a real AF_UNIX datagram socket that parses the native protocol."""

import array
import fcntl
import io
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.report.journal import (
    SOCKET_ENV,
    JournalHandler,
    OutputFollower,
    encode,
    field_name,
    journal_address,
    journal_context,
)


def parse(data: bytes) -> dict[str, str]:
    """The journal's side of the native protocol: ``KEY=value\\n`` and the binary form."""
    fields: dict[str, str] = {}
    while data:
        line_end = data.index(b"\n")
        head = data[:line_end]
        if b"=" in head:
            key, _, value = head.partition(b"=")
            fields[key.decode()] = value.decode()
            data = data[line_end + 1 :]
        else:
            (size,) = struct.unpack("<Q", data[line_end + 1 : line_end + 9])
            value = data[line_end + 9 : line_end + 9 + size]
            assert data[line_end + 9 + size : line_end + 10 + size] == b"\n"
            fields[head.decode()] = value.decode()
            data = data[line_end + 10 + size :]
    return fields


class Journal:
    """A listening journal socket; ``records`` parses what arrived, datagrams and memfds alike."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(2)
        self.sealed: list[int] = []

    def receive(self) -> dict[str, str]:
        fds = array.array("i")
        data, ancillary, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        for fd in fds:
            self.sealed.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
            # As journald: read the whole file, whatever its offset (the sender's is at the end).
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            os.close(fd)
        return parse(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    listener = Journal(tmp_path / "journal")
    yield listener
    listener.close()


@pytest.fixture
def logger(journal: Journal) -> Iterator[logging.Logger]:
    handler = JournalHandler(journal.path)
    test_logger = logging.getLogger(f"test.journal.{time.monotonic_ns()}")
    test_logger.propagate = False
    test_logger.setLevel(logging.DEBUG)
    test_logger.addHandler(handler)
    yield test_logger
    handler.close()


def test_a_record_carries_the_standard_and_its_own_fields(
    journal: Journal, logger: logging.Logger
) -> None:
    logger.warning("two\nlines", extra={"journal_fields": {"EXPERIMENT_KEY": "k1", "queue": "q"}})
    fields = journal.receive()
    assert fields["MESSAGE"] == "two\nlines"  # sent in the binary form: it has a newline
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "studio-agent"
    assert fields["LOGGER"] == logger.name
    assert fields["THREAD_NAME"] == threading.current_thread().name
    assert fields["CODE_FILE"] == __file__
    assert fields["CODE_FUNC"] == "test_a_record_carries_the_standard_and_its_own_fields"
    assert int(fields["CODE_LINE"]) > 0
    assert fields["EXPERIMENT_KEY"] == "k1"
    assert fields["QUEUE"] == "q"  # names are made valid journal field names


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.DEBUG, "7"), (logging.INFO, "6"), (logging.ERROR, "3"), (logging.CRITICAL, "2")],
)
def test_levels_map_to_syslog_priorities(
    journal: Journal, logger: logging.Logger, level: int, priority: str
) -> None:
    logger.log(level, "x")
    assert journal.receive()["PRIORITY"] == priority


def test_an_exception_goes_into_the_message(journal: Journal, logger: logging.Logger) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    message = journal.receive()["MESSAGE"]
    assert message.startswith("failed\nTraceback")
    assert "ValueError: boom" in message


def test_the_thread_context_goes_only_with_its_own_thread(
    journal: Journal, logger: logging.Logger
) -> None:
    inside = threading.Event()
    done = threading.Event()

    def worker() -> None:
        with journal_context({"EXPERIMENT_KEY": "k2", "PROJECT": "p"}):
            logger.info("from the worker")
            inside.set()
            done.wait(5)

    thread = threading.Thread(target=worker, name="exp-k2")
    thread.start()
    inside.wait(5)
    worker_fields = journal.receive()
    logger.info("from the main thread while the worker is in its context")
    main_fields = journal.receive()
    done.set()
    thread.join()
    assert worker_fields["EXPERIMENT_KEY"] == "k2"
    assert worker_fields["PROJECT"] == "p"
    assert worker_fields["THREAD_NAME"] == "exp-k2"
    assert "EXPERIMENT_KEY" not in main_fields


def test_explicit_fields_win_over_the_context(journal: Journal, logger: logging.Logger) -> None:
    with journal_context({"EXPERIMENT_KEY": "outer"}):
        logger.info("x", extra={"journal_fields": {"EXPERIMENT_KEY": "inner"}})
    assert journal.receive()["EXPERIMENT_KEY"] == "inner"


def test_a_record_too_big_for_a_datagram_goes_in_a_sealed_memfd(
    journal: Journal, logger: logging.Logger
) -> None:
    big = "x" * (2 << 20)  # 2 MiB: beyond any AF_UNIX datagram (EMSGSIZE)
    logger.info(big, extra={"journal_fields": {"EXPERIMENT_KEY": "k3"}})
    fields = journal.receive()
    assert fields["MESSAGE"] == big
    assert fields["EXPERIMENT_KEY"] == "k3"
    assert len(journal.sealed) == 1
    wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    assert journal.sealed[0] & wanted == wanted  # journald refuses unsealed fds


def test_without_a_journal_the_record_goes_to_the_fallback(tmp_path: Path) -> None:
    fallback = io.StringIO()
    handler = JournalHandler(str(tmp_path / "nobody-listens"), fallback=fallback)
    record = logging.LogRecord("agent.x", logging.ERROR, __file__, 1, "lost? %s", ("no",), None)
    handler.handle(record)
    handler.close()
    assert fallback.getvalue() == "ERROR agent.x: lost? no\n"


def test_field_names_are_made_valid() -> None:
    assert field_name("experiment-key") == "EXPERIMENT_KEY"
    assert field_name("_PID") == "PID"  # underscore fields are journald's own
    assert field_name("1st") == "F_1ST"
    assert len(field_name("A" * 100)) == 64
    assert encode({"A": "b", "C": "d\ne"}) == b"A=b\nC\n" + struct.pack("<Q", 3) + b"d\ne\n"


def test_the_journal_is_used_only_under_systemd_or_when_named(journal: Journal) -> None:
    assert journal_address({SOCKET_ENV: journal.path}) == journal.path
    assert journal_address({SOCKET_ENV: journal.path + ".absent"}) is None
    # JOURNAL_STREAM naming another file than our stderr: a shell that inherited it.
    assert journal_address({"JOURNAL_STREAM": "1:1"}) is None
    assert journal_address({}) is None


def test_output_lines_are_followed_to_the_end_even_after_removal(
    journal: Journal, logger: logging.Logger, tmp_path: Path
) -> None:
    output = tmp_path / "output"
    output.write_bytes(b"first\n")
    follower = OutputFollower(output, {"EXPERIMENT_KEY": "k4"}, poll=0.05)
    follower._log = logger  # the test's logger, wired to the test's journal
    follower.start()
    assert journal.receive()["MESSAGE"] == "first"
    with output.open("ab") as out:
        out.write(b"second\nlast, no newline")
    output.unlink()  # the run directory is removed before the follower stops
    follower.stop()
    records = [journal.receive(), journal.receive()]
    assert [r["MESSAGE"] for r in records] == ["second", "last, no newline"]
    assert all(r["EXPERIMENT_KEY"] == "k4" and r["OUTPUT"] == "1" for r in records)


def test_a_run_too_short_to_follow_is_reported_from_its_tail(
    journal: Journal, logger: logging.Logger, tmp_path: Path
) -> None:
    follower = OutputFollower(tmp_path / "never-created", {"EXPERIMENT_KEY": "k5"})
    follower._log = logger
    follower.start()
    follower.tail = "only line\nsecond line\n"
    follower.stop()
    records = [journal.receive(), journal.receive()]
    assert [r["MESSAGE"] for r in records] == ["only line", "second line"]
    assert all(r["EXPERIMENT_KEY"] == "k5" for r in records)
