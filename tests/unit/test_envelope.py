"""Encrypted and signed messages at the gate: what is opened, every refusal and its reason, the
queue policy for clear text, admission on the clear fields before decrypting, and no secret in
any reason or log line."""

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import envelope
from agent.envelope import Sealed
from agent.errors import BadRequest
from agent.gate import Gate, Ticket
from agent.gpus import Inventory
from agent.intake import read_message
from agent.message_keys import SIGNING, MessageKeys, Signer
from agent.queues.base import QueueFilter
from agent.queues.local import LocalQueue, enqueue
from agent.report.events import Events
from agent.request import Resources
from agent.resources import Admission, Capacity
from agent.settlement import Settlement
from agent.submit import Submission, prepare
from tests.conftest import Layout, write_workspace
from tests.sealing import Keys, install_decryption_key, install_signing_key, seal

AGENT, SUBMITTER, STRANGER = Keys.generate(), Keys.generate(), Keys.generate()
QUEUE = "local_secure"
SECRET = "s3cr3t-arg-only-inside-the-envelope"


def clear_message(lay: Layout, **resources: object) -> dict[str, Any]:
    workspace = write_workspace(lay.root / "ws", "print('hi')")
    sub = Submission(workspace, "train.py", [SECRET], QUEUE, lay.queue_root, lay.storage)
    sub.max_duration = "20m"
    message = prepare(sub)
    message["experiment"]["resources_needed"].update(cpus=1, ram="1mb", hdd="1mb", **resources)
    return message


@pytest.fixture
def gate(layout: Callable[..., Layout]) -> Callable[..., tuple[Gate, Layout]]:
    def make(**overrides: object) -> tuple[Gate, Layout]:
        lay = layout(**overrides)
        settings = lay.settings()
        assert settings.certs_dir is not None
        capacity = Capacity(8, 64 * 2**30, lay.root, 0, lambda _: (2**40, 2**40))
        admission = Admission(Inventory((), "no driver"), capacity)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        return Gate(settings, admission, Events()), lay

    return make


def offer(gate: Gate, lay: Layout, body: bytes, queue: str = QUEUE) -> Ticket | Settlement:
    """Enqueue ``body`` on a local queue and pass its delivery through the gate."""
    assert lay.settings().certs_dir is not None
    gate.keys.sync(lay.root / "certs")
    enqueue(lay.queue_root, queue, body)
    backend = LocalQueue(lay.queue_root, lay.state_dir, QueueFilter(r"^local_"))
    delivery = backend.receive()
    assert delivery is not None
    return gate.admit(backend, delivery)


def keyed(lay: Layout, passphrase: bytes | None = None) -> None:
    install_decryption_key(lay.root / "certs", AGENT, passphrase)
    install_signing_key(lay.root / "certs", "local_sec", SUBMITTER)


def test_a_signed_envelope_opens_to_its_request(
    gate: Callable[..., tuple[Gate, Layout]], caplog: pytest.LogCaptureFixture
) -> None:
    g, lay = gate()
    keyed(lay, passphrase=b"phrase")
    clear = clear_message(lay)
    with caplog.at_level(logging.DEBUG):
        ticket = offer(g, lay, json.dumps(seal(clear, AGENT, SUBMITTER)).encode())
    assert isinstance(ticket, Ticket), ticket
    assert ticket.request.key == clear["experiment"]["key"]
    assert ticket.request.experiment.args == [SECRET]
    assert ticket.grant.key == ticket.request.key
    assert SECRET not in caplog.text


def refusal_of(result: Ticket | Settlement) -> str:
    assert isinstance(result, Settlement), result
    assert result.action == "set_aside"
    return result.reason


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered payload", "bad signature: it does not verify with"),
        ("other signer", "unknown signer"),
        ("wrong fingerprint", "fingerprint mismatch: the envelope names"),
        ("unsigned", "not signed"),
        ("sealed for another agent", "payload does not decrypt: its key was not sealed"),
        ("tampered data", "fails its authentication"),
        ("resources disagree", "resources_needed differ from the encrypted request's"),
        ("lifetime disagrees", "experiment_lifetime differs"),
        ("not a request", "encrypted message refused: experiment.key"),
        ("signature not base64", "signature is not base64"),
        ("queue without a signing key", "unknown signer: no key in queues/signing/"),
        ("payload with a lone surrogate", "the payload is not valid UTF-8 text"),
    ],
)
def test_each_refusal_sets_the_envelope_aside_with_its_reason(
    gate: Callable[..., tuple[Gate, Layout]],
    caplog: pytest.LogCaptureFixture,
    case: str,
    reason: str,
) -> None:
    g, lay = gate()
    keyed(lay)
    clear = clear_message(lay)
    envelope = build(case, clear)
    queue = "local_open" if case == "queue without a signing key" else QUEUE
    with caplog.at_level(logging.DEBUG):
        refused = refusal_of(offer(g, lay, json.dumps(envelope).encode(), queue))
    assert reason in refused
    assert SECRET not in refused
    assert SECRET not in caplog.text
    assert "PRIVATE KEY" not in refused


def build(case: str, clear: dict[str, Any]) -> dict[str, Any]:
    if case == "tampered payload":
        return seal(clear, AGENT, SUBMITTER, tamper="payload")
    if case == "other signer":
        return seal(clear, AGENT, STRANGER)
    if case == "wrong fingerprint":
        return seal(clear, AGENT, SUBMITTER, fingerprint=STRANGER.fingerprint)
    if case == "sealed for another agent":
        return seal(clear, STRANGER, SUBMITTER)
    if case == "tampered data":
        return seal(clear, AGENT, SUBMITTER, tamper="data")
    if case == "not a request":
        del clear["experiment"]["key"]
        return seal(clear, AGENT, SUBMITTER)
    envelope = seal(clear, AGENT, SUBMITTER)
    message = envelope["message"]
    if case == "unsigned":
        del message["signature"]
    elif case == "resources disagree":
        message["resources_needed"] = {**message["resources_needed"], "cpus": 0}
    elif case == "lifetime disagrees":
        message["experiment_lifetime"] = "96h"
    elif case == "signature not base64":
        message["signature"] = "*" * 88
    elif case == "payload with a lone surrogate":
        message["payload"] += "\ud800"
    return envelope


def test_an_ssh_wire_signature_is_accepted_as_the_go_runner_did(
    gate: Callable[..., tuple[Gate, Layout]],
) -> None:
    g, lay = gate()
    keyed(lay)
    envelope = seal(clear_message(lay), AGENT, SUBMITTER)
    raw = base64.b64decode(envelope["message"]["signature"])
    wire = b"".join(len(p).to_bytes(4, "big") + p for p in (b"ssh-ed25519", raw))
    envelope["message"]["signature"] = base64.b64encode(wire).decode()
    assert isinstance(offer(g, lay, json.dumps(envelope).encode()), Ticket)


def test_no_decryption_key_is_a_refusal_not_a_crash(
    gate: Callable[..., tuple[Gate, Layout]],
) -> None:
    g, lay = gate()
    install_signing_key(lay.root / "certs", "local_", SUBMITTER)
    envelope = seal(clear_message(lay), AGENT, SUBMITTER)
    refused = refusal_of(offer(g, lay, json.dumps(envelope).encode()))
    assert "this agent has no decryption key" in refused


def test_the_clear_fields_are_admitted_before_anything_is_decrypted(
    gate: Callable[..., tuple[Gate, Layout]],
) -> None:
    g, lay = gate()
    keyed(lay)
    # Sealed for a stranger: decrypting it would set it aside. Asking for a GPU this machine
    # lacks, it must go back to its queue on its clear fields alone, never opened.
    envelope = seal(clear_message(lay, gpus=1), STRANGER, SUBMITTER)
    result = offer(g, lay, json.dumps(envelope).encode())
    assert isinstance(result, Settlement)
    assert (result.action, result.excused) == ("return", True)
    assert "GPU" in result.reason


def test_a_refused_envelope_gives_back_what_admission_reserved(
    gate: Callable[..., tuple[Gate, Layout]],
) -> None:
    g, lay = gate()
    keyed(lay)
    envelope = seal(clear_message(lay), STRANGER, SUBMITTER)
    refusal_of(offer(g, lay, json.dumps(envelope).encode()))
    verdict = g.admission.admit("probe", Resources(cpus=8))
    assert verdict.grant is not None  # all 8 CPUs are free again


@pytest.mark.parametrize(
    ("queue", "overrides", "refused"),
    [
        (QUEUE, {}, f"clear text on queue 'local_secure', which has a signing key ({SIGNING}/"),
        ("local_open", {"clear_text": "refuse"}, "clear text refused (clear_text: refuse)"),
        ("local_open", {}, ""),
    ],
)
def test_clear_text_policy(
    gate: Callable[..., tuple[Gate, Layout]],
    queue: str,
    overrides: dict[str, object],
    refused: str,
) -> None:
    g, lay = gate(**overrides)
    keyed(lay)
    result = offer(g, lay, json.dumps(clear_message(lay)).encode(), queue)
    if refused:
        assert refused in refusal_of(result)
    else:
        assert isinstance(result, Ticket)


_TEXT = st.text(max_size=80) | st.sampled_from(["", ",", "AAAA,AAAA", "=" * 8])
_ENVELOPE = st.fixed_dictionaries(
    {"payload": _TEXT},
    optional={
        "signature": _TEXT | st.integers() | st.none(),
        "fingerprint": _TEXT | st.none(),
        "resources_needed": st.dictionaries(st.sampled_from(["cpus", "gpus", "ram"]), _TEXT),
        "experiment_lifetime": _TEXT | st.floats() | st.none(),
        "time_added": st.floats() | _TEXT,
        "experiment": st.dictionaries(st.sampled_from(["status", "pythonver"]), _TEXT),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=_ENVELOPE | st.lists(st.integers()) | st.text())
def test_a_hostile_envelope_is_set_aside_and_never_raises(message: object) -> None:
    body = json.dumps({"message": message}).encode()
    try:
        opened = read_message(body)
    except BadRequest:
        return
    assert isinstance(opened, Sealed)
    signer = HOSTILE_KEYS.signer_for(QUEUE)
    with pytest.raises(BadRequest):
        envelope.verify(opened, QUEUE, signer)
    with pytest.raises(BadRequest):  # were a forged one verified, it still could not be opened
        envelope.decrypt(opened, AGENT.rsa)


HOSTILE_KEYS = MessageKeys(
    AGENT.rsa, (Signer("local_", SUBMITTER.signer.public_key(), SUBMITTER.fingerprint),)
)
