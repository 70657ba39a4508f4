"""Reading scrape documents back, for operators: ``studio-agent metadata FILE...``."""

import json
import logging
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from agent.jsonpatch import Json

log = logging.getLogger(__name__)


def load_documents(paths: Iterable[Path]) -> list[dict[str, Json]]:
    """Read scrape documents; an unreadable or invalid file is skipped with a warning."""
    documents = []
    for path in paths:
        try:
            document = json.loads(Path(path).read_bytes())
        except (OSError, ValueError, RecursionError) as error:
            log.warning("%s: skipped, not a readable JSON document (%s)", path, error)
            continue
        if isinstance(document, dict):
            documents.append(document)
        else:
            log.warning("%s: skipped, not a JSON object", path)
    return documents


_ROW_FIELDS = ("key", "project", "status", "host", "start", "stop", "exit_code")
_TABLE_FIELDS = ["key", "project", "status", "host", "exit_code"]


def summarize(
    docs: Iterable[dict[str, Json]], project: str | None = None, status: str | None = None
) -> list[dict[str, Json]]:
    """One row per experiment key from its latest run, filtered, ordered by start time."""
    latest: dict[str, dict[str, Json]] = {}
    for doc in docs:
        key = _section(doc, "studioml").get("key")
        if isinstance(key, str) and (key not in latest or _ended(doc) >= _ended(latest[key])):
            latest[key] = doc
    rows = [_row(doc) for doc in latest.values()]
    rows = [
        row for row in rows if project in (None, row["project"]) and status in (None, row["status"])
    ]
    return sorted(rows, key=_start_order)


def _section(doc: dict[str, Json], name: str) -> dict[str, Json]:
    value = doc.get(name)
    return value if isinstance(value, dict) else {}


def _timestamp(value: Json) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string; None when neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _ended(doc: dict[str, Json]) -> float:
    runner = _section(doc, "runner")
    for name in ("stop", "start"):
        if (seconds := _timestamp(runner.get(name))) is not None:
            return seconds
    return float("-inf")


def _start_order(row: dict[str, Json]) -> tuple[bool, float, str]:
    start = _timestamp(row["start"])
    return (start is None, start or 0.0, str(row["key"]))


def _row(doc: dict[str, Json]) -> dict[str, Json]:
    studioml, runner = _section(doc, "studioml"), _section(doc, "runner")
    row: dict[str, Json] = {name: studioml.get(name) for name in ("key", "project", "status")}
    row.update({name: runner.get(name) for name in ("host", "start", "stop", "exit_code")})
    for name, value in _leaves(_section(doc, "experiment")):
        # A metric called "status" must not hide the run's status.
        row[f"experiment.{name}" if name in _ROW_FIELDS else name] = value
    return row


def _leaves(section: dict[str, Json], prefix: str = "") -> Iterator[tuple[str, Json]]:
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        elif value is None or isinstance(value, str | int | float):
            yield f"{prefix}{key}", value


def render_table(rows: list[dict[str, Json]]) -> str:
    """Rows as a plain-text table: the run's fields, then metrics in first-seen order."""
    columns = list(_TABLE_FIELDS)
    for row in rows:
        columns += [name for name in row if name not in columns and name not in _ROW_FIELDS]
    widths = [max([len(name)] + [len(_cell(row.get(name))) for row in rows]) for name in columns]
    lines = ["  ".join(name.ljust(width) for name, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    for row in rows:
        cells = (
            _aligned(row.get(name), width) for name, width in zip(columns, widths, strict=True)
        )
        lines.append("  ".join(cells))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cell(value: Json) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _aligned(value: Json, width: int) -> str:
    """Numbers to the right, so that their digits line up; text to the left."""
    text = _cell(value)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return text.rjust(width) if number else text.ljust(width)
