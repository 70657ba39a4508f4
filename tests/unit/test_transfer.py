"""Artifacts between local storage and experiment folders, as the studioml client lays them out."""

import io
import tarfile
from pathlib import Path

import pytest

from agent.errors import ArtifactMissing, BadRequest, UnsafeArchive
from agent.request import Artifact, StudioConfig
from agent.storage import resolve
from agent.storage.base import StorageOptions
from agent.storage.local import LocalStorage
from agent.storage.transfer import fetch, upload


def policy(root: Path) -> StorageOptions:
    """A local queue's policy, with its local stores under ``root``."""
    return StorageOptions(local_roots=(root,))


def config(store: Path) -> StudioConfig:
    return StudioConfig.model_validate(
        {"storage": {"type": "local", "endpoint": str(store), "bucket": "artifacts"}}
    )


def test_resolve_ignores_the_clients_broken_file_url(tmp_path: Path) -> None:
    art = Artifact(key="experiments/k/output.tar", qualified="file://tmp/elsewhere/output.tar")
    store, key = resolve("output", art, config(tmp_path), policy(tmp_path))
    assert isinstance(store, LocalStorage)
    assert store.describe(key) == str(tmp_path / "artifacts" / "experiments/k/output.tar")


def test_resolve_accepts_a_well_formed_file_url_without_storage_config(tmp_path: Path) -> None:
    target = tmp_path / "obj.tar"
    art = Artifact(key="x", qualified=f"file://{target}")
    store, key = resolve("workspace", art, StudioConfig(), policy(tmp_path))
    assert store.describe(key) == str(target)


def test_unknown_storage_is_a_clear_rejection(tmp_path: Path) -> None:
    cfg = StudioConfig.model_validate({"storage": {"type": "gcs", "bucket": "b"}})
    with pytest.raises(BadRequest, match="storage type 'gcs'"):
        resolve("workspace", Artifact(key="k"), cfg)
    with pytest.raises(BadRequest, match="storage scheme 'gs' is not supported"):
        resolve("workspace", Artifact(key="k", qualified="gs://b/k"), cfg)


def test_upload_then_fetch_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("alpha")
    art = Artifact(key="experiments/k/modeldir.tar", mutable=True)
    assert upload("modeldir", art, config(tmp_path / "store"), src, policy(tmp_path)) > 0
    dest = tmp_path / "dest"
    assert fetch("modeldir", art, config(tmp_path / "store"), dest, 0, policy(tmp_path)) == 5
    assert (dest / "sub" / "a.txt").read_text() == "alpha"


def test_retval_is_one_dot_slash_member(tmp_path: Path) -> None:
    src = tmp_path / "retval"
    src.mkdir()
    (src / "retval").write_bytes(b"\x80\x04result")
    art = Artifact(key="experiments/k/retval.tar", mutable=True)
    upload("retval", art, config(tmp_path / "store"), src, policy(tmp_path))
    with tarfile.open(tmp_path / "store" / "artifacts" / "experiments/k/retval.tar") as tar:
        assert tar.getnames() == ["./retval"]


def test_missing_mutable_is_empty_but_missing_input_is_an_error(tmp_path: Path) -> None:
    cfg = config(tmp_path / "store")
    tb = Artifact(key="experiments/k/tb.tar", mutable=True)
    assert fetch("tb", tb, cfg, tmp_path / "tb", 0, policy(tmp_path)) == 0
    ws = Artifact(key="blobstore/none.tar")
    with pytest.raises(ArtifactMissing, match=r"blobstore/none\.tar"):
        fetch("workspace", ws, cfg, tmp_path / "ws", 0, policy(tmp_path))


def test_unpack_false_keeps_the_object_under_its_basename(tmp_path: Path) -> None:
    store = tmp_path / "store" / "artifacts" / "data"
    store.mkdir(parents=True)
    (store / "weights.bin").write_bytes(b"raw")
    art = Artifact(key="data/weights.bin", unpack=False)
    assert (
        fetch("data", art, config(tmp_path / "store"), tmp_path / "data", 0, policy(tmp_path)) == 3
    )
    assert (tmp_path / "data" / "weights.bin").read_bytes() == b"raw"


def test_unpack_of_a_non_tar_key_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store" / "artifacts"
    store.mkdir(parents=True)
    (store / "notes.txt").write_text("x")
    notes = Artifact(key="notes.txt")
    with pytest.raises(BadRequest, match="not a tar"):
        fetch("notes", notes, config(tmp_path / "store"), tmp_path / "n", 0, policy(tmp_path))


def test_hdd_budget_caps_extraction(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = 4096
        tar.addfile(info, io.BytesIO(b"\0" * 4096))
    store = tmp_path / "store" / "artifacts" / "blobstore"
    store.mkdir(parents=True)
    (store / "big.tar").write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeArchive, match=r"big\.bin"):
        fetch(
            "workspace",
            Artifact(key="blobstore/big.tar"),
            config(tmp_path / "store"),
            tmp_path / "ws",
            1000,
            policy(tmp_path),
        )


def test_a_failed_write_leaves_no_partial_object(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)

    def broken(out: object) -> None:
        out.write(b"half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write("experiments/k/output.tar", broken)
    assert not store.exists("experiments/k/output.tar")
    assert list((tmp_path / "experiments" / "k").iterdir()) == []


def test_keys_cannot_leave_the_store(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="leaves the storage root"):
        LocalStorage(tmp_path).path("../../etc/passwd")
