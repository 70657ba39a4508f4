"""Hostile messages published to RabbitMQ, with S3 storage, against one running agent.

Each class of attack from the hostile-message corpus is published as an attacker with publish
rights would; each must be set aside with a reason that names it, nothing may be read from or
written to the host, nothing may land in the bucket outside ``experiments/<key>/``, and the agent
must go on serving: an honest experiment published last completes.
"""

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentProcess, Layout, wait_until
from tests.integration.test_rabbitmq_agent import publish, rmq_layout
from tests.s3_requests import s3_message
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.s3]

QUEUE = "rmq_hostile"
SECRET = "root-only-secret-7f3a"
HELLO = "print('hello from an honest experiment')\n"


def artifact(message: dict[str, Any], label: str) -> dict[str, Any]:
    found: dict[str, Any] = message["experiment"]["artifacts"][label]
    return found


def hostile_corpus(base: dict[str, Any], secret: Path, target: Path) -> dict[str, bytes]:
    """One message per class, keyed by the words its rejection must contain."""

    def variant(change: Callable[[dict[str, Any]], None]) -> bytes:
        message = copy.deepcopy(base)
        change(message)
        return json.dumps(message).encode()

    key = base["experiment"]["key"]
    return {
        "local storage": variant(
            lambda m: artifact(m, "workspace").update(qualified=f"file://{secret}")
        ),
        "is refused: only a message from a local queue": variant(
            lambda m: artifact(m, "output").update(qualified=f"file://{target}")
        ),
        "'..' segment": variant(
            lambda m: artifact(m, "output").update(
                key=f"experiments/{key}/../../../../tmp/owned.tar"
            )
        ),
        "nests": b'{"experiment": {"key": "deep", "info": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        "objects and arrays": b'{"experiment": {"key": "wide", "info": ['
        + b"[]," * 1_000_000
        + b"[]]}}",
        "max_message_size": variant(lambda m: m["experiment"].update(args=["x" * 1000] * 20_000)),
        "args total": variant(lambda m: m["experiment"].update(args=["y" * 100_000] * 12)),
        "experiment.filename": variant(lambda m: m["experiment"].update(filename="../../bin/sh")),
        "resources_needed.gpus": variant(
            lambda m: m["experiment"]["resources_needed"].update(gpus=-1)
        ),
        "storage scheme 'ftp'": variant(
            lambda m: artifact(m, "workspace").update(qualified="ftp://127.0.0.1/b/k.tar")
        ),
        "link-local or metadata": variant(
            lambda m: artifact(m, "workspace").update(
                qualified="s3://169.254.169.254/latest/meta-data.tar"
            )
        ),
    }


def bucket_keys(s3: S3Server) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket="agent-tests")
    return [item["Key"] for item in listing.get("Contents", [])]


def rejections(lay: Layout) -> list[str]:
    folder = lay.state_dir / "rejected"
    return [json.loads(p.read_text())["reason"] for p in sorted(folder.glob("*.reason.json"))]


def test_each_hostile_class_is_set_aside_and_the_agent_serves_on(
    rabbitmq: RabbitBroker,
    s3_server: S3Server,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    secret = tmp_path / "shadow"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    target = tmp_path / "written-by-agent.tar"
    base = json.loads(s3_message(s3_server, "hostile1", HELLO, [], tmp_path))
    base["experiment"]["resources_needed"] = {"cpus": 1, "gpus": 0, "ram": "1gb", "hdd": "1gb"}
    corpus = hostile_corpus(base, secret, target)
    lay = rmq_layout(layout, rabbitmq, QUEUE, keep_workdir=True, broker_local_storage=[])
    agent = start_agent(lay)
    for body in corpus.values():
        publish(rabbitmq, QUEUE, body)
    wait_until(lambda: len(rejections(lay)) == len(corpus), timeout=120, what="all set aside")

    honest = json.loads(s3_message(s3_server, "honest1", HELLO, [], tmp_path))
    publish(rabbitmq, QUEUE, json.dumps(honest).encode())
    wait_until(lambda: "honest1/output.tar" in " ".join(bucket_keys(s3_server)), 120, "results")
    assert agent.proc.poll() is None  # nothing crashed it
    assert agent.stop() == 0

    reasons = rejections(lay)
    for words in corpus:
        assert any(words in reason for reason in reasons), (words, reasons)
    assert not target.exists()
    assert not Path("/tmp/owned.tar").exists()
    for folder in (lay.state_dir / "work", lay.state_dir / "storage"):
        for path in folder.rglob("*") if folder.exists() else []:
            assert not path.is_file() or SECRET not in path.read_text(errors="replace")
    keys = bucket_keys(s3_server)
    # The bucket is the session's (other tests' objects are there too), but none of these.
    assert not [k for k in keys if k.startswith("experiments/hostile1/")]  # none ran, none wrote
    assert not [k for k in keys if "owned" in k or ".." in k.split("/")], keys
    assert "experiments/honest1/output.tar" in keys
    for kept in (lay.state_dir / "rejected").iterdir():
        assert kept.stat().st_mode & 0o077 == 0 or kept.suffix == ".json"
    assert os.stat(lay.state_dir).st_mode & 0o077 == 0
