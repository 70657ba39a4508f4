"""Keys and envelopes for the encrypted-message tests.

``seal`` builds an envelope from the format's description (agent/envelope.py), with its parts
open to tampering; ``client_seal`` has the StudioML 0.0.49 client's own
``EncryptedPayloadBuilder`` build one, in the client's virtualenv, so the two are checked
against each other by the tests that use both.
"""

import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.secret
import nacl.utils
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from agent.message_keys import PASSPHRASE, PRIVATE_KEY, SIGNING, fingerprint_of

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass
class Keys:
    """The agent's RSA key pair and a submitter's Ed25519 key, each as objects and as files."""

    rsa: rsa.RSAPrivateKey
    signer: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls, bits: int = 2048) -> "Keys":
        return cls(
            rsa.generate_private_key(public_exponent=65537, key_size=bits),
            ed25519.Ed25519PrivateKey.generate(),
        )

    def private_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#1 PEM, as the Go runner's docs make it (``openssl genrsa -aes256``)."""
        protect = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self.rsa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, protect
        )

    def public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def signing_line(self) -> bytes:
        """The submitter's public key as certs/queues/signing/<prefix> holds it."""
        return self.signer.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )

    def signing_private_openssh(self) -> bytes:
        """The submitter's key as the client's ``signing_key_path`` wants it."""
        return self.signer.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.signer.public_key())

    @property
    def decryption_fingerprint(self) -> str:
        return fingerprint_of(self.rsa.public_key())


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.chmod(mode)
    os.replace(temporary, path)  # as an operator's `install -m 600` or a secret mount would


def install_decryption_key(certs: Path, keys: Keys, passphrase: bytes | None = None) -> None:
    if passphrase:
        _write_private(certs / PASSPHRASE, passphrase + b"\n")
    _write_private(certs / PRIVATE_KEY, keys.private_pem(passphrase))


def install_signing_key(certs: Path, prefix: str, keys: Keys, mode: int = 0o644) -> Path:
    path = certs / SIGNING / prefix
    _write_private(path, keys.signing_line() + b" submitter@example\n", mode)
    return path


def seal(
    clear: dict[str, Any],
    recipient: Keys,
    signer: Keys | None = None,
    fingerprint: str | None = None,
    tamper: str = "",
    session: bytes | None = None,
) -> dict[str, Any]:
    """The envelope the client builds for ``clear``; ``tamper`` names a part to break."""
    session = session or nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    data = nacl.secret.SecretBox(session).encrypt(json.dumps(clear).encode())
    if tamper == "data":
        data = data[:-1] + bytes([data[-1] ^ 1])
    sealed_key = recipient.rsa.public_key().encrypt(session, _OAEP)
    payload = f"{base64.b64encode(sealed_key).decode()},{base64.b64encode(data).decode()}"
    signing = signer or recipient
    signature = signing.signer.sign(payload.encode())
    if tamper == "payload":
        payload = payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB")
    experiment = clear["experiment"]
    return {
        "message": {
            "experiment": {"status": experiment.get("status"), "pythonver": "3"},
            "time_added": experiment.get("time_added"),
            "experiment_lifetime": experiment.get("max_duration"),
            "resources_needed": experiment.get("resources_needed"),
            "payload": payload,
            "signature": base64.b64encode(signature).decode(),
            "fingerprint": fingerprint or signing.fingerprint,
        }
    }


# Run in the client's virtualenv: its EncryptedPayloadBuilder, fed the clear message on stdin.
_CLIENT_SEAL = """
import json, sys
from studio.encrypted_payload_builder import EncryptedPayloadBuilder

class Experiment:  # what construct() reads of the client's Experiment
    def __init__(self, fields):
        self.fields = fields
        for name in ("status", "pythonver", "time_added", "max_duration", "resources_needed"):
            setattr(self, name, fields.get(name))
    def to_dict(self):
        return self.fields

clear = json.load(sys.stdin)
builder = EncryptedPayloadBuilder("test", sys.argv[1], sys.argv[2])
print(json.dumps(builder.construct(Experiment(clear["experiment"]), clear["config"], None)))
"""


def client_seal(client_venv: Path, clear: dict[str, Any], keys: Keys, where: Path) -> bytes:
    """The envelope of the client's own builder for ``clear``, sealed for and signed by ``keys``."""
    where.mkdir(parents=True, exist_ok=True)
    public, signing = where / "runner-public.pem", where / "signing-key"
    public.write_bytes(keys.public_pem())
    signing.write_bytes(keys.signing_private_openssh())
    signing.chmod(0o600)
    built = subprocess.run(
        [str(client_venv / "bin" / "python"), "-c", _CLIENT_SEAL, str(public), str(signing)],
        input=json.dumps(clear),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return built.stdout.strip().splitlines()[-1].encode()
