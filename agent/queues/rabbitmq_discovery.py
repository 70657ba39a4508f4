"""Finding a broker's StudioML queues: the management API's bindings, and the event exchange
that says when they change. The URL rules are the Go runner's."""

import json
import ssl
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

EXCHANGE = "StudioML.topic"
ROUTING_PREFIX = "StudioML."
EVENTS = "amq.rabbitmq.event"  # the event exchange plugin's
EVENT_KEYS = ("binding.created", "binding.deleted", "queue.deleted")


def _host_port(parts: urllib.parse.SplitResult) -> str:
    """``host[:port]`` as the URL spells it (an IPv6 address keeps its brackets), no user info."""
    return parts.netloc.rpartition("@")[2]


def management_url(amqp_url: str) -> str:
    """The Go runner's rule: same host and credentials, port + 10000, https for amqps."""
    parts = urllib.parse.urlsplit(amqp_url)
    scheme = "https" if parts.scheme == "amqps" else "http"
    port = (parts.port or (5671 if parts.scheme == "amqps" else 5672)) + 10000
    # Still percent-encoded, as in the AMQP URL: bindings_request decodes them.
    userinfo = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    host = parts.hostname or "localhost"  # pika's default
    return f"{scheme}://{userinfo}{f'[{host}]' if ':' in host else host}:{port}"


def redact_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{_host_port(parts)}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def bindings_request(mgmt_url: str, vhost: str) -> urllib.request.Request:
    """``GET /api/bindings/<vhost>``, the URL's user info sent as Basic auth instead.

    User and password are percent-decoded, as pika decodes the AMQP URL's: a password with
    ``@``, ``:`` or ``/`` must be written encoded in the URL, and must reach both APIs the same.
    """
    parts = urllib.parse.urlsplit(mgmt_url)
    base = f"{parts.scheme}://{_host_port(parts)}{parts.path.rstrip('/')}"
    request = urllib.request.Request(f"{base}/api/bindings/{urllib.parse.quote(vhost, safe='')}")
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    token = b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    return request


def fetch_bindings(mgmt_url: str, vhost: str, ca_file: Path | None) -> list[dict[str, Any]]:
    """The vhost's bindings; raises OSError, ValueError or URLError."""
    request = bindings_request(mgmt_url, vhost)
    context = None
    if request.type == "https":
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        data = json.loads(response.read())
    return data if isinstance(data, list) else []


def studioml_queues(bindings: list[dict[str, Any]]) -> list[str]:
    """The queues bound to the StudioML exchange as the client binds them, sorted."""
    return sorted(
        {
            b["destination"]
            for b in bindings
            if b.get("source") == EXCHANGE
            and b.get("destination_type") == "queue"
            and str(b.get("routing_key", "")).startswith(ROUTING_PREFIX)
        }
    )


def listen_for_events(
    connection: pika.BlockingConnection, on_event: Callable[[Any, Any, Any, bytes], None]
) -> str:
    """Consume bindings made and queues deleted from the event exchange, on a channel of its
    own (a missing exchange closes the channel that asks for it); "" or why it cannot."""
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for key in EVENT_KEYS:
            channel.queue_bind(queue, EVENTS, routing_key=key)
        channel.basic_consume(queue, on_event, auto_ack=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return str(exc.reply_text)
    return ""
