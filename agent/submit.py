"""``studio-agent submit``: enqueue a directory as an experiment, as ``studio run`` 0.0.49 does.

It writes exactly what the 0.0.49 client writes for local storage and a local database
(protocol spec section K): the workspace tar under ``blobstore/<sha256>.tar``, the experiment record
under the database bucket, and the message into ``<queue_root>/<queue>/<uuid4>``. So the demo and
the tests need no client, and what they exercise is what the client produces.
"""

import hashlib
import json
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.queues.local import enqueue
from agent.request import Request, StudioConfig
from agent.storage import archive, database
from agent.storage.local import LocalStorage

MUTABLE_LABELS = ("modeldir", "retval", "output", "tb", "_metrics", "_metadata")


@dataclass
class Submission:
    workspace: Path
    script: str
    args: list[str]
    queue: str
    queue_root: Path
    storage: Path  # local store endpoint; buckets "artifacts" and "meta" live under it
    key: str = ""
    requirements: list[str] = field(default_factory=list)
    pip: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    max_duration: str | None = None
    lifetime: str | None = None
    checkpoint: str | None = None


def pack_workspace(workspace: Path, store: LocalStorage) -> str:
    """Store the workspace tar content-addressed, as the client does; return its key."""
    with tempfile.TemporaryFile() as spool:
        archive.pack_directory(workspace, spool)
        spool.seek(0)
        digest = hashlib.file_digest(spool, "sha256").hexdigest()
        key = f"blobstore/{digest}.tar"
        if not store.exists(key):
            spool.seek(0)
            store.write(key, lambda out: _copy(spool, out))
    return key


def _copy(src: Any, dst: Any) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def _artifact(store_root: Path, key: str, local: Path, mutable: bool) -> dict[str, Any]:
    return {
        "unpack": True,
        "mutable": mutable,
        "key": key,
        "local": str(local),
        "qualified": f"file://{store_root / key}",
    }


def build_message(sub: Submission, workspace_key: str) -> dict[str, Any]:
    store_root = sub.storage / "artifacts"
    studio_home = Path.home() / ".studioml" / "experiments" / sub.key
    artifacts = {"workspace": _artifact(store_root, workspace_key, sub.workspace.resolve(), False)}
    for label in MUTABLE_LABELS:
        key = f"experiments/{sub.key}/{label}.tar"
        artifacts[label] = _artifact(store_root, key, studio_home / label, True)
    now = time.time()
    resources = {"gpus": 0, "cpus": 1, "ram": "2gb", "hdd": "3gb"}
    experiment = {
        "key": sub.key,
        "args": [shlex.quote(a) for a in sub.args],  # the client quotes every argument
        "filename": sub.script,
        "pythonenv": sub.requirements,
        "project": None,
        "pythonver": f"{sys.version_info.major}.{sys.version_info.minor}",
        "resources_needed": resources,
        "status": "waiting",
        "time_added": now,
        "time_started": None,
        "time_last_checkpoint": now,
        "time_finished": None,
        "info": {},
        "git": None,
        "metric": None,
        "max_duration": sub.max_duration,
        "owner": "guest",
        "from_compl_service": False,
        "artifacts": artifacts,
    }
    config: dict[str, Any] = {
        "database": {"type": "local", "endpoint": str(sub.storage), "bucket": "meta"},
        "storage": {"type": "local", "endpoint": str(sub.storage), "bucket": "artifacts"},
        "resources_needed": dict(resources),
        "env": sub.env,
        "pip": sub.pip,
        "verbose": "error",
    }
    if sub.lifetime:
        config["experimentLifetime"] = sub.lifetime
    if sub.checkpoint:
        config["saveWorkspaceFrequency"] = sub.checkpoint
    return {"experiment": experiment, "config": config}


def prepare(sub: Submission) -> dict[str, Any]:
    """Upload the workspace and write the experiment record; return the message to send."""
    if not (sub.workspace / sub.script).is_file() and sub.script != "-m":
        raise FileNotFoundError(f"{sub.workspace / sub.script}: no such script")
    sub.key = sub.key or f"{int(time.time())}_{uuid.uuid4()}"
    workspace_key = pack_workspace(sub.workspace, LocalStorage(sub.storage / "artifacts"))
    message = build_message(sub, workspace_key)
    meta = LocalStorage(sub.storage / "meta")
    record = json.dumps(message["experiment"]).encode()
    meta.write(f"experiments/{sub.key}", lambda out: out.write(record))
    added = json.dumps(message["experiment"]["time_added"]).encode()
    meta.write(f"users/guest/experiments/{sub.key}", lambda out: out.write(added))
    return message


def submit(sub: Submission) -> Request:
    """Prepare the experiment and enqueue it in the local queue ``sub.queue``."""
    message = prepare(sub)
    enqueue(sub.queue_root, sub.queue, json.dumps(message).encode())
    return Request.model_validate(message)


def wait_for(
    config: StudioConfig,
    key: str,
    timeout: float,
    store: Path,
    progress: Callable[[str, float], None] = lambda status, waited: None,
) -> dict[str, Any] | None:
    """Poll the experiment record in ``store`` until the agent marks it finished (or stopped);
    None on timeout. ``progress`` hears the record's status and the seconds waited."""
    began = time.monotonic()
    while time.monotonic() < began + timeout:
        record = database.read_record(config, key, (store,))
        status = str(record.get("status", "waiting")) if record else "waiting"
        if status in ("finished", "stopped"):
            return record
        progress(status, time.monotonic() - began)
        time.sleep(0.2)
    return None
