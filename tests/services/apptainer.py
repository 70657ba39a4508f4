"""A small Python SIF for the container tests, built once and kept across runs.

The image is a debootstrapped bookworm ``minbase`` with ``python3`` (the full package:
python3-minimal lacks json and platform), trimmed, then ``apptainer build x.sif rootfs/``.
A ``%post`` recipe cannot be used here: as root without CAP_SYS_RESOURCE it fails, so any
customisation happens in the rootfs directory before the build (see infra notes).

The SIF lives in ``.cache/test-images/python3-<recipe hash>.sif`` (git-ignored): changing the
recipe below builds a new one. Build it ahead with ``python -m tests.services.apptainer``.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("STUDIO_TEST_IMAGES", ROOT / ".cache" / "test-images"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = "python3"
# Docs, man pages, locales and apt's caches: 125 MB instead of ~200 MB, 42 MB as a SIF.
TRIM = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
)
RECIPE = f"debootstrap --variant=minbase --include={INCLUDE} {SUITE} {MIRROR}; trim {TRIM}"
INSTALL_HINT = "run scripts/install-apptainer.sh (as root) to install Apptainer"


def apptainer_binary() -> str:
    """The apptainer binary, or a test failure saying how to install it."""
    found = shutil.which("apptainer")
    if found is None:
        pytest.fail(f"apptainer is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def image_path() -> Path:
    digest = hashlib.sha256(RECIPE.encode()).hexdigest()[:16]
    return CACHE / f"python3-{digest}.sif"


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{what} failed with exit code {done.returncode}:\n{tail}")


def build_image(apptainer: str) -> Path:
    """The cached SIF, built under a lock so parallel sessions build it once."""
    target = image_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not os.path.exists(debootstrap):
            raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
        rootfs = target.with_suffix(".rootfs")
        shutil.rmtree(rootfs, ignore_errors=True)
        try:
            argv = [debootstrap, "--variant=minbase", f"--include={INCLUDE}", SUITE]
            _run([*argv, str(rootfs), MIRROR], "debootstrap")
            for path in TRIM:
                shutil.rmtree(rootfs / path, ignore_errors=True)
            partial = target.with_suffix(".sif.partial")
            _run([apptainer, "build", "--force", str(partial), str(rootfs)], "apptainer build")
            os.replace(partial, target)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def python_sif() -> Path:
    """Path of a SIF whose ``python3`` is Debian bookworm's 3.11 (json, venv-less, no pip)."""
    return build_image(apptainer_binary())


if __name__ == "__main__":
    binary = shutil.which("apptainer")
    if binary is None:
        sys.exit(f"apptainer is not installed: {INSTALL_HINT}")
    print(build_image(binary))
