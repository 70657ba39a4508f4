"""Each queue backend's settings: the ``local:``, ``rabbitmq:``, ``sqs:`` and ``pubsub:``
sections of the config (and ``STUDIO_AGENT_<SECTION>__<KEY>`` in the environment).

The flat keys that the Ansible role, the Salt state and the Go runner's variables use
(``queue_root``, ``amqp_url``, ...: ``FLAT_ALIASES``) are still accepted, and fill their section.
Both spellings in one file is an error; a more specific place (a later drop-in, the
environment) wins as for any key.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from agent.errors import ConfigError
from agent.settings_types import Duration, ExistingFile, default_queue_root

FLAT_ALIASES: dict[str, tuple[str, str]] = {
    "queue_root": ("local", "root"),
    "amqp_url": ("rabbitmq", "url"),
    "amqp_mgmt_url": ("rabbitmq", "mgmt_url"),
    "amqp_ca_file": ("rabbitmq", "ca_file"),
    "amqp_refresh": ("rabbitmq", "refresh"),
    "pubsub_emulator_host": ("pubsub", "emulator_host"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSettings(_Section):
    root: Path = Field(default_factory=default_queue_root)  # StudioML's local queue root
    rescan: Duration = Field(default=5.0, gt=0)  # a scan this often besides the inotify watch


class RabbitSettings(_Section):
    url: str = ""  # a broker of the config's own (credentials in the certs dir add others)
    mgmt_url: str = ""  # its management API; empty: the Go runner's rule (port + 10000)
    ca_file: ExistingFile | None = None  # CA bundle for amqps:// and an https management API
    refresh: Duration = 30.0  # how often the queue list is read (and on the broker's events)

    @field_validator("url", "mgmt_url")
    @classmethod
    def _url_scheme(cls, value: str, info: ValidationInfo) -> str:
        allowed = ("amqp://", "amqps://") if info.field_name == "url" else ("http", "https")
        if value and not value.startswith(allowed):
            raise ValueError(f"must start with {' or '.join(allowed)}")
        return value


class SqsSettings(_Section):
    wait_time: int = Field(default=20, ge=1, le=20)  # seconds a long poll waits for a message
    visibility: Duration = Field(default=60.0, ge=2)  # a lease, renewed at half of it
    refresh: Duration = 30.0  # how often the queue list is read


class PubSubSettings(_Section):
    emulator_host: str = ""  # host:port of an emulator instead of Google's service
    ack_deadline: int = Field(default=60, ge=1, le=600)  # a lease, renewed at half of it
    refresh: Duration = 30.0  # how often the subscriptions are listed


def fold_aliases(
    data: dict[str, Any], override: bool, where: dict[tuple[str, ...], str] | None = None
) -> dict[str, Any]:
    """``data`` with each flat alias moved into its section. When both spellings are there the
    flat one wins if ``override`` (it came from a more specific place), else it is an error."""
    out = dict(data)
    for flat, (section, key) in FLAT_ALIASES.items():
        if flat not in out:
            continue
        value = out.pop(flat)
        given = out.get(section)
        if isinstance(given, BaseModel):
            given = given.model_dump(exclude_unset=True)
        if given is not None and not isinstance(given, dict):
            continue  # a section that is not a mapping: validation says so
        folded = dict(given or {})
        if key in folded and folded[key] != value and not override:
            place = where.get((flat,), "") if where else ""
            raise ConfigError(f"{place}: {flat} and {section}.{key} are both set: keep one")
        folded[key] = value
        out[section] = folded
        if where is not None and (flat,) in where:
            where[(section, key)] = where[(flat,)]
    return out
