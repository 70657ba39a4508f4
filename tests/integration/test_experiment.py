"""The experiment pipeline with real processes, real virtualenvs and local storage; no queue."""

import json
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.executors import build_executor
from agent.experiment import ExperimentRun, Outcome
from agent.request import Request
from agent.storage import archive
from tests.conftest import Layout, alive, submit_script, wait_until

pytestmark = pytest.mark.integration


def run(lay: Layout, request: Request) -> Outcome:
    settings = lay.settings()
    return ExperimentRun(request, settings, build_executor(settings)).run()


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"") for m in tar}  # type: ignore[union-attr]


def read_output(lay: Layout, key: str) -> str:
    return tar_members(lay.results(key) / "output.tar")["output"].decode()


ENV_PROBE = """
import json, os, sys
print("line one")
print("args", json.dumps(sys.argv[1:]))
print("to stderr", file=sys.stderr)
home, key = os.environ["STUDIOML_HOME"], os.environ["STUDIOML_EXPERIMENT"]
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
report = {
    "cwd": os.getcwd(), "home": home, "key": key, "mapping": mapping,
    "unbuffered": os.environ.get("PYTHONUNBUFFERED"), "path": os.environ["PATH"],
    "seed": os.environ.get("SEED"), "secret": os.environ.get("AWS_SECRET_ACCESS_KEY"),
    "prefix": sys.prefix,
}
open(os.path.join(mapping["modeldir"], "report.json"), "w").write(json.dumps(report))
open(os.path.join(mapping["retval"], "retval"), "wb").write(b"pickled-bytes")
"""


def test_run_uploads_output_and_artifacts_where_the_client_reads_them(
    layout: Callable[..., Layout], monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = layout()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "agent-own-secret")
    request = submit_script(
        lay, ENV_PROBE, "10", "hello world", "$HOME", env={"SEED": 7, "PATH": "%PATH%:/extra"}
    )
    outcome = run(lay, request)
    assert (outcome.status, outcome.exit_code, outcome.transient) == ("completed", 0, False)

    members = tar_members(lay.results(request.key) / "output.tar")
    assert list(members) == ["output"]
    output = members["output"].decode()
    assert "line one\n" in output
    assert "to stderr\n" in output
    assert 'args ["10", "hello world", "$HOME"]\n' in output  # the client's shell quoting undone

    report = json.loads(tar_members(lay.results(request.key) / "modeldir.tar")["report.json"])
    exp_dir = Path(report["home"]) / "experiments" / request.key
    assert report["key"] == request.key
    assert report["cwd"] == str(exp_dir / "workspace")
    assert report["mapping"]["modeldir"] == str(exp_dir / "modeldir")
    assert report["unbuffered"] == "TRUE"
    assert report["seed"] == "7"
    assert report["path"].endswith(":/extra")
    assert report["path"].startswith(report["prefix"])  # the experiment's venv comes first
    assert report["secret"] is None  # the agent's environment does not leak into the job

    assert tar_members(lay.results(request.key) / "retval.tar") == {"./retval": b"pickled-bytes"}
    record = json.loads((lay.storage / "meta" / "experiments" / request.key).read_text())
    assert record["status"] == "finished"
    assert not Path(report["home"]).exists()  # the run directory is cleaned up


def test_failure_is_a_result_with_its_output(layout: Callable[..., Layout]) -> None:
    lay = layout()
    request = submit_script(lay, "import sys\nprint('about to fail')\nsys.exit(3)\n")
    outcome = run(lay, request)
    assert (outcome.status, outcome.exit_code, outcome.transient) == ("failed", 3, False)
    output = read_output(lay, request.key)
    assert "about to fail\n" in output
    assert "exit status 3" in output


FAMILY = """
import os, subprocess, sys, time
a = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
b = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(sys.argv[1], "w").write(f"{os.getpid()} {a.pid} {b.pid}")
print("sleeping", flush=True)
time.sleep(300)
"""


def test_timeout_kills_the_whole_process_tree(
    layout: Callable[..., Layout], tmp_path: Path
) -> None:
    lay = layout()
    pids_file = tmp_path / "pids"
    request = submit_script(lay, FAMILY, str(pids_file), max_duration="3s")
    outcome = run(lay, request)
    assert outcome.status == "timeout"  # not "completed": the 300 s sleep never ended
    pids = [int(p) for p in pids_file.read_text().split()]
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, what="process tree gone")
    output = read_output(lay, request.key)
    assert "sleeping\n" in output
    assert "killed after its time limit" in output


CHECKPOINTED = """
import os, time
print("phase one", flush=True)
release = os.path.join(os.getcwd(), "release")
deadline = time.time() + 60
while not os.path.exists(release):
    if time.time() > deadline:
        raise SystemExit("no checkpoint upload was seen")
    time.sleep(0.1)
print("phase two")
"""


def test_checkpoint_uploads_while_running(layout: Callable[..., Layout]) -> None:
    lay = layout()
    request = submit_script(lay, CHECKPOINTED, checkpoint="1s")
    settings = lay.settings()
    experiment = ExperimentRun(request, settings, build_executor(settings))
    result: list[Outcome] = []
    thread = threading.Thread(target=lambda: result.append(experiment.run()))
    thread.start()
    output_tar = lay.results(request.key) / "output.tar"
    wait_until(
        lambda: output_tar.exists() and b"phase one" in output_tar.read_bytes(), what="checkpoint"
    )
    assert thread.is_alive()  # the upload happened mid-run
    (experiment.ctx.workspace / "release").touch()
    thread.join(60)
    assert result[0].status == "completed"
    assert "phase two\n" in read_output(lay, request.key)


BIG_MODEL = """
import json, os
mapping = json.load(open(os.environ["STUDIOML_ARTIFACT_MAPPING"]))
with open(os.path.join(mapping["modeldir"], "weights"), "wb") as out:
    for _ in range(256):
        out.write(os.urandom(2**20))  # not compressible: saving it takes a while
"""


def test_a_slow_save_frees_the_slot_after_the_run_ends_and_before_the_results_are_saved(
    layout: Callable[..., Layout],
) -> None:
    lay = layout()
    quick, slow = submit_script(lay, "print('ran')\n"), submit_script(lay, BIG_MODEL)
    settings = lay.settings()
    seen: list[tuple[bool, bool]] = []
    for request in (quick, slow):
        experiment = ExperimentRun(request, settings, build_executor(settings))
        model = lay.results(request.key) / "modeldir.tar"
        experiment.on_free = lambda e=experiment, m=model: seen.append(  # type: ignore[misc]
            (e.confinement is None, m.exists() and m.stat().st_size >= 256 * 2**20)
        )
        assert experiment.run().status == "completed"
        if request is quick:
            assert seen == []  # a save shorter than SAVE_ALONE keeps its slot to the end
    assert seen == [(True, False)]  # once; confinement closed; the model not yet saved
    assert (lay.results(slow.key) / "modeldir.tar").stat().st_size >= 256 * 2**20


def test_expired_request_is_not_run(layout: Callable[..., Layout]) -> None:
    lay = layout()
    request = submit_script(lay, "open('ran', 'w')\n", lifetime="1s")
    time.sleep(1.2)
    outcome = run(lay, request)
    assert (outcome.status, outcome.transient) == ("expired", False)
    assert not lay.results(request.key).exists()


def test_cancel_keeps_output_and_asks_for_requeue(layout: Callable[..., Layout]) -> None:
    lay = layout()
    request = submit_script(lay, "import time\nprint('working', flush=True)\ntime.sleep(300)\n")
    settings = lay.settings()
    experiment = ExperimentRun(request, settings, build_executor(settings))
    result: list[Outcome] = []
    thread = threading.Thread(target=lambda: result.append(experiment.run()))
    thread.start()
    wait_until(
        lambda: (
            experiment.ctx.output_file.exists()
            and b"working" in experiment.ctx.output_file.read_bytes()
        )
    )
    experiment.cancel()
    thread.join(30)
    assert (result[0].status, result[0].transient) == ("cancelled", True)
    assert "working\n" in read_output(lay, request.key)


def test_missing_workspace_fails_with_the_reason_in_the_output(
    layout: Callable[..., Layout],
) -> None:
    lay = layout()
    request = submit_script(lay, "print('never')\n")
    workspace_key = request.experiment.artifacts["workspace"].key
    assert workspace_key
    (lay.storage / "artifacts" / workspace_key).unlink()
    outcome = run(lay, request)
    assert (outcome.status, outcome.transient) == ("failed", False)
    assert "no object" in read_output(lay, request.key)


def test_failed_install_fails_the_experiment_with_the_installers_message(
    layout: Callable[..., Layout],
) -> None:
    lay = layout()
    request = submit_script(lay, "print('never')\n", pip=["this-package-does-not-exist-xyz==9.9.9"])
    outcome = run(lay, request)
    assert outcome.status == "failed"
    output = read_output(lay, request.key)
    assert "this-package-does-not-exist-xyz" in output
    assert "never" not in output.replace("print('never')", "")


def test_unsafe_workspace_tar_is_refused(layout: Callable[..., Layout]) -> None:
    lay = layout()
    request = submit_script(lay, "print('never')\n")
    key = request.experiment.artifacts["workspace"].key
    assert key
    evil = lay.root / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 0
        tar.addfile(info)
    (lay.storage / "artifacts" / key).write_bytes(evil.read_bytes())
    outcome = run(lay, request)
    assert outcome.status == "failed"
    assert "escaped.txt" in outcome.detail
    assert not any(lay.root.rglob("escaped.txt"))
    assert archive.is_tar_key(key)
