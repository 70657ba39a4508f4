"""Streaming tar in and out: layout, compression, safety refusals, fingerprints."""

import hashlib
import io
import os
import socket
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import UnsafeArchive
from agent.storage import archive
from agent.storage.archive import (
    compression_for_key,
    extract,
    has_content,
    is_tar_key,
    pack_directory,
    tree_fingerprint,
)

Member = tuple[tarfile.TarInfo, bytes | None]


# ---------------------------------------------------------------------------- helpers


def reg(name: str, data: bytes = b"data", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


def make_tar(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def pack_bytes(src: Path, compression: str = "", lone: str | None = None) -> tuple[bytes, int]:
    out = io.BytesIO()
    written = pack_directory(src, out, compression=compression, single_member_name=lone)
    return out.getvalue(), written


def members_of(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return tar.getmembers()


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under root except `skip`: type, size, content hash (or link target)."""
    seen: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                detail = ""
            links = 0 if stat.S_ISDIR(st.st_mode) else st.st_nlink  # a dir's count tracks subdirs
            seen[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), links, detail)
    return seen


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c.txt").write_bytes(b"deep file\n")
    (src / "a" / "z.txt").write_bytes(b"zz")
    (src / "B.txt").write_bytes(b"upper")
    (src / "output").write_bytes(b"log line\n")
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "empty").mkdir()
    (src / "link").symlink_to("a/b/c.txt")
    (src / "dirlink").symlink_to("a")
    return src


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_bytes(b"precious")
    (tmp_path / "box").mkdir()
    return tmp_path / "box" / "dest"


# ---------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("experiments/k/output.tar", ""),
        ("blobstore/abc.tar.gz", "gz"),
        ("x.TGZ", "gz"),
        ("x.gz", "gz"),
        ("x.tar.gzip", "gz"),
        ("x.tar.bz2", "bz2"),
        ("x.bzip2", "bz2"),
        ("x.tbz", "bz2"),
        ("x.tbz2", "bz2"),
        ("x.tb2", "bz2"),
        ("x.tar.xz", "xz"),
        ("x.zip", ""),
    ],
)
def test_compression_for_key(key: str, expected: str) -> None:
    assert compression_for_key(key) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("experiments/k/modeldir.tar", True),
        ("blobstore/abc.TAR.GZ", True),
        ("a.tar.zst", True),
        ("a.tgz", True),
        ("a.tbz", True),
        ("a.tbz2", True),
        ("a.tb2", True),
        ("a.gz", False),
        ("a.zip", False),
        ("a.tar/inner.txt", False),
        ("tarball", False),
    ],
)
def test_is_tar_key(key: str, expected: bool) -> None:
    assert is_tar_key(key) is expected


# ---------------------------------------------------------------------------- packing


def test_round_trip_keeps_tree(tree: Path, dest: Path) -> None:
    data, written = pack_bytes(tree)
    assert extract(io.BytesIO(data), dest) == written == 10 + 2 + 5 + 9 + 18
    assert (dest / "a" / "b" / "c.txt").read_bytes() == b"deep file\n"
    assert (dest / "output").read_bytes() == b"log line\n"
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
    assert os.readlink(dest / "link") == "a/b/c.txt"
    assert (dest / "link").read_bytes() == b"deep file\n"
    assert os.readlink(dest / "dirlink") == "a"
    assert (dest / "empty").is_dir()
    assert list((dest / "empty").iterdir()) == []
    src_mtime = int((tree / "a" / "z.txt").stat().st_mtime)
    assert int((dest / "a" / "z.txt").stat().st_mtime) == src_mtime


def test_member_order_output_first_and_no_dot_prefix(tree: Path) -> None:
    data, _ = pack_bytes(tree)
    names = [m.name for m in members_of(data)]
    assert names == [
        "output",
        "B.txt",
        "a",
        "a/b",
        "a/b/c.txt",
        "a/z.txt",
        "dirlink",
        "empty",
        "link",
        "run.sh",
    ]
    kinds = {m.name: m.type for m in members_of(data)}
    assert kinds["a"] == tarfile.DIRTYPE
    assert kinds["link"] == tarfile.SYMTYPE
    assert kinds["run.sh"] == tarfile.REGTYPE


def test_pack_is_deterministic_in_content(tree: Path) -> None:
    assert pack_bytes(tree)[0] == pack_bytes(tree)[0]


def test_hard_linked_files_are_stored_as_regular_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"same inode")
    os.link(src / "x", src / "y")
    data, written = pack_bytes(src)
    assert [(m.name, m.type, m.size) for m in members_of(data)] == [
        ("x", tarfile.REGTYPE, 10),
        ("y", tarfile.REGTYPE, 10),
    ]
    assert written == 20


def test_special_files_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"f")
    os.mkfifo(src / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        data, _ = pack_bytes(src)
    assert [m.name for m in members_of(data)] == ["file"]


def test_single_member_name_writes_one_dot_member(tmp_path: Path) -> None:
    src = tmp_path / "retval"
    src.mkdir()
    payload = bytes(range(256)) * 3
    (src / "retval").write_bytes(payload)
    data, written = pack_bytes(src, lone="retval")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["./retval"]
        reader = tar.extractfile(members[0])
        assert reader is not None
        assert reader.read() == payload
    assert written == len(payload)


def test_single_member_name_uses_given_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "value.pkl").write_bytes(b"pickle")
    data, _ = pack_bytes(src, lone="retval")
    assert [m.name for m in members_of(data)] == ["./retval"]


def test_single_member_name_falls_back_with_two_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "retval").write_bytes(b"one")
    (src / "extra").write_bytes(b"two")
    data, written = pack_bytes(src, lone="retval")
    assert [m.name for m in members_of(data)] == ["extra", "retval"]
    assert written == 6


def test_single_member_name_falls_back_for_a_lone_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"x")
    data, _ = pack_bytes(src, lone="retval")
    assert [m.name for m in members_of(data)] == ["sub", "sub/f"]


def test_single_member_name_must_be_a_plain_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        pack_directory(tmp_path, io.BytesIO(), single_member_name="a/b")


@pytest.mark.parametrize(
    ("compression", "magic"),
    [("", b""), ("gz", b"\x1f\x8b"), ("bz2", b"BZh"), ("xz", b"\xfd7zXZ\x00")],
)
def test_compressed_round_trip(tree: Path, dest: Path, compression: str, magic: bytes) -> None:
    data, written = pack_bytes(tree, compression=compression)
    assert data.startswith(magic)
    assert extract(io.BytesIO(data), dest) == written
    assert (dest / "a" / "b" / "c.txt").read_bytes() == b"deep file\n"


def test_unknown_compression_is_rejected(tree: Path) -> None:
    with pytest.raises(ValueError, match="unknown compression"):
        pack_directory(tree, io.BytesIO(), compression="zip")


def test_pack_and_extract_through_pipes(tree: Path, dest: Path) -> None:
    read_fd, write_fd = os.pipe()
    result: list[int] = []

    def produce() -> None:
        with open(write_fd, "wb") as out:
            result.append(pack_directory(tree, out, compression="gz"))

    producer = threading.Thread(target=produce)
    producer.start()
    with open(read_fd, "rb") as stream:
        assert not stream.seekable()
        extracted = extract(stream, dest)
    producer.join(timeout=30)
    assert result == [extracted]
    assert os.readlink(dest / "link") == "a/b/c.txt"


class _NoSeek(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")

    def readinto(self, buffer: "memoryview | bytearray") -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("compression", ["", "xz"])
def test_extract_from_unseekable_wrapper(tree: Path, dest: Path, compression: str) -> None:
    data, written = pack_bytes(tree, compression=compression)
    assert extract(_NoSeek(data), dest) == written  # type: ignore[arg-type]
    assert (dest / "output").read_bytes() == b"log line\n"


def test_exact_reader_cuts_a_file_that_grew(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"0123456789")
    with path.open("rb") as src:
        reader = archive._ExactReader(src, 10)
        with path.open("ab") as more:
            more.write(b"appended later")
        assert reader.read(4) + reader.read(100) + reader.read(100) == b"0123456789"


def test_exact_reader_pads_a_file_that_shrank(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"0123456789")
    with path.open("rb") as src:
        reader = archive._ExactReader(src, 10)
        os.truncate(path, 4)
        assert reader.read() == b"0123" + bytes(6)


def test_file_growing_during_pack_gives_a_valid_archive(tmp_path: Path, dest: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    log = src / "output"
    log.write_bytes(b"x" * (4 << 20))
    stop = threading.Event()

    def grow() -> None:
        with log.open("ab") as out:
            while not stop.is_set():
                out.write(b"y" * 4096)
                out.flush()

    writer = threading.Thread(target=grow)
    writer.start()
    try:
        data, written = pack_bytes(src)
    finally:
        stop.set()
        writer.join()
    assert extract(io.BytesIO(data), dest) == written >= 4 << 20
    assert (dest / "output").stat().st_size == written


def test_vanished_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "gone").write_bytes(b"soon gone")
    buf = io.BytesIO()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with tarfile.open(fileobj=buf, mode="w|") as tar:
            (tmp_path / "gone").unlink()
            assert archive._add_file(tar, fd, "gone", "gone") is None
            os.mkfifo(tmp_path / "now-a-fifo")
            assert archive._add_file(tar, fd, "now-a-fifo", "now-a-fifo") is None
    finally:
        os.close(fd)
    assert members_of(buf.getvalue()) == []


# ---------------------------------------------------------------------------- extraction


def test_dot_prefixed_and_root_members_extract_plainly(dest: Path) -> None:
    root = tarfile.TarInfo("./")
    root.type = tarfile.DIRTYPE
    data = make_tar((root, None), reg("./x", b"ex"), reg("./sub/./y", b"why"))
    assert extract(io.BytesIO(data), dest) == 5
    assert (dest / "x").read_bytes() == b"ex"
    assert (dest / "sub" / "y").read_bytes() == b"why"


def test_hard_link_inside_is_allowed(dest: Path) -> None:
    data = make_tar(reg("a", b"shared"), link("b", "a", tarfile.LNKTYPE))
    extract(io.BytesIO(data), dest)
    assert (dest / "b").read_bytes() == b"shared"
    assert (dest / "a").stat().st_ino == (dest / "b").stat().st_ino


def test_modes_drop_setuid_and_owner_is_not_changed(dest: Path) -> None:
    info, data = reg("tool", b"#!/bin/sh\n", mode=0o4777)
    info.uid = info.gid = 4242
    extract(io.BytesIO(make_tar((info, data))), dest)
    st = (dest / "tool").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_later_member_replaces_earlier_symlink_without_following_it(dest: Path) -> None:
    data = make_tar(reg("real", b"original"), link("l", "real"), reg("l", b"new"))
    extract(io.BytesIO(data), dest)
    assert not (dest / "l").is_symlink()
    assert (dest / "l").read_bytes() == b"new"
    assert (dest / "real").read_bytes() == b"original"


def test_empty_stream_is_an_empty_archive(dest: Path) -> None:
    assert extract(io.BytesIO(b""), dest) == 0
    assert dest.is_dir()


def test_garbage_is_refused(dest: Path) -> None:
    with pytest.raises(UnsafeArchive, match="not a readable tar"):
        extract(io.BytesIO(b"\x1f\x8b" + b"not really gzip" * 50), dest)


def _refusals() -> Iterator[object]:
    yield pytest.param([reg("/ABS/abs.txt")], "/ABS/abs.txt", id="absolute")
    yield pytest.param([reg("../x")], "../x", id="dotdot")
    yield pytest.param([reg("a/../../x")], "a/../../x", id="nested-dotdot")
    yield pytest.param([link("passwd", "/etc/passwd")], "passwd", id="symlink-absolute")
    yield pytest.param([link("up", "../../outside")], "up", id="symlink-relative-out")
    yield pytest.param([link("l", ".."), reg("l/escape")], "'l'", id="symlink-dir-then-write")
    yield pytest.param(
        [link("a", "b/../escape"), link("b", "."), reg("a/x")], "a/x", id="repointed-symlink"
    )
    yield pytest.param(
        [link("hl", "../../outside/keep.txt", tarfile.LNKTYPE)], "hl", id="hardlink-out"
    )
    yield pytest.param(
        [link("hl", "later", tarfile.LNKTYPE), reg("later")], "hl", id="hardlink-not-yet"
    )
    yield pytest.param([special("tty", tarfile.CHRTYPE)], "tty", id="char-device")
    yield pytest.param([special("disk", tarfile.BLKTYPE)], "disk", id="block-device")
    yield pytest.param([special("pipe", tarfile.FIFOTYPE)], "pipe", id="fifo")


@pytest.mark.parametrize(("members", "named"), list(_refusals()))
def test_refusals_write_nothing_outside(
    tmp_path: Path, dest: Path, members: list[Member], named: str
) -> None:
    for info, _ in members:
        info.name = info.name.replace("/ABS/", f"{tmp_path}/")
    # A member after the bad one shows the refusal came when the bad one was read.
    data = make_tar(*members, reg("after"))
    named = named.replace("/ABS/", f"{tmp_path}/")
    before = snapshot(tmp_path, dest)
    with pytest.raises(UnsafeArchive, match="refusing tar member") as caught:
        extract(io.BytesIO(data), dest)
    assert named in str(caught.value)
    assert "data filter" not in str(caught.value)  # our own check came first
    assert not (dest / "after").exists()
    assert snapshot(tmp_path, dest) == before
    assert not (dest / "l" / "escape").exists()


def test_symlink_repointed_by_a_later_member_is_caught_at_the_end(dest: Path) -> None:
    data = make_tar(link("a", "b/../escape"), link("b", "."))
    with pytest.raises(UnsafeArchive, match="after extraction"):
        extract(io.BytesIO(data), dest)
    assert not (dest / "a").is_symlink()


def test_symlink_hidden_behind_a_replaced_path_is_still_rechecked(dest: Path) -> None:
    sub = tarfile.TarInfo("sub")
    sub.type = tarfile.DIRTYPE
    data = make_tar(
        (sub, None),
        link("x", "sub"),
        link("x/l", "../y/../z"),  # inside while "y" does not exist
        link("y", "."),  # now sub/l points at dest/../z
        link("x", "other"),  # and "x/l" no longer names it
    )
    with pytest.raises(UnsafeArchive, match=r"'x/l'.*after extraction"):
        extract(io.BytesIO(data), dest)
    assert not (dest / "sub" / "l").is_symlink()


def test_existing_symlink_in_dest_is_not_written_through(tmp_path: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "evil").symlink_to(tmp_path / "outside")
    before = snapshot(tmp_path, dest)
    with pytest.raises(UnsafeArchive, match=r"evil/keep\.txt"):
        extract(io.BytesIO(make_tar(reg("evil/keep.txt", b"overwritten"))), dest)
    assert snapshot(tmp_path, dest) == before


def test_max_bytes_is_enforced_before_writing(tmp_path: Path, dest: Path) -> None:
    data = make_tar(reg("first", b"a" * 60), reg("second", b"b" * 60))
    before = snapshot(tmp_path, dest)
    with pytest.raises(UnsafeArchive, match=r"'second'.*100 bytes"):
        extract(io.BytesIO(data), dest, max_bytes=100)
    assert (dest / "first").read_bytes() == b"a" * 60
    assert not (dest / "second").exists()
    assert snapshot(tmp_path, dest) == before


def test_max_bytes_allows_exact_fit(dest: Path) -> None:
    data = make_tar(reg("first", b"a" * 60), reg("second", b"b" * 40))
    assert extract(io.BytesIO(data), dest, max_bytes=100) == 100


# ---------------------------------------------------------------------------- inspection


def test_fingerprint_stable_and_sensitive(tree: Path) -> None:
    first = tree_fingerprint(tree)
    assert tree_fingerprint(tree) == first
    (tree / "a" / "z.txt").write_bytes(b"changed content")
    changed = tree_fingerprint(tree)
    assert changed != first
    os.utime(tree / "a" / "z.txt", ns=(1, 1))
    assert tree_fingerprint(tree) != changed


def test_fingerprint_sees_new_and_relinked_entries(tree: Path) -> None:
    first = tree_fingerprint(tree)
    (tree / "empty" / "new").write_bytes(b"")
    second = tree_fingerprint(tree)
    assert second != first
    mtime = (tree / "link").lstat().st_mtime_ns
    (tree / "link").unlink()
    (tree / "link").symlink_to("a/b/x.txt")  # same length, different target
    os.utime(tree / "link", ns=(mtime, mtime), follow_symlinks=False)
    assert tree_fingerprint(tree) != second


def test_fingerprint_of_missing_or_empty_is_fixed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert tree_fingerprint(tmp_path / "missing") == tree_fingerprint(tmp_path / "empty")
    (tmp_path / "empty" / "f").write_bytes(b"")
    assert tree_fingerprint(tmp_path / "missing") != tree_fingerprint(tmp_path / "empty")


def test_has_content(tmp_path: Path) -> None:
    assert not has_content(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    assert not has_content(tmp_path / "d")
    (tmp_path / "d" / "f").write_bytes(b"")
    assert has_content(tmp_path / "d")
    assert not has_content(tmp_path / "d" / "f")
