import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.errors import ConfigError
from agent.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QUEUE_MATCH", "QUEUE_ROOT", "MAX_MEM", "CACHE_SIZE", "STUDIO_AGENT_MAX_MEM"):
        monkeypatch.delenv(name, raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_file_then_drop_ins_in_order(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.yaml", "max_concurrent: 2\nqueue_root: /q\ndrain_timeout: 5m\n")
    write(tmp_path / "conf.d" / "20-b.yaml", "max_concurrent: 4\n")
    write(tmp_path / "conf.d" / "10-a.yaml", "max_concurrent: 3\ncache_size: 2GiB\n")
    settings = load_settings(main)
    assert settings.max_concurrent == 4
    assert settings.cache_size == 2 * 2**30
    assert settings.drain_timeout == 300
    assert settings.local.root == Path("/q")


def test_environment_beats_files_and_prefix_beats_go_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main = write(tmp_path / "agent.yaml", "max_mem: 1gb\nqueue_match: ^file_\n")
    monkeypatch.setenv("MAX_MEM", "2gb")
    monkeypatch.setenv("QUEUE_MATCH", "^go_")
    assert load_settings(main).max_mem == 2 * 10**9
    monkeypatch.setenv("STUDIO_AGENT_MAX_MEM", "3gb")
    settings = load_settings(main)
    assert settings.max_mem == 3 * 10**9
    assert settings.queue_match == "^go_"


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.yaml", "max_concurrent: 1\n\nqueue_mtch: x\n")
    with pytest.raises(ConfigError) as info:
        load_settings(main)
    assert f"{main}:3: queue_mtch: unknown key" in str(info.value)


def test_bad_value_in_drop_in_names_it(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.yaml", "max_concurrent: 1\n")
    drop_in = write(tmp_path / "conf.d" / "50-x.yaml", "# comment\ndrain_timeout: soon\n")
    with pytest.raises(ConfigError, match=rf"{drop_in}:2: drain_timeout: .*not a duration"):
        load_settings(main)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("queue_match: '(unclosed'\n", "queue_match"),
        ("max_concurrent: 0\n", "max_concurrent"),
        ("executor: docker\n", "executor"),
        ("- a list\n", "top level must be a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_are_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path / "agent.yaml", text))


def test_unknown_prefixed_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_AGENT_QUEUE_ROTO", "/x")
    with pytest.raises(ConfigError, match="STUDIO_AGENT_QUEUE_ROTO: unknown key"):
        load_settings()


def test_go_alias_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_MEM", "lots")
    with pytest.raises(ConfigError, match="environment variable MAX_MEM: max_mem"):
        load_settings()


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_prints_effective_config(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.yaml", "max_concurrent: 3\nqueue_root: /srv/q\n")
    result = run_cli("check-config", str(main))
    assert result.returncode == 0, result.stderr
    assert "max_concurrent: 3" in result.stdout
    shown = yaml.safe_load(result.stdout)  # the "# isolation" lines are comments
    assert shown["local"]["root"] == "/srv/q"  # the flat alias, shown in its section


def test_config_error_exits_78_with_the_reason(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.yaml", "bogus: 1\n")
    for args in (["check-config", str(main)], ["run", "--config", str(main)]):
        result = run_cli(*args)
        assert result.returncode == 78
        assert f"{main}:1: bogus: unknown key" in result.stderr


def test_backend_sections_and_their_flat_aliases(tmp_path: Path) -> None:
    main = write(
        tmp_path / "agent.yaml",
        "amqp_url: amqp://main/\nsqs:\n  wait_time: 5\n  visibility: 2m\nlocal:\n  rescan: 1s\n",
    )
    write(tmp_path / "conf.d" / "50-rmq.yaml", "rabbitmq:\n  refresh: 10s\namqp_refresh: 20s\n")
    with pytest.raises(ConfigError, match=r"50-rmq.yaml:3: amqp_refresh and rabbitmq.refresh"):
        load_settings(main)  # both spellings in one file: which was meant?
    write(tmp_path / "conf.d" / "50-rmq.yaml", "rabbitmq:\n  url: amqp://drop-in/\n")
    settings = load_settings(main)
    assert settings.rabbitmq.url == "amqp://drop-in/"  # a later file wins, whatever spelling
    assert (settings.sqs.wait_time, settings.sqs.visibility) == (5, 120.0)
    assert settings.local.rescan == 1.0
    assert settings.pubsub.ack_deadline == 60


def test_backend_settings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main = write(tmp_path / "agent.yaml", "rabbitmq:\n  url: amqp://file/\n")
    monkeypatch.setenv("AMQP_URL", "amqp://go-runner/")
    assert load_settings(main).rabbitmq.url == "amqp://go-runner/"
    monkeypatch.setenv("STUDIO_AGENT_AMQP_URL", "amqp://flat/")
    assert load_settings(main).rabbitmq.url == "amqp://flat/"
    monkeypatch.setenv("STUDIO_AGENT_RABBITMQ__URL", "amqp://section/")
    monkeypatch.setenv("STUDIO_AGENT_SQS__WAIT_TIME", "7")
    settings = load_settings(main)
    assert (settings.rabbitmq.url, settings.sqs.wait_time) == ("amqp://section/", 7)
    monkeypatch.setenv("STUDIO_AGENT_SQS__WAIT_TIME", "30")
    with pytest.raises(ConfigError, match=r"STUDIO_AGENT_SQS__WAIT_TIME: sqs\.wait_time"):
        load_settings(main)
    monkeypatch.delenv("STUDIO_AGENT_SQS__WAIT_TIME")
    monkeypatch.setenv("STUDIO_AGENT_SQS__WAIT_TYME", "7")
    with pytest.raises(ConfigError, match="STUDIO_AGENT_SQS__WAIT_TYME: unknown key"):
        load_settings(main)


def test_a_bad_section_value_names_its_file_and_line(tmp_path: Path) -> None:
    main = write(tmp_path / "agent.yaml", "max_concurrent: 1\nsqs:\n  wait_time: 30\n")
    with pytest.raises(ConfigError, match=rf"{main}:3: sqs.wait_time: "):
        load_settings(main)
    write(main, "amqp_url: http://not-amqp/\n")
    with pytest.raises(ConfigError, match=rf"{main}:1: rabbitmq.url: .*must start with amqp"):
        load_settings(main)
