"""S3 storage against a real S3 server (moto on loopback), with requests shaped like 0.0.49's."""

import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from agent.errors import ArtifactMissing, StorageDenied, StorageUnavailable
from agent.request import Artifact, StudioConfig
from agent.storage import resolve
from agent.storage.base import StorageOptions
from agent.storage.s3 import S3Storage
from agent.storage.transfer import fetch, upload
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.s3]

ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 2**20
FAST = StorageOptions(s3_part_size=5 * MiB, s3_retries=1)


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket(f"artifacts-{uuid.uuid4().hex[:12]}")


def studio_config(server: S3Server, bucket: str) -> StudioConfig:
    """``config`` as the 0.0.49 client sends it with an S3 database and storage."""
    creds = {"aws": {"access_key": server.access_key, "secret_access_key": server.secret_key}}
    store = {"type": "s3", "endpoint": server.endpoint, "bucket": bucket, "credentials": creds}
    return StudioConfig.model_validate(
        {
            "database": {**store, "bucket": "studioml-meta", "authentication": "none"},
            "storage": store,
            "env": {"AWS_DEFAULT_REGION": server.region, "PATH": "%PATH%:./bin"},
            "saveWorkspaceFrequency": "3m",
            "experimentLifetime": "30m",
        }
    )


def s3_artifact(
    server: S3Server, bucket: str, key: str, *, mutable: bool = True, secret: str | None = None
) -> Artifact:
    """One ``experiment.artifacts`` entry as the 0.0.49 client writes it."""
    host = server.endpoint.removeprefix("http://")
    creds = {
        "access_key": server.access_key,
        "secret_access_key": secret or server.secret_key,
        "region": server.region,
    }
    return Artifact(
        key=key,
        qualified=f"s3://{host}/{bucket}/{key}",
        bucket=bucket,
        local=f"/home/user/.studioml/experiments/x/{key}",
        mutable=mutable,
        unpack=True,
        credentials={"aws": creds},
    )


def store_of(art: Artifact, cfg: StudioConfig, options: StorageOptions = FAST) -> S3Storage:
    store, _ = resolve("output", art, cfg, options)
    assert isinstance(store, S3Storage)
    return store


def write_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "output").write_text("line 1\nline 2\n")
    (root / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    (root / "sub" / "link").symlink_to("weights.bin")


def assert_same_tree(a: Path, b: Path) -> None:
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(
        p.relative_to(b) for p in b.rglob("*")
    )
    assert (a / "sub" / "weights.bin").read_bytes() == (b / "sub" / "weights.bin").read_bytes()
    assert os.readlink(b / "sub" / "link") == "weights.bin"


def no_trace_of(server: S3Server, bucket: str, key: str) -> None:
    client = server.client()
    assert client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_round_trip_through_transfer(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    cfg = studio_config(s3_server, bucket)
    art = s3_artifact(s3_server, bucket, "experiments/k1/modeldir.tar")
    write_tree(tmp_path / "src")
    stored = upload("modeldir", art, cfg, tmp_path / "src", FAST)
    head = s3_server.client().head_object(Bucket=bucket, Key="experiments/k1/modeldir.tar")
    assert head["ContentLength"] == stored
    assert fetch("modeldir", art, cfg, tmp_path / "dest", 0, FAST) == 14 + 3000
    assert_same_tree(tmp_path / "src", tmp_path / "dest")


def test_multipart_round_trip_and_overwrite(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    cfg = studio_config(s3_server, bucket)
    art = s3_artifact(s3_server, bucket, "experiments/k2/modeldir.tar")
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(12 * MiB)
    (src / "model.bin").write_bytes(payload)
    stored = upload("modeldir", art, cfg, src, FAST)
    head = s3_server.client().head_object(Bucket=bucket, Key=art.key or "")
    assert head["ContentLength"] == stored > 12 * MiB
    assert head["ETag"].endswith('-3"')  # three 5 MiB parts: a real multipart object
    assert fetch("modeldir", art, cfg, tmp_path / "d1", 0, FAST) == 12 * MiB
    assert (tmp_path / "d1" / "model.bin").read_bytes() == payload
    (src / "model.bin").write_bytes(b"small now")  # a checkpoint replaces the whole object
    upload("modeldir", art, cfg, src, FAST)
    fetch("modeldir", art, cfg, tmp_path / "d2", 0, FAST)
    assert (tmp_path / "d2" / "model.bin").read_bytes() == b"small now"


def test_retval_travels_as_one_dot_slash_member(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    art = s3_artifact(s3_server, bucket, "experiments/k3/retval.tar")
    (tmp_path / "retval").mkdir()
    (tmp_path / "retval" / "retval").write_bytes(b"\x80\x04result")
    upload("retval", art, studio_config(s3_server, bucket), tmp_path / "retval", FAST)
    s3_server.client().download_file(bucket, "experiments/k3/retval.tar", str(tmp_path / "r.tar"))
    with tarfile.open(tmp_path / "r.tar") as tar:
        assert tar.getnames() == ["./retval"]


def test_missing_mutable_artifact_is_empty(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    art = s3_artifact(s3_server, bucket, "experiments/k4/output.tar")
    assert fetch("output", art, studio_config(s3_server, bucket), tmp_path / "out", 0, FAST) == 0
    assert list((tmp_path / "out").iterdir()) == []
    assert not store_of(art, studio_config(s3_server, bucket)).exists(art.key or "")


def test_missing_immutable_artifact_names_key_bucket_and_endpoint(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    art = s3_artifact(s3_server, bucket, "blobstore/0655cc.tar", mutable=False)
    with pytest.raises(ArtifactMissing) as caught:
        fetch("workspace", art, studio_config(s3_server, bucket), tmp_path / "ws", 0, FAST)
    message = str(caught.value)
    assert "'blobstore/0655cc.tar'" in message
    assert f"bucket {bucket!r}" in message
    assert s3_server.endpoint in message


def test_missing_bucket_is_permanent(s3_server: S3Server, tmp_path: Path) -> None:
    art = s3_artifact(s3_server, "no-such-bucket-here", "blobstore/x.tar", mutable=False)
    cfg = studio_config(s3_server, "no-such-bucket-here")
    with pytest.raises(StorageDenied, match="NoSuchBucket"):
        fetch("workspace", art, cfg, tmp_path / "ws", 0, FAST)


def assert_secret_hidden(error: BaseException, *secrets: str) -> None:
    shown = "".join(traceback.format_exception(error))
    for secret in secrets:
        assert secret not in shown


def test_wrong_secret_is_a_clear_permanent_error_without_the_secret(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    wrong = "wrong-secret-" + uuid.uuid4().hex
    art = s3_artifact(s3_server, bucket, "blobstore/y.tar", mutable=False, secret=wrong)
    cfg = studio_config(s3_server, bucket)
    with pytest.raises(StorageDenied, match="SignatureDoesNotMatch") as caught:
        fetch("workspace", art, cfg, tmp_path / "ws", 0, FAST)
    assert "check the credentials" in str(caught.value)
    assert_secret_hidden(caught.value, wrong, s3_server.secret_key)
    (tmp_path / "src").mkdir()
    with pytest.raises(StorageDenied) as caught:
        upload("output", s3_artifact(s3_server, bucket, "o.tar", secret=wrong), cfg, tmp_path)
    assert_secret_hidden(caught.value, wrong, s3_server.secret_key)


def test_unknown_key_and_missing_permission_are_refused(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    cfg = studio_config(s3_server, bucket)
    art = s3_artifact(s3_server, bucket, "blobstore/z.tar", mutable=False)
    unknown = art.model_copy(
        update={"credentials": {"aws": {"access_key": "AKIANOBODY", "secret_access_key": "x"}}}
    )
    with pytest.raises(StorageDenied, match="InvalidAccessKeyId"):
        fetch("workspace", unknown, cfg, tmp_path / "a", 0, FAST)
    access, secret = s3_server.make_user(f"reader-{uuid.uuid4().hex[:8]}", ["s3:ListBucket"])
    denied = art.model_copy(
        update={"credentials": {"aws": {"access_key": access, "secret_access_key": secret}}}
    )
    with pytest.raises(StorageDenied, match="AccessDenied") as caught:
        fetch("workspace", denied, cfg, tmp_path / "b", 0, FAST)
    assert_secret_hidden(caught.value, secret)


def failing_producer(size: int) -> Callable[[BinaryIO], None]:
    def produce(out: BinaryIO) -> None:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            out.write(block)
        raise OSError("disk went away while packing")

    return produce


@pytest.mark.parametrize("written", [2 * MiB, 12 * MiB], ids=["before-first-part", "mid-upload"])
def test_failed_producer_leaves_no_object_and_no_upload(
    s3_server: S3Server,
    bucket: str,
    written: int,
) -> None:
    key = f"experiments/k5/output-{written}.tar"
    store = store_of(s3_artifact(s3_server, bucket, key), studio_config(s3_server, bucket))
    with pytest.raises(OSError, match="disk went away"):
        store.write(key, failing_producer(written))
    no_trace_of(s3_server, bucket, key)
    assert not [t for t in threading.enumerate() if t.name.startswith(("s3-producer", "s3-part"))]


def test_refused_upload_stops_the_producer(s3_server: S3Server) -> None:
    key = "experiments/k6/output.tar"
    art = s3_artifact(s3_server, "no-such-bucket-here", key)
    store = store_of(art, studio_config(s3_server, "no-such-bucket-here"))
    endless_writes: list[int] = []

    def endless(out: BinaryIO) -> None:
        while True:  # only a closed pipe stops it
            endless_writes.append(out.write(bytes(MiB)))

    with pytest.raises(StorageDenied, match="NoSuchBucket"):
        store.write(key, endless)
    assert not [t for t in threading.enumerate() if t.name.startswith("s3-producer")]


def test_open_read_streams_without_seeking(
    s3_server: S3Server,
    bucket: str,
) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="raw.bin", Body=b"abc" * 1000)
    store = store_of(s3_artifact(s3_server, bucket, "raw.bin"), studio_config(s3_server, bucket))
    with store.open_read("raw.bin") as stream:
        assert not stream.seekable()
        assert stream.read(3) == b"abc"
        assert len(stream.read()) == 2997


def test_outage_gives_storage_unavailable_then_recovers(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    cfg = studio_config(s3_server, bucket)
    art = s3_artifact(s3_server, bucket, "experiments/k7/output.tar")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "output").write_text("done\n")
    upload("output", art, cfg, tmp_path / "src", FAST)  # a client is cached before the outage
    s3_server.stop()
    try:
        with pytest.raises(StorageUnavailable, match="unreachable") as caught:
            upload("output", art, cfg, tmp_path / "src", FAST)
        assert type(caught.value.__cause__).__name__ == "EndpointConnectionError"
        assert s3_server.endpoint in str(caught.value)
        with pytest.raises(StorageUnavailable):
            fetch("output", art, cfg, tmp_path / "dest", 0, FAST)
    finally:
        s3_server.start()
    s3_server.make_bucket(bucket)  # moto lost everything with the restart
    assert upload("output", art, cfg, tmp_path / "src", FAST) > 0
    assert fetch("output", art, cfg, tmp_path / "dest", 0, FAST) == 5


BIG_TRANSFER = r"""
import json, re, sys, time
from pathlib import Path
from agent.request import Artifact, StudioConfig
from agent.storage.transfer import fetch, upload

def peak_mib():
    # VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork and exec.
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024

art, cfg = Artifact.model_validate_json(sys.argv[1]), StudioConfig.model_validate_json(sys.argv[2])
src, dest = Path(sys.argv[3]), Path(sys.argv[4])
started = time.monotonic()
stored = upload("modeldir", art, cfg, src)
uploaded, upload_peak = time.monotonic(), peak_mib()
fetched = fetch("modeldir", art, cfg, dest, 0)
print(json.dumps({"stored": stored, "fetched": fetched, "up_s": uploaded - started,
                  "down_s": time.monotonic() - uploaded, "upload_peak_mib": upload_peak,
                  "peak_mib": peak_mib()}))
"""


@pytest.mark.slow
def test_one_gib_round_trip_in_bounded_memory(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
) -> None:
    import json

    size = 2**30
    src = tmp_path / "src"
    src.mkdir()
    with (src / "model.bin").open("wb") as f:
        f.truncate(size)  # sparse: quick to make, still 1 GiB through tar, network and disk
    art = s3_artifact(s3_server, bucket, "experiments/big/modeldir.tar")
    cfg = studio_config(s3_server, bucket)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BIG_TRANSFER), art.model_dump_json(),
         cfg.model_dump_json(), str(src), str(tmp_path / "dest")],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    print(f"\n1 GiB round trip: {result}")
    assert result["fetched"] == size
    assert (tmp_path / "dest" / "model.bin").stat().st_size == size
    assert result["peak_mib"] < 300, f"peak RSS {result['peak_mib']:.0f} MiB"
