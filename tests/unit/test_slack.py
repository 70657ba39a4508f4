"""The Slack sink against a local HTTP server playing the incoming webhook."""

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.report.events import Event
from agent.report.slack import SlackSink, scrub


@dataclass
class Arrival:
    at: float
    path: str
    body: dict[str, Any]


@dataclass
class Webhook:
    """Answers each POST with the next scripted (status, headers), then 200."""

    url: str
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    delay: float = 0.0

    def wait_for(self, count: int, timeout: float = 10) -> list[Arrival]:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count:
            assert time.monotonic() < deadline, f"only {len(self.arrivals)} posts arrived"
            time.sleep(0.01)
        return self.arrivals


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            hook.arrivals.append(Arrival(time.monotonic(), self.path, body))
            time.sleep(hook.delay)
            status, headers = hook.script.pop(0) if hook.script else (200, {})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/secretpart"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()


def finished(key: str = "k1", outcome: str = "completed", **extra: str) -> Event:
    return Event(
        "experiment_finished",
        f"experiment {key} {outcome} in 1.0s: exit code 0",
        {"EXPERIMENT_KEY": key, "OUTCOME": outcome, **extra},
        detail="epoch 1 loss 0.5\nepoch 2 loss 0.25\n",
    )


def test_a_message_is_posted_with_room_tail_and_artifacts(webhook: Webhook) -> None:
    sink = SlackSink(webhook.url, room="#ml-runs").start()
    sink.handle(finished(OUTPUT_ARTIFACT="s3://minio:9000/bucket/experiments/k1/output.tar"))
    (arrival,) = webhook.wait_for(1)
    sink.stop()
    assert arrival.path == "/services/T000/B000/secretpart"
    assert arrival.body["channel"] == "#ml-runs"
    text = arrival.body["text"]
    assert text.startswith(":white_check_mark: experiment k1 completed")
    assert "artifacts: s3://minio:9000/bucket/experiments/k1/output.tar" in text
    assert "```epoch 1 loss 0.5\nepoch 2 loss 0.25\n```" in text
    assert sink.sent == 1


def test_a_failure_is_marked_and_a_destination_channel_wins(webhook: Webhook) -> None:
    sink = SlackSink(webhook.url, room="#ops").start()
    event = finished(outcome="failed")
    sink.handle(Event(event.kind, event.text, event.fields, destination="@alice"))
    sink.handle(Event("agent_started", "ready", destination="https://evil.example/x"))
    arrivals = webhook.wait_for(2)
    sink.stop()
    assert arrivals[0].body["text"].startswith(":x: experiment k1 failed")
    assert arrivals[0].body["channel"] == "@alice"
    assert arrivals[1].body["channel"] == "#ops"  # not a channel, not a Slack hook: ignored
    assert arrivals[1].path.endswith("/secretpart")


def test_429_is_retried_after_retry_after(webhook: Webhook) -> None:
    webhook.script = [(429, {"Retry-After": "1"})]
    sink = SlackSink(webhook.url, backoff=0.01).start()
    sink.handle(finished())
    first, second = webhook.wait_for(2)
    sink.stop()
    assert second.at - first.at >= 1.0
    assert first.body == second.body
    assert sink.sent == 1


def test_5xx_is_retried_with_backoff_then_succeeds(webhook: Webhook) -> None:
    webhook.script = [(500, {}), (503, {})]
    sink = SlackSink(webhook.url, backoff=0.05).start()
    sink.handle(finished())
    arrivals = webhook.wait_for(3)
    sink.stop()
    assert [a.body for a in arrivals[1:]] == [arrivals[0].body] * 2
    assert arrivals[2].at - arrivals[1].at >= arrivals[1].at - arrivals[0].at  # growing
    assert (sink.sent, sink.failed) == (1, 0)


def test_gives_up_after_max_tries_with_one_log_line(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.script = [(500, {})] * 10
    sink = SlackSink(webhook.url, max_tries=3, backoff=0.01).start()
    sink.handle(finished())
    webhook.wait_for(3)
    sink.stop()
    assert len(webhook.arrivals) == 3
    assert sink.failed == 1
    gave_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert gave_up == [
        "Slack: gave up on a experiment_finished message to 127.0.0.1 after 3 tries: HTTP 500"
    ]


def test_a_4xx_is_not_retried(webhook: Webhook) -> None:
    webhook.script = [(404, {})]
    sink = SlackSink(webhook.url, backoff=0.01).start()
    sink.handle(finished())
    webhook.wait_for(1)
    sink.stop()
    assert len(webhook.arrivals) == 1
    assert sink.failed == 1


def test_a_full_queue_drops_the_oldest(webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    sink = SlackSink(webhook.url, capacity=3)  # not started: nothing is taken off the queue yet
    for number in range(5):
        sink.handle(Event("agent_started", f"message {number}"))
    assert sink.dropped == 2
    sink.start()
    arrivals = webhook.wait_for(3)
    sink.stop()
    assert [a.body["text"].split()[-1] for a in arrivals] == ["2", "3", "4"]
    full = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(full) == 1


def test_handle_never_blocks_on_a_slow_webhook(webhook: Webhook) -> None:
    webhook.delay = 1.0
    sink = SlackSink(webhook.url).start()
    began = time.monotonic()
    for number in range(20):
        sink.handle(Event("agent_started", f"message {number}"))
    enqueue_time = time.monotonic() - began
    webhook.wait_for(1)
    sink.stop(flush_seconds=0.5)  # gives up on the rest, bounded
    assert enqueue_time < webhook.delay  # 20 messages queued while one post takes a second
    assert sink.sent < 20


def test_secrets_never_reach_slack_nor_the_log(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    key_id = "AKIAIOSFODNN7EXAMPLE"
    sink = SlackSink(webhook.url).start()
    sink.handle(
        Event(
            "experiment_finished",
            "experiment k failed: cannot reach amqp://user:hunter2@broker:5672/",
            {"OUTCOME": "failed"},
            detail=f"AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\npassword: pw123\n",
        )
    )
    sink.handle(Event("agent_started", "x", destination="https://user:pw@hooks.example/y"))
    webhook.wait_for(2)
    sink.stop()
    bodies = json.dumps([a.body for a in webhook.arrivals])
    for leaked in (secret, key_id, "hunter2", "pw123", "user:pw"):
        assert leaked not in bodies
        assert leaked not in caplog.text
    assert "secretpart" not in caplog.text  # the hook's path is its credential


def test_scrub_keeps_ordinary_text() -> None:
    assert scrub("epoch 3: loss=0.1 acc=0.9") == "epoch 3: loss=0.1 acc=0.9"
    assert scrub("api_key = abc123") == "api_key = ********"


@pytest.mark.parametrize(
    "url", ["http://hooks.slack.com/services/x", "ftp://hooks.slack.com/x", "hooks.slack.com/x"]
)
def test_only_https_hooks_are_accepted(url: str) -> None:
    with pytest.raises(ConfigError, match="slack_hook") as caught:
        SlackSink(url)
    assert "services" not in str(caught.value)
