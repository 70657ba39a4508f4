"""The studio-agent .deb, built once per state of its sources: the ``studio_agent_deb`` fixture.

``packaging/build-deb.sh`` takes about 80-140 s here (dh-virtualenv downloads the locked
dependencies from PyPI), so the result is kept in ``.cache/deb/<hash>/``, keyed by a hash of
exactly the files the script packages (``build-deb.sh --sources``, plus the script itself).
README.md is packaged but left out of the key: it only feeds the wheel's long description.
Concurrent sessions serialize on a lock file; a half-built .deb is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging" / "build-deb.sh"
CACHE = REPO / ".cache" / "deb"
BUILD_TIMEOUT = 900
UNKEYED = {"README.md"}


def source_files() -> list[Path]:
    listed = subprocess.run([str(SCRIPT), "--sources"], check=True, capture_output=True, text=True)
    files = [SCRIPT]
    for name in listed.stdout.split():
        if name in UNKEYED:
            continue
        path = REPO / name
        files += sorted(_packaged(path)) if path.is_dir() else [path]
    return files


def _packaged(folder: Path) -> Iterator[Path]:
    # The same files build-deb.sh's tar keeps: no caches, no editors' hidden temp files.
    for path in folder.rglob("*"):
        parts = path.relative_to(REPO).parts
        if (
            path.is_file()
            and "__pycache__" not in parts
            and not any(p.startswith(".") for p in parts)
        ):
            yield path


def source_hash() -> str:
    sha = hashlib.sha256()
    for path in source_files():
        if not path.exists():
            pytest.fail(f"the .deb needs {path.relative_to(REPO)}, which is missing")
        sha.update(str(path.relative_to(REPO)).encode() + b"\0")
        sha.update(path.read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def build_deb() -> Path:
    """The cached .deb for the current sources, building it first if needed."""
    key = source_hash()
    CACHE.mkdir(parents=True, exist_ok=True)
    done = CACHE / key
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_dir():
            _build_into(done)
    debs = sorted(done.glob("studio-agent_*_amd64.deb"))
    assert len(debs) == 1, f"{done}: expected one studio-agent .deb, found {debs}"
    return debs[0]


def _build_into(done: Path) -> None:
    partial = done.with_name(done.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log = done.with_name(done.name + ".log")
    with open(log, "wb") as out:
        proc = subprocess.run(
            [str(SCRIPT), str(partial)], stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        pytest.fail(f"building the .deb failed (exit {proc.returncode}; full log {log}):\n{tail}")
    partial.rename(done)  # atomic: other sessions see a complete build or none
    for old in CACHE.iterdir():  # keep only the newest build and its log
        if old.is_dir() and old != done:
            shutil.rmtree(old, ignore_errors=True)
        elif old.suffix == ".log" and old != log:
            old.unlink(missing_ok=True)


def with_version(deb: Path, version: str, workdir: Path) -> Path:
    """A copy of ``deb`` that claims ``version``: an upgrade to test, without a second build."""
    tree = workdir / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    lines = control.read_text().splitlines()
    control.write_text(
        "\n".join(f"Version: {version}" if ln.startswith("Version:") else ln for ln in lines) + "\n"
    )
    out = workdir / f"studio-agent_{version}_amd64.deb"
    # gzip: about ten times faster than dpkg-deb's default xz, and size does not matter here.
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "-z1", "--root-owner-group", "-b", str(tree), str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(tree)
    return out


# Named apart from the fixture so that test modules can import it without shadowing (F811).
@pytest.fixture(scope="session", name="studio_agent_deb")
def studio_agent_deb_fixture() -> Path:
    """studio-agent_<version>_amd64.deb for this checkout's sources."""
    return build_deb()
