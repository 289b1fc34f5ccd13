"""The reader process: shard bytes read into a host ring that the loading process maps too.

Why a process of its own: a reader thread of the loading process that comes back from ``os.preadv`` must
take the interpreter lock back, and each handover costs the main thread, which meanwhile parses headers,
audits, plans and places in Python. Measured on a 16-core H100 host (2026-12-06, switch interval 0.2 ms as a
load sets it): 31 ms of that work took 0.20 s beside 16 threads looping on ``os.preadv`` in the process,
0.06 s beside 16 such threads in another process; a plain Python loop 0.063 s against 0.023 s alone. So the
reads run here, in threads of this process, into the shared ring; the loading process learns of each landed
read from one small message and moves it on (``readers.Transfer``): two threads there, one wake-up each a
64 MB piece, instead of sixteen.

Run as a script (``python -I -S child.py SOCKET RING SIZE``, both descriptors inherited): it imports nothing of
nhcheck's but ``fileio`` (the one short-read rule and its message), so it starts in tens of milliseconds; it
serves one load after another until its socket closes. Messages both ways on that socket are a tag byte, a
4-byte length and a payload (``send`` / ``Inbox``):

- to the child: ``O`` shard file descriptors (attached; at most ``FDS_PER_MESSAGE`` a message), ``L`` a load
  (JSON: paths, reads, threads, early, stride; the descriptors sent since the last load are its shards'),
  ``N`` the plan's needed reads (a byte each), ``F`` ring slot ``h`` free again, ``S`` stop this load;
- from the child: ``R`` read ``j`` landed in ring slot ``h``, ``E`` the load's error (JSON: path, message),
  ``D`` the readers are done with this load (JSON: their summed seconds and the most reads in flight at once,
  before the plan and after).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from typing import Any

HEAD = struct.Struct("<cI")  # tag, payload length
SLOT = struct.Struct("<I")  # a ring slot
LANDED = struct.Struct("<II")  # a read, the ring slot it is in
#: The kernel passes at most 253 descriptors in one message (``SCM_MAX_FD``).
FDS_PER_MESSAGE = 200


def send(sock: socket.socket, lock: threading.Lock, tag: bytes, payload: bytes = b"", fds: list[int] | None = None):
    """One message, whole (``lock``: one sender at a time on the socket)."""
    data = HEAD.pack(tag, len(payload)) + payload
    with lock:
        if fds:
            sent = socket.send_fds(sock, [data], fds)
            data = data[sent:]
        if data:
            sock.sendall(data)


class Inbox:
    """Messages off a stream socket, in order, with the descriptors that came along (``fds``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []

    def next(self) -> tuple[bytes, bytes] | None:
        """The next message's tag and payload; None once the other end has closed."""
        buf = self.buf
        while True:
            if len(buf) >= HEAD.size:
                tag, n = HEAD.unpack_from(buf)
                end = HEAD.size + n
                if len(buf) >= end:
                    payload = bytes(buf[HEAD.size : end])
                    del buf[:end]
                    return tag, payload
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, FDS_PER_MESSAGE)
            self.fds += fds
            if not data:
                return None
            buf += data


class _Load:
    """One load's reader threads: claim reads in order, take a free ring slot, ``os.preadv`` into it, tell."""

    def __init__(self, sock, lock, ring: memoryview, spec: dict[str, Any], fds: list[int]) -> None:
        self.sock, self.lock, self.ring, self.fds = sock, lock, ring, fds
        self.paths: list[str] = spec["paths"]
        self.reads: list[list[int]] = spec["reads"]
        self.stride: int = spec["stride"]
        self.early: int = spec["early"]
        self.cond = threading.Condition()
        self.free = deque(range(spec["slots"]))  # all guarded by cond
        self.next = 0
        self.needed: bytes | None = None
        self.inflight = 0
        self.most = [0, 0]  # reads in flight at once: before the plan, after
        self.stop = False
        self.running = spec["threads"]
        self.seconds = {"read": 0.0, "host_wait": 0.0}
        for _ in range(self.running):
            threading.Thread(target=self._work, daemon=True).start()

    def plan(self, needed: bytes) -> None:
        with self.cond:
            self.needed = needed
            self.cond.notify_all()

    def freed(self, h: int) -> None:
        with self.cond:
            self.free.append(h)
            self.cond.notify()

    def halt(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()

    def _claim(self) -> int | None:
        with self.cond:
            while self.needed is None and self.inflight >= self.early and not self.stop:
                self.cond.wait()
            while not self.stop and self.next < len(self.reads):
                j = self.next
                self.next += 1
                if self.needed is None or self.needed[j]:
                    self.inflight += 1
                    k = self.needed is not None
                    self.most[k] = max(self.most[k], self.inflight)
                    return j
            return None

    def _slot(self) -> int | None:
        with self.cond:
            while not self.free and not self.stop:
                self.cond.wait()
            return None if self.stop else self.free.popleft()

    def _work(self) -> None:
        from nhcheck.errors import CheckpointError
        from nhcheck.fileio import read_into

        clock = time.perf_counter
        read = wait = 0.0
        try:
            while (j := self._claim()) is not None:
                shard, start, end = self.reads[j]
                t = clock()
                h = self._slot()
                if h is None:
                    break
                t1 = clock()
                read_into(self.fds[shard], self.paths[shard], self.ring[h * self.stride :][: end - start], start)
                wait += t1 - t
                read += clock() - t1
                with self.cond:
                    self.inflight -= 1
                    self.cond.notify_all()
                send(self.sock, self.lock, b"R", LANDED.pack(j, h))
        except BaseException as exc:  # the parent raises it: a short file as the line it always was
            path, message = (exc.path, exc.problem) if isinstance(exc, CheckpointError) else (None, repr(exc))
            self.halt()
            send(self.sock, self.lock, b"E", json.dumps({"path": path, "message": message}).encode())
        finally:
            with self.cond:
                self.seconds["read"] += read
                self.seconds["host_wait"] += wait
                self.running -= 1
                last = self.running == 0
            if last:
                for fd in self.fds:
                    os.close(fd)
                done = {**self.seconds, "most_before": self.most[0], "most_after": self.most[1]}
                send(self.sock, self.lock, b"D", json.dumps(done).encode())


def main(sock_fd: int, ring_fd: int, size: int) -> None:
    import mmap

    sock = socket.socket(fileno=sock_fd)
    ring = memoryview(mmap.mmap(ring_fd, size))
    lock = threading.Lock()
    inbox = Inbox(sock)
    load: _Load | None = None
    while (msg := inbox.next()) is not None:
        tag, payload = msg
        if tag == b"L":
            spec = json.loads(payload)
            fds, inbox.fds = inbox.fds, []
            load = _Load(sock, lock, ring, spec, fds)
        elif load is None or tag == b"O":
            continue
        elif tag == b"N":
            load.plan(payload)
        elif tag == b"F":
            load.freed(SLOT.unpack(payload)[0])
        elif tag == b"S":
            load.halt()
    os._exit(0)  # the loading process is gone: its reads with it


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
