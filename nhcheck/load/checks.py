"""Checks of a load: what the plan covers, and what device memory says after the bytes landed.

Coverage is bookkeeping of the plan (which elements of each parameter some op writes, which twice,
which slots are missing); the read-back is memory itself: elements of every write gathered from
the device and compared with the bytes in the shard files (read through a memory map of their
own, not the reader's buffers), so a misplaced slice shows up here. The poison scan is
``Arenas.poisoned``. torch is imported inside functions only.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Sequence
from operator import gt, itemgetter
from typing import Any, NamedTuple

from nhcheck import collapse
from nhcheck.dtypes import ITEMSIZE, TORCH_DTYPE, numel
from nhcheck.load.memory import Arenas, layout, torch_module, word_dtype
from nhcheck.load.plan import Op
from nhcheck.manifest import Param
from nhcheck.safetensors_header import ShardHeader


class Coverage(NamedTuple):
    """What the plan writes of one parameter: elements written, the slots it misses, writes over earlier ones."""

    written: int
    missing: tuple[str, ...]
    double_writes: int


class Bookkeeping:
    """The checks' bookkeeping of a plan handed over in installments: each one's writes noted and its read-back
    samples picked as it comes (``add``, on the side thread while the bytes move), so that once the last byte has
    landed only the merge per parameter is left (``result``).

    ``files`` gives what the files hold at the samples (``file_samples``), waited for at the first installment.
    """

    def __init__(self, params: tuple[Param, ...], files: Callable[[], FileSamples]) -> None:
        self.params = params
        self.where = layout(params)[0]
        self.files = files
        self.spans: dict[str, list[tuple[int, int, int]]] = {}  # parameter → (start, end, op) of each write
        self.ops: list[Op] = []
        self.expected: list[Expected] = []

    def add(self, ops: Sequence[Op]) -> None:
        """Note an installment's writes and pick their samples."""
        spans = self.spans
        for op in ops:
            mine = spans.get(op.param)
            if mine is None:
                mine = spans[op.param] = []
            if op.kind == "corner":
                mine.extend((a, b, op.idx) for a, b in op.spans())
            else:  # one range, the slot (``Op.spans``), without the list
                mine.append((op.start, op.start + op.n, op.idx))
        self.ops += ops
        # every write's samples; one a later write overwrote is dropped in ``result`` (rare: a double write)
        self.expected += expected_samples(ops, self.where, self.files(), set())

    def result(self) -> tuple[dict[str, Coverage], list[ReadBack]]:
        """Per parameter (written elements, missing slots, double writes), and the read-back samples memory must
        match: those of every write no later write overwrote."""
        cov, overwritten = _covered(self.params, self.spans)
        if not overwritten:
            return cov, read_back(self.expected)
        return cov, read_back(expected_samples(self.ops, self.where, self.files(), overwritten))


def _covered(
    params: tuple[Param, ...], spans: dict[str, list[tuple[int, int, int]]]
) -> tuple[dict[str, Coverage], set[int]]:
    """Per parameter: (written elements, missing slots, double writes); plus the ops a later op overwrote."""
    out: dict[str, Coverage] = {}
    overwritten: set[int] = set()
    for p in params:
        total = numel(p.shape)
        mine = sorted(spans.get(p.name, ()))
        # The usual parameter: its writes, in order, one after another with none overlapping (each ends where or
        # before the next starts): no double write, and the written elements are their lengths summed, in C-level
        # passes (a Python step a write: 9 ms against 5 ms at release size, dev VM, on the side thread after the
        # last byte).
        starts, ends = list(map(itemgetter(0), mine)), list(map(itemgetter(1), mine))
        if not any(map(gt, ends[:-1], starts[1:])):
            written = sum(ends) - sum(starts)
            if written >= total:
                out[p.name] = Coverage(written, (), 0)
                continue
        merged: list[list[int]] = []
        doubles = 0
        reach, reach_op = -1, -1
        for s, e, idx in mine:
            if s < reach:
                doubles += 1
                overwritten.add(min(idx, reach_op))
            if e > reach:
                reach, reach_op = e, idx
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        written = sum(e - s for s, e in merged)
        missing = () if written >= total else _missing(p, merged)
        out[p.name] = Coverage(written, missing, doubles)
    return out, overwritten


def _missing(p: Param, merged: list[list[int]]) -> tuple[str, ...]:
    def covered(a: int, b: int) -> bool:
        return any(s <= a and b <= e for s, e in merged)

    if not merged:
        return ("all",)
    if p.loader == "expert" and p.shape:
        per = numel(p.shape[1:])
        absent = [e for e in range(p.shape[0]) if not covered(e * per, (e + 1) * per)]
        # an expert slot narrowed to a smaller tensor (``Op.spans``) is written in part, not missing
        part = [e for e in absent if any(s < (e + 1) * per and e * per < end for s, end in merged)]
        none = [e for e in absent if e not in part]
        return (("expert " + collapse.render_set(none),) if none else ()) + (
            ("part of expert " + collapse.render_set(part),) if part else ()
        )
    if p.loader == "stacked" and p.slots:
        row = 1 if p.slots[0][2] == 1 and len(p.shape) == 1 else numel(p.shape[1:])
        return tuple(f"shard {sid}" for sid, off, size in p.slots if not covered(off * row, (off + size) * row))
    gaps, pos = [], 0
    for s, e in merged:
        if s > pos:
            gaps.append(f"elements {pos}..{s - 1}")
        pos = max(pos, e)
    if pos < numel(p.shape):
        gaps.append(f"elements {pos}..{numel(p.shape) - 1}")
    return tuple(gaps)


class FileSamples(NamedTuple):
    """What the shard files hold at every tensor's sample elements (the first ``k``, the last ``k``, ``k`` from a
    seeded middle), read through a memory map of their own from the headers' offsets alone.

    Taken per tensor from the headers (``file_samples``), a block a shard: every op reads a whole tensor (a
    broadcast its one element), so a tensor's samples serve whatever op the plan makes of it, picked by row
    (``expected_samples``) without a memory map per op group.
    """

    k: int
    #: Shard → (its block, the first byte of every tensor with data and a torch dtype → its row).
    rows: dict[str, tuple[int, dict[int, int]]]
    #: Per block (one shard's tensors): the bytes kept of each element (the shard's widest element; a narrower
    #: element's own bytes come first), the elements' positions in their tensor (int64, ``n × 3k``) and the
    #: bytes found there (uint8, ``n × 3k·width``).
    width: tuple[int, ...]
    rel: tuple[Any, ...]
    data: tuple[Any, ...]


#: Bytes an element of each safetensors dtype that has a torch dtype.
_ELEMENT = {dtype: ITEMSIZE[name] for dtype, name in TORCH_DTYPE.items()}
_DTYPE, _START, _END = itemgetter(1), itemgetter(3), itemgetter(4)  # TensorInfo fields


def file_samples(shards: tuple[ShardHeader, ...], samples: int) -> FileSamples:
    """Every tensor's ``3 × samples`` sample elements as the files hold them; a shard mapped at a time.

    It runs on a side thread while the bytes move, so what it does per tensor is done by C-level iterators and
    tensor operations (the page faults and the unmapping without the interpreter).
    """
    import mmap

    torch = torch_module()
    rows: dict[str, tuple[int, dict[int, int]]] = {}
    widths: list[int] = []
    rels: list[Any] = []
    datas: list[Any] = []
    w = torch.arange(samples, dtype=torch.int64)
    seed0 = 0  # a tensor's seed: its position in the checkpoint
    for shard in shards:
        ts = shard.tensors
        if not set(map(_DTYPE, ts)) <= _ELEMENT.keys() or not all(map(gt, map(_END, ts), map(_START, ts))):
            ts = tuple(t for t in ts if t.end > t.start and t.dtype in _ELEMENT)  # no data, or no torch dtype
        if not ts:
            continue
        starts = array.array("q", map(_START, ts))
        start = torch.frombuffer(starts, dtype=torch.int64)
        es = torch.frombuffer(array.array("q", map(_ELEMENT.__getitem__, map(_DTYPE, ts))), dtype=torch.int64)
        count = (torch.frombuffer(array.array("q", map(_END, ts)), dtype=torch.int64) - start) // es
        seed = torch.arange(seed0, seed0 + len(ts), dtype=torch.int64)
        seed0 += len(ts)
        last = (count - 1).unsqueeze(1)
        mid = (seed * 2654435761 % 4093 * count // 4093).unsqueeze(1)
        rel = torch.cat(
            [torch.minimum(w.unsqueeze(0), last), (last - w).clamp(min=0), torch.minimum(mid + w, last)], dim=1
        )
        width = int(es.max())
        idx = (start.unsqueeze(1) + rel * es.unsqueeze(1)).unsqueeze(2) + torch.arange(width, dtype=torch.int64)
        idx.clamp_(max=shard.file_size - 1)  # a narrow last element's spare bytes stay in the file
        with open(shard.path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        data = torch.frombuffer(mm, dtype=torch.uint8)
        try:
            # index_select: advanced indexing of a tensor over a memory map is ~50x slower here (torch 2.x CPU)
            got = data.index_select(0, idx.reshape(-1)).view(len(ts), -1)
        finally:
            del data
            mm.close()
        rows[shard.name] = (len(widths), dict(zip(starts, range(len(ts)), strict=True)))
        widths.append(width)
        rels.append(rel)
        datas.append(got)
    return FileSamples(samples, rows, tuple(widths), tuple(rels), tuple(datas))


class Expected(NamedTuple):
    """Read-back samples of one group of writes: where to look in the arena, and what must be there."""

    dtype: str  # the parameters' (arena's) dtype
    approx: bool  # mamba_A: exp may differ in the last bit between devices
    ops: tuple[Op, ...]
    index: Any  # element positions in the arena, int64, ``len(ops) × k``
    want: Any  # the expected elements as integers of their width (``word_dtype``), or float32 values when ``approx``


def expected_samples(
    ops: Sequence[Op], where: dict[str, tuple[str, int]], files: FileSamples, skip: set[int]
) -> list[Expected]:
    """The ``3 × k`` sample elements of every write (``files``: start, end, a seeded middle of its tensor) and
    what they must hold once placed: the file's bytes, converted as the op converts them.

    The expected values come from the shard files through a memory map of their own (``file_samples``), not
    from the buffers the reader used, so a wrong read and a misplaced write both show. Host only: it runs
    while the transfer is in flight.
    """
    torch = torch_module()
    rows = files.rows
    none: tuple[int, dict[int, int]] = (-1, {})
    isz = ITEMSIZE
    # (shard block, source dtype, arena dtype, kind) → the ops, their rows in the block, their first elements
    groups: dict[tuple[int, str, str, str], tuple[list[Op], list[int], list[int]]] = {}
    for op in ops:  # one pass, no call per op: 24k ops at release size
        if op.idx in skip:
            continue
        t = op.tensor
        b, of = rows.get(t.shard, none)
        row = of.get(t.start)
        if row is None:
            continue  # no data: the op writes nothing
        how = op.kind
        if how != "broadcast" and how != "corner" and op.n != (t.end - t.start) // isz[op.src]:
            raise RuntimeError(f"internal error: a {how} op that does not write its whole tensor ({op.param})")
        dst, base = where[op.param]
        key = (b, op.src, dst, how)
        mine = groups.get(key)
        if mine is None:
            mine = groups[key] = ([], [], [])
        mine[0].append(op)
        mine[1].append(row)
        mine[2].append(base + op.start)
    out: list[Expected] = []
    for (b, src, dst, kind), (group, picked, first) in groups.items():
        es, k3 = isz[src], 3 * files.k
        at = torch.tensor(picked, dtype=torch.int64)
        raw = files.data[b].index_select(0, at).view(len(group), k3, files.width[b])[:, :, :es]
        x = raw.contiguous().view(getattr(torch, src)).view(len(group), k3)
        if kind == "broadcast":  # element 0 of the tensor, into the first element of every sample
            rel = torch.zeros((len(group), k3), dtype=torch.int64)
            x = x[:, :1].repeat(1, k3)
        else:
            rel = files.rel[b].index_select(0, at)
        # Compare bits, not values: indexing kernels do not cover every float8 dtype, and a NaN equals no NaN.
        want = -torch.exp(x.float()) if kind == "mamba_A" else x.to(getattr(torch, dst)).view(word_dtype(torch, dst))
        dst_rel = torch.stack([_in_corner(r, o) for r, o in zip(rel, group, strict=True)]) if kind == "corner" else rel
        pos0 = torch.tensor(first, dtype=torch.int64)
        index = (pos0.unsqueeze(1) + dst_rel).reshape(-1)
        out.append(Expected(dst, kind == "mamba_A", tuple(group), index, want.reshape(-1)))
    return out


def _in_corner(rel, op: Op):
    """Positions in the slot of the corner op's source elements ``rel`` (row-major in the tensor's shape)."""
    out = rel.new_zeros(rel.shape)
    rest = rel.clone()
    stride = 1
    strides = []
    for w in reversed(op.within):
        strides.append(stride)
        stride *= w
    for c, st in zip(reversed(op.tensor.shape), strides, strict=True):
        out += rest % c * st
        rest //= c
    return out


class ReadBack(NamedTuple):
    """The read-back of one arena dtype: every sample's byte positions at once, and the groups they belong to."""

    dtype: str
    index: Any  # the groups' ``Expected.index``, one after the other (int64, on the host)
    groups: tuple[Expected, ...]


def read_back(expected: list[Expected]) -> list[ReadBack]:
    """``expected`` gathered by arena dtype, each dtype's positions in one tensor: the host work of ``compare``
    that needs no device memory, done on the side thread before the last byte lands."""
    torch = torch_module()
    out = []
    for dtype in dict.fromkeys(e.dtype for e in expected):
        mine = tuple(e for e in expected if e.dtype == dtype)
        out.append(ReadBack(dtype, torch.cat([e.index for e in mine]), mine))
    return out


def compare(reads: list[ReadBack], arenas: Arenas) -> tuple[int, dict[str, int]]:
    """Gather every sample from the device (one gather per dtype) and compare.

    Returns (elements checked, mismatches per parameter).
    """
    torch = arenas.torch
    checked = 0
    bad: dict[str, int] = {}
    for r in reads:
        raw = arenas.raw[r.dtype]
        words = raw.view(word_dtype(torch, r.dtype))
        got = words[r.index.to(raw.device)].cpu().split([e.index.numel() for e in r.groups])
        for e, g in zip(r.groups, got, strict=True):
            if e.approx:
                ok = torch.isclose(g.view(torch.float32), e.want, rtol=1e-5, atol=0.0)
            else:
                ok = g == e.want
            checked += ok.numel()
            if bool(ok.all()):
                continue
            for o, n in zip(e.ops, (~ok).view(len(e.ops), -1).sum(dim=1).tolist(), strict=True):
                if n:
                    bad[o.param] = bad.get(o.param, 0) + n
    return checked, bad
