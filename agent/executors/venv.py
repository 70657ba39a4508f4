"""Runs an experiment with ``python <filename> <args>`` in a cached virtualenv of its packages."""

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.errors import EnvironmentFailed
from agent.executors.base import Executor, Launch, RunContext
from agent.executors.envcache import EnvCache
from agent.executors.pythonenv import (
    discover_interpreters,
    filter_requirements,
    select_interpreter,
    usable_by_others,
)

# What shlex.quote leaves bare, and what it wraps in single quotes: most words are one of these,
# and take the fast path (shlex's pure-Python lexer costs about a microsecond a character).
_BARE = re.compile(r"[\w@%+=:,./-]+", re.ASCII)
_QUOTED = re.compile(r"'([^']*)'")


def shell_words(args: Sequence[str]) -> list[str]:
    """The experiment's argument words.

    The client ``shlex.quote``s every argument (the Go runner pastes them into bash), so the
    quotes must be evaluated: ``"'hello world'"`` is the one word ``hello world``. Each element is
    split on its own, so the cost is linear in the (bounded, agent.request) size of ``args``.
    """
    words: list[str] = []
    for arg in args:
        if _BARE.fullmatch(arg):
            words.append(arg)
        elif quoted := _QUOTED.fullmatch(arg):
            words.append(quoted.group(1))
        else:
            try:
                words.extend(shlex.split(arg))
            except ValueError as exc:
                raise EnvironmentFailed(
                    f"experiment.args are not valid shell words: {exc} in {arg[:80]!r}"
                ) from None
    return words


def build_argv(python: Path, filename: str, args: Sequence[str]) -> list[str]:
    """``[python, filename, *words]``; ``filename`` "-m" makes the first word a module name."""
    return [str(python), filename, *shell_words(args)]


class VenvExecutor(Executor):
    name = "venv"

    def __init__(
        self, cache: EnvCache, interpreters: Sequence[Path] = (), allow_nearest: bool = False
    ) -> None:
        self._cache = cache
        self._interpreters = list(interpreters)
        self._allow_nearest = allow_nearest

    def prepare(self, ctx: RunContext, base_env: Mapping[str, str]) -> Launch:
        experiment = ctx.request.experiment
        if not experiment.filename:
            raise EnvironmentFailed(
                "no filename to run; container-only requests need executor singularity"
            )
        shell_words(experiment.args)  # reject bad quoting before spending time on a build
        requirements, notes = filter_requirements(experiment.pythonenv)
        extra, extra_notes = filter_requirements(ctx.request.config.pip)  # as untrusted
        notes += [f"config.pip: {note}" for note in extra_notes]
        ctx.output_file.parent.mkdir(parents=True, exist_ok=True)
        with ctx.output_file.open("ab") as log:
            for note in notes:
                log.write(f"studio-agent: {note}\n".encode())
            log.flush()
            found = discover_interpreters(self._interpreters)
            if ctx.child.home is not None:  # a slot identity runs it: only what others may run
                found = [i for i in found if usable_by_others(i.path)]
            interpreter = select_interpreter(experiment.pythonver, found, self._allow_nearest)
            lease = self._cache.acquire(interpreter, requirements, extra, log, ctx.child)
        venv = lease.path
        return Launch(
            argv=build_argv(lease.python, experiment.filename, experiment.args),
            env={
                "VIRTUAL_ENV": str(venv),
                "PATH": f"{venv}/bin:{base_env.get('PATH', os.defpath)}",
            },
            release=lease.release,
        )
