"""The storage contract: stream objects in and out by key; a write is all or nothing."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

Producer = Callable[[BinaryIO], object]


@dataclass(frozen=True)
class StorageOptions:
    """The agent's own storage settings (the request carries endpoints and credentials)."""

    s3_ca_bundle: Path | None = None  # PEM bundle for TLS endpoints with a private CA
    s3_verify: bool = True
    s3_retries: int = 5  # botocore retries after the first try, standard retry mode
    s3_part_size: int = 16 * 2**20  # multipart chunk; memory per upload is about 2 parts
    # Who sent the request decides where it may point (agent.trust.storage_options):
    local_roots: tuple[Path, ...] = ()  # local stores it may name; none for a broker's message
    s3_endpoints: tuple[str, ...] = ()  # host[:port] it may name; empty: any but link-local


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
