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
    also works without a storage config.
    """
    store = config.storage
    if store and store.type == "local" and artifact.key:
        return LocalStorage(local_root(store)), artifact.key
    qualified = artifact.qualified or ""
    if qualified.startswith("file:///"):
        return LocalStorage(Path("/")), qualified.removeprefix("file://")
    kind = store.type if store else None
    raise BadRequest(
        f"artifact {label!r}: storage type {kind!r} ({qualified or 'no qualified URL'}) "
        "is not supported by this agent"
    )
