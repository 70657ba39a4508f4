"""Messages the agent will not run, kept with the reason: ``<state>/rejected/``, ``expired/``.

Nothing is dropped: the raw bytes are written (owner-only, since a raw message carries its
submitter's storage credentials) next to a ``.reason.json`` before the message is acknowledged.
"""

import json
import os
import time
from pathlib import Path

from agent.queues.base import Delivery


def keep(state_dir: Path, kind: str, delivery: Delivery, reason: str) -> Path:
    """Write the message and why under ``state_dir/kind``; return the message's path."""
    folder = state_dir / kind
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{delivery.queue}-{delivery.message_id}"
    fd = os.open(folder / stem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as kept:
        kept.write(delivery.body)
    about = {
        "reason": reason,
        "backend": delivery.backend,
        "queue": delivery.queue,
        "message_id": delivery.message_id,
        "delivery_count": delivery.delivery_count,
        "time": time.time(),
    }
    (folder / f"{stem}.reason.json").write_text(json.dumps(about, indent=1))
    return folder / stem
