"""``studio runs stop KEY`` from the real 0.0.49 client aborts the running experiment: over a
local queue with a local database, and over RabbitMQ with an S3 database. Its ``--config`` option
crashes in 0.0.49, so the client reads ``~/.studioml/config.yaml`` (HOME is the test's)."""

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    AgentProcess,
    Layout,
    client_env,
    client_read_back,
    wait_until,
    write_client_config,
)
from tests.integration.test_studioml_rmq_s3 import client_config, rabbitmq_layout, studio_run
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.studioml]

TRAIN = """
import time
print("before", flush=True)
time.sleep(300)
print("after")
"""


def stop_with_the_client(client_venv: Path, config: Path, env: dict[str, str], key: str) -> None:
    home = Path(env["HOME"])
    (home / ".studioml").mkdir(parents=True, exist_ok=True)
    shutil.copy(config, home / ".studioml" / "config.yaml")
    stopped = subprocess.run(
        [str(client_venv / "bin" / "studio-runs"), "stop", key],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=home,
    )
    assert stopped.returncode == 0, stopped.stderr[-2000:]


def check_stopped(agent: AgentProcess, key: str, paths: dict[str, str]) -> None:
    wait_until(lambda: f"experiment {key} aborted" in agent.log(), 60, "the abort")
    assert "its record says stopped (studio runs stop)" in agent.log()
    assert agent.stop() == 0
    output = (Path(paths["output"]) / "output").read_text()
    assert "before" in output
    assert "after" not in output


def workspace_of(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    return workspace


def local_client(
    client_venv: Path, layout: Callable[..., Layout], tmp_path: Path, **agent: object
) -> tuple[Layout, Path, Path, dict[str, str]]:
    """An agent and the client on one local queue root, local storage and a local database:
    the agent's layout, the client's config, its workspace and its environment."""
    home, store = tmp_path / "studiohome", tmp_path / "clientstore"
    lay = layout(queue_root=str(home / "queue"), local_storage=[str(store)], **agent)
    config = write_client_config(tmp_path / "client.yaml", store, saveWorkspaceFrequency="1m")
    store.mkdir()  # the client refuses a store root that does not exist
    env = {**client_env(client_venv, home), "HOME": str(tmp_path / "home")}
    return lay, config, workspace_of(tmp_path), env


def test_runs_stop_over_a_local_queue(
    client_venv: Path,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    lay, config, workspace, env = local_client(client_venv, layout, tmp_path, stop_check="1s")
    key = "stopme-local"
    studio_run(config, workspace, env, "local_stop", key)
    agent = start_agent(lay)
    wait_until(lambda: f"experiment {key} started as pid" in agent.log(), 180, "the run")
    time.sleep(1)  # its first line printed
    stop_with_the_client(client_venv, config, env, key)
    wait_until(lambda: f"experiment {key} aborted" in agent.log(), 60, "the abort")
    paths = client_read_back(client_venv, config, key, workspace, env, "output")
    assert paths["status"] == "stopped"
    check_stopped(agent, key, paths["paths"])
    assert lay.queue_files("local_stop") == []  # settled, never run again


@pytest.mark.rabbitmq
@pytest.mark.s3
def test_runs_stop_over_rabbitmq_and_s3(
    client_venv: Path,
    rabbitmq: RabbitBroker,
    s3_server: S3Server,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    config = client_config(tmp_path / "client.yaml", rabbitmq, s3_server)
    settings = yaml.safe_load(config.read_text())
    settings["database"]["bucket"] = s3_server.make_bucket("studioml-meta-stop")
    config.write_text(yaml.safe_dump(settings))
    workspace = workspace_of(tmp_path)
    env = {**client_env(client_venv, tmp_path / "studiohome"), "HOME": str(tmp_path / "home")}
    key = "stopme-rmq"
    studio_run(config, workspace, env, "rmq_stop", key)
    lay = rabbitmq_layout(layout, rabbitmq, "rmq_stop", stop_check="1s")
    agent = start_agent(lay)
    wait_until(lambda: f"experiment {key} started as pid" in agent.log(), 180, "the run")
    time.sleep(1)  # its first line printed
    stop_with_the_client(client_venv, config, env, key)
    wait_until(lambda: f"experiment {key} aborted" in agent.log(), 60, "the abort")
    paths = client_read_back(client_venv, config, key, workspace, env, "output")
    check_stopped(agent, key, paths["paths"])


def test_an_experiment_stopped_while_queued_never_starts(
    client_venv: Path,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    lay, config, workspace, env = local_client(client_venv, layout, tmp_path)
    key = "stopme-queued"
    studio_run(config, workspace, env, "local_stop", key)
    stop_with_the_client(client_venv, config, env, key)
    agent = start_agent(lay)
    wait_until(lambda: f"experiment {key} aborted" in agent.log(), 180, "the abort")
    assert agent.stop() == 0
    assert "before it started" in agent.log()
    assert f"experiment {key} started as pid" not in agent.log()
    assert lay.queue_files("local_stop") == []
    assert client_read_back(client_venv, config, key, workspace, env)["status"] == "stopped"
