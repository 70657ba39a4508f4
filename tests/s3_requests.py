"""Requests whose artifacts live in the test S3 server, shaped like the 0.0.49 client's."""

import io
import json
import time
from pathlib import Path

from agent.storage.archive import pack_directory
from tests.conftest import write_workspace
from tests.services.s3 import S3Server


def s3_message(s3: S3Server, key: str, script: str, args: list[str], tmp_path: Path) -> bytes:
    """A 0.0.49-style request whose artifacts live in the S3 server, workspace uploaded."""
    bucket = s3.make_bucket("agent-tests")
    workspace = write_workspace(tmp_path / f"ws-{key}", script)
    host = s3.endpoint.partition("://")[2]  # qualified URLs lose the scheme (http or https)
    aws = {"access_key": s3.access_key, "secret_access_key": s3.secret_key, "region": s3.region}
    s3.client().put_object(Bucket=bucket, Key=f"blobstore/{key}.tar", Body=_tar_of(workspace))
    artifacts = {
        "workspace": {"key": f"blobstore/{key}.tar", "mutable": False},
        "output": {"key": f"experiments/{key}/output.tar", "mutable": True},
        "modeldir": {"key": f"experiments/{key}/modeldir.tar", "mutable": True},
        "_metadata": {"key": f"experiments/{key}/_metadata.tar", "mutable": True},
    }
    for art in artifacts.values():
        art.update(bucket=bucket, qualified=f"s3://{host}/{bucket}/{art['key']}", unpack=True)
        art["credentials"] = {"aws": aws}
    storage = {"type": "s3", "endpoint": s3.endpoint, "bucket": bucket}
    message = {
        "experiment": {
            "key": key,
            "filename": "train.py",
            "args": args,
            "pythonver": "3",
            "time_added": time.time(),
            "artifacts": artifacts,
        },
        "config": {"storage": storage, "database": storage, "env": {}},
    }
    return json.dumps(message).encode()


def _tar_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    pack_directory(folder, buffer)
    return buffer.getvalue()
