"""The StudioML request message, as studioml 0.0.49 and the Go runner's clients write it.

Tolerant where the real client is sloppy (``gpuCount`` sent as a string, numbers in ``config.env``,
``args`` that are numbers), strict where it matters (no ``experiment.key`` is a rejection). Unknown
keys are kept, so a request can be stored and forwarded unchanged.

Every field the agent uses is bounded here: counts, lengths, numbers in range, names that become
directories or command lines. The message comes from whoever may publish to a queue, so no field
is trusted; ``agent.intake`` is the only way in, and where a field may point (storage, paths) is
checked against the message's source by ``agent.trust``.
"""

import math
import re
import time
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from agent.units import parse_duration, parse_size

# Go's experiment time limit when nothing else is set (GO21 processor.calcTimeLimit).
DEFAULT_TIME_LIMIT = 96 * 3600.0
REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|access_key|private_key|credential)", re.I)

# Bounds. A real 0.0.49 message is about 7 KB: 7 artifacts, a few args, a pip freeze of a few
# hundred lines. Each bound is far above what a client sends and far below what hurts the agent.
MAX_ARGS = 10_000
MAX_ARG_LEN = 128 * 1024  # Linux's MAX_ARG_STRLEN: a longer word cannot be exec'd anyway
MAX_ARGS_TOTAL = 1024 * 1024  # all words together, well under ARG_MAX with an environment
MAX_REQUIREMENTS = 4096
MAX_LINE = 4096
MAX_ARTIFACTS = 256
MAX_ENV = 1024
MAX_ENV_VALUE = 128 * 1024
MAX_CPUS = 4096
MAX_GPUS = 1024
_LABEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")


def _to_str(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, int | float) else value


def _to_int(value: Any) -> Any:
    if isinstance(value, str) and len(value) < 20 and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _one_line(value: str) -> str:
    # A newline or NUL would smuggle a second line into a requirements file or an argv.
    if "\0" in value or "\n" in value or "\r" in value:
        raise ValueError("must be one line without NUL")
    return value


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain NUL")
    return value


LooseStr = Annotated[str, BeforeValidator(_to_str)]
LooseInt = Annotated[int, BeforeValidator(_to_int)]
Count = Annotated[int, BeforeValidator(_to_int), Field(ge=0)]
Word = Annotated[
    str,
    BeforeValidator(_to_str),
    StringConstraints(max_length=MAX_ARG_LEN),
    AfterValidator(_no_nul),
]
Line = Annotated[
    str, BeforeValidator(_to_str), StringConstraints(max_length=MAX_LINE), AfterValidator(_one_line)
]
Text = Annotated[str, StringConstraints(max_length=MAX_LINE), AfterValidator(_no_nul)]
EnvValue = Annotated[
    str,
    BeforeValidator(_to_str),
    StringConstraints(max_length=MAX_ENV_VALUE),
    AfterValidator(_no_nul),
]


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Resources(_Tolerant):
    """``resources_needed``: counts as ints, sizes kept as the strings the client sent."""

    cpus: Annotated[Count, Field(le=MAX_CPUS)] = 0
    gpus: Annotated[Count, Field(le=MAX_GPUS)] = 0
    gpuCount: Annotated[Count, Field(le=MAX_GPUS)] = 0
    ram: Annotated[LooseStr, StringConstraints(max_length=64)] | None = None
    hdd: Annotated[LooseStr, StringConstraints(max_length=64)] | None = None
    gpuMem: Annotated[LooseStr, StringConstraints(max_length=64)] | None = None

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

    key: Text | None = None
    qualified: Text | None = None
    bucket: Text | None = None
    local: Text | None = None
    url: Text | None = None
    mutable: bool = False
    unpack: bool = True
    credentials: dict[str, Any] | None = None


class Experiment(_Tolerant):
    key: str
    filename: Text | None = None
    args: Annotated[list[Word], Field(max_length=MAX_ARGS)] = Field(default_factory=list)
    pythonenv: Annotated[list[Line], Field(max_length=MAX_REQUIREMENTS)] = Field(
        default_factory=list
    )
    pythonver: Annotated[LooseStr, StringConstraints(max_length=32)] = "3"
    project: Text | None = None
    resources_needed: Resources = Field(default_factory=Resources)
    status: Text | None = None
    time_added: float | None = None
    max_duration: Annotated[LooseStr, StringConstraints(max_length=64)] | None = None
    artifacts: Annotated[dict[str, Artifact], Field(max_length=MAX_ARTIFACTS)] = Field(
        default_factory=dict
    )

    @field_validator("key")
    @classmethod
    def _safe_key(cls, key: str) -> str:
        # The key names directories and storage objects: it must be one path component.
        if not key or key in (".", "..") or "/" in key or "\0" in key or len(key) > 255:
            raise ValueError("experiment.key must be a non-empty name without '/'")
        if not key.isprintable():
            raise ValueError("experiment.key must not contain control characters")
        return key

    @field_validator("filename")
    @classmethod
    def _script_in_workspace(cls, name: str | None) -> str | None:
        # Run as `python <filename>` in the workspace: it must name a file inside it.
        if name is None or name == "-m":
            return name
        parts = name.split("/")
        if not name or name.startswith(("/", "-", "~")) or ".." in parts or "\\" in name:
            raise ValueError(
                "must be a path inside the workspace (relative, no '..'), or '-m' for a module"
            )
        return name

    @field_validator("artifacts")
    @classmethod
    def _labels_are_names(cls, artifacts: dict[str, Artifact]) -> dict[str, Artifact]:
        # A label names the artifact's directory beside the workspace.
        for label in artifacts:
            if not _LABEL.match(label) or label in (".", ".."):
                raise ValueError(
                    f"label {label[:40]!r} must be a name of letters, digits, '_', '.', '-'"
                )
        return artifacts

    @field_validator("time_added")
    @classmethod
    def _finite_time(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError("must be a time in seconds since the epoch")
        return value

    @model_validator(mode="after")
    def _args_fit_a_command_line(self) -> "Experiment":
        total = sum(len(a) + 1 for a in self.args)
        if total > MAX_ARGS_TOTAL:
            raise ValueError(f"args total {total} characters; at most {MAX_ARGS_TOTAL}")
        return self

    @field_validator("max_duration")
    @classmethod
    def _valid_duration(cls, value: str | None) -> str | None:
        if value not in (None, ""):
            parse_duration(value)
        return value


class StoreConfig(_Tolerant):
    """``config.storage`` / ``config.database``."""

    type: Text | None = None
    endpoint: Text | None = None
    bucket: Text | None = None


class StudioConfig(_Tolerant):
    experimentLifetime: LooseStr | None = None
    saveWorkspaceFrequency: LooseStr | None = None
    env: Annotated[dict[str, EnvValue], Field(max_length=MAX_ENV)] = Field(default_factory=dict)
    pip: Annotated[list[Line], Field(max_length=MAX_REQUIREMENTS)] = Field(default_factory=list)
    storage: StoreConfig | None = None
    database: StoreConfig | None = None

    @field_validator("experimentLifetime", "saveWorkspaceFrequency")
    @classmethod
    def _valid_duration(cls, value: str | None) -> str | None:
        if value not in (None, ""):
            parse_duration(value)
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name[:40]!r} is not an environment variable name")
        return env

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
