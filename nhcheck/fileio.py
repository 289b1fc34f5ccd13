"""Reading tensor bytes from a shard: exactly the bytes its header declares, or one clear error.

``os.preadv`` may return fewer bytes than asked (a signal, a network file system) and returns 0 at
the end of the file; a file shorter than its header says is a checkpoint problem, reported as one
line naming the file, never a traceback. Every reader of tensor data (load, TP load, value checks,
prune's verification) goes through here; and how many threads may do it at once (``usable_cores``). Must not
import torch.
"""

from __future__ import annotations

import math
import os

from nhcheck.errors import CheckpointError

#: What the error says when the file ends early (``{offset}``: the byte where it ended).
ENDS_EARLY = "file ends at byte {offset}, inside tensor data its header declares"


def read_into(fd: int, path: str, view: memoryview, offset: int, short: str = ENDS_EARLY) -> None:
    """Fill ``view`` with the file bytes from ``offset``; a short file raises ``CheckpointError(path, short)``."""
    size = len(view)
    got = 0
    while got < size:
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as exc:
            raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
        if n == 0:
            raise CheckpointError(path, short.format(offset=offset + got))
        got += n


def read_exact(fd: int, path: str, offset: int, size: int, short: str = ENDS_EARLY) -> bytes:
    """``size`` bytes of the file from ``offset`` (see ``read_into``)."""
    try:
        data = os.pread(fd, size, offset)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) == size:
        return data
    buf = bytearray(size)
    buf[: len(data)] = data
    read_into(fd, path, memoryview(buf)[len(data) :], offset + len(data), short)
    return bytes(buf)


#: Where the kernel says how much CPU time the process's cgroup may take: v2's ``cpu.max`` ("QUOTA PERIOD" or
#: "max PERIOD"), else v1's quota and period files (quota -1: no limit); microseconds.
_CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
_CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def usable_cores() -> int:
    """The cores this process may run on (its affinity), but no more than its cgroup's CPU quota buys: a container
    limited to 8 CPUs on a 128-core host is an 8-core machine to its threads. What sizes every pool of threads that
    read or write tensor bytes (the load's readers, prefetch and ring pinning, the TP load's lanes, prune's files at
    once): ``os.cpu_count`` counts the host's cores, and more threads than usable cores slowed a load (H100 host held
    to 8 cores, 2026-12-07: 16 readers 18.2-23.0 GB/s against 8 readers' 21.6-25.0)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1

    def text(path: str) -> str:
        with open(path) as fh:
            return fh.read()

    try:
        quota, period = text(_CGROUP_V2).split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = (text(path).strip() for path in _CGROUP_V1)
        except (OSError, ValueError):
            return cores
    try:
        limit = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):  # "max": no limit
        return cores
    return max(1, min(cores, math.ceil(limit))) if limit > 0 else cores
