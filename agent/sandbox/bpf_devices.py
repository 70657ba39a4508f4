"""Fence which device nodes the processes of a cgroup v2 subtree may open.

cgroup v2 has no ``devices`` controller; the kernel instead runs BPF_PROG_TYPE_CGROUP_DEVICE
programs attached to the cgroup (and to its ancestors) on every open(2) and mknod(2) of a device
node. This is what systemd's DeviceAllow= does; we do the same with the bpf(2) syscall through
ctypes, with no libbpf, by assembling the handful of eBPF instructions by hand.

We attach with BPF_F_ALLOW_MULTI, so our program runs *in addition to* whatever systemd attached
to the cgroups above: the kernel allows an access only when every program on the path allows it,
so a child fence can only narrow what its parents allow, never widen it.
"""

import ctypes
import errno
import functools
import os
import platform
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# ("c" or "b", major or None for any, minor or None for any).
DeviceRule = tuple[str, int | None, int | None]

# More rules than any sandbox needs; the bound keeps the program (5 instructions a rule at most)
# far inside the verifier's limits and the 16-bit jump offsets.
MAX_RULES = 256
# The kernel's dev_t: 12 bits of major, 20 of minor (include/linux/kdev_t.h).
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1

# include/uapi/linux/bpf.h
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 1 << 1
_DEVICE_TYPES = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR

# eBPF opcodes (include/uapi/linux/bpf_common.h + bpf.h), spelled out once.
_LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
_ALU64_AND_K = 0x57  # BPF_ALU64 | BPF_AND | BPF_K: dst &= imm
_ALU64_MOV_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
_JMP_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K: if dst != imm: pc += off
_JMP_EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0

# Offsets into struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }.
_CTX_ACCESS_TYPE = 0
_CTX_MAJOR = 4
_CTX_MINOR = 8

# bpf(2) has no libc wrapper, so we go through syscall(2) with the architecture's number.
_SYS_BPF = {
    "x86_64": 321,
    "amd64": 321,
    "i386": 357,
    "i686": 357,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "armv7l": 386,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
}

_LICENSE = b"GPL\0"
# The name `bpftool cgroup tree` shows: at most 15 characters of [A-Za-z0-9_.].
_PROG_NAME = b"studio_devices"
# Room for the verifier's complaint about a program this small, with a wide margin.
_LOG_SIZE = 1 << 20


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One struct bpf_insn; the register nibbles follow the C bitfield order of the host."""
    regs = (dst | src << 4) if sys.byteorder == "little" else (dst << 4 | src)
    return struct.pack("=BBhi", code, regs, off, imm)


def _validate(allowed: Sequence[DeviceRule]) -> list[DeviceRule]:
    if isinstance(allowed, str | bytes) or len(allowed) > MAX_RULES:
        raise ValueError(f"allowed must be a sequence of at most {MAX_RULES} device rules")
    rules: list[DeviceRule] = []
    for rule in allowed:
        if not isinstance(rule, tuple) or len(rule) != 3:
            raise ValueError(f"device rule {rule!r} is not a (type, major, minor) tuple")
        kind, major, minor = rule
        if kind not in _DEVICE_TYPES:
            raise ValueError(f"device rule {rule!r}: type must be 'c' or 'b'")
        for name, value, limit in (("major", major, MAX_MAJOR), ("minor", minor, MAX_MINOR)):
            # bool is an int subclass; True as a major number is a bug, not a device.
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit
            ):
                raise ValueError(f"device rule {rule!r}: {name} must be None or 0..{limit}")
        rules.append(rule)
    # Duplicates change nothing but the program's length.
    return list(dict.fromkeys(rules))


def _assemble(rules: Sequence[DeviceRule]) -> bytes:
    """The filter: return 1 (allow) for the first rule the device matches, else 0 (deny).

    Every access (mknod, read, write) is allowed for a listed device, so the high 16 bits of
    access_type are never looked at.
    """
    insns = [
        _insn(_LDX_MEM_W, dst=2, src=1, off=_CTX_ACCESS_TYPE),
        _insn(_ALU64_AND_K, dst=2, imm=0xFFFF),  # r2 = device type
        _insn(_LDX_MEM_W, dst=3, src=1, off=_CTX_MAJOR),  # r3 = major
        _insn(_LDX_MEM_W, dst=4, src=1, off=_CTX_MINOR),  # r4 = minor
    ]
    for kind, major, minor in rules:
        tests = [(2, _DEVICE_TYPES[kind])]
        if major is not None:
            tests.append((3, major))
        if minor is not None:
            tests.append((4, minor))
        # Each mismatch jumps past the rest of this rule: its later tests and its mov + exit.
        for index, (reg, value) in enumerate(tests):
            insns.append(_insn(_JMP_JNE_K, dst=reg, off=len(tests) - index - 1 + 2, imm=value))
        insns.append(_insn(_ALU64_MOV_K, dst=0, imm=1))
        insns.append(_insn(_JMP_EXIT))
    insns.append(_insn(_ALU64_MOV_K, dst=0, imm=0))
    insns.append(_insn(_JMP_EXIT))
    return b"".join(insns)


@functools.cache
def _syscall() -> Callable[..., int]:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(f"bpf(2): unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    func = libc.syscall
    func.restype = ctypes.c_long
    func.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
    return functools.partial(func, number)


def _bpf(cmd: int, attr: bytes) -> int:
    """Call bpf(2); return its result or raise OSError(errno) with the bare strerror."""
    buf = ctypes.create_string_buffer(attr, len(attr))
    result: int = _syscall()(cmd, buf, len(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _prog_load(insns: bytes, log: ctypes.Array[ctypes.c_char] | None) -> int:
    """BPF_PROG_LOAD; union bpf_attr up to expected_attach_type (72 bytes, no padding).

    The buffers the attr points into are locals here, so they outlive the syscall.
    """
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(_LICENSE, len(_LICENSE))
    attr = struct.pack(
        "=IIQQIIQII16sII",
        _BPF_PROG_TYPE_CGROUP_DEVICE,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(license_),
        1 if log is not None else 0,  # log_level
        len(log) if log is not None else 0,
        ctypes.addressof(log) if log is not None else 0,
        0,  # kern_version: only kprobes look at it
        0,  # prog_flags
        _PROG_NAME,
        0,  # prog_ifindex
        _BPF_CGROUP_DEVICE,  # expected_attach_type, as libbpf sets for "cgroup/dev"
    )
    return _bpf(_BPF_PROG_LOAD, attr)


def _load(insns: bytes) -> int:
    """Load the program and return its fd; OSError carries the verifier's log on rejection."""
    try:
        return _prog_load(insns, None)
    except OSError as first:
        failure = first
    refused = f"bpf(BPF_PROG_LOAD) of a cgroup device program was refused: {failure.strerror}"
    # EPERM is a capability question, which the verifier has no say in. The kernel counts this
    # type as a networking one (is_net_admin_prog_type), hence CAP_NET_ADMIN next to CAP_BPF.
    if failure.errno == errno.EPERM:
        raise OSError(
            failure.errno, f"{refused}; it needs CAP_SYS_ADMIN, or CAP_BPF with CAP_NET_ADMIN"
        )
    # Load again with the log on only now: a successful load should not pay for a 1 MiB buffer,
    # and older kernels fail a load whose log overflows even when the program is fine.
    log = ctypes.create_string_buffer(_LOG_SIZE)
    try:
        return _prog_load(insns, log)  # It passed the second time: a transient failure.
    except OSError:
        pass
    text = log.value.decode(errors="replace").strip() or "(the verifier left no log)"
    raise OSError(failure.errno, f"{refused}; verifier log:\n{text}")


def _attach(cgroup_dir: Path, prog_fd: int) -> None:
    dir_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # BPF_PROG_ATTACH: target_fd, attach_bpf_fd, attach_type, attach_flags.
        attr = struct.pack("=IIII", dir_fd, prog_fd, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI)
        _bpf(_BPF_PROG_ATTACH, attr)
    except OSError as error:
        # Since Linux 6.5 attaching checks no capability (holding the program fd is the right);
        # older kernels with kernel.unprivileged_bpf_disabled set want CAP_BPF for any bpf(2).
        hints = {
            errno.EPERM: "this cgroup or an ancestor holds a device program attached without "
            "BPF_F_ALLOW_MULTI (or, before Linux 6.5, this process lacks CAP_BPF)",
            errno.EBADF: "it is not a cgroup v2 directory",
            errno.E2BIG: "the cgroup already holds the kernel's limit of 64 device programs",
            errno.EINVAL: "the kernel does not support BPF_CGROUP_DEVICE with BPF_F_ALLOW_MULTI",
        }
        hint = hints.get(error.errno or 0, "")
        raise OSError(
            error.errno,
            f"bpf(BPF_PROG_ATTACH) of a device filter to {cgroup_dir} was refused: "
            f"{error.strerror}" + (f"; {hint}" if hint else ""),
        ) from None
    finally:
        os.close(dir_fd)


def attach_device_filter(cgroup_dir: Path, allowed: Sequence[DeviceRule]) -> None:
    """Only the listed devices (any access: read, write, mknod) may be opened from cgroup_dir and
    below; raise OSError (with errno and a clear message) when the kernel refuses.

    Raises ValueError for a malformed rule or more than MAX_RULES of them. The filter lasts as
    long as the cgroup: the attachment holds the program, so its fd is closed here.
    """
    insns = _assemble(_validate(allowed))
    prog_fd = _load(insns)
    try:
        _attach(cgroup_dir, prog_fd)
    finally:
        os.close(prog_fd)


def supported() -> bool:
    """Can this process load a cgroup device program at all? Never raises.

    Loads (and closes) a trivial allow-all program: this checks the kernel and the load
    capability, not the right to attach to any particular cgroup.
    """
    try:
        os.close(_load(_insn(_ALU64_MOV_K, dst=0, imm=1) + _insn(_JMP_EXIT)))
    except Exception:
        return False
    return True
