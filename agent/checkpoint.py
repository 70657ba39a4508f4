"""Checkpoints and the final upload of a run's mutable artifacts.

A checkpoint tries once and leaves failures to the next one; the final pass retries within
``upload_budget`` and then raises, so the message goes back rather than being acknowledged with
results missing. Files are read through directory descriptors with O_NOFOLLOW
(agent.storage.archive): whatever the run made of its folders, nothing outside them is read.
"""

import logging
import time

from agent.errors import AgentError, TransientError
from agent.executors.base import RunContext
from agent.recorder import RunRecorder
from agent.settings import Settings
from agent.storage import archive, transfer
from agent.storage.base import StorageOptions

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        ctx: RunContext,
        settings: Settings,
        storage: StorageOptions,
        fingerprints: dict[str, str] | None = None,  # what each label held when fetched
    ) -> None:
        self.ctx = ctx
        self.request = ctx.request
        self.settings = settings
        self.storage = storage
        self.fingerprints = dict(fingerprints or {})
        self.recorder: RunRecorder | None = None

    def interval(self) -> float:
        requested = self.request.checkpoint_interval() or self.settings.checkpoint_interval
        return max(requested, self.settings.checkpoint_min_interval, 0.1)

    def checkpoint(self, final: bool = False) -> int:
        """Upload each mutable artifact that has content and changed since its last upload."""
        sent = 0
        if self.recorder is not None and not final:
            self.recorder.update("running")
        deadline = time.monotonic() + self.settings.upload_budget
        labels = sorted(self.request.mutable_labels(), key=lambda lb: lb != "output")
        for label in labels:
            directory = self.ctx.artifact_dir(label)
            fingerprint = archive.tree_fingerprint(directory)
            if not archive.has_content(directory) or self.fingerprints.get(label) == fingerprint:
                continue
            try:
                sent += self._upload(label, deadline if final else 0.0)
            except AgentError as exc:
                if final:
                    raise
                log.warning("checkpoint of %s/%s failed: %s", self.request.key, label, exc)
                continue
            self.fingerprints[label] = fingerprint
        return sent

    def _upload(self, label: str, deadline: float) -> int:
        """Upload one artifact, retrying transient failures with backoff until ``deadline``."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._upload_once(label)
            except (OSError, TransientError) as exc:
                delay = min(30.0, 0.5 * 2**attempt)
                if time.monotonic() + delay > deadline:
                    raise TransientError(f"upload of {label} failed: {exc}") from exc
                log.warning("upload of %s/%s failed (%s); retrying", self.request.key, label, exc)
                time.sleep(delay)

    def _upload_once(self, label: str) -> int:
        artifact = self.request.experiment.artifacts[label]
        folder, config = self.ctx.artifact_dir(label), self.request.config
        if label == "_metadata" and self.settings.metadata_layout == "go":
            # Only this run's own files: nothing else may land at the bucket's root.
            own = self.recorder.names() if self.recorder is not None else ()
            return transfer.upload_each(
                label, artifact, config, folder, "metadata/", self.storage, own
            )
        return transfer.upload(label, artifact, config, folder, self.storage)
