"""Moving one artifact between its store and its directory in the experiment."""

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from agent.errors import ArtifactMissing, BadRequest, StorageDenied
from agent.report import metrics
from agent.request import Artifact, StudioConfig
from agent.storage import archive, resolve
from agent.storage.base import StorageOptions

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20
# The 0.0.49 client turns a tar whose only member is "./<name>" into a file: retval must be one.
SINGLE_FILE_LABELS = frozenset({"retval"})


@metrics.measured("download")
def fetch(
    label: str,
    artifact: Artifact,
    config: StudioConfig,
    dest: Path,
    budget: int,
    options: StorageOptions | None = None,
) -> int:
    """Download ``artifact`` into ``dest``; return its payload bytes.

    A missing mutable artifact is normal (nothing checkpointed yet) and yields 0 bytes; a missing
    immutable one raises ArtifactMissing. ``budget`` caps extracted bytes (0 means no cap).
    """
    dest.mkdir(parents=True, exist_ok=True)
    store, key = resolve(label, artifact, config, options)
    try:
        with store.open_read(key) as stream:
            if not artifact.unpack:
                target = dest / PurePosixPath(key).name
                with target.open("wb") as out:
                    shutil.copyfileobj(stream, out, COPY_CHUNK)
                return target.stat().st_size
            if not archive.is_tar_key(key):
                raise BadRequest(f"artifact {label!r}: unpack is set but {key!r} is not a tar")
            return archive.extract(stream, dest, max_bytes=budget or None)
    except ArtifactMissing:
        if artifact.mutable:
            return 0
        raise
    except StorageDenied as exc:
        # AWS answers 403, not 404, for a missing key when the credentials may not list the
        # bucket: for an output not yet written that is normal, as the Go runner treats it.
        if artifact.mutable:
            log.warning("%s: treating a refused download as absent: %s", label, exc)
            return 0
        raise


@metrics.measured("upload")
def upload(
    label: str,
    artifact: Artifact,
    config: StudioConfig,
    src: Path,
    options: StorageOptions | None = None,
) -> int:
    """Tar ``src`` to the artifact's key; return the bytes stored."""
    store, key = resolve(label, artifact, config, options)
    single = label if label in SINGLE_FILE_LABELS else None
    compression = archive.compression_for_key(key)
    return store.write(
        key,
        lambda out: archive.pack_directory(
            src, out, compression=compression, single_member_name=single
        ),
    )


@metrics.measured("upload")
def upload_each(
    label: str,
    artifact: Artifact,
    config: StudioConfig,
    src: Path,
    prefix: str,
    options: StorageOptions | None = None,
    names: Sequence[str] = (),
) -> int:
    """Upload the files ``names`` of ``src`` (those that exist) each as its own object
    ``<prefix><name>`` at the root of the artifact's store (the Go runner's ``metadata/``
    layout); return the bytes stored."""
    store, _ = resolve(label, artifact, config, options)
    sent = 0
    for path in sorted(src / name for name in names):
        if path.is_symlink() or not path.is_file():
            continue
        with path.open("rb") as source:
            sent += store.write(f"{prefix}{path.name}", lambda out: shutil.copyfileobj(source, out))
    return sent
