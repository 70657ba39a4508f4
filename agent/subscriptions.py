"""Which queue backends the agent runs: the static ones from its config, and one per credential
in its certs directory, started, rotated and retired as files come and go.

A retired backend takes no new work, but it stays alive (ticking, so leases are kept and its
custody journal settled) until the experiments it handed out are settled; then it is closed.
"""

import logging
from collections.abc import Iterable

from agent.credentials import Credential
from agent.queues.base import QueueBackend
from agent.queues.factory import credential_backend
from agent.report.events import Event, Events
from agent.settings import Settings

log = logging.getLogger(__name__)


class Subscriptions:
    def __init__(
        self, settings: Settings, static: Iterable[QueueBackend], events: Events | None = None
    ):
        self.settings = settings
        self.events = events or Events()
        self.static = list(static)
        self.dynamic: dict[str, tuple[Credential, QueueBackend]] = {}
        self.retiring: list[QueueBackend] = []
        self.refused: dict[str, str] = {}

    def active(self) -> list[QueueBackend]:
        return self.static + [backend for _, backend in self.dynamic.values()]

    def everything(self) -> list[QueueBackend]:
        return self.active() + self.retiring

    def sync(self, credentials: dict[str, Credential], refused: dict[str, str]) -> bool:
        """Bring the running backends in line with the certs directory; True if anything changed."""
        before = (set(self.dynamic), len(self.retiring), dict(self.refused))
        for ident, reason in refused.items():
            if self.refused.get(ident) != reason:
                self._report_refused(ident, reason)
        self.refused = dict(refused)
        for ident in list(self.dynamic):
            if ident not in credentials:
                why = refused.get(ident, "its file was removed")
                self._retire(ident, why)
        for ident, credential in credentials.items():
            current = self.dynamic.get(ident)
            if current is None:
                self._add(credential, recover=True)
            elif current[0].fingerprint != credential.fingerprint:
                self._retire(ident, "its file changed (rotation)")
                self._add(credential, recover=False)
        return before != (set(self.dynamic), len(self.retiring), self.refused)

    def _add(self, credential: Credential, recover: bool) -> None:
        try:
            backend = credential_backend(credential, self.settings)
        except Exception as exc:  # a vendor SDK refusing the settings must not stop the agent
            self.refused[credential.ident] = f"cannot use it: {type(exc).__name__}: {exc}"
            self._report_refused(credential.ident, self.refused[credential.ident])
            return
        self.dynamic[credential.ident] = (credential, backend)
        log.info("credential %s: subscribing (from %s)", credential.ident, credential.source)
        if recover:
            # A rotation shares its journal with the backend it replaces, which still settles
            # its own messages: only a credential new to this agent takes back leftovers.
            backend.recover()

    def _report_refused(self, ident: str, reason: str) -> None:
        self.events.emit(
            Event(
                "credential_refused",
                f"credential {ident} refused: {reason}",
                {"CREDENTIAL": ident},
                level=logging.ERROR,
            )
        )

    def _retire(self, ident: str, why: str) -> None:
        _, backend = self.dynamic.pop(ident)
        log.info("credential %s: no new work, %s", ident, why)
        self.retiring.append(backend)

    def close_idle(self, busy: Iterable[QueueBackend]) -> None:
        """Close retired backends none of whose deliveries is still being worked on."""
        in_use = {id(b) for b in busy}
        for backend in list(self.retiring):
            if id(backend) not in in_use:
                backend.close()
                self.retiring.remove(backend)
                log.info("%s backend closed: its last experiment is settled", backend.kind)
