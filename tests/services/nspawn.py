"""A real systemd as PID 1 for system tests: Debian bookworm booted in ``systemd-nspawn``.

API (small on purpose; the packaging tests reuse it):

* ``ensure_rootfs() -> Path``: the cached rootfs tarball (debootstrapped once, under an flock).
* ``Container.create(workdir)``: a fresh copy of that rootfs; ``boot()``, ``leader``,
  ``run(cmd)``, ``copy_in(host, path)``, ``write_file(path, text)``, ``show(unit, *props)``,
  ``journal(unit, *matches)``, ``poweroff()`` (also ``close()``: never leaves anything running).
* ``install_agent_from_source(container)``: the agent into ``/opt/venvs/studio-agent`` from a
  host-built wheelhouse (no PyPI inside), ``/usr/bin/studio-agent``, user ``studio-agent``.
* the ``nspawn`` fixture (module scope): a booted container, powered off after the module.

How it boots (see ../shared/reference/infra.md section 6): there is no systemd or dbus on the
host, so nspawn runs with ``--register=no --keep-unit`` in a session of its own, and shares the
host's network (servers on the host's 127.0.0.1 are reachable from inside). Commands enter all
of the container's namespaces with ``nsenter -t <its systemd> -a``.

Measured on the 2-vCPU CI machine: debootstrap plus tarball 76 s, once (cached in
``$STUDIO_AGENT_TEST_CACHE``, default /var/cache/studio-agent-tests, outside the repo so that
clean clones reuse it; keyed by a hash of ``RECIPE``); the tarball is 255 MiB and extracts in
1.4 s; boot to ``running`` 0.7 s; ``install_agent_from_source`` 8 s (wheel build aside: the
locked dependencies' wheels are cached in .cache/wheelhouse by the lock's hash); poweroff 0.2 s.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-venv,python3-apt,ca-certificates,procps,"
    "iproute2,less"
)
# Bump to rebuild every cached rootfs when the steps below change.
RECIPE = f"v1 {SUITE} {MIRROR} minbase {PACKAGES}"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # the TLS-intercepting proxy's CA is in it
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # never the host's pyenv shims
REPO = Path(__file__).resolve().parents[2]
VENV = "/opt/venvs/studio-agent"
_names = itertools.count()


def cache_dir() -> Path:
    return Path(os.environ.get("STUDIO_AGENT_TEST_CACHE", "/var/cache/studio-agent-tests"))


def require_tools() -> None:
    """Fail (not skip) with what to install when the host cannot boot a container."""
    missing = [t for t in ("systemd-nspawn", "debootstrap", "nsenter") if not shutil.which(t)]
    if missing:
        pytest.fail(
            f"system tests need {', '.join(missing)}: "
            "apt-get install --no-install-recommends systemd-container debootstrap, as .ci/run does"
        )
    if os.geteuid() != 0:
        pytest.fail("system tests boot systemd-nspawn containers and must run as root")


def ensure_rootfs() -> Path:
    """The bookworm rootfs tarball for ``RECIPE``, built once per machine (flock-serialized)."""
    digest = hashlib.sha256(RECIPE.encode()).hexdigest()[:12]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"rootfs-{digest}.tar"
    with open(cache / f"rootfs-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second pytest waits for the first one's build
        if not tarball.exists():
            _build_rootfs(tarball)
    return tarball


def _build_rootfs(tarball: Path) -> None:
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="build-") as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root), MIRROR],
            check=True,
            stdout=subprocess.DEVNULL,
            env={"PATH": PATH, "LANG": "C.UTF-8"},
        )
        # The .debs debootstrap kept are not needed; the package lists stay (apt install works).
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (root / "etc/hostname").write_text("studio-test\n")
        # No getty on a console nobody reads; nothing else in minbase slows the boot.
        (root / "etc/systemd/system/getty.target").symlink_to("/dev/null")
        partial = tarball.with_suffix(".partial")
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
            check=True,
        )
        partial.rename(tarball)  # atomic: a half-written tarball is never used


class Container:
    """One booted bookworm with systemd as PID 1. Always ``close()`` it (the fixture does)."""

    def __init__(self, root: Path, name: str):
        self.root = root
        self.name = name
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's systemd, as a host pid
        self._guard: subprocess.Popen[bytes] | None = None
        self._console = root.parent / f"{name}.console.log"

    @classmethod
    def create(cls, workdir: Path, name: str = "") -> Container:
        root = workdir / "rootfs"
        root.mkdir(parents=True)
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-xf", str(ensure_rootfs())],
            check=True,
        )
        if HOST_CA.is_file():  # pip and https inside go through the host's proxy
            shutil.copyfile(HOST_CA, root / "etc/ssl/certs/ca-certificates.crt")
        return cls(root, name or f"sa-test-{os.getpid()}-{next(_names)}")

    def boot(self, timeout: float = 60) -> None:
        command = ["systemd-nspawn", "-D", str(self.root), "-b", "--register=no", "--keep-unit"]
        command += ["--console=passive", "-M", self.name]
        with open(self._console, "wb") as console:
            self.nspawn = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # setsid: nspawn wants a session of its own
                env={"PATH": PATH},
            )
        atexit.register(self.close)
        deadline = time.monotonic() + timeout
        while not self.leader or not self._system_running():
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"container {self.name} did not boot:\n{self.console()}")
            self.leader = self.leader or _child_systemd(self.nspawn.pid)
            time.sleep(0.05)
        self._start_guard()

    def _start_guard(self) -> None:
        """A shell that kills the container if pytest dies without closing it (SIGKILL, CI).

        Its stdin is a pipe from this process: a line means "closed cleanly", EOF means we died.
        """
        assert self.nspawn is not None
        script = 'read -r _ && exit 0; kill -9 "$1"; kill -9 -- "-$2"'
        self._guard = subprocess.Popen(
            ["sh", "-c", script, "guard", str(self.leader), str(self.nspawn.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _system_running(self) -> bool:
        state = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
        return state.stdout.strip() in ("running", "degraded")

    def console(self) -> str:
        return self._console.read_text(errors="replace") if self._console.exists() else ""

    def run(
        self,
        cmd: str | Sequence[str],
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (a shell line, or argv) inside; output is text, stderr kept apart."""
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        proc = subprocess.run(
            [*self._enter(), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"},
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in {self.name}: {argv} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def _enter(self) -> list[str]:
        if not self.leader:
            raise RuntimeError(f"container {self.name} is not running")
        return ["nsenter", "-t", str(self.leader), "-a"]

    def copy_in(self, host_path: Path, container_path: str) -> None:
        """Copy a file or a directory's contents to ``container_path`` (created), owned by root.

        Streamed through tar inside the container, so symlinks in the rootfs resolve there.
        """
        src = Path(host_path)
        parent = container_path if src.is_dir() else str(Path(container_path).parent)
        self.run(["mkdir", "-p", parent])
        if src.is_dir():
            pack = ["tar", "-C", str(src), "-cf", "-", "."]
            unpack = ["tar", "--no-same-owner", "-C", container_path, "-xf", "-"]
        else:
            pack = ["cat", str(src)]
            unpack = ["sh", "-c", 'cat > "$0"', container_path]
        with subprocess.Popen(pack, stdout=subprocess.PIPE) as packer:
            subprocess.run([*self._enter(), *unpack], stdin=packer.stdout, check=True, timeout=300)
        if packer.returncode != 0:
            raise AssertionError(f"copying {src} into {self.name} failed")

    def write_file(self, container_path: str, text: str, mode: str = "0644") -> None:
        self.run(["mkdir", "-p", str(Path(container_path).parent)])
        self.run(["sh", "-c", 'cat > "$0" && chmod "$1" "$0"', container_path, mode], input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit`` as a dict."""
        out = self.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *matches: str) -> list[dict[str, str]]:
        """The unit's journal entries (``journalctl -o json``), filtered by ``FIELD=value``."""
        out = self.run(["journalctl", "--no-pager", "-o", "json", "-u", unit, *matches]).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def poweroff(self, timeout: float = 30) -> None:
        """A clean shutdown (about 1.6 s); killed if it does not finish in ``timeout``."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
        try:
            self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        assert self.nspawn is not None
        if self.leader:  # SIGKILL to a pid namespace's init ends every process in it
            _signal(self.leader, signal.SIGKILL)
        _signal(-self.nspawn.pid, signal.SIGKILL)
        self.nspawn.wait(30)

    def close(self) -> None:
        """Power off (or kill), then remove the rootfs copy. Safe to call twice."""
        try:
            self.poweroff()
        except Exception:
            self._kill()
        finally:
            self.leader = 0
            atexit.unregister(self.close)
            self._stop_guard()
        shutil.rmtree(self.root.parent, ignore_errors=True)

    def _stop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None and guard.stdin is not None:
            try:
                guard.stdin.write(b"closed\n")
                guard.stdin.close()
            except BrokenPipeError:
                pass
            guard.wait(10)


def _child_systemd(nspawn_pid: int) -> int:
    found = subprocess.run(
        ["pgrep", "-P", str(nspawn_pid), "-x", "systemd"], capture_output=True, text=True
    )
    return int(found.stdout.split()[0]) if found.returncode == 0 else 0


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- the agent, installed from this checkout ----------------------------------------------------


def wheelhouse(workdir: Path) -> Path:
    """Wheels for requirements/runtime.lock (cached by the lock's hash) plus this checkout's."""
    lock = REPO / "requirements/runtime.lock"
    deps = REPO / ".cache/wheelhouse" / hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    pip = [str(REPO / ".venv/bin/pip"), "--disable-pip-version-check", "-q"]
    if not (deps / ".complete").exists():
        deps.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*pip, "wheel", "--require-hashes", "-r", str(lock), "-w", str(deps)], check=True
        )
        (deps / ".complete").touch()
    house = workdir / "wheelhouse"
    shutil.copytree(deps, house, ignore=shutil.ignore_patterns(".complete"))
    # Built from a copy: pip builds in the source tree, and other builds may share this checkout.
    source = workdir / "source"
    shutil.copytree(REPO / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(house), str(source)], check=True)
    return house


def install_agent_from_source(container: Container, house: Path | None = None) -> None:
    """Install the agent as the .deb lays it out: venv, /usr/bin link, system user.

    ``house`` is a ``wheelhouse()`` (the ``agent_wheelhouse`` fixture); built here if not given.
    """
    if house is None:
        house = wheelhouse(Path(tempfile.mkdtemp(dir=container.root.parent, prefix="wheels-")))
    container.copy_in(house, "/tmp/wheelhouse")
    container.run(["python3", "-m", "venv", VENV])
    pip = [f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index"]
    container.run([*pip, "--find-links", "/tmp/wheelhouse", "studio-agent"], timeout=300)
    container.run(["ln", "-sf", f"{VENV}/bin/studio-agent", "/usr/bin/studio-agent"])
    container.run(
        "getent passwd studio-agent >/dev/null || useradd --system --user-group "
        "--home-dir /var/lib/studio-agent --no-create-home --shell /usr/sbin/nologin studio-agent"
    )
    container.run(["rm", "-rf", "/tmp/wheelhouse"])


@pytest.fixture(scope="session")
def agent_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's agent wheel with its locked dependencies, built once per session."""
    return wheelhouse(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def nspawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted bookworm container with systemd as PID 1, shared by one test module."""
    require_tools()
    container = Container.create(tmp_path_factory.mktemp("nspawn"))
    try:
        container.boot()
        yield container
    finally:
        container.close()
