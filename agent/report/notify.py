"""systemd's notify protocol (sd_notify), with no dependency: READY, STATUS, STOPPING, WATCHDOG
and EXTEND_TIMEOUT_USEC as datagrams on ``$NOTIFY_SOCKET``. Off systemd every call is a no-op.

The watchdog is pinged only from the supervisor's loop (never from a thread of its own), at most
every half interval on the monotonic clock, so a hung loop is what systemd sees and restarts.
"""

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket, spelled with a leading NUL on the wire.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval = self._watchdog_interval(env)
        self._last_ping = float("-inf")
        self._last_status = ""
        self._socket: socket.socket | None = None

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; failures are logged, never raised."""
        if not self.address:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for ``seconds`` more before it kills a stopping service."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        """Ping the watchdog if half its interval has passed since the last ping."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval / 2:
            self._last_ping = now
            self.send("WATCHDOG=1")
