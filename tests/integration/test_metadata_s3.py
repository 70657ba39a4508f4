"""The ``_metadata`` artifact against the S3 server: per-run files, scrape content, two runs."""

import io
import json
import re
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.executors import build_executor
from agent.experiment import ExperimentRun
from agent.intake import parse_message
from agent.metadata_report import render_table, summarize
from tests.conftest import Layout
from tests.s3_requests import s3_message
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.s3]

MIXED = r"""
import json, sys
print("plain text line")
print(json.dumps({"experiment": {"loss": 0.9, "nested": {"acc": 0.1, "keep": "me"}}}))
print('{"experiment": {"loss": ')             # invalid JSON: a log line, nothing more
print(json.dumps([{"op": "add", "path": "/experiment/tags", "value": ["a"]}]))
print(json.dumps({"experiment": {"loss": 0.2441, "nested": {"acc": 0.9298}}}))
print(json.dumps([{"op": "add", "path": "/experiment/tags/-", "value": "b"}]))
print(json.dumps({"studioml": {"status": "hacked"}}))   # the agent's section: refused
print(json.dumps([{"op": "remove", "path": "/nope"}]))  # a failing patch: counted, ignored
block = ("x" * 99 + "\n") * 10000   # 1 MB of text per write
for _ in range(int(sys.argv[1])):
    sys.stdout.write(block)
print("the end")
"""


def run_once(lay: Layout, body: bytes, **settings: object) -> None:
    current = lay.settings().model_copy(update=settings)
    outcome = ExperimentRun(
        parse_message(body), current, build_executor(current), "local_meta"
    ).run()
    assert outcome.status == "completed", outcome.detail


def metadata_files(s3: S3Server, key: str) -> dict[str, bytes]:
    body = s3.client().get_object(Bucket="agent-tests", Key=f"experiments/{key}/_metadata.tar")
    with tarfile.open(fileobj=io.BytesIO(body["Body"].read())) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_one_run_writes_the_documented_files(
    s3_server: S3Server,
    layout: Callable[..., Layout],
    tmp_path: Path,
) -> None:
    lay = layout()
    body = s3_message(s3_server, "meta1", MIXED, ["100"], tmp_path)
    run_once(lay, body)
    files = metadata_files(s3_server, "meta1")
    names = sorted(files)
    assert len(names) == 4
    accession = re.fullmatch(r"output-(.+)\.log", names[0]).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"[A-Za-z0-9.-]+-[0-9A-Za-z]+", accession)
    assert names == [
        f"{kind}-{accession}.{ext}"
        for kind, ext in (
            ("output", "log"),
            ("request", "json"),
            ("runner", "log"),
            ("scrape", "json"),
        )
    ]

    output = files[f"output-{accession}.log"]
    assert b"\nplain text line\n" in output  # after the agent's own environment notes
    assert output.endswith(b"the end\n")
    assert len(output) > 100 * 10**6

    scrape = json.loads(files[f"scrape-{accession}.json"])
    assert list(scrape) == ["runner", "experiment", "studioml", "asset"]
    assert scrape["experiment"] == {
        "loss": 0.2441,
        "nested": {"acc": 0.9298, "keep": "me"},
        "tags": ["a", "b"],
    }
    assert scrape["studioml"] == {
        "key": "meta1",
        "project": None,
        "queue": "local_meta",
        "status": "completed",
    }
    runner = scrape["runner"]
    assert runner["exit_code"] == 0
    assert runner["stop"] >= runner["start"]
    assert runner["scrape"]["merged"] == 2
    assert runner["scrape"]["patched"] == 2
    assert runner["scrape"]["malformed"] >= 1
    assert runner["scrape"]["refused"] >= 1
    uuid.UUID(scrape["asset"]["id"])

    runner_log = files[f"runner-{accession}.log"].decode()
    assert "started as pid" in runner_log
    assert "stopped: completed" in runner_log

    request = json.loads(files[f"request-{accession}.json"])
    assert request["experiment"]["key"] == "meta1"
    for content in files.values():
        assert s3_server.secret_key.encode() not in content
        assert s3_server.access_key.encode() not in content

    rows = summarize([scrape])
    assert rows[0]["loss"] == 0.2441
    assert "meta1" in render_table(rows)


def test_two_runs_keep_two_sets(
    s3_server: S3Server,
    layout: Callable[..., Layout],
    tmp_path: Path,
) -> None:
    body = s3_message(s3_server, "meta2", MIXED, ["0"], tmp_path)
    run_once(layout(work_dir=str(tmp_path / "agent-a")), body)
    run_once(layout(work_dir=str(tmp_path / "agent-b")), body)
    files = metadata_files(s3_server, "meta2")
    scrapes = [json.loads(v) for k, v in files.items() if k.startswith("scrape-")]
    assert len(files) == 8
    outputs = [v for k, v in files.items() if k.startswith("output-")]
    assert all(o.count(b"the end\n") == 1 for o in outputs)  # each holds its own run only
    assert len({doc["asset"]["id"] for doc in scrapes}) == 2
    assert {doc["studioml"]["status"] for doc in scrapes} == {"completed"}


def test_go_layout_uploads_each_file_under_metadata(
    s3_server: S3Server,
    layout: Callable[..., Layout],
    tmp_path: Path,
) -> None:
    lay = layout()
    body = s3_message(s3_server, "meta3", MIXED, ["0"], tmp_path)
    run_once(lay, body, metadata_layout="go")
    listed = s3_server.client().list_objects_v2(Bucket="agent-tests", Prefix="metadata/")
    names = sorted(obj["Key"] for obj in listed.get("Contents", []))
    scrapes = [n for n in names if n.startswith("metadata/scrape-")]
    assert scrapes
    assert len([n for n in names if n.startswith("metadata/output-")]) == len(scrapes)
