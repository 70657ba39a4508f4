"""Image references, source policy, the image cache, and the container executor's helpers."""

import hashlib
import io
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from agent.errors import EnvironmentFailed
from agent.executors.base import Fetch
from agent.executors.containerenv import ImagePython
from agent.executors.images import (
    ImageRef,
    ImageStore,
    LocalImage,
    check_allowed,
    parse_reference,
    reference_for,
    spython_pull,
)
from agent.executors.singularity import env_file_text, flavor_of, lacks_sys_resource
from agent.request import Artifact, Request, StudioConfig
from agent.storage import transfer
from agent.storage.base import StorageOptions


def make_request(artifact: Artifact | None, storage: dict[str, str] | None = None) -> Request:
    artifacts = {"_singularity": artifact.model_dump()} if artifact else {}
    return Request.model_validate(
        {
            "experiment": {"key": "k1", "artifacts": artifacts},
            "config": {"storage": storage} if storage else {},
        }
    )


@pytest.mark.parametrize(
    ("text", "source", "location"),
    [
        ("docker://python:3.11", "docker", "docker://python:3.11"),
        ("dockerhub://tensorflow/tensorflow", "docker", "docker://tensorflow/tensorflow"),
        ("shub://sentient-singularity/x", "shub", "shub://sentient-singularity/x"),
        ("library://alpine", "library", "library://alpine"),
        ("oras://ghcr.io/a/b:1", "oras", "oras://ghcr.io/a/b:1"),
        ("/srv/images/x.sif", "file", "/srv/images/x.sif"),
        ("file:///srv/images/x.sif", "file", "/srv/images/x.sif"),
    ],
)
def test_parse_reference(text: str, source: str, location: str) -> None:
    assert parse_reference(text) == ImageRef(source, location)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["images/x.sif", "docker://", "http://example.com/x.sif"])
def test_unusable_references_say_why(text: str) -> None:
    with pytest.raises(EnvironmentFailed, match="container image"):
        parse_reference(text)


def test_reference_for_a_request() -> None:
    assert reference_for(make_request(None), "") is None
    assert reference_for(make_request(None), "/x.sif") == ImageRef("file", "/x.sif")
    pulled = Artifact(qualified="shub://a/b", unpack=False)
    assert reference_for(make_request(pulled), "/x.sif") == ImageRef("shub", "shub://a/b")
    stored = Artifact(key="blobstore/abc.tar", local="/home/u/x.sif")
    local = {"type": "local", "endpoint": "/s", "bucket": "b"}
    assert reference_for(make_request(stored, local), "") == ImageRef(
        "file", "blobstore/abc.tar", stored
    )
    s3 = {"type": "s3", "endpoint": "http://h:1", "bucket": "b"}
    assert reference_for(make_request(stored, s3), "").source == "s3"  # type: ignore[union-attr]
    with pytest.raises(EnvironmentFailed, match="names no image"):
        reference_for(make_request(Artifact()), "")


def test_check_allowed_names_the_source_and_the_setting() -> None:
    check_allowed(ImageRef("docker", "docker://x"), ["docker"])
    with pytest.raises(EnvironmentFailed, match=r"source 'file'.*container_sources: docker"):
        check_allowed(ImageRef("file", "/x.sif"), ["docker"])


def store_sif(root: Path, payload: bytes) -> tuple[Artifact, StudioConfig]:
    """A SIF uploaded the way the client uploads a local file: a tar with one ``./name``."""
    spool = io.BytesIO()
    with tarfile.open(fileobj=spool, mode="w") as tar:
        info = tarfile.TarInfo("./img.sif")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    key = f"blobstore/{hashlib.sha256(spool.getvalue()).hexdigest()}.tar"
    (root / "artifacts" / "blobstore").mkdir(parents=True)
    (root / "artifacts" / key).write_bytes(spool.getvalue())
    config = StudioConfig.model_validate(
        {"storage": {"type": "local", "endpoint": str(root), "bucket": "artifacts"}}
    )
    return Artifact(key=key, local="/elsewhere/img.sif"), config


def local_fetch(
    root: Path, artifact: Artifact | None = None, config: StudioConfig | None = None
) -> Fetch:
    """How a run from a local queue whose stores lie under ``root`` fetches ``artifact``."""
    policy = StorageOptions(local_roots=(root,))

    def fetch(label: str, folder: Path) -> int:
        if artifact is None or config is None:
            raise AssertionError(f"no fetch expected of {label}")
        return transfer.fetch(label, artifact, config, folder, 0, policy)

    return fetch


def no_pull(uri: str, target: Path, log: BinaryIO) -> None:
    raise AssertionError(f"no pull expected, got {uri}")


def test_stored_image_is_downloaded_once_and_named_by_content(tmp_path: Path) -> None:
    artifact, config = store_sif(tmp_path / "store", b"SIF-bytes")
    images = ImageStore(tmp_path / "cache", no_pull)
    ref = ImageRef("file", artifact.key or "", artifact)
    log = io.BytesIO()
    first = images.materialize(ref, config, log, local_fetch(tmp_path, artifact, config))
    assert first.digest == hashlib.sha256(b"SIF-bytes").hexdigest()
    assert first.path.read_bytes() == b"SIF-bytes"
    shutil.rmtree(tmp_path / "store")  # a second download would now fail
    again = images.materialize(ref, config, log, local_fetch(tmp_path, artifact, config))
    assert again == first
    assert b"using the cached image of blobstore/" in log.getvalue()
    assert not list((tmp_path / "cache" / "incoming").iterdir())


def test_stored_artifact_must_hold_one_image(tmp_path: Path) -> None:
    artifact, config = store_sif(tmp_path / "store", b"x")
    key = tmp_path / "store" / "artifacts" / (artifact.key or "")
    spool = io.BytesIO()
    with tarfile.open(fileobj=spool, mode="w") as tar:
        for name in ("a.txt", "b.txt"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    key.write_bytes(spool.getvalue())
    images = ImageStore(tmp_path / "cache", no_pull)
    with pytest.raises(EnvironmentFailed, match="one image file; it holds 2"):
        images.materialize(
            ImageRef("file", "k", artifact),
            config,
            io.BytesIO(),
            local_fetch(tmp_path, artifact, config),
        )


def test_host_path_digest_is_remembered(tmp_path: Path) -> None:
    image = tmp_path / "x.sif"
    image.write_bytes(b"abc")
    images = ImageStore(tmp_path / "cache", no_pull)
    found = images.materialize(
        ImageRef("file", str(image)), StudioConfig(), io.BytesIO(), local_fetch(tmp_path)
    )
    assert (found.path, found.digest) == (image, hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(EnvironmentFailed, match="cannot be used"):
        images.materialize(
            ImageRef("file", str(tmp_path / "no")),
            StudioConfig(),
            io.BytesIO(),
            local_fetch(tmp_path),
        )


def test_pull_happens_once_per_reference(tmp_path: Path) -> None:
    """The cache around a pull (the pull itself needs a registry, which is not reachable)."""
    pulls: list[str] = []

    def fake_pull(uri: str, target: Path, log: BinaryIO) -> None:
        pulls.append(uri)
        target.write_bytes(b"pulled " + uri.encode())

    images = ImageStore(tmp_path / "cache", fake_pull)
    ref = ImageRef("docker", "docker://python:3.11")
    first = images.materialize(ref, StudioConfig(), io.BytesIO(), local_fetch(tmp_path))
    second = images.materialize(ref, StudioConfig(), io.BytesIO(), local_fetch(tmp_path))
    assert first == second
    assert pulls == ["docker://python:3.11"]
    assert first.digest == hashlib.sha256(b"pulled docker://python:3.11").hexdigest()
    assert [p.suffix for p in first.path.parent.iterdir() if p.suffix == ".partial"] == []


def sized_pull(size: int) -> tuple[list[str], Callable[[str, Path, BinaryIO], None]]:
    pulls: list[str] = []

    def pull(uri: str, target: Path, log: BinaryIO) -> None:
        pulls.append(uri)
        target.write_bytes(uri.encode().ljust(size, b"\0"))

    return pulls, pull


def test_the_least_recently_used_unheld_image_is_evicted_past_the_cap(tmp_path: Path) -> None:
    pulls, pull = sized_pull(1000)
    images = ImageStore(tmp_path / "cache", pull, max_bytes=2500)  # room for two

    def run(name: str) -> LocalImage:
        ref = ImageRef("docker", f"docker://{name}")
        return images.materialize(ref, StudioConfig(), io.BytesIO(), local_fetch(tmp_path))

    old = run("old")
    old.release()
    time.sleep(0.01)  # the last-use stamps must differ
    kept = run("kept")
    kept.release()
    time.sleep(0.01)
    again = run("old")  # used again: now more recent than "kept"
    assert again.path == old.path
    again.release()
    time.sleep(0.01)
    newest = run("newest")  # three images, room for two: "kept" is the least recently used
    assert not kept.path.exists()
    assert old.path.exists()
    assert newest.path.exists()
    assert pulls == ["docker://old", "docker://kept", "docker://newest"]
    assert sum(size for _, _, size in images.cached()) <= 2500
    assert run("kept").path.exists()  # evicted, so pulled again when asked for
    assert pulls[-1] == "docker://kept"


def test_an_image_in_use_is_never_evicted(tmp_path: Path) -> None:
    _, pull = sized_pull(1000)
    images = ImageStore(tmp_path / "cache", pull, max_bytes=1500)  # room for one
    refs = [ImageRef("docker", f"docker://{n}") for n in ("a", "b", "c")]
    held = [
        images.materialize(r, StudioConfig(), io.BytesIO(), local_fetch(tmp_path)) for r in refs
    ]
    assert all(image.path.exists() for image in held)  # all three run: over the cap, all kept
    held[0].release()
    held[1].release()
    images.evict()
    assert [image.path.exists() for image in held] == [False, False, True]
    held[2].release()


@pytest.mark.apptainer
def test_failed_pull_reports_the_runtimes_exit_code(tmp_path: Path) -> None:
    """A real spython pull from a registry that is not there (port 9 on loopback)."""
    if shutil.which("singularity") is None:
        pytest.fail("singularity/apptainer is not installed: run scripts/install-apptainer.sh")
    log = io.BytesIO()
    with pytest.raises(
        EnvironmentFailed, match=r"pulling docker://127\.0\.0\.1:9/none/x:1 failed with exit code"
    ):
        spython_pull("docker://127.0.0.1:9/none/x:1", tmp_path / "x.sif", log)
    assert not (tmp_path / "x.sif").exists()


def test_env_file_escapes_the_runtimes_second_evaluation() -> None:
    text = env_file_text({"A": "a $HOME `id` \\ 'q\"", "B": ""})
    assert text == "A='a \\$HOME \\`id\\` \\\\ '\"'\"'q\"'\nB=''\n"


def test_flavor_and_capabilities(tmp_path: Path) -> None:
    assert flavor_of("apptainer version 1.4.5") == "apptainer"
    assert flavor_of("singularity-ce version 4.1.0") == "singularity-ce"
    assert flavor_of("singularity version 3.8.7") == "singularity"
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")  # bit 24 clear
    expected = __import__("os").geteuid() == 0
    assert lacks_sys_resource(status) is expected
    status.write_text("CapEff:\t000001ffffffffff\n")
    assert lacks_sys_resource(status) is False


@pytest.mark.parametrize(
    ("libc", "machine", "platform"),
    [
        (("glibc", "2.36"), "x86_64", "x86_64-manylinux_2_36"),
        (("glibc", "2.30"), "x86_64", "x86_64-manylinux_2_28"),
        (("glibc", "2.41"), "aarch64", "aarch64-manylinux_2_40"),
        (("", ""), "x86_64", "x86_64-unknown-linux-musl"),
    ],
)
def test_wheel_platform_for_an_image(libc: tuple[str, str], machine: str, platform: str) -> None:
    python = ImagePython(Path("python3"), (3, 11, 2), "d" * 64, libc, machine)
    assert python.platform == platform
    assert python.version_text == "3.11.2 in image dddddddddddddddd"
