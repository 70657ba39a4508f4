"""The control channel's parsing and its socket: bounded, refusing what is not a command, and
answering on behalf of a loop that replies (or does not)."""

import json
import socket
import threading
from pathlib import Path

import pytest

from agent.control import MAX_REQUEST, ControlServer, parse_command, send


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"[1]", "a request is a JSON object"),
        (b'{"verb": "rm -rf"}', "verb must be one of"),
        (b'{"verb": "pause", "target": "' + b"q" * 600 + b'"}', "at most 512 characters"),
        (b'{"verb": "pause", "target": "a\\u0000b"}', "printable"),
        (b'{"verb": "drain", "persist": "yes"}', "persist must be true or false"),
        (b'{"verb": "abort"}', "abort needs an experiment key"),
    ],
)
def test_what_is_not_a_command_is_refused_with_why(line: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_command(line, 0)


@pytest.fixture
def server(tmp_path: Path) -> ControlServer:
    control = ControlServer(tmp_path / "c.sock", lambda: None)
    control.start()
    return control


def answer_each(server: ControlServer, count: int) -> threading.Thread:
    """A stand-in for the supervisor's loop: answer ``count`` commands."""

    def loop() -> None:
        answered = 0
        while answered < count:
            for command in server.take():
                command.reply(True, f"{command.verb} {command.target}", uid=command.peer_uid)
                answered += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_command_reaches_the_loop_and_its_answer_comes_back(server: ControlServer) -> None:
    answer_each(server, 1).join(0)
    answer = send(server.path, "pause", "local_q")
    assert answer["ok"] is True
    assert answer["message"] == "pause local_q"
    assert answer["uid"] >= 0  # the peer's uid, from SO_PEERCRED
    assert server.path.stat().st_mode & 0o777 == 0o660
    server.close()
    assert not server.path.exists()


def test_an_oversized_request_is_refused_and_never_reaches_the_loop(
    server: ControlServer,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.path))
        conn.sendall(b"{" + b" " * (MAX_REQUEST + 10))
        answer = json.loads(conn.makefile().readline())
    assert answer["ok"] is False
    assert "bad request" in answer["message"]
    assert server.take() == []
    server.close()
