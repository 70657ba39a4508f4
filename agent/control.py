"""The operator's control channel: a Unix socket that only root and the agent's group may use.

``studio-agent drain | pause | resume | abort`` connect to it (``send``); the agent's
``ControlServer`` reads one bounded JSON line a connection, hands the command to the supervisor's
loop, which alone changes anything (``agent.operator``), and writes its answer back. The socket is
mode 0660 in a folder the operator chooses (``control_socket``; the package's is
``/run/studio-agent/control.sock``, in a 0750 runtime folder), so file permissions decide who
may connect; each command is logged with the peer's uid.
"""

import contextlib
import json
import logging
import os
import queue
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERBS = ("drain", "pause", "resume", "abort", "status")
MAX_REQUEST = 4096  # one JSON line: a verb, a target, a flag
MAX_TARGET = 512
ANSWER_TIMEOUT = 10.0  # the loop answers within a pass; a wedged loop must not wedge the CLI


class ControlError(Exception):
    """The agent could not be reached, or refused the command; the text says why."""


@dataclass
class Command:
    verb: str
    target: str = ""
    persist: bool = False
    peer_uid: int = -1
    answer: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def reply(self, ok: bool, message: str, **extra: Any) -> None:
        self.answer = {"ok": ok, "message": message, **extra}
        self.done.set()


def parse_command(line: bytes, peer_uid: int) -> Command:
    """A command from one request line; ValueError, with why, for anything else."""
    data = json.loads(line.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("a request is a JSON object")
    verb, target, persist = data.get("verb"), data.get("target") or "", data.get("persist", False)
    if verb not in VERBS:
        raise ValueError(f"verb must be one of {', '.join(VERBS)}")
    if not isinstance(target, str) or len(target) > MAX_TARGET or not target.isprintable():
        raise ValueError(f"target must be a printable string of at most {MAX_TARGET} characters")
    if not isinstance(persist, bool):
        raise ValueError("persist must be true or false")
    if verb == "abort" and not target:
        raise ValueError("abort needs an experiment key")
    return Command(verb, target, persist, peer_uid)


class ControlServer:
    """Accepts commands on ``path`` from its own thread; ``take`` gives them to the loop."""

    def __init__(self, path: Path, wake: Any):
        self.path = path
        self.wake = wake
        self.commands: queue.Queue[Command] = queue.Queue()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a killed agent's socket: nobody listens on it
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # born 0660: no moment in which others could connect
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old)
        server.listen(8)
        self._socket = server
        self._thread.start()
        log.info("control channel on %s (root and the agent's group)", self.path)

    def take(self) -> list[Command]:
        """The commands waiting, for the supervisor's loop (which must answer each)."""
        found = []
        while True:
            try:
                found.append(self.commands.get_nowait())
            except queue.Empty:
                return found

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
        for waiting in self.take():
            waiting.reply(False, "the agent is stopping")

    def _serve(self) -> None:
        assert self._socket is not None
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(ANSWER_TIMEOUT)
            try:
                command = parse_command(_read_line(conn), _peer_uid(conn))
            except (ValueError, OSError) as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(_line({"ok": False, "message": f"bad request: {exc}"[:300]}))
                return
            self.commands.put(command)
            self.wake()
            if not command.done.wait(ANSWER_TIMEOUT):
                command.answer = {"ok": False, "message": "the agent's loop did not answer"}
            with contextlib.suppress(OSError):
                conn.sendall(_line(command.answer))


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError(f"over {MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0]


def _peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


def send(path: Path, verb: str, target: str = "", persist: bool = False) -> dict[str, Any]:
    """Send one command to the agent listening on ``path``; its answer, or ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(ANSWER_TIMEOUT + 5)
        try:
            conn.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no agent listens on {path} (is it running?)") from None
        except PermissionError:
            raise ControlError(f"{path}: only root and the agent's group may use it") from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
        conn.sendall(_line({"verb": verb, "target": target, "persist": persist}))
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    try:
        answer: dict[str, Any] = json.loads(data.decode())
    except ValueError:
        raise ControlError(f"{path}: the agent closed the connection without an answer") from None
    return answer
