import pytest

from agent.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3gb", 3 * 10**9),
        ("3g", 3 * 10**9),
        ("3GB", 3 * 10**9),
        ("2 gb", 2 * 10**9),
        ("4GiB", 4 * 2**30),
        ("4gi", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("10kb", 10_000),
        ("1.5kib", 1536),
        ("100", 100),
        ("100b", 100),
        (2048, 2048),
    ],
)
def test_sizes_follow_go_humanize(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "gb", "3zb", "3 gigabytes", "-1gb", "1.2.3gb"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20m", 1200),
        ("48h", 172800),
        ("1h30m", 5400),
        ("300s", 300),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("90", 90),
        (30, 30),
    ],
)
def test_durations_follow_go(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "3d", "h", "1h x", "m30", "1h-5m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_format_size_uses_iec_units() -> None:
    assert format_size(512) == "512B"
    assert format_size(3 * 2**30) == "3.0GiB"
