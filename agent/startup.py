"""What the agent does once before it serves: its state folder (modes, the one-agent lock) and
the processes and run folders a killed predecessor left behind."""

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import IO

from agent import process
from agent.errors import ConfigError
from agent.sandbox import Sandbox
from agent.settings import Settings

log = logging.getLogger("agent.supervisor")


def prepare_state_dir(settings: Settings, sandbox: Sandbox) -> IO[bytes]:
    """Make the state and work folders with their modes; return the held ``agent.lock``."""
    state, work = settings.state_dir, settings.effective_work_dir
    state.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if sandbox.pool is not None:
        # Everything the agent makes is its own (the unit's UMask=0077, everywhere), and
        # slot users may only pass through to their run dir: list nothing, read nothing.
        os.umask(0o077)
        cache = settings.cache_dir
        cache.mkdir(parents=True, exist_ok=True)
        for folder in (state, work, cache):
            os.chmod(folder, 0o711)
        _close_to_others(settings.local.root)
    else:
        os.chmod(state, 0o700)  # it holds raw messages, and those carry credentials
    handle = (state / "agent.lock").open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"{state}: another studio-agent is using this state_dir") from None
    return handle


def _close_to_others(queue_root: Path) -> None:
    """Keep slot users out of the local queues this agent owns: their messages carry storage
    credentials. Queue folders of other owners (a submitter's ~/.studioml/queue) are theirs."""
    for folder in [queue_root, *(queue_root.iterdir() if queue_root.is_dir() else ())]:
        with contextlib.suppress(OSError):
            info = folder.stat()
            if folder.is_dir() and info.st_uid == os.getuid() and info.st_mode & 0o007:
                os.chmod(folder, info.st_mode & 0o770)
                log.info("%s: closed to other users (experiments run as slot users)", folder)


def end_orphans(settings: Settings) -> None:
    """Stop the experiments a killed predecessor left running, and remove their run folders."""
    work = settings.effective_work_dir
    if not work.is_dir():
        return
    for run_dir in work.iterdir():
        if process.kill_orphan(run_dir / "process.json", settings.kill_grace):
            log.warning("killed an experiment left running by a previous agent: %s", run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
