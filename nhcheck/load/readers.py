"""Readers: the shard bytes on their way into the arenas.

``fast`` (default) reads fixed pieces with a thread pool of ``os.preadv`` into a ring of (pinned,
on CUDA) host buffers and copies them asynchronously into a bounded staging area on the device,
starting before the plan exists; once it does, every piece's byte ranges are decided at once and
each staged piece is placed from that list as it lands (on CUDA one kernel launch a piece: ``kernel``),
its slot then reused. ``safetensors`` is the plain reference: ``safe_open`` one shard at a time, one
``get_tensor`` per tensor in stream order.
torch is imported inside functions only.
"""

from __future__ import annotations

import array
import ctypes
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from itertools import accumulate, chain, repeat
from operator import add, floordiv, gt
from typing import Any, NamedTuple

from nhcheck.dtypes import ITEMSIZE
from nhcheck.errors import CheckpointError
from nhcheck.fileio import read_into, usable_cores
from nhcheck.load.memory import Arenas, apply
from nhcheck.load.options import LoadOptions
from nhcheck.load.plan import Op

#: Kept across loads: the pinned ring and its registered parts (pinning costs more than the reads) and one
#: stream per device (the caching allocator reuses memory only on the stream that freed it).
_CACHE: dict[Any, Any] = {}
#: Where the last transfer's time went (seconds summed over reader threads, and the main thread's
#: placement), for ``bench/load.py``: ``read`` in ``os.preadv``, ``host_wait`` / ``stage_wait`` for a
#: free host / staging slot, ``issue`` queueing the device copy; ``place_wait`` / ``place`` on the main
#: thread; ``last_landed`` and ``placed`` since the transfer started.
STATS: dict[str, float] = {}
#: Staged byte ranges go to the device through the driver (``_driver_memcpy``); ``bench/load.py`` turns this
#: off for one contender to time the views + ``torch._foreach_copy_`` path in the same run.
DRIVER_COPIES = True
#: With the driver copies, a staged read's byte ranges go as one kernel launch (``kernel.Kernel``); off,
#: one driver copy per range: ``bench/load.py`` times both in the same run.
KERNEL = True
#: Until the plan arrives, at most this share of the reader threads read at once. The main thread is then
#: parsing, auditing and planning in pure Python, and each reader wakes for the interpreter lock a few
#: times a piece. Measured on a 16-core H100 host (2026-12-06, Python's 5 ms switch interval): 31 ms of that work
#: took 34 ms beside 8 threads looping on ``os.preadv`` in this process, 68 ms beside 16 (39 ms beside 16 in another
#: process); at the load's ``SWITCH_INTERVAL`` another host's 30 ms took 0.20 s beside 16 (0.09 s at 5 ms, 0.06 s
#: beside 16 in another process: ``bench/load.py --contention``). Once the plan is there every thread pays off
#: (audit done before the clock: 0.88x the pinned-pread ceiling with a ring slot per thread, 0.76x with 8 slots
#: for 16 threads). ``bench/load.py`` times 1.0 beside it.
EARLY_SHARE = 0.5
#: The interpreter's switch interval during a load (``run``): how long a reader thread back from ``os.preadv`` or
#: a wait waits for the interpreter before asking the main thread for it (Python's default: 5 ms). The main
#: thread's own work is slower for it (above), the reads faster: end to end ``bench/load.py`` times 1 ms beside it
#: (slower, 2026-12-06).
SWITCH_INTERVAL = 2e-4
#: The switch interval until the plan is handed over, where not None (``run`` sets ``SWITCH_INTERVAL`` once
#: ``Transfer.begin`` returns). Before it the main thread parses, audits and plans in Python beside the early readers,
#: and each forced handover costs it (the figures above: 0.20 s at 0.2 ms, 0.09 s at 5 ms); after it the staged
#: reads wait on the readers' turns. ``bench/load.py`` times 5 ms here beside the default (``_switchlate``). End to
#: end on H100 hosts (2026-12-06, 5 ms against the default in the same runs): 3.12 GB 0.71x/0.68x, 0.74x/0.70x,
#: 0.69x/0.71x, 0.82x/0.87x; release size 0.59x/0.55x, 0.51x/0.51x, 0.54x/0.52x, 0.61x/0.67x (the middle two of each
#: with the reads on glibc's AIO threads, since dropped: docs/performance.md): no gain that outlasts the hosts' spread.
EARLY_SWITCH_INTERVAL: float | None = None
#: The pinned ring is registered in parts of about this size (whole slots), each by a thread of its own.
_PIN_PART = 64 << 20
#: Ring slots and registered parts start on a page of their own.
_PAGE = 4096
#: ``prefetch`` reads at most this share of the available memory, ``_PREFETCH_STEP`` bytes at a time.
_PREFETCH_SHARE = 0.5
_PREFETCH_STEP = 32 << 20
#: ``cudaHostRegisterDefault``, as torch's own registering host allocator passes: with unified addressing
#: (every 64-bit CUDA platform) the memory is then mapped and portable, pinned for every context.
_REGISTER_DEFAULT = 0


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


def prefetch(spans: list[Span]):
    """Start reading the shards' data sections into the page cache, in loader order, from threads; returns
    the call that stops them (the readers then take over).

    Until the readers can start, a CLI load imports torch and starts CUDA (seconds, on the interpreter and
    the CPU) while the disk idles; from a cold page cache the readers then wait on the disk for every
    byte. These threads read through the start-up instead, ``_PREFETCH_STEP`` bytes at a time into a
    scratch buffer each (the bytes only pass through: they stay in the page cache), the interpreter given
    away during each read, taking the steps in order. ``POSIX_FADV_WILLNEED`` would read nothing the size of
    a shard: the kernel cuts it to its readahead window (128 KB to a few MB). A step whose last page is already
    cached is skipped (a read that may not wait, ``RWF_NOWAIT``, tells), so a warm page cache costs a lookup a
    step. At most ``_PREFETCH_SHARE`` of the memory the kernel calls available is read: more would evict the
    first bytes before the readers get to them. How many threads: ``_prefetch_threads``. Nothing happens where
    the platform has no ``/proc/meminfo``.
    """
    import mmap
    import threading

    stop = threading.Event()
    budget = _prefetch_budget()
    if budget is None:
        return stop.set
    steps: list[tuple[str, int, int]] = []  # (path, offset, bytes) within the budget, in loader order
    for s in spans:
        for off in range(s.data_start, s.file_size, _PREFETCH_STEP):
            n = min(_PREFETCH_STEP, s.file_size - off, budget)
            if n <= 0:
                break
            steps.append((s.path, off, n))
            budget -= n
    todo = iter(steps)  # shared: each step is taken once (a list iterator's next is one step under the GIL)

    def run() -> None:
        scratch = mmap.mmap(-1, _PREFETCH_STEP)  # pages faulted in by the reads, outside the interpreter
        fds: dict[str, int] = {}
        try:
            for path, off, n in todo:
                if stop.is_set():
                    return
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                if not _cached(fd, off + n - 1):
                    os.preadv(fd, [memoryview(scratch)[:n]], off)
        except OSError:
            return  # the readers meet the same error and report it
        finally:
            for fd in fds.values():
                os.close(fd)
            scratch.close()

    for _ in range(_prefetch_threads()):
        threading.Thread(target=run, name="nhcheck-prefetch", daemon=True).start()
    return stop.set


def _prefetch_threads() -> int:
    """Threads ``prefetch`` reads with: one per 4 cores the process may use (``fileio.usable_cores``), up to 4 (a fast
    disk reads several steps at once); one on small machines, where each thread's copying slows the start-up it
    runs beside (2-core dev VM, 2026-12-06: four threads read 1.3-1.6 GB/s against one's 0.34-0.52, but a cold CLI
    load took 9.38 s against 7.99 s)."""
    return max(1, min(4, usable_cores() // 4))


def _cached(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` is in the page cache: a one-byte read that may not wait for the disk."""
    try:
        return os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
    except OSError:  # BlockingIOError: not cached; EOPNOTSUPP: the file system cannot tell
        return False


def _prefetch_budget() -> int | None:
    """Bytes ``prefetch`` may read: ``_PREFETCH_SHARE`` of MemAvailable; None where the kernel does not say."""
    if not hasattr(os, "RWF_NOWAIT"):
        return None
    try:
        with open("/proc/meminfo", "rb") as fh:
            avail = next(int(line.split()[1]) << 10 for line in fh if line.startswith(b"MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return int(avail * _PREFETCH_SHARE)


def host_view(t, offset: int, size: int) -> memoryview:
    """A writable memoryview over ``size`` bytes of a CPU tensor (for ``os.preadv``), without numpy."""
    return memoryview((ctypes.c_char * size).from_address(t.data_ptr() + offset)).cast("B")


def write_op(arenas: Arenas, op: Op, x) -> None:
    """Apply one op from its typed source tensor ``x`` to its range of the parameter (a corner: the box of it)."""
    dst = arenas.flat(op.param)[op.start : op.start + op.n]
    if op.kind == "corner":
        dst = dst.view(op.within)[tuple(slice(0, d) for d in op.tensor.shape)]
    apply(op.kind, dst, x)


def _host_ring(torch, size: int, pinned: bool, device=None, slot: int = _PIN_PART):
    """Ring storage for slots of ``slot`` bytes (a page multiple); the pinned one (registered from ``device``'s
    threads) is kept for the next load with slots of that size.

    Its registered parts hold whole slots: an asynchronous copy from one slot never spans two registrations
    (each copy is one range the driver knows as page-locked)."""
    if not pinned:
        return torch.empty(size, dtype=torch.uint8)
    part = slot * max(1, _PIN_PART // slot)
    ring = _CACHE.get("ring")
    if ring is None or ring.numel() < size or _CACHE.get("ring_part") != part:
        old = _CACHE.pop("ring", None)
        if old is not None:
            _unpin(torch, old, _CACHE.pop("ring_parts"))
        ring, _CACHE["ring_parts"] = _pin(torch, size, device, part)
        _CACHE["ring"], _CACHE["ring_part"] = ring, part
    return ring


def _pin(torch, size: int, device, part: int = _PIN_PART) -> tuple[Any, list[tuple[int, int]]]:
    """``size`` bytes of page-locked host memory, and the parts registered with CUDA ([] where torch pinned it).

    A process pins its ring once, and ``pin_memory=True`` (one ``cudaHostAlloc``: every page faulted in and
    locked on one core) was the slowest part of a one-shot ``nhcheck load``. Here each page-aligned part of
    ``part`` bytes (a page multiple) is faulted in (written) and registered (``cudaHostRegister``) by a thread
    of its own. H100 host, 1 GB, fresh processes (2026-12-06): 0.055 s against torch's 0.478 s in the same run
    (``bench/load.py --fresh``). Where registering fails, torch pins it.
    """
    from concurrent.futures import ThreadPoolExecutor

    whole = torch.empty(size + _PAGE, dtype=torch.uint8)
    skip = -whole.data_ptr() % _PAGE  # parts share no page: each is registered on its own
    ring = whole[skip : skip + size]
    base = ring.data_ptr()
    parts = [(o, min(part, size - o)) for o in range(0, size, part)]
    cudart = torch.cuda.cudart()

    def pin(span: tuple[int, int]) -> bool:
        o, n = span
        if device is not None:
            torch.cuda.set_device(device)  # no context made on another card for this thread
        ctypes.memset(base + o, 0, n)  # one core's plain writes (not torch's thread pool from 16 threads at once)
        return int(cudart.cudaHostRegister(base + o, n, _REGISTER_DEFAULT)) == 0

    # a part that will not register leaves its error as that pool thread's last CUDA error, which ends with the
    # thread: torch's next call in this one does not raise it
    with ThreadPoolExecutor(min(16, usable_cores(), len(parts))) as pool:
        ok = list(pool.map(pin, parts))
    if all(ok):
        return ring, parts
    _unpin(torch, ring, [p for p, good in zip(parts, ok, strict=True) if good])
    return torch.empty(size, dtype=torch.uint8, pin_memory=True), []


def _unpin(torch, ring, parts: list[tuple[int, int]]) -> None:
    """Undo ``_pin``'s registrations before ``ring`` is freed (no copy may still read it: ``close`` waits)."""
    cudart = torch.cuda.cudart()
    base = ring.data_ptr()
    for o, _ in parts:
        cudart.cudaHostUnregister(base + o)


def _segments(t, spans: list[tuple[int, int]]) -> list:
    """Views of the 1-D ``t`` for (start, length) spans in ascending order, made in one call when they
    do not overlap (per-view slicing costs microseconds each, and a shard has thousands)."""
    bounds = [b for start, n in spans for b in (start, start + n)]
    if any(a > b for a, b in zip(bounds, bounds[1:], strict=False)):
        return [t[start : start + n] for start, n in spans]  # overlapping writes (a double write)
    return list(t.tensor_split(bounds)[1::2])


class Piece(NamedTuple):
    """Bytes [skip, skip + nbytes) of one op's source, at byte ``off`` of a staged read: an op other than a
    ``copy``, placed whole from one read (``skip`` 0), or a part of one no single read holds, gathered from its
    reads before it is applied (``Transfer.finish``)."""

    op: Op
    off: int
    skip: int
    nbytes: int


def _source_bytes(op: Op) -> int:
    """Bytes of the file an op reads: the whole tensor, or one element for a broadcast."""
    return ITEMSIZE[op.src] * op.src_elements


#: One byte range a ``copy`` op places: (offset in the staged read, offset in the arena, bytes, the op's ``idx``).
Row = tuple[int, int, int, int]


class Cut(NamedTuple):
    """What one read holds of the plan, decided when the plan (or its installment) is handed over.

    ``rows``: per arena, the byte ranges of its ``copy`` ops (a copy that straddles a read's boundary is cut
    there: a byte range of the source maps to the same byte range of its slot); ``others``: the other ops it holds
    whole; ``parts``: its parts of the other ops no single read holds whole.
    """

    rows: dict[str, list[Row]]
    others: list[Piece]
    parts: list[Piece]


def cut_plan(ops: Iterable[Op], spans: list[Span], reads: list[Read], of_shard: list[list[int]], where):
    """Each read's ``Cut`` (by read index) and the non-copy ops no single read holds whole (``where``: each
    parameter's arena and element offset, ``Arenas.where``). One pass, a row per copy op and no call per op."""
    index = {
        s.path: (s.data_start, of_shard[i][0], reads[of_shard[i][0]].end - reads[of_shard[i][0]].start)
        for i, s in enumerate(spans)
        if of_shard[i]
    }  # every read of a shard but its last has its first read's size
    starts = [r.start for r in reads]
    out: dict[int, Cut] = {}
    whole: list[Op] = []
    isz = ITEMSIZE
    for op in ops:
        idx, tensor, path, param, kind, src, start, n, _, _ = op  # at once: 24k ops at release size
        n = isz[src] * (n if kind == "copy" else op.src_elements)
        if n <= 0:
            continue
        data, first, size = index[path]
        a = tensor[3]  # TensorInfo.start
        k0 = first + (a - data) // size
        k1 = first + (a + n - 1 - data) // size
        if kind == "copy":
            dtype, base = where[param]
            dst = (base + start) * isz[src]
            if k0 == k1:  # the common case, one row: the loop below would make it too, at twice the cost (24k ops)
                cut = out.get(k0)
                if cut is None:
                    cut = out[k0] = Cut({}, [], [])
                rows = cut.rows.get(dtype)
                if rows is None:
                    rows = cut.rows[dtype] = []
                rows.append((a - starts[k0], dst, n, idx))
                continue
            for k in range(k0, k1 + 1):
                cut = out.get(k)
                if cut is None:
                    cut = out[k] = Cut({}, [], [])
                rows = cut.rows.get(dtype)
                if rows is None:
                    rows = cut.rows[dtype] = []
                lo = max(a, starts[k])
                hi = min(a + n, reads[k].end)
                rows.append((lo - starts[k], dst + lo - a, hi - lo, idx))
            continue
        if k0 == k1:
            out.setdefault(k0, Cut({}, [], [])).others.append(Piece(op, a - starts[k0], 0, n))
            continue
        whole.append(op)  # its parts are gathered from the reads, then applied whole
        for k in range(k0, k1 + 1):
            lo, hi = max(a, starts[k]), min(a + n, reads[k].end)
            out.setdefault(k, Cut({}, [], [])).parts.append(Piece(op, lo - starts[k], lo - a, hi - lo))
    return out, whole


class Copies(NamedTuple):
    """The byte-range copies of one staged read into one arena: parallel arrays, ascending source offsets."""

    dtype: str  # the arena
    src: tuple[int, ...]  # byte offsets in the staged read
    dst: tuple[int, ...]  # byte offsets in the arena
    size: tuple[int, ...]
    idx: tuple[int, ...]  # the op of each range (``Op.idx``)


class Placement(NamedTuple):
    """What one staged read places, decided once, before it is placed.

    ``copies``: every ``copy`` op's byte ranges per arena, bounds checked here (the placement then issues them
    without per-tensor Python); ``others``: the other ops the read holds whole (``write_op``).
    """

    copies: tuple[Copies, ...]
    others: tuple[Piece, ...]


def compile_cut(cut: Cut, arenas: Arenas, read_bytes: int | None = None) -> Placement:
    """The ``Placement`` of one read's ``cut``: its rows per arena in source order, checked against the arena's
    and (given ``read_bytes``) the read's bounds, so a wrong offset fails here, not in memory."""
    copies = []
    top = read_bytes if read_bytes is not None else sys.maxsize
    for dtype, rows in cut.rows.items():
        rs = sorted(rows)
        src, dst, size, idx = zip(*rs, strict=True)
        limit = arenas.raw[dtype].numel()
        if min(min(src), min(dst)) < 0 or max(map(add, dst, size)) > limit or max(map(add, src, size)) > top:
            bad = next(r for r in rs if min(r[0], r[1]) < 0 or r[1] + r[2] > limit or r[0] + r[2] > top)
            raise RuntimeError(
                f"internal error: placement out of bounds: {bad[2]} bytes at {bad[0]} -> {dtype} arena at {bad[1]}"
                f" (op {bad[3]})"
            )
        copies.append(Copies(dtype, src, dst, size, idx))
    return Placement(tuple(copies), tuple(cut.others))


def _driver_call(name: str, argtypes: list) -> Any:
    """The CUDA driver's function ``name`` (libcuda, which every CUDA process has loaded), bound through
    ``PyDLL`` — the call keeps the interpreter, where a ``CDLL`` call gives it away and must wait for it back
    behind the reader threads — or None where it cannot be bound."""
    try:
        fn = getattr(ctypes.PyDLL("libcuda.so.1"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def _driver_memcpy():
    """The driver's ``cuMemcpyDtoDAsync``, or None.

    A staged read holds dozens to thousands of byte ranges; enqueueing each straight on the driver
    costs a few microseconds of the main thread; making a pair of tensor views per range for
    ``torch._foreach_copy_`` costs more (H100, 3,503 ranges: 35–47 ms against 48–72 ms; end to end
    ``bench/load.py`` times both).
    """
    if "dtod" not in _CACHE:
        _CACHE["dtod"] = _driver_call(
            "cuMemcpyDtoDAsync_v2", [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        )
    return _CACHE["dtod"]


class _Stager(NamedTuple):
    """The CUDA driver calls a reader thread enqueues a staged piece with, and the main thread a placement's
    waits, row upload and slot release, bound through ``PyDLL``.

    A reader's torch calls for one piece (``copy_``, ``Stream.wait_event``) each give the interpreter away and
    take it back, and every taking back is a handover the main thread pays for while it places: beside 16
    threads looping on ``os.preadv`` (one release a piece) its work before the plan took 68.5 ms against
    30.8 ms alone (H100 host, 2026-12-06, at Python's 5 ms switch interval; more at the load's, ``EARLY_SHARE``).
    These calls keep the interpreter: a piece is enqueued in one hold.
    Release size on an H100 host (2026-12-06): the readers' summed enqueue time 0.012 s against 0.285 s, the
    main thread's per-read placement 0.194 s against 0.232 s.
    """

    htod: Any  # cuMemcpyHtoDAsync_v2(dst, src, bytes, stream)
    wait: Any  # cuStreamWaitEvent(stream, event, flags)
    record: Any  # cuEventRecord(event, stream)


def _stager() -> _Stager | None:
    """The driver's staging calls, or None where libcuda cannot be bound (the readers then use torch's)."""
    if "stager" not in _CACHE:
        fns = (
            _driver_call("cuMemcpyHtoDAsync_v2", [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
            _driver_call("cuStreamWaitEvent", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]),
            _driver_call("cuEventRecord", [ctypes.c_void_p, ctypes.c_void_p]),
        )
        _CACHE["stager"] = None if any(fn is None for fn in fns) else _Stager(*fns)
    return _CACHE["stager"]


def _driver_check(rc: int, call: str) -> None:
    """A driver call's non-zero result as an error naming the call (the driver returns codes, never raises)."""
    if rc:
        raise RuntimeError(f"{call} failed with CUDA error {rc}")


def apply_placement(placement: Placement, src, arenas: Arenas, stream=None, batch=None) -> None:
    """Place what one staged read holds: the ops other than byte ranges through ``write_op``, then
    its byte ranges.

    On CUDA with ``stream`` (the placement stream, current while this runs) the byte ranges are one
    launch of ``batch`` (``Ranges.launcher``: the read's rows of the kernel's table) where there is one,
    else enqueued on the driver one by one (bounds checked by ``compile_cut``); otherwise they are
    one batched ``torch._foreach_copy_`` over views.
    """
    torch = arenas.torch
    for pc in placement.others:
        op = pc.op
        x = src[pc.off : pc.off + pc.nbytes]
        if pc.off % ITEMSIZE[op.src]:
            x = x.clone()  # a dtype view needs an aligned start
        write_op(arenas, op, x.view(getattr(torch, op.src)))
    if not placement.copies:
        return
    if batch is not None:
        batch(src.data_ptr())
        return
    memcpy = _driver_memcpy() if stream is not None and DRIVER_COPIES else None
    if memcpy is not None:
        handle = stream.cuda_stream
        sptr = src.data_ptr()
        for c in placement.copies:
            base = arenas.raw[c.dtype].data_ptr()
            for so, do, n in zip(c.src, c.dst, c.size, strict=True):
                _driver_check(memcpy(base + do, sptr + so, n, handle), "cuMemcpyDtoDAsync")
        return
    # in source order over all arenas, as one pass through the staged read
    ranges = sorted(
        (so, n, c.dtype, do) for c in placement.copies for so, do, n in zip(c.src, c.dst, c.size, strict=True)
    )
    srcs = _segments(src, [(r[0], r[1]) for r in ranges])
    dsts: list = [None] * len(ranges)
    for c in placement.copies:
        order = sorted((r[3], i) for i, r in enumerate(ranges) if r[2] == c.dtype)
        views = _segments(arenas.raw[c.dtype], [(ranges[i][3], ranges[i][1]) for _, i in order])
        for (_, i), view in zip(order, views, strict=True):
            dsts[i] = view
    torch._foreach_copy_(dsts, srcs)


class Ranges:
    """Staged reads' byte ranges as rows of one table on the device, placed by ``kernel.Kernel``.

    A read's rows are written when that read is placed (``launcher``): into the next free rows of a pinned host
    table, built by Python's C-level iterators over its ranges (no tensor operation: its thread pool would fight
    the reader threads for the cores), then one asynchronous copy to the same rows on the device, ahead of the launch on
    the same stream. No row is written twice in a load, so the host rows need no wait before reuse.
    """

    def __init__(self, kernel, torch, capacity: int, device, stager: _Stager | None) -> None:
        self.kernel = kernel
        self.stager = stager
        self.host = torch.empty((max(1, capacity), 4), dtype=torch.int64, pin_memory=device.type == "cuda")
        self.rows = torch.empty((max(1, capacity), 4), dtype=torch.int64, device=device)
        self.table = host_view(self.host, 0, self.host.numel() * 8).cast("q")
        self.used = 0

    @staticmethod
    def open(torch, capacity: int, device, stager: _Stager | None = None) -> Ranges | str:
        """A table of ``capacity`` rows for a load to ``device``, its rows uploaded through ``stager``'s driver
        call where given (else torch's copy); or why the kernel cannot be had here."""
        from nhcheck.load import kernel

        key = ("kernel", str(device))
        if key not in _CACHE:
            _CACHE[key] = kernel.Kernel.load()
        k = _CACHE[key]
        if isinstance(k, str):
            return k
        return Ranges(k, torch, capacity, device, stager)

    def launcher(self, placement: Placement, arenas: Arenas, stream: int):
        """The one launch placing ``placement``'s byte ranges from its staged bytes, its rows uploaded on the
        current stream (``stream``); None where it has no ranges or two overlap in an arena (a double write,
        where the last write must win: placed range by range, in order)."""
        from nhcheck.load import kernel

        copies = placement.copies
        if not copies or any(_overlap(c) for c in copies):
            return None
        chunk = kernel.CHUNK
        flat: list[int] = []
        chunks = 0
        for c in copies:  # (source offset, destination address, bytes, first chunk) a range, in C-level loops
            firsts = list(accumulate(map(floordiv, map(add, c.size, repeat(chunk - 1)), repeat(chunk)), initial=chunks))
            chunks = firsts.pop()
            dst = map(add, c.dst, repeat(arenas.raw[c.dtype].data_ptr()))
            flat += chain.from_iterable(zip(c.src, dst, c.size, firsts, strict=True))
        first, rows = self.used, len(flat) // 4
        if first + rows > len(self.table) // 4:
            raise RuntimeError(
                f"internal error: {first + rows} kernel table rows for a table of {len(self.table) // 4}"
            )
        self.table[4 * first : 4 * (first + rows)] = array.array("q", flat)
        self.used += rows
        ptr = self.rows.data_ptr() + 32 * first
        if self.stager is not None:  # keeping the interpreter (``_Stager``): torch's copy would give it away
            _driver_check(
                self.stager.htod(ptr, self.host.data_ptr() + 32 * first, 32 * rows, stream), "cuMemcpyHtoDAsync"
            )
        else:
            self.rows[first : first + rows].copy_(self.host[first : first + rows], non_blocking=True)
        return lambda src_ptr: self.kernel.place(ptr, rows, chunks, src_ptr, stream)


def _overlap(c: Copies) -> bool:
    """Whether two of the ranges overlap in the arena (their order then matters: the last write wins)."""
    if len(c.dst) < 2:
        return False
    starts, sizes = zip(*sorted(zip(c.dst, c.size, strict=True)), strict=True)
    return any(map(gt, map(add, starts, sizes), starts[1:]))  # an end past the next start (C-level loops)


class Transfer:
    """Shard bytes on their way to the device, started before the plan exists and placed once it does.

    Reading begins with the load, while the main thread parses headers, audits and plans:
    reader threads claim fixed pieces of the files in order, ``os.preadv`` each into a free slot
    of a ring of pinned host buffers, and copy it asynchronously into a free slot of a bounded
    staging area on the device (``staging_bytes``, whatever the shard sizes: device memory is the
    parameters plus this). The readers never see a tensor: no per-tensor Python runs on them.
    ``begin`` takes the plan, cuts the ops into every read's rows and pieces (``cut_plan``) and tells the
    readers which reads any op needs; the caller may do other work (the checks' bookkeeping) before
    ``finish`` places each staged read as soon as it lands: its ``Placement`` decided then, once (byte
    ranges per arena in source order, bounds checked: ``compile_cut``), and placed
    (``apply_placement``: on CUDA one kernel launch over the read's rows of the ``Ranges`` table, written
    then; the ranges issued to the driver one by one where the kernel cannot be had), and its staging slot
    freed for the next read. Deciding read by read, not every read before the first is placed, frees the
    staging area sooner: at the plan it is full, and the readers wait for it (Nano's 24k tensors: ~0.1 s of
    deciding on a 16-core H100 host). The device orders it all
    with events, the host waits only for a free slot. Before the plan exists, only ``EARLY_SHARE`` of
    the readers read, and no further ahead than the staging area plus what they hold; once it does, every
    reader reads, and pieces no op needs are not read. Each piece costs its reader a few brief holds of
    the interpreter (the read itself runs outside it; its copy and events are enqueued in one: ``_Stager``).
    One load at a time per process: the pinned ring is shared.
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
        # the staging area: at least one slot, at most what the files hold
        self.nstage = max(1, min(len(self.reads), opts.staging_bytes // self.slot))
        self.staging = torch.empty(self.nstage * self.slot, dtype=torch.uint8, device=device)
        self.stage_free: Any = queue.SimpleQueue()
        for d in range(self.nstage):
            self.stage_free.put(d)
        if self.cuda:
            self.nhost = max(1, min(len(self.reads), opts.pinned_bytes // self.slot))
            self.stride = -(-self.slot // _PAGE) * _PAGE  # ring slots start on pages: parts hold whole slots
            self.ring = _host_ring(torch, self.nhost * self.stride, True, device, self.stride)
            self.views = [host_view(self.ring, h * self.stride, self.slot) for h in range(self.nhost)]
            self.host_free: Any = queue.SimpleQueue()
            for h in range(self.nhost):
                self.host_free.put(h)
            self.host_used = [False] * self.nhost
            self.stream = _CACHE.setdefault(("stream", str(device)), torch.cuda.Stream(device))
            self.place_stream = _CACHE.setdefault(("place", str(device)), torch.cuda.Stream(device))
            # blocking: a reader waiting for its host slot sleeps instead of spinning on a core other readers need
            self.host_events = [torch.cuda.Event(blocking=True) for _ in range(self.nhost)]
            self.landed_events = [torch.cuda.Event() for _ in range(self.nstage)]
            self.freed_events = [torch.cuda.Event() for _ in range(self.nstage)]
            self.stager = _stager()
            if self.stager is not None:  # torch makes an event when first recorded: the driver needs its handle now
                for ev in chain(self.host_events, self.landed_events, self.freed_events):
                    ev.record(self.stream)
                self.handles = (
                    [ev.cuda_event for ev in self.host_events],
                    [ev.cuda_event for ev in self.landed_events],
                    [ev.cuda_event for ev in self.freed_events],
                )
            self.freed_used = [False] * self.nstage
        else:
            self.views = [host_view(self.staging, d * self.slot, self.slot) for d in range(self.nstage)]
        self.lock = threading.Condition()
        self.next = 0  # everything below is guarded by the lock
        self.claimed = [False] * len(self.reads)
        self.landed: dict[int, int] = {}  # read → staging slot, not yet placed
        self.needed: list[bool] | None = None
        self.planned = 0  # shards the plan's installments have decided, in order
        self.inflight = 0  # claimed, not yet landed
        self.stop = False
        self.error: BaseException | None = None
        self.bytes_read = 0
        self.started = time.perf_counter()
        self.stats: dict[str, float] = {}
        try:
            for i, s in enumerate(self.spans):
                self.fds[i] = os.open(s.path, os.O_RDONLY)
        except OSError as exc:
            path = self.spans[len(self.fds)].path
            self.close()
            raise CheckpointError(path, f"cannot open: {exc.strerror or exc}") from None
        threads = min(opts.threads or min(16, usable_cores()), len(self.reads))
        self.early = max(1, round(threads * EARLY_SHARE))
        self.workers = [
            threading.Thread(target=self._work, name=f"nhcheck-load-{i}", daemon=True) for i in range(threads)
        ]
        for w in self.workers:
            w.start()

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reader threads

    def _wanted(self, j: int) -> bool:
        """Whether read ``j`` holds bytes some op needs (every read, until ``place`` says which)."""
        return self.needed is None or self.needed[j]

    def _claim(self) -> int | None:
        """The next read to do, or None once there is none (or the transfer stops); before the plan
        arrives, waits while ``early`` reads are in flight."""
        with self.lock:
            while self.needed is None and self.inflight >= self.early and not (self.stop or self.error):
                self.lock.wait()
            if self.stop or self.error is not None:
                return None
            while self.next < len(self.reads):
                j = self.next
                self.next += 1
                if self._wanted(j):
                    self.claimed[j] = True
                    self.inflight += 1
                    return j
            return None

    def _get(self, q) -> int | None:
        """A free slot from ``q``, or None once the transfer stops."""
        import queue

        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if self.stop or self.error is not None:
                    return None

    def _work(self) -> None:
        clock = time.perf_counter
        acc = dict.fromkeys(("read", "host_wait", "stage_wait", "issue"), 0.0)
        try:
            if self.cuda:
                self.torch.cuda.set_device(self.device)
                # a runtime call makes the device's context this thread's (torch skips setting the device it
                # already reports), which the driver calls of ``_stage_by_driver`` need
                self.stream.query()
            while True:
                j = self._claim()
                if j is None:
                    return
                r = self.reads[j]
                n = r.end - r.start
                path = self.spans[r.shard].path
                if not self.cuda:
                    t = clock()
                    d = self._get(self.stage_free)
                    if d is None:
                        return
                    t1 = clock()
                    read_into(self.fds[r.shard], path, self.views[d][:n], r.start)
                    acc["stage_wait"] += t1 - t
                    acc["read"] += clock() - t1
                else:
                    t = clock()
                    h = self._get(self.host_free)
                    if h is None:
                        return
                    try:
                        if self.host_used[h] and not self.host_events[h].query():
                            self.host_events[h].synchronize()  # its previous host-to-device copy is not done yet
                        t1 = clock()
                        read_into(self.fds[r.shard], path, self.views[h][:n], r.start)
                        t2 = clock()
                        d = self._get(self.stage_free)
                        if d is None:
                            return
                        t3 = clock()
                        if self.stager is not None:
                            self._stage_by_driver(h, d, n)
                        else:
                            with self.torch.cuda.stream(self.stream):
                                if self.freed_used[d]:
                                    self.stream.wait_event(self.freed_events[d])  # its last placement is done
                                self.staging[d * self.slot : d * self.slot + n].copy_(
                                    self.ring[h * self.stride : h * self.stride + n], non_blocking=True
                                )
                                self.host_events[h].record(self.stream)
                                self.landed_events[d].record(self.stream)
                        self.host_used[h] = True
                        acc["host_wait"] += t1 - t
                        acc["read"] += t2 - t1
                        acc["stage_wait"] += t3 - t2
                        acc["issue"] += clock() - t3
                    finally:
                        self.host_free.put(h)
                with self.lock:
                    self.landed[j] = d
                    self.inflight -= 1
                    self.bytes_read += n
                    self.stats["last_landed"] = clock() - self.started
                    self.lock.notify_all()
        except BaseException as exc:  # handed to the main thread by place()
            with self.lock:
                if self.error is None:
                    self.error = exc
                self.lock.notify_all()
        finally:
            with self.lock:
                for k, v in acc.items():
                    self.stats[k] = self.stats.get(k, 0.0) + v

    def _stage_by_driver(self, h: int, d: int, n: int) -> None:
        """Ring slot ``h``'s ``n`` bytes into staging slot ``d`` on the reader stream, once that slot's last
        placement is done; the two events recorded after: without giving the interpreter away (``_Stager``)."""
        drv, stream = self.stager, self.stream.cuda_stream
        assert drv is not None
        host, landed, freed = self.handles
        if self.freed_used[d]:
            _driver_check(drv.wait(stream, freed[d], 0), "cuStreamWaitEvent")
        _driver_check(
            drv.htod(self.staging.data_ptr() + d * self.slot, self.ring.data_ptr() + h * self.stride, n, stream),
            "cuMemcpyHtoDAsync",
        )
        _driver_check(drv.record(host[h], stream), "cuEventRecord")
        _driver_check(drv.record(landed[d], stream), "cuEventRecord")

    # -- the main thread

    def begin(self, ops: Iterable[Op], arenas: Arenas, upto: int | None = None, bound: int = 0) -> None:
        """Hand over the plan, or its next installment: the ops are cut into every read's rows, then the readers
        learn which reads any op needs. The caller may work on (the checks' bookkeeping) before ``finish``.

        An installment decides the shards (in the transfer's order) from the last one's ``upto`` to its own (every
        shard left where None); the first of several gives ``bound``, at most how many ops all of them hold (for
        the kernel's table). Until its installment, every read of a shard is wanted.
        """
        torch = self.torch
        clock = time.perf_counter
        t = clock()
        cuts, whole = cut_plan(ops, self.spans, self.reads, self.of_shard, arenas.where)
        first = self.needed is None
        if first:
            self.arenas = arenas
            self.cuts, self.gathered, self.whole = {}, {}, []
        self.gathered.update(
            {op.idx: torch.empty(_source_bytes(op), dtype=torch.uint8, device=self.device) for op in whole}
        )
        self.cuts.update(cuts)
        self.whole += whole
        upto = len(self.spans) if upto is None else upto
        with self.lock:
            if first:
                self.needed, self.todo = [True] * len(self.reads), set()
            needed = self.needed
            assert needed is not None
            for j in chain.from_iterable(self.of_shard[self.planned : upto]):
                needed[j] = j in cuts
                if needed[j] or self.claimed[j]:
                    self.todo.add(j)
            self.planned = upto
            self.lock.notify_all()
        if first:
            self.stats["plan_at"] = clock() - self.started
            self.stats["cut"] = 0.0
            self.ranges: Ranges | None = None
            if self.cuda:  # the poison fill (current stream) comes before any placement
                self.place_stream.wait_stream(torch.cuda.current_stream(self.device))
                if DRIVER_COPIES and KERNEL:
                    rows = (
                        sum(len(r) for c in cuts.values() for r in c.rows.values())
                        if upto == len(self.spans)
                        else bound + len(self.reads)
                    )
                    with torch.cuda.device(self.device):  # the kernel is loaded into the current context: the device's
                        got = Ranges.open(torch, rows, self.device, self.stager)
                    self.ranges = got if isinstance(got, Ranges) else None
                    self.stats["kernel"] = float(self.ranges is not None)
        self.stats["cut"] += clock() - t

    def finish(self, more: Callable[[], bool] | None = None) -> int:
        """Place every staged read as it lands (``begin`` first); returns the bytes read once every op
        is in place on the device.

        ``more``, where the plan comes in installments, hands over the next one (``begin``) and says whether any
        is left: it is called whenever no landed read can be placed. With every installment handed over, a wait
        for the next read to land compiles the next reads not landed yet (their byte ranges and kernel rows):
        the main thread's Python then runs while it would wait, not while a landed read waits for it.
        """
        torch = self.torch
        ctx = torch.cuda.stream(self.place_stream) if self.cuda else nullcontext()
        clock = time.perf_counter
        waited = placing = compiling = 0.0
        todo = self.todo
        pending = more is not None
        ahead: dict[int, tuple[Placement, Any]] = {}  # reads compiled before they landed
        nxt = 0  # the first read that may still be compiled ahead (only once every installment is handed over)

        def next_ahead() -> int | None:
            nonlocal nxt
            while nxt < len(self.reads) and not (
                nxt in todo and nxt in self.cuts and nxt not in self.landed and nxt not in ahead
            ):
                nxt += 1
            return nxt if nxt < len(self.reads) else None

        with ctx:
            while todo or pending:
                t = clock()
                with self.lock:
                    while (
                        self.error is None
                        and not pending
                        and not any(j in self.landed for j in todo)
                        and next_ahead() is None
                    ):
                        self.lock.wait()
                    if self.error is not None:
                        raise self.error
                    ready = sorted((j, self.landed.pop(j)) for j in list(todo) if j in self.landed)
                    # decided under the lock: a read that lands once it is released is compiled ahead all the same
                    early = None if ready or pending else next_ahead()
                t1 = clock()
                waited += t1 - t
                if not ready:  # nothing to place yet: decide the next installment, or compile a read ahead
                    if pending:
                        assert more is not None
                        pending = more()
                    else:
                        assert early is not None
                        ahead[early] = self._compiled(early)
                        nxt = early + 1
                        compiling += clock() - t1
                    continue
                for j, d in ready:
                    todo.discard(j)
                    if j in self.cuts:
                        t2 = clock()
                        placement, batch = ahead.pop(j) if j in ahead else self._compiled(j)
                        compiling += clock() - t2
                        r = self.reads[j]
                        if self.cuda:
                            self._placing_after(d)
                        src = self.staging[d * self.slot : d * self.slot + r.end - r.start]
                        apply_placement(placement, src, self.arenas, self.place_stream if self.cuda else None, batch)
                        for pc in self.cuts[j].parts:
                            self.gathered[pc.op.idx][pc.skip : pc.skip + pc.nbytes].copy_(
                                src[pc.off : pc.off + pc.nbytes]
                            )
                    if self.cuda:
                        self._freed_after(d)
                    self.stage_free.put(d)
                placing += clock() - t1
            for op in self.whole:
                write_op(self.arenas, op, self.gathered[op.idx].view(getattr(torch, op.src)))
        for w in self.workers:
            w.join()
        if self.error is not None:
            raise self.error
        if self.cuda:
            self.place_stream.synchronize()
        self.stats.update(
            place_wait=waited,
            place=placing - compiling,
            compile=self.stats["cut"] + compiling,
            placed=clock() - self.started,
        )
        STATS.clear()
        STATS.update(self.stats)
        return self.bytes_read

    def _compiled(self, j: int) -> tuple[Placement, Any]:
        """Read ``j``'s placement, and its kernel launch where the kernel places it."""
        r = self.reads[j]
        placement = compile_cut(self.cuts[j], self.arenas, r.end - r.start)
        batch = self.ranges.launcher(placement, self.arenas, self.place_stream.cuda_stream) if self.ranges else None
        return placement, batch

    def _placing_after(self, d: int) -> None:
        """The placement stream waits for staging slot ``d``'s bytes to land."""
        if self.stager is None:
            self.place_stream.wait_event(self.landed_events[d])
            return
        _, landed, _ = self.handles
        _driver_check(self.stager.wait(self.place_stream.cuda_stream, landed[d], 0), "cuStreamWaitEvent")

    def _freed_after(self, d: int) -> None:
        """Staging slot ``d`` is free for the next read once the placement stream has placed from it.

        Through the driver where bound (``_Stager``): torch's event calls give the interpreter away, and taking it
        back behind 16 reader threads is a wait per call, three a read on the main thread (620 reads at release
        size)."""
        if self.stager is None:
            self.freed_events[d].record(self.place_stream)
        else:
            _, _, freed = self.handles
            _driver_check(self.stager.record(freed[d], self.place_stream.cuda_stream), "cuEventRecord")
        self.freed_used[d] = True

    def place(self, ops: tuple[Op, ...], arenas: Arenas) -> int:
        """``begin`` then ``finish``: the plan handed over and every op placed; returns the bytes read."""
        self.begin(ops, arenas)
        return self.finish()

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
        if self.cuda:
            self.stream.synchronize()  # the ring is reused by the next load: no copy may still read it
            self.place_stream.synchronize()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def run_safetensors(ops: Sequence[Op], arenas: Arenas, device) -> int:
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
