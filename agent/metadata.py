"""The `_metadata` scrape document: accession ids and the streaming output scraper.

Pure: nothing here touches storage or queues. The caller keeps the experiment's output file open,
feeds it at each checkpoint and at the end, and writes `document()` where the layout says
(protocol reference section I.1).
"""

import copy
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import BinaryIO

from agent.jsonpatch import (
    Edit,
    Json,
    PatchError,
    apply_ops,
    is_patch,
    json_size,
    merge_into,
    parse_pointer,
)

log = logging.getLogger(__name__)

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_READ_SIZE = 1 << 16
_JSON_ENDS = {(b"{", b"}"), (b"[", b"]")}
_AGENT_SECTIONS = ("runner", "studioml", "asset")
_COUNTERS = (
    *("lines", "json_lines", "merged", "patched", "malformed", "refused", "skipped_long"),
    *("size", "max_bytes", "truncated", "truncated_at_line"),
)


def base62(number: int) -> str:
    """Return number in base 62 (0-9A-Za-z), most significant digit first, unpadded."""
    if number < 0:
        raise ValueError(f"base62 needs a non-negative number, not {number}")
    digits = ""
    while True:
        number, digit = divmod(number, 62)
        digits = _BASE62[digit] + digits
        if not number:
            return digits


def accession_id(host: str, started: float) -> str:
    """Return `<host>-<base62 seconds>`, the Go runner's id for one handling of a message."""
    # The id becomes part of object names, so the host may only bring characters safe in a key.
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "-", host) or "host"
    return f"{safe_host}-{base62(int(started))}"


class Scraper:
    """Builds the scrape document from an experiment's output, one line at a time.

    A line holding a JSON object is merged at the document root; a JSON array of operations is
    applied there as an RFC 6902 patch; anything else is counted and left alone, and nothing a
    line holds can make feed() raise. Memory stays bounded by max_line (the longest line held)
    and max_bytes (the user content kept, as compact JSON). Once the cap is hit, later lines are
    only counted in `lines` and `skipped_long`.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 1 << 20,
        protected: Iterable[str] = _AGENT_SECTIONS,
        max_line: int = 1 << 20,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_line = max_line
        self.protected = frozenset(protected)
        self.lines = self.json_lines = self.merged = self.patched = 0
        self.malformed = self.refused = self.skipped_long = 0
        self.truncated = False
        self.truncated_at_line: int | None = None
        self.size = json_size({})  # of the user content, kept exact change by change
        self._content: dict[str, Json] = {}
        self._partial = bytearray()
        self._overlong = False

    def feed(self, stream: BinaryIO) -> None:
        """Read stream to its current end; a last line without its newline waits for more."""
        while chunk := stream.read(_READ_SIZE):
            pieces = chunk.split(b"\n")
            for piece in pieces[:-1]:
                self._end_line(piece)
            self._hold(pieces[-1])

    def finish(self) -> None:
        """Take a last line that never got its newline (the experiment's final print)."""
        if self._partial or self._overlong:
            self._end_line(b"")

    def counters(self) -> dict[str, Json]:
        """What the scrape did, for the runner section: a cap that was hit is marked here."""
        return {name: getattr(self, name) for name in _COUNTERS}

    def document(
        self, runner: dict[str, Json], studioml: dict[str, Json], asset_id: str
    ) -> dict[str, Json]:
        """Return the scrape document: runner, what the experiment printed, studioml, asset.

        The agent's sections are set last, so nothing the experiment printed can change them.
        """
        doc: dict[str, Json] = {"runner": {**runner, "scrape": self.counters()}}
        for key, value in self._content.items():
            if key not in _AGENT_SECTIONS:
                doc[key] = copy.deepcopy(value)
        doc["studioml"] = dict(studioml)
        doc["asset"] = {"id": asset_id}
        return doc

    def _hold(self, piece: bytes) -> None:
        """Buffer the start of a line; past max_line drop it all and remember to skip the line."""
        if self._overlong:
            return
        if len(self._partial) + len(piece) > self.max_line:
            self._overlong, self._partial = True, bytearray()
        else:
            self._partial += piece

    def _end_line(self, piece: bytes) -> None:
        """A newline (or the end of the output) completes the buffered line with piece."""
        if self._partial or self._overlong:
            self._hold(piece)
            overlong, piece = self._overlong, bytes(self._partial)
            self._partial, self._overlong = bytearray(), False
        else:
            overlong = len(piece) > self.max_line
        self.lines += 1
        if overlong:
            self.skipped_long += 1
        elif not self.truncated:
            self._scrape(piece)

    def _scrape(self, line: bytes) -> None:
        text = line.strip()
        if len(text) < 2 or (text[:1], text[-1:]) not in _JSON_ENDS:
            return
        try:
            # NaN and Infinity (Python's json.dumps writes them) become strings: the document
            # must stay strict JSON for every ETL job, and a diverged loss is still worth seeing.
            value = json.loads(text, parse_constant=str)
        except (ValueError, RecursionError):
            self.malformed += 1
            return
        self.json_lines += 1
        if isinstance(value, dict):
            self._merge_fragment(value)
        elif is_patch(value):
            self._apply_patch(value)
        else:
            self.malformed += 1

    def _merge_fragment(self, fragment: dict[str, Json]) -> None:
        allowed = {k: v for k, v in fragment.items() if k not in self.protected}
        if len(allowed) < len(fragment):
            self.refused += 1
        if allowed and self._commit(lambda edit: merge_into(self._content, allowed, edit, False)):
            self.merged += 1

    def _apply_patch(self, ops: list[Json]) -> None:
        if self._touches_protected(ops):
            self.refused += 1
            self.malformed += 1
        elif self._commit(lambda edit: apply_ops(self._content, ops, edit)):
            self.patched += 1

    def _touches_protected(self, ops: list[dict[str, Json]]) -> bool:
        for op in ops:
            for pointer in (op.get("path"), op.get("from")):
                try:
                    tokens = parse_pointer(pointer) if pointer is not None else None
                except PatchError:
                    continue  # applying the patch reports it
                # The root pointer covers every section, the agent's included.
                if tokens is not None and (not tokens or tokens[0] in self.protected):
                    return True
        return False

    def _commit(self, change: Callable[[Edit], None]) -> bool:
        """Make change unless it fails or takes the user content over max_bytes."""
        edit = Edit(measure=True)
        try:
            change(edit)
        except (PatchError, RecursionError):
            edit.rollback()
            self.malformed += 1
            return False
        if self.size + edit.delta > self.max_bytes:
            edit.rollback()
            self.truncated, self.truncated_at_line = True, self.lines
            return False
        self.size += edit.delta
        return True
