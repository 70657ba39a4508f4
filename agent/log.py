"""Logging set-up: journald's native protocol under systemd, else one line per record on stderr.

Under systemd the journal handler stores each record's fields (``EXPERIMENT_KEY``, ``QUEUE``...)
as journal fields; elsewhere the same records are plain lines. SIGHUP re-reads the log level.
"""

import logging
import os
import sys
from pathlib import Path

from agent.errors import ConfigError
from agent.report.journal import ContextFilter, JournalHandler, journal_address

log = logging.getLogger("agent")


def setup_logging(level: str) -> None:
    address = journal_address()
    if address is not None:
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
            old.close()
        root.addHandler(JournalHandler(address))
    else:
        # Under systemd (JOURNAL_STREAM set) journald adds its own timestamp and unit name.
        under_journal = bool(os.environ.get("JOURNAL_STREAM"))
        fmt = (
            "%(levelname)s %(name)s: %(message)s"
            if under_journal
            else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.basicConfig(format=fmt, stream=sys.stderr, force=True)
        for handler in logging.getLogger().handlers:
            handler.addFilter(ContextFilter())
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    # pika narrates every socket event, and logs each refused connection as several errors with
    # tracebacks; the RabbitMQ backend already logs one line per outage with the reason.
    logging.getLogger("pika").setLevel(max(logging.CRITICAL, logging.getLogger().level))


class LevelReload:
    """On SIGHUP (from the supervisor's loop): re-read the config file and apply its log_level.

    A config that no longer validates is logged with the reason and the running settings stay.
    A level given on the command line (``--log-level``) wins over the file, as at start-up.
    """

    def __init__(self, config: Path | None, level: str, pinned: bool = False) -> None:
        self.config = config
        self.level = level
        self.pinned = pinned

    def __call__(self) -> None:
        from agent.settings import load_settings

        try:
            wanted = load_settings(self.config).log_level
        except ConfigError as exc:
            log.error(
                "SIGHUP: the config no longer validates; keeping the running settings:\n%s", exc
            )
            return
        if wanted == self.level:
            return
        if self.pinned:
            _announce(f"SIGHUP: log level stays {self.level} (--log-level); the file says {wanted}")
            return
        old, self.level = self.level, wanted
        set_level(wanted)
        _announce(f"SIGHUP: log level {old} -> {wanted}")


def _announce(text: str) -> None:
    """Log ``text`` whatever the level, so a level change is always on record."""
    # Logger.handle skips the level check (only filters apply), unlike log.info.
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, text, (), None, "LevelReload"))
