"""``studio run --queue rmq_...`` from the real studioml 0.0.49 client, with a RabbitMQ broker and
an S3 server: the agent serves it and the client downloads the results with its own code."""

import json
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import AgentProcess, Layout, client_env, client_read_back, wait_until
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.studioml, pytest.mark.rabbitmq, pytest.mark.s3]

TRAIN = """
import json, os, pickle, sys
print("args", json.dumps(sys.argv[1:]))
print("path", os.environ["PATH"])
print("line with trailing spaces   ")
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
open(os.path.join(mapping["modeldir"], "weights.txt"), "w").write("w=42")
# What completion_service_client does when the retval artifact is a folder (the Go layout).
with open(os.path.join(mapping["retval"], "retval"), "wb") as out:
    pickle.dump({"answer": 42, "args": sys.argv[1:]}, out, protocol=2)
print("done")
"""


def client_config(path: Path, broker: RabbitBroker, s3: S3Server) -> Path:
    aws = {"access_key": s3.access_key, "secret_access_key": s3.secret_key, "region": s3.region}
    store = {"type": "s3", "endpoint": s3.endpoint, "credentials": {"aws": aws}}
    config = {
        "database": {**store, "bucket": s3.make_bucket("studioml-meta"), "authentication": "none"},
        "storage": {**store, "bucket": s3.make_bucket("studioml-artifacts")},
        "cloud": {"queue": {"rmq": broker.amqp_url}},
        "saveWorkspaceFrequency": "1m",
        "experimentLifetime": "30m",
        "resources_needed": {"cpus": 1, "gpus": 0, "ram": "2gb", "hdd": "3gb"},
        "env": {"AWS_DEFAULT_REGION": s3.region, "PATH": "%PATH%:/opt/extra/bin"},
        "verbose": "error",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def studio_run(
    config: Path, workspace: Path, env: dict[str, str], queue: str, key: str, *args: str
) -> None:
    """``studio run --queue QUEUE -e KEY train.py ARGS`` with the real client."""
    submit = [f"--config={config}", "--queue", queue, "-e", key, "train.py", *args]
    submitted = subprocess.run(
        ["studio-run", *submit], cwd=workspace, env=env, capture_output=True, text=True, timeout=180
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]


def rabbitmq_layout(
    layout: Callable[..., Layout], broker: RabbitBroker, queue: str, **overrides: object
) -> Layout:
    """An agent serving ``queue`` alone on ``broker``, discovering it within a second."""
    return layout(
        amqp_url=broker.amqp_url,
        amqp_mgmt_url=broker.mgmt_url,
        amqp_refresh="1s",
        queue_match=f"^{queue}$",
        **overrides,
    )


def test_client_submits_over_rabbitmq_and_reads_results_from_s3(
    client_venv: Path,
    rabbitmq: RabbitBroker,
    s3_server: S3Server,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    config = client_config(tmp_path / "client.yaml", rabbitmq, s3_server)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    env = client_env(client_venv, tmp_path / "studiohome")
    key = "rmqs3exp1"
    args = ["10", "hello world", "it's", "--lr=0.1"]
    studio_run(config, workspace, env, "rmq_e2e", key, *args)
    agent = start_agent(rabbitmq_layout(layout, rabbitmq, "rmq_e2e"))
    output_key = f"experiments/{key}/output.tar"
    s3 = s3_server.client()

    def uploaded() -> bool:
        listed = s3.list_objects_v2(Bucket="studioml-artifacts", Prefix=output_key)
        return bool(listed.get("KeyCount"))

    wait_until(uploaded, timeout=240, what="output.tar in the bucket")
    wait_until(lambda: "completed" in agent.log(), what="experiment completed")
    assert agent.stop() == 0

    labels = ("output", "modeldir", "retval")
    paths = client_read_back(client_venv, config, key, workspace, env, *labels)["paths"]
    output = (Path(paths["output"]) / "output").read_text()
    assert f"args {json.dumps(args)}\n" in output
    assert "line with trailing spaces   \ndone\n" in output
    path_line = next(line for line in output.splitlines() if line.startswith("path "))
    assert path_line.endswith(":/opt/extra/bin")
    assert "%" not in path_line
    assert (Path(paths["modeldir"]) / "weights.txt").read_text() == "w=42"
    retval = Path(paths["retval"])
    assert retval.is_file()  # a single "./retval" member: the completion-service contract
    assert pickle.loads(retval.read_bytes()) == {"answer": 42, "args": args}
