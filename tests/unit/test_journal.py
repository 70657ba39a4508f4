from base64 import b64decode
from pathlib import Path

from agent.queues.journal import Journal
from agent.queues.rabbitmq_discovery import bindings_request, management_url, redact_url


def test_kept_messages_survive_a_new_journal(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    kept = first.keep("rmq_a", b'{"experiment": {}}', {"attempts": 2})
    first.keep("rmq_b", b"other", {})
    again = {(e.queue, e.body, e.meta.get("attempts")) for e in Journal(tmp_path).entries()}
    assert again == {("rmq_a", b'{"experiment": {}}', 2), ("rmq_b", b"other", None)}
    first.drop(kept)
    assert [e.queue for e in Journal(tmp_path).entries()] == ["rmq_b"]


def test_an_interrupted_write_is_not_an_entry(tmp_path: Path) -> None:
    folder = tmp_path / "rmq_a"
    folder.mkdir()
    (folder / "abc.json").write_text("{}")  # meta written, body never was
    (folder / ".abc.tmp123").write_bytes(b"partial")
    assert list(Journal(tmp_path).entries()) == []


def test_management_url_follows_the_go_runner() -> None:
    assert management_url("amqp://u:p@broker:5672/%2f") == "http://u:p@broker:15672"
    assert management_url("amqps://u:p@broker/vh") == "https://u:p@broker:15671"
    assert management_url("amqp://broker") == "http://guest:guest@broker:15672"


def test_redact_url_hides_the_password() -> None:
    assert redact_url("amqp://user:s3cret@host:5672/%2f") == "amqp://user:***@host:5672/%2f"
    assert redact_url("amqp://host/") == "amqp://host/"


def test_urls_keep_ipv6_brackets() -> None:
    assert management_url("amqps://u:p@[::1]:5671/%2f") == "https://u:p@[::1]:15671"
    assert redact_url("amqp://u:s3cret@[fd00::5]:5672/%2f") == "amqp://u:***@[fd00::5]:5672/%2f"
    request = bindings_request("https://u:p@[::1]:15671", "/")
    assert request.full_url == "https://[::1]:15671/api/bindings/%2F"


def test_bindings_request_decodes_credentials_as_pika_does() -> None:
    # "p@ss:w/rd%" must be percent-encoded in a URL; pika decodes the AMQP URL's copy.
    derived = management_url("amqps://us%40er:p%40ss%3Aw%2Frd%25@broker:5671/vh")
    request = bindings_request(derived, "vh")
    assert request.full_url == "https://broker:15671/api/bindings/vh"
    assert request.type == "https"
    header = request.get_header("Authorization") or ""
    assert b64decode(header.removeprefix("Basic ")) == b"us@er:p@ss:w/rd%"
    assert redact_url(derived) == "https://us%40er:***@broker:15671"


def test_bindings_request_defaults_to_guest() -> None:
    header = bindings_request("http://broker:15672/", "/").get_header("Authorization") or ""
    assert b64decode(header.removeprefix("Basic ")) == b"guest:guest"


def test_a_queue_name_cannot_lead_the_journal_out_of_its_root(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    for hostile in ("rmq_/../../../escaped", "..", "rmq_x/y"):
        entry = journal.keep(hostile, b"body", {})
        assert (journal.folder(hostile) / entry.entry_id).parent.parent == journal.root
    assert not (tmp_path / "escaped").exists()
    assert sorted(e.queue for e in journal.entries()) == ["..", "rmq_/../../../escaped", "rmq_x/y"]
    assert journal.folder("rmq_plain").name == "rmq_plain"  # existing journals read unchanged
