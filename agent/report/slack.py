"""Slack incoming-webhook messages for agent and experiment events.

``handle`` only formats and enqueues; one daemon thread posts. The queue is bounded: when it is
full the oldest message is dropped (counted, logged once per overflow). A post is retried with
capped exponential backoff on connection errors and 5xx, waits out a 429's ``Retry-After``, and
is given up after ``max_tries`` with one log line. Nothing here raises into the agent.

Where a message goes: ``slack_hook`` (the operator's webhook; the URL is the credential, so only
its host is ever logged) with ``"channel": slack_room`` when set. A request's
``config.runner.slack_destination`` overrides that: a channel name (``#name``, ``@user`` or a
bare name) becomes the message's ``channel``; an ``https://hooks.slack.com/...`` URL is posted to
instead of the operator's hook. Anything else is ignored. Hooks must be https; plain http is
accepted only for loopback hosts (a local relay, and tests).

Text is scrubbed before it leaves: URL passwords (``mask_secrets``), AWS access key ids, and
``NAME=value`` pairs whose name looks secret (``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, ``*KEY``).
"""

import collections
import ipaddress
import logging
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import requests

from agent.errors import ConfigError
from agent.report.events import Event
from agent.settings import mask_secrets

log = logging.getLogger(__name__)

SLACK_HOOK_HOST = "hooks.slack.com"
TAIL_CHARS = 1500  # of an experiment's output, in the finish message
_CHANNEL = re.compile(r"^[#@]?[a-z0-9][a-z0-9._-]{0,79}$", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_PAIR = re.compile(
    r"(?P<name>[A-Za-z0-9_.-]*(?:SECRET|TOKEN|PASSWORD|PASSWD|KEY)[A-Za-z0-9_]*)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>[^\s'\",;]+)",
    re.IGNORECASE,
)
_ICONS = {
    "agent_started": ":large_green_circle:",
    "agent_stopping": ":double_vertical_bar:",
    "agent_stopped": ":black_circle:",
    "experiment_started": ":arrow_forward:",
    "message_rejected": ":no_entry:",
    "credential_refused": ":closed_lock_with_key:",
}


def scrub(text: str) -> str:
    """Remove what looks like a credential from text bound for Slack."""
    text = str(mask_secrets(text))
    text = _AWS_KEY_ID.sub("********", text)
    return _SECRET_PAIR.sub(r"\g<name>\g<sep>********", text)


def check_hook(url: str, what: str) -> str:
    """The URL if it may be posted to; ConfigError (naming only its host) otherwise."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and _is_loopback(host):
        return url
    raise ConfigError(f"{what}: must be an https:// URL (got a {parts.scheme or 'bare'} URL)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or "?"


@dataclass
class Message:
    hook: str
    payload: dict[str, Any]
    kind: str


class SlackSink:
    """An event sink posting to Slack; see the module docstring."""

    def __init__(
        self,
        hook: str,
        room: str = "",
        capacity: int = 200,
        max_tries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        timeout: float = 10.0,
    ) -> None:
        self.hook = check_hook(hook, "slack_hook")
        self.room = room
        self.max_tries = max_tries
        self.backoff, self.backoff_max, self.timeout = backoff, backoff_max, timeout
        self.dropped = 0
        self.sent = 0
        self.failed = 0
        self._queue: collections.deque[Message] = collections.deque(maxlen=capacity)
        self._lock = threading.Condition()
        self._closing = False
        self._deadline = float("inf")  # stop trying at this monotonic time (set by stop)
        self._overflowing = False
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._run, name="slack", daemon=True)

    def start(self) -> "SlackSink":
        # urllib3 logs each request line (with the hook's secret path) at DEBUG.
        pool_log = logging.getLogger("urllib3.connectionpool")
        pool_log.setLevel(max(pool_log.getEffectiveLevel(), logging.INFO))
        self._thread.start()
        log.info("Slack messages go to a webhook on %s", host_of(self.hook))
        return self

    # -- the agent's side: never blocks, never raises --------------------------------------------

    def handle(self, event: Event) -> None:
        try:
            message = self.message_for(event)
        except Exception:
            log.exception("Slack: could not format a %s message", event.kind)
            return
        if message is not None:
            self._enqueue(message)

    def _enqueue(self, message: Message) -> None:
        with self._lock:
            if self._closing:
                return
            full = len(self._queue) == self._queue.maxlen
            if full:
                self.dropped += 1  # the deque drops its oldest entry on append
            self._queue.append(message)
            self._lock.notify()
        if full and not self._overflowing:
            log.warning("Slack: queue full; dropping the oldest messages (%d so far)", self.dropped)
        self._overflowing = full

    def message_for(self, event: Event) -> Message | None:
        hook, channel = self._route(event.destination)
        text = f"{self._icon(event)} {scrub(event.text)}"
        where = event.fields.get("OUTPUT_ARTIFACT", "")
        if where:
            text += f"\nartifacts: {scrub(where)}"
        if event.detail:
            tail = scrub(event.detail[-TAIL_CHARS:]).replace("```", "'''")
            text += f"\n```{tail}```"
        payload: dict[str, Any] = {"text": text}
        if channel:
            payload["channel"] = channel
        return Message(hook, payload, event.kind)

    @staticmethod
    def _icon(event: Event) -> str:
        if event.kind == "experiment_finished":
            good = event.fields.get("OUTCOME") in ("completed", "expired")
            return ":white_check_mark:" if good else ":x:"
        return _ICONS.get(event.kind, ":information_source:")

    def _route(self, destination: str) -> tuple[str, str]:
        """(hook, channel) for an event with this ``slack_destination``."""
        if not destination:
            return self.hook, self.room
        if _CHANNEL.match(destination):
            return self.hook, destination
        parts = urllib.parse.urlsplit(destination)
        if parts.scheme == "https" and parts.hostname == SLACK_HOOK_HOST:
            return destination, ""
        # Not logged: a mistyped destination may still be a secret URL.
        log.debug("Slack: ignoring a slack_destination that is neither a channel nor a hook")
        return self.hook, self.room

    # -- the posting thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue or time.monotonic() >= self._deadline:
                    return
                message = self._queue.popleft()
            try:
                self._deliver(message)
            except Exception:  # a bug here must not end the thread, or later messages pile up
                log.exception("Slack: posting failed")

    def _deliver(self, message: Message) -> None:
        for attempt in range(1, self.max_tries + 1):
            verdict, why, retry_after = self._post(message)
            if verdict == "sent":
                self.sent += 1
                return
            backoff = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
            wait = backoff if retry_after is None else retry_after
            if verdict == "fatal" or attempt == self.max_tries or not self._pause(wait):
                break
        self.failed += 1
        log.warning(
            "Slack: gave up on a %s message to %s after %d tries: %s",
            message.kind,
            host_of(message.hook),
            attempt,
            why,
        )

    def _post(self, message: Message) -> tuple[str, str, float | None]:
        """Post once: ("sent" | "retry" | "fatal", why, seconds the server asked us to wait)."""
        try:
            answer = self._session.post(message.hook, json=message.payload, timeout=self.timeout)
        except requests.RequestException as exc:
            return "retry", type(exc).__name__, None  # str(exc) would carry the hook's path
        code = answer.status_code
        if code < 300:
            return "sent", "", None
        if code == 429:
            return "retry", "HTTP 429", _retry_after(answer.headers.get("Retry-After"))
        # Other 4xx (a revoked hook, an unknown channel): retrying cannot help.
        return ("retry" if code >= 500 else "fatal"), f"HTTP {code}", None

    def _pause(self, seconds: float) -> bool:
        """Sleep before the next try; False when the agent is stopping and time is up."""
        end = time.monotonic() + seconds
        with self._lock:
            while time.monotonic() < min(end, self._deadline):
                self._lock.wait(min(end, self._deadline) - time.monotonic())
        return time.monotonic() < self._deadline

    # -- stopping ----------------------------------------------------------------------------------

    def stop(self, flush_seconds: float = 5.0) -> None:
        """Post what is queued for at most ``flush_seconds``, then give up on the rest."""
        with self._lock:
            self._closing = True
            self._deadline = time.monotonic() + flush_seconds
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(flush_seconds + self.timeout)
        left = len(self._queue)
        if left:
            log.warning("Slack: %d message(s) not sent before the agent stopped", left)
        self._session.close()


def _retry_after(header: str | None) -> float | None:
    """Seconds from a Retry-After header (the seconds form, which Slack sends), else None."""
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None
