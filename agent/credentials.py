"""The certs directory: credential files that make the agent serve queues.

Layout (one sub-folder per kind; names starting with "." are ignored, which also skips the
``..data`` folders of a Kubernetes secret mount while following its symlinks):

    certs/rabbitmq/<name>          an AMQP URL; optionally the management URL on a second line
    certs/sqs/<name>/credentials   AWS shared-credentials file  } the Go runner's --sqs-certs
    certs/sqs/<name>/config        AWS config file with region  } layout, unchanged
    certs/pubsub/<name>.json       a Google service-account key

A file readable or writable by group or others, or not owned by the agent's user, is refused with
a log line saying so, as ssh refuses such keys. A malformed file is refused with the reason and
does not disturb the others. Nothing secret is ever put in a repr, a log line or an error.
"""

import configparser
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("rabbitmq", "sqs", "pubsub")


class CredentialError(ValueError):
    """Why one credential file was refused; never contains its secrets."""


@dataclass(frozen=True)
class Credential:
    kind: str
    name: str
    source: Path
    fingerprint: str  # of the contents: a changed file is a rotation
    settings: dict[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def ident(self) -> str:
        return f"{self.kind}/{self.name}"


def check_private(path: Path) -> None:
    info = path.stat()  # follows symlinks: the mode that matters is the target's
    if info.st_uid != os.geteuid():
        raise CredentialError(f"{path}: owned by uid {info.st_uid}, not by the agent's user")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(info.st_mode)
        raise CredentialError(f"{path}: mode {mode:04o} lets group or others read it; chmod 600")


def _digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def _rabbitmq(path: Path) -> dict[str, Any]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith(("amqp://", "amqps://")):
        raise CredentialError(f"{path}: the first line must be an amqp:// or amqps:// URL")
    mgmt = lines[1] if len(lines) > 1 else ""
    if mgmt and not mgmt.startswith(("http://", "https://")):
        raise CredentialError(f"{path}: the second line must be an http(s):// management URL")
    return {"amqp_url": lines[0], "mgmt_url": mgmt or None}


def _sqs(folder: Path) -> dict[str, Any]:
    files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.is_file()]
    if len(files) != 2:
        raise CredentialError(f"{folder}: needs exactly two files, credentials and config")
    parsed = []
    for path in files:
        check_private(path)
        parser = configparser.ConfigParser()
        try:
            parser.read_string(path.read_text())
        except configparser.Error as exc:
            raise CredentialError(f"{path}: not an AWS ini file ({type(exc).__name__})") from None
        parsed.append(parser)
    config, creds = (parsed[0], parsed[1]) if _has_region(parsed[0]) else (parsed[1], parsed[0])
    region = _first(config, "region")
    if not region:
        raise CredentialError(f"{folder}: no region in either file")
    key, secret = _first(creds, "aws_access_key_id"), _first(creds, "aws_secret_access_key")
    if not key or not secret:
        raise CredentialError(f"{folder}: the credentials file lacks a default profile key pair")
    return {
        "access_key": key,
        "secret_key": secret,
        "session_token": _first(creds, "aws_session_token"),
        "region": region,
        "endpoint_url": _first(config, "endpoint_url"),
    }


def _has_region(parser: configparser.ConfigParser) -> bool:
    return bool(_first(parser, "region"))


def _first(parser: configparser.ConfigParser, option: str) -> str | None:
    """``option`` from the default profile (``[default]`` or ``[profile default]``)."""
    for section in ("default", "profile default", *parser.sections()):
        if parser.has_option(section, option) and parser.get(section, option).strip():
            return parser.get(section, option).strip()
    return None


def _pubsub(path: Path) -> dict[str, Any]:
    try:
        key = json.loads(path.read_text())
    except ValueError:
        raise CredentialError(f"{path}: not JSON") from None
    if not isinstance(key, dict) or not key.get("project_id"):
        raise CredentialError(f"{path}: not a service-account key (no project_id)")
    return {"key_file": path, "project": str(key["project_id"])}


def _visible(folder: Path) -> list[Path]:
    try:
        return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _load(kind: str, path: Path) -> Credential:
    if kind == "rabbitmq":
        check_private(path)
        return Credential(kind, path.name, path, _digest(path), _rabbitmq(path))
    if kind == "sqs":
        if not path.is_dir():
            raise CredentialError(f"{path}: an SQS credential is a folder (credentials, config)")
        parts = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        return Credential(kind, path.name, path, _digest(*parts), _sqs(path))
    if path.suffix != ".json":
        raise CredentialError(f"{path}: a Pub/Sub credential is a <name>.json key file")
    check_private(path)
    return Credential(kind, path.stem, path, _digest(path), _pubsub(path))


def scan(certs: Path) -> tuple[dict[str, Credential], dict[str, str]]:
    """Every credential under ``certs``, by ident; and the refused ones, ident -> reason."""
    found: dict[str, Credential] = {}
    refused: dict[str, str] = {}
    for kind in KINDS:
        for path in _visible(certs / kind):
            ident = f"{kind}/{path.stem if kind == 'pubsub' else path.name}"
            try:
                credential = _load(kind, path)
            except (CredentialError, OSError) as exc:
                refused[ident] = str(exc)
                continue
            found[credential.ident] = credential
    return found, refused
