"""The packaged default config and the Debian version agree with the code they ship."""

import os
import re
from pathlib import Path

import pytest
import yaml

import agent
from agent.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "packaging" / "agent.yaml"
# What systemd gives the service (the unit's StateDirectory=/CacheDirectory=, the user's home).
SERVICE_ENV = {
    "HOME": "/var/lib/studio-agent",
    "STATE_DIRECTORY": "/var/lib/studio-agent",
    "CACHE_DIRECTORY": "/var/cache/studio-agent",
}
_KEY = re.compile(r"^(?:# )?([a-z_0-9]+): (.*)$")
# Set, not commented: a shell (studio-agent status) has no STATE_DIRECTORY to go by.
SET_KEYS = {"state_dir", "cache_dir"}


@pytest.fixture
def service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STUDIO_AGENT_") or name in ("STUDIOML_HOME", "XDG_STATE_HOME"):
            monkeypatch.delenv(name)
    for name, value in SERVICE_ENV.items():
        monkeypatch.setenv(name, value)


def listed_keys() -> dict[str, str]:
    lines = DEFAULT_CONFIG.read_text().splitlines()
    return {m[1]: m[2] for m in map(_KEY.match, lines) if m}


def test_default_config_lists_every_key() -> None:
    assert sorted(listed_keys()) == sorted(Settings.model_fields)


def test_default_config_sets_only_the_service_paths() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert set(data) == SET_KEYS


def test_default_config_is_valid_as_shipped(service_env: None) -> None:
    load_settings(DEFAULT_CONFIG)  # all comments: the embedded defaults


def test_default_config_shows_the_service_defaults(service_env: None, tmp_path: Path) -> None:
    uncommented = "\n".join(f"{key}: {value}" for key, value in listed_keys().items())
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
