"""What a child process may see of the agent's environment: the one place that decides it.

Every child the agent starts for a request (the experiment itself, uv/pip and the build
backends of the packages it names, the container package installer) starts from
``base_env``: a short allow-list, never the agent's own environment, which under systemd holds
``AMQP_URL``, ``SLACK_HOOK`` and AWS keys from its ``EnvironmentFile``.
"""

import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

# Variables a child may inherit from the agent; everything else stays out.
BASE_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM")
BASE_ENV_PREFIXES = ("LC_",)
# Who the child is: the agent's own values when the child runs as the agent, else the slot's.
IDENTITY_ENV = ("HOME", "USER", "LOGNAME", "SHELL")
PROXY_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# Where an installer finds its index: the operator's mirror, never credentials of the agent's.
INSTALLER_ENV = (
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_EXTRA_INDEX_URL",
    "UV_INDEX",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_FIND_LINKS",
    "UV_FIND_LINKS",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
)
# What ld.so and glibc take from the environment and ignore in a setuid program (glibc's
# unsecvars.h): a program that holds the agent's capabilities must never see them from a request,
# or LD_PRELOAD runs the request's code with those capabilities (see ``split_for_privileged``).
LOADER_ENV = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
    }
)
LOADER_ENV_PREFIXES = ("LD_", "GLIBC_", "MALLOC_")
_PERCENT_VAR = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")


def base_env(
    passed: Iterable[str],
    scratch: Path,
    home: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """The environment every child starts from.

    ``passed`` is the operator's ``pass_env``; ``scratch`` the child's private temporary
    directory; ``home`` its HOME when it runs under a slot identity (None: the agent's own).
    """
    extra = set(passed)
    identity = () if home is not None else IDENTITY_ENV
    env = {
        k: v
        for k, v in environ.items()
        if k in BASE_ENV
        or k in identity
        or k in PROXY_ENV
        or k in extra
        or k.startswith(BASE_ENV_PREFIXES)
    }
    agent_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p != agent_bin]
    env["PATH"] = os.pathsep.join(path)
    env["TMPDIR"] = str(scratch)
    if home is not None:
        env["HOME"] = str(home)
    return env


def installer_env(
    passed: Iterable[str],
    scratch: Path,
    home: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """``base_env`` plus where the operator's package index is: what uv, pip and every
    ``setup.py`` they run may see."""
    env = base_env(passed, scratch, home, environ)
    env.update({k: environ[k] for k in INSTALLER_ENV if k in environ})
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def gpu_env(uuids: tuple[str, ...]) -> dict[str, str]:
    """What makes the child see exactly its assigned cards (none when ``uuids`` is empty)."""
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(uuids),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # CUDA's numbering then matches NVML's
        "NVIDIA_VISIBLE_DEVICES": ",".join(uuids) or "void",
    }


def expand_percent(value: str, env: Mapping[str, str]) -> str:
    """Expand ``%VAR%`` the way the Go runner does; an unknown variable becomes empty."""
    return _PERCENT_VAR.sub(lambda m: env.get(m.group(1), ""), value)


def split_for_privileged(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``env`` as (what a privileged launcher may be started with, what only the child may get).

    The launcher (the cgroup join, setpriv) runs as the agent before the child drops to its slot;
    the loader's variables are set for the child only after that (agent.sandbox.Confinement).
    """
    outer: dict[str, str] = {}
    inner: dict[str, str] = {}
    for name, value in env.items():
        loader = name in LOADER_ENV or name.startswith(LOADER_ENV_PREFIXES)
        (inner if loader else outer)[name] = value
    return outer, inner
