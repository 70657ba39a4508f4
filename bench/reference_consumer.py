"""The minimal runner studio-agent is measured against on RabbitMQ + S3 (bench/overhead.py).

Written for the benchmark, as the least a runner can do and still be one: take a message
(prefetch 1), download its workspace from S3 and unpack it, run its script with a given
interpreter (a warm environment), upload the output as ``output.tar`` where the client reads it,
acknowledge. No custody journal, checkpoints, metadata, database record, sandbox, validation or
retries. Each acknowledgement appends a line to ``acks`` so the bench can count them.

Usage: ``python bench/reference_consumer.py AMQP_URL QUEUE PYTHON ACKS``; SIGTERM stops it.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import boto3
import pika

stopping = False


def on_sigterm(signum: int, frame: object) -> None:
    global stopping
    stopping = True


def s3_client(clients: dict[tuple[str, str], Any], message: dict[str, Any]) -> Any:
    """One client per endpoint and key, as the message's workspace artifact names them."""
    aws = message["experiment"]["artifacts"]["workspace"]["credentials"]["aws"]
    endpoint = message["config"]["storage"]["endpoint"]
    if (endpoint, aws["access_key"]) not in clients:
        clients[endpoint, aws["access_key"]] = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=aws["access_key"],
            aws_secret_access_key=aws["secret_access_key"],
            region_name=aws["region"],
        )
    return clients[endpoint, aws["access_key"]]


def run_experiment(s3: Any, experiment: dict[str, Any], python: str, work: Path) -> None:
    artifacts = experiment["artifacts"]
    workspace = artifacts["workspace"]
    body = s3.get_object(Bucket=workspace["bucket"], Key=workspace["key"])["Body"]
    with tarfile.open(fileobj=body, mode="r|*") as tar:
        tar.extractall(work, filter="data")
    output = work / "output.log"
    with output.open("wb") as out:
        argv = [python, experiment["filename"], *experiment["args"]]
        subprocess.run(argv, cwd=work, stdout=out, stderr=subprocess.STDOUT, check=False)
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        tar.add(output, arcname="output")
    target = artifacts["output"]
    s3.put_object(Bucket=target["bucket"], Key=target["key"], Body=packed.getvalue())


def main(argv: list[str]) -> int:
    amqp_url, queue, python, acks = argv
    signal.signal(signal.SIGTERM, on_sigterm)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    clients: dict[tuple[str, str], Any] = {}
    with open(acks, "a", buffering=1) as acked:
        for method, _properties, body in channel.consume(queue, inactivity_timeout=0.5):
            if stopping:
                break
            if method is None:
                continue
            message = json.loads(body)
            work = Path(tempfile.mkdtemp(prefix="reference-"))
            try:
                run_experiment(s3_client(clients, message), message["experiment"], python, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            channel.basic_ack(method.delivery_tag)
            acked.write(f"{message['experiment']['key']}\n")
    channel.cancel()
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
