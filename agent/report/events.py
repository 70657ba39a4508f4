"""What the agent tells the outside world, as events: one place for journald, Slack and metrics.

The supervisor calls ``Events.emit``; the event is logged once (its fields travel with the log
record, so the journal handler stores them as native journal fields such as ``EXPERIMENT_KEY``),
then handed to each sink. Sinks (Slack, Prometheus) must be quick and must not raise: Slack
queues the event for its own thread, metrics only bump counters. Event text and fields never
carry credentials; callers pass names and keys, never URLs with passwords or message bodies.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

log = logging.getLogger("agent.events")

Kind = Literal[
    "agent_started",
    "agent_stopping",
    "agent_stopped",
    "experiment_started",
    "experiment_finished",
    "message_rejected",
    "credential_refused",
    "operator_control",
]


@dataclass(frozen=True)
class Event:
    kind: Kind
    text: str  # one line a person reads: what happened, to what, why
    fields: Mapping[str, str] = field(default_factory=dict)  # journal-style UPPER_CASE names
    detail: str = ""  # longer text for Slack (the tail of an experiment's output)
    destination: str = ""  # a request's config.runner.slack_destination, if it gave one
    level: int = logging.INFO


class Sink(Protocol):
    def handle(self, event: Event) -> None:
        """Take the event without blocking and without raising."""


class Events:
    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Event) -> None:
        fields = {"EVENT": event.kind, **event.fields}
        log.log(event.level, "%s", event.text, extra={"journal_fields": fields})
        for sink in self.sinks:
            try:
                sink.handle(event)
            except Exception:  # a reporting bug must never stop the agent
                log.exception("event sink %s failed", type(sink).__name__)
