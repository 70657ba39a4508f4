"""Requirement filtering, interpreter discovery and pythonver matching."""

import os
import sys
from pathlib import Path

import pytest

from agent.errors import EnvironmentFailed
from agent.executors.pythonenv import (
    Interpreter,
    discover_interpreters,
    filter_requirements,
    select_interpreter,
)
from agent.executors.venv import build_argv

PLACEHOLDER = "... (111 entries total: absl-py==2.1.0, astunparse==1.6.3, ...)"


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        ("six==1.16.0", True),
        ("numpy>=1.26,<2", True),
        ("requests[socks]==2.31.0", True),
        ("tensorflow_gpu==2.15.0", True),
        ("zope.interface==6.1", True),
        ("pandas", True),
        ('pywin32==306; sys_platform == "win32"', True),
        ("git+https://github.com/a/b", True),
        ("b @ git+https://github.com/a/b@c", True),
        ("studioml==0.0.49", False),
        ("StudioML==0.0.49", False),
        ("studioml @ https://example.com/studioml-0.0.49.tar.gz", False),
        ("pkg-resources==0.0.0", False),
        ("pkg_resources==0.0.0", False),
        ("mypkg @ file:///home/u/x", False),
        ("file:///home/u/x", False),
        ("-e git+https://github.com/a/b@c#egg=b", False),
        ("--editable=git+https://github.com/a/b@c#egg=b", False),
        ("-e /home/u/checkout", False),
        (PLACEHOLDER, False),
        ("…", False),
        ("not a requirement", False),
        ("--index-url https://example.com/simple", False),
        ("-r /etc/studio-agent/certs/rabbitmq/main", False),  # the installer would print it
        ("-c /etc/shadow", False),
        ("pkg @ /etc/passwd", False),
        ("pkg @ ./checkout", False),
    ],
)
def test_filter_requirements_keeps_only_installable_lines(line: str, kept: bool) -> None:
    lines, notes = filter_requirements([line])
    assert lines == ([line] if kept else [])
    assert len(notes) == (0 if kept else 1)
    if not kept:
        assert notes[0].startswith(f"dropped {line!r}: ")


def test_filter_requirements_drops_blank_and_comment_lines_silently() -> None:
    lines, notes = filter_requirements(["", "   ", "# via pip-compile", "six==1.16.0\n"])
    assert lines == ["six==1.16.0"]
    assert notes == []


def test_filter_requirements_on_a_0_0_49_freeze() -> None:
    freeze = [
        "studioml==0.0.49",
        "pkg-resources==0.0.0",
        "mypkg @ file:///home/u/x",
        "-e git+https://github.com/a/b@c#egg=b",
        "git+https://github.com/a/b",
        "six==1.16.0",
        PLACEHOLDER,
    ]
    lines, notes = filter_requirements(freeze)
    assert lines == ["git+https://github.com/a/b", "six==1.16.0"]
    assert notes[0] == "dropped 'studioml==0.0.49': the agent does not install the StudioML client"
    assert len(notes) == 5


def _interp(version: str) -> Interpreter:
    major, minor, patch = (int(p) for p in version.split("."))
    return Interpreter(Path(f"/opt/python{version}/bin/python"), (major, minor, patch))


HOST = [_interp(v) for v in ("3.9.18", "3.11.2", "3.11.7", "3.12.1", "3.13.0")]


@pytest.mark.parametrize(
    ("requested", "chosen"),
    [
        ("3.11", "3.11.7"),
        ("3.11.2", "3.11.2"),
        ("3.9", "3.9.18"),
        ("3", "3.13.0"),
        ("", "3.13.0"),
        (None, "3.13.0"),
        (" 3.12 ", "3.12.1"),
    ],
)
def test_select_interpreter_matches_by_prefix(requested: str | None, chosen: str) -> None:
    assert select_interpreter(requested, HOST, allow_nearest=False).version_text == chosen


@pytest.mark.parametrize(
    ("requested", "chosen"),
    [
        ("3.10", "3.11.7"),  # 3.9 and 3.11 are equally near: the newer wins
        ("3.8", "3.9.18"),
        ("3.7", "3.9.18"),
        ("3.20", "3.13.0"),
        ("3.11.9", "3.11.7"),
    ],
)
def test_select_interpreter_nearest(requested: str, chosen: str) -> None:
    assert select_interpreter(requested, HOST, allow_nearest=True).version_text == chosen


def test_select_interpreter_prefers_the_first_of_equal_versions() -> None:
    first = Interpreter(Path("/configured/python"), (3, 11, 7))
    chosen = select_interpreter("3.11", [first, *HOST], allow_nearest=False)
    assert chosen.path == first.path


def test_select_interpreter_names_what_was_asked_and_what_exists() -> None:
    with pytest.raises(EnvironmentFailed) as caught:
        select_interpreter("3.7", HOST, allow_nearest=False)
    assert str(caught.value) == (
        "pythonver 3.7 was requested; this host has 3.9.18, 3.11.2, 3.11.7, 3.12.1, 3.13.0 "
        "(set python_nearest: true to use the nearest)"
    )


def test_select_interpreter_nearest_needs_the_same_major() -> None:
    with pytest.raises(EnvironmentFailed, match=r"pythonver 2\.1 was requested; this host has"):
        select_interpreter("2.1", HOST, allow_nearest=True)


def test_select_interpreter_with_nothing_available() -> None:
    with pytest.raises(EnvironmentFailed, match=r"no usable Python 3\.8"):
        select_interpreter("3", [], allow_nearest=True)


@pytest.mark.parametrize("requested", ["3.x", "python3.11", "3.11.7.1", "latest", "3..1"])
def test_select_interpreter_rejects_malformed_pythonver(requested: str) -> None:
    with pytest.raises(EnvironmentFailed, match="is not a version"):
        select_interpreter(requested, HOST, allow_nearest=True)


def test_interpreter_version_text() -> None:
    assert _interp("3.11.7").version_text == "3.11.7"


def _running_version() -> tuple[int, int, int]:
    return sys.version_info.major, sys.version_info.minor, sys.version_info.micro


def test_discover_interpreters_finds_the_running_python() -> None:
    found = discover_interpreters()
    assert _running_version() in {i.version for i in found}
    assert len({i.path for i in found}) == len(found)
    assert all(i.version >= (3, 8, 0) for i in found)
    assert not any("shims" in i.path.parts for i in found)


def test_discover_interpreters_puts_configured_paths_first() -> None:
    found = discover_interpreters([Path(sys.executable)])
    assert found[0].path == Path(sys.executable).resolve()
    assert found[0].version == _running_version()


def test_discover_interpreters_skips_what_does_not_run(tmp_path: Path) -> None:
    broken = tmp_path / "python3.99"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    found = discover_interpreters([broken, tmp_path / "missing"])
    assert broken.resolve() not in {i.path for i in found}


def test_discover_interpreters_probes_each_path_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.executors.pythonenv as pythonenv

    discover_interpreters()
    calls: list[Path] = []
    monkeypatch.setattr(pythonenv, "_probe", lambda real: calls.append(real))
    discover_interpreters()
    assert calls == []


@pytest.mark.parametrize(
    ("filename", "args", "argv"),
    [
        ("train.py", [], ["/v/bin/python", "train.py"]),
        (
            "train.py",
            ["10", "--flag", "'hello world'"],
            ["/v/bin/python", "train.py", "10", "--flag", "hello world"],
        ),
        ("-m", ["pkg.mod", "x"], ["/v/bin/python", "-m", "pkg.mod", "x"]),
        ("a.py", ["'it'\"'\"'s'"], ["/v/bin/python", "a.py", "it's"]),
    ],
)
def test_build_argv_evaluates_the_client_quoting(
    filename: str, args: list[str], argv: list[str]
) -> None:
    assert build_argv(Path("/v/bin/python"), filename, args) == argv


def test_build_argv_rejects_unbalanced_quotes() -> None:
    with pytest.raises(EnvironmentFailed, match="not valid shell words"):
        build_argv(Path("/v/bin/python"), "a.py", ["'oops"])


def test_discovery_is_read_again_only_when_a_folder_it_read_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.executors.pythonenv as pythonenv

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    first = discover_interpreters()
    reads: list[int] = []
    real = pythonenv._discover
    monkeypatch.setattr(pythonenv, "_discover", lambda extra: reads.append(1) or real(extra))
    assert discover_interpreters() == first
    assert reads == []  # nothing changed: the last answer, without reading any folder
    (bin_dir / "python3.99").symlink_to(sys.executable)  # "installed": the folder changed
    os.utime(bin_dir, ns=(0, 10**18))  # a distinct mtime even on a coarse clock
    again = discover_interpreters()
    assert reads == [1]
    assert {i.path for i in again} == {i.path for i in first}  # the same real interpreter
