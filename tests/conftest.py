"""Shared fixtures: an isolated agent layout per test, a real agent process, a real submitter."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import process
from agent.request import Request
from agent.settings import Settings, load_settings
from agent.submit import Submission, submit

# The real services, one of each per test session, shared by every module that asks for them.
from tests.services.apptainer import python_sif  # noqa: F401
from tests.services.nspawn import agent_wheelhouse, nspawn  # noqa: F401
from tests.services.pubsub import pubsub_emulator  # noqa: F401
from tests.services.rabbitmq import rabbitmq  # noqa: F401
from tests.services.s3 import s3_server, s3_tls_server  # noqa: F401
from tests.services.tls import tls_material  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def venv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One environment cache for the whole session: the second experiment finds it warm."""
    return tmp_path_factory.mktemp("cache")


@dataclass
class Layout:
    root: Path
    config: Path
    queue_root: Path
    state_dir: Path
    storage: Path

    def settings(self) -> Settings:
        return load_settings(self.config)

    def queue_files(self, queue: str) -> list[Path]:
        folder = self.queue_root / queue
        return (
            sorted(p for p in folder.iterdir() if p.name != "lock.lock") if folder.is_dir() else []
        )

    def results(self, key: str) -> Path:
        return self.storage / "artifacts" / "experiments" / key


@pytest.fixture
def layout(tmp_path: Path, venv_cache: Path) -> Callable[..., Layout]:
    def make(**overrides: object) -> Layout:
        config = {
            "queue_root": str(tmp_path / "queue"),
            "state_dir": str(tmp_path / "state"),
            "cache_dir": str(venv_cache),
            "drain_timeout": "60s",
            "kill_grace": "2s",
            "poll_interval": 0.05,
            "checkpoint_min_interval": "0s",
            "certs_dir": str(tmp_path / "certs"),
            # submit_script's store: local-queue messages may name it (agent.trust), and so may
            # broker messages here, as on a shared filesystem; tests of the default (brokers name
            # S3 only) set broker_local_storage back to [].
            "local_storage": [str(tmp_path / "store")],
            "broker_local_storage": [str(tmp_path / "store")],
            # A free port per agent: the default 127.0.0.1:9090 would collide between tests.
            "metrics_address": "127.0.0.1:0",
        }
        config.update(overrides)
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        return Layout(tmp_path, path, tmp_path / "queue", tmp_path / "state", tmp_path / "store")

    return make


def write_workspace(folder: Path, script: str, name: str = "train.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(script)
    return folder


def submit_script(
    lay: Layout, script: str, *args: str, queue: str = "local_test", **extra: object
) -> Request:
    """Enqueue ``script`` as train.py the way the 0.0.49 client would."""
    workspace = write_workspace(lay.root / f"ws-{time.monotonic_ns()}", script)
    return submit(
        Submission(
            workspace=workspace,
            script="train.py",
            args=list(args),
            queue=queue,
            queue_root=lay.queue_root,
            storage=lay.storage,
            **extra,  # type: ignore[arg-type]
        )
    )


class AgentProcess:
    """``studio-agent run`` as a real subprocess, so signals and exit codes are the real ones."""

    def __init__(self, config: Path, log: Path, extra_env: dict[str, str] | None = None):
        self.log_path = log
        self._log = log.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_AGENT_")}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged; agent log:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(lay: Layout, extra_env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(lay.config, tmp_path / f"agent-{len(started)}.log", extra_env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
        agent.proc.wait()
        agent._log.close()
        print(f"--- {agent.log_path.name} ---\n{agent.log()}")  # shown when the test failed


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = process._stat_fields(pid)
    return stat is not None and stat[0] != "Z"


def write_client_config(path: Path, store: Path, **extra: object) -> Path:
    """A studioml client config with local storage and database under ``store``."""
    config: dict[str, object] = {
        "database": {"type": "local", "endpoint": str(store), "bucket": "meta"},
        "storage": {"type": "local", "endpoint": str(store), "bucket": "artifacts"},
        "resources_needed": {"cpus": 1, "gpus": 0, "ram": "2gb", "hdd": "3gb"},
        **extra,
        "experimentLifetime": "30m",
        "verbose": "error",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(
    predicate: Callable[[], object], timeout: float = 60, what: str = "", interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def client_venv() -> Path:
    venv = Path(os.environ.get("STUDIOML_CLIENT", ROOT / ".cache" / "studioml-client"))
    if not (venv / "bin" / "studio-run").exists():
        pytest.fail(
            f"the studioml 0.0.49 client is not installed in {venv}: run `make studioml-client`"
        )
    return venv


def client_env(venv: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(
        PATH=f"{venv / 'bin'}:{env['PATH']}", STUDIOML_HOME=str(home), STUDIOML_DUMMY_MODE="1"
    )
    return env


_READ_BACK = """
import json, sys
from studio import model
config = model.get_config(sys.argv[1])
with model.get_db_provider(config) as db:
    experiment = db.get_experiment(sys.argv[2])
    paths = {label: db.get_artifact(experiment.artifacts[label]) for label in sys.argv[3:]}
print(json.dumps({"status": experiment.status, "paths": paths}))
"""


def client_read_back(
    venv: Path, config: Path, key: str, workspace: Path, env: dict[str, str], *labels: str
) -> dict[str, Any]:
    """What the studioml client's own code downloads: its record's status and each label's path."""
    read = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _READ_BACK, str(config), key, *labels],
        cwd=workspace,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result: dict[str, Any] = json.loads(read.stdout.strip().splitlines()[-1])
    return result
