"""What a request may point at, given who sent it.

A message is only as trusted as its source. One from a broker (RabbitMQ, SQS, Pub/Sub) comes from
anyone with publish rights on a queue: it may name S3 storage, reached with its own credentials,
and nothing on this host (unless the operator lists a shared filesystem in
``broker_local_storage``). One from a local queue comes from a user of this machine: it may also
name a local store, but only inside the stores listed in ``local_storage``. Either way, what the
experiment uploads goes under ``experiments/<key>/`` and nowhere else.

``storage_options`` turns the source into the policy every transfer of the run enforces
(``agent.storage.resolve``); ``check_request`` applies it to the whole request at intake, so a
hostile message is set aside before anything is downloaded, built or run.
"""

from pathlib import Path

from agent.errors import BadRequest
from agent.request import Artifact, Request
from agent.settings import Settings
from agent.storage import SCHEMES, allowed_root, resolve
from agent.storage.base import Storage, StorageOptions
from agent.storage.local import LocalStorage

IMAGE_LABEL = "_singularity"


def storage_options(settings: Settings, local_source: bool) -> StorageOptions:
    """The storage policy for a request from a local queue (``local_source``) or a broker."""
    return StorageOptions(
        s3_ca_bundle=settings.s3_ca_bundle,
        s3_verify=settings.s3_verify,
        local_roots=(
            settings.effective_local_storage
            if local_source
            else tuple(settings.broker_local_storage)
        ),
        s3_endpoints=tuple(settings.s3_endpoints),
    )


def check_request(request: Request, options: StorageOptions) -> None:
    """Raise BadRequest, naming the artifact and the rule, for anything the source may not do."""
    for label, artifact in request.experiment.artifacts.items():
        if label == IMAGE_LABEL and _image_outside_storage(artifact, options):
            continue
        store, key = resolve(label, artifact, request.config, options)
        if artifact.mutable and not _under_own_prefix(store, key, request.key):
            raise BadRequest(
                f"artifact {label!r}: results go under experiments/{request.key}/, "
                f"not to {key[:120]!r}"
            )


def _under_own_prefix(store: Storage, key: str, experiment: str) -> bool:
    prefix = f"experiments/{experiment}/"
    if isinstance(store, LocalStorage):
        # A file:// URL's key is relative to the listed store, which may be the endpoint above
        # the bucket (<store>/artifacts/experiments/<key>/...): at a segment boundary, then.
        return f"/{prefix}" in f"/{key}"
    return key.startswith(prefix)


def _image_outside_storage(artifact: Artifact, options: StorageOptions) -> bool:
    """True for an image that is not a storage object (a registry reference, or a host path
    the source may name); BadRequest for a host path it may not."""
    qualified = (artifact.qualified or "").strip()
    scheme, sep, _ = qualified.partition("://")
    if sep and scheme.lower() not in SCHEMES:
        return True  # docker://, library://, ...: container_sources decides at run time
    if artifact.key or qualified:
        return False  # stored with the experiment: the storage rules apply
    local = (artifact.local or "").strip().removeprefix("file://")
    if local.startswith("/"):
        allowed_root(Path(local), options.local_roots, f"artifact {IMAGE_LABEL!r} (an image path)")
    return True
