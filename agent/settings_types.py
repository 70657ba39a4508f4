"""The value types settings are made of: sizes, durations, regexes, the StudioML home."""

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from agent.units import parse_duration, parse_size


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


def _existing_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"no such file: {value}")
    return value


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
Regex = Annotated[str, AfterValidator(_regex)]
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]  # a CA bundle, say
ImageSource = Literal["docker", "library", "oras", "shub", "s3", "file"]
IMAGE_SOURCES: tuple[ImageSource, ...] = ("docker", "library", "oras", "shub", "s3", "file")


def home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def default_queue_root() -> Path:
    studio_home = os.environ.get("STUDIOML_HOME")
    return (Path(studio_home) if studio_home else home() / ".studioml") / "queue"
