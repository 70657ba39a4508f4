"""Container images: where a request's image comes from, whether it may, and the local SIF cache.

An image is named either by the operator (``container_image``) or by the request's
``_singularity`` artifact, which ``studio run --container X`` writes as:

- ``qualified: "shub://…"`` or ``"dockerhub://…"`` (old clients' name for ``docker://``): a
  registry reference, pulled once and kept as ``pulled/<hash of the reference>.sif``;
- ``local`` plus ``key`` (the client uploaded a local ``.sif`` to its storage as a tar): the
  object is downloaded and kept as ``blobs/<sha256 of the image>.sif``. Client keys are
  ``blobstore/<sha256 of the tar>``: the same key is the same image, so it is only downloaded
  once; other keys are downloaded each time and deduplicated by content.

Every image file is written under a temporary name and renamed into place, under a flock, so
concurrent runs on one host fetch an image once and never see half of one.

Pulled and downloaded images are a cache of at most ``image_cache_size``: after each new image,
the least recently used ones are removed until the rest fit, never one that a run holds (each
run holds a shared flock on ``<image>.use`` until it ends; removal needs the exclusive one).
Host paths are the operator's files and never removed.
"""

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from agent.errors import EnvironmentFailed
from agent.executors.base import Fetch
from agent.request import Artifact, Request, StudioConfig
from agent.settings_types import ImageSource

log = logging.getLogger(__name__)

ARTIFACT = "_singularity"
PULL_SCHEMES: dict[str, ImageSource] = {
    "docker://": "docker",
    "library://": "library",
    "oras://": "oras",
    "shub://": "shub",
}
LEGACY_SCHEMES = {"dockerhub://": "docker://"}  # what 0.0.49 clients write
CHUNK = 1 << 20
PULL_TIMEOUT = 3600.0

Puller = Callable[[str, Path, BinaryIO], None]


@dataclass(frozen=True)
class ImageRef:
    """Where an image comes from: ``location`` is a pull URI, a host path or a storage key."""

    source: ImageSource
    location: str
    artifact: Artifact | None = None  # set when the image is an object in the request's storage


@dataclass(frozen=True)
class LocalImage:
    """An image on this host, ready for ``exec``; ``digest`` names its content. ``release``
    ends the run's hold on a cached image (after which it may be evicted)."""

    path: Path
    digest: str
    release: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)


def parse_reference(text: str) -> ImageRef:
    """A reference as an operator or a client writes it: a registry URI or a host path."""
    text = text.strip()
    for legacy, modern in LEGACY_SCHEMES.items():
        if text.startswith(legacy):
            text = modern + text.removeprefix(legacy)
    for scheme, source in PULL_SCHEMES.items():
        if text.startswith(scheme):
            if len(text) == len(scheme):
                raise EnvironmentFailed(f"container image {text!r} names no image")
            return ImageRef(source, text)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if not text.startswith("/"):
        raise EnvironmentFailed(
            f"container image {text!r} is neither a registry reference (docker://, library://, "
            "oras://, shub://) nor an absolute path"
        )
    return ImageRef("file", text)


def reference_for(request: Request, default: str) -> ImageRef | None:
    """The image this request runs in: its ``_singularity`` artifact, else ``default``."""
    artifact = request.experiment.artifacts.get(ARTIFACT)
    if artifact is None:
        return parse_reference(default) if default.strip() else None
    qualified = (artifact.qualified or "").strip()
    if qualified.startswith(tuple(PULL_SCHEMES) + tuple(LEGACY_SCHEMES)):
        return parse_reference(qualified)
    if artifact.key or qualified:
        store = request.config.storage.type if request.config.storage else None
        source: ImageSource = "s3" if store == "s3" or qualified.startswith("s3://") else "file"
        return ImageRef(source, artifact.key or qualified, artifact)
    if artifact.local:
        return parse_reference(artifact.local)
    raise EnvironmentFailed(f"the {ARTIFACT} artifact names no image (no qualified, key or local)")


def check_allowed(ref: ImageRef, allowed: Sequence[ImageSource]) -> None:
    if ref.source not in allowed:
        raise EnvironmentFailed(
            f"container image {ref.location!r} comes from source {ref.source!r}, which this "
            f"agent does not allow (container_sources: {', '.join(allowed) or 'none'})"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _shared_dir(path: Path) -> Path:
    """A cache folder runs under a slot identity can pass through (not list) to their image."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o711)
    return path


def _publish(partial: Path, image: Path) -> None:
    """Move a finished image into place, readable by every run (it is the run's own input)."""
    os.chmod(partial, 0o644)
    os.replace(partial, image)


@contextmanager
def _locked(path: Path, operation: int = fcntl.LOCK_EX) -> Iterator[None]:
    _shared_dir(path.parent)
    with path.open("a") as handle:
        fcntl.flock(handle, operation)
        yield


def _close_once(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _remove_if_unheld(image: Path) -> bool:
    """Remove a cached image (and its digest file) unless a run holds it; True if removed."""
    stamp = image.with_name(image.name + ".use")
    try:
        fd = os.open(stamp, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # in use
    try:
        image.unlink(missing_ok=True)
        image.with_suffix("").unlink(missing_ok=True)  # a pull's digest file
        stamp.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True


def _say(log: BinaryIO, text: str) -> None:
    log.write(f"studio-agent: {text}\n".encode())
    log.flush()


class ImageStore:
    """Images on this host: pulled ones, downloaded ones, and host paths (used in place)."""

    def __init__(self, root: Path, pull: Puller, max_bytes: int = 0) -> None:
        self.root = root
        self._pull = pull
        self.max_bytes = max_bytes  # 0: no limit
        self._digests: dict[tuple[int, int, int, int], str] = {}
        self._digests_lock = threading.Lock()

    def materialize(
        self, ref: ImageRef, config: StudioConfig, log: BinaryIO, fetch: Fetch
    ) -> LocalImage:
        """The image on this host; ``fetch`` downloads a stored one by the run's policy."""
        _shared_dir(self.root)
        if ref.source == "file" and ref.artifact is None:
            return self._host_path(Path(ref.location))
        with self._lock_for_eviction():
            if ref.artifact is not None:
                image = self._stored(ref.artifact, config, log, fetch)
            else:
                image = self._pulled(ref.location, log)
            held, new = self._hold(image)
        if new:  # only a new image can take the cache past its size
            self.evict()
        return held

    # -- the cache's size ---------------------------------------------------------------------

    @contextmanager
    def _lock_for_eviction(self) -> Iterator[None]:
        # Finding or fetching an image and taking its hold happen under the shared side, so
        # eviction (the exclusive side) never removes an image between the two.
        with _locked(self.root / "evict.lock", fcntl.LOCK_SH):
            yield

    def _hold(self, image: LocalImage) -> tuple[LocalImage, bool]:
        """The image, held for a run until its ``release``; and whether it is new to the cache
        (no run held it before)."""
        stamp = image.path.with_name(image.path.name + ".use")
        new = not stamp.exists()
        fd = os.open(stamp, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(fd)  # last use
        return replace(image, release=functools.partial(_close_once, [fd])), new

    def cached(self) -> list[tuple[float, Path, int]]:
        """(last use, image, bytes) of every pulled or downloaded image."""
        found = []
        for image in [*self.root.glob("pulled/*.sif"), *self.root.glob("blobs/*.sif")]:
            stamp = image.with_name(image.name + ".use")
            try:
                found.append((stamp.stat().st_mtime, image, image.stat().st_size))
            except OSError:
                continue  # being removed, or never held yet
        return sorted(found)

    def evict(self) -> None:
        """Remove the least recently used images no run holds until the rest fit."""
        if self.max_bytes <= 0:
            return
        # Never waits: while another run finds or fetches an image (a pull may take an hour),
        # this one goes on and the next new image evicts.
        with (self.root / "evict.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            self._evict_unheld()

    def _evict_unheld(self) -> None:
        images = self.cached()
        total = sum(size for _, _, size in images)
        for _, image, size in images:
            if total <= self.max_bytes:
                return
            if _remove_if_unheld(image):
                total -= size
                log.info(
                    "image cache: removed %s (%d MiB), least recently used", image.name, size >> 20
                )

    # -- registry references ------------------------------------------------------------------

    def _pulled(self, uri: str, log: BinaryIO) -> LocalImage:
        name = hashlib.sha256(uri.encode()).hexdigest()[:24]
        image, digest_file = self.root / "pulled" / f"{name}.sif", self.root / "pulled" / name
        with _locked(self.root / "pulled" / f"{name}.lock"):
            if image.is_file() and digest_file.is_file():
                _say(log, f"using the cached pull of {uri}")
            else:
                _say(log, f"pulling {uri}")
                partial = image.with_suffix(f".{uuid.uuid4().hex[:8]}.partial")
                try:
                    self._pull(uri, partial, log)
                    digest_file.write_text(sha256_file(partial))
                    _publish(partial, image)
                finally:
                    partial.unlink(missing_ok=True)
            return LocalImage(image, digest_file.read_text().strip())

    # -- objects in the request's storage -----------------------------------------------------

    def _stored(
        self, artifact: Artifact, config: StudioConfig, log: BinaryIO, fetch: Fetch
    ) -> LocalImage:
        key = artifact.key or artifact.qualified or ""
        store = config.storage
        where = json.dumps([store.type, store.endpoint, store.bucket] if store else [], default=str)
        index_name = hashlib.sha256(f"{where}\0{key}".encode()).hexdigest()[:24]
        index = self.root / "by-key" / index_name
        content_addressed = key.startswith("blobstore/")
        with _locked(self.root / "by-key" / f"{index_name}.lock"):
            if content_addressed and index.is_file():
                image = self.root / "blobs" / f"{index.read_text().strip()}.sif"
                if image.is_file():
                    _say(log, f"using the cached image of {key}")
                    return LocalImage(image, image.stem)
            _say(log, f"downloading the image {key}")
            image = self._download(fetch)
            index.write_text(image.stem)
            return LocalImage(image, image.stem)

    def _download(self, fetch: Fetch) -> Path:
        incoming = self.root / "incoming" / uuid.uuid4().hex
        try:
            fetch(ARTIFACT, incoming)
            found = self._single_file(incoming)
            digest = sha256_file(found)
            image = _shared_dir(self.root / "blobs") / f"{digest}.sif"
            if not image.is_file():
                _publish(found, image)
            return image
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    @staticmethod
    def _single_file(folder: Path) -> Path:
        files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
        sifs = [p for p in files if p.suffix in (".sif", ".simg", ".img")]
        chosen = sifs if len(sifs) == 1 else files
        if len(chosen) != 1:
            names = ", ".join(sorted(str(p.relative_to(folder)) for p in files)[:5])
            raise EnvironmentFailed(
                f"the {ARTIFACT} artifact must hold one image file; it holds {len(files)}"
                + (f" ({names})" if names else "")
            )
        return chosen[0]

    # -- host paths ---------------------------------------------------------------------------

    def _host_path(self, path: Path) -> LocalImage:
        try:
            info = path.stat()
        except OSError as exc:
            raise EnvironmentFailed(f"container image {path} cannot be used: {exc}") from None
        if path.is_dir():
            # A sandbox directory: hashing a whole tree per run costs too much, and it can
            # change under us anyway; its path and mtime name it well enough for the env cache.
            text = f"{path.resolve()}\0{info.st_mtime_ns}"
            return LocalImage(path, "dir-" + hashlib.sha256(text.encode()).hexdigest())
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with self._digests_lock:
            digest = self._digests.get(identity)
            if digest is None:
                digest = self._digests[identity] = sha256_file(path)
        return LocalImage(path, digest)


def spython_pull(uri: str, target: Path, log: BinaryIO, binary: str = "") -> None:
    """Pull ``uri`` into ``target``: spython's ``pull`` command line, run here.

    spython's own ``Client.pull`` drops the runtime's error output (and its streaming mode
    leaks pipes and ignores stdout), so only its command builder is used; ``binary`` replaces
    the ``singularity`` it always names, when the runtime was found under another name.
    """
    from spython.main import Client

    argv = [*Client._init_command("pull"), "--force", "--name", str(target), uri]
    if binary:
        argv[0] = binary
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=PULL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EnvironmentFailed(f"pulling {uri} took more than {PULL_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise EnvironmentFailed(f"pulling {uri}: cannot run {argv[0]}: {exc}") from None
    log.write(done.stdout)
    log.flush()
    if done.returncode != 0:
        last = done.stdout.decode(errors="replace").strip()[-1500:]
        raise EnvironmentFailed(f"pulling {uri} failed with exit code {done.returncode}: {last}")
    if not target.is_file():
        raise EnvironmentFailed(f"pulling {uri} produced no image")
