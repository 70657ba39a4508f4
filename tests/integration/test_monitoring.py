"""The alerting rules and the Grafana dashboard of packaging/monitoring: promtool checks and unit
tests of the rules, and a real Prometheus (Debian's package) scraping a real agent and the test
broker, in which every dashboard query returns data and every series a rule reads exists."""

import json
import re
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from tests.conftest import ROOT, AgentProcess, Layout, submit_script, wait_until
from tests.services.rabbitmq import RabbitBroker

pytestmark = [pytest.mark.integration, pytest.mark.prometheus]

MONITORING = ROOT / "packaging" / "monitoring"
RULES = MONITORING / "studio-agent-rules.yml"
DASHBOARD = MONITORING / "studio-agent-dashboard.json"
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# A vector selector with its label matchers: what a rule reads.
_SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\{([^{}]*)\}")


def promtool(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *words], capture_output=True, text=True, timeout=60, cwd=MONITORING
    )


def test_the_rules_pass_promtool_check() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    tested = promtool("test", "rules", "studio-agent-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_selectors() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    found = {f"{m[1]}{{{m[2]}}}" for rule in rules for m in _SELECTOR.finditer(rule["expr"])}
    return sorted(found)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with _HTTP.open(url, timeout=10) as answer:
        data = json.loads(answer.read())
    assert data["status"] == "success", data
    result: list[Any] = data["data"]["result"]
    return result


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], str]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> str:
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        with (tmp_path / "prometheus.log").open("wb") as log:
            started.append(
                subprocess.Popen(
                    [
                        "prometheus",
                        f"--config.file={tmp_path / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(base), 60, "prometheus ready")
        return base

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(30)


def _ready(base: str) -> bool:
    try:
        with _HTTP.open(f"{base}/-/ready", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def metrics_port(agent: AgentProcess) -> int:
    agent.wait_for_log("metrics on http://")
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", agent.log())
    assert found is not None
    return int(found.group(1))


def backlog_on(broker: RabbitBroker, queue: str) -> None:
    """A queue with a waiting message that no agent serves: the backlog rule's input."""
    connection = pika.BlockingConnection(pika.URLParameters(broker.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue)
        channel.basic_publish("", queue, b'{"not": "served"}')
    finally:
        connection.close()


@pytest.mark.rabbitmq
def test_a_real_prometheus_finds_every_series_the_dashboard_and_the_rules_use(
    rabbitmq: RabbitBroker,
    layout: Callable[..., Layout],
    start_agent: Callable[[Layout], AgentProcess],
    prometheus: Callable[[dict[str, Any]], str],
) -> None:
    lay = layout(drain_timeout="1s")  # the last experiment is still running at the end
    agent = start_agent(lay)
    port = metrics_port(agent)
    key = submit_script(lay, "print('measured')\n", queue="local_monitored").key
    wait_until(lambda: f"experiment {key} completed" in agent.log(), 180, "one experiment")
    failing = submit_script(lay, "raise SystemExit(3)\n", queue="local_monitored").key
    wait_until(lambda: f"experiment {failing} failed" in agent.log(), 120, "one that fails")
    # and one running while Prometheus looks: runner_project_running has series only then
    running = submit_script(lay, "import time\ntime.sleep(120)\n", queue="local_monitored").key
    wait_until(lambda: f"experiment {running} started" in agent.log(), 120, "a running one")
    backlog_on(rabbitmq, "rmq_monitoring_backlog")
    base = prometheus(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "studio-agent",
                    "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                },
                {
                    "job_name": "rabbitmq",
                    "static_configs": [{"targets": [f"127.0.0.1:{rabbitmq.prometheus_port}"]}],
                },
            ],
        }
    )
    # Several scrapes of each target: rate() and increase() need two samples at least.
    scraped = "min(count_over_time(up[1m])) >= 4"
    wait_until(lambda: query(base, scraped), 60, "four scrapes of each target")
    missing = [q for q in dashboard_queries() if not query(base, q.replace("$instance", ".*"))]
    assert missing == [], f"dashboard queries without data: {missing}"
    selectors = rule_selectors()
    assert len(selectors) >= 7
    missing = [s for s in selectors if not query(base, s)]
    assert missing == [], f"series the rules read that are not scraped: {missing}"
    with _HTTP.open(f"{base}/api/v1/rules", timeout=10) as answer:
        groups = json.loads(answer.read())["data"]["groups"]
    health = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
    assert len(health) == 6
    assert set(health.values()) == {"ok"}, health
    # The backlog rule on real series: the unserved queue is pending (for: 15m), the served
    # local queue is not named.
    backlog = 'ALERTS{alertname="StudioQueueBacklogWithoutAgent", alertstate="pending"}'
    wait_until(lambda: query(base, backlog), 30, "the backlog alert pending")
    assert [a["metric"]["queue"] for a in query(base, backlog)] == ["rmq_monitoring_backlog"]
    assert agent.stop() == 0
