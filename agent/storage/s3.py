"""S3-compatible storage (AWS S3, MinIO, moto, ...), streamed both ways (protocol §F, §J.8).

Downloads hand the response body straight to the tar reader; uploads run the tar writer in a
thread that feeds a pipe, and send what comes out of it as multipart parts, so memory stays at a
few parts whatever the artifact's size. A failed upload is aborted, never completed: readers see
the whole object or none. boto3 is imported here and nowhere else.
"""

import contextlib
import fcntl
import hashlib
import io
import ipaddress
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import SplitResult, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import IncompleteReadError as BotoIncompleteRead
from urllib3.exceptions import HTTPError as Urllib3Error

from agent import __version__
from agent.errors import (
    AgentError,
    ArtifactMissing,
    BadRequest,
    PermanentError,
    StorageDenied,
    StorageUnavailable,
)
from agent.request import Artifact, StudioConfig
from agent.storage import check_key
from agent.storage.base import Producer, Storage, StorageOptions

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIN_PART = 5 * 2**20  # S3's floor for every part but the last
MAX_PART = 5 * 2**30
PARTS_PER_STEP = 1000  # the part size doubles every 1000 parts: 10000 parts reach S3's 5 TiB
IN_FLIGHT = 2  # parts uploading at once; one more is being read, so memory is about 3 parts
CACHE_SIZE = 32
DEFAULT_REGION = "us-east-1"
_AWS_REGIONAL = re.compile(r"s3[.-](?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com")
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset({"NoSuchBucket", "ExpiredToken", "InvalidToken"})  # and any 401 or 403
# Codes under 500 that another attempt can cure; NoSuchUpload: the server lost our upload.
_RETRYABLE = frozenset(
    {"RequestTimeout", "RequestTimeTooSkewed", "OperationAborted", "NoSuchUpload", "Throttling"}
)
_HOST = re.compile(r"[A-Za-z0-9.\-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
# Bucket names as S3 and the servers that mimic it accept them (AWS is stricter: lower case).
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata", "instance-data"})
_METADATA_V6 = ipaddress.ip_network("fd00:ec2::254/128")  # AWS's IMDS over IPv6
_NETWORK = (BotoConnectionError, HTTPClientError, BotoIncompleteRead, Urllib3Error, OSError)


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


# -- where an artifact lives (pure) -------------------------------------------------------------


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
    aws = (source or {}).get("aws")
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
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_link_local or address in _METADATA_V6


def resolve_s3(
    label: str, artifact: Artifact, config: StudioConfig, options: StorageOptions | None
) -> tuple["S3Storage", str]:
    options = options or StorageOptions()
    creds, region = credentials_for(label, artifact, config)
    location, key = locate(label, artifact, config, region)
    check_location(label, location, key, options)
    return S3Storage(location, creds, options), key


# -- clients --------------------------------------------------------------------------------------

_clients: dict[tuple[object, ...], "S3Client"] = {}
_clients_lock = threading.Lock()


def client_for(location: S3Location, creds: S3Credentials, options: StorageOptions) -> "S3Client":
    """A cached client: making one costs ~50 ms, and it happens for every artifact."""
    # A digest, not the secret: a changed secret for the same key id must not reuse the client.
    digest = hashlib.sha256(f"{creds.secret_key}\0{creds.session_token}".encode()).hexdigest()
    cache_key = (location.endpoint, location.region, creds.access_key, digest, options)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            if len(_clients) >= CACHE_SIZE:
                del _clients[next(iter(_clients))]
            client = _clients[cache_key] = _new_client(location, creds, options)
        return client


def _new_client(location: S3Location, creds: S3Credentials, options: StorageOptions) -> "S3Client":
    config = Config(
        s3={"addressing_style": "path"},
        # Non-AWS servers reject the CRC checksums boto3 sends by default since 1.36.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": options.s3_retries, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        user_agent_extra=f"studio-agent/{__version__}",
    )
    # A session per client: boto3's default session is not thread-safe.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=location.endpoint,
        region_name=location.region,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.session_token,
        verify=str(options.s3_ca_bundle) if options.s3_ca_bundle else options.s3_verify,
        config=config,
    )


def translate(exc: BaseException, what: str) -> AgentError:
    """The agent's error for a boto3 failure; ``what`` names the operation and the object."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        reason = f"{code}: {error.get('Message', '')}".rstrip(": ")
        if code in _MISSING:
            return ArtifactMissing(f"{what}: no such object")
        if status >= 500 or status in (408, 429) or code in _RETRYABLE:
            return StorageUnavailable(f"{what}: the server failed ({reason})")
        if code in _DENIED or status in (401, 403):
            return StorageDenied(f"{what}: refused, check the credentials and bucket ({reason})")
        return PermanentError(f"{what}: rejected ({reason})")
    if isinstance(exc, _NETWORK):
        return StorageUnavailable(f"{what}: unreachable ({type(exc).__name__}: {exc})")
    return PermanentError(f"{what}: {type(exc).__name__}: {exc}")


# -- streams --------------------------------------------------------------------------------------


class _Body(io.BufferedIOBase):
    """The response body, with a connection lost halfway reported as StorageUnavailable."""

    def __init__(self, raw: Any, what: str) -> None:
        super().__init__()
        self._raw = raw
        self._what = what

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        try:
            return cast(bytes, self._raw.read(None if size is None or size < 0 else size))
        except (BotoCoreError, *_NETWORK) as exc:
            raise translate(exc, self._what) from exc


class _Pipe:
    """Runs ``produce`` in a thread writing into a pipe; ``read`` takes what it wrote.

    ``read`` raises the producer's own exception instead of returning end-of-file, so a failed
    producer can never look like a short artifact.
    """

    def __init__(self, produce: Producer) -> None:
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):  # a 1 MiB pipe means fewer wake-ups per part
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 2**20)
        self._source = os.fdopen(read_fd, "rb")
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(produce, write_fd), name="s3-producer", daemon=True
        )
        self._thread.start()

    def _run(self, produce: Producer, write_fd: int) -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink:
                produce(sink)
        except BaseException as exc:  # handed to the reader, which raises it
            self._error = exc

    def read(self, size: int) -> bytearray:
        """Exactly ``size`` bytes, fewer only at the end of a successful production.

        A bytearray, not bytes: read into in place, and sent by botocore without a copy.
        """
        buf = bytearray(size)
        got = self._source.readinto(buf)  # buffered: reads until the buffer is full or EOF
        if got < size:
            self._thread.join()
            if self._error is not None:
                raise self._error
            del buf[got:]
        return buf

    def close(self) -> None:
        # Closing the read end makes a producer still writing fail with EPIPE, so it stops.
        self._source.close()
        self._thread.join()


def part_size(number: int, base: int) -> int:
    """Size of part ``number`` (from 1): ``base``, doubled every 1000 parts, within S3's limits."""
    size = min(max(base, MIN_PART), MAX_PART)
    return int(min(size << ((number - 1) // PARTS_PER_STEP), MAX_PART))


# -- the store ------------------------------------------------------------------------------------


class S3Storage(Storage):
    def __init__(
        self, location: S3Location, credentials: S3Credentials, options: StorageOptions
    ) -> None:
        self.location = location
        self.bucket = location.bucket
        self.credentials = credentials  # its repr hides the secret and the token
        self._options = options

    def __repr__(self) -> str:
        return f"S3Storage({self.location.endpoint}/{self.bucket}, {self.location.region})"

    def _client(self) -> "S3Client":
        try:
            return client_for(self.location, self.credentials, self._options)
        except (BotoCoreError, ValueError) as exc:  # botocore refuses a malformed endpoint
            raise BadRequest(f"S3 endpoint {self.location.endpoint}: {exc}") from exc

    def describe(self, key: str) -> str:
        return f"{self.location.endpoint}/{self.bucket}/{key}"

    def _what(self, action: str, key: str) -> str:
        return f"{action} of key {key!r} in bucket {self.bucket!r} at {self.location.endpoint}"

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        what = self._what("download", key)
        body = self._call(what, self._client().get_object, Bucket=self.bucket, Key=key)["Body"]
        try:
            yield cast(BinaryIO, _Body(body, what))  # read() is all tarfile and copyfileobj use
        finally:
            body.close()  # unread bytes are dropped with the connection, not drained

    def open_read(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self._open(key)

    def exists(self, key: str) -> bool:
        try:
            self._call(
                self._what("lookup", key), self._client().head_object, Bucket=self.bucket, Key=key
            )
        except ArtifactMissing:
            return False
        return True

    def write(self, key: str, produce: Producer) -> int:
        what = self._what("upload", key)
        pipe = _Pipe(produce)
        try:
            size = part_size(1, self._options.s3_part_size)
            # In a list that _send_parts empties, so that each part is freed once it is sent.
            head = [pipe.read(size)]
            if len(head[0]) < size:
                self._call(
                    what, self._client().put_object, Bucket=self.bucket, Key=key, Body=head[0]
                )
                return len(head[0])
            return self._multipart(key, what, pipe, head)
        finally:
            pipe.close()

    def _call(self, what: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except (BotoCoreError, ClientError, *_NETWORK) as exc:
            raise translate(exc, what) from exc

    def _multipart(self, key: str, what: str, pipe: _Pipe, first: list[bytearray]) -> int:
        client = self._client()
        created = self._call(what, client.create_multipart_upload, Bucket=self.bucket, Key=key)
        upload = {"Bucket": self.bucket, "Key": key, "UploadId": created["UploadId"]}
        try:
            parts, total = self._send_parts(client, what, upload, pipe, first)
            self._call(
                what, client.complete_multipart_upload, **upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            self._abort(client, upload)
            raise
        return total

    def _send_parts(
        self,
        client: "S3Client",
        what: str,
        upload: dict[str, str],
        pipe: _Pipe,
        first: list[bytearray],
    ) -> tuple[list["CompletedPartTypeDef"], int]:
        parts: list[CompletedPartTypeDef] = []
        pending: deque[Future[CompletedPartTypeDef]] = deque()
        number, total, chunk = 1, 0, first.pop()
        with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="s3-part") as pool:
            try:
                while chunk:
                    if len(pending) == IN_FLIGHT:
                        parts.append(pending.popleft().result())
                    pending.append(pool.submit(self._part, client, what, upload, number, chunk))
                    total += len(chunk)
                    number += 1
                    chunk = pipe.read(part_size(number, self._options.s3_part_size))
                parts.extend(future.result() for future in pending)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise  # leaving the pool waits for parts in flight, so abort comes after them
        return parts, total

    def _part(
        self, client: "S3Client", what: str, upload: dict[str, str], number: int, data: bytearray
    ) -> "CompletedPartTypeDef":
        result = self._call(what, client.upload_part, **upload, PartNumber=number, Body=data)
        return {"ETag": result["ETag"], "PartNumber": number}

    def _abort(self, client: "S3Client", upload: dict[str, str]) -> None:
        try:
            client.abort_multipart_upload(**upload)  # type: ignore[arg-type]
        except Exception as exc:
            # The object never became visible; only the parts linger until a lifecycle rule.
            log.warning("could not abort the multipart upload of %s: %s", upload["Key"], exc)
