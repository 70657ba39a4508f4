import json
from pathlib import Path

import pytest

from agent.errors import BadRequest
from agent.intake import parse_message
from agent.request import REDACTED, redact

# A real 0.0.49 message (credentials redacted), kept with the tests.
EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "example_message_redacted.json"


def minimal(**experiment: object) -> bytes:
    return json.dumps({"experiment": {"key": "k1", **experiment}, "config": {}}).encode()


def test_example_message_round_trips_unchanged() -> None:
    raw = json.loads(EXAMPLE.read_bytes())
    request = parse_message(EXAMPLE.read_bytes())
    assert request.to_wire() == raw
    assert request.key == raw["experiment"]["key"]
    assert request.experiment.artifacts["workspace"].mutable is False
    assert request.mutable_labels() == [
        "modeldir",
        "retval",
        "output",
        "tb",
        "_metrics",
        "_metadata",
    ]
    assert request.config.env["PATH"] == "%PATH%:./bin"
    assert request.checkpoint_interval() == 180


def test_sloppy_client_types_are_coerced() -> None:
    body = json.dumps(
        {
            "experiment": {
                "key": "k",
                "args": [10, "--lr", 0.1],
                "pythonver": 3.11,
                "resources_needed": {"gpus": "1", "gpuCount": "2", "cpus": 2.0, "gpuMem": "4GiB"},
            },
            "config": {"env": {"SEED": 7, "FLAG": True}, "pip": None},
        }
    ).encode()
    request = parse_message(body)
    assert request.experiment.args == ["10", "--lr", "0.1"]
    assert request.experiment.pythonver == "3.11"
    needs = request.experiment.resources_needed
    assert (needs.gpus, needs.gpuCount, needs.cpus) == (1, 2, 2)
    assert needs.size("gpuMem") == 4 * 2**30
    assert request.config.env == {"SEED": "7", "FLAG": "true"}
    assert request.config.pip == []


def test_unknown_keys_are_kept() -> None:
    body = json.dumps(
        {"experiment": {"key": "k", "project_version": "v2"}, "config": {"x": {"y": 1}}, "z": 1}
    )
    assert parse_message(body.encode()).to_wire() == json.loads(body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON list"),
        (b'{"config": {}}', "experiment: Field required"),
        (b'{"experiment": {"filename": "a.py"}}', "experiment.key: Field required"),
        (minimal(key="../etc"), "experiment.key"),
        (minimal(max_duration="3 days"), "experiment.max_duration"),
        (minimal(resources_needed={"ram": "lots"}), "experiment.resources_needed.ram"),
        (b'{"message": {"payload": "abc"}}', "encrypted"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason.replace(".", r"\.")):
        parse_message(body)


def test_time_limit_is_the_smallest_of_duration_lifetime_and_cap() -> None:
    now = 2_000_000_000.0
    body = json.dumps(
        {
            "experiment": {"key": "k", "time_added": now - 600, "max_duration": "20m"},
            "config": {"experimentLifetime": "30m"},
        }
    )
    request = parse_message(body.encode())
    assert request.time_limit(now) == pytest.approx(1200)
    assert request.time_limit(now + 900) == pytest.approx(300)
    assert not request.expired(now)
    assert request.expired(now + 1200)
    assert parse_message(minimal()).time_limit(now) == 96 * 3600


def test_redact_hides_credentials_but_keeps_shape() -> None:
    data = json.loads(EXAMPLE.read_bytes())
    data["experiment"]["artifacts"]["output"]["credentials"]["aws"]["access_key"] = "AKIAREALKEY"
    cleaned = redact(data)
    assert "AKIAREALKEY" not in json.dumps(cleaned)
    aws = cleaned["experiment"]["artifacts"]["output"]["credentials"]["aws"]
    assert aws["access_key"] == REDACTED
    assert aws["region"] == "us-west-2"
