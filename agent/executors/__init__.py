"""Executors, chosen by the ``executor`` setting and, per request, by its ``_singularity``."""

import threading
from collections.abc import Callable, Mapping

from agent.errors import ConfigError
from agent.executors.base import Executor, Launch, RunContext
from agent.settings import Settings

CONTAINER_ARTIFACT = "_singularity"


class DispatchingExecutor(Executor):
    """The configured executor, except that a request naming a container runs in one.

    ``studio run --container X`` adds a ``_singularity`` artifact: such a request goes to the
    container executor even on a venv host. Each executor is made on first use, so a venv host
    that never sees such a request never looks for a container runtime.
    """

    def __init__(
        self,
        configured: str,
        makers: Mapping[str, Callable[[], Executor]],
    ) -> None:
        self.name = configured
        self._makers = dict(makers)
        self._made: dict[str, Executor] = {}
        self._lock = threading.Lock()

    def executor_for(self, ctx: RunContext) -> Executor:
        wanted = "singularity" if CONTAINER_ARTIFACT in ctx.request.experiment.artifacts else None
        name = wanted or self.name
        with self._lock:
            if name not in self._made:
                self._made[name] = self._makers[name]()
            return self._made[name]

    def prepare(self, ctx: RunContext, base_env: Mapping[str, str]) -> Launch:
        return self.executor_for(ctx).prepare(ctx, base_env)


def build_executor(settings: Settings) -> Executor:
    # Imported when made, so that a container-only host never loads the venv machinery (and
    # the reverse).
    def venv() -> Executor:
        from agent.executors.envcache import EnvCache
        from agent.executors.venv import VenvExecutor

        root = settings.cache_dir / "venvs"
        cache = EnvCache(root, settings.cache_size, settings.installer, pass_env=settings.pass_env)
        return VenvExecutor(cache, settings.python_interpreters, settings.python_nearest)

    def singularity() -> Executor:
        from agent.executors.singularity import SingularityExecutor

        return SingularityExecutor(settings)

    dispatcher = DispatchingExecutor(settings.executor, {"venv": venv, "singularity": singularity})
    if settings.executor == "singularity":
        if not settings.container_image.strip():
            raise ConfigError("executor singularity needs container_image (the default image)")
        from agent.executors.singularity import SingularityExecutor, detect_runtime

        # At start-up, so that a host without a runtime refuses to start rather than fail
        # every experiment.
        dispatcher._made["singularity"] = SingularityExecutor(settings, detect_runtime())
    return dispatcher
