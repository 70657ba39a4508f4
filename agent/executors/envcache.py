"""A size-capped cache of experiment virtualenvs, shared by threads and processes on one host.

Each env lives at ``<root>/<hash>`` and is built in place, because a virtualenv hard-codes its
own path and cannot be moved after the build. Two flock files guard it:

- ``<hash>.lock``: every user holds a shared lock on it from before the env is checked or built
  until its lease is released; eviction only ever tries a non-blocking exclusive lock, so it can
  never pull an env from under a build or a running experiment.
- ``<hash>.build``: exclusive while building, so racing requests build once and the others wait
  and reuse. It is a separate file because upgrading the shared lock instead would wait for every
  lease on the env to end, which for a long experiment is hours.

``<hash>.json`` (its marker: what it holds, its size; its mtime is the env's last use) is
written last, by the agent, beside the env and never in it: the build writes the env as the
request's own identity, and a marker it could plant would pass a half-built env to another run.
A directory without one is a crashed build.
"""

import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

from agent import childenv
from agent.errors import ConfigError
from agent.executors.base import Confine, Unconfined
from agent.executors.installer import run_step
from agent.executors.pythonenv import Interpreter
from agent.report import metrics
from agent.sandbox.identity import chown_tree

InstallerChoice = Literal["auto", "uv", "pip"]

REQUIREMENTS_FILE = "requirements.txt"
CONFIG_PIP_FILE = "config-pip.txt"
DEFAULT_INSTALL_TIMEOUT = 3600.0


@dataclass(frozen=True)
class EnvSpec:
    """What one env is made of."""

    interpreter: Interpreter
    requirements: tuple[str, ...]
    extra: tuple[str, ...]  # config.pip, installed after the requirements

    @property
    def key(self) -> str:
        """Same Python version and same packages give the same env, whichever installer.

        ``pythonenv`` is a set (freeze order carries no meaning) but ``config.pip`` is installed
        in the order given, so only the former is sorted.
        """
        payload = json.dumps(
            [self.interpreter.version_text, sorted(self.requirements), list(self.extra)]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def find_uv() -> Path | None:
    """uv from the agent's own venv first (the version it was tested with), else from PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("uv")
    return Path(on_path) if on_path else None


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _lock_file(path: Path, operation: int) -> int | None:
    """An fd holding ``operation`` on ``path``; None when LOCK_NB was asked and it is busy.

    Eviction unlinks lock files, so a lock won on a file that has since been unlinked guards
    nothing: open the current file and try again.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _is_same_file(fd, path):
            return fd
        os.close(fd)


class EnvLease:
    """A built env in use; it cannot be evicted until ``release``."""

    def __init__(self, path: Path, fd: int, hit: bool) -> None:
        self.path = path
        self.hit = hit
        self._fd: int | None = fd
        self._guard = threading.Lock()

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def release(self) -> None:
        with self._guard:
            if self._fd is not None:
                os.close(self._fd)  # closing the fd drops its shared flock
                self._fd = None

    def __enter__(self) -> "EnvLease":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _say(log: BinaryIO, text: str) -> None:
    log.write(f"studio-agent: {text}\n".encode())
    log.flush()


def _tree_size(path: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                continue
    return total


def marker_of(env_dir: Path) -> Path:
    """The agent's record of a complete env, beside it in the cache root (agent-only)."""
    return env_dir.with_name(f"{env_dir.name}.json")


def _is_complete(env_dir: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(marker_of(env_dir)).st_mode) and env_dir.is_dir()
    except FileNotFoundError:
        return False


class EnvCache:
    def __init__(
        self,
        root: Path,
        max_bytes: int,
        installer: InstallerChoice = "auto",
        install_timeout: float = DEFAULT_INSTALL_TIMEOUT,
        pass_env: Sequence[str] = (),
    ) -> None:
        self.pass_env = tuple(pass_env)
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.install_timeout = install_timeout
        self._uv = None if installer == "pip" else find_uv()
        if installer == "uv" and self._uv is None:
            raise ConfigError(
                f"installer 'uv' is configured but no uv binary is next to {sys.executable} "
                "or on PATH (pip install uv, or set the installer to pip)"
            )
        self.installer: Literal["uv", "pip"] = "pip" if self._uv is None else "uv"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # runs under a slot identity reach their env, list nothing
        self._remove_unfinished()

    def acquire(
        self,
        interpreter: Interpreter,
        requirements: Sequence[str],
        extra: Sequence[str],
        log: BinaryIO,
        confine: Confine | None = None,
    ) -> EnvLease:
        """Reuse or build the env for these packages and hold it until the lease is released.

        A build runs confined as the request's own run (``confine``): the packages' build code
        is the request's code, and must not see the agent's files or environment.
        """
        spec = EnvSpec(interpreter, tuple(requirements), tuple(extra))
        key, env_dir = spec.key, self.root / spec.key
        # Shared from the start: eviction cannot remove the env while it is checked or built.
        fd = _lock_file(self.root / f"{key}.lock", fcntl.LOCK_SH)
        assert fd is not None  # only LOCK_NB can come back empty-handed
        try:
            child = confine or Unconfined(self.root / ".scratch")
            if _is_complete(env_dir):
                _open_to_runs(env_dir)
                built = False
            else:
                built = self._build_once(spec, log, child)
            os.utime(marker_of(env_dir))  # its last use, for eviction
        except BaseException:
            os.close(fd)
            raise
        lease = EnvLease(env_dir, fd, hit=not built)
        metrics.record_cache(hit=not built, env_hash=key)
        if built:
            self._evict(keep=key)
        else:
            _say(log, f"reusing environment {key} (Python {interpreter.version_text})")
        return lease

    def _build_once(self, spec: EnvSpec, log: BinaryIO, child: Confine) -> bool:
        """Build the env unless a racing request finished it first; True when this call built."""
        build_fd = _lock_file(self.root / f"{spec.key}.build", fcntl.LOCK_EX)
        assert build_fd is not None
        try:
            if _is_complete(self.root / spec.key):
                return False
            self._build(spec, log, child)
            return True
        finally:
            os.close(build_fd)

    def _build(self, spec: EnvSpec, log: BinaryIO, child: Confine) -> None:
        key, env_dir = spec.key, self.root / spec.key
        count = len(spec.requirements) + len(spec.extra)
        _say(
            log,
            f"building environment {key} with {self.installer} for Python "
            f"{spec.interpreter.version_text} ({count} packages)",
        )
        if env_dir.exists():
            _say(log, f"removing the unfinished build of environment {key}")
            shutil.rmtree(env_dir)
        folder, files = self._requirement_files(spec)
        try:
            env_dir.mkdir()
            self._begin(spec.interpreter, env_dir)
            child.give(env_dir)  # the build writes it as the run's identity ...
            self._create_venv(spec.interpreter, env_dir, log, child)
            for path in files.values():
                self._install(spec, env_dir, path, log, child)
            child.reclaim(env_dir)  # ... then it is the agent's: no run can change it
            self._write_marker(env_dir, spec)
        except BaseException:
            shutil.rmtree(env_dir, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _requirement_files(self, spec: EnvSpec) -> tuple[Path, dict[str, Path]]:
        """The requirement lists, written where the build may read but not change them."""
        folder = Path(tempfile.mkdtemp(prefix=".req-", dir=self.root))
        os.chmod(folder, 0o711)
        files = {}
        for name, lines in ((REQUIREMENTS_FILE, spec.requirements), (CONFIG_PIP_FILE, spec.extra)):
            if lines:
                path = folder / name
                path.write_text("".join(f"{line}\n" for line in lines))
                os.chmod(path, 0o644)
                files[name] = path
        return folder, files

    def _begin(self, interpreter: Interpreter, env_dir: Path) -> None:
        """What the agent writes into a new env before the build (nothing, for a venv)."""

    def _create_venv(
        self, interpreter: Interpreter, env_dir: Path, log: BinaryIO, child: Confine
    ) -> None:
        if self._uv is not None:
            # --seed: pip and setuptools in the env, as a pip-built env has them; experiments
            # that call pip or pkg_resources behave the same whichever installer built it.
            argv = [
                str(self._uv),
                "venv",
                "--seed",
                "--python",
                str(interpreter.path),
                str(env_dir),
            ]
            self._run_installer("uv venv", argv, log, child)
        else:
            argv = [str(interpreter.path), "-m", "venv", str(env_dir)]
            self._run_installer("python -m venv", argv, log, child)

    def _install(
        self, spec: EnvSpec, env_dir: Path, req_file: Path, log: BinaryIO, child: Confine
    ) -> None:
        python = str(env_dir / "bin" / "python")
        if self._uv is not None:
            argv = [str(self._uv), "pip", "install", "--python", python, "-r", str(req_file)]
            self._run_installer("uv pip install", argv, log, child)
        else:
            argv = [python, "-m", "pip", "install", "--disable-pip-version-check"]
            self._run_installer("pip install", [*argv, "-r", str(req_file)], log, child)

    def _installer_env(self, child: Confine) -> dict[str, str]:
        env = childenv.installer_env(self.pass_env, child.scratch, child.home)
        # A shared download cache only where every build is the agent itself; a confined
        # build gets its own, so one request's build cannot plant files for another's.
        shared = child.home is None
        env["UV_CACHE_DIR"] = str(self.root / ".uv-cache" if shared else child.scratch / "uv")
        if not shared:
            env["PIP_CACHE_DIR"] = str(child.scratch / "pip")
        return env

    def _run_installer(self, step: str, argv: list[str], log: BinaryIO, child: Confine) -> None:
        _say(log, f"$ {' '.join(argv)}")
        env = self._installer_env(child)
        command = child.command(argv)
        run_step(step, command, log, env, child.scratch, self.install_timeout, child.settle)

    def _write_marker(self, env_dir: Path, spec: EnvSpec) -> None:
        record = {
            "python": spec.interpreter.version_text,
            "interpreter": str(spec.interpreter.path),
            "installer": self.installer,
            "requirements": list(spec.requirements),
            "pip": list(spec.extra),
            "size_bytes": _tree_size(env_dir),
            "built_at": time.time(),
        }
        marker = marker_of(env_dir)
        temporary = marker.with_name(f".{marker.name}.tmp")
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, marker)

    def _complete_envs(self) -> list[tuple[float, str, int]]:
        """(last used, key, recorded size) of every complete env."""
        found = []
        for marker in self.root.glob("*.json"):
            try:
                size = int(json.loads(marker.read_text())["size_bytes"])
                used = marker.stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being removed right now
            found.append((used, marker.stem, size))
        return found

    def _remove_unfinished(self) -> None:
        """Drop env dirs no build is working on and no marker vouches for (a build cut by a
        crash, or a cache from before markers lived beside their envs)."""
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir() or _is_complete(entry):
                continue
            self._remove_if_idle(entry.name)

    def _evict(self, keep: str) -> None:
        """Drop least recently used idle envs until the recorded sizes fit in ``max_bytes``."""
        if self.max_bytes <= 0:
            return
        envs = sorted(self._complete_envs())
        total = sum(size for _used, _key, size in envs)
        for _used, key, size in envs:
            if total <= self.max_bytes:
                break
            if key != keep and self._remove_if_idle(key):
                total -= size

    def _remove_if_idle(self, key: str) -> bool:
        lock_path = self.root / f"{key}.lock"
        fd = _lock_file(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return False  # leased or being built
        try:
            # Marker first, so nobody ever takes a half-deleted env for a complete one.
            marker_of(self.root / key).unlink(missing_ok=True)
            shutil.rmtree(self.root / key, ignore_errors=True)
            (self.root / f"{key}.build").unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        return True


def _open_to_runs(env_dir: Path) -> None:
    """Make an env built before runs had slot identities (mode 0700) usable by them."""
    if env_dir.stat().st_mode & 0o005 != 0o005:
        chown_tree(env_dir, os.getuid(), os.getgid(), readable=True)
