"""What an SQS call's failure means: the one list of this backend's error codes and what a
later try may cure (``RETRY``)."""

import re
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
from botocore import exceptions as boto
from botocore.config import Config

from agent import __version__

T = TypeVar("T")

_CREDENTIALS = {"InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
                "InvalidAccessKeyId", "ExpiredToken", "IncompleteSignature"}  # fmt: skip
_DENIED = {"AccessDenied", "AccessDeniedException"}
_QUEUE_GONE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_HANDLE_GONE = {"ReceiptHandleIsInvalid", "MessageNotInflight"}
_THROTTLED = {"Throttling", "ThrottlingException", "RequestThrottled", "OverLimit"}
RETRY = {"credentials", "denied", "transient"}  # failure kinds that a later try may cure


class Failed(Exception):
    """An SQS call failed: ``kind`` is one of RETRY, queue_gone, handle_gone, cap, refused."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind, self.text = kind, text


def classify(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
        return "credentials", str(exc)
    if not isinstance(exc, boto.ClientError):
        return "transient", f"{type(exc).__name__}: {exc}"
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    # moto (and some proxies) answer the JSON protocol with an XML error document.
    inner = re.search(r"<Code>([^<]+)</Code>(?:.*?<Message>([^<]*)</Message>)?", message, re.S)
    if inner:
        code, message = inner.group(1), inner.group(2) or ""
    text = f"{code}: {message}".rstrip(": ")
    if code in _DENIED:
        return "denied", text
    if code in _CREDENTIALS or status in (401, 403):
        return "credentials", text
    if code in _QUEUE_GONE or code in _HANDLE_GONE:
        return "queue_gone" if code in _QUEUE_GONE else "handle_gone", text
    if code == "InvalidParameterValue" and "VisibilityTimeout" in message:
        return "cap", text  # SQS counted the 12 h from earlier than we did
    if status >= 500 or status == 429 or code in _THROTTLED:
        return "transient", text
    return "refused", text


def new_client(
    region: str,
    endpoint_url: str | None,
    keys: tuple[str, str, str | None],
    read_timeout: float,
    connections: int = 10,
) -> Any:
    """A botocore SQS client (no SQS stubs among the dev tools) that never retries inside a
    call: a retry would block its caller, and the callers retry on their own schedule."""
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=read_timeout,
        max_pool_connections=connections,
        user_agent_extra=f"studio-agent/{__version__}",
    )
    return boto3.session.Session().client(
        "sqs",
        region_name=region,
        endpoint_url=endpoint_url,
        aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1],
        aws_session_token=keys[2],
        config=config,
    )


def call(client: Any, request: Callable[[Any], T], secret: str) -> T:
    """``request(client)``, with botocore's errors turned into ``Failed`` (never the secret)."""
    try:
        return request(client)
    except (boto.ClientError, boto.BotoCoreError, ValueError) as exc:
        kind, text = classify(exc)
        if secret:  # botocore never puts the secret in a message; make sure
            text = text.replace(secret, "***")
        raise Failed(kind, text) from exc
