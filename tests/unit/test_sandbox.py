"""The sandbox's decisions that need no kernel: limits from a request, files per hierarchy,
how /proc describes cgroups, slot users, the child's command line and environment.
(What the kernel then does with them: tests/integration/test_sandbox.py.)"""

import os
from pathlib import Path

import pytest

from agent import childenv
from agent.errors import ConfigError, TransientError
from agent.sandbox import JOIN, Confinement, Policy, Sandbox
from agent.sandbox.cgroups import Limits, RunCgroup, _mounts, _own_paths, v1_files, v2_files
from agent.sandbox.devices import BASIC, rules
from agent.sandbox.identity import Slot, SlotPool, discover_slots, missing_capabilities

MiB = 1 << 20

# /proc/self/mountinfo lines as the kernel writes them: a pure v2 host, then this hybrid one.
V2_MOUNTINFO = (
    "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
HYBRID_MOUNTINFO = (
    "31 24 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    "33 24 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "34 24 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 24 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
    "36 24 0:33 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n"
)


def test_mountinfo_yields_every_cgroup_mount_with_its_controllers() -> None:
    assert _mounts(V2_MOUNTINFO) == [
        ("/sys/fs/cgroup", "cgroup2", {"rw", "nsdelegate", "memory_recursiveprot"})
    ]
    mounts = {point: (kind, opts) for point, kind, opts in _mounts(HYBRID_MOUNTINFO)}
    assert mounts["/sys/fs/cgroup/cpu,cpuacct"] == ("cgroup", {"rw", "cpu", "cpuacct"})
    assert mounts["/sys/fs/cgroup/unified"][0] == "cgroup2"


def test_proc_cgroup_gives_each_controller_its_path() -> None:
    text = "4:memory:/process_api/x\n1:cpu,cpuacct:/\n9:name=systemd:/svc\n0::/svc\n"
    assert _own_paths(text) == {
        "memory": "/process_api/x",
        "cpu": "/",
        "cpuacct": "/",
        "systemd": "/svc",
        "": "/svc",
    }


def test_limits_follow_the_request_with_the_operators_factor_and_floor() -> None:
    policy = Policy(memory_factor=1.5, memory_floor=256 * MiB, max_tasks=512, cpu_quota=True)
    limits = policy.limits(ram=1024 * MiB, cpus=2, cards=())
    assert (limits.memory, limits.tasks, limits.cpu_weight, limits.cpu_quota) == (
        1536 * MiB,
        512,
        2.0,
        2.0,
    )
    assert policy.limits(ram=10 * MiB, cpus=0, cards=()).memory == 256 * MiB  # the floor
    assert policy.limits(ram=0, cpus=0, cards=()).memory is None  # no ram, no max_mem: none
    assert Policy(memory_default=8 << 30).limits(0, 0, ()).memory == 8 << 30  # max_mem
    assert Policy(cpu_quota=False).limits(0, 4, ()).cpu_quota is None  # a share only
    assert policy.limits(0, 0, ()).devices == rules(())  # the fence is there without a card


def test_v2_files_forbid_swap_and_kill_the_whole_group_on_oom() -> None:
    limits = Limits(memory=64 * MiB, tasks=100, cpu_weight=2, cpu_quota=1.5)
    assert v2_files(limits, {"memory", "pids", "cpu"}) == {
        "memory.max": str(64 * MiB),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "100",
        "cpu.weight": "200",
        "cpu.max": "150000 100000",
    }
    assert v2_files(limits, {"pids"}) == {"pids.max": "100"}  # only what the host delegates


def test_v1_files_write_the_device_allow_list_after_denying_all() -> None:
    limits = Limits(memory=64 * MiB, cpu_weight=0.5, devices=(("c", 195, 0), ("c", 136, None)))
    assert v1_files("memory", limits) == [
        ("memory.limit_in_bytes", str(64 * MiB)),
        ("memory.memsw.limit_in_bytes", str(64 * MiB)),
    ]
    assert v1_files("cpu", limits) == [("cpu.shares", "512")]
    assert v1_files("devices", limits) == [
        ("devices.deny", "a"),
        ("devices.allow", "c 195:0 rwm"),
        ("devices.allow", "c 136:* rwm"),
    ]
    assert v1_files("devices", Limits()) == []  # no fence asked: the hierarchy is left alone


def test_device_rules_are_the_basics_the_present_control_nodes_and_the_cards() -> None:
    found = rules(["/dev/null", "/nonexistent/nvidia3"], control=["/dev/zero", "/dev/no-such-*"])
    assert found[: len(BASIC)] == BASIC
    assert found[len(BASIC) :] == ()  # /dev/null and /dev/zero are basics; absent nodes add none


def test_a_recorded_cgroup_must_name_run_directories_only() -> None:
    record = {"unified": "/sys/fs/cgroup/x/studio-exp-1", "v1": {"pids": "/p/studio-exp-1"}}
    group = RunCgroup.from_record("1", record)
    assert group is not None
    assert group.procs_files == [
        Path("/sys/fs/cgroup/x/studio-exp-1/cgroup.procs"),
        Path("/p/studio-exp-1/cgroup.procs"),
    ]
    # A tampered record must not make the next agent kill the agent's own cgroup.
    assert RunCgroup.from_record("1", {"unified": "/sys/fs/cgroup/system.slice"}) is None
    assert RunCgroup.from_record("1", ["not", "a", "record"]) is None


def test_the_child_drops_every_capability_before_it_execs() -> None:
    argv = Slot("61184", 61184, 61184, named=False).command(["python3", "train.py"])
    assert argv[1:] == [
        "--reuid=61184",
        "--regid=61184",
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--no-new-privs",
        "--",
        "python3",
        "train.py",
    ]
    assert Path(argv[0]).name == "setpriv"
    assert "--init-groups" in Slot("studio-slot0", 1001, 1001, named=True).command(["x"])


def test_a_confined_command_joins_its_cgroups_before_the_identity_changes() -> None:
    group = RunCgroup(
        "r", Path("/cg/unified/studio-exp-r"), {"pids": Path("/cg/pids/studio-exp-r")}
    )
    slot = Slot("61184", 61184, 61184, named=False)
    argv = Confinement(Path("/run/tmp"), slot, group).command(["python3"])
    assert argv[:4] == ["/bin/sh", "-c", JOIN, "studio-join"]
    assert argv[4:7] == [
        "/cg/unified/studio-exp-r/cgroup.procs",
        "/cg/pids/studio-exp-r/cgroup.procs",
        "--",
    ]
    assert argv[7:] == slot.command(["python3"])
    assert Confinement(Path("/run/tmp")).command(["python3"]) == ["python3"]  # isolation off


def test_slot_users_are_never_root_or_the_agent_and_never_shared() -> None:
    assert [s.uid for s in discover_slots(["61184", "61185:61190"])] == [61184, 61185]
    assert discover_slots(["61185:61190"])[0].gid == 61190
    with pytest.raises(ConfigError, match="root or the agent"):
        discover_slots(["0"])
    with pytest.raises(ConfigError, match="root or the agent"):
        discover_slots([str(os.getuid())])
    with pytest.raises(ConfigError, match="share a uid"):
        discover_slots(["61184", "61184:61185"])
    with pytest.raises(ConfigError, match="no such user 'nobody-here'"):
        discover_slots(["nobody-here"])


def test_a_pool_hands_each_slot_to_one_run_at_a_time() -> None:
    pool = SlotPool(discover_slots(["61184", "61185"]))
    first, second = pool.take(), pool.take()
    assert first.uid != second.uid
    with pytest.raises(TransientError, match="every slot user is busy"):
        pool.take()
    pool.give_back(first)
    assert pool.take() == first


def test_missing_capabilities_are_read_from_the_effective_set() -> None:
    assert missing_capabilities("CapEff:\t000001ffffffffff\n") == []
    missing = missing_capabilities("CapEff:\t00000000000000c0\n")  # SETUID and SETGID only
    assert missing == ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL"]


def test_isolation_off_says_so_for_every_protection() -> None:
    sandbox = Sandbox.off("isolation is off in the configuration")
    assert set(sandbox.protections()) == {"identity", "memory", "tasks", "cpu", "devices", "tree"}
    assert all(sandbox.protections().values())
    assert sandbox.describe().startswith("not enforced: identity (isolation is off")


def test_a_child_sees_only_the_allow_list_and_its_own_home() -> None:
    agent = {
        "PATH": "/usr/bin",
        "HOME": "/var/lib/studio-agent",
        "USER": "studio-agent",
        "LANG": "C.UTF-8",
        "AMQP_URL": "amqp://u:secret@host/",
        "SLACK_HOOK": "https://hooks.example/secret",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "UV_INDEX_URL": "https://mirror.example/simple",
        "PIP_INDEX_URL": "https://mirror.example/simple",
        "SEED": "7",
    }
    confined = childenv.base_env(["SEED"], Path("/run/tmp"), Path("/run/tmp"), agent)
    assert confined == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "SEED": "7",
        "TMPDIR": "/run/tmp",
        "HOME": "/run/tmp",  # not the agent's home, and no USER that names the agent
    }
    unconfined = childenv.base_env([], Path("/run/tmp"), None, agent)
    assert (unconfined["HOME"], unconfined["USER"]) == ("/var/lib/studio-agent", "studio-agent")
    installer = childenv.installer_env([], Path("/run/tmp"), Path("/run/tmp"), agent)
    assert (
        installer["UV_INDEX_URL"] == installer["PIP_INDEX_URL"] == "https://mirror.example/simple"
    )
    for secret in ("AMQP_URL", "SLACK_HOOK", "AWS_SECRET_ACCESS_KEY"):
        assert secret not in confined
        assert secret not in installer


def test_the_loaders_variables_reach_the_child_only_after_it_drops_its_privileges() -> None:
    slot = Slot("61184", 61184, 61184, named=False)
    env = {"PATH": "/usr/bin", "LD_PRELOAD": "/run/evil.so", "GCONV_PATH": "/x", "SEED": "1"}
    argv, outer = Confinement(Path("/run/tmp"), slot).launch(["python3"], env)
    assert outer == {"PATH": "/usr/bin", "SEED": "1"}  # what setpriv, as the agent, starts with
    dropped = argv.index("--", argv.index("--no-new-privs"))
    assert Path(argv[dropped + 1]).name == "env"  # run as the slot, it sets the rest
    assert argv[dropped + 2 :] == ["--", "LD_PRELOAD=/run/evil.so", "GCONV_PATH=/x", "python3"]
    # Without a slot the child is the agent already: nothing to gain, nothing moved.
    assert Confinement(Path("/run/tmp")).launch(["python3"], env) == (["python3"], env)
    assert childenv.split_for_privileged({"MALLOC_CHECK_": "3", "TZ": "UTC"}) == (
        {"TZ": "UTC"},
        {"MALLOC_CHECK_": "3"},
    )
