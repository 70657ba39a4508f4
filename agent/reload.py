"""``systemctl reload`` (SIGHUP): re-read the config file and apply what can change while
experiments run; name the rest, which takes a restart.

The settings object is shared by the supervisor, the gate and admission, which read these keys
each time they decide: setting them on it is enough. A file that no longer validates changes
nothing, and says why.
"""

import logging
from pathlib import Path

from agent.errors import ConfigError
from agent.log import LevelReload
from agent.settings import Settings, load_settings

log = logging.getLogger("agent.supervisor")

# Read at each decision, so a new value applies from the next message or the next drain.
LIVE = (
    "max_concurrent",
    "max_attempts",
    "max_crashes",
    "clear_text",
    "max_idle",
    "max_experiments",
    "drain_timeout",
    "kill_grace",
    "max_runtime",
    "retry_backoff",
    "checkpoint_interval",
    "checkpoint_min_interval",
    "max_message_size",
)


class ConfigReload:
    def __init__(
        self, config: Path | None, level: str, pinned: bool = False, slots: int | None = None
    ) -> None:
        self.config = config
        self.level = LevelReload(config, level, pinned)
        self.slots = slots  # slot users: max_concurrent may not exceed them (agent.sandbox)

    def __call__(self, running: Settings) -> None:
        self.level()  # logs its own change, or that the file no longer validates
        try:
            fresh = load_settings(self.config)
        except ConfigError:
            return
        applied, later = [], []
        for name in Settings.model_fields:
            old, new = getattr(running, name), getattr(fresh, name)
            if name == "log_level" or old == new:
                continue
            if name == "max_concurrent" and self.slots is not None and new > self.slots:
                log.error(
                    "SIGHUP: max_concurrent %d is more than the %d slot users; it stays %d",
                    new,
                    self.slots,
                    old,
                )
                continue
            if name in LIVE:
                # Settings are frozen so that nothing else changes them; this is the one place
                # that does, on purpose, between two passes of the loop.
                object.__setattr__(running, name, new)
                applied.append(f"{name} {old} -> {new}")
            else:
                later.append(name)
        if applied:
            log.warning("SIGHUP: applied %s", "; ".join(applied))
        if later:
            log.warning("SIGHUP: changed, but applied only at the next start: %s", ", ".join(later))
