"""The one way a message body becomes a Request: bounded, and unable to raise anything else.

A body comes from whoever may publish to a queue. Before ``json.loads`` sees it, its size, its
count of objects and arrays and its nesting depth are checked without building anything (a deep
``[[[[...`` raised RecursionError out of the parser, and the next start crashed on the same
message again). After it, the models in ``agent.request`` bound every count and length.
Whatever still goes wrong, of any type, is a ``BadRequest`` with a reason: the supervisor sets
the message aside, and no input can crash the agent through this door.
"""

import json
import re
from itertools import accumulate
from typing import Any

from pydantic import ValidationError

from agent.envelope import Sealed
from agent.errors import BadRequest
from agent.request import Request

MAX_BODY = 4 * 2**20  # the default of settings.max_message_size
MAX_DEPTH = 32  # a 0.0.49 message nests 6 deep (experiment.artifacts.<label>.credentials.aws)
MAX_CONTAINERS = 10_000  # objects and arrays; a 0.0.49 message has about 40
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
# bytes.translate table: "[" and "{" become 2, "]" and "}" become 0, everything else 1.
_STEP = bytes(2 if c in b"[{" else 0 if c in b"]}" else 1 for c in range(256))
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


def structure_of(body: bytes) -> bytes:
    """The brackets of a JSON text outside its strings, in linear time (all in C)."""
    # Drop escapes first (so an escaped quote cannot end a string), then whole strings, then
    # everything that is not a bracket; what is left is the structure alone.
    return _STRING.sub(b"", _ESCAPE.sub(b"", body)).translate(None, _NOT_BRACKET)


def nesting_depth(structure: bytes) -> int:
    """The deepest nesting of a ``structure_of`` string."""
    steps = structure.translate(_STEP)
    return max(accumulate(step - 1 for step in steps), default=0)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_message(body: bytes, max_bytes: int = MAX_BODY) -> Request:
    """Parse a clear request; raise BadRequest, and only BadRequest, with a reason to act on."""
    message = read_message(body, max_bytes)
    if isinstance(message, Sealed):
        raise BadRequest("body is an encrypted StudioML envelope ('message'), not a clear request")
    return message


def read_message(body: bytes, max_bytes: int = MAX_BODY) -> Request | Sealed:
    """A clear request, or an envelope still sealed (``agent.envelope``); else BadRequest."""
    try:
        return _read(body, max_bytes)
    except BadRequest:
        raise
    except Exception as exc:  # RecursionError, MemoryError, a bug: the message is at fault
        raise BadRequest(f"body could not be parsed: {type(exc).__name__}: {exc}"[:500]) from None


def _read(body: bytes, max_bytes: int) -> Request | Sealed:
    data = _load_object(body, max_bytes)
    if "message" in data and "experiment" not in data:
        return _sealed(data["message"])
    try:
        return Request.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from None


def _sealed(message: Any) -> Sealed:
    if not isinstance(message, dict):
        raise BadRequest("an envelope's 'message' must be an object")
    try:
        return Sealed.model_validate(message)
    except ValidationError as exc:
        raise BadRequest(f"envelope: {describe(exc)}") from None


def _load_object(body: bytes, max_bytes: int) -> dict[str, Any]:
    if len(body) > max_bytes:
        raise BadRequest(f"body is {len(body)} bytes; at most {max_bytes} (max_message_size)")
    try:
        # UTF-8 only (the client writes it): json.loads would also take UTF-16, in which a
        # quote byte can hide inside another character and blind the structure scan.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not UTF-8: {exc}") from None
    structure = structure_of(body)
    if len(structure) > 2 * MAX_CONTAINERS:
        raise BadRequest(
            f"body has {len(structure) // 2} objects and arrays; at most {MAX_CONTAINERS}"
        )
    depth = nesting_depth(structure)
    if depth > MAX_DEPTH:
        raise BadRequest(f"body nests {depth} levels deep; at most {MAX_DEPTH}")
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:  # JSONDecodeError, and too-long integers
        raise BadRequest(f"body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body is a JSON {type(data).__name__}, not an object")
    return data


def describe(exc: ValidationError, limit: int = 5) -> str:
    """The first few errors, each as ``where: what``; never the input values themselves."""
    parts = []
    errors = exc.errors(include_url=False, include_input=False)
    for error in errors[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where[:120]}: {error['msg'][:200]}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)
