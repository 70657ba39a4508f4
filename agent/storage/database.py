"""The StudioML experiment record, for stores the agent can reach (``database: {type: local}``).

The Go runner never touches it; the Python worker sets ``status`` and the ``time_*`` fields. We do
what the Python worker does, so ``studio runs list`` and scripts polling the record see progress.
"""

import json
import logging
import time
from typing import Any

from agent.request import StudioConfig
from agent.storage import local_root
from agent.storage.local import LocalStorage

log = logging.getLogger(__name__)


def _store(config: StudioConfig) -> LocalStorage | None:
    database = config.database
    if database is None or database.type != "local" or not database.endpoint:
        return None
    return LocalStorage(local_root(database))


def read_record(config: StudioConfig, key: str) -> dict[str, Any] | None:
    store = _store(config)
    if store is None:
        return None
    try:
        record = json.loads(store.path(f"experiments/{key}").read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def update_record(config: StudioConfig, key: str, **fields: Any) -> bool:
    """Merge ``fields`` into the record if it exists; True when written. Never raises."""
    store = _store(config)
    record = read_record(config, key)
    if store is None or record is None:
        return False
    record.update(fields)
    try:
        store.write(f"experiments/{key}", lambda out: out.write(json.dumps(record).encode()))
    except OSError as exc:
        log.warning("could not update experiment record %s: %s", key, exc)
        return False
    return True


def mark_running(config: StudioConfig, key: str) -> bool:
    return update_record(config, key, status="running", time_started=time.time())


def mark_finished(config: StudioConfig, key: str, status: str) -> bool:
    now = time.time()
    return update_record(config, key, status=status, time_finished=now, time_last_checkpoint=now)
