"""A real S3 server for the tests: moto's standalone server on loopback, with IAM auth on.

Use it by importing the fixture into a test module (or listing this module in
``pytest_plugins``): ``from tests.services.s3 import s3_server  # noqa: F401``.
``s3_tls_server`` is a second one serving HTTPS (moto's own ``--ssl-cert``/``--ssl-key``) with
the certificate of ``tls_material`` (tests/services/tls.py), a private CA.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config

from tests.services.tls import TlsMaterial

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

START_TIMEOUT = 30.0
SEED = 4242  # moto's random ids depend on it: the same seed gives the same access key again
REGION = "us-east-1"


def _free_port() -> int:
    """A free port below 32768, outside Linux's ephemeral range.

    An ephemeral port could be taken by some outgoing connection while the server is stopped,
    and restarting on the same port must work.
    """
    for port in range(20000 + time.monotonic_ns() % 10000, 32768):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32767")


class S3Server:
    """A moto server process; ``stop()`` and ``start()`` restart it on the same port.

    moto keeps everything in memory: a restart empties it (buckets, objects, pending uploads).
    The same user and access key are provisioned again, so clients made before the restart keep
    working; tests that restart it must make their buckets again.

    Authentication is enforced (moto's INITIAL_NO_AUTH_ACTION_COUNT = 0): ``access_key`` and
    ``secret_key`` belong to an IAM user allowed everything; other keys are refused with
    InvalidAccessKeyId or SignatureDoesNotMatch, as a real server would. ``make_user`` adds more.

    With ``tls`` it serves HTTPS only, with that material's certificate for 127.0.0.1:
    ``endpoint`` is ``https://127.0.0.1:PORT``, and its own clients (``client()``, provisioning)
    trust ``tls.ca`` and nothing else.
    """

    def __init__(self, log_path: Path, tls: TlsMaterial | None = None) -> None:
        self.port = _free_port()
        self.tls = tls
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.region = REGION
        self.access_key = ""
        self.secret_key = ""
        self._log_path = log_path
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._log = self._log_path.open("ab")
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            command += ["--ssl-cert", str(self.tls.cert), "--ssl-key", str(self.tls.key)]
        self._proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        self.access_key, self.secret_key = self._provision()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                break
            try:
                self._open(urllib.request.Request(f"{self.endpoint}/moto-api/"), timeout=1)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        log = self._log_path.read_text(errors="replace")[-4000:]
        pytest.fail(f"moto server on port {self.port} did not start:\n{log}")

    def _moto_api(self, path: str, data: bytes = b"") -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/{path}",
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain"},  # moto reads the raw body, not a form
        )
        self._open(request, timeout=10)

    def _open(self, request: urllib.request.Request, timeout: float) -> None:
        context = self.tls.client_context() if self.tls else None
        urllib.request.urlopen(request, timeout=timeout, context=context).close()

    @property
    def verify(self) -> str | bool:
        """boto3's ``verify`` for this server: the CA bundle with TLS, else the default."""
        return str(self.tls.ca) if self.tls else True

    def _provision(self) -> tuple[str, str]:
        self._moto_api(f"seed?a={SEED}")
        keys = self._create_user("agent", ["*"], ("bootstrap", "bootstrap"))
        self._moto_api("reset-auth", b"0")  # from now on every request must be signed by a user
        return keys

    def _create_user(
        self, name: str, actions: Sequence[str], keys: tuple[str, str]
    ) -> tuple[str, str]:
        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=keys[0],
            aws_secret_access_key=keys[1],
            verify=self.verify,
        )
        iam.create_user(UserName=name)
        if actions:
            statement = {"Effect": "Allow", "Action": list(actions), "Resource": "*"}
            policy = {"Version": "2012-10-17", "Statement": [statement]}
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def make_user(self, name: str, actions: Sequence[str] = ()) -> tuple[str, str]:
        """(access key, secret key) of a new IAM user allowed only ``actions``."""
        return self._create_user(name, actions, (self.access_key, self.secret_key))

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> "S3Client":
        """A boto3 S3 client on this server, configured as the agent's own."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            verify=self.verify,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def make_bucket(self, name: str) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto server for the session; fails (never skips) when it cannot start."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_tls_server(
    tmp_path_factory: pytest.TempPathFactory, tls_material: TlsMaterial
) -> Iterator[S3Server]:
    """A second moto server, HTTPS only, with ``tls_material``'s certificate (a private CA)."""
    server = S3Server(tmp_path_factory.mktemp("s3-tls") / "moto.log", tls=tls_material)
    server.start()
    try:
        yield server
    finally:
        server.stop()
