"""Typed settings: the YAML file, its conf.d drop-ins, then environment variables.

Precedence, lowest first: embedded defaults, ``agent.yaml``, ``conf.d/*.yaml`` in lexical order
(deep-merged), the Go runner's environment names (``QUEUE_MATCH``, ``MAX_MEM``, ...), then
``STUDIO_AGENT_<NAME>``. Unknown keys and bad values raise ConfigError naming the key and where
the value came from (file and line, or the environment variable).
"""

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError
from agent.queue_settings import (
    FLAT_ALIASES,
    LocalSettings,
    PubSubSettings,
    RabbitSettings,
    SqsSettings,
    fold_aliases,
)
from agent.settings_env import ENV_PREFIX, from_environment, section_model
from agent.settings_types import (
    IMAGE_SOURCES,
    Duration,
    ExistingFile,
    ImageSource,
    Regex,
    Size,
    home,
)
from agent.units import parse_duration, parse_size

DEFAULT_CONFIG = Path("/etc/studio-agent/agent.yaml")
# The Go runner's flag names as environment variables (karlmutch/envflag), accepted unchanged so
# that an existing deployment's environment file keeps working.
GO_ALIASES: dict[str, str] = {
    "queue_root": "QUEUE_ROOT",
    "queue_match": "QUEUE_MATCH",
    "queue_mismatch": "QUEUE_MISMATCH",
    "cache_dir": "CACHE_DIR",
    "cache_size": "CACHE_SIZE",
    "work_dir": "WORKING_DIR",
    "max_cores": "MAX_CORES",
    "max_mem": "MAX_MEM",
    "max_disk": "MAX_DISK",
    "cpu_only": "CPU_ONLY",
    "amqp_url": "AMQP_URL",
    "amqp_mgmt_url": "AMQP_MGT_URL",
    "certs_dir": "CERTS_DIR",
    "max_idle": "LIMIT_IDLE_DURATION",
    "max_experiments": "LIMIT_TASKS",
    "pubsub_emulator_host": "PUBSUB_EMULATOR_HOST",
    "slack_hook": "SLACK_HOOK",
    "slack_room": "SLACK_ROOM",
    "metrics_address": "PROM_ADDRESS",
}
# A Slack incoming-webhook URL is itself the credential: whoever has it can post.
SECRET_FIELDS: frozenset[str] = frozenset({"slack_hook"})
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):[^@/]*@", re.I)


def _default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY; off systemd follow XDG.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else home() / ".local" / "state") / "studio-agent"


def _default_control_socket() -> Path | None:
    # systemd's RuntimeDirectory= exports RUNTIME_DIRECTORY (the unit's /run/studio-agent).
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) / "control.sock" if runtime else None


def _default_cache_dir() -> Path:
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home() / ".cache") / "studio-agent"


class Settings(BaseModel):
    """Every key an operator can set. Names are stable: docs, Ansible and Salt use them.
    ``load_settings`` gathers them from the files and the environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_match: Regex = r"^(rmq|sqs|local)_.*$"
    queue_mismatch: Regex = ""
    state_dir: Path = Field(default_factory=_default_state_dir)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    cache_size: Size = parse_size("20GiB")
    image_cache_size: Size = parse_size("50GiB")  # pulled and downloaded images; 0: no limit
    work_dir: Path | None = None
    max_concurrent: int = Field(default=1, ge=1, le=256)
    max_attempts: int = Field(default=5, ge=1)
    drain_timeout: Duration = parse_duration("10m")
    kill_grace: Duration = parse_duration("10s")
    max_runtime: Duration = parse_duration("96h")
    poll_interval: Duration = Field(default=0.1, gt=0)
    checkpoint_interval: Duration = parse_duration("10m")
    checkpoint_min_interval: Duration = parse_duration("30s")
    certs_dir: Path | None = Path("/etc/studio-agent/certs")
    # Clear-text messages on queues without a signing key (certs/queues/signing): "refuse" takes
    # only signed, encrypted ones everywhere (the Go runner's CLEAR_TEXT_MESSAGES, inverted).
    clear_text: Literal["accept", "refuse"] = "accept"
    # The operator's control socket (agent.control); unset: <state_dir>/control.sock.
    control_socket: Path | None = Field(default_factory=lambda: _default_control_socket())
    # Exit (code 79, not restarted) after this long without an experiment, or once this many
    # have been started and settled: for autoscaling groups and spot fleets. 0: never. (The Go
    # runner's --limit-idle-duration and --limit-tasks; max_tasks here is a run's process limit.)
    max_idle: Duration = 0.0
    # How often a running experiment's record is read for `studio runs stop` (0: never).
    stop_check: Duration = parse_duration("10s")
    max_experiments: int = Field(default=0, ge=0)
    # -- the queue backends, a section each (agent.queue_settings; flat aliases accepted) --
    local: LocalSettings = Field(default_factory=LocalSettings)
    rabbitmq: RabbitSettings = Field(default_factory=RabbitSettings)
    sqs: SqsSettings = Field(default_factory=SqsSettings)
    pubsub: PubSubSettings = Field(default_factory=PubSubSettings)
    s3_ca_bundle: ExistingFile | None = None
    s3_verify: bool = True
    # host[:port] of the S3 servers a message may name; empty: any but link-local addresses
    s3_endpoints: list[str] = Field(default_factory=list)
    # Local stores a message from a local queue may name (unset: <state_dir>/storage); a message
    # from a broker may never name a host path.
    local_storage: list[Path] | None = None
    # Local stores a message from a broker may name too: only a filesystem that every agent and
    # every submitter mounts (NFS), whose contents any submitter may read anyway. Empty: none.
    broker_local_storage: list[Path] = Field(default_factory=list)
    max_message_size: Size = parse_size("4MiB")  # a bigger body is set aside unread
    # A message the agent was parsing or preparing when it died this many times is set aside.
    max_crashes: int = Field(default=3, ge=1)
    upload_budget: Duration = parse_duration("10m")
    retry_backoff: Duration = parse_duration("10s")
    metadata_layout: Literal["artifact", "go"] = "artifact"
    metadata_max_bytes: Size = parse_size("1MiB")
    executor: Literal["venv", "singularity"] = "venv"
    # -- containers (executor singularity, or a request with a _singularity artifact) --
    container_image: str = ""  # default image when a request names none
    container_sources: list[ImageSource] = Field(default_factory=lambda: list(IMAGE_SOURCES))
    container_options: list[str] = Field(default_factory=list)  # extra `exec` flags
    # -- resources (admission) --
    admission_backoff: Duration = parse_duration("30s")  # a queue whose request does not fit now
    never_fit_backoff: Duration = parse_duration("10m")  # ... and one that can never fit here
    # JSON list of cards used instead of NVML: for tests, and hosts whose driver lacks NVML
    gpu_inventory_file: Path | None = None
    # -- reporting --
    slack_hook: str = ""
    slack_room: str = ""
    metrics_address: str = "127.0.0.1:9090"  # host:port for /metrics; empty turns it off
    journal_output: bool = False  # copy experiments' output lines into the journal too
    start_budget: Duration = parse_duration("60s")  # required backends must answer in this
    installer: Literal["auto", "uv", "pip"] = "auto"
    python_interpreters: list[Path] = Field(default_factory=list)
    python_nearest: bool = False
    pass_env: list[str] = Field(default_factory=list)
    # -- isolation (agent.sandbox): auto uses what the host has, required refuses to start
    # without all of it, off runs experiments as the agent (README, Security) --
    isolation: Literal["auto", "required", "off"] = "auto"
    slot_users: list[str] = Field(default_factory=list)  # empty: every studio-slot<N> user
    memory_factor: float = Field(default=1.25, ge=1.0)  # memory limit: ram x this ...
    memory_floor: Size = parse_size("256MiB")  # ... and at least this
    max_tasks: int = Field(default=4096, ge=0)  # processes and threads of one run; 0: no limit
    cpu_quota: bool = False  # cpus as a hard ceiling too, not only a share
    device_allow: list[str] = Field(default_factory=list)  # more device nodes (globs) for runs
    keep_workdir: bool = False
    update_local_db: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_cores: int = Field(default=0, ge=0)
    max_mem: Size = 0
    max_disk: Size = 0
    cpu_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _flat_aliases(cls, data: Any) -> Any:
        """``amqp_url=...`` given directly (tests, overrides) fills its section."""
        return fold_aliases(data, override=True) if isinstance(data, dict) else data

    @property
    def effective_work_dir(self) -> Path:
        return self.work_dir or self.state_dir / "work"

    @property
    def effective_control_socket(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"

    @property
    def effective_local_storage(self) -> tuple[Path, ...]:
        if self.local_storage is None:
            return (self.state_dir / "storage",)
        return tuple(self.local_storage)

    @field_validator("local_storage", "broker_local_storage")
    @classmethod
    def _absolute_paths(cls, value: list[Path] | None) -> list[Path] | None:
        for path in value or []:
            if not path.is_absolute():
                raise ValueError(f"{path}: must be an absolute path")
        return value

    @field_validator("s3_endpoints")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or "/" in item or "@" in item:
                raise ValueError(f"{item!r}: must be host or host:port")
        return [item.lower() for item in value]


def _go_aliases() -> dict[str, Any]:
    """The Go runner's names, then the prefixed flat aliases (``STUDIO_AGENT_AMQP_URL``)."""
    found = {field: os.environ[name] for field, name in GO_ALIASES.items() if name in os.environ}
    for flat in FLAT_ALIASES:
        if ENV_PREFIX + flat.upper() in os.environ:
            found[flat] = os.environ[ENV_PREFIX + flat.upper()]
    return fold_aliases(found, override=True)


def config_files(main: Path) -> list[Path]:
    """The main file (if it exists) and then its ``conf.d/*.yaml`` drop-ins, in order."""
    files = [main] if main.is_file() else []
    drop_ins = main.parent / "conf.d"
    if drop_ins.is_dir():
        files += sorted(p for p in drop_ins.iterdir() if p.suffix in (".yaml", ".yml"))
    return files


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Read the config files and environment; ConfigError names every bad key and its source.

    ``config`` None means the default path, which may be absent (embedded defaults); a path
    given explicitly must exist.
    """
    main = config or DEFAULT_CONFIG
    if config is not None and not config.is_file():
        raise ConfigError(f"{config}: config file not found")
    data: dict[str, Any] = {}
    where: dict[tuple[str, ...], str] = {}
    for path in config_files(main):
        new, new_where = _read_yaml(path)
        _merge(data, where, fold_aliases(new, override=False, where=new_where), new_where)
        where.update(new_where)  # every key this file set, nested ones too, is now its
    _refuse_unknown_env()
    # Lowest first: the files, the Go runner's names, STUDIO_AGENT_*, the caller's overrides.
    for layer in (_go_aliases(), from_environment(Settings.model_fields), overrides):
        _merge(data, {}, layer, {})  # their sources are named from os.environ by _source_of
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, where)) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigError(f"{path}:{line}: not valid YAML: {exc.problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:1: the top level must be a mapping of keys to values")
    return data, dict(_key_lines(node, path, ()))


def _key_lines(
    node: yaml.MappingNode, path: Path, prefix: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], str]]:
    for key_node, value_node in node.value:
        key = (*prefix, str(key_node.value))
        yield key, f"{path}:{key_node.start_mark.line + 1}"
        if isinstance(value_node, yaml.MappingNode):
            yield from _key_lines(value_node, path, key)


def _merge(
    data: dict[str, Any],
    where: dict[tuple[str, ...], str],
    new: Mapping[str, Any],
    new_where: Mapping[tuple[str, ...], str],
    prefix: tuple[str, ...] = (),
) -> None:
    """Deep-merge ``new`` into ``data``: mappings merge key by key, anything else replaces."""
    for key, value in new.items():
        path = (*prefix, str(key))
        where[path] = new_where.get(path, where.get(path, "?"))
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], where, value, new_where, path)
        else:
            data[key] = value


def _env_names() -> set[str]:
    """Every STUDIO_AGENT_ name: each key, each section's keys, each flat alias."""
    names = {ENV_PREFIX + name.upper() for name in [*Settings.model_fields, *FLAT_ALIASES]}
    for name, field in Settings.model_fields.items():
        section = section_model(field)
        if section is not None:
            names |= {f"{ENV_PREFIX}{name.upper()}__{key.upper()}" for key in section.model_fields}
    return names


def _refuse_unknown_env() -> None:
    known = _env_names()
    unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise ConfigError(
            f"environment variable {unknown[0]}: unknown key "
            f"(known: {', '.join(sorted(Settings.model_fields))})"
        )


def _explain(exc: ValidationError, where: Mapping[tuple[str, ...], str]) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(str(p) for p in error["loc"])
        key = ".".join(loc)
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        source = _source_of(loc, where)
        value = mask_secrets(error.get("input"))  # a mistyped URL still carries its password
        shown = "" if error["type"] == "extra_forbidden" else f" (got {value!r})"
        lines.append(f"{source}: {key}: {message}{shown}")
    return "\n".join(lines)


def _source_of(loc: tuple[str, ...], where: Mapping[tuple[str, ...], str]) -> str:
    names = [loc[0] if loc else ""]
    names += [f for f, (section, key) in FLAT_ALIASES.items() if tuple(loc[:2]) == (section, key)]
    for candidate in (
        ENV_PREFIX + "__".join(loc).upper(),
        *(ENV_PREFIX + n.upper() for n in names),
    ):
        if candidate in os.environ:
            return f"environment variable {candidate}"
    for name in names:
        if GO_ALIASES.get(name, "") in os.environ:
            return f"environment variable {GO_ALIASES[name]}"
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in where:
            return where[loc[:depth]]
    return "settings"


def mask_secrets(value: Any, key: str = "") -> Any:
    """Hide passwords in URLs and secret-named keys, for check-config and logs."""
    if key in SECRET_FIELDS and value:
        return "********"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<scheme>\g<user>:********@", value)
    if isinstance(value, dict):
        return {k: mask_secrets(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def effective_config(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with secrets masked, for ``check-config``."""
    data = settings.model_dump(mode="json")
    data["work_dir"] = str(settings.effective_work_dir)
    return {k: mask_secrets(v, k) for k, v in data.items()}
