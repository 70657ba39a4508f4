"""Queue backends, chosen by an explicit kind; vendor SDKs are imported only by their module."""

from importlib import import_module
from typing import Any

from agent.errors import ConfigError
from agent.queues.base import QueueBackend

_BACKENDS = {
    "local": "agent.queues.local:LocalQueue",
    "rabbitmq": "agent.queues.rabbitmq:RabbitQueue",
    "pubsub": "agent.queues.pubsub:PubSubQueue",
    "sqs": "agent.queues.sqs:SqsQueue",
}


def backend_class(kind: str) -> type[QueueBackend]:
    try:
        module_name, class_name = _BACKENDS[kind].split(":")
    except KeyError:
        raise ConfigError(
            f"unknown queue kind {kind!r} (known: {', '.join(sorted(_BACKENDS))})"
        ) from None
    cls: type[QueueBackend] = getattr(import_module(module_name), class_name)
    return cls


def build_backend(kind: str, **kwargs: Any) -> QueueBackend:
    return backend_class(kind)(**kwargs)
