"""The official Google Pub/Sub emulator for the tests: the ``pubsub_emulator`` session fixture.

The emulator comes with the machine image (``google-cloud-cli-pubsub-emulator``, a Java server;
see ../shared/reference/infra.md section 5); it cannot be installed from the registries these
machines reach. It listens on 127.0.0.1 on a free port below the ephemeral range, runs in a
data dir of its own (its working and Java temp dir), and answers ``Ok`` on ``GET /`` about 2 s
after the start. It keeps everything in memory and checks no credentials.

What tests can rely on (emulator 0.8.20, measured here):

* Topic and subscription names need 3 to 255 characters and must start with a letter.
* A subscription's ``ack_deadline_seconds`` may be as low as 1 s (the real service's floor is
  10 s; 0 means its default, 10 s). ``modify_ack_deadline`` takes anything from 0 to 600 s. An
  unacknowledged message comes back to within ~0.2 s of its deadline.
* ``delivery_attempt`` is set only on subscriptions with a dead-letter policy, as on the service.
* A pull with no message waits up to 2 s before answering with nothing; a message published
  meanwhile is answered at once.
* Deleting a topic leaves its subscriptions with the topic ``_deleted-topic_``; calls on a
  deleted subscription fail with NotFound.

The emulator is stopped (its process group killed) when the session ends, at interpreter exit,
and by a small watchdog process when pytest dies without either (SIGKILL, a CI timeout).
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.pubsub_v1 import PublisherClient, SubscriberClient
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
LOWEST_PORT = 20000
PROJECT = "test-project"
# Never through an http_proxy from the environment: the emulator is on our loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PubSubEmulator:
    """One emulator process, and clients (publisher and admin) that talk to it."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.project = PROJECT
        self.log_path = base / "emulator.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._channels: list[grpc.Channel] = []
        self.publisher = PublisherClient(transport=PublisherGrpcTransport(channel=self._channel()))
        self.subscriber = SubscriberClient(
            transport=SubscriberGrpcTransport(channel=self._channel())
        )

    def _channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.host, options=[("grpc.enable_http_proxy", 0)])
        self._channels.append(channel)
        return channel

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        data = self.base / "data"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUBSUB_")}
        env["JAVA_OPTS"] = f"-Djava.io.tmpdir={data}"
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [str(EMULATOR), "--host=127.0.0.1", f"--port={self.port}"],
                cwd=data,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Its own session: a Ctrl-C aimed at pytest must not kill it before pytest's cleanup.
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, str(self._proc.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._answers():
            if (rc := self._proc.poll()) is not None:
                pytest.fail(f"the Pub/Sub emulator exited with {rc} while starting\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the Pub/Sub emulator did not answer on {self.host} within "
                    f"{READY_TIMEOUT:.0f} s\n{self.tail()}"
                )
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with _HTTP.open(f"http://{self.host}/", timeout=2) as response:
                return bool(response.read().strip() == b"Ok")
        except OSError:
            return False

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.log_path} (last {lines} lines)\n" + "".join(
            text.splitlines(True)[-lines:]
        )

    def close(self) -> None:
        """Stop the emulator (its whole process group) and the watchdog."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _stop_group(proc.pid, grace=0)  # anything else left in its group
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog.stdin is not None:
            watchdog.stdin.close()
            watchdog.wait(STOP_TIMEOUT)

    # -- what the studioml client does (protocol spec C) ---------------------------------------

    def topic(self, queue: str) -> str:
        return f"projects/{self.project}/topics/{queue}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def create_topic_and_subscription(self, queue: str, ack_deadline: int = 20) -> str:
        """Topic ``<queue>`` and subscription ``<queue>_sub``, as the client creates them (it
        asks for a 20 s ack deadline); return the subscription's path."""
        self.publisher.create_topic(name=self.topic(queue))
        return self.create_subscription(f"{queue}_sub", queue, ack_deadline)

    def create_subscription(self, name: str, queue: str, ack_deadline: int = 20) -> str:
        path = self.subscription(name)
        self.subscriber.create_subscription(
            name=path, topic=self.topic(queue), ack_deadline_seconds=ack_deadline
        )
        return path

    def publish(self, queue: str, data: bytes) -> str:
        """Publish ``data`` with no attributes, as the client does; return the message id."""
        response = self.publisher.publish(topic=self.topic(queue), messages=[{"data": data}])
        return str(response.message_ids[0])


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    """The official Pub/Sub emulator on a private port, shared by the session's tests."""
    if not EMULATOR.is_file():
        pytest.fail(
            f"the Pub/Sub emulator is not installed ({EMULATOR} is missing): it comes with the "
            "google-cloud-cli-pubsub-emulator package of the machine image"
        )
    emulator = PubSubEmulator(tmp_path_factory.mktemp("pubsub"), _free_port())
    atexit.register(emulator.close)
    try:
        emulator.start()
        yield emulator
    finally:
        emulator.close()
        atexit.unregister(emulator.close)


def _free_port() -> int:
    """A port free now, below the ephemeral range (where outgoing connections would take it)."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(LOWEST_PORT, min(32768, ephemeral))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    pytest.fail(f"no free port between {LOWEST_PORT} and 32768")


def _stop_group(pgid: int, grace: float = STOP_TIMEOUT) -> None:
    """TERM the emulator's process group, then KILL whatever is left after ``grace``."""
    try:
        if grace:
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                os.killpg(pgid, 0)
                time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone


if __name__ == "__main__":
    # The watchdog: when pytest's end of the pipe closes, however pytest ended, stop the group.
    sys.stdin.read()
    _stop_group(int(sys.argv[1]))
