"""The `_metadata` document: accession ids, merge, JSON Patch, the streaming scraper, summaries."""

import copy
import io
import json
import logging
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.jsonpatch import PatchError, apply_patch, merge
from agent.metadata import Scraper, accession_id, base62
from agent.metadata_report import load_documents, render_table, summarize

# ---------------------------------------------------------------------------- helpers


class _Generated(io.RawIOBase):
    """A read-only stream whose bytes come from a generator, so a test never holds them all."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def generated(chunks: Iterator[bytes]) -> io.BufferedReader:
    return io.BufferedReader(_Generated(chunks))


def scrape(text: str, **options: Any) -> Scraper:
    scraper = Scraper(**options)
    scraper.feed(io.BytesIO(text.encode()))
    scraper.finish()
    return scraper


def user_content(scraper: Scraper) -> dict[str, Any]:
    doc = scraper.document({}, {}, "id")
    return {k: v for k, v in doc.items() if k not in ("runner", "studioml", "asset")}


def compact_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


# ---------------------------------------------------------------------------- accession ids


@pytest.mark.parametrize(
    ("number", "digits"),
    [
        (0, "0"),
        (9, "9"),
        (10, "A"),
        (36, "a"),
        (61, "z"),
        (62, "10"),
        (3843, "zz"),
        (3844, "100"),
        # 1*62^5 + 59('x')*62^4 + 30('U')*62^3 + 43('h')*62^2 + 11('B')*62 + 56('u')
        (1795252526, "1xUhBu"),
    ],
)
def test_base62_is_most_significant_first_and_unpadded(number: int, digits: str) -> None:
    assert base62(number) == digits


def test_accession_id_sanitises_the_host_and_truncates_the_time() -> None:
    assert accession_id("awsdev", 1795252526.9) == "awsdev-1xUhBu"
    assert accession_id("gpu box_1/é.example.com", 62.0) == "gpu-box-1--.example.com-10"


# ---------------------------------------------------------------------------- merge


def test_merge_recurses_into_objects_and_the_newer_value_wins() -> None:
    doc: dict[str, Any] = {"experiment": {"loss": 0.5, "nested": {"acc": 0.1, "keep": 1}}}
    merge(doc, {"experiment": {"loss": 0.2, "nested": {"acc": 0.9}, "epoch": 3}})
    assert doc == {"experiment": {"loss": 0.2, "nested": {"acc": 0.9, "keep": 1}, "epoch": 3}}


def test_merge_keeps_null_instead_of_deleting() -> None:
    doc: dict[str, Any] = {"a": {"b": 1}, "c": 2}
    merge(doc, {"a": None, "c": None})
    assert doc == {"a": None, "c": None}


def test_merge_replaces_lists_and_scalars_with_objects_and_back() -> None:
    doc: dict[str, Any] = {"list": [1, 2, 3], "scalar": 1, "object": {"x": 1}}
    merge(doc, {"list": [4], "scalar": {"now": "object"}, "object": "now scalar"})
    assert doc == {"list": [4], "scalar": {"now": "object"}, "object": "now scalar"}


def test_merge_copies_so_later_changes_to_the_fragment_do_not_leak() -> None:
    fragment: dict[str, Any] = {"a": {"b": [1]}}
    doc: dict[str, Any] = {}
    merge(doc, fragment)
    fragment["a"]["b"].append(2)
    assert doc == {"a": {"b": [1]}}


# ---------------------------------------------------------------------------- JSON Patch

PATCHES = [
    # The RFC 6902 appendix A examples, then pointer escapes and the array end.
    ({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}], {"foo": "bar", "baz": "qux"}),
    ({"foo": ["bar", "baz"]}, [{"op": "add", "path": "/foo/1", "value": "qux"}],
     {"foo": ["bar", "qux", "baz"]}),
    ({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    ({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}], {"foo": ["bar", "baz"]}),
    ({"baz": "qux", "foo": "bar"}, [{"op": "replace", "path": "/baz", "value": "boo"}],
     {"baz": "boo", "foo": "bar"}),
    ({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
     [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
     {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
    ({"foo": ["all", "grass", "cows", "eat"]}, [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
     {"foo": ["all", "cows", "eat", "grass"]}),
    ({"foo": "bar"}, [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
     {"foo": "bar", "child": {"grandchild": {}}}),
    ({"foo": ["bar"]}, [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
     {"foo": ["bar", ["abc", "def"]]}),
    ({"foo": None}, [{"op": "add", "path": "/foo", "value": 1}], {"foo": 1}),
    ({"a": {"b": [1]}}, [{"op": "copy", "from": "/a/b", "path": "/c"}],
     {"a": {"b": [1]}, "c": [1]}),
    ({"a": 1}, [{"op": "test", "path": "/a", "value": 1.0},
                {"op": "add", "path": "/t", "value": 1}],
     {"a": 1, "t": 1}),
    ({"a/b": 1, "m~n": 2}, [{"op": "replace", "path": "/a~1b", "value": 3},
                           {"op": "remove", "path": "/m~0n"},
                           {"op": "add", "path": "/~01", "value": 4}],
     {"a/b": 3, "~1": 4}),
    ({"": 1}, [{"op": "replace", "path": "/", "value": 2}], {"": 2}),
    ({"x": [1, 2]}, [{"op": "move", "from": "/x/0", "path": "/x/-"}], {"x": [2, 1]}),
    ({"x": 1}, [{"op": "replace", "path": "", "value": {"y": 2}}], {"y": 2}),
    ({"x": 1}, [{"op": "move", "from": "/x", "path": "/x"}], {"x": 1}),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "patch", "expected"), PATCHES)
def test_patch_operations(doc: dict[str, Any], patch: list[Any], expected: dict[str, Any]) -> None:
    apply_patch(doc, patch)
    assert doc == expected


BAD_PATCHES = [
    ([{"op": "test", "path": "/baz", "value": "bar"}], "test failed"),
    ([{"op": "test", "path": "/n", "value": True}], "test failed"),  # 1 is not true
    ([{"op": "add", "path": "/n", "value": 2}, {"op": "test", "path": "/n", "value": 1}],
     "operation 3.*test failed"),
    ([{"op": "add", "path": "/missing/child", "value": 1}], "no member 'missing'"),
    ([{"op": "remove", "path": "/nope"}], "no member 'nope'"),
    ([{"op": "replace", "path": "/nope", "value": 1}], "no member 'nope'"),
    ([{"op": "add", "path": "/list/5", "value": 1}], "out of range"),
    ([{"op": "add", "path": "/list/01", "value": 1}], "not an array index"),
    ([{"op": "remove", "path": "/list/-"}], "not an array index"),
    ([{"op": "remove", "path": "/list/3"}], "out of range"),
    ([{"op": "add", "path": "/n/x", "value": 1}], "not an object or an array"),
    ([{"op": "add", "path": "no-slash", "value": 1}], "not a JSON Pointer"),
    ([{"op": "add", "path": "/a~2", "value": 1}], "'~' not followed by 0 or 1"),
    ([{"op": "add", "path": "/x"}], "missing member 'value'"),
    ([{"op": "move", "path": "/x"}], "missing member 'from'"),
    ([{"op": "move", "from": "/obj", "path": "/obj/inner"}], "its own children"),
    ([{"op": "remove", "path": ""}], "whole document"),
    ([{"op": "replace", "path": "", "value": [1]}], "root must stay a JSON object"),
    ([{"op": "frobnicate", "path": "/n"}], "unknown op"),
    (["add"], "must be a JSON object"),
    ({"op": "add"}, "JSON array"),
]  # fmt: skip


@pytest.mark.parametrize(("patch", "reason"), BAD_PATCHES)
def test_a_failing_patch_raises_and_leaves_the_document_unchanged(patch: Any, reason: str) -> None:
    doc: dict[str, Any] = {"n": 1, "list": [1, 2], "obj": {"k": "v"}, "baz": "qux"}
    before = copy.deepcopy(doc)
    # Changes made by earlier operations of the same patch must be undone too.
    with pytest.raises(PatchError, match=reason):
        apply_patch(doc, [{"op": "add", "path": "/list/0", "value": 0},
                          {"op": "remove", "path": "/obj/k"}, *patch]
                    if isinstance(patch, list) else patch)  # fmt: skip
    assert doc == before


def test_patch_error_is_a_value_error() -> None:
    assert issubclass(PatchError, ValueError)


# ---------------------------------------------------------------------------- scraper

MIXED = "\n".join(
    [
        "epoch 1 starting",
        '{"experiment": {"loss": 0.5, "acc": 0.1}, "tags": ["a"]}',
        '   {"experiment": {"loss": 0.2, "nested": {"acc": 0.9}}}   ',
        '[{"op": "add", "path": "/experiment/history", "value": [0.5]}]',
        '[{"op": "add", "path": "/experiment/history/-", "value": 0.2}]',
        '{"a":',  # not closed: an ordinary log line
        '{"a": }',  # looks like JSON, is not
        "42",
        "[1, 2, 3]",  # JSON, but not a patch
        "[]",
        '[{"op": "test", "path": "/experiment/loss", "value": 99}]',  # fails
        '{"experiment": {"loss": NaN}}',
        "",
        "done",
    ]
)


def test_scraper_merges_objects_and_patches_and_counts_the_rest() -> None:
    scraper = scrape(MIXED + "\n")
    assert user_content(scraper) == {
        "experiment": {"loss": "NaN", "acc": 0.1, "nested": {"acc": 0.9}, "history": [0.5, 0.2]},
        "tags": ["a"],
    }
    assert (scraper.lines, scraper.json_lines) == (14, 8)
    assert (scraper.merged, scraper.patched, scraper.malformed) == (3, 2, 4)
    assert (scraper.refused, scraper.skipped_long, scraper.truncated) == (0, 0, False)


def test_scraper_keeps_its_size_equal_to_the_compact_json_of_the_content() -> None:
    lines = [
        '{"experiment": {"loss": 0.5, "name": "caf\u00e9", "list": [1, 2], "ok": true}}',
        '{"experiment": {"loss": 1e-7, "big": 12345678901234567890, "no": false, "x": "\\"q\\""}}',
        '[{"op": "add", "path": "/experiment/list/0", "value": {"x": "y"}}]',
        '[{"op": "copy", "from": "/experiment", "path": "/copy"}]',
        '[{"op": "move", "from": "/copy/list", "path": "/moved"}]',
        '[{"op": "remove", "path": "/experiment/list/1"}, {"op": "remove", "path": "/copy"}]',
        '[{"op": "replace", "path": "/moved", "value": null}]',
        '{"experiment": {"loss": null, "name": {"first": "a"}}, "z": 1}',
        '[{"op": "remove", "path": "/z"}, {"op": "remove", "path": "/moved"}]',
    ]
    scraper = Scraper()
    for line in lines:
        scraper.feed(io.BytesIO(line.encode() + b"\n"))
        assert scraper.size == compact_size(user_content(scraper)), line
    assert scraper.patched == 6


def test_scraper_refuses_the_agents_sections() -> None:
    text = "\n".join(
        [
            '{"studioml": {"status": "hacked"}, "experiment": {"ok": 1}}',
            '{"asset": {"id": "forged"}}',
            '[{"op": "add", "path": "/studioml/status", "value": "hacked"}]',
            '[{"op": "add", "path": "/x", "value": 1}, {"op": "copy", "from": "/runner", '
            '"path": "/y"}]',
            '[{"op": "replace", "path": "", "value": {"runner": {}}}]',
        ]
    )
    scraper = scrape(text)
    assert user_content(scraper) == {"experiment": {"ok": 1}}
    assert (scraper.refused, scraper.merged, scraper.patched, scraper.malformed) == (5, 1, 0, 3)


def test_document_puts_the_agents_sections_last_so_they_win() -> None:
    scraper = scrape(
        '{"experiment": {"loss": 0.1}, "extra": {"seed": 7}}\n{"studioml": {"status": "hacked"}}\n'
    )
    doc = scraper.document(
        {"host": "h1", "start": 1.0}, {"key": "k1", "status": "running"}, "uuid-1"
    )
    assert list(doc) == ["runner", "experiment", "extra", "studioml", "asset"]
    assert doc["studioml"] == {"key": "k1", "status": "running"}
    assert doc["asset"] == {"id": "uuid-1"}
    assert doc["runner"]["host"] == "h1"
    assert doc["runner"]["scrape"]["merged"] == 1
    assert doc["runner"]["scrape"]["refused"] == 1
    assert doc["runner"]["scrape"]["truncated"] is False
    doc["experiment"]["loss"] = 5  # the caller owns the copy it was given
    assert user_content(scraper)["experiment"] == {"loss": 0.1}


def test_a_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.write_bytes(b'plain\n{"experiment": {"lo')
    scraper = Scraper()
    with output.open("rb") as stream:
        scraper.feed(stream)
        assert (scraper.lines, scraper.merged) == (1, 0)
        with output.open("ab") as writer:
            writer.write(b'ss": 0.25}}\n{"experiment": {"acc": 1}}')
        scraper.feed(stream)
        assert (scraper.lines, scraper.merged) == (2, 1)
        scraper.finish()
        scraper.finish()  # the end of the output is taken once
    assert (scraper.lines, scraper.merged) == (3, 2)
    assert user_content(scraper) == {"experiment": {"loss": 0.25, "acc": 1}}


def test_a_line_longer_than_max_line_is_skipped_without_being_held() -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"experiment": {"before": 1}}\n{"experiment": {"long": "'
        for _ in range(50):
            yield b"x" * (1 << 20)
        yield b'"}}\n{"experiment": {"after": 2}}\n'

    scraper = Scraper(max_line=1 << 20)
    tracemalloc.start()
    try:
        scraper.feed(generated(chunks()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # holding the line would take over 50 MB
    assert (scraper.lines, scraper.skipped_long, scraper.merged) == (3, 1, 2)
    assert user_content(scraper) == {"experiment": {"before": 1, "after": 2}}


def test_a_long_unfinished_last_line_is_skipped_at_finish() -> None:
    scraper = scrape('{"a": 1}\n{"b": "' + "y" * 100 + '"}', max_line=50)
    assert (scraper.lines, scraper.skipped_long, user_content(scraper)) == (2, 1, {"a": 1})


def test_the_size_cap_stops_at_the_first_fragment_that_would_exceed_it() -> None:
    lines = [f'{{"experiment": {{"m{i}": "{"v" * 40}"}}}}' for i in range(10)]
    lines[6:6] = ["some text", '{"experiment": {"m0": "small"}}']
    scraper = scrape("\n".join(lines), max_bytes=300)
    content = user_content(scraper)
    # The first metric makes 64 bytes, each next one adds 48: 5 fit in 300, the 6th does not.
    assert sorted(content["experiment"]) == ["m0", "m1", "m2", "m3", "m4"]
    assert content["experiment"]["m0"] == "v" * 40  # nothing after the cap, small or not
    assert (scraper.truncated, scraper.truncated_at_line) == (True, 6)
    assert scraper.size == compact_size(content) <= 300
    assert scraper.lines == 12
    marker = scraper.document({}, {}, "id")["runner"]["scrape"]
    assert (marker["truncated"], marker["truncated_at_line"], marker["max_bytes"]) == (True, 6, 300)


def test_a_patch_over_the_cap_is_not_applied() -> None:
    text = '{"a": "' + "x" * 100 + '"}\n[{"op": "copy", "from": "/a", "path": "/b"}]\n'
    scraper = scrape(text, max_bytes=150)
    assert user_content(scraper) == {"a": "x" * 100}
    assert (scraper.patched, scraper.truncated_at_line) == (0, 2)


def test_feed_never_raises_on_hostile_lines() -> None:
    hostile = [
        b"[" * 100_000 + b"]" * 100_000,
        b"{" + b'"a":{' * 5_000 + b"}" * 5_001,
        b'{"n": ' + b"9" * 5_000 + b"}",
        b'{"\xff\xfe": 1}',
        b'[{"op": "add", "path": 5, "value": 1}]',
        b'[{"op": "add", "path": "/a/-/b", "value": 1}]',
    ]
    scraper = Scraper()
    scraper.feed(io.BytesIO(b"\n".join(hostile)))
    scraper.finish()
    assert scraper.lines == len(hostile)
    assert scraper.merged + scraper.patched == 0
    assert scraper.size == compact_size(user_content(scraper))


@pytest.mark.slow
def test_a_100_mb_output_streams_in_bounded_memory() -> None:
    text = b"".join(
        [
            b"step log line with some ordinary progress text to make the output large .......\n",
            b"another plain line: loss is going down, nothing to scrape in this one at all ...\n",
        ]
        * 4
    )
    block = text * 15  # about 10 KB of text per block, 100 MB in all

    def chunks() -> Iterator[bytes]:
        yield b'{"experiment": {"seen": []}}\n'
        for step in range(10_000):
            yield block
            yield f'{{"experiment": {{"step": {step}, "loss": {1 / (step + 1)}}}}}\n'.encode()
            yield (
                b'[{"op": "add", "path": "/experiment/seen/-", "value": 1}]\n'
                if step < 1000
                else b""
            )
            yield b'{"broken": \n'

    scraper = Scraper()
    tracemalloc.start()
    try:
        scraper.feed(generated(chunks()))
        scraper.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scraper.lines == 1 + 10_000 * (len(block.splitlines()) + 2) + 1000
    assert (scraper.merged, scraper.patched) == (10_001, 1000)
    assert peak < 20 << 20
    content = user_content(scraper)["experiment"]
    assert (content["step"], len(content["seen"])) == (9999, 1000)


# ---------------------------------------------------------------------------- reading back


def run_doc(
    key: str, start: Any, stop: Any, status: str, metrics: dict[str, Any], project: str = "p1"
) -> dict[str, Any]:
    return {
        "runner": {"host": f"host-{key}", "start": start, "stop": stop, "exit_code": 0},
        "experiment": metrics,
        "studioml": {"key": key, "project": project, "status": status},
        "asset": {"id": f"{key}-{start}"},
    }


DOCS = [
    run_doc("k2", 200.0, 260.0, "completed", {"loss": 0.25, "nested": {"acc": 0.912345678}}),
    run_doc("k1", 100.0, 150.0, "failed", {"loss": 0.9}),
    run_doc("k1", 300.0, 350.0, "completed", {"loss": 0.1, "tags": ["x"], "status": "weird"}),
    run_doc("k3", "2026-01-01T00:00:00+00:00", None, "running", {"step": 7}, project="p2"),
]


def test_summarize_keeps_the_latest_run_of_each_key_ordered_by_start() -> None:
    rows = summarize(DOCS)
    assert [(r["key"], r["status"]) for r in rows] == [
        ("k2", "completed"),
        ("k1", "completed"),
        ("k3", "running"),
    ]
    assert rows[0] == {
        "key": "k2",
        "project": "p1",
        "status": "completed",
        "host": "host-k2",
        "start": 200.0,
        "stop": 260.0,
        "exit_code": 0,
        "loss": 0.25,
        "nested.acc": 0.912345678,
    }
    # Lists are not flattened; a metric named like a run field keeps its own name.
    assert rows[1]["experiment.status"] == "weird"
    assert "tags" not in rows[1]


def test_summarize_latest_run_wins_whatever_the_file_order() -> None:
    rows = summarize(list(reversed(DOCS)))
    assert [r["loss"] for r in rows if r["key"] == "k1"] == [0.1]


def test_summarize_filters_by_project_and_status() -> None:
    assert [r["key"] for r in summarize(DOCS, project="p1")] == ["k2", "k1"]
    assert [r["key"] for r in summarize(DOCS, status="running")] == ["k3"]
    # k1's latest run completed, so its earlier failure is not listed.
    assert summarize(DOCS, status="failed") == []
    assert summarize(DOCS, project="p2", status="completed") == []


def test_render_table_aligns_columns_with_metrics_in_first_seen_order() -> None:
    table = render_table(summarize(DOCS))
    assert table.splitlines() == [
        "key  project  status     host     exit_code  loss  nested.acc  experiment.status  step",
        "---  -------  ---------  -------  ---------  ----  ----------  -----------------  ----",
        "k2   p1       completed  host-k2          0  0.25    0.912346",
        "k1   p1       completed  host-k1          0   0.1              weird",
        "k3   p2       running    host-k3          0                                          7",
    ]


def test_render_table_of_nothing_is_a_header() -> None:
    assert render_table([]).splitlines()[0].split() == [
        "key",
        "project",
        "status",
        "host",
        "exit_code",
    ]


def test_load_documents_skips_unreadable_files_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "scrape-a.json"
    good.write_text(json.dumps(DOCS[0]))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1]")
    paths = [good, tmp_path / "bad.json", tmp_path / "list.json", tmp_path / "missing.json"]
    with caplog.at_level(logging.WARNING, logger="agent.metadata"):
        assert load_documents(paths) == [DOCS[0]]
    assert len(caplog.records) == 3
    assert all("skipped" in record.getMessage() for record in caplog.records)
