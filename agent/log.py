"""Logging set-up: one line per event on stderr, which journald captures under systemd."""

import logging
import os
import sys


def setup_logging(level: str) -> None:
    # Under systemd (JOURNAL_STREAM set) journald adds its own timestamp and unit name.
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if under_journal
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    # pika narrates every socket event, and logs each refused connection as several errors with
    # tracebacks; the RabbitMQ backend already logs one line per outage with the reason.
    logging.getLogger("pika").setLevel(max(logging.CRITICAL, logging.getLogger().level))
