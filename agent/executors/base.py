"""What an executor is: it turns a request into a command line and an environment.

The slow part (building a virtualenv, pulling an image) happens in ``prepare``; the experiment
pipeline then starts, watches and kills the process itself, so every executor gets the same
process-group handling, output capture and time limits.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.request import Request
from agent.storage.base import StorageOptions


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
    # Where its source lets it fetch from (agent.trust); a frozen value, safe to share.
    storage: StorageOptions = field(default_factory=StorageOptions)

    @property
    def exp_dir(self) -> Path:
        return self.home / "experiments" / self.request.key

    @property
    def workspace(self) -> Path:
        return self.exp_dir / "workspace"

    def artifact_dir(self, label: str) -> Path:
        return self.exp_dir / label


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
