"""The storage contract: stream objects in and out by key; a write is all or nothing."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import BinaryIO

Producer = Callable[[BinaryIO], object]


class Storage(ABC):
    """One bucket (or directory) of objects addressed by StudioML keys."""

    @abstractmethod
    def open_read(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A stream of the object; raise ArtifactMissing when there is none."""

    @abstractmethod
    def write(self, key: str, produce: Producer) -> int:
        """Store what ``produce`` writes to the stream it is given; return the bytes stored.

        Readers never see a partial object: it appears whole or not at all.
        """

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def describe(self, key: str) -> str:
        """Where ``key`` lives, for logs and reports; never with credentials."""
