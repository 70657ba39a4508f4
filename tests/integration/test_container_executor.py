"""Experiments in a real Apptainer image: the client's ``--container``, a default image, GPUs,
the environment, package caching, failures, time limits and refused sources.

The image is a debootstrapped bookworm with python3 (tests/services/apptainer.py), built once and
cached in .cache/test-images. ``--nv`` is asserted on the command line only: without an NVIDIA
GPU Apptainer drops it silently, so what a job sees of a real card is not verified here.
"""

import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.executors import build_executor
from agent.executors.base import RunContext
from agent.experiment import ExperimentRun, Outcome
from agent.intake import parse_message
from agent.request import Artifact, Request
from agent.settings import Settings
from tests.conftest import (
    AgentProcess,
    Layout,
    alive,
    client_env,
    client_read_back,
    submit_script,
    wait_until,
    write_client_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.apptainer, pytest.mark.slow]

SECRET = "agent-own-secret-value"

PROBE = """
import json, os, sys
report = {
    "in_container": "APPTAINER_CONTAINER" in os.environ,
    "debian": open("/etc/debian_version").read().strip(),
    "python": sys.version.split()[0],
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "args": sys.argv[1:],
}
print("REPORT " + json.dumps(report))
"""


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"") for m in tar}  # type: ignore[union-attr]


def read_output(lay: Layout, key: str) -> str:
    return tar_members(lay.results(key) / "output.tar")["output"].decode()


def report_of(output: str) -> dict[str, object]:
    [line] = [ln for ln in output.splitlines() if ln.startswith("REPORT ")]
    result: dict[str, object] = json.loads(line.removeprefix("REPORT "))
    return result


def container_layout(layout: Callable[..., Layout], image: Path, **extra: object) -> Layout:
    return layout(executor="singularity", container_image=str(image), **extra)


def run(lay: Layout, request: Request, gpus: tuple[str, ...] = ()) -> Outcome:
    settings = lay.settings()
    return ExperimentRun(request, settings, build_executor(settings), gpus=gpus).run()


def test_client_container_request_runs_in_the_image(
    python_sif: Path,
    client_venv: Path,
    layout: Callable[..., Layout],
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """``studio run --container image.sif`` on a venv agent: the client uploads the SIF as an
    immutable ``_singularity`` artifact; the agent routes the request to the container."""
    home, store = tmp_path / "studiohome", tmp_path / "clientstore"
    # executor: venv (the default); the client's store is where local_storage lets it be
    lay = layout(queue_root=str(home / "queue"), local_storage=[str(store)])
    config = write_client_config(tmp_path / "client.yaml", store)
    store.mkdir()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "train.py").write_text(PROBE)
    key = "containerexp1"
    argv = ["studio-run", f"--config={config}", "--queue", "local_c", "-e", key]
    argv += ["--container", str(python_sif), "train.py", "7"]
    env = client_env(client_venv, home)
    subprocess.run(argv, cwd=workspace, env=env, check=True, capture_output=True, timeout=300)
    [message] = (home / "queue" / "local_c").iterdir()
    singularity = parse_message(message.read_bytes()).experiment.artifacts["_singularity"]
    assert singularity.local == str(python_sif)
    assert singularity.key
    assert not singularity.mutable

    agent = start_agent(lay, {"STUDIO_TEST_TOKEN": SECRET})
    record = store / "meta" / "experiments" / key
    wait_until(
        lambda: json.loads(record.read_text()).get("status") == "finished",
        timeout=600,
        what="the client's record to say finished",
    )
    assert agent.stop() == 0
    back = client_read_back(client_venv, config, key, workspace, env, "output")
    output = (Path(back["paths"]["output"]) / "output").read_text()  # the Go runner's layout
    report = report_of(output)
    assert report["in_container"] is True
    assert str(report["debian"]).startswith("12.")
    assert report["args"] == ["7"]
    assert SECRET not in output
    assert "downloading the image blobstore/" in output


def test_default_image_isolates_the_environment(
    python_sif: Path, layout: Callable[..., Layout], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request naming no container runs in container_image, with only the child's env."""
    lay = container_layout(layout, python_sif)
    monkeypatch.setenv("STUDIO_TEST_TOKEN", SECRET)
    request = submit_script(lay, PROBE, "two words", "$HOME", env={"SEED": "a $b `c`"})
    outcome = run(lay, request)
    assert outcome.status == "completed", read_output(lay, request.key)
    report = report_of(read_output(lay, request.key))
    env = report["env"]
    assert isinstance(env, dict)
    assert report["in_container"] is True
    assert report["args"] == ["two words", "$HOME"]
    assert env["SEED"] == "a $b `c`"  # verbatim: the runtime's own expansion is escaped
    assert SECRET not in json.dumps(report)
    assert env["STUDIOML_EXPERIMENT"] == request.key
    assert str(report["cwd"]).endswith(f"experiments/{request.key}/workspace")
    assert not env.get("CUDA_VISIBLE_DEVICES")


def test_assigned_gpus_only(python_sif: Path, layout: Callable[..., Layout]) -> None:
    lay = container_layout(layout, python_sif)
    request = submit_script(lay, PROBE)
    fake = ("GPU-11111111-2222-3333-4444-555555555555",)
    outcome = run(lay, request, gpus=fake)
    assert outcome.status == "completed", read_output(lay, request.key)
    env = report_of(read_output(lay, request.key))["env"]
    assert isinstance(env, dict)
    assert env["CUDA_VISIBLE_DEVICES"] == fake[0]
    assert env["NVIDIA_VISIBLE_DEVICES"] == fake[0]
    # The runtime is asked for the GPU stack (what it then binds is not checkable without one).
    settings = lay.settings()
    ctx = RunContext(request, lay.root / "seam", lay.root / "seam" / "out", fake)
    ctx.workspace.mkdir(parents=True)
    launch = build_executor(settings).prepare(ctx, {"PATH": "/usr/bin:/bin"})
    argv, outer = launch.command({"CUDA_VISIBLE_DEVICES": fake[0], "PATH": "/x"})
    assert "--nv" in argv
    assert set(outer) <= {"PATH", "HOME", "LANG"}
    no_gpu = RunContext(request, ctx.home, ctx.output_file, ())
    assert "--nv" not in build_executor(settings).prepare(no_gpu, {}).command({})[0]


SIX = """
import six, sys
print("six", six.__version__, "from", six.__file__)
"""


def test_packages_installed_once_and_reused(
    python_sif: Path, layout: Callable[..., Layout], tmp_path: Path
) -> None:
    lay = container_layout(layout, python_sif, cache_dir=str(tmp_path / "cache"))
    first = submit_script(lay, SIX, requirements=["six==1.16.0"])
    assert run(lay, first).status == "completed", read_output(lay, first.key)
    out1 = read_output(lay, first.key)
    assert "six 1.16.0 from /opt/studio-env/six.py" in out1
    assert "building environment" in out1
    [marker] = (tmp_path / "cache" / "containers" / "envs").glob("*.json")
    built = json.loads(marker.read_text())["built_at"]

    second = submit_script(lay, SIX, requirements=["six==1.16.0"])
    assert run(lay, second).status == "completed"
    out2 = read_output(lay, second.key)
    assert "reusing environment" in out2
    assert "building environment" not in out2
    assert "uv pip install" not in out2
    assert "six 1.16.0 from /opt/studio-env/six.py" in out2
    assert json.loads(marker.read_text())["built_at"] == built  # the same build, untouched


FAILING = """
import sys
print("before the failure", flush=True)
print("boom on stderr", file=sys.stderr)
sys.exit(3)
"""


def test_failing_run_reports_code_and_stderr(
    python_sif: Path, layout: Callable[..., Layout]
) -> None:
    lay = container_layout(layout, python_sif)
    request = submit_script(lay, FAILING)
    outcome = run(lay, request)
    assert (outcome.status, outcome.exit_code) == ("failed", 3)
    output = read_output(lay, request.key)
    assert "boom on stderr" in output
    assert "before the failure" in output
    assert "exit status 3" in output
    assert "exit status 3" in outcome.detail


def test_runtime_errors_reach_the_output(
    python_sif: Path, layout: Callable[..., Layout], tmp_path: Path
) -> None:
    """Apptainer's own refusal (here a bind of a missing path) is in the user's output."""
    missing = tmp_path / "no-such-dir"
    lay = container_layout(layout, python_sif, container_options=["--bind", f"{missing}:/x"])
    request = submit_script(lay, PROBE)
    outcome = run(lay, request)
    assert outcome.status == "failed"
    assert outcome.exit_code not in (0, None)
    output = read_output(lay, request.key)
    assert str(missing) in output
    assert f"exit status {outcome.exit_code}" in output


FAMILY = """
import os, subprocess, sys, time
a = subprocess.Popen(["sleep", "300"])
b = subprocess.Popen(["sleep", "301"], start_new_session=True)
open(sys.argv[1], "w").write(f"{os.getpid()} {a.pid} {b.pid}")
print("sleeping", flush=True)
time.sleep(300)
"""


def run_processes(marker: str) -> list[int]:
    """Live processes whose command line names ``marker`` (the run's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_timeout_kills_the_containers_processes(
    python_sif: Path, layout: Callable[..., Layout], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    lay = container_layout(layout, python_sif, container_options=["--bind", f"{shared}"])
    request = submit_script(lay, FAMILY, str(shared / "pids"), max_duration="4s")
    settings: Settings = lay.settings()
    experiment = ExperimentRun(request, settings, build_executor(settings))
    outcome = experiment.run()
    assert outcome.status == "timeout", read_output(lay, request.key)
    pids = [int(p) for p in (shared / "pids").read_text().split()]
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="payload gone")
    wait_until(lambda: not run_processes(str(experiment.home)), timeout=10, what="runtime gone")
    output = read_output(lay, request.key)
    assert "sleeping" in output
    assert "killed after its time limit" in output


def test_disallowed_source_is_refused_with_the_reason(
    python_sif: Path, layout: Callable[..., Layout]
) -> None:
    lay = container_layout(layout, python_sif, container_sources=["docker", "s3"])
    request = submit_script(lay, PROBE)
    outcome = run(lay, request)
    assert outcome.status == "failed"
    assert not outcome.transient
    output = read_output(lay, request.key)
    assert "source 'file'" in output
    assert "container_sources: docker, s3" in output


def test_old_client_dockerhub_reference_maps_to_docker(
    python_sif: Path, layout: Callable[..., Layout]
) -> None:
    """``dockerhub://`` (what 0.0.49 writes) is the docker source, refused when not allowed."""
    lay = container_layout(layout, python_sif, container_sources=["file"])
    request = submit_script(lay, PROBE)
    request.experiment.artifacts["_singularity"] = Artifact(
        qualified="dockerhub://tensorflow/tensorflow", mutable=False, unpack=False
    )
    outcome = run(lay, request)
    assert outcome.status == "failed"
    output = read_output(lay, request.key)
    assert "'docker://tensorflow/tensorflow'" in output
    assert "source 'docker'" in output


def test_probe_and_build_happen_once_per_image(
    python_sif: Path, layout: Callable[..., Layout], tmp_path: Path
) -> None:
    """The image's Python is asked once and remembered on disk for the next agent."""
    lay = container_layout(layout, python_sif, cache_dir=str(tmp_path / "cache"))
    request = submit_script(lay, SIX, requirements=["six==1.16.0"])
    assert run(lay, request).status == "completed"
    [record] = (tmp_path / "cache" / "containers" / "images" / "python").glob("*.json")
    assert json.loads(record.read_text())["version"][:2] == [3, 11]
