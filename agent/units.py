"""Sizes and durations as StudioML writes them.

Sizes follow go-humanize ParseBytes, which the Go runner uses: case-insensitive, SI for
"k/kb/m/mb/g/gb/t/tb/p/pb" (x1000) and IEC for "ki/kib/mi/mib/..." (x1024); a bare number is bytes.
Durations follow Go's time.ParseDuration ("20m", "48h", "1h30m", "300s", "1.5h"); a bare number is
seconds (Go rejects it, but YAML configs often carry one).
"""

import math
import re

# Past these a value is a typo or an attack, never a real request: 1 EiB, 100 years.
MAX_SIZE = 2**60
MAX_DURATION = 100 * 365 * 24 * 3600.0
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SI = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15, "e": 10**18}
_IEC = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50, "e": 2**60}

_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str | int | float) -> int:
    """Return the number of bytes in a size such as "3gb", "4GiB", "512MiB" or 1024."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return _bounded_size(float(text), text)
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 3gb, 4GiB, 512mb)")
    number, unit = float(match.group(1)), match.group(2).lower()
    multiplier = _size_multiplier(unit)
    if multiplier is None:
        raise ValueError(f"unknown size unit {match.group(2)!r} in {text!r}")
    return _bounded_size(number * multiplier, text)


def _bounded_size(value: float, text: object) -> int:
    # float("9" * 400) is inf, and int(inf) raises OverflowError, which no caller expects.
    if not math.isfinite(value) or not 0 <= value <= MAX_SIZE:
        raise ValueError(f"size out of range: {str(text)[:40]!r} (0 to 1 EiB)")
    return int(value)


def _size_multiplier(unit: str) -> int | None:
    if unit.endswith("ib") and len(unit) == 3:
        return _IEC.get(unit[0])
    if unit.endswith("i") and len(unit) == 2:
        return _IEC.get(unit[0])
    if unit.endswith("b") and len(unit) == 2:
        return _SI.get(unit[0])
    return _SI.get(unit)


def parse_duration(text: str | int | float) -> float:
    """Return the seconds in a Go-style duration such as "20m", "1h30m" or "300s"."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return _bounded_duration(float(text), text)
    value = str(text).strip()
    if re.fullmatch(r"[0-9]*\.?[0-9]+", value):
        return _bounded_duration(float(value), text)
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNIT[match.group(2)]
        position = match.end()
    if position != len(value) or not value:
        raise ValueError(f"not a duration: {text!r} (examples: 20m, 48h, 1h30m, 300s)")
    return _bounded_duration(total, text)


def _bounded_duration(seconds: float, text: object) -> float:
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION:
        raise ValueError(f"duration out of range: {str(text)[:40]!r} (0 to 100 years)")
    return seconds


def format_size(size: int) -> str:
    """Render bytes with an IEC unit, for logs and check-config output."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
