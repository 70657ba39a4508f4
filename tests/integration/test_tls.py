"""TLS with a private CA: ``amqps://`` and an HTTPS management API, and S3 over HTTPS.

The servers are the session's own (tests/services): the RabbitMQ node's TLS listeners and a
second moto server serving HTTPS, both with a certificate for 127.0.0.1 signed by a throwaway
CA (tests/services/tls.py) that no system trust store holds. So the agent succeeds only by
trusting that CA through ``amqp_ca_file`` / ``s3_ca_bundle``, and must refuse the servers, with
a certificate error and without crashing, when it is not given it.
"""

import os
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import StorageUnavailable
from agent.queues.local import enqueue
from agent.request import Artifact, StudioConfig
from agent.storage import resolve
from agent.storage.base import StorageOptions
from agent.storage.s3 import S3Storage
from agent.storage.transfer import fetch, upload
from tests.conftest import AgentProcess, Layout, wait_until
from tests.integration.test_rabbitmq_agent import COUNTED, finished, queue_depth, submit_rmq
from tests.s3_requests import s3_message
from tests.services.rabbitmq import RabbitBroker
from tests.services.s3 import S3Server
from tests.services.tls import TlsMaterial

pytestmark = [pytest.mark.integration, pytest.mark.tls]

Start = Callable[[Layout], AgentProcess]
MiB = 2**20
CERT_FAILURE = "certificate verify failed"  # OpenSSL's words, in every refusal below


def tls_layout(layout: Callable[..., Layout], queue: str, **extra: object) -> Layout:
    """An agent config serving only ``queue`` (the broker is the session's, shared)."""
    return layout(amqp_refresh="1s", queue_match=f"^{queue}$", **extra)


def agent_tls_connections(broker: RabbitBroker) -> list[dict[str, object]]:
    """Connections the broker accepted on its AMQPS listener, as its management API lists them.

    One closed by an earlier test may linger for 30 s (see tests/services/rabbitmq.py).
    """
    return [c for c in broker.api("/api/connections") or [] if c.get("port") == broker.amqps_port]


def tls_connection_names(broker: RabbitBroker) -> set[str]:
    return {str(c["name"]) for c in agent_tls_connections(broker)}


def refusals(log: str) -> list[str]:
    """The agent's own lines about a refused certificate (pika logs its own errors too)."""
    return [line for line in log.splitlines() if CERT_FAILURE in line and " agent.queues." in line]


# -- RabbitMQ ---------------------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_serves_a_queue_over_amqps_and_https_management_with_a_private_ca(
    rabbitmq: RabbitBroker,
    tls_material: TlsMaterial,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    lay = tls_layout(
        layout,
        "rmq_tls",
        amqp_url=rabbitmq.amqps_url,
        amqp_mgmt_url=rabbitmq.mgmt_https_url,
        amqp_ca_file=str(tls_material.ca),
    )
    runs = tmp_path / "runs"
    request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_tls")
    agent = start_agent(lay)
    wait_until(lambda: finished(lay, request.key), what="experiment finished")

    # The agent holds a TLS connection on the AMQPS port (listed about 1 s late).
    def open_now() -> list[dict[str, object]]:
        return [c for c in agent_tls_connections(rabbitmq) if c.get("state") != "closed"]

    wait_until(open_now, timeout=10, what="an open AMQPS connection")
    assert all(c["ssl"] is True for c in open_now())
    assert agent.stop() == 0
    assert runs.read_text().splitlines() == [request.key]
    assert queue_depth(rabbitmq, "rmq_tls") == 0
    log = agent.log()
    assert f"connected to amqps://guest:***@127.0.0.1:{rabbitmq.amqps_port}/%2f" in log
    assert "serving queues rmq_tls" in log  # found through the HTTPS management API
    assert "management API" not in log  # which never failed
    assert "guest:guest" not in log
    rabbitmq.delete_queue("rmq_tls")


@pytest.mark.rabbitmq
@pytest.mark.parametrize("refused_by", ["management", "amqp"])
def test_without_the_ca_the_broker_is_refused_and_nothing_runs(
    refused_by: str,
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    """No ``amqp_ca_file``: the system CAs do not know the broker's.

    ``management``: discovery over HTTPS is refused first, so no queue is ever served.
    ``amqp``: discovery over plain HTTP works, and the AMQPS connection is refused.
    """
    queue = f"rmq_tls_noca_{refused_by}"
    mgmt = rabbitmq.mgmt_https_url if refused_by == "management" else rabbitmq.mgmt_url
    # At debug level, so that the reconnections said once at WARNING show all the same.
    lay = tls_layout(
        layout, queue, amqp_url=rabbitmq.amqps_url, amqp_mgmt_url=mgmt, log_level="debug"
    )
    runs = tmp_path / "runs"
    request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue=queue)
    earlier = tls_connection_names(rabbitmq)
    agent = start_agent(lay)
    if refused_by == "management":
        expected = f"management API https://guest:***@127.0.0.1:{rabbitmq.mgmt_https_port}"
    else:
        agent.wait_for_log(f"serving queues {queue}")
        expected = f"cannot connect to amqps://guest:***@127.0.0.1:{rabbitmq.amqps_port}/%2f"
    wait_until(lambda: refusals(agent.log()), what="a certificate refusal logged by the agent")
    if refused_by == "amqp":  # the agent keeps trying to reconnect ...
        wait_until(lambda: len(refusals(agent.log())) >= 2, what="a second refusal")
    time.sleep(3)  # several refresh and reconnection rounds, all refused
    said = [line for line in refusals(agent.log()) if " DEBUG " not in line]
    for what in ("management API", "cannot connect"):  # ... and says each once, not every try
        assert len([line for line in said if what in line]) <= 1, said
    assert agent.proc.poll() is None  # refused, not crashed
    assert agent.stop() == 0
    log = agent.log()
    first = refusals(log)[0]
    assert expected in first, first
    assert not runs.exists()
    assert not finished(lay, request.key)
    assert queue_depth(rabbitmq, queue) == 1  # the message never left the broker
    assert tls_connection_names(rabbitmq) <= earlier  # no AMQPS connection was ever opened
    assert "guest:guest" not in log
    rabbitmq.delete_queue(queue)


@pytest.mark.rabbitmq
def test_a_password_with_reserved_characters_over_tls(
    rabbitmq: RabbitBroker,
    tls_material: TlsMaterial,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    """A password with ``@ : / %`` is written percent-encoded in the URLs; AMQP (pika) and the
    management API (Basic auth) must both get it decoded, and no log may show either form."""
    user, password = f"studio-{uuid.uuid4().hex[:8]}", "p@ss:w/rd%"
    encoded = urllib.parse.quote(password, safe="")
    rabbitmq.ctl("add_user", user, password)
    try:
        rabbitmq.ctl("set_user_tags", user, "management")
        rabbitmq.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        lay = tls_layout(
            layout,
            "rmq_tls_user",
            # No amqp_mgmt_url: derived from the AMQPS URL (https, port + 10000) it would not be
            # the test broker's port; give it with the same encoded credentials instead.
            amqp_url=f"amqps://{user}:{encoded}@127.0.0.1:{rabbitmq.amqps_port}/%2f",
            amqp_mgmt_url=f"https://{user}:{encoded}@127.0.0.1:{rabbitmq.mgmt_https_port}",
            amqp_ca_file=str(tls_material.ca),
        )
        runs = tmp_path / "runs"
        request = submit_rmq(rabbitmq, lay, COUNTED, str(runs), "0", queue="rmq_tls_user")
        agent = start_agent(lay)
        wait_until(lambda: finished(lay, request.key), what="experiment finished")
        assert agent.stop() == 0
    finally:
        rabbitmq.ctl("delete_user", user)
    log = agent.log()
    assert f"connected to amqps://{user}:***@127.0.0.1:{rabbitmq.amqps_port}/%2f" in log
    assert "management API" not in log
    assert password not in log
    assert encoded not in log
    rabbitmq.delete_queue("rmq_tls_user")


# -- S3 ---------------------------------------------------------------------------------------


def tls_config(server: S3Server, bucket: str) -> StudioConfig:
    """``config`` as the 0.0.49 client sends it, with an ``https://`` storage endpoint."""
    creds = {"aws": {"access_key": server.access_key, "secret_access_key": server.secret_key}}
    store = {"type": "s3", "endpoint": server.endpoint, "bucket": bucket, "credentials": creds}
    return StudioConfig.model_validate(
        {"database": store, "storage": store, "env": {"AWS_DEFAULT_REGION": server.region}}
    )


def tls_artifact(server: S3Server, bucket: str, key: str) -> Artifact:
    """An artifact whose ``qualified`` URL has lost the scheme, as the client's always has."""
    host = server.endpoint.removeprefix("https://")
    creds = {"access_key": server.access_key, "secret_access_key": server.secret_key}
    return Artifact(
        key=key,
        qualified=f"s3://{host}/{bucket}/{key}",
        bucket=bucket,
        mutable=True,
        unpack=True,
        credentials={"aws": creds},
    )


def write_tree(root: Path) -> dict[str, bytes]:
    """A small file and one over a part, so the upload is a multipart one."""
    files = {"small.txt": b"hello over TLS\n", "sub/big.bin": os.urandom(6 * MiB)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.mark.s3
def test_s3_round_trip_over_https_with_a_private_ca_bundle(
    s3_tls_server: S3Server, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    bucket = s3_tls_server.make_bucket(f"tls-{uuid.uuid4().hex[:12]}")
    config = tls_config(s3_tls_server, bucket)
    art = tls_artifact(s3_tls_server, bucket, "experiments/tls/output.tar")
    options = StorageOptions(s3_ca_bundle=tls_material.ca, s3_part_size=5 * MiB, s3_retries=1)
    store, _ = resolve("output", art, config, options)
    assert isinstance(store, S3Storage)
    # qualified has no scheme: it came from config.storage.endpoint, which names the same server.
    assert store.location.endpoint == s3_tls_server.endpoint
    assert store.location.endpoint.startswith("https://127.0.0.1:")

    files = write_tree(tmp_path / "src")
    sent = upload("output", art, config, tmp_path / "src", options)
    assert sent > 6 * MiB
    got = fetch("output", art, config, tmp_path / "dest", 0, options)
    assert got == sum(len(data) for data in files.values())
    for name, data in files.items():
        assert (tmp_path / "dest" / name).read_bytes() == data


@pytest.mark.s3
def test_s3_over_https_without_the_bundle_is_refused_as_unavailable(
    s3_tls_server: S3Server, tmp_path: Path
) -> None:
    """Without ``s3_ca_bundle`` (system CAs, verification on) the server is refused.

    The agent classes it StorageUnavailable (transient: the message goes back to its queue,
    nothing is rejected for the agent's own misconfiguration), naming the certificate failure
    and the endpoint, never the credentials.
    """
    bucket = s3_tls_server.make_bucket(f"tls-{uuid.uuid4().hex[:12]}")
    config = tls_config(s3_tls_server, bucket)
    art = tls_artifact(s3_tls_server, bucket, "experiments/noca/output.tar")
    s3_tls_server.client().put_object(Bucket=bucket, Key=art.key or "", Body=b"")
    options = StorageOptions(s3_retries=1)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.txt").write_text("never stored")

    with pytest.raises(StorageUnavailable) as uploading:
        upload("output", art, config, tmp_path / "src", options)
    with pytest.raises(StorageUnavailable) as fetching:
        fetch("output", art, config, tmp_path / "dest", 0, options)
    for error in (uploading.value, fetching.value):
        message = str(error)
        assert CERT_FAILURE in message, message
        assert s3_tls_server.endpoint in message
        assert s3_tls_server.access_key not in message
        assert s3_tls_server.secret_key not in message
    # Nothing was written: the object is still the empty one put above.
    body = s3_tls_server.client().get_object(Bucket=bucket, Key=art.key or "")["Body"].read()
    assert body == b""


@pytest.mark.s3
def test_agent_runs_an_experiment_with_artifacts_on_https_s3(
    s3_tls_server: S3Server,
    tls_material: TlsMaterial,
    layout: Callable[..., Layout],
    start_agent: Start,
    tmp_path: Path,
) -> None:
    """The ``s3_ca_bundle`` setting reaches the agent's transfers (download and upload)."""
    key = f"tls-{uuid.uuid4().hex[:8]}"
    lay = layout(s3_ca_bundle=str(tls_material.ca))
    script = "print('hello from', __file__)\n"
    enqueue(lay.queue_root, "local_tls", s3_message(s3_tls_server, key, script, [], tmp_path))
    agent = start_agent(lay)
    wait_until(lambda: "completed" in agent.log(), what="experiment completed")
    assert agent.stop() == 0
    assert lay.queue_files("local_tls") == []
    output = (
        s3_tls_server.client()
        .get_object(Bucket="agent-tests", Key=f"experiments/{key}/output.tar")["Body"]
        .read()
    )
    assert b"hello from" in output
    assert CERT_FAILURE not in agent.log()
