"""Where an S3 artifact lives, and whether the request may point there (pure: no boto3).

From the 0.0.49 client's ``qualified`` URL (``s3://<host[:port]>/<bucket>/<key>``, its scheme
lost) or the storage config: the endpoint URL, region, bucket, key and credentials (protocol
§F, §J.8); then the checks a message from anywhere must pass (agent.trust).
"""

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

from agent.errors import BadRequest
from agent.request import Artifact, StudioConfig
from agent.storage import check_key
from agent.storage.base import StorageOptions

DEFAULT_REGION = "us-east-1"
_AWS_REGIONAL = re.compile(r"s3[.-](?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com")
_HOST = re.compile(r"[A-Za-z0-9.\-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
# Bucket names as S3 and the servers that mimic it accept them (AWS is stricter: lower case).
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "instance-data"})
_METADATA_V6 = ipaddress.ip_network("fd00:ec2::254/128")  # AWS's IMDS over IPv6


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class S3Location:
    endpoint: str  # scheme://host[:port], never with user info
    region: str
    bucket: str


def split_qualified(qualified: str) -> tuple[str, str, str]:
    """``s3://<host[:port]>/<bucket>/<key>`` -> (host[:port], bucket, key); user info dropped."""
    host, _, path = qualified.removeprefix("s3://").partition("/")
    bucket, _, key = path.partition("/")
    return host.rpartition("@")[2], bucket, key


def _same_server(url: SplitResult, host: SplitResult) -> bool:
    default = 443 if url.scheme == "https" else 80
    return url.hostname == host.hostname and (host.port or default) == (url.port or default)


def endpoint_for(host: str, config: StudioConfig) -> tuple[str, str | None]:
    """The URL to reach ``host`` at, and the region its name gives (§F.4, §J.8).

    ``qualified`` lost the scheme: take it from the client's storage or database endpoint when
    that names the same server, use TLS for AWS, plain HTTP otherwise (as Go does).
    """
    if host and not _HOST.fullmatch(host):
        raise BadRequest(f"bad S3 endpoint {host[:80]!r}")
    parsed = urlsplit("//" + host)
    try:
        parsed.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise BadRequest(f"bad S3 endpoint {host!r}") from None
    name = (parsed.hostname or "").lower()
    if not name:
        raise BadRequest(f"no host in the S3 endpoint {host!r}")
    aws = _AWS_REGIONAL.fullmatch(name)
    if name.endswith(".amazonaws.com"):
        return f"https://{host}", aws["region"] if aws else None
    for store in (config.storage, config.database):
        url = urlsplit(store.endpoint) if store and store.endpoint else None
        if url and url.scheme in ("http", "https") and _same_server(url, parsed):
            return f"{url.scheme}://{host}", None
    return f"http://{host}", None


def _aws_credentials(source: dict[str, Any] | None) -> tuple[S3Credentials, str | None] | None:
    aws = source.get("aws") if isinstance(source, dict) else None
    if not isinstance(aws, dict):
        return None
    key, secret = aws.get("access_key"), aws.get("secret_access_key") or aws.get("secret_key")
    if not (isinstance(key, str) and key and isinstance(secret, str) and secret):
        return None
    token, region = aws.get("session_token"), aws.get("region")
    return (
        S3Credentials(key, secret, token if isinstance(token, str) and token else None),
        region if isinstance(region, str) and region else None,
    )


def credentials_for(
    label: str, artifact: Artifact, config: StudioConfig
) -> tuple[S3Credentials, str | None]:
    """The artifact's credentials and region, else the storage config's (--reuse sends none).

    Never the agent's own: an experiment must not reach what its submitter could not.
    """
    store_extra = (config.storage.model_extra if config.storage else None) or {}
    for source in (artifact.credentials, store_extra.get("credentials")):
        found = _aws_credentials(source)
        if found:
            return found
    raise BadRequest(
        f"artifact {label!r}: no AWS credentials (access_key, secret_access_key) in the artifact "
        "or in config.storage.credentials"
    )


def _storage_endpoint(config: StudioConfig) -> tuple[str, str | None]:
    """``config.storage.endpoint``, for artifacts without ``qualified`` (0.0.49's --reuse)."""
    raw = (config.storage.endpoint if config.storage else None) or ""
    host = urlsplit(raw if "//" in raw else "//" + raw).netloc.rpartition("@")[2]
    return endpoint_for(host, config) if host else ("", None)


def locate(
    label: str, artifact: Artifact, config: StudioConfig, region_hint: str | None = None
) -> tuple[S3Location, str]:
    """Endpoint, region and bucket of an S3 artifact, and its key.

    Region: the endpoint's own, else ``region_hint`` (the credentials'), else
    ``config.env.AWS_DEFAULT_REGION``, else us-east-1.
    """
    qualified = artifact.qualified or ""
    if qualified.startswith("s3://"):
        host, bucket, key = split_qualified(qualified)
        endpoint, region = endpoint_for(host, config)
    else:
        bucket, key = (config.storage.bucket if config.storage else None) or "", ""
        endpoint, region = _storage_endpoint(config)
    bucket, key = artifact.bucket or bucket, artifact.key or key
    if not (bucket and key):
        raise BadRequest(f"artifact {label!r}: no S3 bucket and key in {qualified or 'it'}")
    region = region or region_hint or config.env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    return S3Location(endpoint or f"https://s3.{region}.amazonaws.com", region, bucket), key


def check_location(label: str, location: S3Location, key: str, options: StorageOptions) -> None:
    """Refuse a bucket or key that climbs out of its place, and an endpoint that is not a
    storage server: a link-local address (cloud metadata services live there) or, when the
    operator listed ``s3_endpoints``, any other."""
    what = f"artifact {label!r}"
    if not _BUCKET.fullmatch(location.bucket) or location.bucket in (".", ".."):
        raise BadRequest(f"{what}: {location.bucket[:80]!r} is not a bucket name")
    check_key(label, key)
    netloc = urlsplit(location.endpoint).netloc
    if options.s3_endpoints and netloc.lower() not in options.s3_endpoints:
        raise BadRequest(f"{what}: S3 endpoint {netloc!r} is not listed in s3_endpoints")
    host = (urlsplit(location.endpoint).hostname or "").lower()
    if host in _METADATA_NAMES or _link_local(host):
        raise BadRequest(f"{what}: S3 endpoint {host!r} is a link-local or metadata address")


def _link_local(host: str) -> bool:
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the legacy forms connect() still takes: 2852039166, 0xa9fea9fe, 169.254.43518
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_link_local or address in _METADATA_V6
