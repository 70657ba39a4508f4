"""The folder watch, on real inotify in a temporary tree."""

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import inotify
from agent.watch import FolderWatcher


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[FolderWatcher, Wakes]]:
    root = tmp_path / "root"
    (root / "q").mkdir(parents=True)
    wakes = Wakes()
    watcher = FolderWatcher(root, wakes)
    watcher.start()
    wait_for(lambda: wakes.count >= 1)  # the watch is in place
    assert watcher.take_changed() is None  # the first scan: everything
    yield watcher, wakes
    watcher.stop()


def wait_for(condition: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def changed_within(watcher: FolderWatcher, timeout: float = 5) -> set[str] | None:
    deadline = time.monotonic() + timeout
    while (names := watcher.take_changed()) == set():
        assert time.monotonic() < deadline, "no change was signalled"
        time.sleep(0.005)
    return names


def test_a_message_in_a_queue_names_that_queue(watched: tuple[FolderWatcher, Wakes]) -> None:
    watcher, wakes = watched
    before = wakes.count
    (watcher.folder / "q" / "m1").write_bytes(b"{}")
    assert changed_within(watcher) == {"q"}
    assert wakes.count > before
    assert watcher.take_changed() == set()  # taken once


def test_a_new_folder_is_watched_too(watched: tuple[FolderWatcher, Wakes]) -> None:
    watcher, _ = watched
    (watcher.folder / "new" / "deeper").mkdir(parents=True)
    assert changed_within(watcher) == {"new"}
    time.sleep(0.05)
    watcher.take_changed()
    (watcher.folder / "new" / "deeper" / "key").write_text("x")
    assert changed_within(watcher) == {"new"}


def test_a_mode_change_and_a_rename_are_changes(watched: tuple[FolderWatcher, Wakes]) -> None:
    watcher, _ = watched
    cred = watcher.folder / "cred"
    cred.write_text("x")
    assert changed_within(watcher) == {"cred"}
    cred.chmod(0o644)
    assert changed_within(watcher) == {"cred"}
    cred.rename(watcher.folder / "q" / "moved")
    assert changed_within(watcher) == {"cred", "q"}
    watcher.folder.chmod(0o750)
    assert changed_within(watcher) is None  # the folder itself: look at everything


def test_an_idle_folder_wakes_nobody(watched: tuple[FolderWatcher, Wakes]) -> None:
    watcher, wakes = watched
    before = wakes.count
    time.sleep(0.5)
    assert wakes.count == before
    assert watcher.take_changed() == set()


def test_a_folder_removed_and_made_again_is_watched_again(
    watched: tuple[FolderWatcher, Wakes],
) -> None:
    watcher, _ = watched
    for path in sorted(watcher.folder.rglob("*"), reverse=True):
        path.rmdir()
    watcher.folder.rmdir()
    time.sleep(0.1)
    watcher.take_changed()
    (watcher.folder / "q").mkdir(parents=True)
    assert changed_within(watcher) is None  # it came back: anything may be in it
    time.sleep(0.05)
    watcher.take_changed()
    (watcher.folder / "q" / "m").write_text("{}")
    assert changed_within(watcher) == {"q"}


def test_symbolic_links_to_folders_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    watcher = FolderWatcher(root, lambda: None)
    watcher.start()
    try:
        time.sleep(0.1)
        watcher.take_changed()
        (outside / "secret").write_text("x")
        time.sleep(0.2)
        assert watcher.take_changed() == set()
    finally:
        watcher.stop()


def test_stop_ends_the_thread_and_frees_its_descriptors(tmp_path: Path) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    watcher = FolderWatcher(tmp_path, lambda: None)
    watcher.start()
    time.sleep(0.05)
    watcher.stop()
    watcher.stop()  # twice is harmless
    assert not watcher._thread.is_alive()
    assert set(os.listdir("/proc/self/fd")) <= fds_before


def test_an_event_record_cut_short_is_not_read_past_its_end() -> None:
    whole = inotify._HEADER.pack(1, inotify.CREATE, 0, 16) + b"name".ljust(16, b"\0")
    assert [e.name for e in inotify.parse(whole)] == ["name"]
    assert list(inotify.parse(whole[:-1])) == []
    assert list(inotify.parse(whole[:10])) == []
    huge = inotify._HEADER.pack(1, inotify.CREATE, 0, 2**32 - 1) + b"x"
    assert list(inotify.parse(huge)) == []


def test_a_tree_with_more_folders_than_the_cap_is_watched_in_part_and_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A local queue root is writable by every submitter: its folders must not cost unbounded
    # watches. The cap is lowered so the test need not make a thousand folders.
    monkeypatch.setattr("agent.watch.MAX_WATCHES", 3)
    root = tmp_path / "root"
    for index in range(6):
        (root / f"q{index}" / "deeper").mkdir(parents=True)
    wakes = Wakes()
    watcher = FolderWatcher(root, wakes)
    with caplog.at_level("WARNING", logger="agent.watch"):
        watcher.start()
        try:
            wait_for(lambda: wakes.count >= 1)  # the watch is in place
            assert watcher.take_changed() is None  # the first scan: everything
            (root / "new").mkdir()  # the root itself is always watched
            assert changed_within(watcher) == {"new"}
        finally:
            watcher.stop()
    said = [r.getMessage() for r in caplog.records if "cannot watch all of" in r.getMessage()]
    assert len(said) == 1
    assert "more than 3 folders" in said[0]
