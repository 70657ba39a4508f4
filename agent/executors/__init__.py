"""Executors, chosen by the ``executor`` setting."""

from agent.executors.base import Executor
from agent.settings import Settings


def build_executor(settings: Settings) -> Executor:
    # Imported here so that a container-only host never loads the venv machinery (and vice versa).
    from agent.executors.envcache import EnvCache
    from agent.executors.venv import VenvExecutor

    cache = EnvCache(settings.cache_dir / "venvs", settings.cache_size, settings.installer)
    return VenvExecutor(cache, settings.python_interpreters, settings.python_nearest)
