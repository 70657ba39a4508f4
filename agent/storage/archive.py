"""Streaming tar in and out for StudioML artifacts (protocol §F.3, §F.6, §H, §J.12, §J.24).

Packing walks the tree through directory file descriptors and opens every file with O_NOFOLLOW,
because checkpoints run while the experiment is still writing: an entry swapped for a symlink
between listing and reading is skipped instead of being followed out of the artifact.
Extraction checks every member itself (so refusals carry our messages), then runs
tarfile.data_filter as a second line of defence, and writes files with O_EXCL | O_NOFOLLOW.
"""

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import os
import re
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from agent.errors import UnsafeArchive

_GZ = (".tar.gz", ".tgz", ".gz", ".gzip")
_BZ2 = (".bz2", ".bzip2", ".tbz", ".tbz2", ".tb2")
_TAR_SUFFIXES = (".tar", ".tgz", ".tbz", ".tbz2", ".tb2")
_TAR_DOT_ANY = re.compile(r"\.tar\.[a-z0-9]+$")
_CHUNK = 1 << 20
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a file swapped for a FIFO after listing must not hang the pack on open().
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors meaning "the entry vanished or changed type since it was listed": skip it.
_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL}


def compression_for_key(key: str) -> str:
    """The compression to write for a key: "", "gz", "bz2" or "xz".

    Unlike Go, ".tgz" means gzip; reading autodetects, so the two never disagree on input.
    """
    name = key.lower()
    if name.endswith(_GZ):
        return "gz"
    if name.endswith(_BZ2):
        return "bz2"
    return "xz" if name.endswith(".xz") else ""


def is_tar_key(key: str) -> bool:
    """True for .tar, .tar.<anything>, .tgz, .tbz, .tbz2 and .tb2 keys (any case)."""
    name = key.rsplit("/", 1)[-1].lower()
    return name.endswith(_TAR_SUFFIXES) or _TAR_DOT_ANY.search(name) is not None


@dataclass(frozen=True)
class _Entry:
    rel: str  # path relative to the root, "/"-separated, no "./"
    name: str  # last component, to use with dir_fd
    dir_fd: int  # the parent directory; valid only until the walk advances
    st: os.stat_result


def _walk(root_fd: int, prefix: str = "") -> Iterator[_Entry]:
    """Entries under root_fd, parents before children; "output" first at the top (§J.13)."""
    with os.scandir(root_fd) as it:
        names = [entry.name for entry in it]
    names.sort(key=None if prefix else lambda n: (n != "output", n))
    for name in names:
        try:
            st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        yield _Entry(prefix + name, name, root_fd, st)
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_child(root_fd, name, prefix + name + "/")


def _walk_child(parent_fd: int, name: str, prefix: str) -> Iterator[_Entry]:
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in _GONE:
            return
        raise
    try:
        yield from _walk(fd, prefix)
    finally:
        os.close(fd)


class _ExactReader:
    """Exactly `size` bytes of `src`, whatever happens to the file meanwhile.

    The tar header (with the size) is written before the data, so a file that grows is cut
    at that size and one that shrank is padded with zeros; either way the archive stays valid.
    """

    def __init__(self, src: BinaryIO, size: int) -> None:
        self._src = src
        self._left = size

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._src.read(want)  # a buffered file returns short only at EOF
        self._left -= want
        return data if len(data) == want else data + bytes(want - len(data))


_Sink = BinaryIO | gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile
_COMPRESSORS: dict[str, Callable[[BinaryIO], _Sink]] = {
    "gz": lambda out: gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0),
    "bz2": lambda out: bz2.BZ2File(out, "wb"),
    "xz": lambda out: lzma.LZMAFile(out, "wb"),  # noqa: SIM115 - closed by _compressor's stack
}


def _compressor(out: BinaryIO, compression: str, stack: ExitStack) -> _Sink:
    """Wrap `out`; tarfile's own "w|gz" is fixed at level 9, which is slow on model dirs."""
    if compression == "":
        return out
    if compression not in _COMPRESSORS:
        raise ValueError(f"unknown compression {compression!r} (expected '', 'gz', 'bz2', 'xz')")
    sink = _COMPRESSORS[compression](out)
    # Closing the wrapper writes its trailer; it never closes `out`, which it did not open.
    stack.callback(sink.close)
    return sink


def _header(name: str, kind: bytes, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    # Owners mean nothing on another machine, and extraction never chowns.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_file(
    tar: tarfile.TarFile, dir_fd: int, name: str, arcname: str, mtime: float | None = None
) -> int | None:
    """Add one regular file; None if it vanished or stopped being a regular file."""
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        os.set_blocking(fd, True)
        info = _header(arcname, tarfile.REGTYPE, st)
        info.size = st.st_size
        if mtime is not None:
            info.mtime = int(mtime)
        tar.addfile(info, _ExactReader(src, st.st_size))
    return info.size


def _add_entry(tar: tarfile.TarFile, entry: _Entry) -> int:
    """Add one walked entry; returns the payload bytes it added."""
    mode = entry.st.st_mode
    if stat.S_ISREG(mode):
        # Always REGTYPE, never a hard link: Go would turn a link into a symlink (§J.24).
        return _add_file(tar, entry.dir_fd, entry.name, entry.rel) or 0
    if stat.S_ISDIR(mode):
        tar.addfile(_header(entry.rel, tarfile.DIRTYPE, entry.st))
    elif stat.S_ISLNK(mode):
        target = _readlink(entry)
        if target is not None:
            info = _header(entry.rel, tarfile.SYMTYPE, entry.st)
            info.linkname = target
            tar.addfile(info)
    # Sockets, FIFOs and devices are not artifact content: skipped.
    return 0


def pack_directory(
    src: Path, out: BinaryIO, *, compression: str = "", single_member_name: str | None = None
) -> int:
    """Stream a PAX tar of the contents of `src` into `out`; return the payload bytes written.

    With `single_member_name` and a lone regular file in `src`, the tar holds one member
    "./<name>", which the 0.0.49 client turns into a file (§H: how `retval` must travel).
    """
    lone_name = single_member_name
    if lone_name is not None and (lone_name in ("", ".", "..") or "/" in lone_name):
        raise ValueError(f"single_member_name must be a plain file name, not {lone_name!r}")
    with ExitStack() as stack:
        root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, root_fd)
        sink = _compressor(out, compression, stack)
        tar = stack.enter_context(
            tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_CHUNK)
        )
        written = _pack_single(tar, root_fd, lone_name)
        if written is None:
            written = sum(_add_entry(tar, entry) for entry in _walk(root_fd))
    return written


def _pack_single(tar: tarfile.TarFile, root_fd: int, arcname: str | None) -> int | None:
    """Write a lone regular file as "./<arcname>"; None when the normal layout must be used."""
    names = os.listdir(root_fd) if arcname is not None else []
    if arcname is None or len(names) != 1 or not _is_regular(names[0], root_fd):
        return None
    # The client polls for a retval newer than its submission (§H), on its own clock: stamp now.
    return _add_file(tar, root_fd, names[0], "./" + arcname, mtime=time.time())


class _CountingReader(io.BufferedIOBase):
    """Counts what is read, so that an empty object reads as an empty archive, as in Go."""

    def __init__(self, src: BinaryIO) -> None:
        super().__init__()
        self._src = src
        self.count = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = self._src.read(-1 if size is None else size)
        self.count += len(data)
        return data


@dataclass
class _Extraction:
    root: str  # the real path of dest
    max_bytes: int | None
    total: int = 0
    files: set[str] = field(default_factory=set)  # regular files written, for hard links
    links: list[tuple[str, str]] = field(default_factory=list)  # (member, real path)
    dirs: list[tuple[str, float]] = field(default_factory=list)

    def refuse(self, member: str, reason: str) -> UnsafeArchive:
        return UnsafeArchive(f"refusing tar member {member!r}: {reason}")

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)


def _normalize(state: _Extraction, member: str, name: str, what: str = "name") -> str:
    """`name` relative to the root ("" for the root itself), or a refusal."""
    if name.startswith("/"):
        raise state.refuse(member, f"absolute {what} {name!r}")
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if not parts:
                raise state.refuse(member, f"{what} {name!r} escapes the destination")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


def _real_parent(state: _Extraction, member: str, rel: str, *, create: bool = True) -> str:
    """The real directory that holds `rel` (created unless told not to); it must lie inside."""
    parent = os.path.realpath(os.path.dirname(os.path.join(state.root, rel)))
    if not state.inside(parent):
        raise state.refuse(member, f"its directory resolves outside the destination: {parent}")
    try:
        if create:
            os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise state.refuse(member, f"a parent path is not a directory ({exc})") from exc
    return parent


def _place(state: _Extraction, m: tarfile.TarInfo, rel: str, *, keep_dir: bool = False) -> str:
    """Make room for `rel` without following a symlink there (a later member wins, as in tar)."""
    path = os.path.join(_real_parent(state, m.name, rel), os.path.basename(rel))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
    elif not keep_dir:
        raise state.refuse(m.name, "an existing directory is in the way")
    return path


def _set_mtime(path: str, mtime: float) -> None:
    try:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    except (OverflowError, ValueError, OSError):
        pass  # a bogus mtime in the archive is not worth failing the extraction for


def _check(m: tarfile.TarInfo, state: _Extraction, rel: str) -> None:
    """Our refusals, before tarfile's data filter gets a say (its messages are less clear)."""
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        raise state.refuse(m.name, "devices, FIFOs and other special files are not allowed")
    if rel == "" and not m.isdir():
        raise state.refuse(m.name, "only a directory may stand for the destination itself")
    parent = _real_parent(state, m.name, rel, create=False)
    if m.isreg() and state.max_bytes is not None and state.total + m.size > state.max_bytes:
        raise state.refuse(m.name, f"extraction would exceed the limit of {state.max_bytes} bytes")
    if m.issym():
        if not m.linkname or m.linkname.startswith("/"):
            raise state.refuse(m.name, f"absolute or empty symlink target {m.linkname!r}")
        if not state.inside(os.path.realpath(os.path.join(parent, m.linkname))):
            raise state.refuse(m.name, f"symlink target {m.linkname!r} resolves outside dest")
    if m.islnk():
        _link_source(m, state, rel)
    _second_opinion(m, state)


def _second_opinion(m: tarfile.TarInfo, state: _Extraction) -> None:
    """tarfile's own data filter, where this Python has it (3.11.4+; Debian bookworm's 3.11.2
    has not). Our checks above stand on their own; this only adds a second line of defence."""
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return
    try:
        data_filter(m, state.root)
    except tarfile.TarError as exc:  # FilterError and its kin derive from TarError
        raise state.refuse(m.name, f"rejected by tarfile's data filter: {exc}") from exc


def _link_source(m: tarfile.TarInfo, state: _Extraction, rel: str) -> str:
    """The file a hard link member points at: one this extraction wrote, and still a file."""
    target = _normalize(state, m.name, m.linkname, "hard link target")
    parent = _real_parent(state, m.name, target, create=False)
    source = os.path.join(parent, os.path.basename(target))
    if target not in state.files or target == rel or not _is_regular(source):
        raise state.refuse(m.name, f"hard link target {m.linkname!r} is not an extracted file")
    return source


def _is_regular(path: str, dir_fd: int | None = None) -> bool:
    try:
        return stat.S_ISREG(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _write_file(tar: tarfile.TarFile, m: tarfile.TarInfo, state: _Extraction, rel: str) -> None:
    path = _place(state, m, rel)
    src = tar.extractfile(m)
    assert src is not None  # a regular member always has a reader
    with src, os.fdopen(os.open(path, _CREATE_FILE, 0o600), "wb") as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
        dst.flush()
        # Owner keeps rw and any x bit; setuid/setgid/sticky and group/other write are dropped.
        os.fchmod(dst.fileno(), (m.mode & 0o755) | 0o600)
    _set_mtime(path, m.mtime)
    state.total += m.size
    state.files.add(rel)


def _extract_member(tar: tarfile.TarFile, m: tarfile.TarInfo, state: _Extraction) -> None:
    rel = _normalize(state, m.name, m.name)
    _check(m, state, rel)
    if rel == "":
        return  # "./": the destination itself
    if m.isreg():
        _write_file(tar, m, state, rel)
    elif m.isdir():
        path = _place(state, m, rel, keep_dir=True)
        os.makedirs(path, exist_ok=True)
        # Owner rwx always, or children (and a later rm -rf) could not be written.
        os.chmod(path, (m.mode & 0o755) | 0o700)
        state.dirs.append((path, m.mtime))
    elif m.issym():
        path = _place(state, m, rel)
        os.symlink(m.linkname, path)
        _set_mtime(path, m.mtime)
        state.links.append((m.name, path))
    else:
        os.link(_link_source(m, state, rel), _place(state, m, rel), follow_symlinks=False)
        state.files.add(rel)


def _finish(state: _Extraction) -> None:
    """Recheck symlinks (a later member can re-point an earlier one) and restore dir mtimes."""
    # Real paths, not member names: a later symlink can hide an earlier one behind a new path.
    for member, path in state.links:
        if os.path.islink(path) and not state.inside(os.path.realpath(path)):
            os.unlink(path)
            raise state.refuse(member, "symlink resolves outside the destination after extraction")
    for path, mtime in reversed(state.dirs):
        if os.path.isdir(path) and not os.path.islink(path):
            _set_mtime(path, mtime)


def extract(stream: BinaryIO, dest: Path, *, max_bytes: int | None = None) -> int:
    """Extract a tar (any compression, stream may be non-seekable) under `dest`.

    Returns the payload bytes written. Raises UnsafeArchive before writing any member that
    would land outside `dest`, is a special file, or would pass `max_bytes`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    state = _Extraction(os.path.realpath(dest), max_bytes)
    counter = _CountingReader(stream)
    try:
        with tarfile.open(fileobj=counter, mode="r|*", bufsize=_CHUNK) as tar:
            for member in tar:
                _extract_member(tar, member, state)
    except tarfile.TarError as exc:
        if isinstance(exc, tarfile.ReadError) and counter.count == 0:
            return 0
        raise UnsafeArchive(f"not a readable tar archive: {exc}") from exc
    _finish(state)
    return state.total


def tree_fingerprint(root: Path) -> str:
    """A hash of (path, type, size, mtime_ns, link target) of every entry; no file is read."""
    digest = hashlib.sha256()
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return digest.hexdigest()
    try:
        for entry in _walk(root_fd):
            st = entry.st
            target = _readlink(entry) if stat.S_ISLNK(st.st_mode) else None
            line = f"{entry.rel}\0{stat.S_IFMT(st.st_mode)}\0{st.st_size}\0{st.st_mtime_ns}"
            digest.update(os.fsencode(f"{line}\0{target}\n"))
    finally:
        os.close(root_fd)
    return digest.hexdigest()


def _readlink(entry: _Entry) -> str | None:
    """The target of a walked symlink; None if it is gone or no longer a link."""
    try:
        return os.readlink(entry.name, dir_fd=entry.dir_fd)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise


def has_content(root: Path) -> bool:
    """True if `root` is a directory holding at least one entry."""
    try:
        with os.scandir(root) as it:
            return next(it, None) is not None
    except (FileNotFoundError, NotADirectoryError):
        return False
