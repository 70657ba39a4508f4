"""The StudioML request message, as studioml 0.0.49 and the Go runner's clients write it.

Tolerant where the real client is sloppy (``gpuCount`` sent as a string, numbers in ``config.env``,
``args`` that are numbers), strict where it matters (no ``experiment.key`` is a rejection). Unknown
keys are kept, so a request can be stored and forwarded unchanged.
"""

import json
import math
import re
import time
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from agent.errors import BadRequest
from agent.units import parse_duration, parse_size

# Go's experiment time limit when nothing else is set (GO21 processor.calcTimeLimit).
DEFAULT_TIME_LIMIT = 96 * 3600.0
REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|access_key|private_key|credential)", re.I)


def _to_str(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, int | float) else value


def _to_int(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


LooseStr = Annotated[str, BeforeValidator(_to_str)]
LooseInt = Annotated[int, BeforeValidator(_to_int)]


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Resources(_Tolerant):
    """``resources_needed``: counts as ints, sizes kept as the strings the client sent."""

    cpus: LooseInt = 0
    gpus: LooseInt = 0
    gpuCount: LooseInt = 0
    ram: LooseStr | None = None
    hdd: LooseStr | None = None
    gpuMem: LooseStr | None = None

    @field_validator("ram", "hdd", "gpuMem")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        if value not in (None, ""):
            parse_size(value)
        return value

    def size(self, name: str) -> int:
        """Bytes of ``ram``, ``hdd`` or ``gpuMem``; 0 when unset."""
        value = getattr(self, name)
        return parse_size(value) if value else 0


class Artifact(_Tolerant):
    """One entry of ``experiment.artifacts``."""

    key: str | None = None
    qualified: str | None = None
    bucket: str | None = None
    local: str | None = None
    url: str | None = None
    mutable: bool = False
    unpack: bool = True
    credentials: dict[str, Any] | None = None


class Experiment(_Tolerant):
    key: str
    filename: str | None = None
    args: list[LooseStr] = Field(default_factory=list)
    pythonenv: list[LooseStr] = Field(default_factory=list)
    pythonver: LooseStr = "3"
    project: str | None = None
    resources_needed: Resources = Field(default_factory=Resources)
    status: str | None = None
    time_added: float | None = None
    max_duration: LooseStr | None = None
    artifacts: dict[str, Artifact] = Field(default_factory=dict)

    @field_validator("key")
    @classmethod
    def _safe_key(cls, key: str) -> str:
        # The key names directories and storage objects: it must be one path component.
        if not key or key in (".", "..") or "/" in key or "\0" in key or len(key) > 255:
            raise ValueError("experiment.key must be a non-empty name without '/'")
        return key

    @field_validator("max_duration")
    @classmethod
    def _valid_duration(cls, value: str | None) -> str | None:
        if value not in (None, ""):
            parse_duration(value)
        return value


class StoreConfig(_Tolerant):
    """``config.storage`` / ``config.database``."""

    type: str | None = None
    endpoint: str | None = None
    bucket: str | None = None


class StudioConfig(_Tolerant):
    experimentLifetime: LooseStr | None = None
    saveWorkspaceFrequency: LooseStr | None = None
    env: dict[str, LooseStr] = Field(default_factory=dict)
    pip: list[LooseStr] = Field(default_factory=list)
    storage: StoreConfig | None = None
    database: StoreConfig | None = None

    @field_validator("experimentLifetime", "saveWorkspaceFrequency")
    @classmethod
    def _valid_duration(cls, value: str | None) -> str | None:
        if value not in (None, ""):
            parse_duration(value)
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("pip", mode="before")
    @classmethod
    def _pip_none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class Request(_Tolerant):
    experiment: Experiment
    config: StudioConfig = Field(default_factory=StudioConfig)

    @property
    def key(self) -> str:
        return self.experiment.key

    def time_limit(self, now: float) -> float:
        """Seconds the experiment may run from ``now``; 0 or less means it has expired.

        The smallest of ``max_duration``, what is left of ``time_added + experimentLifetime``
        and Go's 96 h cap.
        """
        limit = DEFAULT_TIME_LIMIT
        lifetime = self.config.experimentLifetime
        added = self.experiment.time_added
        if lifetime and added and added > 10:
            limit = min(limit, added + parse_duration(lifetime) - now)
        if self.experiment.max_duration:
            limit = min(limit, parse_duration(self.experiment.max_duration))
        return limit

    def expired(self, now: float | None = None) -> bool:
        lifetime = self.config.experimentLifetime
        added = self.experiment.time_added
        if not (lifetime and added and added > 10):
            return False
        return added + parse_duration(lifetime) <= (time.time() if now is None else now)

    def checkpoint_interval(self) -> float | None:
        """``saveWorkspaceFrequency`` in seconds, or None when the request sets none."""
        value = self.config.saveWorkspaceFrequency
        seconds = parse_duration(value) if value else 0.0
        return seconds if seconds > 0 and math.isfinite(seconds) else None

    def mutable_labels(self) -> list[str]:
        return [label for label, art in self.experiment.artifacts.items() if art.mutable]

    def to_wire(self) -> dict[str, Any]:
        """The request as JSON-ready data, unknown keys included, nothing added."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


def parse_request(body: bytes) -> Request:
    """Parse a message body; raise BadRequest with a reason a person can act on."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body is a JSON {type(data).__name__}, not an object")
    if "message" in data and "experiment" not in data:
        raise BadRequest(
            "body is an encrypted StudioML envelope ('message'); this agent has no decryption key"
        )
    try:
        return Request.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def redact(data: Any) -> Any:
    """A copy of JSON-like data with every credential-looking value replaced."""
    if isinstance(data, dict):
        return {
            k: REDACTED
            if _SECRET_KEY.search(str(k)) and not isinstance(v, dict | list)
            else redact(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data
