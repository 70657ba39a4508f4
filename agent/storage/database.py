"""The StudioML experiment record, for stores the agent can reach (``database: {type: local}``;
``read_status`` also reads an S3 database, for ``studio runs stop``).

The Go runner never touches it; the Python worker sets ``status`` and the ``time_*`` fields. We do
what the Python worker does, so ``studio runs list`` and scripts polling the record see progress,
but only in a database inside the stores the request's source may name (``roots``, see
agent.trust): a message cannot make the agent write a JSON file anywhere else.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.request import Artifact, StudioConfig
from agent.storage import local_root, resolve
from agent.storage.base import StorageOptions
from agent.storage.local import LocalStorage

log = logging.getLogger(__name__)
STOPPED = "stopped"  # what `studio runs stop` (db.stop_experiment) writes
MAX_RECORD = 4 * 2**20  # a record is a few KB; a bigger file is not one the client wrote


def _store(config: StudioConfig, roots: tuple[Path, ...]) -> LocalStorage | None:
    database = config.database
    if database is None or database.type != "local" or not database.endpoint:
        return None
    try:
        return LocalStorage(local_root(database, roots, "config.database"))
    except (AgentError, ValueError, OSError) as exc:
        log.debug("experiment record not updated: %s", exc)
        return None


def read_record(config: StudioConfig, key: str, roots: tuple[Path, ...]) -> dict[str, Any] | None:
    store = _store(config, roots)
    if store is None:
        return None
    try:
        with store.path(f"experiments/{key}").open("rb") as handle:
            record = json.loads(handle.read(MAX_RECORD))
    except (OSError, ValueError, RecursionError, AgentError):  # ValueError: NUL in a path
        return None
    return record if isinstance(record, dict) else None


def update_record(config: StudioConfig, key: str, roots: tuple[Path, ...], **fields: Any) -> bool:
    """Merge ``fields`` into the record if it exists; True when written. Never raises. A record
    that ``studio runs stop`` marked stopped is never made running again."""
    store = _store(config, roots)
    record = read_record(config, key, roots)
    if store is None or record is None:
        return False
    if record.get("status") == STOPPED and fields.get("status") == "running":
        return False
    record.update(fields)
    try:
        store.write(f"experiments/{key}", lambda out: out.write(json.dumps(record).encode()))
    except (OSError, ValueError, AgentError) as exc:
        log.warning("could not update experiment record %s: %s", key, exc)
        return False
    return True


def mark_running(config: StudioConfig, key: str, roots: tuple[Path, ...]) -> bool:
    return update_record(config, key, roots, status="running", time_started=time.time())


def mark_finished(config: StudioConfig, key: str, status: str, roots: tuple[Path, ...]) -> bool:
    now = time.time()
    return update_record(
        config, key, roots, status=status, time_finished=now, time_last_checkpoint=now
    )


def read_status(config: StudioConfig, key: str, options: StorageOptions) -> str | None:
    """The record's ``status`` in a local or S3 database; None when it cannot be read."""
    database = config.database
    kind = database.type if database else None
    if kind == "local":
        record = read_record(config, key, options.local_roots)
    elif kind == "s3":
        record = _read_s3_record(config, key, options)
    else:
        return None
    status = record.get("status") if record else None
    return status if isinstance(status, str) else None


def _read_s3_record(
    config: StudioConfig, key: str, options: StorageOptions
) -> dict[str, Any] | None:
    # The database is a store like config.storage: the same rules for where it may point
    # (agent.trust's endpoints) and the same credentials lookup, through the same resolver.
    as_storage = config.model_copy(update={"storage": config.database})
    record = Artifact(key=f"experiments/{key}")
    try:
        store, object_key = resolve("database", record, as_storage, options)
        with store.open_read(object_key) as stream:
            data = json.loads(stream.read(MAX_RECORD))
    except (AgentError, OSError, ValueError, RecursionError) as exc:
        log.debug("experiment record %s not read: %s", key, exc)
        return None
    return data if isinstance(data, dict) else None
