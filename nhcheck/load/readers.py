"""Readers: the shard bytes on their way into the arenas.

``fast`` (default) reads fixed pieces with a thread pool of ``os.preadv`` into a bounded ring of
(pinned, on CUDA) host buffers and copies them asynchronously into per-shard landing buffers on
the device, starting before the plan exists; once it does, each shard is placed with one batched
copy. ``safetensors`` is the plain reference: ``safe_open`` one shard at a time, one
``get_tensor`` per tensor in stream order. torch is imported inside functions only.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, NamedTuple

from nhcheck.dtypes import ITEMSIZE
from nhcheck.errors import CheckpointError
from nhcheck.fileio import read_into
from nhcheck.load.memory import Arenas, apply
from nhcheck.load.options import LoadOptions
from nhcheck.load.plan import Op

#: Kept across loads: the pinned ring (pinning costs more than the reads) and one stream per device
#: (the caching allocator reuses memory only on the stream that freed it).
_CACHE: dict[Any, Any] = {}
_PENDING = object()  # a landing buffer being allocated


class Piece(NamedTuple):
    """One op's source bytes inside a buffer holding its shard's data section, at byte ``off``."""

    op: Op
    off: int


class Span(NamedTuple):
    """What the transfer needs of a shard: its file and where its data section starts and ends."""

    path: str
    data_start: int
    file_size: int


class Read(NamedTuple):
    """Bytes [start, end) of the transfer's shard number ``shard``."""

    shard: int
    start: int
    end: int


def plan_reads(spans: list, piece_bytes: int) -> list[Read]:
    """Every shard's data section in pieces of ``piece_bytes``, shards in loader order."""
    return [
        Read(i, off, min(off + piece_bytes, s.file_size))
        for i, s in enumerate(spans)
        for off in range(s.data_start, s.file_size, piece_bytes)
    ]


def spans_of(shards) -> list[Span]:
    return [Span(s.path, s.data_start, s.file_size) for s in shards]


def quick_spans(path: str) -> list[Span] | None:
    """The ``*.safetensors`` files of a local checkpoint and their data offsets from the 8-byte length
    prefixes alone: enough to start reading while the headers are parsed.

    A guess that ``open_local`` confirms (same files, same offsets) before anything read is used;
    None whenever anything is unusual, and the reads then start after the headers.
    """
    import stat

    from nhcheck.checkpoint import safe_member

    try:
        if os.path.isdir(path):
            root = os.path.abspath(path)
            names = sorted(n for n in os.listdir(root) if n.endswith(".safetensors"))
        elif path.endswith(".safetensors"):
            root, names = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
        else:
            return None
        out = []
        for name in names:
            p = safe_member(root, name, "shard")
            st = os.stat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_size < 8:
                return None
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
            if 8 + n > st.st_size:
                return None
            out.append(Span(p, 8 + n, st.st_size))
        return out or None
    except (OSError, CheckpointError):
        return None


def host_view(t, offset: int, size: int) -> memoryview:
    """A writable memoryview over ``size`` bytes of a CPU tensor (for ``os.preadv``), without numpy."""
    return memoryview((ctypes.c_char * size).from_address(t.data_ptr() + offset)).cast("B")


def write_op(arenas: Arenas, op: Op, x) -> None:
    """Apply one op from its typed source tensor ``x`` to its range of the parameter."""
    apply(op.kind, arenas.flat(op.param)[op.start : op.start + op.n], x)


def _host_ring(torch, size: int, pinned: bool):
    """Ring storage; the pinned one is kept for the next load."""
    if not pinned:
        return torch.empty(size, dtype=torch.uint8)
    ring = _CACHE.get("ring")
    if ring is None or ring.numel() < size:
        _CACHE.pop("ring", None)
        ring = _CACHE["ring"] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    return ring


def _segments(t, spans: list[tuple[int, int]]) -> list:
    """Views of the 1-D ``t`` for (start, length) spans in ascending order, made in one call when they
    do not overlap (per-view slicing costs microseconds each, and a shard has thousands)."""
    bounds = [b for start, n in spans for b in (start, start + n)]
    if any(a > b for a, b in zip(bounds, bounds[1:], strict=False)):
        return [t[start : start + n] for start, n in spans]  # overlapping writes (a double write)
    return list(t.tensor_split(bounds)[1::2])


def apply_pieces(pieces: list[Piece], src, arenas: Arenas) -> None:
    """Place one shard's ops from ``src``: same-dtype ones as one batched byte copy, the rest through ``write_op``."""
    torch = arenas.torch
    copies = []  # (source offset, bytes, arena dtype, arena offset)
    for pc in pieces:
        op = pc.op
        es = ITEMSIZE[op.src]
        if op.kind == "copy":
            if op.n:
                dtype, base = arenas.where[op.param]
                copies.append((pc.off, op.n * es, dtype, (base + op.start) * es))
            continue
        x = src[pc.off : pc.off + (1 if op.kind == "broadcast" else op.n) * es]
        if pc.off % es:
            x = x.clone()  # a dtype view needs an aligned start
        write_op(arenas, op, x.view(getattr(torch, op.src)))
    if not copies:
        return
    copies.sort()
    srcs = _segments(src, [(c[0], c[1]) for c in copies])
    dsts: list = [None] * len(copies)
    for dtype in {c[2] for c in copies}:
        order = sorted((c[3], i) for i, c in enumerate(copies) if c[2] == dtype)
        for (_, i), view in zip(
            order, _segments(arenas.raw[dtype], [(copies[i][3], copies[i][1]) for _, i in order]), strict=True
        ):
            dsts[i] = view
    torch._foreach_copy_(dsts, srcs)


class Transfer:
    """Shard bytes on their way to the device, started before the plan exists and placed once it does.

    Reading begins with the load, while the main thread parses headers, audits and plans:
    reader threads claim pieces in order, ``os.preadv`` each into a free slot of a bounded ring
    of host buffers (pinned on CUDA) and copy it asynchronously into its shard's landing buffer
    on the device. No dispatcher sits between the threads: each piece costs its reader one
    or two brief holds of the interpreter, which the auditing main thread hands over every
    ``sys.getswitchinterval()``. ``place`` takes the plan, scatters each shard as soon as all its
    needed pieces have landed (one batched copy, shards in loader order as the engine applies
    them) and frees the landing buffer. Landing memory is bounded by ``landing_bytes`` (at
    least the largest shard); readers past it wait for ``place``. Once the plan is known,
    pieces no op needs are not read. One load at a time per process: the pinned ring is shared.
    """

    def __init__(self, spans: list[Span], device, opts: LoadOptions, torch) -> None:
        import queue
        import threading

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.spans = list(spans)
        self.closed = False
        self.workers: list = []
        self.fds: dict[int, int] = {}
        self.baseline = 0
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
        self.reads = plan_reads(self.spans, opts.chunk_bytes)
        self.of_shard: list[list[int]] = [[] for _ in self.spans]
        for j, r in enumerate(self.reads):
            self.of_shard[r.shard].append(j)
        self.slot = -(-max((r.end - r.start for r in self.reads), default=64) // 64) * 64
        self.nslots = max(1, min(len(self.reads), opts.pinned_bytes // self.slot))
        self.ring = _host_ring(torch, self.nslots * self.slot, self.cuda)
        self.views = [host_view(self.ring, i * self.slot, self.slot) for i in range(self.nslots)]
        self.free: Any = queue.SimpleQueue()
        for i in range(self.nslots):
            self.free.put(i)
        self.slot_used = [False] * self.nslots
        self.budget = max([opts.landing_bytes] + [s.file_size - s.data_start for s in self.spans])
        self.stream = _CACHE.setdefault(("stream", str(device)), torch.cuda.Stream(device)) if self.cuda else None
        # blocking: a reader waiting for its slot sleeps instead of spinning on a core other readers need
        self.events = [torch.cuda.Event(blocking=True) for _ in range(self.nslots)] if self.cuda else []
        self.lock = threading.Condition()
        self.next = 0  # everything below is guarded by the lock
        self.claimed = [False] * len(self.reads)
        self.done = [False] * len(self.reads)
        self.needed: list[bool] | None = None
        self.landing: dict[int, Any] = {}
        self.used = 0
        self.stop = False
        self.error: BaseException | None = None
        self.bytes_read = 0
        try:
            for i, s in enumerate(self.spans):
                self.fds[i] = os.open(s.path, os.O_RDONLY)
        except OSError as exc:
            path = self.spans[len(self.fds)].path
            self.close()
            raise CheckpointError(path, f"cannot open: {exc.strerror or exc}") from None
        threads = min(opts.threads or min(16, os.cpu_count() or 4), len(self.reads))
        self.workers = [
            threading.Thread(target=self._work, name=f"nhcheck-load-{i}", daemon=True) for i in range(threads)
        ]
        for w in self.workers:
            w.start()

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream_ctx(self):
        from contextlib import nullcontext

        return self.torch.cuda.stream(self.stream) if self.cuda else nullcontext()

    # -- reader threads

    def _wanted(self, j: int) -> bool:
        """Whether read ``j`` holds bytes some op needs (every read, until ``place`` says which)."""
        return self.needed is None or self.needed[j]

    def _claim(self) -> int | None:
        while self.next < len(self.reads):
            j = self.next
            self.next += 1
            if self._wanted(j):
                self.claimed[j] = True
                return j
        return None

    def _landing(self, i: int) -> tuple[Any, bool]:
        """(shard i's landing buffer, False), or (its size, True): the caller allocates it outside the
        lock (a large cudaMalloc must not stall the other readers) and publishes it; (None, False) on stop."""
        while not self.stop and self.error is None:
            buf = self.landing.get(i)
            if buf is _PENDING or (
                buf is None and self.used + self.spans[i].file_size - self.spans[i].data_start > self.budget
            ):
                self.lock.wait()
            elif buf is not None:
                return buf, False
            else:
                size = self.spans[i].file_size - self.spans[i].data_start
                self.landing[i] = _PENDING
                self.used += size
                return size, True
        return None, False

    def _work(self) -> None:
        try:
            with self._stream_ctx():
                while True:
                    with self.lock:
                        if self.stop or self.error is not None:
                            return
                        j = self._claim()
                        if j is None:
                            return
                        r = self.reads[j]
                        dst, mine = self._landing(r.shard)
                        if dst is None:
                            return
                    if mine:
                        dst = self.torch.empty(dst, dtype=self.torch.uint8, device=self.device)
                        with self.lock:
                            self.landing[r.shard] = dst
                            self.lock.notify_all()
                    span = self.spans[r.shard]
                    n = r.end - r.start
                    s = self.free.get()
                    try:
                        if self.cuda and self.slot_used[s]:
                            self.events[s].synchronize()  # the slot's previous host-to-device copy is done
                        read_into(self.fds[r.shard], span.path, self.views[s][:n], r.start)
                        self.slot_used[s] = True
                        dst[r.start - span.data_start : r.end - span.data_start].copy_(
                            self.ring[s * self.slot : s * self.slot + n], non_blocking=self.cuda
                        )
                        if self.cuda:
                            self.events[s].record(self.stream)
                    finally:
                        self.free.put(s)
                    with self.lock:
                        self.done[j] = True
                        self.bytes_read += n
                        self.lock.notify_all()
        except BaseException as exc:  # handed to the main thread by place()
            with self.lock:
                if self.error is None:
                    self.error = exc
                self.lock.notify_all()

    # -- the main thread

    def _complete(self, i: int) -> bool:
        return all(self.done[j] or not (self.claimed[j] or self._wanted(j)) for j in self.of_shard[i])

    def place(self, ops: tuple[Op, ...], arenas: Arenas) -> int:
        """Hand over the plan; returns the bytes read once every op is in place on the device."""
        index = {s.path: i for i, s in enumerate(self.spans)}
        pieces: dict[int, list[Piece]] = {}
        ranges: dict[int, list[tuple[int, int]]] = {}
        for op in ops:
            i = index[op.path]
            start = op.tensor.start
            pieces.setdefault(i, []).append(Piece(op, start - self.spans[i].data_start))
            ranges.setdefault(i, []).append((start, start + ITEMSIZE[op.src] * (1 if op.kind == "broadcast" else op.n)))
        needed = [False] * len(self.reads)
        for i, rs in ranges.items():
            rs.sort()
            k = 0
            for j in self.of_shard[i]:
                r = self.reads[j]
                while k < len(rs) and rs[k][1] <= r.start:
                    k += 1
                needed[j] = k < len(rs) and rs[k][0] < r.end
        if self.stream is not None:  # set exactly when the device is CUDA
            self.stream.wait_stream(self.torch.cuda.current_stream(self.device))  # the poison fill comes first
        with self.lock:
            self.needed = needed
            self.lock.notify_all()
        with self._stream_ctx():
            for i in range(len(self.spans)):
                with self.lock:
                    while self.error is None and not self._complete(i):
                        self.lock.wait()
                    if self.error is not None:
                        raise self.error
                    buf = self.landing.get(i)
                if buf is not None and i in pieces:
                    apply_pieces(pieces[i], buf, arenas)
                with self.lock:
                    if i in self.landing:
                        self.used -= self.landing.pop(i).numel()
                        self.lock.notify_all()
        for w in self.workers:
            w.join()
        if self.error is not None:
            raise self.error
        if self.stream is not None:
            self.stream.synchronize()
        return self.bytes_read

    def close(self) -> None:
        """Stop the readers (after an error elsewhere) and let go of the files; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.workers:
            with self.lock:
                self.stop = True
                self.lock.notify_all()
            for w in self.workers:
                w.join()
        if self.cuda and self.stream is not None:
            self.stream.synchronize()  # the ring is reused by the next load: no copy may still read it
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def run_safetensors(ops: tuple[Op, ...], arenas: Arenas, device) -> int:
    """The reference reader: ``safe_open`` one shard at a time, one tensor at a time, in stream order."""
    from safetensors import safe_open

    i = 0
    total = 0
    dev = str(device)
    while i < len(ops):
        path = ops[i].path
        j = i
        while j < len(ops) and ops[j].path == path:
            j += 1
        with safe_open(path, framework="pt", device=dev) as f:
            for op in ops[i:j]:
                x = f.get_tensor(op.tensor.name)
                write_op(arenas, op, x)
                total += op.tensor.nbytes
        i = j
    if device.type == "cuda":
        arenas.torch.cuda.synchronize(device)
    return total
