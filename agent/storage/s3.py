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
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO, cast

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
from agent.storage.base import Producer, Storage, StorageOptions
from agent.storage.s3_location import (
    S3Credentials,
    S3Location,
    check_location,
    credentials_for,
    locate,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIN_PART = 5 * 2**20  # S3's floor for every part but the last
MAX_PART = 5 * 2**30
PARTS_PER_STEP = 1000  # the part size doubles every 1000 parts: 10000 parts reach S3's 5 TiB
IN_FLIGHT = 2  # parts uploading at once; one more is being read, so memory is about 3 parts
CACHE_SIZE = 32
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset({"NoSuchBucket", "ExpiredToken", "InvalidToken"})  # and any 401 or 403
# Codes under 500 that another attempt can cure; NoSuchUpload: the server lost our upload.
_RETRYABLE = frozenset(
    {"RequestTimeout", "RequestTimeTooSkewed", "OperationAborted", "NoSuchUpload", "Throttling"}
)
_NETWORK = (BotoConnectionError, HTTPClientError, BotoIncompleteRead, Urllib3Error, OSError)


def resolve_s3(
    label: str, artifact: Artifact, config: StudioConfig, options: StorageOptions | None
) -> tuple["S3Storage", str]:
    options = options or StorageOptions()
    try:
        creds, region = credentials_for(label, artifact, config)
        location, key = locate(label, artifact, config, region)
    except ValueError as exc:  # urlsplit on a malformed endpoint: the message's fault
        raise BadRequest(f"artifact {label!r}: bad S3 location: {exc}") from None
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
