"""The message keys in the certs directory: formats, passphrases, permission checks, the
longest-prefix rule, reloads, and refusals that name the file but never its content."""

import logging
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.message_keys import PASSPHRASE, PRIVATE_KEY, SIGNING, KeyRing, load
from tests.sealing import Keys, install_decryption_key, install_signing_key

KEYS = Keys.generate()
NO_PASSPHRASE = serialization.NoEncryption()


def test_a_clear_and_a_passphrase_protected_key_both_load(tmp_path: Path) -> None:
    clear, protected = tmp_path / "clear", tmp_path / "protected"
    install_decryption_key(clear, KEYS)
    install_decryption_key(protected, KEYS, passphrase=b"correct horse")
    for certs in (clear, protected):
        keys = load(certs)
        assert keys.refused == {}
        assert keys.decryption is not None
        assert keys.describe()["decryption_key"] == KEYS.decryption_fingerprint


def test_an_openssh_format_rsa_key_loads_and_a_protected_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / PRIVATE_KEY
    path.parent.mkdir(parents=True)
    openssh = serialization.PrivateFormat.OpenSSH
    path.write_bytes(KEYS.rsa.private_bytes(serialization.Encoding.PEM, openssh, NO_PASSPHRASE))
    path.chmod(0o600)
    assert load(tmp_path).decryption is not None
    # What `ssh-keygen -t rsa` writes by default: OpenSSH format, its passphrase under bcrypt.
    install_decryption_key(tmp_path, KEYS, b"pw")
    path.unlink()
    keygen = ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "pw", "-f", str(path)]
    subprocess.run(keygen, check=True, capture_output=True)
    keys = load(tmp_path)
    assert keys.decryption is None
    assert "a passphrase-protected OpenSSH key; use PEM" in keys.refused[str(PRIVATE_KEY)]


@pytest.mark.parametrize(
    ("arrange", "reason"),
    [
        ("wrong passphrase", "cannot be read with the passphrase"),
        ("no passphrase", f"encrypted, and {PASSPHRASE} is missing"),
        ("readable key", "mode 0640 lets group or others read it"),
        ("readable passphrase", "mode 0644 lets group or others read it"),
        ("not a key", "not a PEM or OpenSSH private key"),
        ("ed25519 key", "not an RSA private key"),
        ("small key", "RSA key of 1024 bits; at least 2048"),
    ],
)
def test_an_unusable_decryption_key_is_refused_naming_the_file(
    tmp_path: Path, arrange: str, reason: str
) -> None:
    install_decryption_key(tmp_path, KEYS, passphrase=b"the secret phrase")
    key_file, phrase_file = tmp_path / PRIVATE_KEY, tmp_path / PASSPHRASE
    if arrange == "wrong passphrase":
        phrase_file.write_bytes(b"not it\n")
    elif arrange == "no passphrase":
        phrase_file.unlink()
    elif arrange == "readable key":
        key_file.chmod(0o640)
    elif arrange == "readable passphrase":
        phrase_file.chmod(0o644)
    elif arrange == "not a key":
        key_file.write_bytes(b"the secret phrase, but not a key\n")
    elif arrange == "ed25519 key":
        key_file.write_bytes(KEYS.signing_private_openssh())
    else:
        key_file.write_bytes(Keys.generate(1024).private_pem(b"the secret phrase"))
    keys = load(tmp_path)
    assert keys.decryption is None
    refused = keys.refused[str(PRIVATE_KEY)]
    assert reason in refused
    assert str(key_file) in refused or str(phrase_file) in refused
    assert "the secret phrase" not in refused
    assert "PRIVATE KEY" not in refused


def test_signing_keys_choose_by_the_longest_queue_prefix(tmp_path: Path) -> None:
    broad, narrow = Keys.generate(), Keys.generate()
    install_signing_key(tmp_path, "rmq_", broad)
    install_signing_key(tmp_path, "rmq_cpu_andrei_", narrow)
    keys = load(tmp_path)
    assert keys.refused == {}
    chosen = keys.signer_for("rmq_cpu_andrei_7")
    assert chosen is not None
    assert (chosen.prefix, chosen.fingerprint) == ("rmq_cpu_andrei_", narrow.fingerprint)
    other = keys.signer_for("rmq_gpu")
    assert other is not None
    assert other.fingerprint == broad.fingerprint
    assert keys.signer_for("sqs_x") is None


def test_fingerprints_are_the_ones_ssh_keygen_prints(tmp_path: Path) -> None:
    path = install_signing_key(tmp_path, "rmq_", KEYS)
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    assert printed == KEYS.fingerprint
    assert load(tmp_path).signers[0].fingerprint == printed


@pytest.mark.parametrize(
    ("content", "mode", "reason"),
    [
        (None, 0o664, "mode 0664 lets group or others change it"),
        (b"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x\n", 0o644, "one 'ssh-ed25519 AAAA...'"),
        (b"ssh-ed25519 AAAAnotbase64!!\n", 0o644, "not a valid ssh-ed25519 public key"),
        (b"", 0o644, "one 'ssh-ed25519 AAAA...'"),
    ],
)
def test_an_unusable_signing_key_is_refused_and_the_others_still_load(
    tmp_path: Path, content: bytes | None, mode: int, reason: str
) -> None:
    install_signing_key(tmp_path, "sqs_", KEYS)
    bad = install_signing_key(tmp_path, "rmq_", KEYS, mode=mode)
    if content is not None:
        bad.write_bytes(content)
    keys = load(tmp_path)
    assert reason in keys.refused[str(SIGNING / "rmq_")]
    assert [s.prefix for s in keys.signers] == ["sqs_"]
    assert keys.signer_for("rmq_x") is None  # the refused key's queues take no encrypted work


def test_the_ring_reloads_only_on_a_change_and_reports_each_refusal_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ring = KeyRing()
    assert ring.sync(tmp_path)  # the first load
    assert not ring.sync(tmp_path)
    install_decryption_key(tmp_path, KEYS)
    with caplog.at_level(logging.INFO):
        assert ring.sync(tmp_path)
        assert not ring.sync(tmp_path)
    assert f"message decryption key: {KEYS.decryption_fingerprint}" in caplog.text
    rotated = Keys.generate()
    install_decryption_key(tmp_path, rotated)
    assert ring.sync(tmp_path)
    assert ring.keys.describe()["decryption_key"] == rotated.decryption_fingerprint
    caplog.clear()
    (tmp_path / PRIVATE_KEY).chmod(0o644)  # a mode change alone is a change
    with caplog.at_level(logging.INFO):
        assert ring.sync(tmp_path)
        assert not ring.sync(tmp_path)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert ring.keys.decryption is None
    (tmp_path / PRIVATE_KEY).unlink()
    assert ring.sync(tmp_path)
    assert ring.keys.refused == {}


def test_a_key_replaced_while_the_ring_reads_is_read_again_on_the_next_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator installs the passphrase, then its key; the agent may wake between the two."""
    import agent.message_keys as message_keys

    install_decryption_key(tmp_path, KEYS, passphrase=b"first phrase")
    ring = KeyRing()
    assert ring.sync(tmp_path)
    rotated = Keys.generate()
    (tmp_path / PASSPHRASE).write_bytes(b"second phrase\n")
    read_key = message_keys._private_key

    def read_then_the_key_lands(certs: Path) -> object:
        try:
            return read_key(certs)  # the old key with the new passphrase: refused
        finally:
            install_decryption_key(tmp_path, rotated, passphrase=b"second phrase")

    monkeypatch.setattr(message_keys, "_private_key", read_then_the_key_lands)
    assert ring.sync(tmp_path)
    assert ring.keys.decryption is None
    monkeypatch.setattr(message_keys, "_private_key", read_key)
    assert ring.sync(tmp_path), "the key that landed during the read was never read"
    assert ring.keys.describe()["decryption_key"] == rotated.decryption_fingerprint
