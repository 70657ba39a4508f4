"""One agent, three credentials dropped into its certs directory: RabbitMQ, SQS and Pub/Sub
served at once, each experiment run and acknowledged."""

import json
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from agent.request import Request
from agent.submit import Submission, prepare
from tests.conftest import AgentProcess, Layout, wait_until, write_workspace
from tests.integration.test_rabbitmq_agent import finished, publish, queue_depth
from tests.services.pubsub import PubSubEmulator
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.sqs, pytest.mark.pubsub]

SCRIPT = "import os\nprint('hello from', os.environ['STUDIOML_EXPERIMENT'])\n"


def private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(text)
    path.chmod(0o600)


def message(lay: Layout, queue: str) -> tuple[Request, bytes]:
    workspace = write_workspace(lay.root / f"ws-{queue}", SCRIPT)
    body = prepare(Submission(workspace, "train.py", [], queue, lay.queue_root, lay.storage))
    return Request.model_validate(body), json.dumps(body).encode()


def test_rabbitmq_sqs_and_pubsub_at_once(
    rabbitmq: RabbitBroker,
    s3_server: S3Server,
    pubsub_emulator: PubSubEmulator,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
) -> None:
    lay = layout(
        queue_match="^(rmq_three|sqs_three|pubsub_three)$",
        pubsub_emulator_host=pubsub_emulator.host,
        amqp_refresh="1s",
        max_concurrent=3,
    )
    certs = lay.root / "certs"
    private(certs / "rabbitmq" / "broker", f"{rabbitmq.amqp_url}\n{rabbitmq.mgmt_url}\n")
    aws = f"[default]\naws_access_key_id = {s3_server.access_key}\n"
    private(
        certs / "sqs" / "aws" / "credentials",
        aws + f"aws_secret_access_key = {s3_server.secret_key}\n",
    )
    private(
        certs / "sqs" / "aws" / "config",
        f"[default]\nregion = {s3_server.region}\nendpoint_url = {s3_server.endpoint}\n",
    )
    private(
        certs / "pubsub" / "gcp.json",
        json.dumps({"type": "service_account", "project_id": pubsub_emulator.project}),
    )

    rmq_request, rmq_body = message(lay, "rmq_three")
    publish(rabbitmq, "rmq_three", rmq_body)
    sqs = boto3.client(
        "sqs",
        endpoint_url=s3_server.endpoint,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
    )
    url = sqs.create_queue(QueueName="sqs_three")["QueueUrl"]
    sqs_request, sqs_body = message(lay, "sqs_three")
    sqs.send_message(QueueUrl=url, MessageBody=sqs_body.decode())
    pubsub_emulator.create_topic_and_subscription("pubsub_three")
    pubsub_request, pubsub_body = message(lay, "pubsub_three")
    pubsub_emulator.publish("pubsub_three", pubsub_body)

    agent = start_agent(lay)
    requests = [rmq_request, sqs_request, pubsub_request]
    wait_until(lambda: all(finished(lay, r.key) for r in requests), timeout=120, what="all three")
    time.sleep(1)
    assert agent.stop() == 0
    log = agent.log()
    for ident in ("rabbitmq/broker", "sqs/aws", "pubsub/gcp"):
        assert f"credential {ident}: subscribing" in log
    assert s3_server.secret_key not in log
    assert queue_depth(rabbitmq, "rmq_three") == 0
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"  # deleted, not just held
    rabbitmq.delete_queue("rmq_three")
