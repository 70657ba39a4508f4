"""The per-run files of the ``_metadata`` artifact (protocol spec section I.1).

For each run of an experiment, named by its accession id ``<host>-<base62 start seconds>``:
- ``output-<id>.log``: the raw output of this run (what an earlier run left in ``output`` is not
  repeated);
- ``runner-<id>.log``: the agent's own lines about this run, never with secrets;
- ``scrape-<id>.json``: the scrape document (runner, experiment, studioml, asset sections);
- ``request-<id>.json``: the request as received, every credential redacted.
They are rewritten at every checkpoint and at the end, so a downstream job can follow runs in
flight and pick finished ones by ``studioml.status``.
"""

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from agent import __version__
from agent.metadata import Scraper, accession_id
from agent.request import Request, redact

COPY_CHUNK = 1 << 16


class _Tee:
    """Reads from the output and copies what it read into this run's output log."""

    def __init__(self, source: BinaryIO, copy: BinaryIO):
        self.source, self.copy = source, copy

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.copy.write(data)
        return data


class RunRecorder:
    def __init__(
        self,
        request: Request,
        folder: Path,
        output_file: Path,
        queue: str = "",
        max_bytes: int = 1 << 20,
    ):
        self.request = request
        self.folder = folder
        self.queue = queue
        self.started = time.time()
        self.host = socket.gethostname()
        self.folder = folder
        self.accession = accession_id(self.host, self.started)
        # The id has one-second resolution (Go's layout): a second run in the same second, or an
        # earlier run's files fetched from the artifact, must not be overwritten.
        while self.path("scrape").exists():
            self.started += 1
            self.accession = accession_id(self.host, self.started)
        self.asset_id = str(uuid.uuid4())
        self.scraper = Scraper(max_bytes=max_bytes)
        self.runner: dict[str, Any] = {
            "host": self.host,
            "accession": self.accession,
            "agent_version": __version__,
            "start": self.started,
            "stop": None,
            "exit_code": None,
            "resources": request.experiment.resources_needed.model_dump(mode="json"),
            "gpus": [],
        }
        folder.mkdir(parents=True, exist_ok=True)
        # Only what this run prints belongs to it: an earlier run's output may be downloaded.
        self._output_file = output_file
        self._offset = output_file.stat().st_size if output_file.exists() else 0
        self._write("request", json.dumps(redact(request.to_wire()), indent=1).encode())
        self.note(f"run {self.accession} of experiment {request.key} from queue {queue or '-'}")

    def path(self, kind: str) -> Path:
        suffix = "json" if kind in ("scrape", "request") else "log"
        return self.folder / f"{kind}-{self.accession}.{suffix}"

    def names(self) -> tuple[str, ...]:
        """The file names of this run's metadata (whether written yet or not)."""
        return tuple(self.path(kind).name for kind in ("output", "runner", "scrape", "request"))

    def note(self, text: str) -> None:
        """A line of the runner log."""
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z"
        )
        with self.path("runner").open("ab") as log:
            log.write(f"{stamp} {text}\n".encode())

    def update(self, status: str, exit_code: int | None = None, final: bool = False) -> None:
        """Bring the output copy and the scrape document up to date; ``final`` closes the run."""
        self._scrape_new_output()
        if final:
            self.scraper.finish()
            self.runner.update(stop=time.time(), exit_code=exit_code)
        studioml = {
            "key": self.request.key,
            "project": self.request.experiment.project,
            "queue": self.queue,
            "status": status,
        }
        document = self.scraper.document(self.runner, studioml, self.asset_id)
        self._write("scrape", json.dumps(document, indent=1, default=str).encode())

    def _scrape_new_output(self) -> None:
        if not self._output_file.exists():
            return
        with self._output_file.open("rb") as output, self.path("output").open("ab") as copy:
            output.seek(self._offset)
            self.scraper.feed(_Tee(output, copy))  # type: ignore[arg-type]  # a readable stream
            self._offset = output.tell()

    def _write(self, kind: str, data: bytes) -> None:
        target = self.path(kind)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)
