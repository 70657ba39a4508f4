"""The keys for encrypted and signed messages, from the certs directory (the Go runner's layout):

    certs/message/encryption/ssh-privatekey   the agent's RSA private key (PEM, PKCS#1 or #8, or
                                              OpenSSH), possibly encrypted with the passphrase in
    certs/message/passphrase/ssh-passphrase   (one line; a trailing newline is not part of it)
    certs/queues/signing/<queue prefix>       a submitter's ``ssh-ed25519 AAAA...`` public key,
                                              for the queues whose names start with the prefix

The private key and the passphrase get the credentials' checks (owned by the agent's user, no
access for group or others); a signing key is public, so it may be readable, but it must be the
agent's user's and writable by no one else, as whoever could change it could sign work. A file
that fails a check or does not parse is refused with a log line naming it, never its content;
the others still load. The certs watch reloads them all on any change (``KeyRing.sync``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.credentials import CredentialError, check_private
from agent.report.events import Event, Events

if TYPE_CHECKING:  # imported when a key file is there: 8 MiB and more that no agent needs idle
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

log = logging.getLogger(__name__)

PRIVATE_KEY = Path("message/encryption/ssh-privatekey")
PASSPHRASE = Path("message/passphrase/ssh-passphrase")
SIGNING = Path("queues/signing")
MAX_KEY_FILE = 64 * 1024  # a 16384-bit PEM is about 13 KiB
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Signer:
    """One submitter's public key, for the queues whose names start with ``prefix``."""

    prefix: str
    key: Ed25519PublicKey = field(repr=False)
    fingerprint: str  # OpenSSH's SHA256:..., as the envelope names its signer


@dataclass(frozen=True)
class MessageKeys:
    decryption: RSAPrivateKey | None = field(default=None, repr=False)
    signers: tuple[Signer, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)  # file (relative) -> why
    digest: str = ""  # of every file's bytes and mode: a change is a rotation

    def signer_for(self, queue: str) -> Signer | None:
        """The key of the longest prefix of ``queue`` (the Go runner's rule), or None."""
        matching = [s for s in self.signers if queue.startswith(s.prefix)]
        return max(matching, key=lambda s: len(s.prefix), default=None)

    def describe(self) -> dict[str, Any]:
        """For status.json: which keys are in force (fingerprints only) and what was refused."""
        public = self.decryption.public_key() if self.decryption else None
        return {
            "decryption_key": fingerprint_of(public) if public else None,
            "signers": {s.prefix: s.fingerprint for s in self.signers},
            "refused": dict(self.refused),
        }


def fingerprint_of(public: Any) -> str:
    """OpenSSH's SHA256 fingerprint (``ssh-keygen -l -E sha256``) of a public key."""
    from cryptography.hazmat.primitives import serialization

    wire = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(wire.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load(certs: Path) -> MessageKeys:
    """Every key under ``certs``; what cannot be used is in ``refused`` with the reason."""
    # The digest is taken before the files are read: a file replaced while they are read then
    # leaves a digest that no longer matches, so the next sync reads again. Taken after, it
    # would match the new files while the keys came from the old ones (a passphrase and its
    # key installed one after the other were refused for good).
    digest = _digest(certs)
    refused: dict[str, str] = {}
    decryption = None
    if _exists(certs / PRIVATE_KEY):
        try:
            decryption = _private_key(certs)
        except (CredentialError, OSError) as exc:
            refused[str(PRIVATE_KEY)] = str(exc)
    signers = []
    for path in _visible(certs / SIGNING):
        try:
            signers.append(_signer(path))
        except (CredentialError, OSError) as exc:
            refused[str(SIGNING / path.name)] = str(exc)
    return MessageKeys(decryption, tuple(signers), refused, digest)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _visible(folder: Path) -> list[Path]:
    try:
        return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read(path: Path) -> bytes:
    with path.open("rb") as opened:
        data = opened.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise CredentialError(f"{path}: over {MAX_KEY_FILE} bytes, not a key")
    return data


def _private_key(certs: Path) -> RSAPrivateKey:
    path = certs / PRIVATE_KEY
    check_private(path)
    data = _read(path)
    secret = None
    if _exists(certs / PASSPHRASE):
        check_private(certs / PASSPHRASE)
        secret = _read(certs / PASSPHRASE).rstrip(b"\r\n") or None
    key = _parse_private(path, data, secret)
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    if not isinstance(key, RSAPrivateKey):
        raise CredentialError(f"{path}: a {type(key).__name__}, not an RSA private key")
    if key.key_size < MIN_RSA_BITS:
        raise CredentialError(f"{path}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
    return key


def _parse_private(path: Path, data: bytes, secret: bytes | None) -> Any:
    """PEM or OpenSSH; the library's own errors can echo input, so only ours leave here."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    openssh = data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
    loader = serialization.load_ssh_private_key if openssh else serialization.load_pem_private_key
    try:
        return loader(data, secret)
    except TypeError:  # encrypted without a passphrase, or a passphrase for a clear key
        if secret is None:
            raise CredentialError(f"{path}: encrypted, and {PASSPHRASE} is missing") from None
        return _parse_clear(path, data, loader)
    except ValueError:
        if secret is not None:
            raise CredentialError(
                f"{path}: cannot be read with the passphrase in {PASSPHRASE} (wrong passphrase, "
                "or not a PEM or OpenSSH private key)"
            ) from None
        raise CredentialError(f"{path}: not a PEM or OpenSSH private key") from None
    except UnsupportedAlgorithm:
        if openssh:  # its KDF is bcrypt, which the agent does not ship
            raise CredentialError(
                f"{path}: a passphrase-protected OpenSSH key; use PEM instead "
                "(ssh-keygen -p -m PEM -f <file>)"
            ) from None
        raise CredentialError(f"{path}: a key type or cipher this agent cannot use") from None
    except Exception as exc:
        raise CredentialError(f"{path}: cannot be used ({type(exc).__name__})") from None


def _parse_clear(path: Path, data: bytes, loader: Any) -> Any:
    try:
        return loader(data, None)
    except Exception as exc:
        raise CredentialError(f"{path}: cannot be used ({type(exc).__name__})") from None


def _signer(path: Path) -> Signer:
    _check_not_writable_by_others(path)
    lines = [ln.strip() for ln in _read(path).splitlines()]
    keys = [ln for ln in lines if ln and not ln.startswith(b"#")]
    if len(keys) != 1 or not keys[0].startswith(b"ssh-ed25519 "):
        raise CredentialError(f"{path}: must hold one 'ssh-ed25519 AAAA...' public key line")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        public = serialization.load_ssh_public_key(keys[0])
    except Exception:
        raise CredentialError(f"{path}: not a valid ssh-ed25519 public key") from None
    if not isinstance(public, Ed25519PublicKey):
        raise CredentialError(f"{path}: not an ed25519 key")
    return Signer(path.name, public, fingerprint_of(public))


def _check_not_writable_by_others(path: Path) -> None:
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise CredentialError(f"{path}: owned by uid {info.st_uid}, not by the agent's user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        raise CredentialError(f"{path}: mode {mode:04o} lets group or others change it")


def _digest(certs: Path) -> str:
    """Of every key file's name, mode, owner and bytes; unreadable ones count by name."""
    sha = hashlib.sha256()
    files = [certs / PRIVATE_KEY, certs / PASSPHRASE, *_visible(certs / SIGNING)]
    for path in files:
        sha.update(str(path).encode() + b"\0")
        try:
            info = path.stat()
            sha.update(f"{info.st_mode}:{info.st_uid}:".encode() + _read(path))
        except (OSError, CredentialError):
            sha.update(b"-")
    return sha.hexdigest()


class KeyRing:
    """The keys in force; ``sync`` reloads them when the files changed and says what changed."""

    def __init__(self, events: Events | None = None):
        self.events = events or Events()
        self.keys = MessageKeys()

    def sync(self, certs: Path) -> bool:
        """Reload from ``certs`` if any key file changed; True if anything did."""
        if _digest(certs) == self.keys.digest:
            return False
        before, self.keys = self.keys, load(certs)
        for name, reason in self.keys.refused.items():
            if before.refused.get(name) != reason:
                self._report_refused(name, reason)
        self._say_changes(before, self.keys)
        return True

    def _say_changes(self, before: MessageKeys, after: MessageKeys) -> None:
        old = before.describe()
        new = after.describe()
        if old["decryption_key"] != new["decryption_key"]:
            log.info("message decryption key: %s", new["decryption_key"] or "none")
        if old["signers"] != new["signers"]:
            shown = ", ".join(f"{p!r} {f}" for p, f in new["signers"].items()) or "none"
            log.info("message signing keys by queue prefix: %s", shown)

    def _report_refused(self, name: str, reason: str) -> None:
        self.events.emit(
            Event(
                "credential_refused",
                f"message key {name} refused: {reason}",
                {"CREDENTIAL": name},
                level=logging.ERROR,
            )
        )
