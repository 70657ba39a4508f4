"""The packaged default config and the Debian version agree with the code they ship."""

import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import agent
from agent.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "packaging" / "agent.yaml"
# What systemd gives the service (the unit's StateDirectory=/CacheDirectory=, the user's home).
SERVICE_ENV = {
    "HOME": "/var/lib/studio-agent",
    "STATE_DIRECTORY": "/var/lib/studio-agent",
    "CACHE_DIRECTORY": "/var/cache/studio-agent",
    "RUNTIME_DIRECTORY": "/run/studio-agent",
}
_KEY = re.compile(r"^(?:# )?(  )?([a-z_0-9]+):(?: (.*))?$")
# Set, not commented: a shell (studio-agent status) has no STATE_DIRECTORY to go by.
SET_KEYS = {"state_dir", "cache_dir", "control_socket"}


@pytest.fixture
def service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STUDIO_AGENT_") or name in ("STUDIOML_HOME", "XDG_STATE_HOME"):
            monkeypatch.delenv(name)
    for name, value in SERVICE_ENV.items():
        monkeypatch.setenv(name, value)


def listed_keys() -> dict[str, str]:
    """Each key the file lists, a section's as ``section.key``, with its value as written."""
    keys: dict[str, str] = {}
    section = ""
    for match in map(_KEY.match, DEFAULT_CONFIG.read_text().splitlines()):
        if match is None:
            continue
        indent, key, value = match.groups()
        if not indent:
            section = key if value is None else ""
        keys[f"{section}.{key}" if indent else key] = value or ""
    return keys


def every_key() -> list[str]:
    keys = []
    for name, field in Settings.model_fields.items():
        keys.append(name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += [f"{name}.{key}" for key in field.annotation.model_fields]
    return sorted(keys)


def test_default_config_lists_every_key() -> None:
    assert sorted(listed_keys()) == every_key()


def test_default_config_sets_only_the_service_paths() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert set(data) == SET_KEYS


def test_default_config_is_valid_as_shipped(service_env: None) -> None:
    load_settings(DEFAULT_CONFIG)  # all comments: the embedded defaults


def test_default_config_shows_the_service_defaults(service_env: None, tmp_path: Path) -> None:
    lines = DEFAULT_CONFIG.read_text().splitlines()
    uncommented = "\n".join(line.removeprefix("# ") for line in lines if _KEY.match(line))
    written = tmp_path / "agent.yaml"
    written.write_text(yaml.safe_dump(yaml.safe_load(uncommented)))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings(written) == load_settings(empty)


def test_debian_version_is_the_package_version() -> None:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    version = re.fullmatch(r"studio-agent \(([^)]+)\) \S+; urgency=\w+", first)
    assert version is not None, first
    assert version[1] == agent.__version__
