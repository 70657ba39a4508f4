"""SIGHUP's config reload: live keys applied on the running settings, the rest named, and
max_concurrent never above the slot users."""

import logging
from pathlib import Path

import pytest
import yaml

from agent.reload import ConfigReload
from agent.settings import load_settings


def config_file(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **values}))
    return path


def test_live_keys_apply_and_the_others_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config_file(tmp_path)
    running = load_settings(path)
    config_file(tmp_path, max_concurrent=3, clear_text="refuse", queue_match="^x_.*$")
    with caplog.at_level(logging.INFO):
        ConfigReload(path, running.log_level)(running)
    assert (running.max_concurrent, running.clear_text) == (3, "refuse")
    assert running.queue_match != "^x_.*$"  # used by backends built at start: not live
    assert "applied only at the next start: queue_match" in caplog.text


def test_max_concurrent_stays_within_the_slot_users(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config_file(tmp_path, max_concurrent=2)
    running = load_settings(path)
    config_file(tmp_path, max_concurrent=8)
    ConfigReload(path, running.log_level, slots=4)(running)
    assert running.max_concurrent == 2
    assert "max_concurrent 8 is more than the 4 slot users; it stays 2" in caplog.text


def test_a_config_that_no_longer_validates_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config_file(tmp_path, max_concurrent=2)
    running = load_settings(path)
    path.write_text("max_concurrent: -1\n")
    ConfigReload(path, running.log_level)(running)
    assert running.max_concurrent == 2
    assert "no longer validates" in caplog.text
