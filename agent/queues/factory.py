"""The one place a queue backend is made: from the config (``static_backends``) or from a
certs-dir credential (``credential_backend``), with the same per-kind settings either way.
Vendor SDKs load only when a backend of their kind is made (agent.queues.build_backend)."""

from typing import Any

from agent.credentials import Credential
from agent.queues import build_backend
from agent.queues.base import QueueBackend, QueueFilter
from agent.settings import Settings


def static_backends(settings: Settings) -> list[QueueBackend]:
    """The local queue root always; a broker when the config names one (``rabbitmq.url``)."""
    local = build_backend(
        "local",
        root=settings.local.root,
        rescan=settings.local.rescan,
        max_body=settings.max_message_size,
        **_common(settings),
    )
    backends = [local]
    if settings.rabbitmq.url:
        backends.append(
            _rabbit(settings, "config", settings.rabbitmq.url, settings.rabbitmq.mgmt_url)
        )
    return backends


def credential_backend(credential: Credential, settings: Settings) -> QueueBackend:
    """The backend a certs-dir credential asks for."""
    found = credential.settings
    if credential.kind == "rabbitmq":
        return _rabbit(settings, credential.name, found["amqp_url"], found["mgmt_url"])
    if credential.kind == "sqs":
        return build_backend(
            "sqs",
            name=credential.name,
            access_key=found["access_key"],
            secret_key=found["secret_key"],
            region=found["region"],
            session_token=found["session_token"],
            endpoint_url=found["endpoint_url"],
            refresh=settings.sqs.refresh,
            visibility=settings.sqs.visibility,
            wait_time=settings.sqs.wait_time,
            **_common(settings),
        )
    emulator = settings.pubsub.emulator_host or None
    return build_backend(
        "pubsub",
        name=credential.name,
        key_file=None if emulator else found["key_file"],
        project=found["project"],
        emulator_host=emulator,
        refresh=settings.pubsub.refresh,
        ack_deadline=settings.pubsub.ack_deadline,
        **_common(settings),
    )


def _rabbit(settings: Settings, name: str, url: str, mgmt_url: str | None) -> QueueBackend:
    return build_backend(
        "rabbitmq",
        name=name,
        amqp_url=url,
        mgmt_url=mgmt_url or None,
        ca_file=settings.rabbitmq.ca_file,
        refresh=settings.rabbitmq.refresh,
        **_common(settings),
    )


def _common(settings: Settings) -> dict[str, Any]:
    return {
        "queue_filter": QueueFilter(settings.queue_match, settings.queue_mismatch),
        "state_dir": settings.state_dir,
    }
