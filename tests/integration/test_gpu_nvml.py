"""On a host with an NVIDIA driver: the real NVML inventory, and an experiment that sees exactly
the card it was given (asked of the CUDA driver itself, from inside the experiment), while a
CPU-only experiment sees none. Skipped, with NVML's reason, where there is no GPU."""

import json
import os
import tarfile
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.gpus import load_inventory
from agent.queues.local import enqueue
from agent.submit import Submission, prepare
from tests.conftest import AgentProcess, Layout, wait_until, write_workspace

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

# Asks libcuda which devices this process can see; prints one JSON line.
ASK_CUDA = """
import ctypes, json, os
seen = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "devices": []}
cuda = ctypes.CDLL("libcuda.so.1")
seen["cuInit"] = cuda.cuInit(0)  # 100, CUDA_ERROR_NO_DEVICE, when it may see none
count = ctypes.c_int(0)
if seen["cuInit"] == 0:
    cuda.cuDeviceGetCount(ctypes.byref(count))
for ordinal in range(count.value):
    device, raw = ctypes.c_int(), ctypes.create_string_buffer(16)
    cuda.cuDeviceGet(ctypes.byref(device), ordinal)
    cuda.cuDeviceGetUuid(raw, device)
    h = raw.raw.hex()
    seen["devices"].append(f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
print("CUDA " + json.dumps(seen), flush=True)
"""


@pytest.fixture(scope="module")
def nvml_uuids() -> list[str]:
    inventory = load_inventory(None, False, os.environ)
    if not inventory.cards:
        pytest.skip(f"no NVIDIA GPU usable here: {inventory.problem}")
    return [card.uuid for card in inventory.cards]


def submit_asking_cuda(lay: Layout, resources: dict[str, Any]) -> str:
    workspace = write_workspace(lay.root / f"ws-{time.monotonic_ns()}", ASK_CUDA)
    sub = Submission(workspace, "train.py", [], "local_gpu", lay.queue_root, lay.storage)
    message = prepare(sub)
    message["experiment"]["resources_needed"].update(resources)
    enqueue(lay.queue_root, "local_gpu", json.dumps(message).encode())
    return sub.key


def finished(lay: Layout, key: str) -> bool:
    record = lay.storage / "meta" / "experiments" / key
    return record.exists() and json.loads(record.read_text()).get("status") == "finished"


def cuda_seen(lay: Layout, key: str) -> dict[str, Any]:
    with tarfile.open(lay.results(key) / "output.tar") as tar:
        member = tar.extractfile("output")
        assert member is not None
        text = member.read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("CUDA "))
    result: dict[str, Any] = json.loads(line[5:])
    return result


def test_an_experiment_sees_exactly_its_card(
    nvml_uuids: list[str],
    layout: Callable[..., Layout],
    start_agent: Callable[..., AgentProcess],
) -> None:
    lay = layout()
    with_gpu = submit_asking_cuda(lay, {"gpus": 1, "cpus": 0})
    without = submit_asking_cuda(lay, {"gpus": 0, "cpus": 0})
    agent = start_agent(lay)
    agent.wait_for_log("GPUs: #")
    wait_until(lambda: finished(lay, with_gpu) and finished(lay, without), timeout=180)
    assert agent.stop() == 0
    given = cuda_seen(lay, with_gpu)
    assert given["CUDA_VISIBLE_DEVICES"] in nvml_uuids
    assert given["cuInit"] == 0
    assert given["devices"] == [given["CUDA_VISIBLE_DEVICES"]]
    none = cuda_seen(lay, without)
    assert none["CUDA_VISIBLE_DEVICES"] == ""
    assert none["devices"] == []
    assert none["cuInit"] != 0
