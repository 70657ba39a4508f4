"""Artifact throughput: the agent's tar + S3 streaming next to plain boto3, on one S3 server.

Starts its own moto server on loopback, writes one file of random bytes per size, and moves it
``--runs`` times each way:

- agent: ``agent.storage.transfer.upload`` (tar streamed into a multipart upload) and ``fetch``
  (the GET body streamed into tar extraction), default StorageOptions;
- plain: boto3 with its defaults (path-style addressing aside): ``upload_file`` of the same file
  (8 MiB parts, 10 threads, CRC32 checksums), and ``download_file`` as one GET. Not boto3's
  ranged parallel download: moto copies the whole object for every ranged GET, so at 1 GiB that
  measures moto (14 MiB/s here), not boto3. (With ``response_checksum_validation=when_required``,
  as the agent's clients have, ``download_file`` always uses ranged GETs.)

Each side runs in a subprocess of its own, so that its peak RSS is its own: VmHWM, not
ru_maxrss, which Linux carries over from the parent across fork and exec.

Usage: ``python bench/artifacts.py [--sizes 100MiB,1GiB] [--runs 3]``. It prints one table of
medians (MiB/s of payload) to stdout; progress goes to stderr.
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent import __version__
from agent.units import parse_size

BUCKET = "bench"
CREDS = {"access_key": "bench", "secret_access_key": "bench-secret"}
CHUNK = 16 * 2**20


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait()


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"})
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDS["access_key"],
        aws_secret_access_key=CREDS["secret_access_key"],
        config=config,
    )


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for start in range(0, size, CHUNK):
            out.write(os.urandom(min(CHUNK, size - start)))


# -- workers (run in subprocesses) ---------------------------------------------------------------


def agent_worker(endpoint: str, src: Path, work: Path, runs: int) -> dict[str, Any]:
    from agent.request import Artifact, StudioConfig
    from agent.storage.transfer import fetch, upload

    key = "experiments/bench/modeldir.tar"
    host = endpoint.removeprefix("http://")
    art = Artifact(
        key=key, qualified=f"s3://{host}/{BUCKET}/{key}", bucket=BUCKET, mutable=True,
        credentials={"aws": CREDS},
    )  # fmt: skip
    cfg = StudioConfig.model_validate(
        {"storage": {"type": "s3", "endpoint": endpoint, "bucket": BUCKET}}
    )
    up, down = [], []
    for _ in range(runs):
        started = time.monotonic()
        upload("modeldir", art, cfg, src)
        up.append(time.monotonic() - started)
        shutil.rmtree(work, ignore_errors=True)
        started = time.monotonic()
        fetch("modeldir", art, cfg, work, 0)
        down.append(time.monotonic() - started)
    return {"up": up, "down": down}


def plain_worker(endpoint: str, src: Path, work: Path, runs: int) -> dict[str, Any]:
    from boto3.s3.transfer import TransferConfig

    client = s3_client(endpoint)
    one_stream = TransferConfig(multipart_threshold=2**62)
    source = next(src.iterdir())
    up, down = [], []
    for _ in range(runs):
        started = time.monotonic()
        client.upload_file(str(source), BUCKET, "plain/model.bin")
        up.append(time.monotonic() - started)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        started = time.monotonic()
        client.download_file(BUCKET, "plain/model.bin", str(work / "model.bin"), Config=one_stream)
        down.append(time.monotonic() - started)
    return {"up": up, "down": down}


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match[1]) / 1024 if match else float("nan")


def run_worker(args: argparse.Namespace) -> None:
    worker = agent_worker if args.worker == "agent" else plain_worker
    result = worker(args.endpoint, Path(args.src), Path(args.work), args.runs)
    result["maxrss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def measure(kind: str, endpoint: str, src: Path, work: Path, runs: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind, "--endpoint", endpoint]
    command += ["--src", str(src), "--work", str(work), "--runs", str(runs)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr}")
    return dict(json.loads(proc.stdout))


# -- the table ------------------------------------------------------------------------------------


def label(size: int) -> str:
    return f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB"


def rows(size: int, agent: dict[str, Any], plain: dict[str, Any]) -> list[str]:
    mib = size / 2**20
    lines = []
    for direction, name in (("up", "upload"), ("down", "download")):
        a = mib / statistics.median(agent[direction])
        p = mib / statistics.median(plain[direction])
        n = len(agent[direction])
        lines.append(f"{label(size):>8}  {name:<8}  {a:>11.1f}  {p:>11.1f}  {a / p:>11.2f}  {n:>2}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100MiB,1GiB", help="comma-separated, e.g. 100MiB,1GiB")
    parser.add_argument("--runs", type=int, default=3, help="runs per size and direction")
    for hidden in ("--worker", "--endpoint", "--src", "--work"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    sizes = [int(parse_size(s.strip())) for s in args.sizes.split(",")]
    table, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp, moto_server() as endpoint:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        for size in sizes:
            src = Path(tmp) / "src"
            shutil.rmtree(src, ignore_errors=True)
            progress(f"{label(size)}: writing random data")
            write_random(src / "model.bin", size)
            progress(f"{label(size)}: agent, {args.runs} runs")
            agent = measure("agent", endpoint, src, Path(tmp) / "agent", args.runs)
            progress(f"{label(size)}: plain boto3, {args.runs} runs")
            plain = measure("plain", endpoint, src, Path(tmp) / "plain", args.runs)
            table += rows(size, agent, plain)
            peaks.append(
                f"{label(size):>8}  {agent['maxrss_mib']:>9.0f}  {plain['maxrss_mib']:>9.0f}"
            )
    print_table(table, peaks, args.runs)


def print_table(table: list[str], peaks: list[str], runs: int) -> None:
    print(
        f"studio-agent {__version__}: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}; moto server on loopback; median of {runs} runs"
    )
    print(
        f"{'size':>8}  {'':<8}  {'agent MiB/s':>11}  {'plain MiB/s':>11}  {'agent/plain':>11}   n"
    )
    print("\n".join(table))
    print(f"\npeak RSS (MiB)\n{'size':>8}  {'agent':>9}  {'plain':>9}")
    print("\n".join(peaks))


if __name__ == "__main__":
    main()
