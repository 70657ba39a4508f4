"""The GPU inventory: JSON cards, NVML's absence, and the cards the environment lets it manage."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from agent.childenv import gpu_env
from agent.cli import main
from agent.errors import ConfigError
from agent.executors.base import Executor, Launch, RunContext
from agent.experiment import ExperimentRun
from agent.gpus import (
    Card,
    NvmlInventory,
    StaticInventory,
    _nvml_card,
    load_inventory,
    visible_cards,
)
from agent.intake import parse_message
from agent.settings import load_settings

A = Card(
    0, "GPU-aaaa1111-0000-0000-0000-000000000000", "Tesla V100", 16 * 2**30, device="/dev/nvidia0"
)
B = Card(
    1, "GPU-bbbb2222-0000-0000-0000-000000000000", "Tesla V100", 16 * 2**30, device="/dev/nvidia1"
)
C = Card(2, "GPU-bbbb3333-0000-0000-0000-000000000000", "A100", 40 * 2**30, device="/dev/nvidia2")
CARDS = [A, B, C]


def write_inventory(path: Path, *cards: Card) -> Path:
    entries = [{**c.to_json(), "memory": f"{c.memory // 2**30}GiB"} for c in cards]
    path.write_text(json.dumps({"cards": entries}))
    return path


def test_static_inventory_reads_sizes_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(
        json.dumps(
            [
                {"uuid": "GPU-1", "name": "T4", "memory": "16GiB"},
                {"uuid": "GPU-2", "ecc_failed": 1, "device": "/srv/stand-in/nvidia5"},
            ]
        )
    )
    cards = StaticInventory.from_file(path).cards()
    assert cards == [
        Card(0, "GPU-1", "T4", 16 * 2**30, device="/dev/nvidia0"),  # by default, by its index
        Card(1, "GPU-2", "GPU", 0, True, device="/srv/stand-in/nvidia5"),
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('{"cards": [{"uuid": "1234"}]}', "must start with GPU-"),
        ('{"cards": [{"name": "x"}]}', "bad card"),
        ('{"cards": [{"uuid": "GPU-1", "memory": "lots"}]}', "not a size"),
        ("{not json", "cannot read"),
        ('{"cards": 3}', "expected a list"),
    ],
)
def test_bad_inventory_file_names_the_file_and_the_fault(
    tmp_path: Path, text: str, complaint: str
) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=complaint) as caught:
        StaticInventory.from_file(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, CARDS),
        ({"CUDA_VISIBLE_DEVICES": "all"}, CARDS),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),
        ({"CUDA_VISIBLE_DEVICES": "none"}, []),
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, []),
        ({"CUDA_VISIBLE_DEVICES": f"{C.uuid},{A.uuid}"}, [C, A]),  # its order, not NVML's
        ({"CUDA_VISIBLE_DEVICES": "GPU-aaaa"}, [A]),  # a unique prefix is enough
        ({"CUDA_VISIBLE_DEVICES": "bbbb3333"}, [C]),  # the GPU- may be left out
        ({"NVIDIA_VISIBLE_DEVICES": B.uuid}, [B]),  # used when CUDA_VISIBLE_DEVICES is unset
        ({"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "all"}, []),  # CUDA's wins
        ({"CUDA_VISIBLE_DEVICES": f"{A.uuid}, {A.uuid}"}, [A]),
    ],
)
def test_visible_devices_narrow_the_cards(environ: dict[str, str], expected: list[Card]) -> None:
    assert visible_cards(CARDS, environ) == expected


def test_indexes_work_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert visible_cards(CARDS, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [C, A]
    assert "by index: use its UUID" in caplog.text


def test_unknown_and_ambiguous_entries_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        chosen = visible_cards(CARDS, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-ffff,7,1"})
    assert chosen == [B]
    assert "'GPU-bbbb' matches more than one card" in caplog.text
    assert "'GPU-ffff' matches no card" in caplog.text
    assert "'7' matches no card" in caplog.text


def test_load_inventory_applies_the_environment_and_explains_an_empty_list(
    tmp_path: Path,
) -> None:
    path = write_inventory(tmp_path / "gpus.json", A, B)
    assert load_inventory(path, False, {"CUDA_VISIBLE_DEVICES": B.uuid}).cards == (B,)
    none = load_inventory(path, False, {"CUDA_VISIBLE_DEVICES": ""})
    assert none.cards == ()
    assert "CUDA_VISIBLE_DEVICES='' leaves none of the 2 card(s)" in none.problem
    only_cpu = load_inventory(path, True, {})
    assert only_cpu.cards == ()
    assert "cpu_only" in only_cpu.problem


def test_nvml_inventory_is_empty_with_a_reason_or_lists_cards() -> None:
    inventory = NvmlInventory()
    cards = inventory.cards()
    if cards:  # a host with a driver: every card has an identity
        assert all(c.uuid.startswith(("GPU-", "MIG-")) and c.memory > 0 for c in cards)
    else:
        assert "NVML" in inventory.problem or "nvidia-ml-py" in inventory.problem


def test_gpu_env_shows_the_child_exactly_its_cards() -> None:
    assert gpu_env((A.uuid, B.uuid)) == {
        "CUDA_VISIBLE_DEVICES": f"{A.uuid},{B.uuid}",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": f"{A.uuid},{B.uuid}",
    }
    assert gpu_env(()) == {
        "CUDA_VISIBLE_DEVICES": "",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": "void",
    }


class NoExecutor(Executor):
    name = "none"

    def prepare(self, ctx: RunContext, base_env: object) -> Launch:
        raise AssertionError("not used")


def test_the_request_cannot_widen_its_cards_through_config_env(tmp_path: Path) -> None:
    body = {"experiment": {"key": "k"}, "config": {"env": {"CUDA_VISIBLE_DEVICES": "all"}}}
    request = parse_message(json.dumps(body).encode())
    settings = load_settings(None, state_dir=tmp_path, certs_dir=None)
    run = ExperimentRun(request, settings, NoExecutor(), gpus=(B.uuid,))
    assert run.ctx.gpus == (B.uuid,)
    env = run.child_env(Launch(["python"], env={"NVIDIA_VISIBLE_DEVICES": "all"}))
    assert (env["CUDA_VISIBLE_DEVICES"], env["NVIDIA_VISIBLE_DEVICES"]) == (B.uuid, B.uuid)
    cpu_run = ExperimentRun(request, settings, NoExecutor())
    assert cpu_run.child_env(Launch(["python"]))["CUDA_VISIBLE_DEVICES"] == ""


def test_gpus_command_lists_cards_and_holders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "all")  # whatever the host running the tests says
    inventory = write_inventory(tmp_path / "gpus.json", A, B)
    state = tmp_path / "state"
    state.mkdir()
    assignments = [{"key": "exp-1", "gpus": [B.uuid], "cpus": 1, "ram": 0}]
    (state / "status.json").write_text(json.dumps({"resources": {"assignments": assignments}}))
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {state}\ngpu_inventory_file: {inventory}\ncerts_dir: null\n")
    assert main(["gpus", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"#0 {A.uuid} Tesla V100 16.0 GiB")
    assert lines[0].endswith("free")
    assert lines[1].endswith("assigned to exp-1")
    assert main(["gpus", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [c["assigned_to"] for c in shown["gpus"]] == [None, "exp-1"]


def test_gpus_command_without_a_gpu_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {tmp_path}\ncpu_only: true\ncerts_dir: null\n")
    assert main(["gpus", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "no GPU: cpu_only is set: GPUs are not used\n"


class FakeNvml:
    """NVML as a driver would answer (none here): the real bindings' error classes and constants."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC

    def __init__(self, ecc: int | None, pending: int | None):
        self.ecc, self.pending = ecc, pending

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return b"GPU-1234"  # old bindings return bytes

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Tesla T4"

    def nvmlDeviceGetMinorNumber(self, handle: int) -> int:
        return handle + 4  # /dev/nvidia<minor>, which need not be the index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=16 * 2**30)

    def nvmlDeviceGetTotalEccErrors(self, handle: int, kind: int, counter: int) -> int:
        if self.ecc is None:
            raise pynvml.NVMLError_NotSupported()
        return self.ecc

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        if self.pending is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
        return self.pending


@pytest.mark.parametrize(
    ("ecc", "pending", "failed"),
    [(None, None, False), (0, 0, False), (2, 0, True), (0, 1, True), (None, 1, True)],
)
def test_nvml_card_reads_ecc_tolerantly(ecc: int | None, pending: int | None, failed: bool) -> None:
    card = _nvml_card(FakeNvml(ecc, pending), 3)
    assert card == Card(3, "GPU-1234", "Tesla T4", 16 * 2**30, failed, device="/dev/nvidia7")
