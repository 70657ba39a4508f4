"""A run's directory: its layout, who may write which part of it, and its inputs.

``<work_dir>/<run id>/`` is the run's STUDIOML_HOME. The agent owns the frame (the home,
``experiments/<key>/``, the artifact mapping) and the two folders it writes while the run runs
(``output``, where the child's output goes through the descriptor the agent opened, and
``_metadata``); the run's identity owns every other artifact folder and its ``tmp``. So the
agent never writes where the run could have planted a link, and the run reaches nothing of its
neighbours': every folder it does not own is mode 0711 (pass through, list nothing).
"""

import json
import os
import time
from pathlib import Path

from agent.executors.base import Confine, RunContext
from agent.request import Request
from agent.storage import archive, transfer
from agent.storage.base import StorageOptions

AGENT_WRITES = frozenset({"output", "_metadata"})
# Not an input: the container image reference is the executor's business.
SKIP_FETCH = frozenset({"_singularity"})
PASS_THROUGH = 0o711


def mapping_file(ctx: RunContext) -> Path:
    return ctx.home / "artifact_mappings" / ctx.request.key / "artifacts.json"


def lay_out(ctx: RunContext) -> None:
    """Make the run's folders and the artifact mapping StudioML's fs_tracker reads."""
    labels = set(ctx.request.experiment.artifacts) | {"workspace", "output"}
    for label in labels:
        ctx.artifact_dir(label).mkdir(parents=True, exist_ok=True)
    ctx.scratch.mkdir(exist_ok=True)
    mapping = mapping_file(ctx)
    mapping.parent.mkdir(parents=True, exist_ok=True)
    mapping.write_text(json.dumps({lb: str(ctx.artifact_dir(lb)) for lb in sorted(labels)}))
    os.chmod(mapping, 0o644)
    frame = [ctx.home, ctx.home / "experiments", ctx.exp_dir, mapping.parent, mapping.parent.parent]
    for folder in frame + [ctx.artifact_dir(label) for label in AGENT_WRITES & labels]:
        os.chmod(folder, PASS_THROUGH)


def hand_over(ctx: RunContext, confine: Confine) -> None:
    """Give the run's identity the folders it may write, once its inputs are in them."""
    for label in {*ctx.request.experiment.artifacts, "workspace"} - AGENT_WRITES:
        confine.give(ctx.artifact_dir(label))
    confine.give(ctx.scratch)


class Fetcher:
    """Downloads the request's artifacts by its source's policy (agent.trust)."""

    def __init__(self, request: Request, storage: StorageOptions) -> None:
        self.request = request
        self.storage = storage

    def __call__(self, label: str, folder: Path, budget: int = 0) -> int:
        artifact = self.request.experiment.artifacts[label]
        return transfer.fetch(label, artifact, self.request.config, folder, budget, self.storage)

    def inputs(self, ctx: RunContext) -> tuple[int, float, dict[str, str]]:
        """Fetch every input within the request's disk budget: (bytes, seconds, fingerprints).

        The fingerprints of the mutable artifacts let the first checkpoint skip what is
        unchanged since the download.
        """
        budget = self.request.experiment.resources_needed.size("hdd")
        fetched, began = 0, time.monotonic()
        for label in self.request.experiment.artifacts:
            if label in SKIP_FETCH:
                continue
            left = max(budget - fetched, 1) if budget else 0
            fetched += self(label, ctx.artifact_dir(label), left)
        mutable = self.request.mutable_labels()
        prints = {lb: archive.tree_fingerprint(ctx.artifact_dir(lb)) for lb in mutable}
        return fetched, time.monotonic() - began, prints
