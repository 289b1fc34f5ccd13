"""Reading tensor bytes from a shard: exactly the bytes its header declares, or one clear error.

``os.preadv`` may return fewer bytes than asked (a signal, a network file system) and returns 0 at
the end of the file; a file shorter than its header says is a checkpoint problem, reported as one
line naming the file, never a traceback. Every reader of tensor data (load, TP load, value checks,
prune's verification) goes through here. Must not import torch.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any

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


class _Sigevent(ctypes.Structure):
    """``struct sigevent`` (64 bytes on Linux): only ``notify`` is set (``SIGEV_NONE``: completion is polled)."""

    _fields_ = [
        ("value", ctypes.c_void_p),
        ("signo", ctypes.c_int),
        ("notify", ctypes.c_int),
        ("rest", ctypes.c_byte * 48),
    ]


class _Aiocb(ctypes.Structure):
    """glibc's ``struct aiocb`` on 64-bit Linux (168 bytes; musl's differs, so glibc only: ``AsyncReads.open``)."""

    _fields_ = [
        ("fildes", ctypes.c_int),
        ("lio_opcode", ctypes.c_int),
        ("reqprio", ctypes.c_int),
        ("buf", ctypes.c_void_p),
        ("nbytes", ctypes.c_size_t),
        ("sigevent", _Sigevent),
        ("next_prio", ctypes.c_void_p),
        ("abs_prio", ctypes.c_int),
        ("policy", ctypes.c_int),
        ("error_code", ctypes.c_int),
        ("return_value", ctypes.c_ssize_t),
        ("offset", ctypes.c_int64),
        ("reserved", ctypes.c_char * 32),
    ]


class _Aioinit(ctypes.Structure):
    """glibc's ``struct aioinit``: its thread pool's limits, set once before the first request (``aio_init``)."""

    _fields_ = [
        (name, ctypes.c_int)
        for name in ("threads", "num", "locks", "usedba", "debug", "numusers", "idle_time", "reserved")
    ]


#: glibc's AIO threads at most (its default is 20: more lanes than that would queue behind one another).
MAX_LANES = 64


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


_SIGEV_NONE = 1
#: Whether ``aio_init`` ran in this process (it counts only before glibc's first request).
_INIT: list[bool] = []


class AsyncReads:
    """Reads that run on the C library's threads (glibc's POSIX AIO), so the reading needs no Python thread.

    Each of ``lanes`` reads in flight reads through a duplicate of its file descriptor of its own: glibc runs
    the requests of one descriptor one after another on one thread. A Python thread blocked in ``os.preadv``
    must take the interpreter back for every piece it reads; with 16 of them the thread that parses, audits
    and plans waits its turn again and again (``nhcheck.load.readers``). Here one thread submits the reads and
    waits for them (``wait`` gives the interpreter away) and the copies themselves run on glibc's threads.
    """

    def __init__(self, lib: Any, lanes: int) -> None:
        py = ctypes.PyDLL(lib._name, use_errno=True)  # quick calls that keep the interpreter
        self._read, self._error, self._return = py.aio_read, py.aio_error, py.aio_return
        self._read.argtypes = self._error.argtypes = self._return.argtypes = [ctypes.c_void_p]
        self._return.restype = ctypes.c_ssize_t
        self._suspend = lib.aio_suspend  # CDLL: the interpreter is given away while it waits
        self._suspend.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self.lanes = lanes
        self._cbs = [_Aiocb() for _ in range(lanes)]
        self._addr = [ctypes.addressof(c) for c in self._cbs]
        self._list = (ctypes.c_void_p * lanes)()  # the lanes in flight, None elsewhere (aio_suspend skips them)
        self._dups: dict[tuple[int, int], int] = {}

    @staticmethod
    def open(lanes: int) -> AsyncReads | None:
        """``lanes`` lanes, or None where the C library is not glibc on 64-bit Linux (the caller then reads
        in threads of its own)."""
        try:
            libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (ValueError, OSError, AttributeError):
            return None
        if not sys.platform.startswith("linux") or not libc.startswith("glibc") or ctypes.sizeof(ctypes.c_void_p) != 8:
            return None
        for name in (None, "librt.so.1"):  # glibc 2.34 moved POSIX AIO from librt into libc
            try:
                lib = ctypes.CDLL(name)
                lib.aio_read, lib.aio_suspend, lib.aio_init  # noqa: B018 - present or AttributeError
            except (OSError, AttributeError):
                continue
            if not _INIT:
                lib.aio_init(ctypes.byref(_Aioinit(threads=MAX_LANES, num=MAX_LANES, idle_time=1)))
                _INIT.append(True)
            return AsyncReads(lib, min(lanes, MAX_LANES))
        return None

    def submit(self, lane: int, fd: int, address: int, size: int, offset: int) -> None:
        """Read ``size`` bytes of ``fd`` from ``offset`` into memory at ``address`` (kept alive by the caller until
        the lane is done) on lane ``lane`` (idle)."""
        dup = self._dups.get((lane, fd))
        if dup is None:
            dup = self._dups[(lane, fd)] = os.dup(fd)
        cb = self._cbs[lane]
        ctypes.memset(self._addr[lane], 0, ctypes.sizeof(_Aiocb))
        cb.fildes, cb.buf, cb.nbytes, cb.offset = dup, address, size, offset
        cb.sigevent.notify = _SIGEV_NONE
        if self._read(self._addr[lane]) != 0:
            err = ctypes.get_errno() or errno.EAGAIN
            raise OSError(err, os.strerror(err))
        self._list[lane] = self._addr[lane]

    def wait(self, timeout: float | None = None) -> list[int]:
        """The lanes whose read is done (their ``result`` ready) once one is, or ``timeout`` seconds pass;
        the interpreter is free meanwhile."""
        if any(self._list):
            ts = None
            if timeout is not None:
                ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
            self._suspend(self._list, self.lanes, ctypes.byref(ts) if ts is not None else None)
        return [lane for lane, a in enumerate(self._list) if a and self._error(a) != errno.EINPROGRESS]

    def result(self, lane: int) -> int:
        """The bytes a done lane read (the lane is idle after); its error as ``OSError``."""
        a = self._list[lane]
        err = self._error(a)
        n = self._return(a)
        self._list[lane] = None
        if err:
            raise OSError(err, os.strerror(err))
        return n

    def drain(self) -> None:
        """Wait for every read in flight (before the memory they write is reused or freed); results dropped."""
        while any(self._list):
            for lane in self.wait(0.05):
                try:
                    self.result(lane)
                except OSError:
                    pass

    def close(self) -> None:
        """``drain``, then close the duplicated descriptors."""
        self.drain()
        for fd in self._dups.values():
            os.close(fd)
        self._dups.clear()
