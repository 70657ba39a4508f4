import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.queues import local
from agent.queues.base import Delivery, QueueFilter
from agent.queues.local import LOCK_NAME, LocalQueue, enqueue, queue_lock

ANY = QueueFilter(r"^local_")


def backend(tmp_path: Path, queue_filter: QueueFilter = ANY) -> LocalQueue:
    return LocalQueue(tmp_path / "queue", tmp_path / "state", queue_filter)


def put(tmp_path: Path, queue: str, body: bytes, mtime: float | None = None) -> Path:
    path = enqueue(tmp_path / "queue", queue, body)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_oldest_message_first(tmp_path: Path) -> None:
    now = time.time()
    put(tmp_path, "local_a", b"new", now)
    put(tmp_path, "local_a", b"old", now - 100)
    put(tmp_path, "local_a", b"middle", now - 50)
    queue = backend(tmp_path)
    bodies = []
    while (delivery := queue.receive()) is not None:
        bodies.append(delivery.body)
        delivery.ack()
    assert bodies == [b"old", b"middle", b"new"]
    assert not list((tmp_path / "queue" / "local_a").iterdir())


def test_queue_names_filtered_and_new_folders_found(tmp_path: Path) -> None:
    queue = backend(tmp_path, QueueFilter(r"^local_", r"_private$"))
    assert queue.receive() is None  # no root yet: nothing, no error
    put(tmp_path, "rmq_other", b"x")
    put(tmp_path, "local_private", b"x")
    put(tmp_path, "local_x_response", b"x")
    assert queue.receive() is None
    woken = threading.Event()
    queue.wake = woken.set
    put(tmp_path, "local_new", b"hello")
    assert woken.wait(10), "the watch on the root did not wake the agent"
    delivery = wait_for(queue.receive)
    assert (delivery.queue, delivery.body) == ("local_new", b"hello")
    assert queue.served_queues() == ["local_new"]
    queue.close()


def wait_for(receive: Callable[[], Delivery | None], seconds: float = 10.0) -> Delivery:
    """The supervisor's loop after a wake: the watch's event may be a burst still settling."""
    deadline = time.monotonic() + seconds
    while (delivery := receive()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert delivery is not None
    return delivery


def test_an_idle_queue_is_not_scanned_until_something_changes(tmp_path: Path) -> None:
    put(tmp_path, "local_a", b"first")
    queue = backend(tmp_path)
    wait_for(queue.receive).ack()
    assert queue.receive() is None  # found empty: now only a change makes it look again
    scans = []
    queue.served_queues = lambda: scans.append(1) or []  # type: ignore[method-assign]
    for _ in range(20):
        assert queue.receive() is None
    assert scans == []
    del queue.served_queues
    put(tmp_path, "local_a", b"second")
    assert wait_for(queue.receive).body == b"second"
    queue.close()


def test_requeue_puts_the_same_file_back_in_its_place(tmp_path: Path) -> None:
    original = put(tmp_path, "local_a", b'{"experiment": 1}', time.time() - 500)
    stat = original.stat()
    put(tmp_path, "local_a", b"younger")
    queue = backend(tmp_path)
    delivery = queue.receive()
    assert delivery is not None
    assert delivery.body == b'{"experiment": 1}'
    assert not original.exists()  # taken out of the queue while we hold it
    delivery.requeue()
    assert original.read_bytes() == b'{"experiment": 1}'
    assert original.stat().st_mtime_ns == stat.st_mtime_ns
    again = queue.receive()
    assert again is not None
    assert (again.message_id, again.delivery_count) == (original.name, 2)


def test_ack_forgets_the_attempt_count(tmp_path: Path) -> None:
    put(tmp_path, "local_a", b"m")
    queue = backend(tmp_path)
    first = queue.receive()
    assert first is not None
    first.ack()
    assert not list((tmp_path / "state" / "attempts" / "local" / "local_a").iterdir())
    assert not list((tmp_path / "state" / "inflight" / "local" / "local_a").iterdir())


def test_messages_of_a_killed_agent_are_recovered(tmp_path: Path) -> None:
    path = put(tmp_path, "local_a", b"precious")
    delivery = backend(tmp_path).receive()
    assert delivery is not None
    assert not path.exists()
    # A new agent with the same state dir, as after kill -9 and a restart.
    restarted = backend(tmp_path)
    assert restarted.recover() == 1
    assert path.read_bytes() == b"precious"
    again = restarted.receive()
    assert again is not None
    assert again.delivery_count == 2


def test_waits_for_the_clients_lock(tmp_path: Path) -> None:
    put(tmp_path, "local_a", b"m")
    lock = tmp_path / "queue" / "local_a" / LOCK_NAME
    lock.touch()  # what filelock.SoftFileLock does while the client writes
    released = threading.Timer(0.3, lock.unlink)
    released.start()
    started = time.monotonic()
    delivery = backend(tmp_path).receive()
    released.join()
    assert delivery is not None
    assert time.monotonic() - started >= 0.25
    assert not lock.exists()


def test_a_stale_lock_is_broken(tmp_path: Path) -> None:
    folder = tmp_path / "queue" / "local_a"
    folder.mkdir(parents=True)
    lock = folder / LOCK_NAME
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with queue_lock(folder, wait=1):
        assert lock.exists()
    assert not lock.exists()


def test_lock_files_and_hidden_files_are_not_messages(tmp_path: Path) -> None:
    folder = tmp_path / "queue" / "local_a"
    folder.mkdir(parents=True)
    (folder / ".partial").write_bytes(b"x")
    (folder / "subdir").mkdir()
    assert backend(tmp_path).receive() is None


def test_round_robin_across_queues(tmp_path: Path) -> None:
    for _ in range(2):
        put(tmp_path, "local_a", b"a")
        put(tmp_path, "local_b", b"b")
    queue = backend(tmp_path)
    order = []
    while (delivery := queue.receive()) is not None:
        order.append(delivery.queue)
        delivery.ack()
    assert order in (["local_a", "local_b"] * 2, ["local_b", "local_a"] * 2)


@pytest.mark.parametrize("count", [20])
def test_two_consumers_never_take_the_same_message(tmp_path: Path, count: int) -> None:
    for i in range(count):
        put(tmp_path, "local_a", str(i).encode())
    taken: list[bytes] = []
    lock = threading.Lock()

    def consume(state: str) -> None:
        queue = LocalQueue(tmp_path / "queue", tmp_path / state, ANY)
        while (delivery := queue.receive()) is not None:
            with lock:
                taken.append(delivery.body)
            delivery.ack()

    threads = [threading.Thread(target=consume, args=(f"state{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(str(i).encode() for i in range(count))


@pytest.mark.parametrize(
    ("value", "count"),
    [
        (3, 3),
        ("3", 3),
        ("x", 0),
        ([1], 0),
        ("1e400", 0),
        ("9" * 5000, 0),
        (-5, 0),
        ("²", 0),
        (True, 0),
    ],
)
def test_a_count_a_message_carries_is_untrusted(value: object, count: int) -> None:
    from agent.queues.base import count_from

    assert count_from(value) == count


def test_a_change_is_looked_for_in_the_queue_it_happened_in_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("local_a", "local_b", "local_c"):
        (tmp_path / "queue" / name).mkdir(parents=True)
    queue = backend(tmp_path)
    assert queue.receive() is None  # the first look is at every queue, and finds them empty
    time.sleep(1.0)  # the watch settles in ...
    assert queue.receive() is None  # ... and its first signal is one more look at everything
    looked: list[str] = []
    real = local._messages
    monkeypatch.setattr(local, "_messages", lambda d: (looked.append(d.name), real(d))[1])
    woken = threading.Event()
    queue.wake = woken.set
    put(tmp_path, "local_b", b"only here")
    assert woken.wait(10)
    assert wait_for(queue.receive).body == b"only here"
    assert set(looked) == {"local_b"}  # many agents on one root: one folder each, not all
    queue.close()
