"""Hostile experiments against the sandbox on this host: real slot identities, real cgroups.

The agent here is this test process (root, as the unit's ambient capabilities make it able to
be), its runs are real processes under setpriv in real cgroups (v1 controllers and the cgroup2
``unified`` tree on this hybrid host). Each test tries one escape and asserts that it fails and
that the results still arrive. What needs systemd (the unit's own sandbox, the .deb's slot
users) is in tests/system/test_hostile_experiments.py.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from agent.executors import build_executor
from agent.experiment import ExperimentRun, Outcome
from agent.request import Request
from agent.sandbox import Sandbox
from agent.sandbox.identity import SETPRIV, SlotPool, discover_slots
from tests.conftest import AgentProcess, Layout, submit_script, wait_until
from tests.integration.test_experiment import tar_members

pytestmark = [pytest.mark.integration, pytest.mark.sandbox]

# Not /tmp/pytest-of-root (0700): slot users must be able to pass through to their run dir.
JAIL_ROOT = Path("/var/tmp/studio-agent-tests")
SLOTS = ["61184", "61185", "61186"]
NEIGHBOUR = 61187  # a slot no run here takes: stands for another team's experiment


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the sandbox tests run the agent as root (setuid to slot users, cgroups)")


@pytest.fixture(scope="session")
def jail_cache() -> Iterator[Path]:
    _require_root()
    JAIL_ROOT.mkdir(mode=0o711, exist_ok=True)
    os.chmod(JAIL_ROOT, 0o711)
    cache = JAIL_ROOT / f"cache-{uuid.uuid4().hex[:8]}"
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def jail(jail_cache: Path) -> Iterator[Callable[..., Layout]]:
    """A layout slot users can reach, with secrets where an agent keeps them."""
    root = JAIL_ROOT / uuid.uuid4().hex[:12]
    root.mkdir(mode=0o711)
    os.chmod(root, 0o711)

    def make(**overrides: object) -> Layout:
        config = {
            "queue_root": str(root / "queue"),
            "state_dir": str(root / "state"),
            "cache_dir": str(jail_cache),
            "certs_dir": str(root / "certs"),
            "local_storage": [str(root / "store")],
            "slot_users": SLOTS,
            "max_concurrent": 2,
            "isolation": "required",
            "kill_grace": "1s",
            "poll_interval": 0.05,
            "checkpoint_min_interval": "0s",
            "metrics_address": "",
            "python_interpreters": ["/usr/bin/python3"],  # pyenv's under /root: not for slots
        }
        config.update(overrides)
        path = root / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        os.chmod(path, 0o600)  # as the package leaves it: root and the agent's group only
        (root / "certs" / "rabbitmq").mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(root / "certs", 0o700)
        secret = root / "certs" / "rabbitmq" / "team"
        secret.write_text("amqp://team:hunter2@broker.example/")
        os.chmod(secret, 0o600)
        for folder in (root / "state", root / "state" / "work"):
            folder.mkdir(exist_ok=True)
            os.chmod(folder, 0o711)
        journal = root / "state" / "journal"
        journal.mkdir(mode=0o700, exist_ok=True)
        (journal / "message.json").write_text('{"s3": "secret key of a message in flight"}')
        return Layout(root, path, root / "queue", root / "state", root / "store")

    yield make
    shutil.rmtree(root, ignore_errors=True)


def run(
    lay: Layout, request: Request, sandbox: Sandbox | None = None, devices: tuple[str, ...] = ()
) -> Outcome:
    settings = lay.settings()
    sandbox = sandbox or Sandbox.from_settings(settings)
    executor = build_executor(settings)
    return ExperimentRun(request, settings, executor, sandbox=sandbox, devices=devices).run()


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and "Z" not in _state(entry):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def alive_process(pid: int) -> bool:
    try:
        return _state(Path(f"/proc/{pid}")) != "Z"
    except OSError:
        return False


def _state(entry: Path) -> str:
    raw = (entry / "stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()[0]


ESCAPES = """
import json, os, sys
report = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
status = open("/proc/self/status").read().splitlines()
report["caps"] = {l.split(":")[0]: l.split()[1] for l in status if l.startswith(("Cap", "NoNew"))}
report["env"] = sorted(os.environ)
def attempt(name, action):
    try:
        action()
        report[name] = "allowed"
    except OSError as exc:
        report[name] = type(exc).__name__
e = os.environ
attempt("read_credential", lambda: open(e["CERTS"] + "/rabbitmq/team").read())
attempt("list_certs", lambda: os.listdir(e["CERTS"]))
attempt("read_config", lambda: open(e["CONFIG"]).read())
attempt("list_state", lambda: os.listdir(e["STATE"]))
attempt("read_journal", lambda: open(e["STATE"] + "/journal/message.json").read())
attempt("list_work", lambda: os.listdir(e["STATE"] + "/work"))
attempt("list_neighbour_run", lambda: os.listdir(e["NEIGHBOUR_RUN"]))
attempt("read_agent_environ", lambda: open("/proc/%s/environ" % e["AGENT_PID"]).read())
attempt("signal_agent", lambda: os.kill(int(e["AGENT_PID"]), 0))
attempt("signal_neighbour", lambda: os.kill(int(e["NEIGHBOUR_PID"]), 0))
attempt("write_cache", lambda: open(e["CACHE"] + "/planted", "w"))
attempt("write_own_env", lambda: open(sys.prefix + "/bin/planted", "w"))
attempt("write_outside", lambda: open(e["JAIL"] + "/planted", "w"))
attempt("write_home_frame", lambda: open(e["STUDIOML_HOME"] + "/planted", "w"))
attempt("write_tmpdir", lambda: open(e["TMPDIR"] + "/mine", "w"))
mapping = json.load(open(e["STUDIOML_ARTIFACT_MAPPING"]))
report["workspace"] = os.getcwd() == mapping["workspace"]
path = os.path.join(mapping["modeldir"], "report.json")
open(path, "w").write(json.dumps(report))
os.chmod(path, 0)  # whatever modes it gives its results, they are uploaded
os.makedirs(os.path.join(mapping["modeldir"], "closed"))
open(os.path.join(mapping["modeldir"], "closed", "deep.txt"), "w").write("deep")
os.chmod(os.path.join(mapping["modeldir"], "closed"), 0)
print("escapes tried")
"""


def test_an_experiment_reaches_nothing_of_the_agent_or_its_neighbours(
    jail: Callable[..., Layout], monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = jail()
    settings = lay.settings()
    monkeypatch.setenv("AMQP_URL", "amqp://agent:agent-secret@broker/")  # the agent's own
    neighbour_run = settings.effective_work_dir / "neighbour-run"
    neighbour_run.mkdir(mode=0o700)
    os.chown(neighbour_run, NEIGHBOUR, NEIGHBOUR)
    neighbour = subprocess.Popen(
        [SETPRIV, f"--reuid={NEIGHBOUR}", f"--regid={NEIGHBOUR}", "--clear-groups", "sleep", "60"]
    )
    try:
        paths = {
            "CERTS": lay.root / "certs",
            "CONFIG": lay.config,
            "STATE": lay.state_dir,
            "NEIGHBOUR_RUN": neighbour_run,
            "CACHE": settings.cache_dir,
            "JAIL": lay.root,
            "AGENT_PID": os.getpid(),
            "NEIGHBOUR_PID": neighbour.pid,
        }
        request = submit_script(lay, ESCAPES, env={k: str(v) for k, v in paths.items()})
        outcome = run(lay, request)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert (outcome.status, outcome.exit_code) == ("completed", 0), outcome.output_tail
    members = tar_members(lay.results(request.key) / "modeldir.tar")
    assert members["closed/deep.txt"] == b"deep"  # a folder it closed to everyone, uploaded
    report = json.loads(members["report.json"])
    assert report["uid"] in {int(s) for s in SLOTS}
    assert (report["gid"], report["groups"]) == (report["uid"], [])
    assert report["caps"] == {
        "CapInh": "0000000000000000",
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": report["caps"]["CapBnd"],  # the bounding set is systemd's business
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
    }
    assert "AMQP_URL" not in report["env"]
    refused = [
        "read_credential",
        "list_certs",
        "read_config",
        "list_state",
        "read_journal",
        "list_work",
        "list_neighbour_run",
        "read_agent_environ",
        "write_cache",
        "write_own_env",
        "write_outside",
        "write_home_frame",
    ]
    assert {name: report[name] for name in refused} == dict.fromkeys(refused, "PermissionError")
    assert report["signal_agent"] == report["signal_neighbour"] == "PermissionError"
    assert (report["write_tmpdir"], report["workspace"]) == ("allowed", True)
    assert not (settings.cache_dir / "planted").exists()


def with_ram(request: Request, ram: str) -> Request:
    wire = request.to_wire()
    wire["experiment"]["resources_needed"]["ram"] = ram
    return Request.model_validate(wire)


MEMORY_HOG = """
import sys
print("allocating", flush=True)
hog = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(hog), 4096):
    hog[i] = 1
print("survived", flush=True)
"""
STEADY = """
import time
time.sleep(2)
print("steady finished", flush=True)
"""


def test_a_memory_hog_is_oom_killed_alone_and_reported_as_such(
    jail: Callable[..., Layout],
) -> None:
    lay = jail(memory_floor="64MiB", memory_factor=1.0)
    hog = with_ram(submit_script(lay, MEMORY_HOG, "600"), "64MiB")
    steady = with_ram(submit_script(lay, STEADY), "64MiB")
    sandbox = Sandbox.from_settings(lay.settings())  # one pool: the two runs get two slots
    outcomes: dict[str, Outcome] = {}
    worker = threading.Thread(target=lambda: outcomes.update(steady=run(lay, steady, sandbox)))
    worker.start()
    outcomes["hog"] = run(lay, hog, sandbox)
    worker.join()
    assert outcomes["hog"].status == "failed", outcomes["hog"].output_tail
    assert "went over its memory limit of 64" in outcomes["hog"].detail
    assert "survived" not in outcomes["hog"].output_tail
    assert outcomes["hog"].detail in outcomes["hog"].output_tail  # its user sees why
    assert (outcomes["steady"].status, outcomes["steady"].exit_code) == ("completed", 0)


FORK_BOMB = """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(300)
            os._exit(0)
        children += 1
except OSError as exc:
    print("fork refused after", children, "children:", exc, flush=True)
"""


def test_a_fork_bomb_is_contained_and_its_children_end_with_it(
    jail: Callable[..., Layout],
) -> None:
    lay = jail(max_tasks=40)
    request = submit_script(lay, FORK_BOMB)
    outcome = run(lay, request)
    assert (outcome.status, outcome.exit_code) == ("completed", 0), outcome.output_tail
    line = next(ln for ln in outcome.output_tail.splitlines() if "fork refused" in ln)
    assert int(line.split()[3]) < 40
    assert all(not processes_of(int(slot)) for slot in SLOTS)


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()  # leaves the session: only the cgroup still knows it belongs to the run
    if os.fork() == 0:
        print("daemon", os.getpid(), flush=True)
        time.sleep(300)
    os._exit(0)
time.sleep(300)
"""


def test_the_whole_tree_ends_on_timeout_even_what_left_the_session(
    jail: Callable[..., Layout],
) -> None:
    lay = jail(max_runtime="3s")
    outcome = run(lay, submit_script(lay, DAEMON))
    assert outcome.status == "timeout"
    daemon = int(next(ln for ln in outcome.output_tail.splitlines() if "daemon" in ln).split()[1])
    assert not alive_process(daemon)
    assert all(not processes_of(int(slot)) for slot in SLOTS)


def test_without_a_cgroup_the_slot_user_is_the_run_and_nothing_of_it_survives(
    jail: Callable[..., Layout],
) -> None:
    """A host whose cgroups the agent may not use (nspawn without delegation, say)."""
    lay = jail(max_runtime="3s")
    no_cgroup = Sandbox(pool=SlotPool(discover_slots(SLOTS)), problems={"tree": "none here"})
    outcome = run(lay, submit_script(lay, DAEMON), no_cgroup)
    assert outcome.status == "timeout"
    daemon = int(next(ln for ln in outcome.output_tail.splitlines() if "daemon" in ln).split()[1])
    assert not alive_process(daemon)  # left the session and its parent: ended by its uid
    assert all(not processes_of(int(slot)) for slot in SLOTS)


OPEN_DEVICES = """
import errno, os, sys
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR))
        print(path, "opened")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
"""


def test_an_experiment_opens_only_the_device_nodes_of_its_own_cards(
    jail: Callable[..., Layout],
) -> None:
    lay = jail()
    nodes = lay.root / "dev"
    nodes.mkdir(mode=0o755)
    for minor in (0, 1):  # stand-ins for /dev/nvidia0 and /dev/nvidia1: no driver behind them
        os.mknod(nodes / f"nvidia{minor}", 0o666 | stat.S_IFCHR, os.makedev(195, minor))
        os.chmod(nodes / f"nvidia{minor}", 0o666)  # as the driver's are: the fence is the cgroup
    ours, other = str(nodes / "nvidia0"), str(nodes / "nvidia1")
    request = submit_script(lay, OPEN_DEVICES, ours, other, "/dev/null")
    outcome = run(lay, request, devices=(ours,))
    assert outcome.status == "completed", outcome.output_tail
    assert f"{ours} ENXIO" in outcome.output_tail  # allowed: it reached the (absent) driver
    assert f"{other} EPERM" in outcome.output_tail  # fenced by the cgroup
    assert "/dev/null opened" in outcome.output_tail


SETUP_PY = """
import json, os, sys
report = {"uid": os.getuid(), "env": sorted(os.environ)}
try:
    open(os.environ.get("CERTS_FILE", "/nonexistent")).read()
    report["certs"] = "read"
except OSError as exc:
    report["certs"] = type(exc).__name__
sys.exit("BUILD-REPORT " + json.dumps(report))
"""


def test_a_package_build_runs_confined_with_the_allow_listed_environment(
    jail: Callable[..., Layout], monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = jail()
    links = lay.root / "links"
    package = links / "src" / "hostilepkg-1.0"
    package.mkdir(parents=True)
    credential = lay.root / "certs" / "rabbitmq" / "team"
    (package / "setup.py").write_text(SETUP_PY.replace("/nonexistent", str(credential)))
    (package / "PKG-INFO").write_text("Metadata-Version: 1.0\nName: hostilepkg\nVersion: 1.0\n")
    subprocess.run(
        ["tar", "-czf", str(links / "hostilepkg-1.0.tar.gz"), "-C", str(links / "src"), "."],
        check=True,
    )
    shutil.rmtree(links / "src")
    for path in (links, links / "hostilepkg-1.0.tar.gz"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    monkeypatch.setenv("UV_FIND_LINKS", str(links))  # the operator's mirror: passed through
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "agent-secret")  # the agent's own: never
    request = submit_script(lay, "print('never runs')", requirements=["hostilepkg==1.0"])
    outcome = run(lay, request)
    assert outcome.status == "failed", outcome.output_tail
    line = next(ln for ln in outcome.output_tail.splitlines() if "BUILD-REPORT" in ln)
    report = json.loads(line.split("BUILD-REPORT ", 1)[1])
    assert report["uid"] in {int(s) for s in SLOTS}
    assert report["certs"] == "PermissionError"
    assert "AWS_SECRET_ACCESS_KEY" not in report["env"]
    leftovers = [p for p in lay.settings().cache_dir.joinpath("venvs").iterdir() if p.is_dir()]
    assert all(p.stat().st_uid == 0 for p in leftovers)  # what stays in the cache is the agent's


def test_an_unreachable_index_sends_the_message_back_instead_of_failing_it(
    jail: Callable[..., Layout], monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = jail()
    monkeypatch.setenv("UV_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("UV_HTTP_TIMEOUT", "5")
    request = submit_script(lay, "print('never runs')", requirements=["nosuchpackage-xyz==1.0"])
    outcome = run(lay, request)
    assert (outcome.status, outcome.transient) == ("error", True), outcome.detail
    assert "the network or the index failed" in outcome.detail


LONG = """
import os, time
if os.fork() == 0:
    os.setsid()
    time.sleep(600)
    os._exit(0)
print("running", flush=True)
time.sleep(600)
"""


def test_a_run_left_by_a_killed_agent_is_ended_through_its_cgroup_at_the_next_start(
    jail: Callable[..., Layout], tmp_path: Path
) -> None:
    lay = jail(drain_timeout="2s")
    first = AgentProcess(lay.config, tmp_path / "first.log")
    outputs = lay.state_dir / "work"
    try:
        first.wait_for_log("experiment isolation: every protection is on")
        submit_script(lay, LONG)
        wait_until(
            lambda: any(
                b"running" in p.read_bytes() for p in outputs.glob("*/experiments/*/output/output")
            ),
            timeout=120,
        )
    finally:
        first.kill()  # kill -9: no drain, no cleanup
    orphans = [pid for slot in SLOTS for pid in processes_of(int(slot))]
    assert len(orphans) >= 2  # the experiment and its setsid'd child outlived the agent
    second = AgentProcess(lay.config, tmp_path / "second.log")
    try:
        second.wait_for_log("killed an experiment left running by a previous agent")
        # The message comes back and runs again: what must be gone are the orphans themselves.
        assert [pid for pid in orphans if alive_process(pid)] == []
    finally:
        second.stop()


def check_config(config: Path) -> "subprocess.CompletedProcess[str]":
    argv = [sys.executable, "-m", "agent", "check-config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def test_check_config_says_which_protections_this_host_gives(
    jail: Callable[..., Layout],
) -> None:
    shown = check_config(jail().config).stdout
    for name in ("identity", "memory", "tasks", "cpu", "devices", "tree"):
        assert f"# isolation {name}: enforced" in shown
    shown = check_config(jail(isolation="off").config).stdout
    assert "# isolation identity: off: isolation is off in the configuration" in shown


def test_isolation_required_refuses_to_start_without_slot_users(
    jail: Callable[..., Layout],
) -> None:
    done = check_config(jail(slot_users=[]).config)  # no studio-slot<N> accounts here
    assert done.returncode == 78
    assert "isolation is required but not available: identity: no slot users" in done.stderr


CONTAINED = """
import json, os
caps = [ln.strip() for ln in open("/proc/self/status") if ln.startswith("CapEff")]
print("in the image as", os.getuid(), "caps", caps[0])
try:
    open(os.environ["CERTS"] + "/rabbitmq/team").read()
    print("credential read")
except OSError as exc:
    print("credential refused:", type(exc).__name__)
import six
print("six from", six.__file__)
"""


# Apptainer looks its user up in passwd: bare uids will not do, so these are real accounts
# (system users, no home, no login), made once on the test machine, as the package makes its own.
NAMED_SLOTS = ["studio-tslot0", "studio-tslot1"]


@pytest.fixture(scope="session")
def named_slots() -> list[str]:
    _require_root()
    for name in NAMED_SLOTS:
        if subprocess.run(["getent", "passwd", name], capture_output=True).returncode != 0:
            account = ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
            subprocess.run(["useradd", "--system", "--user-group", *account], check=True)
    return NAMED_SLOTS


@pytest.mark.apptainer
def test_a_container_run_and_its_package_build_run_as_the_slot_too(
    jail: Callable[..., Layout], python_sif: Path, named_slots: list[str]
) -> None:
    lay = jail(executor="singularity", container_image=str(python_sif), slot_users=named_slots)
    uids = {
        int(subprocess.run(["id", "-u", n], capture_output=True, text=True).stdout)
        for n in named_slots
    }
    certs = {"CERTS": str(lay.root / "certs")}
    request = submit_script(lay, CONTAINED, env=certs, requirements=["six==1.16.0"])
    outcome = run(lay, request)
    assert (outcome.status, outcome.exit_code) == ("completed", 0), outcome.output_tail
    said = next(ln for ln in outcome.output_tail.splitlines() if ln.startswith("in the image"))
    assert int(said.split()[4]) in uids
    assert said.endswith("CapEff:\t0000000000000000")
    # --contain binds only the run dir: the certs dir is not even there, and unreadable if it were
    assert "credential refused: FileNotFoundError" in outcome.output_tail
    assert "six from /opt/studio-env/six.py" in outcome.output_tail
    envs = lay.settings().cache_dir / "containers" / "envs"
    assert all(p.stat().st_uid == 0 for p in envs.iterdir() if p.is_dir())  # taken back


LOADER = """
import json, os
open("/tmp/studio-leftover-%d" % os.getpid(), "w").write("left")
os.makedirs("/dev/shm/studio-leftover-%d/deep" % os.getpid())
seen = {name: os.environ.get(name) for name in ("LD_LIBRARY_PATH", "LD_DEBUG", "TMPDIR", "SEED")}
print("LOADER " + json.dumps(seen))
"""


def test_the_loaders_variables_of_a_request_reach_only_the_experiment(
    jail: Callable[..., Layout],
) -> None:
    lay = jail()
    agent_only = lay.root / "agent-only"  # where only the agent (root here) may write
    agent_only.mkdir(mode=0o700)
    env = {
        "LD_DEBUG": "libs",  # ld.so writes its trace to LD_DEBUG_OUTPUT.<pid> as whoever runs
        "LD_DEBUG_OUTPUT": str(agent_only / "trace"),
        "LD_LIBRARY_PATH": "/opt/cuda/lib64",
        "SEED": "7",
    }
    request = submit_script(lay, LOADER, env=env)
    outcome = run(lay, request)
    assert outcome.status == "completed", outcome.output_tail
    # Had the launcher (the cgroup join, setpriv: the agent, privileged) seen them, it would
    # have written its trace here; the experiment, as its slot, cannot.
    assert list(agent_only.iterdir()) == []
    line = next(ln for ln in outcome.output_tail.splitlines() if ln.startswith("LOADER "))
    seen = json.loads(line.removeprefix("LOADER "))
    assert (seen["LD_LIBRARY_PATH"], seen["LD_DEBUG"], seen["SEED"]) == (
        "/opt/cuda/lib64",
        "libs",
        "7",
    )
    assert str(seen["TMPDIR"]).startswith(str(lay.state_dir))
    # What it left in the shared /tmp and /dev/shm went with it.
    leftovers = [
        *Path("/tmp").glob("studio-leftover-*"),
        *Path("/dev/shm").glob("studio-leftover-*"),
    ]
    assert leftovers == []
