"""journald's native protocol, without libsystemd: one datagram of fields per log record.

Why native rather than stderr lines: the journal then stores ``EXPERIMENT_KEY``, ``QUEUE``,
``OUTCOME``... as fields, so ``journalctl -u studio-agent EXPERIMENT_KEY=<key>`` finds every line
about one experiment, from any thread.

Encoding (systemd's "Native Journal Protocol"): ``KEY=value\\n`` for a value without a newline;
otherwise ``KEY\\n`` + the value's length as 64-bit little-endian + the value + ``\\n``. A record
too large for one datagram (EMSGSIZE/ENOBUFS) is written to a sealed memfd whose descriptor is
passed with SCM_RIGHTS, as ``sd_journal_sendv`` does. A record that cannot be sent at all is
written to stderr instead, so nothing is silently lost.
"""

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO, TextIO

DEFAULT_SOCKET = "/run/systemd/journal/socket"
# Tests (and unusual set-ups) point the agent at another socket; the name does not start with
# STUDIO_AGENT_ because settings refuse unknown variables with that prefix.
SOCKET_ENV = "STUDIO_JOURNAL_SOCKET"
IDENTIFIER = "studio-agent"
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}
_BAD_NAME_CHARS = re.compile(r"[^A-Z0-9_]")
_TOO_BIG = (errno.EMSGSIZE, errno.ENOBUFS)

# Fields every record of the current thread carries: set by the supervisor around one
# experiment's worker thread (a new thread starts with an empty context, so nothing leaks).
_CONTEXT: ContextVar[Mapping[str, str] | None] = ContextVar("journal_context", default=None)


@contextlib.contextmanager
def journal_context(fields: Mapping[str, str]) -> Iterator[None]:
    """Add ``fields`` to every log record made in this thread (or task) inside the block."""
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Copies the thread's journal context onto each record as ``context_fields``."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _CONTEXT.get()
        if context and not hasattr(record, "context_fields"):
            record.context_fields = dict(context)
        return True


def field_name(name: str) -> str:
    """A valid journal field name: upper case, digits and ``_``, no leading ``_`` (those are
    trusted fields only journald may set), at most 64 characters."""
    cleaned = _BAD_NAME_CHARS.sub("_", name.upper()).lstrip("_")
    if not cleaned or cleaned[0].isdigit():
        cleaned = "F_" + cleaned
    return cleaned[:64]


def encode(fields: Mapping[str, object]) -> bytes:
    """The native protocol's datagram for ``fields`` (values are str()-ed)."""
    parts = []
    for key, value in fields.items():
        name = field_name(key).encode()
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


def journal_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The journal socket to use, or None to keep logging plain lines on stderr.

    The native protocol is used when the socket exists and we run under systemd, which is when
    ``JOURNAL_STREAM`` names our stderr (a shell started from a systemd user unit inherits the
    variable while its stderr is a terminal), or when the socket is given explicitly.
    """
    env = os.environ if environ is None else environ
    given = env.get(SOCKET_ENV, "")
    if given:
        return given if os.path.exists(given) else None
    if not os.path.exists(DEFAULT_SOCKET) or not _stderr_is_journal(env.get("JOURNAL_STREAM", "")):
        return None
    return DEFAULT_SOCKET


def _stderr_is_journal(stream: str) -> bool:
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(2)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


class JournalHandler(logging.Handler):
    """Sends each record to journald as native fields; see the module docstring."""

    def __init__(self, address: str, fallback: TextIO | None = None) -> None:
        super().__init__()
        self.address = address
        self._fallback = fallback
        self._socket: socket.socket | None = None
        self._send_lock = threading.Lock()
        self.addFilter(ContextFilter())
        self.setFormatter(logging.Formatter("%(message)s"))

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        found: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": _PRIORITY.get(record.levelno, 7 if record.levelno < logging.INFO else 4),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName or "",
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for extra in ("context_fields", "journal_fields"):
            # Explicit fields of the record win over the thread's context.
            for key, value in (getattr(record, extra, None) or {}).items():
                found[field_name(key)] = value
        return found

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode(self.fields(record))
            with self._send_lock:
                self._send(datagram)
        except Exception:
            self._to_stderr(record)

    def _send(self, datagram: bytes) -> None:
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # journald that stops reading must not hang the agent for long.
            self._socket.settimeout(5.0)
        try:
            self._socket.sendto(datagram, self.address)
        except OSError as exc:
            if exc.errno not in _TOO_BIG:
                raise
            self._send_memfd(datagram)

    def _send_memfd(self, datagram: bytes) -> None:
        """Pass the record as a sealed memfd: journald reads it from there (no size limit)."""
        assert self._socket is not None
        fd = os.memfd_create("journal-record", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, datagram)
            # journald accepts an fd from an unprivileged sender only when it is sealed.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            # Not socket.send_fds: it ignores its address argument (CPython 3.11).
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self._socket.sendmsg([], rights, 0, self.address)
        finally:
            os.close(fd)

    def _to_stderr(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            out = self._fallback or sys.stderr
            out.write(f"{record.levelname} {record.name}: {self.format(record)}\n")
            out.flush()

    def close(self) -> None:
        with self._send_lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        super().close()


class OutputFollower:
    """Copies an experiment's output file into the log, line by line (``journal_output``).

    It polls the file from its own thread and keeps it open, so the lines written just before
    the run directory is removed are still read at ``stop``. A run so short that its file came
    and went between two polls is reported from ``tail`` (the outcome's output tail), which the
    caller sets before the follower stops. Lines carry the experiment's fields.
    """

    MAX_LINE = 4096  # a single line without newlines must not become one huge record
    FIRST_POLL = 0.02  # until the file is open: it may exist for well under a second

    def __init__(self, path: Path, fields: Mapping[str, str], poll: float = 0.5) -> None:
        self.path = path
        self.fields = {**fields, "OUTPUT": "1"}
        self.poll = poll
        self.tail = ""
        self._log = logging.getLogger("agent.output")
        self._stop = threading.Event()
        self._file: BinaryIO | None = None
        self._partial = b""
        self._thread = threading.Thread(target=self._loop, name="output-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll if self._file else self.FIRST_POLL):
            self._read()
        self._read(final=True)
        if self._file is not None:
            self._file.close()
        else:
            self._send(self.tail.encode().split(b"\n"), final=True)

    def _read(self, final: bool = False) -> None:
        if self._file is None:
            try:
                self._file = self.path.open("rb")
            except OSError:
                return
        data = self._partial + self._file.read()
        lines = data.split(b"\n")
        self._partial = b"" if final else lines.pop()
        if len(self._partial) > self.MAX_LINE:  # no newline in sight: send what there is
            lines.append(self._partial)
            self._partial = b""
        self._send(lines, final)

    def _send(self, lines: list[bytes], final: bool) -> None:
        for line in lines:
            if line or not final:
                text = line[: self.MAX_LINE].decode("utf-8", "replace")
                self._log.info("%s", text, extra={"journal_fields": self.fields})


@contextlib.contextmanager
def follow_output(
    path: Path, fields: Mapping[str, str], enabled: bool
) -> Iterator[OutputFollower | None]:
    """Copy ``path``'s lines into the log while the block runs, when ``enabled``."""
    if not enabled:
        yield None
        return
    follower = OutputFollower(path, fields)
    follower.start()
    try:
        yield follower
    finally:
        follower.stop()
