"""Admission: the card-count rule, whole cards never shared, CPU/RAM/disk accounting, the
returned message that does not count as an attempt, and cards coming back after a crash or a
timeout (an in-process supervisor with a real local queue and real child processes)."""

import json
import logging
import random
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from agent.executors.base import Executor, Launch, RunContext
from agent.gpus import Card, Inventory
from agent.queues.base import Delivery, QueueFilter
from agent.queues.local import LocalQueue, enqueue
from agent.report.notify import Notifier
from agent.request import Resources
from agent.resources import Admission, Capacity, Grant, Need
from agent.settlement import Settlement
from agent.submit import Submission, prepare
from agent.subscriptions import Subscriptions
from agent.supervisor import Supervisor
from tests.conftest import Layout, write_workspace

GiB = 2**30
SMALL = Card(0, "GPU-small-0", "T4", 16 * GiB)
BIG = Card(1, "GPU-big-1", "A100", 80 * GiB)
MID = Card(2, "GPU-mid-2", "V100", 32 * GiB)
BROKEN = Card(3, "GPU-broken-3", "V100", 32 * GiB, ecc_failed=True)


def admission(
    *cards: Card,
    cpus: int = 8,
    ram: int = 64 * GiB,
    disk: tuple[int, int] = (1000 * GiB, 500 * GiB),
    min_free_disk: int = 0,
) -> Admission:
    capacity = Capacity(cpus, ram, Path("/"), min_free_disk, lambda _: disk)
    return Admission(Inventory(cards, "" if cards else "no driver"), capacity, 30.0, 600.0)


def needs(**given: object) -> Resources:
    return Resources.model_validate(given)


@pytest.mark.parametrize(
    ("given", "cards"),
    [
        ({}, 0),
        ({"gpus": 2}, 2),  # the 0.0.49 client: gpus is a card count
        ({"gpuCount": 3}, 3),
        ({"gpus": 16, "gpuCount": 1}, 1),  # GO21-style: gpus is a slot count, gpuCount the cards
        ({"gpuMem": "8GiB"}, 1),  # asking for GPU memory asks for a card
        ({"gpus": "1", "gpuCount": "0"}, 1),  # strings as `studio run --gpuCount` sends them
    ],
)
def test_card_count_rule(given: dict[str, object], cards: int) -> None:
    assert Need.of(needs(**given)).gpus == cards


def test_concurrent_requests_get_different_whole_cards() -> None:
    adm = admission(SMALL, MID)
    first = adm.admit("a", needs(gpus=1)).grant
    second = adm.admit("b", needs(gpus=1)).grant
    assert first
    assert second
    assert {first.uuids, second.uuids} == {(SMALL.uuid,), (MID.uuid,)}
    third = adm.admit("c", needs(gpus=1))
    assert third.grant is None
    assert not third.never
    assert "not enough are free" in third.reason
    adm.release(first)
    adm.release(first)  # idempotent: the card is not given back twice
    again = adm.admit("c", needs(gpus=1)).grant
    assert again
    assert again.uuids == first.uuids
    assert adm.admit("d", needs(gpus=1)).grant is None


def test_cards_are_never_shared_under_concurrent_release() -> None:
    """Admissions on one thread, releases from many: no card is ever held twice."""
    cards = [Card(i, f"GPU-{i}", "T4", 16 * GiB) for i in range(4)]
    adm = admission(*cards, cpus=64)
    held: set[str] = set()
    guard = threading.Lock()
    clashes: list[str] = []
    releasers: list[threading.Thread] = []

    def release_later(grant: object) -> None:
        time.sleep(random.random() / 500)
        with guard:
            held.difference_update(grant.uuids)  # type: ignore[attr-defined]
        adm.release(grant)  # type: ignore[arg-type]

    for n in range(400):
        grant = adm.admit(f"k{n}", needs(gpus=random.choice([1, 2]))).grant
        if grant is None:
            continue
        with guard:
            clashes += [uuid for uuid in grant.uuids if uuid in held]
            held.update(grant.uuids)
        thread = threading.Thread(target=release_later, args=(grant,))
        thread.start()
        releasers.append(thread)
    for thread in releasers:
        thread.join()
    assert clashes == []
    assert adm.gpus_in_use() == []


def test_more_gpus_than_the_machine_has_can_never_fit() -> None:
    verdict = admission(SMALL, MID).admit("k", needs(gpus=2, gpuCount=3))
    assert verdict.grant is None
    assert verdict.never
    assert "needs 3 GPU(s) (gpuCount 3; gpus 2 is not a card count" in verdict.reason
    assert "this machine has 2 such card(s) of 2" in verdict.reason
    none = admission().admit("k", needs(gpus=1))
    assert none.never
    assert "no GPU here: no driver" in none.reason


def test_gpu_mem_picks_the_smallest_adequate_card() -> None:
    adm = admission(BIG, SMALL, MID)
    grant = adm.admit("k", needs(gpus=1, gpuMem="20GiB")).grant
    assert grant
    assert grant.uuids == (MID.uuid,)
    small = adm.admit("k2", needs(gpus=1, gpuMem="8gb")).grant
    assert small
    assert small.uuids == (SMALL.uuid,)
    too_big = adm.admit("k3", needs(gpus=1, gpuMem="100GiB"))
    assert too_big.never
    assert "at least 107.4 GB (gpuMem)" in too_big.reason


def test_an_ecc_failed_card_is_never_given() -> None:
    adm = admission(BROKEN, MID)
    grant = adm.admit("k", needs(gpus=1)).grant
    assert grant
    assert grant.uuids == (MID.uuid,)
    assert adm.admit("k2", needs(gpus=1)).never is False  # one good card, busy now
    assert adm.admit("k3", needs(gpus=2)).never is True


def test_cpu_ram_and_disk_are_soft_accounted() -> None:
    adm = admission(cpus=4, ram=8 * GiB, disk=(100 * GiB, 30 * GiB), min_free_disk=5 * GiB)
    # Reserve: max(5 GiB, 10 % of 100 GiB) = 10 GiB; room now 20 GiB; at best 90 GiB.
    first = adm.admit("a", needs(cpus=3, ram="4GiB", hdd="15GiB")).grant
    assert first is not None
    assert "needs 2 CPUs; 1 free" in adm.admit("b", needs(cpus=2)).reason
    assert "of RAM" in adm.admit("b", needs(ram="5GiB")).reason
    assert "of disk" in adm.admit("b", needs(hdd="6GiB")).reason
    assert adm.admit("b", needs(cpus=5)).never
    assert adm.admit("b", needs(ram="9GiB")).never
    assert adm.admit("b", needs(hdd="91GiB")).never
    adm.release(first)
    assert adm.admit("b", needs(cpus=4, ram="8GiB", hdd="20GiB")).grant is not None


def test_capacity_of_this_machine_caps_the_settings() -> None:
    machine = Capacity.of_machine(0, 0, 0, Path("/nonexistent/work"))
    assert machine.cpus >= 1
    assert machine.ram > 0
    assert Capacity.of_machine(10_000, 2**62, 0, Path("/")).cpus == machine.cpus
    assert Capacity.of_machine(1, GiB, 0, Path("/")).ram == GiB
    room, at_best = machine.disk_room()  # the nearest existing parent's volume
    assert at_best > room


def carry_out(backend: LocalQueue, delivery: Delivery, settle: Settlement) -> None:
    """What Supervisor.carry_out does with a return (tests/integration covers the real one)."""
    delivery.requeue()
    backend.pause(delivery.queue, settle.pause)


def queue_with_message(tmp_path: Path, body: bytes = b'{"k": 1}') -> LocalQueue:
    enqueue(tmp_path / "queue", "local_q", body)
    return LocalQueue(tmp_path / "queue", tmp_path / "state", QueueFilter(r"^local_"))


def test_a_message_that_does_not_fit_now_goes_back_uncounted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = queue_with_message(tmp_path)
    adm = admission(SMALL)
    holder = adm.admit("running", needs(gpus=1)).grant
    delivery = backend.receive()
    assert delivery is not None
    with caplog.at_level(logging.INFO):
        settle = adm.take(backend, delivery, "waiting", needs(gpus=1))
    assert isinstance(settle, Settlement)
    assert (settle.action, settle.excused, settle.pause) == ("return", True, 30.0)
    carry_out(backend, delivery, settle)
    assert "does not fit now" in caplog.text
    assert backend.paused("local_q")
    assert backend.receive() is None
    assert (tmp_path / "queue" / "local_q" / delivery.message_id).is_file()  # back in line
    assert adm.describe()["waiting"] == {"local_q": "needs 1 GPU(s) (gpus 1); not enough are free"}
    adm.release(holder)  # the card is free: the queue is opened at once, not after 30 s
    assert not backend.paused("local_q")
    again = backend.receive()
    assert again is not None
    assert again.delivery_count == 2  # agent.gate excuses the return: tests/unit/test_ledger.py
    assert isinstance(adm.take(backend, again, "waiting", needs(gpus=1)), Grant)
    assert adm.describe()["waiting"] == {}


def test_a_message_that_can_never_fit_is_returned_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = queue_with_message(tmp_path)
    adm = admission(SMALL)
    delivery = backend.receive()
    assert delivery is not None
    with caplog.at_level(logging.INFO):
        settle = adm.take(backend, delivery, "greedy", needs(gpus=4))
    assert isinstance(settle, Settlement)
    assert (settle.action, settle.excused, settle.pause) == ("return", True, 600.0)
    carry_out(backend, delivery, settle)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "greedy" in errors[0].getMessage()
    assert "can never run on this machine: needs 4 GPU(s)" in errors[0].getMessage()
    assert "paused for 600s" in errors[0].getMessage()
    assert backend.paused("local_q")
    adm.release(adm.admit("other", needs()).grant)  # a release does not reopen a never-fit queue
    assert backend.paused("local_q")
    assert adm.describe()["waiting"]["local_q"].startswith("never fits: needs 4 GPU(s)")


# -- the supervisor gives cards back after a crash and after a timeout -------------------------


class ShellExecutor(Executor):
    """Runs ``script`` under /bin/sh instead of building a venv; raises when told to."""

    name = "shell"

    def __init__(self, script: str = "", crash: bool = False):
        self.script, self.crash = script, crash

    def prepare(self, ctx: RunContext, base_env: Mapping[str, str]) -> Launch:
        if self.crash:
            raise RuntimeError("executor bug")
        return Launch(["/bin/sh", "-c", self.script])


def supervisor(lay: Layout, executor: Executor) -> Supervisor:
    settings = lay.settings()
    backend = LocalQueue(settings.local.root, settings.state_dir, QueueFilter(r"^local_"))
    sup = Supervisor(settings, Subscriptions(settings, [backend]), executor, notifier=Notifier({}))
    sup.settings.state_dir.mkdir(parents=True, exist_ok=True)
    return sup


def step_until(sup: Supervisor, done: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "supervisor did not get there in time"
        sup.step()


def one_card(lay_factory: Callable[..., Layout], tmp_path: Path, **extra: object) -> Layout:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([{"uuid": "GPU-only-one", "name": "T4", "memory": "16GiB"}]))
    return lay_factory(gpu_inventory_file=str(path), **extra)


def gpu_message(lay: Layout, **extra: object) -> str:
    """Enqueue a request for one GPU as the client would; return its key."""
    workspace = write_workspace(lay.root / f"ws-{time.monotonic_ns()}", "print('unused')")
    sub = Submission(workspace, "train.py", [], "local_test", lay.queue_root, lay.storage)
    for name, value in extra.items():
        setattr(sub, name, value)
    message = prepare(sub)
    message["experiment"]["resources_needed"].update(gpus=1, cpus=0, ram="1mb", hdd="1mb")
    enqueue(lay.queue_root, "local_test", json.dumps(message).encode())
    return sub.key


def test_a_crashed_worker_gives_its_card_back(
    layout: Callable[..., Layout], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "all")
    lay = one_card(layout, tmp_path)
    gpu_message(lay)
    sup = supervisor(lay, ShellExecutor(crash=True))
    step_until(sup, lambda: bool(sup.jobs))
    assert sup.admission.gpus_in_use() == ["GPU-only-one"]
    assert "on GPU-only-one" in sup.status_text()
    step_until(sup, lambda: not sup.jobs)
    assert sup.admission.gpus_in_use() == []
    assert len(lay.queue_files("local_test")) == 1  # an agent error: the message went back
    assert sup.subscriptions.static[0].paused("local_test")  # for retry_backoff


def test_a_timed_out_experiment_gives_its_card_to_the_next(
    layout: Callable[..., Layout],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "all")
    lay = one_card(layout, tmp_path, max_concurrent=2, admission_backoff="1h")
    slow = gpu_message(lay, max_duration="1s")
    time.sleep(0.05)  # the local queue hands out the oldest first
    quick = gpu_message(lay)
    script = (
        'echo "cards=$CUDA_VISIBLE_DEVICES"; if [ "$STUDIOML_EXPERIMENT" = %s ]; then sleep 60; fi'
    )
    sup = supervisor(lay, ShellExecutor(script % slow))
    running = lambda: [job.run.request.key for job in sup.jobs.values()]  # noqa: E731
    with caplog.at_level(logging.INFO):
        step_until(sup, lambda: running() == [slow])
        # The second goes back to its queue, paused for an hour, while the first holds the card;
        # the timeout frees the card, which reopens the queue at once.
        step_until(sup, lambda: sup.subscriptions.static[0].paused("local_test"))
        assert len(lay.queue_files("local_test")) == 1
        step_until(sup, lambda: running() == [quick])
        step_until(sup, lambda: not sup.jobs)
    assert f"experiment {slow} timeout" in caplog.text
    assert f"experiment {quick} completed" in caplog.text
    for key in (slow, quick):
        assert "cards=GPU-only-one\n" in output_of(lay, key)
    assert sup.admission.gpus_in_use() == []
    assert lay.queue_files("local_test") == []


def output_of(lay: Layout, key: str) -> str:
    with tarfile.open(lay.results(key) / "output.tar") as tar:
        member = tar.extractfile("output")
        assert member is not None
        return member.read().decode()
