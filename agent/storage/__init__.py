"""Storage backends, and where each artifact of a request lives.

Where an artifact may live depends on who sent the request (``StorageOptions.local_roots``): a
message from a broker names S3 only; one from a local queue may also name a local store, but only
inside the stores the agent's config lists. Keys are checked here too, so no caller can reach a
store with a key that climbs out of it.
"""

from pathlib import Path

from agent.errors import BadRequest
from agent.request import Artifact, StoreConfig, StudioConfig
from agent.storage.base import Storage, StorageOptions
from agent.storage.local import LocalStorage

MAX_KEY = 1024  # S3's own limit, in bytes
SCHEMES = ("s3", "file")


def check_key(label: str, key: str) -> str:
    """``key`` if it is a plain relative object key; BadRequest naming the label otherwise."""
    if not key or len(key.encode()) > MAX_KEY:
        raise BadRequest(f"artifact {label!r}: key must be 1 to {MAX_KEY} bytes")
    if not key.isprintable() or "\\" in key:
        raise BadRequest(f"artifact {label!r}: key {key[:80]!r} has control characters")
    parts = key.split("/")
    if (
        key.startswith("/")
        or any(p in ("", ".", "..") for p in parts[:-1])
        or parts[-1]
        in (
            ".",
            "..",
        )
    ):
        raise BadRequest(
            f"artifact {label!r}: key {key[:80]!r} has an empty, '.' or '..' segment or a "
            "leading '/'"
        )
    return key


def scheme_of(label: str, artifact: Artifact) -> str:
    """The scheme of ``qualified`` ('' when there is none); an unknown one is named."""
    qualified = artifact.qualified or ""
    scheme, sep, _ = qualified.partition("://")
    if not sep:
        if qualified:
            raise BadRequest(f"artifact {label!r}: qualified {qualified[:80]!r} is not a URL")
        return ""
    if scheme.lower() not in SCHEMES:
        raise BadRequest(
            f"artifact {label!r}: storage scheme {scheme[:20]!r} is not supported "
            "(this agent reads s3://, and file:// from local queues)"
        )
    return scheme.lower()


def allowed_root(path: Path, roots: tuple[Path, ...], what: str) -> Path:
    """The allowed store that holds ``path`` (symlinks resolved); BadRequest when none does."""
    if not roots:
        raise BadRequest(
            f"{what}: local storage ({path}) is refused: only a message from a local queue may "
            "name it, and only inside a store listed in local_storage"
        )
    real = path.resolve()
    for root in roots:
        if real.is_relative_to(root.resolve()):
            return real
    listed = ", ".join(str(r) for r in roots)
    raise BadRequest(
        f"{what}: local storage {path} is outside the stores its source may name ({listed}; "
        "local_storage, or broker_local_storage for a broker's message)"
    )


def local_root(store: StoreConfig, roots: tuple[Path, ...], what: str) -> Path:
    """``<endpoint>/<bucket>`` of a local store, which must lie inside one of ``roots``."""
    endpoint = (store.endpoint or "").removeprefix("file://")
    if not endpoint.startswith("/"):
        raise BadRequest(f"{what}: local storage needs an absolute endpoint, not {endpoint!r}")
    bucket = store.bucket or ""
    if bucket and (bucket in (".", "..") or "/" in bucket):
        raise BadRequest(f"{what}: local bucket {bucket[:80]!r} must be one name")
    return allowed_root(Path(endpoint) / bucket, roots, what)


def resolve(
    label: str, artifact: Artifact, config: StudioConfig, options: StorageOptions | None = None
) -> tuple[Storage, str]:
    """The store and key of one artifact; no I/O, so intake can check a request with it.

    For ``type: local`` the 0.0.49 client writes ``qualified`` with a slash missing
    (``file://tmp/...``), so the location comes from ``config.storage`` and the artifact key,
    never from ``qualified``. A well-formed ``file:///abs/path`` qualified URL (the demo form)
    also works without a storage config. S3 artifacts (an ``s3://`` qualified URL, or none and
    ``type: s3``) go to agent.storage.s3, imported only then: boto3 costs ~120 ms to import.
    """
    options = options or StorageOptions()
    what = f"artifact {label!r}"
    scheme = scheme_of(label, artifact)
    store = config.storage
    kind = (store.type or "") if store else ""
    if store is not None and kind == "local" and artifact.key:
        root = local_root(store, options.local_roots, what)
        return LocalStorage(root), check_key(label, artifact.key)
    if scheme == "file":
        path = Path((artifact.qualified or "").removeprefix("file://"))
        if not path.is_absolute():
            raise BadRequest(f"{what}: file:// URL {str(path)[:80]!r} is not an absolute path")
        real = allowed_root(path, options.local_roots, what)
        root = next(r.resolve() for r in options.local_roots if real.is_relative_to(r.resolve()))
        return LocalStorage(root), check_key(label, str(real.relative_to(root)))
    if scheme == "s3" or (not scheme and kind == "s3"):
        from agent.storage.s3 import resolve_s3

        return resolve_s3(label, artifact, config, options)
    source = artifact.qualified or artifact.url or "no qualified URL"
    raise BadRequest(
        f"{what}: storage type {kind or None!r} ({source[:80]}) is not supported by this agent"
    )
