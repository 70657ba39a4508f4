"""A real agent reporting: journal fields, Slack messages, /metrics, and SIGHUP's log level."""

import json
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.report.journal import SOCKET_ENV
from tests.conftest import AgentProcess, Layout, submit_script, wait_until
from tests.unit.test_journal_handler import Journal
from tests.unit.test_slack import Webhook, webhook  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

FAILING_SCRIPT = """
import os
print("epoch 1 loss 0.5")
print("AWS_SECRET_ACCESS_KEY=" + os.environ["AWS_SECRET_ACCESS_KEY"])
raise SystemExit(3)
"""
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


class Collector:
    """Every record the agent sends to the journal socket, parsed, from a reader thread."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.records: list[dict[str, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self.journal.sock.settimeout(0.2)
        while not self._stop:
            try:
                self.records.append(self.journal.receive())
            except TimeoutError:
                continue

    def wait_for(self, predicate: Callable[[dict[str, str]], bool]) -> dict[str, str]:
        found: list[dict[str, str]] = []
        wait_until(lambda: found.extend(r for r in self.records if predicate(r)) or found)
        return found[0]

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Collector]:
    listener = Journal(tmp_path / "journal")
    collector = Collector(listener)
    yield collector
    collector.stop()
    listener.close()


def test_experiment_records_carry_its_journal_fields(
    layout: Callable[..., Layout],
    start_agent: Callable[..., AgentProcess],
    journal: Collector,
) -> None:
    lay = layout(journal_output=True)
    agent = start_agent(lay, {SOCKET_ENV: journal.journal.path})
    request = submit_script(lay, "print('hello from the experiment')\n")
    key = request.key
    done = journal.wait_for(lambda r: r.get("EVENT") == "experiment_finished")
    assert agent.stop() == 0
    started = next(r for r in journal.records if r.get("EVENT") == "experiment_started")
    for record in (started, done):
        assert record["EXPERIMENT_KEY"] == key
        assert record["QUEUE"] == "local_test"
        assert record["BACKEND"] == "local"
        assert record["SYSLOG_IDENTIFIER"] == "studio-agent"
    assert done["OUTCOME"] == "completed"
    assert done["EXIT_CODE"] == "0"
    # Lines logged by the worker thread itself carry the experiment's fields too.
    worker = [r for r in journal.records if r["THREAD_NAME"] == f"exp-{key}"]
    assert any(r["MESSAGE"].startswith(f"experiment {key} started as pid") for r in worker)
    assert all(r["EXPERIMENT_KEY"] == key for r in worker)
    # journal_output: the experiment's own lines, each with the key.
    output = [r for r in journal.records if r.get("OUTPUT") == "1"]
    assert "hello from the experiment" in [r["MESSAGE"] for r in output]
    assert all(r["EXPERIMENT_KEY"] == key for r in output)
    # Records of the agent itself do not carry it.
    ready = next(r for r in journal.records if r.get("EVENT") == "agent_started")
    assert "EXPERIMENT_KEY" not in ready
    assert "hello from the experiment" not in agent.log()  # it went to the journal only


def test_slack_messages_from_a_real_agent_carry_no_secrets(
    layout: Callable[..., Layout],
    start_agent: Callable[..., AgentProcess],
    webhook: Webhook,  # noqa: F811
) -> None:
    lay = layout(slack_hook=webhook.url, slack_room="#runs")
    agent = start_agent(lay)
    agent.wait_for_log("studio-agent ready")
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    request = submit_script(lay, FAILING_SCRIPT, env=env)
    wait_until(
        lambda: any(":x:" in a.body["text"] for a in webhook.arrivals), what="failure message"
    )
    assert agent.stop() == 0
    texts = [a.body["text"] for a in webhook.wait_for(5)]
    assert texts[0].startswith(":large_green_circle: studio-agent ready")
    assert texts[1].startswith(f":arrow_forward: experiment {request.key} from local:local_test")
    failed = texts[2]
    assert failed.startswith(f":x: experiment {request.key} failed")
    assert "epoch 1 loss 0.5" in failed  # the output's tail, in a code block
    assert "AWS_SECRET_ACCESS_KEY=********" in failed
    output_tar = lay.results(request.key) / "output.tar"
    assert f"artifacts: {output_tar.as_uri()}" in failed
    assert texts[3].startswith(":double_vertical_bar: studio-agent stopping")
    assert texts[4].startswith(":black_circle: studio-agent stopped")  # flushed at exit
    assert all(a.body["channel"] == "#runs" for a in webhook.arrivals)
    bodies = json.dumps([a.body for a in webhook.arrivals])
    assert SECRET not in bodies
    assert KEY_ID not in bodies
    assert "secretpart" not in agent.log()


def _metrics_url(agent: AgentProcess) -> str:
    agent.wait_for_log("/metrics")
    found = re.search(r"metrics on (http://\S+/metrics)", agent.log())
    assert found, agent.log()
    return found.group(1)


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_after_an_experiment(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess]
) -> None:
    lay = layout()
    agent = start_agent(lay)
    url = _metrics_url(agent)
    host = socket.gethostname()
    request = submit_script(lay, "open('out.txt', 'w').write('x' * 1000)\n")
    finished = ("studio_agent_experiments_total", frozenset({("outcome", "completed")}))
    wait_until(lambda: finished in _scrape(url), what="the experiment counted")
    samples = _scrape(url)
    assert agent.stop() == 0
    assert samples[finished] == 1
    labels = {
        ("host", host),
        ("queue_type", "local"),
        ("queue_name", "local_test"),
        ("project", request.experiment.project or ""),
    }
    assert samples[("runner_project_completed", frozenset(labels))] == 1
    assert not [name for name, _ in samples if name == "runner_project_running"]
    count = (
        "studio_agent_experiment_duration_seconds_count",
        frozenset({("outcome", "completed")}),
    )
    assert samples[count] == 1
    upload = frozenset({("direction", "upload")})
    assert samples[("studio_agent_artifact_bytes_total", upload)] > 0
    assert samples[("studio_agent_artifact_seconds_total", upload)] > 0
    cache = {
        labels for name, labels in samples if name in ("runner_cache_hits", "runner_cache_misses")
    }
    assert len(cache) == 1  # one environment, labelled by its hash
    assert dict(next(iter(cache)))["host"] == host
    for name in ("cpu_free_slots", "cpu_ram_free_bytes", "disk_free_bytes", "gpu_free_slots"):
        assert samples[(f"runner_resource_{name}", frozenset({("host", host)}))] >= 0
    assert samples[("studio_agent_gpu_assigned", frozenset())] == 0


def test_sighup_rereads_the_log_level(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess]
) -> None:
    lay = layout(log_level="info")
    agent = start_agent(lay)
    agent.wait_for_log("studio-agent ready")
    config = yaml.safe_load(lay.config.read_text())
    lay.config.write_text(yaml.safe_dump({**config, "log_level": "debug"}))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for_log("SIGHUP: log level info -> debug")
    lay.config.write_text(yaml.safe_dump({**config, "log_level": "loud"}))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for_log("the config no longer validates; keeping the running settings")
    assert "log_level" in agent.log().rsplit("no longer validates", 1)[1]
    time.sleep(0.3)
    assert agent.proc.poll() is None  # still serving, with the settings it had
    assert agent.stop() == 0
