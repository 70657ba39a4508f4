"""Messages in the agent's custody, kept on its own disk until they are settled.

A backend that cannot hold a delivery open for as long as an experiment runs (RabbitMQ closes a
channel whose delivery stays unacknowledged past ``consumer_timeout``; SQS caps invisibility at
12 h) writes the message here, fsyncs it, and only then acknowledges it to the broker. Settling
the message later means deleting the entry (done) or publishing it back (returned). A killed agent
publishes back whatever it still holds when it starts again.

Layout: ``<root>/<queue>/<id>`` holds the body, ``<id>.json`` what is needed to publish it back.
The body is written last, so an entry without one is an interrupted write and is ignored. A queue
name comes from the broker (RabbitMQ allows ``/`` and ``..`` in one), so it names its folder
percent-encoded: ``rmq_x`` stays ``rmq_x``, ``rmq_/../x`` cannot climb out of ``<root>``.
"""

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote


def folder_name(queue: str) -> str:
    """One safe path component for ``queue``; ``unquote`` gives the name back."""
    name = quote(queue, safe="")
    return name.replace(".", "%2E") if name in ("", ".", "..") else name


@dataclass
class Entry:
    queue: str
    entry_id: str
    body: bytes
    meta: dict[str, Any] = field(default_factory=dict)


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Journal:
    def __init__(self, root: Path):
        self.root = root

    def keep(self, queue: str, body: bytes, meta: dict[str, Any]) -> Entry:
        """Store a message durably; return its entry."""
        folder = self.folder(queue)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = Entry(queue, uuid.uuid4().hex, body, meta)
        write_atomically(folder / f"{entry.entry_id}.json", json.dumps(meta).encode())
        write_atomically(folder / entry.entry_id, body)
        return entry

    def folder(self, queue: str) -> Path:
        return self.root / folder_name(queue)

    def drop(self, entry: Entry) -> None:
        folder = self.folder(entry.queue)
        (folder / entry.entry_id).unlink(missing_ok=True)
        (folder / f"{entry.entry_id}.json").unlink(missing_ok=True)

    def entries(self) -> Iterator[Entry]:
        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for body in sorted(folder.iterdir()):
                if body.suffix == ".json" or body.name.startswith("."):
                    continue
                try:
                    meta = json.loads((folder / f"{body.name}.json").read_text())
                except (OSError, ValueError):
                    meta = {}
                yield Entry(unquote(folder.name), body.name, body.read_bytes(), meta)
