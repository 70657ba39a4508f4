"""Encrypted and signed messages: the envelope of the StudioML 0.0.49 client's
``EncryptedPayloadBuilder`` (config ``public_key_path`` and ``signing_key_path``), which the Go
runner read too (GO21 ``internal/defense``)::

    {"message": {"experiment": {"status", "pythonver"}, "time_added", "experiment_lifetime",
                 "resources_needed", "payload", "signature", "fingerprint"}}

``payload`` is ``b64(RSA-OAEP-SHA256(session key)) + "," + b64(nonce || secretbox)`` of the clear
request's JSON; ``signature`` is base64 of the Ed25519 signature of the ``payload`` string's
UTF-8 bytes (raw 64 bytes, or SSH wire form as Go accepted); ``fingerprint`` is the signer's
OpenSSH SHA256 fingerprint.

The order is the Go runner's, made strict: the clear fields are read first (admission uses them
before any decryption), the signature is checked against the key of the delivery's queue, and only
then is the payload decrypted, and the clear fields must agree with what it holds. Every refusal
is a ``BadRequest`` whose reason quotes neither the clear request nor any key.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agent.errors import BadRequest
from agent.message_keys import SIGNING, Signer
from agent.request import LooseStr, Request, Resources

if TYPE_CHECKING:  # the crypto libraries are imported when a key or an envelope needs them
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

SESSION_KEY = 32  # nacl.secret.SecretBox.KEY_SIZE
ED25519_SIGNATURE = 64
_SSH_ALGORITHM = b"ssh-ed25519"


class ClearExperiment(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Annotated[LooseStr, StringConstraints(max_length=64)] | None = None
    pythonver: Annotated[LooseStr, StringConstraints(max_length=32)] | None = None


class Sealed(BaseModel):
    """The envelope's ``message``: what can be read without the keys, and the sealed payload."""

    model_config = ConfigDict(extra="ignore")
    experiment: ClearExperiment = Field(default_factory=ClearExperiment)
    time_added: float | None = None
    experiment_lifetime: Annotated[LooseStr, StringConstraints(max_length=64)] | None = None
    resources_needed: Resources | None = None
    payload: str  # bounded by the body's own limit (max_message_size)
    signature: Annotated[str, StringConstraints(max_length=512)] | None = None
    fingerprint: Annotated[str, StringConstraints(max_length=128)] | None = None

    @property
    def resources(self) -> Resources:
        return self.resources_needed or Resources()


def verify(sealed: Sealed, queue: str, signer: Signer | None) -> None:
    """Check that the envelope is signed by the key chosen for ``queue``; BadRequest if not."""
    if signer is None:
        raise BadRequest(
            f"unknown signer: no key in {SIGNING}/ has a prefix of queue {queue[:120]!r}, "
            "and an encrypted message is opened only once its signature verifies"
        )
    if not sealed.signature or not sealed.fingerprint:
        raise BadRequest("not signed: the envelope has no signature or no fingerprint")
    named = sealed.fingerprint[:80]
    try:
        signed = sealed.payload.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: nobody signed that
        raise BadRequest("bad signature: the payload is not valid UTF-8 text") from None
    from cryptography.exceptions import InvalidSignature

    try:
        signer.key.verify(_signature_bytes(sealed.signature), signed)
        verified = True
    except InvalidSignature:
        verified = False
    where = f"{SIGNING}/{signer.prefix}"
    if sealed.fingerprint != signer.fingerprint:
        if verified:
            raise BadRequest(
                f"fingerprint mismatch: the envelope names {named!r}, but it is signed by the "
                f"queue's key {signer.fingerprint} ({where})"
            )
        raise BadRequest(
            f"unknown signer {named!r}: the queue's key is {signer.fingerprint} ({where})"
        )
    if not verified:
        raise BadRequest(f"bad signature: it does not verify with {signer.fingerprint} ({where})")


def _signature_bytes(text: str) -> bytes:
    raw = _b64("signature", text)
    if len(raw) == ED25519_SIGNATURE:
        return raw
    # SSH wire form: string "ssh-ed25519", string signature (each a 4-byte length, then bytes).
    algorithm, rest = _ssh_string(raw)
    blob, tail = _ssh_string(rest)
    if algorithm != _SSH_ALGORITHM or len(blob) != ED25519_SIGNATURE or tail:
        raise BadRequest("bad signature: neither 64 bytes nor an SSH ssh-ed25519 signature")
    return blob


def _ssh_string(data: bytes) -> tuple[bytes, bytes]:
    size = int.from_bytes(data[:4], "big")
    if len(data) < 4 + size:
        raise BadRequest("bad signature: a truncated SSH signature")
    return data[4 : 4 + size], data[4 + size :]


def _b64(what: str, text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not base64") from None


def decrypt(sealed: Sealed, key: RSAPrivateKey | None) -> bytes:
    """The clear request's bytes; BadRequest if they cannot be had with ``key``."""
    if key is None:
        raise BadRequest(
            "this agent has no decryption key (certs/message/encryption/ssh-privatekey)"
        )
    import nacl.exceptions
    import nacl.secret
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    sealed_key, comma, sealed_data = sealed.payload.partition(",")
    if not comma:
        raise BadRequest("payload is not '<encrypted key>,<encrypted data>'")
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    try:
        session = key.decrypt(_b64("the payload's key", sealed_key), oaep)
    except ValueError:
        raise BadRequest(
            "payload does not decrypt: its key was not sealed for this agent's key"
        ) from None
    if len(session) != SESSION_KEY:
        raise BadRequest(f"payload does not decrypt: a session key of {len(session)} bytes")
    try:
        return nacl.secret.SecretBox(session).decrypt(_b64("the payload's data", sealed_data))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise BadRequest("payload does not decrypt: the data fails its authentication") from None


def check_agrees(sealed: Sealed, request: Request) -> None:
    """The clear fields (used for admission) must say what the encrypted request says."""
    inner = request.experiment
    if sealed.resources.model_dump() != inner.resources_needed.model_dump():
        raise BadRequest("the envelope's resources_needed differ from the encrypted request's")
    if sealed.experiment_lifetime != inner.max_duration:
        raise BadRequest(
            "the envelope's experiment_lifetime differs from the encrypted max_duration"
        )
    if sealed.time_added is not None and sealed.time_added != inner.time_added:
        raise BadRequest("the envelope's time_added differs from the encrypted request's")
