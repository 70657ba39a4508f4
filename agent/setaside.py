"""Messages the agent will not run, kept with the reason: ``<state>/rejected/``, ``expired/``.

Nothing is dropped: the raw bytes are written (owner-only, since a raw message carries its
submitter's storage credentials) next to a ``.reason.json`` before the message is acknowledged.
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

from agent.queues.base import Delivery

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def keep(state_dir: Path, kind: str, delivery: Delivery, reason: str) -> Path:
    """Write the message and why under ``state_dir/kind``; return the message's path."""
    folder = state_dir / kind
    folder.mkdir(parents=True, exist_ok=True)
    # Queue names and message ids come from outside: keep them to one safe file name.
    name = _SAFE.sub("_", f"{delivery.queue}-{delivery.message_id}")[:160]
    stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{name}"
    fd = os.open(folder / stem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as kept:
        if delivery.raw_path is not None:  # the whole message, even past what was read
            with delivery.raw_path.open("rb") as raw:
                shutil.copyfileobj(raw, kept, 1 << 20)
        else:
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
