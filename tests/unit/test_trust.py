"""Where a request may point, given who sent it (agent.trust, agent.storage.resolve)."""

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.errors import BadRequest, PermanentError
from agent.intake import parse_message
from agent.request import Artifact, Request, StudioConfig
from agent.settings import load_settings
from agent.storage import resolve
from agent.storage.base import StorageOptions
from agent.storage.local import LocalStorage
from agent.trust import check_request, storage_options

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "example_message_redacted.json"
REAL = json.loads(EXAMPLE.read_bytes())
BROKER = StorageOptions()


def real(**artifacts: dict[str, Any]) -> Request:
    message = copy.deepcopy(REAL)
    for label, fields in artifacts.items():
        message["experiment"]["artifacts"].setdefault(label, {}).update(fields)
    return parse_message(json.dumps(message).encode())


def local_request(store: Path, **artifact: Any) -> Request:
    config = {"storage": {"type": "local", "endpoint": str(store), "bucket": "artifacts"}}
    message = {"experiment": {"key": "k1", "artifacts": {"workspace": artifact}}, "config": config}
    return parse_message(json.dumps(message).encode())


def test_the_real_s3_message_passes_from_a_broker() -> None:
    check_request(real(), BROKER)


def test_a_broker_message_cannot_name_a_host_file() -> None:
    request = real(workspace={"qualified": "file:///etc/shadow", "key": None})
    with pytest.raises(BadRequest, match=r"local storage .* is refused"):
        check_request(request, BROKER)


def test_a_broker_message_cannot_name_a_local_store(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="only a message from a local queue"):
        check_request(local_request(tmp_path, key="blobstore/x.tar"), BROKER)


def test_a_local_message_may_name_only_the_listed_stores(tmp_path: Path) -> None:
    allowed = StorageOptions(local_roots=(tmp_path / "store",))
    check_request(local_request(tmp_path / "store", key="blobstore/x.tar"), allowed)
    with pytest.raises(BadRequest, match="outside the stores its source may name"):
        check_request(local_request(tmp_path / "other", key="blobstore/x.tar"), allowed)
    with pytest.raises(BadRequest, match="outside the stores its source may name"):
        check_request(local_request(Path("/etc"), key="shadow"), allowed)


def test_a_symlink_out_of_a_listed_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "artifacts").symlink_to("/etc")
    allowed = StorageOptions(local_roots=(tmp_path / "store",))
    with pytest.raises(BadRequest, match="outside the stores its source may name"):
        check_request(local_request(tmp_path / "store", key="shadow"), allowed)
    (tmp_path / "store2" / "artifacts").mkdir(parents=True)
    (tmp_path / "store2" / "artifacts" / "blobstore").symlink_to("/etc")
    store, key = resolve(
        "workspace",
        Artifact(key="blobstore/shadow"),
        local_request(tmp_path / "store2", key="x").config,
        StorageOptions(local_roots=(tmp_path / "store2",)),
    )
    assert isinstance(store, LocalStorage)
    with pytest.raises(PermanentError, match="leads out of the storage root"):
        store.path(key)


@pytest.mark.parametrize(
    "key",
    [
        "experiments/1795252526_dad3e62b-a594-4913-b64c-a0a13856cb14/../../../../tmp/owned.tar",
        "/experiments/x.tar",
        "experiments//x.tar",
        "experiments/./x.tar",
        "experiments/x\x07.tar",
    ],
)
def test_keys_that_climb_or_hide_are_refused(key: str) -> None:
    with pytest.raises(BadRequest, match="key"):
        check_request(real(output={"key": key}), BROKER)


def test_results_go_under_the_experiments_own_prefix() -> None:
    with pytest.raises(BadRequest, match="results go under experiments/"):
        check_request(real(modeldir={"key": "blobstore/overwritten.tar"}), BROKER)


def test_an_unknown_scheme_is_named() -> None:
    request = real(workspace={"qualified": "ftp://h/b/k.tar"})
    with pytest.raises(BadRequest, match="storage scheme 'ftp' is not supported"):
        check_request(request, BROKER)


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "[fe80::1]:80",
        "metadata.google.internal",
        "[::ffff:169.254.169.254]",
        "2852039166",  # the same address in the forms connect() accepts
        "0xa9fea9fe",
        "0251.0376.0251.0376",
        "169.254.43518",
    ],
)
def test_metadata_services_are_not_storage(host: str) -> None:
    request = real(workspace={"qualified": f"s3://{host}/latest/meta-data.tar"})
    with pytest.raises(BadRequest, match="link-local or metadata"):
        check_request(request, BROKER)


def test_s3_endpoints_restricts_the_servers() -> None:
    only = StorageOptions(s3_endpoints=("s3.example.org:9000",))
    with pytest.raises(BadRequest, match="not listed in s3_endpoints"):
        check_request(real(), only)
    check_request(real(), StorageOptions(s3_endpoints=("127.0.0.1:5123",)))


def test_bucket_names_cannot_climb() -> None:
    with pytest.raises(BadRequest, match="not a bucket name"):
        check_request(real(workspace={"bucket": ".."}), BROKER)


def test_an_image_path_from_a_broker_is_refused(tmp_path: Path) -> None:
    image = {"local": "/var/lib/images/x.sif", "mutable": False}
    with pytest.raises(BadRequest, match="an image path"):
        check_request(real(_singularity=image), BROKER)
    check_request(real(_singularity=image), StorageOptions(local_roots=(Path("/var/lib"),)))
    check_request(real(_singularity={"qualified": "docker://python:3.11"}), BROKER)


def test_the_source_decides_the_local_stores(tmp_path: Path) -> None:
    settings = load_settings(None, state_dir=tmp_path, certs_dir=None)
    assert storage_options(settings, local_source=True).local_roots == (tmp_path / "storage",)
    assert storage_options(settings, local_source=False).local_roots == ()


def test_a_disallowed_local_database_is_left_alone(tmp_path: Path) -> None:
    from agent.storage import database

    record = tmp_path / "meta" / "experiments" / "k1"
    record.parent.mkdir(parents=True)
    record.write_text('{"status": "waiting"}')
    config = StudioConfig.model_validate(
        {"database": {"type": "local", "endpoint": str(tmp_path), "bucket": "meta"}}
    )
    assert not database.mark_running(config, "k1", ())
    assert json.loads(record.read_text()) == {"status": "waiting"}
    assert database.mark_running(config, "k1", (tmp_path,))
    assert json.loads(record.read_text())["status"] == "running"


def test_a_shared_filesystem_can_be_opened_to_brokers(tmp_path: Path) -> None:
    settings = load_settings(None, state_dir=tmp_path, broker_local_storage=[str(tmp_path / "nfs")])
    broker = storage_options(settings, local_source=False)
    check_request(local_request(tmp_path / "nfs", key="blobstore/x.tar"), broker)
    with pytest.raises(BadRequest, match="outside the stores its source may name"):
        check_request(local_request(tmp_path / "storage", key="blobstore/x.tar"), broker)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"qualified": "s3://[::::]/b/k.tar"}, "bad S3"),
        ({"qualified": "s3://[1.2.3.4]/b/k.tar"}, "bad S3"),
    ],
)
def test_malformed_s3_urls_are_bad_requests(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(words)):
        check_request(real(output=fields), BROKER)


@pytest.mark.parametrize(
    "storage",
    [
        {"type": "s3", "endpoint": "http://[abc", "bucket": "b", "credentials": []},
        {"type": "s3", "endpoint": "http://h:99999", "bucket": "b"},
        {"type": "s3", "endpoint": "http://h", "bucket": "b", "credentials": "x"},
    ],
)
def test_a_malformed_storage_config_is_a_bad_request(storage: dict[str, Any]) -> None:
    message = {
        "experiment": {"key": "k1", "artifacts": {"workspace": {"key": "blobstore/x.tar"}}},
        "config": {"storage": storage},
    }
    with pytest.raises(BadRequest):
        check_request(parse_message(json.dumps(message).encode()), BROKER)


def test_a_nul_in_a_local_store_is_refused_at_intake(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="NUL"):
        local_request(Path(f"{tmp_path}/a\0b"), key="blobstore/x.tar")


def test_a_file_url_under_a_store_listed_above_its_bucket(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/artifacts/experiments/k1/modeldir.tar"
    message = {
        "experiment": {"key": "k1", "artifacts": {"modeldir": {"qualified": url, "mutable": True}}}
    }
    request = parse_message(json.dumps(message).encode())
    check_request(request, StorageOptions(local_roots=(tmp_path,)))
    other = url.replace("/k1/", "/k2/")
    message["experiment"]["artifacts"]["modeldir"]["qualified"] = other
    with pytest.raises(BadRequest, match="results go under experiments/k1/"):
        check_request(
            parse_message(json.dumps(message).encode()), StorageOptions(local_roots=(tmp_path,))
        )


def test_a_qualified_url_that_passes_intake_cannot_break_the_report() -> None:
    from agent.report.jobs import artifact_location

    key = REAL["experiment"]["key"]
    odd = f"s3://[x@127.0.0.1:5123/studioml-artifacts/experiments/{key}/output.tar"
    request = real(output={"qualified": odd})
    check_request(request, BROKER)  # user info is dropped, as before: the server is 127.0.0.1
    assert artifact_location(request, "output") == f"experiments/{key}/output.tar"
