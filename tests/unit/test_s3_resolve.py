"""Where an S3 artifact lives: endpoint, scheme, region, bucket, key and credentials (§F.4, §J.8).

Pure resolution and real boto3 objects; no server is needed.
"""

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from agent.errors import (
    ArtifactMissing,
    BadRequest,
    PermanentError,
    StorageDenied,
    StorageUnavailable,
)
from agent.request import Artifact, StudioConfig
from agent.storage import resolve
from agent.storage.base import StorageOptions
from agent.storage.local import LocalStorage
from agent.storage.s3 import (
    MIN_PART,
    S3Storage,
    client_for,
    part_size,
    translate,
)

SECRET = "s3cr3t-value-never-shown"
KEY = "experiments/k/output.tar"


def aws(access: str = "AKIDEXAMPLE", region: str | None = "us-west-2", **extra: str) -> Any:
    creds: dict[str, str] = {"access_key": access, "secret_access_key": SECRET, **extra}
    if region:
        creds["region"] = region
    return {"aws": creds}


def config(
    endpoint: str | None = "http://127.0.0.1:5123",
    database: str | None = None,
    env: dict[str, str] | None = None,
    credentials: Any = None,
) -> StudioConfig:
    storage: dict[str, Any] = {"type": "s3", "endpoint": endpoint, "bucket": "studioml-artifacts"}
    if credentials is not None:
        storage["credentials"] = credentials
    data: dict[str, Any] = {"storage": storage, "env": env or {}}
    if database:
        data["database"] = {"type": "s3", "endpoint": database, "bucket": "studioml-meta"}
    return StudioConfig.model_validate(data)


def artifact(
    host: str, bucket: str | None = "studioml-artifacts", creds: Any = "default"
) -> Artifact:
    return Artifact(
        key=KEY,
        qualified=f"s3://{host}/studioml-artifacts/{KEY}",
        bucket=bucket,
        mutable=True,
        credentials=aws() if creds == "default" else creds,
    )


def s3(art: Artifact, cfg: StudioConfig) -> tuple[S3Storage, str]:
    store, key = resolve("output", art, cfg)
    assert isinstance(store, S3Storage)
    return store, key


@pytest.mark.parametrize(
    ("host", "storage_endpoint", "database_endpoint", "expected"),
    [
        # The 0.0.49 client's own layout: qualified lost the scheme, config.storage has it.
        ("127.0.0.1:5123", "http://127.0.0.1:5123", None, "http://127.0.0.1:5123"),
        ("minio.lan:9000", "https://minio.lan:9000", None, "https://minio.lan:9000"),
        ("MinIO.lan:9000", "https://minio.lan:9000/", None, "https://MinIO.lan:9000"),
        # Only the database endpoint names the server.
        ("minio.lan:9000", "http://other:9000", "https://minio.lan:9000", "https://minio.lan:9000"),
        # Same host, another port: not the same server.
        ("minio.lan:9001", "https://minio.lan:9000", None, "http://minio.lan:9001"),
        # Default ports count as the same server.
        ("minio.lan", "https://minio.lan:443", None, "https://minio.lan"),
        ("minio.lan:443", "https://minio.lan", None, "https://minio.lan:443"),
        # Nothing matches: plain HTTP, as Go does.
        ("10.0.0.5:9000", None, None, "http://10.0.0.5:9000"),
        # AWS is always TLS.
        ("s3.amazonaws.com", "http://s3.amazonaws.com", None, "https://s3.amazonaws.com"),
        ("s3.eu-west-1.amazonaws.com", None, None, "https://s3.eu-west-1.amazonaws.com"),
        ("[::1]:9000", "https://[::1]:9000", None, "https://[::1]:9000"),
    ],
)
def test_scheme(
    host: str, storage_endpoint: str | None, database_endpoint: str | None, expected: str
) -> None:
    store, key = s3(artifact(host), config(storage_endpoint, database_endpoint))
    assert store.location.endpoint == expected
    assert key == KEY
    assert store.describe(key) == f"{expected}/studioml-artifacts/{KEY}"


@pytest.mark.parametrize(
    ("host", "creds_region", "env", "expected"),
    [
        (
            "s3.eu-west-1.amazonaws.com",
            "us-west-2",
            {"AWS_DEFAULT_REGION": "ap-south-1"},
            "eu-west-1",
        ),
        ("s3-eu-central-1.amazonaws.com", "us-west-2", {}, "eu-central-1"),
        ("s3.us-gov-west-1.amazonaws.com", None, {}, "us-gov-west-1"),
        ("s3.amazonaws.com", "us-west-2", {"AWS_DEFAULT_REGION": "ap-south-1"}, "us-west-2"),
        ("s3-external-1.amazonaws.com", None, {}, "us-east-1"),
        ("127.0.0.1:5123", "us-west-2", {"AWS_DEFAULT_REGION": "ap-south-1"}, "us-west-2"),
        ("127.0.0.1:5123", None, {"AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"),
        ("127.0.0.1:5123", None, {}, "us-east-1"),
    ],
)
def test_region(host: str, creds_region: str | None, env: dict[str, str], expected: str) -> None:
    store, _ = s3(artifact(host, creds=aws(region=creds_region)), config(env=env))
    assert store.location.region == expected


def test_bucket_and_key_fields_win_over_qualified() -> None:
    art = Artifact(
        key="blobstore/abc.tar", bucket="real-bucket", qualified="s3://h:1/other/x.tar",
        credentials=aws(),
    )  # fmt: skip
    store, key = s3(art, config())
    assert (store.bucket, key) == ("real-bucket", "blobstore/abc.tar")


def test_bucket_and_key_parsed_from_qualified_when_absent() -> None:
    art = Artifact(qualified="s3://h:1/bkt/deep/path/obj.tar", credentials=aws())
    store, key = s3(art, config())
    assert (store.location.endpoint, store.bucket, key) == (
        "http://h:1",
        "bkt",
        "deep/path/obj.tar",
    )


def test_user_info_in_qualified_is_dropped() -> None:
    art = Artifact(qualified=f"s3://user:{SECRET}@h:1/bkt/k.tar", credentials=aws())
    store, key = s3(art, config())
    assert store.describe(key) == "http://h:1/bkt/k.tar"


def test_reuse_artifact_uses_storage_config_and_its_credentials() -> None:
    # 0.0.49's --reuse sends only key and mutable=false: no qualified, no credentials.
    cfg = config("https://minio.lan:9000/ignored", credentials=aws("AKIDSTORE", "eu-north-1"))
    store, key = s3(Artifact(key="experiments/old/modeldir.tar"), cfg)
    assert store.location.endpoint == "https://minio.lan:9000"
    assert (store.bucket, key, store.location.region) == (
        "studioml-artifacts", "experiments/old/modeldir.tar", "eu-north-1",
    )  # fmt: skip
    assert store.credentials.access_key == "AKIDSTORE"


def test_artifact_credentials_win_over_storage_config() -> None:
    store, _ = s3(artifact("h:1", creds=aws("AKIDART")), config(credentials=aws("AKIDSTORE")))
    assert store.credentials.access_key == "AKIDART"
    assert store.credentials.secret_key == SECRET


def test_session_token_is_passed_on() -> None:
    store, _ = s3(artifact("h:1", creds=aws(session_token="tok")), config())
    assert store.credentials.session_token == "tok"


def test_no_credentials_is_a_bad_request_even_with_agent_env_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDAGENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "agent-secret")
    with pytest.raises(BadRequest, match=r"artifact 'output': no AWS credentials"):
        resolve("output", artifact("h:1", creds=None), config())
    with pytest.raises(BadRequest, match="no AWS credentials"):
        resolve("output", artifact("h:1", creds={"aws": {"access_key": "AKID"}}), config())


def test_bad_endpoint_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="bad S3 endpoint"):
        resolve("output", artifact("h:notaport"), config())
    with pytest.raises(BadRequest, match="no host"):
        resolve("output", artifact(""), config())


def test_an_endpoint_that_is_not_a_host_is_refused_before_any_use() -> None:
    with pytest.raises(BadRequest, match="bad S3 endpoint 'bad host:9000'"):
        s3(artifact("bad host:9000"), config())


def test_s3_type_without_bucket_or_key_is_a_bad_request() -> None:
    cfg = StudioConfig.model_validate({"storage": {"type": "s3", "endpoint": "http://h:1"}})
    with pytest.raises(BadRequest, match="no S3 bucket and key"):
        resolve("tb", Artifact(key="k.tar", credentials=aws()), cfg)


def test_no_endpoint_at_all_means_aws_in_the_region() -> None:
    cfg = StudioConfig.model_validate({"storage": {"type": "s3", "bucket": "b"}})
    store, _ = s3(Artifact(key="k.tar", credentials=aws(region="ca-central-1")), cfg)
    assert store.location.endpoint == "https://s3.ca-central-1.amazonaws.com"


def test_local_storage_still_wins_for_local_config(tmp_path: Any) -> None:
    cfg = StudioConfig.model_validate(
        {"storage": {"type": "local", "endpoint": str(tmp_path), "bucket": "artifacts"}}
    )
    store, _ = resolve(
        "output", artifact("127.0.0.1:5123"), cfg, StorageOptions(local_roots=(tmp_path,))
    )
    assert isinstance(store, LocalStorage)


def test_secrets_stay_out_of_reprs() -> None:
    store, key = s3(artifact("h:1", creds=aws(session_token="tok-value")), config())
    shown = repr(store) + repr(store.credentials) + repr(store.location) + store.describe(key)
    assert SECRET not in shown
    assert "tok-value" not in shown


def test_clients_are_cached_and_configured_for_non_aws_servers() -> None:
    store, _ = s3(artifact("127.0.0.1:5123"), config())
    options = StorageOptions(s3_retries=3)
    client = client_for(store.location, store.credentials, options)
    assert client_for(store.location, store.credentials, options) is client
    assert client.meta.endpoint_url == "http://127.0.0.1:5123"
    assert client.meta.region_name == "us-west-2"
    settings: Any = client.meta.config  # the stubs do not list Config's attributes
    assert settings.s3 == {"addressing_style": "path"}
    assert settings.request_checksum_calculation == "when_required"
    assert settings.response_checksum_validation == "when_required"
    # botocore's max_attempts counts retries: the first try comes on top.
    assert settings.retries == {"total_max_attempts": 4, "mode": "standard"}
    other, _ = s3(artifact("127.0.0.1:5123", creds=aws(session_token="t")), config())
    assert client_for(other.location, other.credentials, options) is not client


def test_ca_bundle_and_verify_reach_the_client(tmp_path: Any) -> None:
    store, _ = s3(artifact("minio.lan:9000"), config("https://minio.lan:9000"))
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    with_ca = client_for(store.location, store.credentials, StorageOptions(s3_ca_bundle=bundle))
    no_verify = client_for(store.location, store.credentials, StorageOptions(s3_verify=False))
    sessions: list[Any] = [c._endpoint.http_session for c in (with_ca, no_verify)]  # type: ignore[attr-defined]
    assert sessions[0]._verify == str(bundle)
    assert sessions[1]._verify is False


def test_part_size_respects_s3_limits() -> None:
    assert part_size(1, 16 * 2**20) == 16 * 2**20
    assert part_size(1, 1024) == MIN_PART
    assert part_size(1000, 16 * 2**20) == 16 * 2**20
    assert part_size(1001, 16 * 2**20) == 32 * 2**20
    assert part_size(10000, 16 * 2**30) == 5 * 2**30
    # 10000 parts from the default 16 MiB reach S3's 5 TiB object limit.
    assert sum(part_size(n, 16 * 2**20) for n in range(1, 10001)) >= 5 * 2**40


def client_error(code: str, status: int) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (client_error("NoSuchKey", 404), ArtifactMissing),
        (client_error("404", 404), ArtifactMissing),
        (client_error("NoSuchBucket", 404), StorageDenied),
        (client_error("AccessDenied", 403), StorageDenied),
        (client_error("InvalidAccessKeyId", 403), StorageDenied),
        (client_error("SignatureDoesNotMatch", 403), StorageDenied),
        (client_error("ExpiredToken", 400), StorageDenied),
        (client_error("RequestTimeTooSkewed", 403), StorageUnavailable),
        (client_error("RequestTimeout", 400), StorageUnavailable),
        (client_error("SlowDown", 503), StorageUnavailable),
        (client_error("InternalError", 500), StorageUnavailable),
        (client_error("TooManyRequests", 429), StorageUnavailable),
        (client_error("NoSuchUpload", 404), StorageUnavailable),
        (client_error("InvalidRequest", 400), PermanentError),
        (EndpointConnectionError(endpoint_url="http://h:1"), StorageUnavailable),
        (ConnectionResetError(104, "reset"), StorageUnavailable),
    ],
)
def test_error_translation(exc: Exception, expected: type[Exception]) -> None:
    error = translate(exc, "download of key 'k' in bucket 'b' at http://h:1")
    assert type(error) is expected
    assert str(error).startswith("download of key 'k' in bucket 'b' at http://h:1: ")
