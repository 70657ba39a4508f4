"""What the supervisor reports about one job: its journal fields and its outcome event.

Kept apart from the supervisor so that the wording and the fields (which journalctl queries,
Slack messages and metrics depend on) live in one place. Nothing here may carry credentials:
artifact locations are stripped of any ``user:password@``.
"""

import logging
import urllib.parse
from typing import TYPE_CHECKING

from agent.report.events import Event
from agent.request import Request

if TYPE_CHECKING:  # reports sit below the pipeline: only the type is needed here
    from agent.experiment import Outcome


def job_fields(
    request: Request, queue: str, backend: str, credential: str, gpus: tuple[str, ...]
) -> dict[str, str]:
    """Journal fields naming one experiment and where it came from."""
    return {
        "EXPERIMENT_KEY": request.key,
        "PROJECT": request.experiment.project or "",
        "QUEUE": queue,
        "BACKEND": backend,
        "CREDENTIAL": credential,
        "GPU_UUIDS": ",".join(gpus),
    }


def outcome_event(request: Request, outcome: "Outcome", fields: dict[str, str]) -> Event:
    """The ``experiment_finished`` event: status, duration, exit code, output tail."""
    took = max(outcome.finished - outcome.started, 0.0)
    text = f"experiment {outcome.key} {outcome.status} in {took:.1f}s: {outcome.detail}"
    fields = {
        **fields,
        "OUTCOME": outcome.status,
        "DURATION_S": f"{took:.3f}",
        "UPLOADED_BYTES": str(outcome.uploaded_bytes),
        "OUTPUT_ARTIFACT": artifact_location(request, "output"),
    }
    if outcome.exit_code is not None:
        fields["EXIT_CODE"] = str(outcome.exit_code)
    failed = outcome.status not in ("completed", "expired")
    return Event(
        "experiment_finished",
        text,
        fields,
        detail=outcome.output_tail,
        destination=slack_destination(request),
        level=logging.WARNING if failed else logging.INFO,
    )


def slack_destination(request: Request) -> str:
    """``config.runner.slack_destination``: where a submitter asked for its Slack messages."""
    runner = (request.config.model_extra or {}).get("runner")
    value = runner.get("slack_destination") if isinstance(runner, dict) else None
    return value if isinstance(value, str) else ""


def artifact_location(request: Request, label: str) -> str:
    """Where an artifact is stored (bucket/key or its qualified URL), never its credentials."""
    artifact = request.experiment.artifacts.get(label)
    if artifact is None:
        return ""
    if artifact.qualified:
        try:
            parts = urllib.parse.urlsplit(artifact.qualified)
        except ValueError:  # the message's own text: never a reason to fail a report
            return artifact.key or ""
        host = parts.netloc.rsplit("@", 1)[-1]  # no user:password@
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    if artifact.bucket and artifact.key:
        return f"{artifact.bucket}/{artifact.key}"
    return artifact.key or ""
