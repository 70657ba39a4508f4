"""JSON merge (RFC 7386-like, history kept) and JSON Patch (RFC 6902) with undo.

Every change goes through an undo log that also tracks the size of the document, so a caller
can refuse a change that would grow it past a cap and roll back a patch that fails halfway.
"""

import copy
import json
import math
import re
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

Json = Any  # a decoded JSON value: dict, list, str, int, float, bool or None

_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_BAD_ESCAPE = re.compile(r"~(?![01])")
_COMPACT = json.JSONEncoder(separators=(",", ":"))


class PatchError(ValueError):
    """A JSON Patch is malformed, points where nothing is, or one of its tests failed."""


def json_size(value: Json) -> int:
    """Bytes of value as compact, ASCII-escaped JSON: the measure the size cap applies to."""
    # Called for every value a line sets: the common scalars skip the encoder's set-up.
    kind = type(value)
    if kind is str:
        return len(encode_basestring_ascii(value))
    if kind is int or (kind is float and math.isfinite(value)):
        return len(repr(value))
    return len(_COMPACT.encode(value))


class Edit:
    """Changes to a JSON document that can be rolled back, with their effect on its size.

    Every change merge and patch make goes through here: a failed patch, or a fragment over the
    size cap, is undone at the cost of its own size, and the scraper knows the exact size of its
    document without serializing it again after each line.
    """

    def __init__(self, *, measure: bool = False) -> None:
        # Measuring costs an encoding of every value set and replaced; only the scraper needs it.
        self.measure = measure
        self.delta = 0
        self._undo: list[Callable[[], None]] = []

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.delta = 0

    def put(self, container: Json, key: Json, value: Json) -> None:
        """Set an existing list slot, or a dict member old or new."""
        if isinstance(container, list) or key in container:
            old = container[key]
            if self.measure:
                self.delta += json_size(value) - json_size(old)
            self._undo.append(lambda: container.__setitem__(key, old))
        else:
            if self.measure:
                self.delta += json_size(key) + 1 + json_size(value) + (1 if container else 0)
            self._undo.append(lambda: container.__delitem__(key))
        container[key] = value

    def insert(self, array: list[Json], index: int, value: Json) -> None:
        if self.measure:
            self.delta += json_size(value) + (1 if array else 0)
        array.insert(index, value)
        self._undo.append(lambda: array.__delitem__(index))

    def pop(self, container: Json, key: Json) -> Json:
        old = container.pop(key)
        if self.measure:
            name = json_size(key) + 1 if isinstance(container, dict) else 0
            self.delta -= name + json_size(old) + (1 if container else 0)
        if isinstance(container, list):
            self._undo.append(lambda: container.insert(key, old))
        else:
            self._undo.append(lambda: container.__setitem__(key, old))
        return old

    def set_root(self, doc: dict[str, Json], value: dict[str, Json]) -> None:
        old = dict(doc)
        if self.measure:
            self.delta += json_size(value) - json_size(old)
        _replace_all(doc, value)
        self._undo.append(lambda: _replace_all(doc, old))


def _replace_all(doc: dict[str, Json], value: dict[str, Json]) -> None:
    doc.clear()
    doc.update(value)


def merge(base: dict[str, Json], fragment: dict[str, Json]) -> None:
    """Merge fragment into base in place: objects merge key by key, anything else replaces.

    As RFC 7386 the newer value wins, but a null is stored rather than deleting the member: a
    scrape document keeps the history of every tag an experiment printed.
    """
    merge_into(base, fragment, Edit(), copy_values=True)


def merge_into(
    base: dict[str, Json], fragment: dict[str, Json], edit: Edit, copy_values: bool
) -> None:
    for key, value in fragment.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merge_into(current, value, edit, copy_values)
        else:
            edit.put(base, key, copy.deepcopy(value) if copy_values else value)


def apply_patch(doc: dict[str, Json], ops: list[Json]) -> None:
    """Apply an RFC 6902 JSON Patch to doc in place; if any operation fails doc is unchanged."""
    edit = Edit()
    try:
        apply_ops(doc, ops, edit)
    except Exception:
        edit.rollback()
        raise


def apply_ops(doc: dict[str, Json], ops: Json, edit: Edit) -> None:
    if not isinstance(ops, list):
        raise PatchError("a patch is a JSON array of operations")
    for number, op in enumerate(ops):
        try:
            _apply_op(doc, op, edit)
        except PatchError as error:
            where = f" ({op.get('op')!r} at {op.get('path')!r})" if isinstance(op, dict) else ""
            raise PatchError(f"operation {number}{where}: {error}") from None


def _apply_op(doc: dict[str, Json], op: Json, edit: Edit) -> None:
    if not isinstance(op, dict):
        raise PatchError("an operation must be a JSON object")
    name, path = op.get("op"), parse_pointer(_field(op, "path"))
    match name:
        case "add":
            _add(doc, path, copy.deepcopy(_field(op, "value")), edit)
        case "remove":
            _remove(doc, path, edit)
        case "replace":
            _replace(doc, path, copy.deepcopy(_field(op, "value")), edit)
        case "move":
            _move(doc, parse_pointer(_field(op, "from")), path, edit)
        case "copy":
            _add(doc, path, copy.deepcopy(_get(doc, parse_pointer(_field(op, "from")))), edit)
        case "test":
            if not _json_equal(_get(doc, path), _field(op, "value")):
                raise PatchError("test failed: the value differs")
        case _:
            raise PatchError(f"unknown op {name!r}")


def _field(op: dict[str, Json], name: str) -> Json:
    if name not in op:
        raise PatchError(f"missing member {name!r}")
    return op[name]


def parse_pointer(text: Json) -> list[str]:
    """Split an RFC 6901 JSON Pointer into its unescaped reference tokens."""
    if not isinstance(text, str) or (text and not text.startswith("/")):
        raise PatchError(f"{text!r} is not a JSON Pointer (it must be empty or start with '/')")
    tokens = text.split("/")[1:]
    if any(_BAD_ESCAPE.search(token) for token in tokens):
        raise PatchError(f"{text!r} has a '~' not followed by 0 or 1")
    # ~1 first, so that "~01" becomes "~1" and not "/" (RFC 6901 section 4).
    return [token.replace("~1", "/").replace("~0", "~") for token in tokens]


def _index(token: str, length: int, *, end_ok: bool = False) -> int:
    if token == "-" and end_ok:
        return length
    if not _ARRAY_INDEX.fullmatch(token):
        raise PatchError(f"{token!r} is not an array index")
    index = int(token)
    if index > length or (index == length and not end_ok):
        raise PatchError(f"index {index} is out of range (the array has {length} items)")
    return index


def _slot(container: Json, token: str) -> str | int:
    """Return the existing member or index of container that token names."""
    if isinstance(container, list):
        return _index(token, len(container))
    if isinstance(container, dict) and token in container:
        return token
    if isinstance(container, dict):
        raise PatchError(f"no member {token!r}")
    raise PatchError(f"cannot look up {token!r} in a {type(container).__name__}")


def _get(doc: dict[str, Json], tokens: list[str]) -> Json:
    value: Json = doc
    for token in tokens:
        value = value[_slot(value, token)]
    return value


def _parent(doc: dict[str, Json], tokens: list[str]) -> Json:
    parent = _get(doc, tokens[:-1])
    if not isinstance(parent, dict | list):
        raise PatchError(f"the parent of {tokens[-1]!r} is not an object or an array")
    return parent


def _add(doc: dict[str, Json], tokens: list[str], value: Json, edit: Edit) -> None:
    if not tokens:
        return _set_root(doc, value, edit)
    parent = _parent(doc, tokens)
    if isinstance(parent, list):
        edit.insert(parent, _index(tokens[-1], len(parent), end_ok=True), value)
    else:
        edit.put(parent, tokens[-1], value)


def _remove(doc: dict[str, Json], tokens: list[str], edit: Edit) -> Json:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _parent(doc, tokens)
    return edit.pop(parent, _slot(parent, tokens[-1]))


def _replace(doc: dict[str, Json], tokens: list[str], value: Json, edit: Edit) -> None:
    if not tokens:
        return _set_root(doc, value, edit)
    parent = _parent(doc, tokens)
    edit.put(parent, _slot(parent, tokens[-1]), value)


def _move(doc: dict[str, Json], source: list[str], target: list[str], edit: Edit) -> None:
    if len(target) > len(source) and target[: len(source)] == source:
        raise PatchError("cannot move a value into one of its own children")
    if source == target:
        _get(doc, source)  # moving a value onto itself changes nothing, but it must exist
    else:
        _add(doc, target, _remove(doc, source, edit), edit)


def _set_root(doc: dict[str, Json], value: Json, edit: Edit) -> None:
    if not isinstance(value, dict):
        raise PatchError("the document root must stay a JSON object")
    edit.set_root(doc, value)


def _json_equal(left: Json, right: Json) -> bool:
    """Equality as RFC 6902 `test` defines it: 1 == 1.0, but true is not 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    return type(left) is type(right) and bool(left == right)


def is_patch(value: Json) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(op, dict) and "op" in op for op in value)
    )
