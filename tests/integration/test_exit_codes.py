"""``studio-agent run`` exit codes, from real processes: 69 unavailable, 70 crash, 78 config."""

import socket
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import AgentProcess, Layout

pytestmark = pytest.mark.integration


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def closed_port() -> int:
    """A port nobody listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_an_unreachable_broker_exits_69_after_the_start_budget(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess]
) -> None:
    url = f"amqp://agent:s3cret-pw@127.0.0.1:{closed_port()}/"
    agent = start_agent(layout(amqp_url=url, start_budget="2s"))
    assert agent.proc.wait(60) == 69
    log = agent.log()
    assert "a required backend did not answer within start_budget" in log
    assert "(start_budget 2s)" in log
    assert "s3cret-pw" not in log


def test_a_stop_while_waiting_for_the_broker_is_a_clean_stop(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(layout(amqp_url=f"amqp://127.0.0.1:{closed_port()}/", start_budget="60s"))
    agent.wait_for_log("cannot connect to amqp://127.0.0.1")
    assert agent.stop() == 0
    assert "stopped while waiting for the broker" in agent.log()


def test_a_metrics_address_in_use_exits_78_naming_it(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess], busy_port: int
) -> None:
    agent = start_agent(layout(metrics_address=f"127.0.0.1:{busy_port}"))
    assert agent.proc.wait(60) == 78
    assert f"metrics_address '127.0.0.1:{busy_port}': cannot listen" in agent.log()


@pytest.mark.parametrize("address", ["9090", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_malformed_metrics_address_exits_78(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess], address: str
) -> None:
    agent = start_agent(layout(metrics_address=address))
    assert agent.proc.wait(60) == 78
    assert "metrics_address" in agent.log()


def test_a_plain_http_slack_hook_exits_78_without_showing_it(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess]
) -> None:
    hook = "http://hooks.slack.com/services/T000/B000/secretpart"
    agent = start_agent(layout(slack_hook=hook))
    assert agent.proc.wait(60) == 78
    log = agent.log()
    assert "slack_hook: must be an https:// URL" in log
    assert "secretpart" not in log


def test_an_unexpected_crash_exits_70(
    layout: Callable[..., Layout], start_agent: Callable[..., AgentProcess]
) -> None:
    lay = layout()
    lay.state_dir.parent.mkdir(parents=True, exist_ok=True)
    lay.state_dir.write_text("a file where the state directory should be\n")
    agent = start_agent(lay)
    assert agent.proc.wait(60) == 70
    assert "studio-agent crashed" in agent.log()
