"""Experiment packages for container runs: installed on the host, outside the image, cached.

Why not a venv inside the container: the image may have no pip or venv module (Debian's
python3 has neither), a container has no copy of a TLS-intercepting proxy's CA bundle, and an
image is read-only. So uv on the host installs the packages with ``--target`` for the image's
Python version and platform (``--python-version``/``--python-platform``: uv resolves and picks
wheels for the image, not for the host), into a directory that the container gets read-only and
on its PYTHONPATH. Images that differ in content, Python or libc never share a directory.

The cache itself is EnvCache's: flock'd builds (concurrent requests build once), leases that
keep an env from eviction while a run uses it, LRU eviction by size. Only what an env *is*
changes: a ``--target`` directory instead of a virtualenv.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.errors import ConfigError, EnvironmentFailed
from agent.executors.base import Confine
from agent.executors.envcache import EnvCache, EnvSpec
from agent.executors.pythonenv import Interpreter

MOUNT = "/opt/studio-env"  # where a run's package directory appears inside the container
# uv's --python-platform choices for glibc, by the minor version they need (2.17 first).
_MANYLINUX_MINORS = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class ImagePython(Interpreter):
    """The Python inside one image. ``version_text`` names the image too, so that EnvCache's
    key (Python version + packages) keeps envs of different images apart."""

    image_digest: str = ""
    libc: tuple[str, str] = ("", "")  # platform.libc_ver() inside the image
    machine: str = ""

    @property
    def version_text(self) -> str:
        base = ".".join(str(part) for part in self.version)
        return f"{base} in image {self.image_digest[:16]}"

    @property
    def platform(self) -> str:
        """uv's ``--python-platform`` for wheels that run in this image."""
        machine = _MACHINES.get(self.machine)
        if machine is None:
            raise EnvironmentFailed(f"the image's machine {self.machine!r} is not supported")
        kind, version = self.libc
        if kind != "glibc":
            # platform.libc_ver() gives ('', '') on musl; uv knows only musl targets then.
            return f"{machine}-unknown-linux-musl"
        try:
            minor = int(version.split(".")[1])
        except (IndexError, ValueError):
            raise EnvironmentFailed(
                f"the image's glibc version {version!r} is unreadable"
            ) from None
        usable = [m for m in _MANYLINUX_MINORS if m <= minor]
        if not usable:
            raise EnvironmentFailed(f"the image's glibc {version} is older than manylinux 2.17")
        return f"{machine}-manylinux_2_{usable[-1]}"


class ContainerEnvCache(EnvCache):
    """EnvCache whose envs are ``uv pip install --target`` directories for an image's Python."""

    def __init__(self, root: Path, max_bytes: int, pass_env: Sequence[str] = ()) -> None:
        super().__init__(root, max_bytes, "uv", pass_env=pass_env)
        if self._uv is None:  # "uv" was asked: EnvCache has raised already; this is for mypy
            raise ConfigError("container environments need uv")

    def _begin(self, interpreter: Interpreter, env_dir: Path) -> None:
        if not isinstance(interpreter, ImagePython):
            raise TypeError("ContainerEnvCache builds for an ImagePython only")

    def _create_venv(
        self, interpreter: Interpreter, env_dir: Path, log: BinaryIO, child: Confine
    ) -> None:
        pass  # a --target directory needs no venv

    def _install(
        self, spec: EnvSpec, env_dir: Path, req_file: Path, log: BinaryIO, child: Confine
    ) -> None:
        image = spec.interpreter
        assert isinstance(image, ImagePython)  # _begin refused any other
        argv = [
            str(self._uv),
            "pip",
            "install",
            "--target",
            str(env_dir),
            "--python-version",
            f"{image.version[0]}.{image.version[1]}",
            "--python-platform",
            image.platform,
            "-r",
            str(req_file),
        ]
        self._run_installer("uv pip install --target", argv, log, child)
