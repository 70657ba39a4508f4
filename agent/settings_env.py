"""Settings from the environment: ``STUDIO_AGENT_<KEY>``, ``STUDIO_AGENT_<SECTION>__<KEY>`` and
the Go runner's names, as plain data for the Settings model to validate.

Written here rather than taken from pydantic-settings, which imports asyncio, dotenv and its
cloud sources at start: 8.7 MiB of every agent's RSS for a dozen lines of work. The rules are
the ones that library applied, which the README documents: names are case-insensitive; a key
whose type is a list, a mapping or a section takes JSON (``STUDIO_AGENT_S3_ENDPOINTS='["a"]'``);
anything else is taken as text and parsed by the model like a YAML value.
"""

import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agent.errors import ConfigError

ENV_PREFIX = "STUDIO_AGENT_"
_COMPLEX = (list, tuple, set, frozenset, dict)


def from_environment(
    fields: Mapping[str, FieldInfo], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``{key: value}`` for every key (and section key) set by a ``STUDIO_AGENT_`` variable."""
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    found: dict[str, Any] = {}
    for name, field in fields.items():
        variable = ENV_PREFIX + name.upper()
        if variable in env:
            found[name] = _value(field, env[variable], variable)
        section = section_model(field)
        if section is None:
            continue
        nested = {
            key: _value(sub, env[f"{variable}__{key.upper()}"], f"{variable}__{key.upper()}")
            for key, sub in section.model_fields.items()
            if f"{variable}__{key.upper()}" in env
        }
        if nested:
            whole = found.get(name)
            found[name] = {**(whole if isinstance(whole, dict) else {}), **nested}
    return found


def section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a section key (``rabbitmq:``, ``sqs:``), or None for a plain key."""
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _value(field: FieldInfo, text: str, variable: str) -> Any:
    if not _takes_json(field.annotation):
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"environment variable {variable}: not valid JSON: {exc}") from None


def _takes_json(kind: Any) -> bool:
    """Lists, mappings and sections, alone or in a union with None."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_json(arg) for arg in typing.get_args(kind) if arg is not type(None))
    if origin is typing.Annotated:
        return _takes_json(typing.get_args(kind)[0])
    if origin in _COMPLEX or kind in _COMPLEX:
        return True
    return isinstance(kind, type) and issubclass(kind, BaseModel)
