"""A private RabbitMQ node for the tests: the ``rabbitmq`` session fixture.

The node is Debian's ``rabbitmq-server`` (3.10.8 on Erlang 25), started without systemd as the
current user, with everything of its own: config, data and logs under a pytest tmp dir, node name,
AMQP, management, distribution and epmd ports (a free block below 32768, because ports in the
ephemeral range collide with outgoing connections), and its own epmd. Other brokers on the machine,
including one on the default ports, are left alone. See ../shared/reference/infra.md section 2.

What tests can rely on (measured on a 2-vCPU machine of the CI kind, with other work running):

* Start: 3-6 s cold (fresh data dir) until both AMQP and ``GET /api/overview`` answer.
  ``stop()`` is a clean shutdown of 1.5 s; ``restart()`` takes 5-7 s (a start on an existing
  data dir spends about 2.5 s checking for schema upgrades). Connections open at the time are
  closed by the broker (320 CONNECTION_FORCED); nothing listens while the node is stopped.
* Across a restart, durable queues and their persistent (``delivery_mode=2``) messages survive.
  **Non-durable queues are deleted** with their messages and bindings, and so are transient
  messages in durable queues. The durable, auto-delete ``StudioML.topic`` exchange survives even
  when the only queues bound to it were non-durable (removing bindings at recovery does not trigger
  auto-delete). So after a restart a studioml ``rmq_x`` queue (non-durable by default) is gone.
* ``consumer_timeout`` is read by a channel when it opens, so ``set_consumer_timeout`` only
  affects channels opened afterwards. The channel checks it on its tick, every
  ``channel_tick_interval`` (60 s by default, read each time the tick is re-armed): with the default
  a 2 s timeout closes the channel after anything from 2 to 62 s. ``set_consumer_timeout`` therefore
  shortens the tick too; with a 2 s timeout and a 1 s tick the broker closes the channel
  (406 PRECONDITION_FAILED, "delivery acknowledgement on channel 1 timed out") 2 to 3 s after the
  delivery, and requeues the message. A ``basic.get`` delivery counts, as a consumer's does.
* Management API statistics (message counts in ``/api/queues``) lag by about 1 s here
  (RabbitMQ's default is 5 s; see ``_write_config``), also after a restart. Queues and bindings
  themselves (``/api/bindings``) come from the metadata store and are never stale.
* ``set_consumer_timeout`` changes the whole node for the rest of the session: restore it with
  ``set_consumer_timeout(DEFAULT_CONSUMER_TIMEOUT_MS)`` (a restart restores it too).
* TLS: given ``TlsMaterial`` (tests/services/tls.py; the session fixture always passes it), the
  node also listens with TLS, on two more ports of its block: AMQPS (``amqps_url``) and an HTTPS
  management listener (``mgmt_https_url``), with the server certificate for 127.0.0.1 signed by
  the throwaway CA. Clients are not asked for certificates. The plain listeners stay as they are;
  ``start()`` also waits for both TLS listeners to complete a verified handshake. Now and then
  (about one in ten here) the node misses the TCP close of a TLS client that closed its AMQP
  connection properly: the connection stays in ``/api/connections`` with state ``closed`` (the
  socket in CLOSE-WAIT) for about 30 s, until the node times it out ("client unexpectedly
  closed TCP connection"). Tests must not expect a TLS connection to vanish at once.

The node is stopped when the session ends, at interpreter exit, and by a small watchdog process
when pytest dies without either (SIGKILL, a CI timeout), so no broker or epmd outlives the tests.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pika
import pika.exceptions
import pytest
from pika.adapters.utils.connection_workflow import AMQPConnectorException

if TYPE_CHECKING:
    # Not at run time: this file also runs as a script (the watchdog), without the repository
    # root on sys.path.
    from tests.services.tls import TlsMaterial

# The real scripts: /usr/sbin/rabbitmq-server is a wrapper that switches to the rabbitmq user.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000
DEFAULT_CHANNEL_TICK_MS = 60_000
LOWEST_PORT = 20000
# rabbitmqctl's own distribution listener: its default range 35672-35682 lies in the ephemeral
# range and is shared with every other node's CLI.
CTL_PORTS = 4
# amqp, management, distribution, epmd, then the CTL_PORTS, then amqps and management https
# (reserved whether or not the node listens with TLS), then the Prometheus plugin's port.
PORTS_PER_NODE = 4 + CTL_PORTS + 3
_GUEST_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()
# Never through an http_proxy from the environment: the broker is on our loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RabbitBroker:
    """One private node: its URLs and ports, and control over its life for restart tests.

    With ``tls``, it also serves AMQPS and an HTTPS management API (``amqps_url``,
    ``mgmt_https_url``) with that material's server certificate.
    """

    def __init__(self, base: Path, first_port: int, tls: TlsMaterial | None = None) -> None:
        self.base = base
        self.tls = tls
        self.amqp_port, self.mgmt_port, self.dist_port, self.epmd_port = range(
            first_port, first_port + 4
        )
        self.amqps_port, self.mgmt_https_port, self.prometheus_port = range(
            first_port + 4 + CTL_PORTS, first_port + 7 + CTL_PORTS
        )
        self.node = f"rabbit_test_{first_port}@localhost"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2f"
        self.mgmt_url = f"http://guest:guest@127.0.0.1:{self.mgmt_port}"
        self.log_dir = base / "log"
        self.log_path = self.log_dir / "node.log"
        self.env = self._environment(ctl_port=first_port + 4)
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = _start_watchdog(self.epmd_port)
        self._write_config()

    @property
    def amqps_url(self) -> str:
        """The AMQPS listener (only with ``tls``); the server certificate names 127.0.0.1."""
        self._need_tls()
        return f"amqps://guest:guest@127.0.0.1:{self.amqps_port}/%2f"

    @property
    def mgmt_https_url(self) -> str:
        """The HTTPS management listener (only with ``tls``)."""
        self._need_tls()
        return f"https://guest:guest@127.0.0.1:{self.mgmt_https_port}"

    def _need_tls(self) -> None:
        if self.tls is None:
            raise RuntimeError(f"the RabbitMQ node {self.node} was made without TLS material")

    def _environment(self, ctl_port: int) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        b = self.base
        return inherited | {
            # The Erlang cookie lives in $HOME: the node and rabbitmqctl must share it.
            "HOME": str(b),
            "RABBITMQ_NODENAME": self.node,
            # A missing file, so that /etc/rabbitmq/rabbitmq-env.conf is not read.
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_LOGS": str(self.log_path),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(ctl_port),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(ctl_port + CTL_PORTS - 1),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": str(self.log_dir / "erl_crash.dump"),
        }

    def _write_config(self) -> None:
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {self.mgmt_port}\n"
            # rabbitmq_prometheus, per queue: what the backlog alert of packaging/monitoring reads.
            "prometheus.tcp.ip = 127.0.0.1\n"
            f"prometheus.tcp.port = {self.prometheus_port}\n"
            "prometheus.return_per_object_metrics = true\n"
            # Message counts in /api/queues lag by the smallest sample interval of these
            # policies (5 s by default) plus the statistics interval. Each section must be set.
            "collect_statistics_interval = 500\n"
            "management.sample_retention_policies.global.minute = 1\n"
            "management.sample_retention_policies.basic.minute = 1\n"
            "management.sample_retention_policies.detailed.10 = 1\n"
            "log.console = false\n"
            "log.file.level = info\n" + self._tls_config()
        )
        # What `rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_event_exchange
        # rabbitmq_prometheus` writes, without its 1.2 s.
        (self.base / "enabled_plugins").write_text(
            "[rabbitmq_management,rabbitmq_event_exchange,rabbitmq_prometheus].\n"
        )

    def _tls_config(self) -> str:
        if self.tls is None:
            return ""
        ca, cert, key = self.tls.ca, self.tls.cert, self.tls.key
        return (
            f"listeners.ssl.1 = 127.0.0.1:{self.amqps_port}\n"
            f"ssl_options.cacertfile = {ca}\n"
            f"ssl_options.certfile = {cert}\n"
            f"ssl_options.keyfile = {key}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
            "management.ssl.ip = 127.0.0.1\n"
            f"management.ssl.port = {self.mgmt_https_port}\n"
            f"management.ssl.cacertfile = {ca}\n"
            f"management.ssl.certfile = {cert}\n"
            f"management.ssl.keyfile = {key}\n"
        )

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the node on its ports and data dir; return once AMQP and management answer."""
        if self._proc is not None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "startup.log").open("ab") as out:
            self._proc = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._tell_watchdog(str(self._proc.pid))
        self._wait_ready()

    def stop(self) -> None:
        """Stop the node cleanly; its data dir, ports and epmd stay for ``start()``.

        The node is the whole session's: a test that stops it starts it again in a ``finally``.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._drop_stats_handler()
        _stop_session(proc)
        self._tell_watchdog("")

    def _drop_stats_handler(self) -> None:
        # At shutdown the management plugin's event handler blocks the rabbit_event manager until
        # its 5 s shutdown timeout; removed from a running node it goes in 2 ms (stop: 6 s -> 1 s).
        try:
            self.ctl("eval", "gen_event:delete_handler(rabbit_event, rabbit_mgmt_db_handler, []).")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # the node is down or wedged already: the TERM below deals with it

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and our epmd: the session's teardown, and atexit's."""
        self.stop()
        _kill_epmd(self.epmd_port)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            _close_quietly(watchdog.stdin)
            watchdog.wait(STOP_TIMEOUT)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not (self._amqp_answers() and self._mgmt_answers() and self._tls_answers()):
            if (rc := self._proc.poll()) is not None:
                pytest.fail(f"rabbitmq-server exited with {rc} while starting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                tls = (
                    f" (and with TLS on {self.amqps_port} and {self.mgmt_https_port})"
                    if self.tls
                    else ""
                )
                pytest.fail(
                    f"RabbitMQ node {self.node} did not answer on AMQP port {self.amqp_port} and "
                    f"management port {self.mgmt_port}{tls} within {READY_TIMEOUT:.0f} s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def _amqp_answers(self) -> bool:
        # A plain connect first: pika logs a page of errors for every refused attempt.
        try:
            socket.create_connection(("127.0.0.1", self.amqp_port), timeout=1).close()
            params = pika.URLParameters(
                self.amqp_url + "?connection_attempts=1&socket_timeout=2&stack_timeout=3"
            )
            pika.BlockingConnection(params).close()
        except (OSError, pika.exceptions.AMQPError, AMQPConnectorException):
            return False
        return True

    def _mgmt_answers(self) -> bool:
        try:
            self.api("/api/overview")
        except (OSError, ValueError):
            return False
        return True

    def _tls_answers(self) -> bool:
        """Both TLS listeners complete a handshake verified against the CA (True without TLS)."""
        if self.tls is None:
            return True
        context = self.tls.client_context()
        try:
            raw = socket.create_connection(("127.0.0.1", self.amqps_port), timeout=2)
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                # An orderly close (close_notify both ways): a bare close right after the
                # handshake is sometimes missed by the node, which then logs a
                # handshake_timeout error 10 s later.
                tls.unwrap()
            https = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
            )
            request = urllib.request.Request(
                f"https://127.0.0.1:{self.mgmt_https_port}/api/overview",
                headers={"Authorization": _GUEST_AUTH},
            )
            https.open(request, timeout=2).close()
        except (OSError, ValueError):
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.log_dir / "startup.log", self.log_path):
            text = path.read_text(errors="replace") if path.exists() else "(missing)\n"
            parts.append(
                f"--- {path} (last {lines} lines)\n" + "".join(text.splitlines(True)[-lines:])
            )
        return "".join(parts)

    # -- control -------------------------------------------------------------------------------

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` against this node and return its stdout."""
        cmd = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def set_consumer_timeout(self, ms: int, check_interval_ms: int | None = None) -> None:
        """Set the delivery acknowledgement timeout for channels opened from now on.

        The broker only checks it every ``channel_tick_interval`` (60 s by default), so this
        also sets that: to ``check_interval_ms``, or by default half the timeout, between
        100 ms and 60 s. ``set_consumer_timeout(DEFAULT_CONSUMER_TIMEOUT_MS)`` restores
        RabbitMQ's defaults (30 min, 60 s tick), as a restart does.
        """
        tick = check_interval_ms or min(DEFAULT_CHANNEL_TICK_MS, max(100, ms // 2))
        out = self.ctl(
            "eval",
            f"ok = application:set_env(rabbit, consumer_timeout, {ms}),"
            f" ok = application:set_env(rabbit, channel_tick_interval, {tick}),"
            " {application:get_env(rabbit, consumer_timeout),"
            " application:get_env(rabbit, channel_tick_interval)}.",
        )
        if out.strip() != f"{{{{ok,{ms}}},{{ok,{tick}}}}}":
            raise RuntimeError(f"consumer_timeout/channel_tick_interval not applied: {out!r}")

    # -- management API ------------------------------------------------------------------------

    def api(self, path: str, method: str = "GET") -> Any:
        """Call the management API as guest; return the decoded JSON body, or None if empty."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.mgmt_port}{path}",
            method=method,
            headers={"Authorization": _GUEST_AUTH},
        )
        with _HTTP.open(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def queues(self) -> list[dict[str, Any]]:
        queues: list[dict[str, Any]] = self.api("/api/queues")
        return queues

    def delete_queue(self, name: str, vhost: str = "/") -> None:
        self.api(f"/api/queues/{_quote(vhost)}/{_quote(name)}", method="DELETE")

    # -- watchdog ------------------------------------------------------------------------------

    def _tell_watchdog(self, line: str) -> None:
        if self._watchdog is None or self._watchdog.stdin is None:
            return
        try:
            self._watchdog.stdin.write(f"{line}\n".encode())
            self._watchdog.stdin.flush()
        except OSError:
            pass  # the watchdog died: teardown and atexit still stop the node


@pytest.fixture(scope="session")
def rabbitmq(
    tmp_path_factory: pytest.TempPathFactory, tls_material: TlsMaterial
) -> Iterator[RabbitBroker]:
    """A private RabbitMQ node (management plugin on) shared by the session's tests.

    It also listens with TLS (``amqps_url``, ``mgmt_https_url``), with ``tls_material``'s
    certificate: the fixture must be visible where this one is (tests/conftest.py imports both).
    """
    if not (RABBITMQ_BIN / "rabbitmq-server").is_file():
        pytest.fail(
            f"rabbitmq-server is not installed ({RABBITMQ_BIN}/rabbitmq-server is missing): "
            "apt-get install --no-install-recommends rabbitmq-server, as .ci/run does"
        )
    broker = RabbitBroker(tmp_path_factory.mktemp("rabbitmq"), _free_port_block(), tls_material)
    atexit.register(broker.close)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()
        atexit.unregister(broker.close)


# -- processes ------------------------------------------------------------------------------------


def _free_port_block(size: int = PORTS_PER_NODE) -> int:
    """First port of ``size`` consecutive ports, free now, below the ephemeral range."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    top = min(32768, ephemeral)
    for _ in range(200):
        first = random.randrange(LOWEST_PORT, top - size)
        if all(_port_free(port) for port in range(first, first + size)):
            return first
    pytest.fail(f"no {size} consecutive free ports between {LOWEST_PORT} and {top}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_session(proc: subprocess.Popen[bytes]) -> None:
    """Stop rabbitmq-server and the VM in its process group (its port helpers exit with it)."""
    if proc.poll() is None:
        # The script forwards TERM to the VM, which shuts the node down cleanly.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False once it has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _kill_epmd(port: int) -> None:
    """Kill the epmd serving ``port``: ours, found by the ERL_EPMD_PORT it inherited."""
    needle = f"ERL_EPMD_PORT={port}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() != "epmd":
                continue
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # not a process, gone meanwhile, or not ours to read


def _start_watchdog(epmd_port: int) -> subprocess.Popen[bytes]:
    # Its own session: a Ctrl-C aimed at pytest must not kill it before pytest's cleanup.
    return subprocess.Popen(
        [sys.executable, __file__, str(epmd_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def _watchdog(epmd_port: int) -> None:
    """Kill the node left running when pytest's pipe closes, however pytest ended.

    pytest writes the node's process group id on every start and an empty line on every stop.
    """
    pgid = 0
    for line in sys.stdin:
        pgid = int(line) if line.strip() else 0
    if pgid and _signal_group(pgid, signal.SIGTERM):
        deadline = time.monotonic() + STOP_TIMEOUT
        while _signal_group(pgid, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
    _kill_epmd(epmd_port)


def _close_quietly(stream: IO[bytes] | None) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass  # the watchdog is gone already: nothing left to tell it


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


if __name__ == "__main__":
    _watchdog(int(sys.argv[1]))
