"""What opening an encrypted, signed message adds to each message (goal: under 5 ms median with a
4096-bit key).

In process, on the real 0.0.49 message in tests/fixtures: the baseline is the gate's work on the
clear body (the bounded parse and the trust check); then the same request as the client's envelope
(tests/sealing.py builds it as the client does): parse, signature check, RSA-OAEP unwrap of the
session key, secretbox decryption, the parse of the clear body, the clear-field agreement and the
trust check, for 2048- and 4096-bit keys. ``bench/overhead.py`` prints these rows next to a
running agent's enqueue -> start for sealed and clear messages in the same run.

Usage: ``python bench/encrypted.py [--runs 7] [--loops 200]`` (with the project venv). It prints
the median of ``--runs`` runs of ``--loops`` messages each, per message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import envelope  # noqa: E402
from agent.envelope import Sealed  # noqa: E402
from agent.intake import parse_message, read_message  # noqa: E402
from agent.message_keys import Signer  # noqa: E402
from agent.storage.base import StorageOptions  # noqa: E402
from agent.trust import check_request  # noqa: E402
from bench.intake import samples  # noqa: E402
from tests.sealing import Keys, seal  # noqa: E402

EXAMPLE = json.loads((ROOT / "tests" / "fixtures" / "example_message_redacted.json").read_text())
QUEUE = "rmq_bench"
BITS = (2048, 4096)
Row = tuple[str, str, list[float]]  # name, unit, one value a run


def open_clear(body: bytes) -> Callable[[], object]:
    options = StorageOptions()

    def work() -> object:
        request = parse_message(body)
        check_request(request, options)
        return request

    return work


def open_sealed(body: bytes, keys: Keys) -> Callable[[], object]:
    """What agent.gate does with an envelope: ``_take`` then ``_unseal``."""
    options = StorageOptions()
    signer = Signer(QUEUE, keys.signer.public_key(), keys.fingerprint)

    def work() -> object:
        sealed = read_message(body)
        assert isinstance(sealed, Sealed)
        envelope.verify(sealed, QUEUE, signer)
        request = parse_message(envelope.decrypt(sealed, keys.rsa))
        envelope.check_agrees(sealed, request)
        check_request(request, options)
        return request

    return work


def measure(runs: int, loops: int) -> list[Row]:
    clear = json.dumps(EXAMPLE).encode()
    baseline = samples(open_clear(clear), loops, runs)
    rows: list[Row] = [("clear message: parse, trust check", "ms", [1000 * s for s in baseline])]
    for bits in BITS:
        keys = Keys.generate(bits)
        body = json.dumps(seal(EXAMPLE, keys)).encode()
        sealed = samples(open_sealed(body, keys), loops, runs)
        rows.append((f"encrypted, {bits}-bit key: open and check", "ms", ms(sealed)))
        added = [s - statistics.median(baseline) for s in sealed]
        rows.append((f"  added per message, {bits}-bit key", "ms", ms(added)))
    return rows


def ms(seconds: list[float]) -> list[float]:
    return [1000 * s for s in seconds]


def report(rows: list[Row], width: int = 54) -> str:
    lines = [f"{'':<{width}} {'unit':<8} {'median':>9} {'min':>9} {'max':>9} {'n':>4}"]
    for name, unit, values in rows:
        summary = (statistics.median(values), min(values), max(values))
        cells = " ".join(f"{v:>9.3f}" for v in summary)
        lines.append(f"{name:<{width}} {unit:<8} {cells} {len(values):>4}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs (7)")
    parser.add_argument("--loops", type=int, default=200, help="messages per run (200)")
    options = parser.parse_args()
    print(f"per message, median of {options.runs} runs of {options.loops}")
    print(report(measure(options.runs, options.loops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
