"""Real virtualenv builds with uv and pip, from PyPI: reuse, concurrency, failure and eviction."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from agent.errors import EnvironmentFailed
from agent.executors.base import RunContext
from agent.executors.envcache import EnvCache, EnvLease, EnvSpec, marker_of
from agent.executors.pythonenv import Interpreter, discover_interpreters
from agent.executors.venv import VenvExecutor
from agent.request import Request

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Small, pure Python, and not a dependency of the agent or its test tools: if the agent's own
# interpreter can import it, the experiment's packages have leaked into the agent.
PACKAGE, MODULE = "tomli-w==1.0.0", "tomli_w"
OTHER_PACKAGE, OTHER_MODULE = "text-unidecode==1.3", "text_unidecode"


@pytest.fixture(scope="module")
def interpreter() -> Interpreter:
    return discover_interpreters([Path(sys.executable)])[0]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[BinaryIO]:
    with (tmp_path / "output").open("ab") as handle:
        yield handle


def _log_text(tmp_path: Path) -> str:
    return (tmp_path / "output").read_text(errors="replace")


def _imports(python: Path | str, module: str) -> bool:
    done = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False)
    return done.returncode == 0


def _env_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_uv_build_is_isolated_and_reused(
    tmp_path: Path, interpreter: Interpreter, log: BinaryIO
) -> None:
    assert importlib.util.find_spec(MODULE) is None, f"{MODULE} must not be in the agent's env"
    cache = EnvCache(tmp_path / "envs", 0, "uv")
    first = cache.acquire(interpreter, [PACKAGE], [], log)
    assert not first.hit
    assert first.python == first.path / "bin" / "python"
    assert _imports(first.python, MODULE)
    assert not _imports(sys.executable, MODULE)
    marker = json.loads(marker_of(first.path).read_text())
    assert marker["requirements"] == [PACKAGE]
    assert marker["size_bytes"] > 0

    second = cache.acquire(interpreter, [PACKAGE], [], log)
    assert second.hit
    assert second.path == first.path
    assert json.loads(marker_of(first.path).read_text()) == marker  # the same build
    text = _log_text(tmp_path)
    building = f"with uv for Python {interpreter.version_text} (1 packages)"
    assert text.count("studio-agent: building environment") == 1
    assert building in text
    assert "studio-agent: reusing environment" in text
    for lease in (first, second, first):  # release is idempotent
        lease.release()


def test_pip_build_installs_requirements_then_config_pip(
    tmp_path: Path, interpreter: Interpreter, log: BinaryIO
) -> None:
    cache = EnvCache(tmp_path / "envs", 0, "pip")
    with cache.acquire(interpreter, [PACKAGE], [OTHER_PACKAGE], log) as lease:
        assert not lease.hit
        assert _imports(lease.python, MODULE)
        assert _imports(lease.python, OTHER_MODULE)
        assert not _imports(sys.executable, MODULE)
    text = _log_text(tmp_path)
    assert f"with pip for Python {interpreter.version_text} (2 packages)" in text
    assert text.index("installed tomli-w") < text.index("installed text-unidecode")


def test_two_threads_build_once(tmp_path: Path, interpreter: Interpreter, log: BinaryIO) -> None:
    cache = EnvCache(tmp_path / "envs", 0, "uv")
    barrier = threading.Barrier(2)
    leases: list[EnvLease] = []

    def acquire() -> None:
        barrier.wait()
        leases.append(cache.acquire(interpreter, [PACKAGE], [], log))

    # Daemon threads: a lock bug shows up as a failed assertion, not as a hung test run.
    threads = [threading.Thread(target=acquire, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(lease.hit for lease in leases) == [False, True]
    assert _log_text(tmp_path).count("building environment") == 1
    for lease in leases:
        lease.release()


_PROCESS_SCRIPT = """
import sys
from pathlib import Path
from agent.executors.envcache import EnvCache
from agent.executors.pythonenv import Interpreter
root, path, version, requirement, log_path = sys.argv[1:]
interpreter = Interpreter(Path(path), tuple(int(p) for p in version.split(".")))
with open(log_path, "ab") as log:
    lease = EnvCache(Path(root), 0, "uv").acquire(interpreter, [requirement], [], log)
print("hit" if lease.hit else "built")
"""


def test_two_processes_build_once(tmp_path: Path, interpreter: Interpreter) -> None:
    args = [str(tmp_path / "envs"), str(interpreter.path), interpreter.version_text, PACKAGE]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_SCRIPT, *args, str(tmp_path / f"log{n}")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    results = sorted(proc.communicate(timeout=120)[0].strip() for proc in procs)
    assert results == ["built", "hit"]


def test_failed_install_leaves_nothing_behind(
    tmp_path: Path, interpreter: Interpreter, log: BinaryIO
) -> None:
    root = tmp_path / "envs"
    cache = EnvCache(root, 0, "uv")
    missing = "this-package-does-not-exist-xyz==9.9.9"
    with pytest.raises(EnvironmentFailed) as caught:
        cache.acquire(interpreter, [missing], [], log)
    message = str(caught.value)
    assert "uv pip install failed with exit code" in message
    assert "this-package-does-not-exist-xyz" in message
    assert "this-package-does-not-exist-xyz was not found" in _log_text(tmp_path)
    assert _env_dirs(root) == set()


def test_unfinished_build_is_removed_and_rebuilt(
    tmp_path: Path, interpreter: Interpreter, log: BinaryIO
) -> None:
    cache = EnvCache(tmp_path / "envs", 0, "uv")
    with cache.acquire(interpreter, [PACKAGE], [], log) as lease:
        marker_of(lease.path).unlink()  # as if the agent died before the build finished
    with cache.acquire(interpreter, [PACKAGE], [], log) as again:
        assert not again.hit
        assert _imports(again.python, MODULE)
    assert "removing the unfinished build" in _log_text(tmp_path)


def test_eviction_keeps_leased_and_new_envs(
    tmp_path: Path, interpreter: Interpreter, log: BinaryIO
) -> None:
    root = tmp_path / "envs"
    cache = EnvCache(root, 1, "uv")
    leased = cache.acquire(interpreter, [PACKAGE], [], log)
    cache.acquire(interpreter, [OTHER_PACKAGE], [], log).release()
    newest = cache.acquire(interpreter, [], [], log)
    idle_key = EnvSpec(interpreter, (OTHER_PACKAGE,), ()).key
    assert _env_dirs(root) == {leased.path.name, newest.path.name}
    assert not (root / f"{idle_key}.lock").exists()
    assert _imports(leased.python, MODULE)
    leased.release()
    newest.release()


def test_eviction_drops_the_least_recently_used_first(
    tmp_path: Path, interpreter: Interpreter, log: BinaryIO
) -> None:
    root = tmp_path / "envs"
    cache = EnvCache(root, 0, "uv")
    older = cache.acquire(interpreter, [PACKAGE], [], log)
    newer = cache.acquire(interpreter, [OTHER_PACKAGE], [], log)
    older.release()
    newer.release()
    os.utime(marker_of(older.path), (1_000_000, 1_000_000))
    sizes = {
        path.name: json.loads(marker_of(path).read_text())["size_bytes"]
        for path in (older.path, newer.path)
    }
    # The new, empty env is smaller than either, so dropping one of them is enough: the older.
    cache.max_bytes = sum(sizes.values()) - 1
    cache.acquire(interpreter, [], [], log).release()
    assert older.path.name not in _env_dirs(root)
    assert newer.path.name in _env_dirs(root)


def _request(**experiment: object) -> Request:
    return Request.model_validate(
        {"experiment": {"key": "exp1", **experiment}, "config": {"pip": []}}
    )


def _context(tmp_path: Path, request: Request) -> RunContext:
    home = tmp_path / "home"
    return RunContext(request, home, home / "experiments" / request.key / "output" / "output")


def test_executor_prepares_a_runnable_launch(tmp_path: Path, interpreter: Interpreter) -> None:
    executor = VenvExecutor(EnvCache(tmp_path / "envs", 0, "uv"), [interpreter.path])
    request = _request(
        filename="show.py",
        args=["'hello world'", "2"],
        pythonenv=["studioml==0.0.49", "pkg-resources==0.0.0", PACKAGE],
        pythonver=".".join(map(str, interpreter.version[:2])),
    )
    ctx = _context(tmp_path, request)
    ctx.workspace.mkdir(parents=True)
    script = f"import sys, {MODULE}; print(sys.argv[1:], sys.prefix)\n"
    (ctx.workspace / "show.py").write_text(script)
    launch = executor.prepare(ctx, {"PATH": "/usr/bin:/bin"})
    venv = Path(launch.env["VIRTUAL_ENV"])
    assert launch.argv == [str(venv / "bin" / "python"), "show.py", "hello world", "2"]
    assert launch.env["PATH"] == f"{venv}/bin:/usr/bin:/bin"
    done = subprocess.run(
        launch.argv, cwd=ctx.workspace, env=launch.env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"['hello world', '2'] {venv}"
    output = ctx.output_file.read_text()
    assert "studio-agent: dropped 'studioml==0.0.49': the agent does not install" in output
    assert "studio-agent: dropped 'pkg-resources==0.0.0'" in output
    launch.release()
    launch.release()


def test_executor_names_a_missing_python_version(tmp_path: Path) -> None:
    executor = VenvExecutor(EnvCache(tmp_path / "envs", 0, "uv"))
    ctx = _context(tmp_path, _request(filename="a.py", pythonver="2.1"))
    with pytest.raises(EnvironmentFailed, match=r"pythonver 2\.1 was requested; this host has 3\."):
        executor.prepare(ctx, {})
    assert _env_dirs(tmp_path / "envs") == set()


def test_executor_needs_a_filename(tmp_path: Path) -> None:
    executor = VenvExecutor(EnvCache(tmp_path / "envs", 0, "uv"))
    ctx = _context(tmp_path, _request())
    with pytest.raises(
        EnvironmentFailed, match="container-only requests need executor singularity"
    ):
        executor.prepare(ctx, {})


def test_installer_options_from_a_request_never_reach_the_installer(
    tmp_path: Path, interpreter: Interpreter
) -> None:
    """``-r FILE`` in config.pip would make uv read a host file and print it in its error."""
    secret = tmp_path / "credential"
    secret.write_text("amqp://team:hunter2@broker:5672/%2f\n")
    secret.chmod(0o600)
    executor = VenvExecutor(EnvCache(tmp_path / "envs", 0, "uv"), [interpreter.path])
    request = Request.model_validate(
        {
            "experiment": {
                "key": "exp1",
                "filename": "a.py",
                "pythonenv": [f"-c {secret}", f"pkg @ {secret}"],
                "pythonver": ".".join(map(str, interpreter.version[:2])),
            },
            "config": {"pip": [f"-r {secret}"]},
        }
    )
    ctx = _context(tmp_path, request)
    launch = executor.prepare(ctx, {"PATH": "/usr/bin:/bin"})
    launch.release()
    output = ctx.output_file.read_text()
    assert "hunter2" not in output
    assert f"config.pip: dropped '-r {secret}': installer options are not accepted" in output
    assert f"dropped '-c {secret}'" in output
    assert f"dropped 'pkg @ {secret}': a local path" in output


def test_only_the_agents_marker_beside_an_env_makes_it_complete(
    tmp_path: Path, interpreter: Interpreter, log: BinaryIO
) -> None:
    root = tmp_path / "envs"
    cache = EnvCache(root, 0, "uv")
    with cache.acquire(interpreter, [PACKAGE], [], log) as lease:
        marker = marker_of(lease.path)
        assert marker.parent == root  # beside the env, where no build may write
        record = marker.read_text()
        marker.unlink()
        # What a build (the request's identity) could plant inside its env passes for nothing.
        (lease.path / ".complete").write_text(record)
        (lease.path / f"{lease.path.name}.json").write_text(record)
    # A new agent finds an env no marker vouches for and no one holds: it removes it at start.
    EnvCache(root, 0, "uv")
    assert _env_dirs(root) == set()
    with cache.acquire(interpreter, [PACKAGE], [], log) as again:
        assert not again.hit
        assert _imports(again.python, MODULE)
