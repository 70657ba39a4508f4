"""The record read for ``studio runs stop`` follows the trust of the message's source: a local
database outside the allowed stores, or an S3 database at a link-local or unlisted address, is
never read (no file opened, no request sent), and the answer is simply "not stopped"."""

import json
from pathlib import Path

import pytest

from agent.request import Request
from agent.stop_check import stopped
from agent.storage.base import StorageOptions


def request_with(database: dict[str, object]) -> Request:
    return Request.model_validate({"experiment": {"key": "k1"}, "config": {"database": database}})


def test_a_local_record_inside_the_allowed_store_is_read(tmp_path: Path) -> None:
    (tmp_path / "meta" / "experiments").mkdir(parents=True)
    (tmp_path / "meta" / "experiments" / "k1").write_text(json.dumps({"status": "stopped"}))
    request = request_with({"type": "local", "endpoint": str(tmp_path), "bucket": "meta"})
    assert stopped(request, StorageOptions(local_roots=(tmp_path,)))


def test_a_local_record_outside_the_allowed_stores_is_never_read(tmp_path: Path) -> None:
    (tmp_path / "meta" / "experiments").mkdir(parents=True)
    (tmp_path / "meta" / "experiments" / "k1").write_text(json.dumps({"status": "stopped"}))
    request = request_with({"type": "local", "endpoint": str(tmp_path), "bucket": "meta"})
    assert not stopped(request, StorageOptions(local_roots=(tmp_path / "elsewhere",)))


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("http://169.254.169.254", ()),  # cloud metadata
        ("http://2852039166", ()),  # the same, as connect() also reads it
        ("http://127.0.0.1:9", ("s3.example.org:443",)),  # not on the operator's list
    ],
)
def test_an_s3_database_where_a_message_may_not_point_is_never_asked(
    endpoint: str, allowed: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a request was made")

    monkeypatch.setattr("agent.storage.s3.client_for", no_network)
    aws = {"access_key": "AKIA", "secret_access_key": "secret", "region": "us-east-1"}
    request = request_with(
        {"type": "s3", "endpoint": endpoint, "bucket": "meta", "credentials": {"aws": aws}}
    )
    assert not stopped(request, StorageOptions(s3_endpoints=allowed))
