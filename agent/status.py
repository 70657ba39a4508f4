"""``<state_dir>/status.json``: what the running agent is doing, for ``studio-agent status``.

The supervisor rewrites it every few seconds; the command reads it, so it works without any
control socket and shows the last state of an agent that died.
"""

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from agent.subscriptions import Subscriptions

STATUS_FILE = "status.json"


class _Job(Protocol):
    @property
    def backend(self) -> Any: ...
    @property
    def delivery(self) -> Any: ...
    @property
    def run(self) -> Any: ...
    @property
    def started(self) -> float: ...


def write_status(
    state_dir: Path,
    state: str,
    subscriptions: Subscriptions,
    jobs: Iterable[_Job],
    resources: dict[str, Any] | None = None,  # Admission.describe(): GPUs and who holds them
    protections: dict[str, str] | None = None,  # Sandbox.protections(): "" or why it is off
    message_keys: dict[str, Any] | None = None,  # MessageKeys.describe(): fingerprints only
    control: dict[str, Any] | None = None,  # Operator.describe(): drain and pauses
) -> None:
    document = {
        "pid": os.getpid(),
        "time": time.time(),
        "state": state,
        "experiments": [
            {
                "key": job.run.request.key,
                "queue": job.delivery.queue,
                "backend": job.backend.name or job.backend.kind,
                "gpus": list(job.run.ctx.gpus),
                "elapsed_s": round(time.time() - job.started),
                "memory_bytes": job.run.memory(),
            }
            for job in jobs
        ],
        "resources": resources or {},
        "protections": protections or {},
        "message_keys": message_keys or {},
        "control": control or {},
        "backends": [b.describe() for b in subscriptions.active()],
        "retiring": [b.describe() for b in subscriptions.retiring],
        "refused": subscriptions.refused,
    }
    target = state_dir / STATUS_FILE
    temporary = target.with_name(f".{STATUS_FILE}.tmp")
    temporary.write_text(json.dumps(document, indent=1))
    os.replace(temporary, target)


def render(document: dict[str, Any]) -> str:
    """Human-readable status: each backend, its queues and why a visible queue is not served."""
    alive = _alive(int(document.get("pid", 0)))
    age = time.time() - float(document.get("time", 0))
    lines = [
        f"agent pid {document.get('pid')}: {document.get('state')}"
        + ("" if alive else f" (not running; last seen {age:.0f}s ago)")
    ]
    control = document.get("control", {})
    if control.get("draining"):
        lines.append("  draining on the operator's command: taking nothing new (resume ends it)")
    for target in control.get("paused", []):
        shown, resume = ("every queue", "") if target == "*" else (target, f" {target}")
        lines.append(f"  paused by the operator: {shown} (studio-agent resume{resume})")
    off = {k: v for k, v in document.get("protections", {}).items() if v}
    for name, why in sorted(off.items()):
        lines.append(f"  not enforced for experiments: {name} ({why})")
    for job in document.get("experiments", []):
        gpus = f" on {', '.join(job['gpus'])}" if job.get("gpus") else ""
        took = f", {job.get('elapsed_s', 0)}s, {job.get('memory_bytes', 0) / 2**20:.0f} MiB"
        lines.append(f"  running {job['key']} from {job['backend']}:{job['queue']}{gpus}{took}")
    for queue, reason in sorted(document.get("resources", {}).get("waiting", {}).items()):
        lines.append(f"  queue {queue} waits for room: {reason}")
    for section in ("backends", "retiring"):
        for backend in document.get(section, []):
            title = f"{backend['kind']} {backend['name']}" + (
                " (retiring)" if section == "retiring" else ""
            )
            lines.append(title + (f": {backend['problem']}" if backend.get("problem") else ""))
            for queue in backend.get("served", []):
                pause = backend.get("paused", {}).get(queue)
                lines.append(
                    f"  serving {queue}" + (f" (paused {pause}s after a failure)" if pause else "")
                )
            for queue, reason in sorted(backend.get("not_served", {}).items()):
                lines.append(f"  not serving {queue}: {reason}")
    for ident, reason in sorted(document.get("refused", {}).items()):
        lines.append(f"refused credential {ident}: {reason}")
    lines += _render_keys(document.get("message_keys", {}))
    return "\n".join(lines) + "\n"


def _render_keys(keys: dict[str, Any]) -> list[str]:
    lines = []
    if keys.get("decryption_key"):
        lines.append(f"encrypted messages: decryption key {keys['decryption_key']}")
    for prefix, fingerprint in sorted(keys.get("signers", {}).items()):
        lines.append(f"  queues {prefix}*: signed by {fingerprint} only, no clear text")
    for name, reason in sorted(keys.get("refused", {}).items()):
        lines.append(f"refused message key {name}: {reason}")
    return lines


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
