"""The real services the benchmarks run against (RabbitMQ, moto for S3 and SQS, the Pub/Sub
emulator), started through the test suite's own helpers in tests/services."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pika

if TYPE_CHECKING:
    from tests.services.pubsub import PubSubEmulator
    from tests.services.rabbitmq import RabbitBroker
    from tests.services.s3 import S3Server

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Started:
    broker: RabbitBroker
    s3: S3Server  # moto: S3 and SQS; its request log is root/"moto.log"
    emulator: PubSubEmulator
    channel: Any  # a pika channel with publisher confirms, for publishing as the client does


def start(root: Path, stack: ExitStack) -> Started:
    """Broker, moto and emulator under ``root``; ``stack`` stops each on the way out."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/services is project code, not an installed package
    from tests.services.pubsub import EMULATOR, PubSubEmulator, _free_port
    from tests.services.rabbitmq import RABBITMQ_BIN, RabbitBroker, _free_port_block
    from tests.services.s3 import S3Server

    for needed in (RABBITMQ_BIN / "rabbitmq-server", EMULATOR):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: install it as the integration tests need")
    for name in ("rabbitmq", "pubsub"):
        (root / name).mkdir(parents=True)
    broker = RabbitBroker(root / "rabbitmq", _free_port_block())
    stack.callback(broker.close)
    s3 = S3Server(root / "moto.log")
    stack.callback(s3.stop)
    emulator = PubSubEmulator(root / "pubsub", _free_port())
    stack.callback(emulator.close)
    broker.start()
    s3.start()
    emulator.start()
    connection = pika.BlockingConnection(pika.URLParameters(f"{broker.amqp_url}?heartbeat=0"))
    stack.callback(connection.close)
    channel = connection.channel()
    channel.confirm_delivery()
    return Started(broker, s3, emulator, channel)


def sqs_client(s3: S3Server) -> Any:
    """The submitter's SQS client on moto."""
    return boto3.client(
        "sqs",
        endpoint_url=s3.endpoint,
        region_name=s3.region,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    )
