"""STUDIO_AGENT_* variables: the rules pydantic-settings applied, kept without it."""

import sys
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.settings import Settings, load_settings
from agent.settings_env import from_environment


def test_names_are_case_insensitive_and_plain_keys_stay_text() -> None:
    found = from_environment(Settings.model_fields, {"studio_agent_max_mem": "2gb"})
    assert found == {"max_mem": "2gb"}


def test_lists_take_json_and_optional_lists_too() -> None:
    env = {
        "STUDIO_AGENT_S3_ENDPOINTS": '["s3.example:9000"]',
        "STUDIO_AGENT_LOCAL_STORAGE": '["/srv/store"]',
    }
    found = from_environment(Settings.model_fields, env)
    assert found == {"s3_endpoints": ["s3.example:9000"], "local_storage": ["/srv/store"]}


def test_a_section_takes_json_and_its_keys_override_it() -> None:
    env = {
        "STUDIO_AGENT_SQS": '{"wait_time": 5, "visibility": 60}',
        "STUDIO_AGENT_SQS__WAIT_TIME": "7",
    }
    found = from_environment(Settings.model_fields, env)
    assert found == {"sqs": {"wait_time": "7", "visibility": 60}}


def test_bad_json_names_the_variable_and_not_its_value() -> None:
    env = {"STUDIO_AGENT_S3_ENDPOINTS": "secret-ish, not json"}
    with pytest.raises(ConfigError, match="STUDIO_AGENT_S3_ENDPOINTS: not valid JSON") as info:
        from_environment(Settings.model_fields, env)
    assert "secret-ish" not in str(info.value)


def test_the_whole_load_merges_sections_across_files_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("sqs:\n  wait_time: 3\n  visibility: 90\ns3_endpoints: [a.example]\n")
    monkeypatch.setenv("STUDIO_AGENT_SQS__WAIT_TIME", "9")
    monkeypatch.setenv("STUDIO_AGENT_S3_ENDPOINTS", '["B.example:9000"]')
    settings = load_settings(config)
    assert (settings.sqs.wait_time, settings.sqs.visibility) == (9, 90)
    assert settings.s3_endpoints == ["b.example:9000"]
    assert load_settings(config, sqs={"visibility": 30}).sqs.visibility == 30


def test_loading_settings_imports_no_settings_library() -> None:
    import subprocess

    code = "import sys, agent.settings; print('pydantic_settings' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
