"""Runs an experiment inside an Apptainer/Singularity image.

The pipeline is the venv executor's: ``prepare`` gets the image and the packages ready, and the
experiment module spawns what ``Launch.command`` returns through agent/process.py, so the
container's processes are one session that a time limit or a cancel kills as a tree (apptainer
``exec`` makes no PID namespace: the payload is a plain descendant of the spawned runtime).

Isolation: ``--cleanenv`` and ``--contain`` (no host HOME, /tmp or environment); the run's own
directory (workspace, artifacts, TMPDIR) is bound at the same path, so STUDIOML_HOME and the
artifact mapping stay valid inside; the child's environment goes in through an ``--env-file``
(0600; values are never on a command line where ``ps`` shows them), and the runtime itself gets
only PATH and HOME from the agent's clean environment, so nothing the request sets (such as
APPTAINER_BIND) can change how the container is made.
"""

import functools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from agent.errors import ConfigError, EnvironmentFailed, TransientError
from agent.executors.base import Executor, Launch, RunContext
from agent.executors.containerenv import MOUNT, ContainerEnvCache, ImagePython
from agent.executors.envcache import EnvLease
from agent.executors.images import (
    ImageStore,
    LocalImage,
    check_allowed,
    reference_for,
    spython_pull,
)
from agent.executors.installer import LastBytes, run_step
from agent.executors.pythonenv import filter_requirements
from agent.executors.venv import shell_words
from agent.settings import Settings

log = logging.getLogger(__name__)

CAP_SYS_RESOURCE = 24
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_FILE = "container.env"
PROBE_TIMEOUT = 120.0
# Not passed in: the runtime sets HOME for --contain, and PATH is the image's (see _inner_env).
_NOT_PASSED = frozenset({"HOME", "PATH"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PROBE = (
    "import json, platform, sys; print(json.dumps({'version': list(sys.version_info[:3]),"
    " 'libc': list(platform.libc_ver()), 'machine': platform.machine()}))"
)


@dataclass(frozen=True)
class Runtime:
    binary: str
    version: str  # what ``--version`` says, e.g. "apptainer version 1.4.5"
    flavor: str  # "apptainer", "singularity-ce" or "singularity"
    no_privs: bool  # root without CAP_SYS_RESOURCE: exec needs --no-privs


def lacks_sys_resource(status: Path = Path("/proc/self/status")) -> bool:
    """Root without CAP_SYS_RESOURCE (some VMs and containers): apptainer then fails to drop
    to its default capability set unless told ``--no-privs``."""
    if os.geteuid() != 0:
        return False
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return not (int(line.split()[1], 16) >> CAP_SYS_RESOURCE) & 1
    return False


def flavor_of(version: str) -> str:
    """Apptainer and SingularityCE say who they are; old Singularity says ``singularity``."""
    text = version.strip().lower()
    for name in ("apptainer", "singularity-ce"):
        if text.startswith(name):
            return name
    return "singularity"


def detect_runtime() -> Runtime:
    """The installed runtime, via spython (which always runs ``singularity``), else apptainer."""
    from spython.main import Client

    version = str(Client.version() or "").strip()
    if not version and shutil.which("apptainer"):
        done = subprocess.run(
            ["apptainer", "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        version = done.stdout.strip()
    if not version:
        raise ConfigError(
            "neither apptainer nor singularity is installed on this host "
            "(scripts/install-apptainer.sh installs Apptainer on Debian)"
        )
    flavor = flavor_of(version)
    binary = shutil.which("apptainer") if flavor == "apptainer" else None
    binary = binary or shutil.which("singularity") or "singularity"
    no_privs = lacks_sys_resource()
    if no_privs:
        log.info(
            "running containers with --no-privs: this root lacks CAP_SYS_RESOURCE, which %s "
            "needs to set its default capabilities",
            version,
        )
    return Runtime(binary, version, flavor, no_privs)


def _probe_answer(stdout: str) -> dict[str, Any] | None:
    """The probe's last line, which the image printed: untrusted, so anything odd is None."""
    lines = stdout.strip().splitlines()
    try:
        info = json.loads(lines[-1])
        _image_python(info, "")
    except (IndexError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info, dict) else None


def _image_python(info: dict[str, Any], digest: str) -> ImagePython:
    major, minor, micro = (int(part) for part in info["version"])
    return ImagePython(
        Path("python3"),
        (major, minor, micro),
        image_digest=digest,
        libc=(str(info["libc"][0]), str(info["libc"][1])),
        machine=str(info["machine"]),
    )


def env_file_text(env: Mapping[str, str]) -> str:
    """``K='v'`` lines whose values arrive verbatim.

    The runtime evaluates values a second time inside the container (so ``$HOME`` and
    backquotes would expand): escape ``\\``, ``$`` and backquotes for that, then shell-quote.
    """
    lines = []
    for name, value in env.items():
        escaped = value.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")
        lines.append(f"{name}={shlex.quote(escaped)}\n")
    return "".join(lines)


class SingularityExecutor(Executor):
    name = "singularity"

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self._settings = settings
        self._runtime = runtime
        self._runtime_lock = threading.Lock()
        root = settings.cache_dir / "containers"
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)  # runs under a slot identity pass through to images and envs
        self.images = ImageStore(root / "images", self._pull, settings.image_cache_size)
        self.envs = ContainerEnvCache(root / "envs", settings.cache_size, settings.pass_env)
        self._pythons: dict[str, ImagePython] = {}
        self._pythons_lock = threading.Lock()
        self._probe_locks: dict[str, threading.Lock] = {}

    def _pull(self, uri: str, target: Path, log: BinaryIO) -> None:
        spython_pull(uri, target, log, self.runtime.binary)

    @property
    def runtime(self) -> Runtime:
        with self._runtime_lock:
            if self._runtime is None:
                try:
                    self._runtime = detect_runtime()
                except ConfigError as exc:
                    raise EnvironmentFailed(str(exc)) from None
            return self._runtime

    def prepare(self, ctx: RunContext, base_env: Mapping[str, str]) -> Launch:
        request = ctx.request
        experiment = request.experiment
        ref = reference_for(request, self._settings.container_image)
        if ref is None:
            raise EnvironmentFailed(
                "no container image: the request has no _singularity artifact and this agent "
                "has no container_image"
            )
        check_allowed(ref, self._settings.container_sources)
        words = shell_words(experiment.args)
        requirements, notes = filter_requirements(experiment.pythonenv)
        extra, extra_notes = filter_requirements(request.config.pip)  # as untrusted
        notes += [f"config.pip: {note}" for note in extra_notes]
        ctx.output_file.parent.mkdir(parents=True, exist_ok=True)
        with ctx.output_file.open("ab") as out:
            for note in notes:
                out.write(f"studio-agent: {note}\n".encode())
            runtime = self.runtime
            image = self.images.materialize(ref, request.config, out, ctx.fetch)
            out.write(f"studio-agent: image {ref.location} ({image.digest[:16]})\n".encode())
            lease = None
            if experiment.filename and (requirements or extra):
                python = self.image_python(runtime, image, ctx)
                lease = self.envs.acquire(python, requirements, extra, out, ctx.child)
        # A container-only request (no filename) runs the image's own runscript.
        argv = ["python3", experiment.filename, *words] if experiment.filename else words
        action = "exec" if experiment.filename else "run"
        wrap = functools.partial(
            self._wrap, runtime, action, image, ctx, lease.path if lease else None, base_env
        )
        return Launch(argv=argv, release=functools.partial(_release, image, lease), wrap=wrap)

    def image_python(self, runtime: Runtime, image: LocalImage, ctx: RunContext) -> ImagePython:
        """The image's python3 (version, libc, machine), probed once per image content."""
        with self._pythons_lock:  # one probe per image at a time, other images go on
            lock = self._probe_locks.setdefault(image.digest, threading.Lock())
        with lock:
            found = self._pythons.get(image.digest) or self._probe(runtime, image, ctx)
            if found is None:  # not remembered: the next request for it probes again
                raise EnvironmentFailed(f"image {image.path} has no working python3")
            self._pythons[image.digest] = found
        return found

    def _probe(self, runtime: Runtime, image: LocalImage, ctx: RunContext) -> ImagePython | None:
        record = self.images.root / "python" / f"{image.digest}.json"
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            argv = [runtime.binary, "exec", *self._base_flags(runtime), str(image.path)]
            # The image is the request's code: it runs confined, as the experiment will.
            try:
                output = self._run_probe(ctx, argv)
            except (OSError, EnvironmentFailed, TransientError) as exc:
                log.warning("python3 probe of %s failed: %s", image.path, str(exc)[-500:])
                return None
            info = _probe_answer(output)
            if info is None:
                return None
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(info))
        return _image_python(info, image.digest)

    @staticmethod
    def _run_probe(ctx: RunContext, argv: list[str]) -> str:
        """What the image's python3 printed (its last 64 KiB: the image is untrusted)."""
        output = LastBytes()
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(ctx.scratch)}
        command = ctx.child.command([*argv, "python3", "-c", _PROBE])
        run_step(
            "python3 probe", command, output, env, ctx.scratch, PROBE_TIMEOUT, ctx.child.settle
        )
        return output.kept.decode(errors="replace")

    def _base_flags(self, runtime: Runtime) -> list[str]:
        flags = ["--cleanenv", "--contain"]
        return ["--no-privs", *flags] if runtime.no_privs else flags

    def _wrap(
        self,
        runtime: Runtime,
        action: str,
        image: LocalImage,
        ctx: RunContext,
        packages: Path | None,
        base_env: Mapping[str, str],
        argv: list[str],
        env: dict[str, str],
    ) -> tuple[list[str], dict[str, str]]:
        """The runtime command for ``argv`` with ``env`` inside; the runtime's own small env."""
        env_file = ctx.home / ENV_FILE
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(env_file_text(self._inner_env(env, packages, ctx)))
        ctx.child.give(env_file)  # the runtime reads it as the run's identity; no other run can
        home = str(ctx.home)
        flags = [*self._base_flags(runtime), "--env-file", str(env_file)]
        flags += ["--bind", f"{home}:{home}", "--pwd", str(ctx.workspace)]
        if packages is not None:
            flags += ["--bind", f"{packages}:{MOUNT}:ro"]
        if ctx.gpus:
            # Binds the driver and /dev/nvidia*; CUDA_VISIBLE_DEVICES (in the env file) narrows
            # what the job sees. Without a GPU the runtime drops --nv silently.
            flags.append("--nv")
        flags += self._settings.container_options
        outer = {k: base_env[k] for k in ("PATH", "HOME", "LANG") if k in base_env}
        return [runtime.binary, action, *flags, str(image.path), *argv], outer

    @staticmethod
    def _inner_env(
        env: Mapping[str, str], packages: Path | None, ctx: RunContext
    ) -> dict[str, str]:
        inner: dict[str, str] = {}
        dropped = []
        for name, value in env.items():
            if name in _NOT_PASSED:
                continue
            if _NAME.match(name):
                inner[name] = value
            else:
                dropped.append(name)
        if dropped:
            with ctx.output_file.open("ab") as out:
                text = ", ".join(repr(n) for n in dropped)
                out.write(f"studio-agent: not passed into the container: {text}\n".encode())
        inner["PATH"] = CONTAINER_PATH
        if packages is not None:
            inner["PATH"] = f"{MOUNT}/bin:{CONTAINER_PATH}"
            inner["PYTHONPATH"] = ":".join(p for p in (MOUNT, env.get("PYTHONPATH")) if p)
        return inner


def _release(image: LocalImage, lease: EnvLease | None) -> None:
    """After the run: its environment's lease, and its hold on the image (now evictable)."""
    if lease is not None:
        lease.release()
    image.release()
