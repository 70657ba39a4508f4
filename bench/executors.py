"""Start-up overhead of a trivial experiment: the venv executor against the container executor.

Each run is one ``ExperimentRun`` in this process (no queue, local storage), for an experiment
whose first statement prints ``time.time()``. "Start-up" is the time from ``run()`` being
called to that first line; "whole run" also covers the upload of the results. Cases:

- ``venv`` / ``container``, each ``warm`` (the env for these packages is in the cache) and
  ``cold`` (the env cache emptied before the run; uv's download cache is kept, so a cold run
  measures building the env, not PyPI). A cold container run also forgets the image's probed
  Python (a fresh executor, the probe record deleted).
- ``no packages``: an experiment with no requirements. The venv executor still makes a venv;
  the container executor then skips the package env and runs the image's python3 directly.
- ``sandboxed``: the same warm runs confined as production runs them (agent.sandbox): a slot
  user, a cgroup per run with limits and a device fence, the run dir handed over and taken
  back. Needs root (setuid, cgroups); the "added" column is the difference to the same case
  unconfined, measured in this process.

The image is the test suite's (tests/services/apptainer.py, built once into .cache/test-images).
Usage: ``.venv/bin/python bench/executors.py [--runs 5] [--package six==1.16.0]``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import __version__  # noqa: E402
from agent.executors import build_executor  # noqa: E402
from agent.executors.base import Executor  # noqa: E402
from agent.experiment import ExperimentRun  # noqa: E402
from agent.sandbox import Sandbox  # noqa: E402
from agent.settings import Settings, load_settings  # noqa: E402
from agent.submit import Submission, submit  # noqa: E402
from tests.services.apptainer import build_image  # noqa: E402

TRAIN = 'import time\nprint("start", repr(time.time()), flush=True)\n'


@dataclass
class Case:
    name: str
    executor: str  # "venv" or "singularity"
    cold: bool
    packages: bool
    sandboxed: bool = False
    baseline: str = ""  # the unconfined case a sandboxed one is compared with


CASES = [
    Case("venv, warm", "venv", False, True),
    Case("venv, cold", "venv", True, True),
    Case("container, warm", "singularity", False, True),
    Case("container, cold", "singularity", True, True),
    Case("venv, no packages, warm", "venv", False, False),
    Case("container, no packages", "singularity", False, False),
    Case("venv, warm, sandboxed", "venv", False, True, True, "venv, warm"),
    Case("venv, no packages, sandboxed", "venv", False, False, True, "venv, no packages, warm"),
    Case(
        "container, no packages, sandboxed",
        "singularity",
        False,
        False,
        True,
        "container, no packages",
    ),
]
BASELINES = {case.name: case.baseline for case in CASES if case.baseline}
# Slot users with passwd entries (Apptainer looks its user up), the test suite's: made here
# when missing, as system accounts with no home and no login.
SLOTS = ["studio-tslot0", "studio-tslot1"]


def ensure_slots() -> None:
    for name in SLOTS:
        if subprocess.run(["getent", "passwd", name], capture_output=True).returncode != 0:
            account = ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
            subprocess.run(["useradd", "--system", "--user-group", *account], check=True)


def settings_for(work: Path, case: Case, image: Path) -> Settings:
    config = {
        "queue_root": str(work / "queue"),
        "state_dir": str(work / "state"),
        "cache_dir": str(work / "cache"),
        "certs_dir": str(work / "certs"),
        "local_storage": [str(work / "store")],  # where one_run's submissions keep artifacts
        "executor": case.executor,
        "container_image": str(image),
        "update_local_db": False,
        "metrics_address": "",
        # The same interpreter for every case: a slot user cannot run one under /root.
        "python_interpreters": ["/usr/bin/python3"],
        "slot_users": SLOTS,
        "isolation": "required" if case.sandboxed else "off",
    }
    path = work / f"{case.executor}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


def empty_env_caches(cache: Path) -> None:
    """Remove every built env (venv and container) but keep uv's download cache."""
    for root in (cache / "venvs", cache / "containers" / "envs"):
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name != ".uv-cache":
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
    shutil.rmtree(cache / "containers" / "images" / "python", ignore_errors=True)


def child_start(store: Path, key: str) -> float:
    tar_path = store / "artifacts" / "experiments" / key / "output.tar"
    with tarfile.open(tar_path) as tar:
        member = tar.extractfile("output")
        assert member is not None
        text = member.read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("start "))
    return float(line.split()[1])


def one_run(
    work: Path, settings: Settings, executor: Executor, packages: list[str], sandbox: Sandbox
) -> tuple[float, float]:
    workspace = work / f"ws-{time.monotonic_ns()}"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    request = submit(
        Submission(
            workspace=workspace,
            script="train.py",
            args=[],
            queue="local_bench",
            queue_root=settings.local.root,
            storage=work / "store",
            requirements=packages,
        )
    )
    began = time.time()
    confined = sandbox if settings.isolation != "off" else None
    outcome = ExperimentRun(request, settings, executor, sandbox=confined).run()
    ended = time.time()
    if outcome.status != "completed":
        raise SystemExit(f"run failed: {outcome.detail}\n{outcome.output_tail}")
    return child_start(work / "store", request.key) - began, ended - began


def measure(
    work: Path, case: Case, image: Path, runs: int, package: str
) -> list[tuple[float, ...]]:
    settings = settings_for(work, case, image)
    packages = [package] if case.packages else []
    make: Callable[[], Executor] = lambda: build_executor(settings)  # noqa: E731
    executor = make()
    sandbox = Sandbox.from_settings(settings)
    # warm-up: fills uv's cache and the image probe
    one_run(work, settings, executor, packages, sandbox)
    samples: list[tuple[float, ...]] = []
    for _ in range(runs):
        if case.cold:
            empty_env_caches(settings.cache_dir)
            executor = make()
        samples.append(one_run(work, settings, executor, packages, sandbox))
        print(f"  {case.name}: {samples[-1][0] * 1000:.0f} ms", file=sys.stderr)
    return samples


def table(results: dict[str, list[tuple[float, ...]]], runs: int, package: str) -> str:
    base = statistics.median(s[0] for s in results["venv, warm"])
    out = io.StringIO()
    out.write(
        f"studio-agent {__version__}: Python {platform.python_version()}, "
        f"{platform.platform()}; trivial experiment, requirement {package}; "
        f"median of {runs} runs\n"
    )
    head = f"{'case':<34}{'start-up ms':>12}{'min':>9}{'max':>9}{'whole run ms':>14}"
    out.write(f"{head}{'start-up / venv warm':>22}{'added ms':>10}\n")
    for name, samples in results.items():
        starts = [s[0] * 1000 for s in samples]
        whole = statistics.median(s[1] for s in samples) * 1000
        ratio = statistics.median(s[0] for s in samples) / base
        plain = results.get(BASELINES.get(name, ""))
        added = ""
        if plain:
            gap = statistics.median(starts) - statistics.median(s[0] * 1000 for s in plain)
            added = f"{gap:+.0f}"
        out.write(
            f"{name:<34}{statistics.median(starts):>12.0f}{min(starts):>9.0f}{max(starts):>9.0f}"
            f"{whole:>14.0f}{ratio:>21.2f}x{added:>10}\n"
        )
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--package", default="six==1.16.0")
    args = parser.parse_args()
    apptainer = shutil.which("apptainer")
    if apptainer is None:
        raise SystemExit("apptainer is not installed: run scripts/install-apptainer.sh")
    image = build_image(apptainer)
    results: dict[str, list[tuple[float, ...]]] = {}
    # Under /var/tmp and open to pass through: slot users must reach their run dir.
    with tempfile.TemporaryDirectory(prefix="bench-executors-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o711)
        if os.geteuid() == 0:
            ensure_slots()
        for case in CASES:
            if case.sandboxed and os.geteuid() != 0:
                print(f"{case.name}: skipped, the sandbox needs root", file=sys.stderr)
                continue
            print(f"{case.name} ...", file=sys.stderr)
            results[case.name] = measure(Path(tmp), case, image, args.runs, args.package)
    print(table(results, args.runs, args.package), end="")


if __name__ == "__main__":
    main()
