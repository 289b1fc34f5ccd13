"""Checks of a load: what the plan covers, and what device memory says after the bytes landed.

Coverage is bookkeeping of the plan (which elements of each parameter some op writes, which twice,
which slots are missing); the read-back is memory itself: elements of every write gathered from
the device and compared with the bytes in the shard files (read through a memory map of their
own, not the reader's buffers), so a misplaced slice shows up here. The poison scan is
``Arenas.poisoned``. torch is imported inside functions only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from nhcheck import collapse
from nhcheck.dtypes import ITEMSIZE, numel
from nhcheck.load.memory import Arenas, torch_module
from nhcheck.load.plan import Op
from nhcheck.manifest import Param


class Coverage(NamedTuple):
    """What the plan writes of one parameter: elements written, the slots it misses, writes over earlier ones."""

    written: int
    missing: tuple[str, ...]
    double_writes: int


def coverage(params: tuple[Param, ...], ops: tuple[Op, ...]) -> tuple[dict[str, Coverage], set[int]]:
    """Per parameter: (written elements, missing slots, double writes); plus the ops a later op overwrote."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for op in ops:
        mine = spans.get(op.param)
        if mine is None:
            mine = spans[op.param] = []
        if op.kind == "corner":
            mine.extend((a, b, op.idx) for a, b in op.spans())
        else:  # one range, the slot (``Op.spans``), without the list
            mine.append((op.start, op.start + op.n, op.idx))
    out: dict[str, Coverage] = {}
    overwritten: set[int] = set()
    for p in params:
        total = numel(p.shape)
        mine = sorted(spans.get(p.name, ()))
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


class Expected(NamedTuple):
    """Read-back samples of one group of writes: where to look in the arena, and what must be there."""

    dtype: str  # the parameters' (arena's) dtype
    approx: bool  # mamba_A: exp may differ in the last bit between devices
    ops: tuple[Op, ...]
    index: Any  # byte positions in the arena, int64, ``len(ops) × k × itemsize``
    want: Any  # the expected bytes (uint8), or float32 values when ``approx``


def expected_samples(
    ops: tuple[Op, ...], where: dict[str, tuple[str, int]], samples: int, skip: set[int]
) -> list[Expected]:
    """Pick ``3 × samples`` elements of every write (start, end, a seeded middle) and read what they must hold.

    The expected values come from the shard files through a memory map of their own, not from
    the buffers the reader used, so a wrong read and a misplaced write both show. Host only:
    it runs while the transfer is in flight.
    """
    import mmap

    torch = torch_module()
    groups: dict[tuple[str, str, str, str], list[Op]] = {}
    for op in ops:
        if op.idx not in skip:
            groups.setdefault((op.path, op.src, where[op.param][0], op.kind), []).append(op)
    out: list[Expected] = []
    maps: dict[str, tuple] = {}
    try:
        for (path, src, dst, kind), group in groups.items():
            if path not in maps:
                with open(path, "rb") as fh:
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                maps[path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
            data = maps[path][1]
            pos0 = torch.tensor([where[o.param][1] + o.start for o in group], dtype=torch.int64)
            count = torch.tensor([o.src_elements for o in group], dtype=torch.int64)
            src0 = torch.tensor([o.tensor.start for o in group], dtype=torch.int64)
            seed = torch.tensor([o.idx for o in group], dtype=torch.int64)
            w = torch.arange(samples, dtype=torch.int64)
            last = (count - 1).unsqueeze(1)
            mid = ((seed * 2654435761) % 4093 * count // 4093).unsqueeze(1)
            rel = torch.cat(
                [torch.minimum(w.unsqueeze(0), last), (last - w).clamp(min=0), torch.minimum(mid + w, last)], dim=1
            )
            es, de = ITEMSIZE[src], ITEMSIZE[dst]
            src_rel = torch.zeros_like(rel) if kind == "broadcast" else rel
            idx = (src0.unsqueeze(1) + src_rel * es).unsqueeze(2) + torch.arange(es, dtype=torch.int64)
            # index_select: advanced indexing of a tensor over a memory map is ~50x slower here (torch 2.x CPU)
            x = data.index_select(0, idx.reshape(-1)).view(getattr(torch, src))
            # Compare bytes, not elements: indexing kernels do not cover every float8 dtype.
            want = -torch.exp(x.float()) if kind == "mamba_A" else x.to(getattr(torch, dst)).view(torch.uint8)
            dst_rel = (
                torch.stack([_in_corner(r, o) for r, o in zip(rel, group, strict=True)]) if kind == "corner" else rel
            )
            index = (((pos0.unsqueeze(1) + dst_rel) * de).unsqueeze(2) + torch.arange(de)).reshape(-1)
            out.append(Expected(dst, kind == "mamba_A", tuple(group), index, want))
    finally:
        for mm, view in maps.values():
            del view
            mm.close()
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


def compare(expected: list[Expected], arenas: Arenas) -> tuple[int, dict[str, int]]:
    """Gather every sample from the device (one gather per dtype) and compare.

    Returns (elements checked, mismatches per parameter).
    """
    torch = arenas.torch
    checked = 0
    bad: dict[str, int] = {}
    for dtype in {e.dtype for e in expected}:
        mine = [e for e in expected if e.dtype == dtype]
        raw = arenas.raw[dtype]
        got = raw[torch.cat([e.index for e in mine]).to(raw.device)].cpu().split([e.index.numel() for e in mine])
        de = ITEMSIZE[dtype]
        for e, g in zip(mine, got, strict=True):
            if e.approx:
                ok = torch.isclose(g.view(torch.float32), e.want, rtol=1e-5, atol=0.0)
            else:
                ok = (g.view(-1, de) == e.want.view(-1, de)).all(dim=1)
            checked += ok.numel()
            for o, n in zip(e.ops, (~ok).view(len(e.ops), -1).sum(dim=1).tolist(), strict=True):
                if n:
                    bad[o.param] = bad.get(o.param, 0) + n
    return checked, bad
