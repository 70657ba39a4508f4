"""The real studioml 0.0.49 client submits; the agent serves; the client reads the results back."""

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.intake import parse_message
from tests.conftest import (
    AgentProcess,
    Layout,
    client_env,
    client_read_back,
    wait_until,
    write_client_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.studioml]

TRAIN = """
import os, sys
print("training with", sys.argv[1:])
home, key = os.environ["STUDIOML_HOME"], os.environ["STUDIOML_EXPERIMENT"]
model_dir = os.path.join(home, "experiments", key, "modeldir")  # fs_tracker's layout
open(os.path.join(model_dir, "weights.txt"), "w").write("w=42")
print("done")
"""


def test_client_submission_served_and_read_back(
    client_venv: Path,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    home, store = tmp_path / "studiohome", tmp_path / "clientstore"
    lay = layout(queue_root=str(home / "queue"), local_storage=[str(store)])
    config = write_client_config(tmp_path / "client.yaml", store, saveWorkspaceFrequency="1m")
    store.mkdir()  # the client refuses a store root that does not exist
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    env = client_env(client_venv, home)
    key = "clientexp1"
    subprocess.run(
        [
            "studio-run",
            f"--config={config}",
            "--queue",
            "local_x",
            "-e",
            key,
            "train.py",
            "10",
            "hello world",
        ],
        cwd=workspace,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    [message] = (home / "queue" / "local_x").iterdir()
    raw = json.loads(message.read_bytes())
    request = parse_message(message.read_bytes())
    assert request.to_wire() == raw  # what the real client writes round-trips unchanged
    assert request.experiment.args == ["10", "'hello world'"]

    agent = start_agent(lay)
    record = store / "meta" / "experiments" / key
    wait_until(
        lambda: json.loads(record.read_text()).get("status") == "finished",
        timeout=240,
        what="finished",
    )
    assert agent.stop() == 0
    assert not list((home / "queue" / "local_x").iterdir())

    result = client_read_back(client_venv, config, key, workspace, env, "output", "modeldir")
    assert result["status"] == "finished"
    output = (Path(result["paths"]["output"]) / "output").read_text()
    assert "training with ['10', 'hello world']\ndone\n" in output
    assert (Path(result["paths"]["modeldir"]) / "weights.txt").read_text() == "w=42"
