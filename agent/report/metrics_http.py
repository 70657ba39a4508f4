"""The ``/metrics`` HTTP server, on a thread that sleeps until a scrape arrives.

prometheus_client's ``start_http_server`` runs ``serve_forever``, which wakes every 0.5 s to
look for a shutdown request: measured by bench/idle.py, that was 0.11 % of a core, more than
the rest of an idle agent. Here the thread blocks in ``handle_request`` with no timeout;
``close`` sets the flag and then connects once, so the thread wakes, sees it and ends.
"""

import contextlib
import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not news: one line each would flood the journal."""


class MetricsServer:
    """Serves ``registry`` on ``host``:``port`` (0 picks a free port) until ``close``."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # timeout None: handle_request waits for a connection, however long it takes.
        settings = {"address_family": family, "timeout": None}
        server_class = type("Server", (ThreadingWSGIServer,), settings)
        self._httpd: WSGIServer = make_server(
            str(sockaddr[0]), port, make_wsgi_app(registry), server_class, handler_class=_Quiet
        )
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def _serve(self) -> None:
        while not self._closing:
            self._httpd.handle_request()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):  # the wake-up call; the thread is a daemon anyway
            socket.create_connection(self.address, timeout=1).close()
        self._thread.join(timeout=2)
        self._httpd.server_close()
