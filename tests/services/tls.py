"""Throwaway TLS material for the tests' servers: a private CA and a certificate for 127.0.0.1.

Made with ``cryptography`` (already in the dev environment: moto depends on it), in memory, in
a few milliseconds: no ``openssl`` run, no files outside the given folder. The server certificate
names ``IP:127.0.0.1`` and ``DNS:localhost`` and is signed by the CA, so a client that trusts
``ca.pem`` verifies it, and a client that trusts only the system CAs refuses it
(``CERTIFICATE_VERIFY_FAILED``), as it would a real server with a private CA.

Use ``from tests.services.tls import tls_material  # noqa: F401`` (tests/conftest.py does), or
``make_tls_material(folder)`` outside pytest.
"""

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files: the CA's certificate, and the server's certificate and (unencrypted) key."""

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA, hostname checks on."""
        return ssl.create_default_context(cafile=str(self.ca))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "studio-agent tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def make_tls_material(folder: Path) -> TlsMaterial:
    """Write ca.pem, server.pem and server.key into ``folder`` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("studio-agent test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    material = TlsMaterial(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    material.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    material.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    # Written owner-only before the key goes in; the servers run as this same user.
    material.key.touch(mode=0o600)
    material.key.write_bytes(_pem_key(server_key))
    return material


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """One private CA and server certificate for 127.0.0.1, shared by the session's servers."""
    return make_tls_material(tmp_path_factory.mktemp("tls"))
