"""Encrypted, signed experiments with a running agent: the real 0.0.49 client's ``studio run``
with ``public_key_path`` and ``signing_key_path`` over RabbitMQ and S3, envelopes of the client's
own ``EncryptedPayloadBuilder`` through key rotation, and no secret left in any log or file."""

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.message_keys import PRIVATE_KEY
from agent.queues.local import enqueue
from agent.submit import Submission, prepare
from tests.conftest import AgentProcess, Layout, client_env, client_read_back, wait_until
from tests.integration.test_studioml_rmq_s3 import client_config, rabbitmq_layout, studio_run
from tests.sealing import Keys, client_seal, install_decryption_key, install_signing_key, seal
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server

pytestmark = [pytest.mark.integration]

TRAIN = "import sys, time\ntime.sleep(float(sys.argv[1]))\nprint('slept', sys.argv[1])\n"


@pytest.mark.studioml
@pytest.mark.rabbitmq
@pytest.mark.s3
def test_studio_run_with_keys_is_served_over_rabbitmq_and_s3(
    client_venv: Path,
    rabbitmq: RabbitBroker,
    s3_server: S3Server,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    keys = Keys.generate(4096)
    certs = tmp_path / "certs"
    install_decryption_key(certs, keys, passphrase=b"a long passphrase")
    install_signing_key(certs, "rmq_enc", keys)
    (tmp_path / "client").mkdir()
    public, signing = tmp_path / "client" / "runner.pem", tmp_path / "client" / "signing"
    public.write_bytes(keys.public_pem())
    signing.write_bytes(keys.signing_private_openssh())
    config = client_config(tmp_path / "client.yaml", rabbitmq, s3_server)
    settings = yaml.safe_load(config.read_text())
    settings.update(public_key_path=str(public), signing_key_path=str(signing))
    config.write_text(yaml.safe_dump(settings))

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    env = client_env(client_venv, tmp_path / "studiohome")
    key = "encrypted-rmq-1"
    studio_run(config, workspace, env, "rmq_enc_e2e", key, "0.1")
    agent = start_agent(rabbitmq_layout(layout, rabbitmq, "rmq_enc_e2e"))
    wait_until(lambda: f"experiment {key} completed" in agent.log(), 240, "the run")
    assert agent.stop() == 0
    log = agent.log()
    assert f"signed by {keys.fingerprint}, decrypted: experiment {key}" in log
    assert "a long passphrase" not in log
    paths = client_read_back(client_venv, config, key, workspace, env, "output")["paths"]
    assert "slept 0.1" in (Path(paths["output"]) / "output").read_text()


def clear_message(lay: Layout, seconds: float, **config: Any) -> dict[str, Any]:
    workspace = lay.root / f"ws-{time.monotonic_ns()}"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    sub = Submission(
        workspace, "train.py", [str(seconds)], "local_enc", lay.queue_root, lay.storage
    )
    message = prepare(sub)
    message["experiment"]["resources_needed"].update(cpus=1, ram="1mb", hdd="1mb")
    message["config"].update(config)
    return message


@pytest.mark.studioml
def test_keys_rotate_while_an_encrypted_experiment_runs(
    client_venv: Path,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    tmp_path: Path,
) -> None:
    submitter, old, new = Keys.generate(), Keys.generate(), Keys.generate()
    before, after = Keys(old.rsa, submitter.signer), Keys(new.rsa, submitter.signer)
    lay = layout()
    certs = lay.root / "certs"
    install_decryption_key(certs, old, passphrase=b"first phrase")
    install_signing_key(certs, "local_enc", submitter)
    agent = start_agent(lay)
    agent.wait_for_log(f"message decryption key: {old.decryption_fingerprint}")

    running = clear_message(lay, 6)
    enqueue(lay.queue_root, "local_enc", client_seal(client_venv, running, before, tmp_path / "a"))
    agent.wait_for_log(f"experiment {running['experiment']['key']} from")
    install_decryption_key(certs, new, passphrase=b"second phrase")
    agent.wait_for_log(f"message decryption key: {new.decryption_fingerprint}", timeout=5)
    fresh, stale = clear_message(lay, 0), clear_message(lay, 0)
    enqueue(lay.queue_root, "local_enc", client_seal(client_venv, fresh, after, tmp_path / "b"))
    stale_body = client_seal(client_venv, stale, before, tmp_path / "c")
    enqueue(lay.queue_root, "local_enc", stale_body)

    for message in (running, fresh):
        done = f"experiment {message['experiment']['key']} completed"
        wait_until(lambda d=done: d in agent.log(), 120, done)
    reasons = lay.state_dir / "rejected"
    wait_until(lambda: list(reasons.glob("*.reason.json")), 60, "the stale envelope set aside")
    # Removing the queue's signing key opens it to clear text again (no clear_text: refuse).
    (certs / "queues" / "signing" / "local_enc").unlink()
    agent.wait_for_log("message signing keys by queue prefix: none", timeout=5)
    plain = clear_message(lay, 0)
    enqueue(lay.queue_root, "local_enc", json.dumps(plain).encode())
    wait_until(lambda: f"experiment {plain['experiment']['key']} completed" in agent.log(), 60)
    assert agent.stop() == 0
    log = agent.log()
    rotated = log.index(f"message decryption key: {new.decryption_fingerprint}")
    assert rotated < log.index(f"experiment {running['experiment']['key']} completed")
    (reason_file,) = reasons.glob("*.reason.json")
    reason = json.loads(reason_file.read_text())["reason"]
    assert "payload does not decrypt: its key was not sealed for this agent's key" in reason
    kept = reason_file.with_name(reason_file.name.removesuffix(".reason.json"))
    assert kept.read_bytes() == stale_body  # the envelope as received, nothing decrypted
    assert stale["experiment"]["key"] not in log  # never opened, so never named


def test_no_secret_reaches_a_log_line_or_a_file(
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
) -> None:
    keys = Keys.generate()
    lay = layout()
    passphrase = b"do-not-log-this-phrase"
    install_decryption_key(lay.root / "certs", keys, passphrase=passphrase)
    install_signing_key(lay.root / "certs", "local_enc", keys)
    agent = start_agent(lay)
    agent.wait_for_log(f"message decryption key: {keys.decryption_fingerprint}")
    session = bytes(range(100, 132))
    marker = "tok-9f8e7d6c5b4a-only-inside"
    served = clear_message(lay, 0, env={"API_TOKEN": marker})
    enqueue(lay.queue_root, "local_enc", json.dumps(seal(served, keys, session=session)).encode())
    refused = clear_message(lay, 0, env={"API_TOKEN": marker})
    refused["experiment"]["artifacts"]["output"]["mutable"] = "not a bool"
    enqueue(lay.queue_root, "local_enc", json.dumps(seal(refused, keys, session=session)).encode())
    wait_until(lambda: f"experiment {served['experiment']['key']} completed" in agent.log(), 120)
    wait_until(lambda: list((lay.state_dir / "rejected").glob("*.reason.json")), 60)
    assert agent.stop() == 0

    installed = (lay.root / "certs" / PRIVATE_KEY).read_bytes().splitlines()
    clear_key = keys.private_pem().splitlines()
    key_lines = [line for line in (*installed[4:8], *clear_key[1:5]) if len(line) > 40]
    assert len(key_lines) == 8
    secrets = {
        "the session key": [session, base64.b64encode(session), session.hex().encode()],
        "the clear request": [json.dumps(served).encode(), json.dumps(refused).encode()],
        "a value only the clear request holds": [marker.encode()],
        "the private key": key_lines,
        "the passphrase": [passphrase],
    }
    searched = [agent.log_path, *files_under(lay.state_dir), *files_under(lay.storage)]
    assert len(searched) > 5
    for path in searched:
        data = path.read_bytes()
        for what, forms in secrets.items():
            assert not any(form in data for form in forms), f"{what} is in {path}"


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
