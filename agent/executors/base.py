"""What an executor is: it turns a request into a command line and an environment.

The slow part (building a virtualenv, pulling an image) happens in ``prepare``; the experiment
pipeline then starts, watches and kills the process itself, so every executor gets the same
process-group handling, output capture and time limits.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.request import Request

# Downloads the request's artifact ``label`` into a folder; returns the bytes fetched. Made by
# the run, which holds the request's storage policy, so executors never touch storage.
Fetch = Callable[[str, Path], int]


class Confine(Protocol):
    """Where a child the executor starts for the request runs (agent.sandbox.Confinement)."""

    scratch: Path

    @property
    def home(self) -> Path | None: ...
    def command(self, argv: Sequence[str]) -> list[str]: ...
    def give(self, path: Path) -> None: ...
    def reclaim(self, path: Path) -> None: ...
    def settle(self) -> None: ...


class Unconfined:
    """Children run as the agent, in no cgroup of their own: ``isolation: off``."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    @property
    def home(self) -> Path | None:
        return None

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def give(self, path: Path) -> None:
        pass

    def reclaim(self, path: Path) -> None:
        pass

    def settle(self) -> None:
        pass  # nothing but the step's own session to end (agent.executors.installer does)


def _no_fetch(label: str, folder: Path) -> int:
    raise RuntimeError(f"this run cannot fetch {label}")


@dataclass(frozen=True)
class RunContext:
    """Where one run of an experiment lives on disk.

    ``home`` is the child's STUDIOML_HOME, so that StudioML's own ``fs_tracker`` resolves
    ``home/experiments/<key>/<label>`` to the artifact directories the agent prepared.
    """

    request: Request
    home: Path
    output_file: Path  # <exp>/output/output: install logs and the run's output go here
    gpus: tuple[str, ...] = ()  # UUIDs of the cards assigned to this run (empty: none)
    fetch: Fetch = _no_fetch  # the request's own artifacts, by its source's policy
    confine: Confine | None = None  # None: the children run unconfined, in home/tmp

    @property
    def exp_dir(self) -> Path:
        return self.home / "experiments" / self.request.key

    @property
    def workspace(self) -> Path:
        return self.exp_dir / "workspace"

    def artifact_dir(self, label: str) -> Path:
        return self.exp_dir / label

    @property
    def scratch(self) -> Path:
        """The run's private TMPDIR (and HOME under a slot identity)."""
        return self.home / "tmp"

    @property
    def child(self) -> Confine:
        return self.confine if self.confine is not None else Unconfined(self.scratch)


Wrap = Callable[[list[str], dict[str, str]], tuple[list[str], dict[str, str]]]


@dataclass
class Launch:
    """A prepared command: argv, the environment overrides it needs, and what to release after.

    ``wrap``, when set, turns the final argv and child environment into what is really spawned:
    a container executor moves the environment inside the container and prefixes its runtime.
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None
    wrap: Wrap | None = None

    def command(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """The argv and environment to spawn, given the child's complete environment."""
        if self.wrap is None:
            return list(self.argv), env
        return self.wrap(list(self.argv), env)


class Executor(ABC):
    """Prepares the environment an experiment runs in."""

    name: str

    @abstractmethod
    def prepare(self, ctx: RunContext, base_env: Mapping[str, str]) -> Launch:
        """Build (or reuse) the environment; raise EnvironmentFailed with the reason if it cannot.

        ``base_env`` is the clean environment the child will get; the returned ``Launch.env``
        holds only what the executor adds or overrides (such as PATH with the venv first).
        """
