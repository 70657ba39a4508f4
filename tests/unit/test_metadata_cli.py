import json
import subprocess
import sys
from pathlib import Path


def write_scrape(folder: Path, key: str, status: str, loss: float, stop: float) -> None:
    document = {
        "runner": {"host": "gpu1", "start": stop - 10, "stop": stop, "exit_code": 0},
        "experiment": {"loss": loss},
        "studioml": {"key": key, "project": "enn", "status": status},
        "asset": {"id": f"{key}-{stop}"},
    }
    (folder / f"scrape-gpu1-{key}-{int(stop)}.json").write_text(json.dumps(document))


def test_metadata_command_lists_latest_run_per_experiment(tmp_path: Path) -> None:
    write_scrape(tmp_path, "exp1", "failed", 0.9, 100)
    write_scrape(tmp_path, "exp1", "completed", 0.25, 200)  # a later run of the same key wins
    write_scrape(tmp_path, "exp2", "running", 0.5, 150)
    (tmp_path / "scrape-broken.json").write_text("{not json")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "metadata",
            str(tmp_path),
            "--status",
            "completed",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["key"], r["status"], r["loss"]) for r in rows] == [("exp1", "completed", 0.25)]
    table = subprocess.run(
        [sys.executable, "-m", "agent", "metadata", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert table.splitlines()[0].split() == [
        "key",
        "project",
        "status",
        "host",
        "exit_code",
        "loss",
    ]
    assert "exp2" in table
