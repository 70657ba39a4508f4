"""Which device nodes a run may open: the basics every program needs, its own cards, nothing else.

``CUDA_VISIBLE_DEVICES`` only tells CUDA which cards to use; the fence is the device cgroup
(v1) or a BPF device program (v2), given these rules. A card's node is found by its path
(``/dev/nvidia<minor>``), so stand-in nodes made with mknod prove the fence where no GPU is.
"""

import glob
import os
import stat
from collections.abc import Iterable, Sequence

DeviceRule = tuple[str, int | None, int | None]  # ("c" or "b", major or None, minor or None)

# /dev/null, zero, full, random, urandom; tty, ptmx and every pseudo-terminal (what systemd's
# DevicePolicy=closed keeps); fuse, and the loop devices with loop-control, which Apptainer
# mounts images with (unprivileged: squashfuse; as root or setuid: a loop device). A slot user
# cannot open a loop device anyway (root:disk 0660); the fence is for the cards.
BASIC: tuple[DeviceRule, ...] = (
    ("c", 1, 3),
    ("c", 1, 5),
    ("c", 1, 7),
    ("c", 1, 8),
    ("c", 1, 9),
    ("c", 5, 0),
    ("c", 5, 2),
    ("c", 136, None),
    ("c", 10, 229),
    ("b", 7, None),
    ("c", 10, 237),
)
# The driver's control nodes: every CUDA process opens them, whichever card it uses.
NVIDIA_CONTROL = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
    "/dev/nvidia-caps/*",
)


def rule_for(path: str) -> DeviceRule | None:
    """The rule that allows the node at ``path``; None when it is not a device node."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        return None
    return (kind, os.major(info.st_rdev), os.minor(info.st_rdev))


def rules(
    cards: Sequence[str], extra: Iterable[str] = (), control: Iterable[str] = NVIDIA_CONTROL
) -> tuple[DeviceRule, ...]:
    """BASIC, the control nodes and ``extra`` globs that exist, and the nodes of ``cards``."""
    found: list[DeviceRule] = list(BASIC)
    patterns = [*control, *extra]
    paths = [p for pattern in patterns for p in sorted(glob.glob(pattern))] + list(cards)
    for path in paths:
        rule = rule_for(path)
        if rule is not None and rule not in found:
            found.append(rule)
    return tuple(found)
