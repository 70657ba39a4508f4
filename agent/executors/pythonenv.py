"""What goes into an experiment's virtualenv: which requirement lines, on which interpreter.

``experiment.pythonenv`` is the client's whole ``pip freeze``; some of its lines only make sense
on the submitting machine (local paths, editable checkouts, the StudioML client itself), and
installing them would fail the build, so they are dropped with a note the user can read in the
experiment's output. ``experiment.pythonver`` is the client's major.minor, matched by prefix
against the interpreters this host has, as the Go runner does with pyenv versions.
"""

import glob
import os
import re
import stat
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import EnvironmentFailed

MIN_VERSION = (3, 8)
PROBE_TIMEOUT = 10.0

# A requirement starts with a distribution name; what may follow is extras, a version
# specifier, a direct URL (``name @ url``) or environment markers.
_REQUIREMENT = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*"
    r"(?:\[[A-Za-z0-9._,\s-]*\])?\s*"
    r"(?:(?:===|==|!=|~=|<=|>=|<|>|@|;).*)?$"
)
_VCS_OR_URL = re.compile(r"^(?:(?:git|hg|svn|bzr)\+[a-z]+://|https?://)", re.IGNORECASE)
_DIRECT_PATH = re.compile(
    r"^[^@;]*@(?!\s*(?:(?:git|hg|svn|bzr)\+[a-z]+://|https?://))", re.IGNORECASE
)
_EDITABLE = re.compile(r"^(?:-e|--editable)(?:\s|=|$)")
_VERSION = re.compile(r"^\d+(?:\.\d+){0,2}$")
_PYTHON3_NAME = re.compile(r"^python3(?:\.\d+)?$")
_PROBE = "import sys; print('%d.%d.%d' % tuple(sys.version_info[:3]))"

_probe_cache: dict[Path, tuple[int, int, int] | None] = {}
_probe_lock = threading.Lock()
SYSTEM_FOLDERS = ("/usr/bin", "/usr/local/bin")
# (extra, PATH, pyenv roots) -> (the folders' stamp when read, what was found)
_discovered: dict[
    tuple[tuple[str, ...], str, tuple[str, ...]], tuple[object, list["Interpreter"]]
] = {}


# ---------------------------------------------------------------- requirement filtering


def _normalized_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _drop_reason(line: str) -> str | None:
    """Why a non-blank, non-comment line cannot be installed here, or None to keep it."""
    if "file://" in line:
        return "a local path on the submitting machine cannot be installed here"
    if _EDITABLE.match(line):
        return (
            "editable installs come from a working copy on the submitting machine; "
            "put a non-editable git+https:// line in config.pip if the package is needed"
        )
    if _VCS_OR_URL.match(line):
        return None
    if line.startswith("-"):
        # -r/-c would make the installer read a host file (and print it back in its errors).
        return "installer options are not accepted from a request"
    match = _REQUIREMENT.match(line)
    if match is None:
        return "not a requirement line"
    if _DIRECT_PATH.search(line):
        return "a local path on the submitting machine cannot be installed here"
    name = _normalized_name(match.group("name"))
    if name == "studioml":
        return "the agent does not install the StudioML client"
    if name == "pkg-resources":
        return "a Debian/Ubuntu pip freeze artifact, not a real package"
    return None


def filter_requirements(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``pythonenv`` into lines to install and notes about the dropped ones.

    Blank and comment lines are dropped silently: they carry nothing a user would miss.
    """
    kept: list[str] = []
    notes: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        reason = _drop_reason(line)
        if reason is None:
            kept.append(line)
        else:
            notes.append(f"dropped {line!r}: {reason}")
    return kept, notes


# ---------------------------------------------------------------- interpreter discovery


@dataclass(frozen=True)
class Interpreter:
    path: Path
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)


def _path_python3_names() -> list[Path]:
    found: list[Path] = []
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        found.extend(Path(directory, n) for n in names if re.fullmatch(r"python3\.\d+", n))
    return found


def _system_pythons() -> list[Path]:
    found: list[Path] = []
    for directory in SYSTEM_FOLDERS:
        names = sorted(glob.glob(os.path.join(directory, "python3*")))
        found.extend(Path(n) for n in names if _PYTHON3_NAME.match(os.path.basename(n)))
    return found


def _pyenv_roots() -> tuple[str, ...]:
    roots = [str(Path.home() / ".pyenv")]
    if os.environ.get("PYENV_ROOT"):
        roots.append(os.environ["PYENV_ROOT"])
    return tuple(roots)


def _pyenv_pythons() -> list[Path]:
    found: list[Path] = []
    for root in _pyenv_roots():
        found.extend(Path(p) for p in sorted(glob.glob(f"{root}/versions/*/bin/python")))
    return found


def _candidates(extra: Sequence[Path]) -> list[Path]:
    return [*map(Path, extra), *_path_python3_names(), *_system_pythons(), *_pyenv_pythons()]


def _is_shim(path: Path) -> bool:
    # pyenv shims are shell scripts whose target depends on PYENV_VERSION and the cwd, so the
    # version probed now need not be the one a later build would get.
    if path.parent.name == "shims":
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError:
        return True
    return head.startswith(b"#!") and b"pyenv" in head


def _probe(real: Path) -> tuple[int, int, int] | None:
    try:
        done = subprocess.run(
            [str(real), "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    parts = done.stdout.strip().split(".")
    if done.returncode != 0 or len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def _cached_version(real: Path) -> tuple[int, int, int] | None:
    # Held across the probe so two threads never start the same probe twice.
    with _probe_lock:
        if real not in _probe_cache:
            _probe_cache[real] = _probe(real)
        return _probe_cache[real]


def discover_interpreters(extra: Sequence[Path] = ()) -> list[Interpreter]:
    """Usable CPython 3.8+ interpreters, configured ones first, each real path once.

    The last answer is kept while no folder it was read from has changed (an interpreter
    installed or removed changes its folder's mtime): reading /usr/bin and every PATH folder
    again was a quarter of the agent's own CPU per experiment (bench/profile_experiment.py).
    """
    key = (tuple(map(str, extra)), os.environ.get("PATH", os.defpath), _pyenv_roots())
    stamp = _folders_stamp(key)
    with _probe_lock:
        cached = _discovered.get(key)
    if cached is not None and cached[0] == stamp:
        return list(cached[1])
    found = _discover(extra)
    with _probe_lock:
        _discovered[key] = (stamp, found)
    return list(found)


def _folders_stamp(key: tuple[tuple[str, ...], str, tuple[str, ...]]) -> tuple[object, ...]:
    """What discovery read, as (path, mtime) pairs: each configured interpreter and folder."""
    extra, path, pyenv_roots = key
    folders = [*path.split(os.pathsep), *SYSTEM_FOLDERS, *(f"{r}/versions" for r in pyenv_roots)]
    stamp: list[object] = []
    for name in [*extra, *folders]:
        try:
            stamp.append((name, os.stat(name).st_mtime_ns))
        except OSError:
            stamp.append((name, None))
    return tuple(stamp)


def _discover(extra: Sequence[Path]) -> list[Interpreter]:
    seen: set[Path] = set()
    found: list[Interpreter] = []
    for candidate in _candidates(extra):
        if not (candidate.is_file() and os.access(candidate, os.X_OK)) or _is_shim(candidate):
            continue
        real = candidate.resolve()
        if real in seen:
            continue
        seen.add(real)
        version = _cached_version(real)
        if version is not None and version[:2] >= MIN_VERSION:
            found.append(Interpreter(real, version))
    return found


def usable_by_others(path: Path) -> bool:
    """Whether a user other than its owner can run ``path``: a run under a slot identity
    cannot use an interpreter in the agent's home (pyenv under /root, say)."""
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


# ---------------------------------------------------------------- interpreter selection


def _parse_requested(requested: str | None) -> tuple[int, ...]:
    text = (requested or "").strip() or "3"
    if not _VERSION.match(text):
        raise EnvironmentFailed(f"pythonver {text!r} is not a version such as 3, 3.11 or 3.11.7")
    return tuple(int(part) for part in text.split("."))


def _best(matches: Sequence[Interpreter]) -> Interpreter:
    # max() keeps the first of equal versions, so configured interpreters win ties.
    return max(matches, key=lambda interp: interp.version)


def _nearest(wanted: tuple[int, ...], available: Sequence[Interpreter]) -> Interpreter | None:
    same_major = [i for i in available if i.version[0] == wanted[0]]
    if not same_major:
        return None
    minor = wanted[1] if len(wanted) > 1 else max(i.version[1] for i in same_major)
    # Nearest minor first; among equally near ones the newer.
    closest = min(same_major, key=lambda i: (abs(i.version[1] - minor), -i.version[1]))
    return _best([i for i in same_major if i.version[1] == closest.version[1]])


def _no_match_message(text: str, available: Sequence[Interpreter], allow_nearest: bool) -> str:
    versions = sorted({i.version for i in available})
    if not versions:
        has = "this host has no usable Python 3.8+ interpreter"
    else:
        has = "this host has " + ", ".join(".".join(map(str, v)) for v in versions)
    hint = "" if allow_nearest or not versions else " (set python_nearest: true to use the nearest)"
    return f"pythonver {text} was requested; {has}{hint}"


def select_interpreter(
    requested: str | None, available: Sequence[Interpreter], allow_nearest: bool
) -> Interpreter:
    """The interpreter for ``pythonver``: a prefix match, newest first; optionally the nearest."""
    wanted = _parse_requested(requested)
    matches = [i for i in available if i.version[: len(wanted)] == wanted]
    if matches:
        return _best(matches)
    if allow_nearest:
        nearest = _nearest(wanted, available)
        if nearest is not None:
            return nearest
    text = ".".join(map(str, wanted))
    raise EnvironmentFailed(_no_match_message(text, available, allow_nearest))
