"""Reading tensor bytes from a shard: exactly the bytes its header declares, or one clear error.

``os.preadv`` may return fewer bytes than asked (a signal, a network file system) and returns 0 at
the end of the file; a file shorter than its header says is a checkpoint problem, reported as one
line naming the file, never a traceback. Every reader of tensor data (load, TP load, value checks,
prune's verification) goes through here. Must not import torch.
"""

from __future__ import annotations

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
