"""Local storage: StudioML's ``storage: {type: local, endpoint, bucket}`` layout.

Objects are files at ``<endpoint>/<bucket>/<key>``, exactly where the studioml client reads them.
Writes go to a hidden temporary file beside the target and are renamed into place.
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from agent.errors import ArtifactMissing, PermanentError
from agent.storage.base import Producer, Storage


class _CountingWriter:
    """Counts what passes through, so write() can report bytes without a second stat."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class LocalStorage(Storage):
    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        relative = Path(key.lstrip("/"))
        if ".." in relative.parts:
            raise PermanentError(f"artifact key {key!r} leaves the storage root")
        target = self.root / relative
        # A symlink planted in a shared store must not lead a read or a write out of it.
        if not target.resolve().is_relative_to(self.root.resolve()):
            raise PermanentError(f"artifact key {key!r} leads out of the storage root")
        return target

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        try:
            stream = self.path(key).open("rb")
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactMissing(f"no object {self.describe(key)}") from None
        with stream:
            yield stream

    def open_read(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self._open(key)

    def write(self, key: str, produce: Producer) -> int:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as raw:
                counter = _CountingWriter(raw)
                produce(counter)  # type: ignore[arg-type]  # duck-typed binary writer
                raw.flush()
                os.fsync(raw.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return counter.count

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def describe(self, key: str) -> str:
        return str(self.path(key))
