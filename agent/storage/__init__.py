"""Storage backends, and where each artifact of a request lives."""

from pathlib import Path

from agent.errors import BadRequest
from agent.request import Artifact, StoreConfig, StudioConfig
from agent.storage.base import Storage, StorageOptions
from agent.storage.local import LocalStorage


def local_root(store: StoreConfig) -> Path:
    """``<endpoint>/<bucket>`` of a local store; the endpoint may be a path or a file:// URL."""
    endpoint = (store.endpoint or "").removeprefix("file://")
    if not endpoint:
        raise BadRequest("local storage has no endpoint")
    return Path(endpoint) / (store.bucket or "")


def resolve(
    label: str, artifact: Artifact, config: StudioConfig, options: StorageOptions | None = None
) -> tuple[Storage, str]:
    """The store and key of one artifact.

    For ``type: local`` the 0.0.49 client writes ``qualified`` with a slash missing
    (``file://tmp/...``), so the location comes from ``config.storage`` and the artifact key,
    never from ``qualified``. A well-formed ``file:///abs/path`` qualified URL (the demo form)
    also works without a storage config. S3 artifacts (``type: s3`` or an ``s3://`` qualified
    URL) go to agent.storage.s3, imported only then: boto3 costs ~120 ms to import.
    """
    store = config.storage
    if store and store.type == "local" and artifact.key:
        return LocalStorage(local_root(store)), artifact.key
    qualified = artifact.qualified or ""
    if qualified.startswith("file:///"):
        return LocalStorage(Path("/")), qualified.removeprefix("file://")
    if qualified.startswith("s3://") or (store and store.type == "s3"):
        from agent.storage.s3 import resolve_s3

        return resolve_s3(label, artifact, config, options)
    kind = store.type if store else None
    raise BadRequest(
        f"artifact {label!r}: storage type {kind!r} ({qualified or 'no qualified URL'}) "
        "is not supported by this agent"
    )
