"""The parse entry point: bounded, and nothing but BadRequest comes out of it.

The Hypothesis tests feed it arbitrary JSON and mutated real messages; each case must either parse
or be refused with a reason, within a bound of time and memory far above what a real message
takes (so the bound catches a pathological blow-up, not a slow machine).
"""

import copy
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import BadRequest
from agent.intake import MAX_CONTAINERS, MAX_DEPTH, nesting_depth, parse_message, structure_of
from agent.request import MAX_ARGS_TOTAL
from agent.storage.base import StorageOptions
from agent.trust import check_request

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tests" / "fixtures" / "example_message_redacted.json"
REAL = json.loads(EXAMPLE.read_bytes())


def body(experiment: dict[str, Any] | None = None, **top: Any) -> bytes:
    message: dict[str, Any] = {"experiment": {"key": "k1", **(experiment or {})}, "config": {}}
    message.update(top)
    return json.dumps(message).encode()


def refused(raw: bytes, max_bytes: int = 4 * 2**20) -> str:
    with pytest.raises(BadRequest) as caught:
        parse_message(raw, max_bytes)
    return str(caught.value)


def test_the_real_message_parses() -> None:
    assert parse_message(EXAMPLE.read_bytes()).key == REAL["experiment"]["key"]


def test_a_deeply_nested_body_is_refused_before_json_sees_it() -> None:
    deep = b'{"experiment": {"key": "k", "info": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    assert f"at most {MAX_DEPTH}" in refused(deep)


def test_a_body_of_too_many_containers_is_refused_before_json_sees_it() -> None:
    flat = b'{"experiment": {"key": "k", "info": [' + b"[]," * 200_000 + b"[]]}}"
    assert f"at most {MAX_CONTAINERS}" in refused(flat)


def test_nesting_inside_strings_does_not_count() -> None:
    text = json.dumps({"a": "[[[[{{{{" * 1000, "b": ['x"]\\'], "c": {"d": [1]}}).encode()
    assert nesting_depth(structure_of(text)) == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 50_000,  # not JSON, and deep
        b'{"experiment": {"key": "k", "time_added": NaN}}',
        b'{"experiment": {"key": "k", "time_added": Infinity}}',
        b'{"experiment": {"key": "k", "cpus": ' + b"9" * 5000 + b"}}",  # int digits limit
        b"\xff\xfe",
        b"",
        b"null",
    ],
)
def test_hostile_bodies_are_refused_with_a_reason(raw: bytes) -> None:
    assert refused(raw)


def test_only_utf8_is_read_so_no_quote_byte_can_hide_in_another_character() -> None:
    # In UTF-16-LE, U+2200 is the bytes 00 22: a stray '"' for a byte-level scan.
    deep = '{"experiment": {"key": "k", "x": "\u2200", "info": ' + "[" * 900 + "]" * 900 + "}}"
    for encoding in ("utf-16", "utf-16-le", "utf-32"):  # json.loads(bytes) would take them all
        assert refused(deep.encode(encoding))
        assert refused(json.dumps({"experiment": {"key": "k"}}).encode(encoding))
    assert "nests" in refused(deep.encode())


def test_a_body_over_the_size_bound_is_refused_unparsed() -> None:
    assert "at most 1000 (max_message_size)" in refused(body({"x": "a" * 2000}), 1000)


@pytest.mark.parametrize(
    ("experiment", "where"),
    [
        ({"args": ["a"] * 10_001}, "experiment.args"),
        ({"args": ["a" * (128 * 1024 + 1)]}, "experiment.args.0"),
        ({"args": ["a" * 100_000] * 11}, f"at most {MAX_ARGS_TOTAL}"),
        ({"args": ["a\0b"]}, "NUL"),
        ({"pythonenv": ["numpy\n-r /etc/shadow"]}, "one line"),
        ({"filename": "../../bin/sh"}, "experiment.filename"),
        ({"filename": "/usr/bin/python3"}, "experiment.filename"),
        ({"filename": "-c"}, "experiment.filename"),
        ({"resources_needed": {"gpus": -1}}, "resources_needed.gpus"),
        ({"resources_needed": {"gpuCount": "-2"}}, "resources_needed.gpuCount"),
        ({"resources_needed": {"cpus": 1e300}}, "resources_needed.cpus"),
        ({"resources_needed": {"ram": "9" * 50 + "gb"}}, "size out of range"),
        ({"max_duration": "9" * 30 + "h"}, "duration out of range"),
        ({"artifacts": {"../x": {}}}, "label"),
        ({"artifacts": {f"a{i}": {} for i in range(300)}}, "experiment.artifacts"),
        ({"key": "a\nb"}, "control characters"),
    ],
)
def test_each_bounded_field_names_itself(experiment: dict[str, Any], where: str) -> None:
    assert where in refused(body(experiment))


def test_config_env_is_bounded_and_named() -> None:
    assert "not an environment variable name" in refused(body(config={"env": {"A=B": "x"}}))
    too_many = {f"V{i}": "x" for i in range(1025)}
    assert "config.env" in refused(body(config={"env": too_many}))


RECURSION = """
import json, sys
from agent.intake import parse_message
body = json.dumps({"experiment": {"key": "k", "info": json.loads("[" * 30 + "]" * 30)}})
sys.setrecursionlimit(30)  # a stack this shallow: the real decoder runs out within the bounds
try:
    parse_message(body.encode())
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_recursion_error_below_the_entry_point_is_a_bad_request() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RECURSION], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.startswith("BadRequest body could not be parsed: RecursionError"), done


# -- property-based -----------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=60,
)
FIELDS = [
    "key",
    "args",
    "filename",
    "pythonenv",
    "pythonver",
    "resources_needed",
    "artifacts",
    "time_added",
    "max_duration",
]


def parse_within_bounds(raw: bytes) -> None:
    """Parse and check as the gate does; only BadRequest may come out, quickly and small."""
    tracemalloc.start()
    began = time.monotonic()
    try:
        request = parse_message(raw)
        check_request(request, StorageOptions())
    except BadRequest:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - began < 2.0
    assert peak < 64 * 2**20


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_arbitrary_json_never_escapes_the_entry_point(value: Any) -> None:
    parse_within_bounds(json.dumps(value).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), JSON, st.sampled_from(sorted(REAL["experiment"]["artifacts"])))
def test_a_real_message_with_any_field_replaced_never_escapes(
    field: str, value: Any, label: str
) -> None:
    message = copy.deepcopy(REAL)
    message["experiment"][field] = value
    parse_within_bounds(json.dumps(message).encode())
    message = copy.deepcopy(REAL)
    message["experiment"]["artifacts"][label] = value  # an artifact of any shape
    parse_within_bounds(json.dumps(message).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["storage", "database", "env", "pip", "credentials"]),
    JSON,
    st.sampled_from(["qualified", "key", "bucket", "credentials", "local", "mutable"]),
    st.one_of(JSON, st.text(alphabet="s3:/[]@.%1-9a-f\x00", max_size=40)),
)
def test_a_real_message_with_config_or_artifact_fields_replaced_never_escapes(
    config_field: str, config_value: Any, artifact_field: str, artifact_value: Any
) -> None:
    message = copy.deepcopy(REAL)
    message["config"][config_field] = config_value
    parse_within_bounds(json.dumps(message).encode())
    message = copy.deepcopy(REAL)
    message["config"]["storage"][config_field] = config_value
    message["experiment"]["artifacts"]["output"][artifact_field] = artifact_value
    parse_within_bounds(json.dumps(message).encode())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.integers(min_value=0))
def test_a_real_message_with_bytes_spliced_in_never_escapes(junk: bytes, where: int) -> None:
    raw = EXAMPLE.read_bytes()
    at = where % len(raw)
    parse_within_bounds(raw[:at] + junk + raw[at + len(junk) // 2 :])
