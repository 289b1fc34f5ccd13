"""``nhcheck load``: prove on real hardware that a checkpoint fills the runtime parameters.

The audit says, from headers, what the engine does with every tensor. This module does it:
allocate every runtime parameter of the manifest on the device with the engine's layout
(fused ``qkv_proj``, fused expert tensors, per-expert scale slots, Mamba ``A``), poison the
memory, stream the shard bytes in the engine's order and apply the audit's decisions with the
loader's semantics (q/k/v row block, one expert's slice, a scalar scale into its slot or
broadcast over the partitions, ``A = -exp(A_log)``). Where the chosen engine raises, stop
there. Then check the memory itself: coverage of every parameter, poison left behind, and a
read-back sample of every write compared with the bytes in the file (a misplaced slice shows
up there, not in any bookkeeping).

Two readers share one plan. ``fast`` (default) reads coalesced byte ranges with a thread pool
of ``os.preadv`` into a bounded ring of (pinned, on CUDA) host buffers and places them with
asynchronous copies on one stream; ``safetensors`` is the plain reference: ``safe_open`` one
shard at a time, one ``get_tensor`` per tensor in stream order.

torch is imported inside functions only: nothing ``audit`` imports may pay for it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from nhcheck import __version__, collapse, engines, slots
from nhcheck.audit import AuditOptions, AuditReport, TensorRecord, _grouped
from nhcheck.checkpoint import Checkpoint, open_local
from nhcheck.engines.base import Crash
from nhcheck.errors import CheckpointError, UsageError
from nhcheck.findings import Finding, Verdict, verdict_of
from nhcheck.manifest import Param
from nhcheck.quant import LINEAR_METHODS
from nhcheck.safetensors_header import TensorInfo

SCHEMA = "nhcheck.load/1"
READERS = ("fast", "safetensors")
DTYPES = ("auto", "bfloat16", "float16", "float32")

#: safetensors dtype → torch dtype name (F4/F6 have none: such a tensor cannot be copied).
TORCH_DTYPE = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
ITEMSIZE = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,
}
_FLOAT = frozenset({"bfloat16", "float16", "float32", "float64"})
_BITS = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}
#: Integer parameters hold any byte legitimately; poison there is a run of this many 0xFF bytes.
_POISON_RUN = 16
#: Elements per slice of the poison scan (bounds its temporaries).
_SCAN = 1 << 26

#: Kept across loads: the pinned ring (pinning costs more than the reads) and one stream per device
#: (the caching allocator reuses memory only on the stream that freed it).
_CACHE: dict[Any, Any] = {}
_PENDING = object()  # a landing buffer being allocated


@dataclass(frozen=True)
class LoadOptions:
    """How to load. Sizes are bytes; ``threads`` 0 means min(16, CPU count).

    ``chunk_bytes``: one read; ``pinned_bytes``: the host ring those reads land in;
    ``landing_bytes``: device memory for shards read but not yet placed (at least one shard).
    """

    device: str = "cuda"
    dtype: str = "auto"
    reader: str = "fast"
    threads: int = 0
    chunk_bytes: int = 16 << 20
    pinned_bytes: int = 512 << 20
    samples: int = 4
    landing_bytes: int = 4 << 30


class Op(NamedTuple):
    """One checkpoint tensor placed into one slot of one runtime parameter.

    ``idx``: the tensor's position in the audit. ``start``/``n``: the slot as a range of the
    flattened parameter (every slot the engine fills is a contiguous range: dim 0 is the q/k/v
    row block or the expert). ``kind``:
    ``copy`` (same dtype, bytes), ``cast`` (float to float), ``broadcast`` (one scalar into every
    partition), ``mamba_A`` (``-exp(float(x))``).
    """

    idx: int
    tensor: TensorInfo
    path: str
    param: str
    kind: str
    src: str
    start: int
    n: int
    slot: str


class _Mismatch(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Plan:
    """What the load will do, decided from the audit before any byte moves."""

    ops: tuple[Op, ...]
    params: tuple[Param, ...]
    findings: tuple[Finding, ...]
    crash: Crash | None
    unreachable: tuple[str, ...]


@dataclass(frozen=True)
class ParamLoad:
    """One runtime parameter after the load: which of its elements were written, and what memory says."""

    param: Param
    status: str  # filled | partial | unfilled | unreachable
    written: int
    missing: tuple[str, ...] = ()
    double_writes: int = 0
    poisoned: int = 0
    mismatches: int = 0

    @property
    def numel(self) -> int:
        return _numel(self.param.shape)


@dataclass(frozen=True)
class LoadReport:
    audit: AuditReport
    device: str
    device_name: str
    reader: str
    tensors_loaded: int
    bytes_loaded: int
    bytes_read: int
    seconds: float
    timings: dict[str, float]
    peak_device_bytes: int | None
    params: tuple[ParamLoad, ...]
    findings: tuple[Finding, ...]
    crash: Crash | None
    verdict: Verdict
    samples_checked: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes_loaded / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def exit_code(self) -> int:
        return 0 if self.verdict == "clean" else 1


@dataclass(frozen=True)
class LoadResult:
    """The report, and the loaded parameters (views with the engine's shapes) for callers that want them."""

    report: LoadReport
    arenas: Arenas = field(repr=False)

    @property
    def tensors(self) -> dict[str, Any]:
        return self.arenas.tensors()


# ---------------------------------------------------------------------------
# Planning (no torch)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def runtime_params(report: AuditReport, dtype: str = "auto") -> tuple[tuple[Param, ...], tuple[str, ...]]:
    """The parameters to allocate (reachable ones, in the runtime dtype) and the unreachable names.

    ``dtype`` overrides the model dtype as SGLang's ``--dtype`` does: parameters built in the
    config's dtype change, explicit float32 ones (scales, ``A``, router bias) and quantized
    storage do not.
    """
    model = report.config.dtype if report.config.dtype in _FLOAT else "bfloat16"
    out, unreachable = [], []
    for p in report.manifest.params:
        if not p.reachable:
            unreachable.append(p.name)
            continue
        if p.dtype not in ITEMSIZE or (not p.shape and p.dtype == "unknown"):
            raise UsageError(
                f"the manifest gives no usable dtype/shape for {p.name} ({p.dtype} {list(p.shape)}); "
                "load needs a manifest with shapes and dtypes (nhcheck JSON or a {name: {shape, dtype}} dump)"
            )
        if (
            dtype != "auto"
            and p.dtype == model
            and p.loader != "mamba_A"
            and not slots.is_scale(p.name)
            and not p.name.endswith("e_score_correction_bias")
        ):
            p = Param(
                p.name,
                p.shape,
                dtype,
                p.quant_method,
                p.loader,
                p.slots,
                p.num_experts,
                p.shard_ids,
                p.reachable,
                p.informational,
            )
        out.append(p)
    return tuple(out), tuple(unreachable)


def _place(
    p: Param, shape: tuple[int, ...], shard_id: str | None, expert_id: int | None, every_slot: bool = True
) -> tuple[int, int, str, bool]:
    """(first element, element count, slot label, broadcast?) of the slot a tensor of ``shape`` fills in ``p``.

    Mirrors the loaders: FusedMoE puts expert e at ``[e]`` (a scalar scale into a one-element
    slot); the stacked loader puts the q/k/v row block at its offset (a scalar scale at its
    index); the default loader copies the whole tensor, fills a one-element parameter from
    any one-element tensor, and puts a scalar scale into a per-partition scale vector: over
    every partition with ``every_slot``, else into slot 0 only (``Engine.scalar_fills_every_slot``).
    """
    n = _numel(shape)
    pshape = p.shape
    if p.loader == "expert":
        experts = pshape[0] if pshape else 0
        if expert_id is None or not 0 <= expert_id < experts:
            raise _Mismatch("shape-mismatch", f"expert {expert_id} outside {p.name} ({experts} experts)")
        sub = pshape[1:]
        per = _numel(sub)
        if sub in ((), (1,)):
            if n != 1:
                raise _Mismatch("shape-mismatch", f"{list(shape)} into the one-element slot [{expert_id}] of {p.name}")
        elif tuple(shape) != sub:
            raise _Mismatch("shape-mismatch", f"{list(shape)} but {p.name} expects {list(sub)} per expert")
        return expert_id * per, per, f"expert {expert_id}", False
    if p.loader == "stacked":
        if not p.slots:
            raise _Mismatch("no-layout", f"the manifest gives no q/k/v layout for {p.name}")
        slot = next((s for s in p.slots if s[0] == shard_id), None)
        if slot is None:
            raise _Mismatch("shape-mismatch", f"{p.name} has no shard {shard_id!r}")
        sid, off, size = slot
        if size == 1 and len(pshape) == 1 and pshape[0] == len(p.slots):
            if n != 1 or len(shape) > 1:  # PerTensorScaleParameter._load_into_shard_id: () or (1,) only
                raise _Mismatch("shape-mismatch", f"{list(shape)} into the one-element slot {sid} of {p.name}")
            return off, 1, f"shard {sid}", False
        want = (size,) + tuple(pshape[1:])
        if tuple(shape) != want:
            raise _Mismatch("shape-mismatch", f"{list(shape)} but {p.name} expects {list(want)} for shard {sid}")
        row = _numel(pshape[1:])
        return off * row, size * row, f"shard {sid}", False
    numel = _numel(pshape)
    if n == 1 and len(shape) > 1 and p.quant_method in LINEAR_METHODS and slots.is_scale(p.name):
        raise _Mismatch(
            "shape-mismatch",
            f"{list(shape)} into the one-element scale {p.name}: the linear loader "
            "reshapes only a 0-d scale and asserts equal shapes",
        )
    if tuple(shape) == tuple(pshape) or (n == 1 and numel == 1):
        return 0, numel, "whole", False
    if slots.scalar_into_vector(p, shape):
        if not every_slot:
            return 0, 1, "slot 0", False
        return 0, numel, "every partition", True
    raise _Mismatch("shape-mismatch", f"{list(shape)} but {p.name} is {list(pshape)}")


def _kind(p: Param, t: TensorInfo) -> str:
    """How the bytes of ``t`` may enter ``p``; a quantization or dtype mismatch is refused, not copied.

    Checked before the shape: packed NVFP4 bytes meeting a bf16 parameter also differ in
    shape, but the quantization is the cause worth naming.
    """
    src = TORCH_DTYPE.get(t.dtype)
    dst = p.dtype
    if src is None:
        raise _Mismatch(
            "dtype-mismatch", f"{t.dtype} has no torch dtype; cannot be placed in the {dst} parameter {p.name}"
        )
    if (src in _FLOAT) != (dst in _FLOAT):
        what = (
            f"quantized ({t.dtype}) bytes into the unquantized {dst} parameter"
            if dst in _FLOAT
            else f"an unquantized {t.dtype} tensor into the quantized {dst} parameter"
        )
        raise _Mismatch("quant-mismatch", f"would load {what} {p.name}; not copied")
    if p.loader == "mamba_A":
        return "mamba_A"
    if src != dst and src not in _FLOAT:
        raise _Mismatch("dtype-mismatch", f"{t.dtype} into the {dst} parameter {p.name}; not copied")
    return "copy" if src == dst else "cast"


def stream_order(report: AuditReport) -> list[TensorRecord]:
    """The records in the order the engine meets them (a buffering VL wrapper routes everything first)."""
    recs = list(report.records)
    engine = engines.get(report.engine)
    if not engine.routes_before_lm(report.config, mtp=report.mtp):
        return recs
    is_lm = [engine.route(r.tensor.name, report.config).target == "lm" for r in recs]
    return [r for r, lm in zip(recs, is_lm, strict=True) if not lm] + [
        r for r, lm in zip(recs, is_lm, strict=True) if lm
    ]


def plan_load(report: AuditReport, dtype: str = "auto") -> Plan:
    """Every copy the load makes, in stream order, up to the tensor where the engine raises."""
    params, unreachable = runtime_params(report, dtype)
    by_name = {p.name: p for p in params}
    engine = engines.get(report.engine)
    paths = {s.name: s.path for s in report.checkpoint.shards}
    ops: list[Op] = []
    refused: list[tuple[str, str, Finding]] = []
    crash: Crash | None = None
    if report.crash is not None and report.crash.tensor is None:
        crash = report.crash
    for i, r in enumerate(stream_order(report) if crash is None else ()):
        o = r.outcome
        if o.outcome == "raise":
            crash = Crash(o.message or "", r.tensor.name, r.tensor.shard, index=i)
            break
        if o.outcome != "load":
            continue
        t = r.tensor
        p = by_name.get(r.param or "")
        if p is None:
            continue  # an unreachable parameter: nothing the engine keeps
        try:
            kind = _kind(p, t)
            start, count, slot, bcast = _place(
                p, t.shape, o.shard_id, o.expert_id, engine.scalar_fills_every_slot(p.quant_method)
            )
        except _Mismatch as exc:
            refused.append((exc.code, t.name, Finding("error", exc.code, str(exc), t.shard, t.name)))
            continue
        ops.append(
            Op(i, t, paths[t.shard], p.name, "broadcast" if bcast else kind, TORCH_DTYPE[t.dtype], start, count, slot)
        )
    return Plan(tuple(ops), params, tuple(_grouped(refused)), crash, tuple(unreachable))


# ---------------------------------------------------------------------------
# Device memory


def _torch():
    import torch

    return torch


def resolve_device(spec: str):
    """``cpu``, ``cuda`` or ``cuda:N`` → a torch device; a missing GPU is a usage error (exit 2)."""
    torch = _torch()
    spec = spec.strip()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: CUDA is not available (torch {torch.__version__}); "
                "use --device cpu to check the placement logic without a GPU"
            )
        index = int(spec[5:]) if ":" in spec else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise UsageError(f"--device {spec!r}: expected cpu, cuda or cuda:N")


def layout(params: tuple[Param, ...]) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """Where each parameter lives: (dtype arena, first element); and each arena's element count."""
    where: dict[str, tuple[str, int]] = {}
    totals: dict[str, int] = {}
    for p in params:
        off = totals.get(p.dtype, 0)
        where[p.name] = (p.dtype, off)
        totals[p.dtype] = off + _numel(p.shape)
    return where, totals


class Arenas:
    """One allocation per dtype, poisoned with 0xFF bytes (NaN in every float format, 255 in uint8).

    Each parameter is a contiguous view with the engine's shape, so placement is the engine's;
    poisoning and the poison scan are one kernel per dtype instead of one per parameter.
    Parameters the engine initialises itself (KV scales at -1, A16 input-scale placeholders at
    1, spec §5.1 quirk 9) get that value instead of poison.
    """

    def __init__(self, params: tuple[Param, ...], device, torch) -> None:
        self.torch = torch
        self.params = {p.name: p for p in params}
        self.where, totals = layout(params)
        self.raw = {
            d: torch.empty(n * ITEMSIZE[d], dtype=torch.uint8, device=device).fill_(0xFF) for d, n in totals.items()
        }
        self.typed = {d: b.view(getattr(torch, d)) for d, b in self.raw.items()}
        for p in params:
            if p.informational:
                self.flat(p.name).fill_(-1.0 if p.name.endswith(("k_scale", "v_scale")) else 1.0)

    def flat(self, name: str):
        dtype, off = self.where[name]
        return self.typed[dtype][off : off + _numel(self.params[name].shape)]

    def tensors(self) -> dict[str, Any]:
        return {n: self.flat(n).view(p.shape) for n, p in self.params.items()}

    def poisoned(self) -> dict[str, int]:
        """Elements still holding the poison pattern, per parameter (one scan per dtype first)."""
        torch = self.torch
        out: dict[str, int] = {}
        totals = [self._count(dtype, raw) for dtype, raw in self.raw.items()]
        for (dtype, _raw), total in zip(self.raw.items(), torch.stack(totals).tolist() if totals else (), strict=True):
            if total == 0:
                continue
            for name, (d, _) in self.where.items():
                if d == dtype:
                    flat = self.flat(name)
                    n = int(self._count(dtype, flat.view(torch.uint8))) if flat.numel() else 0
                    if n:
                        out[name] = n
        return out

    def _count(self, dtype: str, raw):
        """Poisoned elements in the bytes ``raw`` (a 0-d tensor on the device, no host sync): all-ones
        floats, or 16-byte runs of 0xFF in integer storage. Scanned in slices so the temporaries stay small."""
        torch = self.torch
        total = torch.zeros((), dtype=torch.int64, device=raw.device)
        if dtype in _FLOAT or dtype.startswith("float8"):
            words = raw.view(getattr(torch, _BITS[ITEMSIZE[dtype]]))
            for i in range(0, words.numel(), _SCAN):
                total += (words[i : i + _SCAN] == -1).sum()
            return total
        head = -raw.data_ptr() % 8
        n = max(0, (raw.numel() - head) // _POISON_RUN * _POISON_RUN)
        words = raw[head : head + n].view(torch.int64).view(-1, _POISON_RUN // 8)
        for i in range(0, words.shape[0], _SCAN):
            part = words[i : i + _SCAN]
            hit = part[:, 0] == -1
            for j in range(1, _POISON_RUN // 8):
                hit &= part[:, j] == -1
            total += hit.sum() * _POISON_RUN
        return total


def _write(arenas: Arenas, op: Op, x) -> None:
    """Apply one op from its typed source tensor ``x``."""
    flat = arenas.flat(op.param)
    if op.kind == "broadcast":
        flat[op.start : op.start + op.n].copy_(x.reshape(1).expand(op.n))
        return
    dst = flat[op.start : op.start + op.n]
    dst.copy_(x.reshape(-1))
    if op.kind == "mamba_A":
        dst.exp_().neg_()


# ---------------------------------------------------------------------------
# Readers


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


def _buffer(t, offset: int, size: int) -> memoryview:
    """A writable memoryview over ``size`` bytes of a CPU tensor (for ``os.preadv``), without numpy."""
    return memoryview((ctypes.c_char * size).from_address(t.data_ptr() + offset)).cast("B")


def _read(fd: int, path: str, view: memoryview, offset: int, size: int, wait) -> None:
    if wait is not None:
        wait.synchronize()  # the slot's previous host-to-device copy must be done before we overwrite it
    got = 0
    while got < size:
        try:
            n = os.preadv(fd, [view[got:size]], offset + got)
        except OSError as exc:
            raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
        if n == 0:
            raise CheckpointError(path, f"file ends at byte {offset + got}, inside tensor data its header declares")
        got += n


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


def _apply(pieces: list[Piece], src, arenas: Arenas) -> None:
    """Place one shard's ops from ``src``: same-dtype ones as one batched byte copy, the rest through ``_write``."""
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
        _write(arenas, op, x.view(getattr(torch, op.src)))
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
        self.views = [_buffer(self.ring, i * self.slot, self.slot) for i in range(self.nslots)]
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
                        _read(
                            self.fds[r.shard],
                            span.path,
                            self.views[s],
                            r.start,
                            n,
                            self.events[s] if self.cuda and self.slot_used[s] else None,
                        )
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
                    _apply(pieces[i], buf, arenas)
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


def _run_safetensors(ops: tuple[Op, ...], arenas: Arenas, device) -> int:
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
                _write(arenas, op, x)
                total += op.tensor.nbytes
        i = j
    if device.type == "cuda":
        arenas.torch.cuda.synchronize(device)
    return total


# ---------------------------------------------------------------------------
# Checks: coverage, read-back, poison


def _coverage(params: tuple[Param, ...], ops: tuple[Op, ...]) -> tuple[dict[str, tuple], set[int]]:
    """Per parameter: (written elements, missing slots, double writes); plus the ops a later op overwrote."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for op in ops:
        spans.setdefault(op.param, []).append((op.start, op.start + op.n, op.idx))
    out: dict[str, tuple] = {}
    overwritten: set[int] = set()
    for p in params:
        numel = _numel(p.shape)
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
        missing = () if written >= numel else _missing(p, merged)
        out[p.name] = (written, missing, doubles)
    return out, overwritten


def _missing(p: Param, merged: list[list[int]]) -> tuple[str, ...]:
    def covered(a: int, b: int) -> bool:
        return any(s <= a and b <= e for s, e in merged)

    if not merged:
        return ("all",)
    if p.loader == "expert" and p.shape:
        per = _numel(p.shape[1:])
        absent = [e for e in range(p.shape[0]) if not covered(e * per, (e + 1) * per)]
        return ("expert " + collapse.render_set(absent),) if absent else ()
    if p.loader == "stacked" and p.slots:
        row = 1 if p.slots[0][2] == 1 and len(p.shape) == 1 else _numel(p.shape[1:])
        return tuple(f"shard {sid}" for sid, off, size in p.slots if not covered(off * row, (off + size) * row))
    gaps, pos = [], 0
    for s, e in merged:
        if s > pos:
            gaps.append(f"elements {pos}..{s - 1}")
        pos = max(pos, e)
    if pos < _numel(p.shape):
        gaps.append(f"elements {pos}..{_numel(p.shape) - 1}")
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

    torch = _torch()
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
            count = torch.tensor([o.n for o in group], dtype=torch.int64)
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
            x = data[idx.reshape(-1)].view(getattr(torch, src))
            # Compare bytes, not elements: indexing kernels do not cover every float8 dtype.
            want = -torch.exp(x.float()) if kind == "mamba_A" else x.to(getattr(torch, dst)).view(torch.uint8)
            index = (((pos0.unsqueeze(1) + rel) * de).unsqueeze(2) + torch.arange(de)).reshape(-1)
            out.append(Expected(dst, kind == "mamba_A", tuple(group), index, want))
    finally:
        for mm, view in maps.values():
            del view
            mm.close()
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


# ---------------------------------------------------------------------------
# The whole load


def _check_options(opts: LoadOptions) -> None:
    if opts.reader not in READERS:
        raise UsageError(f"--reader {opts.reader!r}: expected one of {', '.join(READERS)}")
    if opts.dtype not in DTYPES:
        raise UsageError(f"--dtype {opts.dtype!r}: expected one of {', '.join(DTYPES)}")


@contextmanager
def _prompt_handover() -> Iterator[None]:
    """Reader threads need the interpreter for microseconds per piece while the main thread parses
    and audits; the default 5 ms switch interval would make each of them wait that long."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def load_checkpoint(
    ckpt: Checkpoint,
    engine: str | None = None,
    opts: LoadOptions = LoadOptions(),
    *,
    manifest_file: str | None = None,
    moe_backend: str | None = None,
    mtp: bool = False,
    pp: tuple[int, int] | None = None,
    t0: float | None = None,
    transfer: Transfer | None = None,
) -> LoadResult:
    """Audit, plan, allocate, load, check.

    ``pp`` is (rank, size) of one pipeline rank; ``t0`` lets a caller count the header reading
    in the wall time; ``transfer``, already reading ``ckpt``'s shards, is taken over (and closed).
    """
    from nhcheck import pipeline

    def decide() -> AuditReport:
        inputs = pipeline.prepare(ckpt, engine, manifest_file=manifest_file, moe_backend=moe_backend, mtp=mtp, pp=pp)
        return pipeline.audit(inputs, AuditOptions(compare_versions=False))

    return _load(ckpt, decide, opts, t0, transfer)


def load_audited(audit: AuditReport, opts: LoadOptions = LoadOptions()) -> LoadResult:
    """Load with decisions already made (an ``AuditReport`` of this process): the load proper, from the first byte."""
    return _load(audit.checkpoint, lambda: audit, opts, None, None)


def _load(ckpt: Checkpoint, decide, opts: LoadOptions, t0: float | None, transfer: Transfer | None) -> LoadResult:
    t_start = time.perf_counter()
    t0 = t_start if t0 is None else t0
    with ExitStack() as stack:
        if transfer is not None:
            stack.enter_context(transfer)
        _check_options(opts)
        torch = _torch()
        device = resolve_device(opts.device)
        cuda = device.type == "cuda"
        stack.enter_context(_prompt_handover())
        if transfer is None and opts.reader == "fast":
            transfer = stack.enter_context(Transfer(spans_of(ckpt.shards), device, opts, torch))
        baseline = transfer.baseline if transfer is not None else _baseline(torch, device)
        audit = decide()
        t_audit = time.perf_counter()
        plan = plan_load(audit, opts.dtype)
        cov, overwritten = _coverage(plan.params, plan.ops)
        side = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        # the file side of the read-back check needs only the plan: do it while the bytes move
        expected = side.submit(expected_samples, plan.ops, layout(plan.params)[0], max(1, opts.samples), overwritten)
        t_plan = time.perf_counter()
        arenas = Arenas(plan.params, device, torch)
        t_alloc = time.perf_counter()
        if transfer is not None:
            read = transfer.place(plan.ops, arenas)
        else:
            read = _run_safetensors(plan.ops, arenas, device)
        t_data = time.perf_counter()
        checked, bad = compare(expected.result(), arenas)
    poison = arenas.poisoned() if plan.crash is None else {}
    loaded = sum(op.tensor.nbytes for op in plan.ops)
    crash = None
    if plan.crash is not None:
        crash = replace(
            plan.crash, index=None, tensors_loaded=len(plan.ops), bytes_loaded=loaded, seconds=round(t_data - t0, 6)
        )
    params = tuple(_param_load(p, cov[p.name], poison.get(p.name, 0), bad.get(p.name, 0)) for p in plan.params)
    findings = _findings(audit, plan, params, crash)
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else None
    t_end = time.perf_counter()
    report = LoadReport(
        audit=audit,
        device=str(device),
        device_name=torch.cuda.get_device_name(device)
        if cuda
        else (platform.processor() or platform.machine() or "cpu"),
        reader=opts.reader,
        tensors_loaded=len(plan.ops),
        bytes_loaded=loaded,
        bytes_read=read,
        seconds=t_end - t0,
        timings={
            "headers": t_start - t0,
            "audit": t_audit - t_start,
            "plan": t_plan - t_audit,
            "allocate": t_alloc - t_plan,
            "transfer": t_data - t_alloc,
            "check": t_end - t_data,
        },
        peak_device_bytes=peak,
        params=params,
        findings=tuple(findings),
        crash=crash,
        verdict=verdict_of(findings, crash is not None),
        samples_checked=checked,
    )
    return LoadResult(report, arenas)


def _baseline(torch, device) -> int:
    """Start counting peak device memory from here; returns what is already allocated."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def load_path(
    path: str,
    engine: str | None = None,
    opts: LoadOptions = LoadOptions(),
    *,
    progress=None,
    t0: float | None = None,
    **kw: Any,
) -> LoadResult:
    """Load a local checkpoint, the reads starting while its headers are parsed; the wall time counts both."""
    t0 = time.perf_counter() if t0 is None else t0
    _check_options(opts)
    spans = quick_spans(path) if opts.reader == "fast" else None
    with _prompt_handover():
        transfer = Transfer(spans, resolve_device(opts.device), opts, _torch()) if spans else None
        try:
            ckpt = open_local(path, progress)
        except BaseException:
            if transfer is not None:
                transfer.close()
            raise
        if transfer is not None and spans_of(ckpt.shards) != transfer.spans:
            transfer.close()  # the guess missed (an index that lists other files): start over from the headers
            transfer = None
        return load_checkpoint(ckpt, engine, opts, t0=t0, transfer=transfer, **kw)


def load_source(
    source: str,
    revision: str | None = None,
    engine: str | None = None,
    opts: LoadOptions = LoadOptions(),
    *,
    progress=None,
    t0: float | None = None,
    **kw: Any,
) -> LoadResult:
    """What the CLI loads: a local path (reads start at once), or a Hub repo downloaded to the cache first."""
    if os.path.exists(source) and not revision:
        return load_path(source, engine, opts, progress=progress, t0=t0, **kw)
    return load_checkpoint(open_for_load(source, revision, progress), engine, opts, t0=t0, **kw)


def open_for_load(source: str, revision: str | None = None, progress=None) -> Checkpoint:
    """A local checkpoint, or a Hub repo downloaded to the local cache: loading needs the bytes, not just headers."""
    from nhcheck.sources import looks_like_repo_id

    if os.path.exists(source):
        if revision:
            raise CheckpointError(source, "--revision applies to Hub repo ids, not local paths")
        return open_local(source, progress)
    if not looks_like_repo_id(source):
        raise CheckpointError(source, "no such file or directory, and not a Hub repo id (owner/name)")
    from nhcheck.hub import materialize

    ckpt = open_local(materialize(source, revision, progress=progress is not None), progress)
    return Checkpoint(
        source,
        ckpt.root,
        ckpt.config,
        ckpt.hf_quant_config,
        ckpt.shards,
        ckpt.index,
        ckpt.findings,
        ckpt.sidecars,
        revision,
        ckpt.bytes_transferred,
        ckpt.missing_shards,
    )


def _param_load(p: Param, cov: tuple, poisoned: int, mismatches: int) -> ParamLoad:
    written, missing, doubles = cov
    status = "filled" if written >= _numel(p.shape) else "partial" if written else "unfilled"
    return ParamLoad(p, status, written, missing, doubles, poisoned, mismatches)


def _findings(audit: AuditReport, plan: Plan, params: tuple[ParamLoad, ...], crash: Crash | None) -> list[Finding]:
    out: list[Finding] = [f for f in audit.checkpoint.findings]
    if crash is not None:
        out.append(
            Finding(
                "error",
                "crash",
                f"{audit.engine.label} raises {crash.error}{crash.where} after "
                f"{crash.tensors_loaded or 0:,} tensors, {crash.bytes_loaded or 0:,} bytes, "
                f"{crash.seconds or 0:.2f} s; the load stops here",
                crash.shard,
                crash.tensor,
            )
        )
    out += plan.findings
    items: list[tuple[str, str, Finding]] = []
    for s in params:
        p = s.param
        if s.mismatches:
            items.append(
                (
                    "readback",
                    p.name,
                    Finding(
                        "error",
                        "readback-mismatch",
                        "read back differs from the checkpoint bytes (misplaced or wrong data)",
                        None,
                        p.name,
                    ),
                )
            )
        if s.double_writes:
            items.append(
                (
                    "double",
                    p.name,
                    Finding(
                        "error",
                        "double-write",
                        "written more than once; the last tensor in stream order wins",
                        None,
                        p.name,
                    ),
                )
            )
        if crash is not None:
            continue
        if s.status == "filled" and s.poisoned:
            items.append(
                (
                    "poison",
                    p.name,
                    Finding(
                        "error", "poison-left", "every slot was written, yet poison is left in memory", None, p.name
                    ),
                )
            )
        elif s.status != "filled":
            if s.status == "partial" and slots.unwritten_kind(p, s.written) == "sentinel":
                items.append(
                    (
                        "sentinel",
                        p.name,
                        Finding("info", "param-partial", slots.SENTINEL_MESSAGE, None, p.name),
                    )
                )
            elif p.informational:
                items.append(
                    (
                        "info",
                        p.name,
                        Finding(
                            "info",
                            f"param-{s.status}",
                            "no checkpoint tensor fills it; the engine keeps its default",
                            None,
                            p.name,
                        ),
                    )
                )
            elif s.status == "partial" and slots.unwritten_kind(p, s.written) == "empty":
                items.append(
                    (
                        "slot0",
                        p.name,
                        Finding(
                            "error",
                            slots.SLOT0,
                            slots.empty_message(audit.engine.label, p, ", ".join(s.missing)),
                            None,
                            p.name,
                        ),
                    )
                )
            else:
                what = (
                    "never written: still holds the poison"
                    if s.status == "unfilled"
                    else "only partly written: missing " + ", ".join(s.missing)
                )
                items.append((s.status, p.name, Finding("error", f"param-{s.status}", what, None, p.name)))
    return out + _grouped(items)


# ---------------------------------------------------------------------------
# Rendering (same formats as audit)


def to_json(r: LoadReport) -> dict:
    from nhcheck.report import backend_and_rank_json

    a = r.audit
    count = {s: sum(1 for p in r.params if p.status == s) for s in ("filled", "partial", "unfilled")}
    return {
        "schema": SCHEMA,
        "nhcheck_version": __version__,
        "source": a.source,
        "revision": a.revision,
        "engine": {
            "name": a.engine.name,
            "version": a.engine.version,
            **backend_and_rank_json(a),
        },
        "model": {
            "architecture": a.config.wrapper or a.config.architecture,
            "pattern": a.config.pattern,
            "quant": a.quant,
        },
        "device": {"name": r.device, "description": r.device_name, "reader": r.reader},
        "summary": {
            "verdict": r.verdict,
            "tensors": len(a.records),
            "tensors_loaded": r.tensors_loaded,
            "bytes_loaded": r.bytes_loaded,
            "bytes_read": r.bytes_read,
            "seconds": round(r.seconds, 6),
            "gb_per_s": round(r.gb_per_s, 3),
            "peak_device_bytes": r.peak_device_bytes,
            "timings": {k: round(v, 6) for k, v in r.timings.items()},
            "params": len(r.params) + len(_unreachable(r)),
            "params_filled": count["filled"],
            "params_partial": count["partial"],
            "params_unfilled": count["unfilled"],
            "params_unreachable": len(_unreachable(r)),
            "double_writes": sum(p.double_writes for p in r.params),
            "poisoned_elements": sum(p.poisoned for p in r.params),
            "samples_checked": r.samples_checked,
            "sample_mismatches": sum(p.mismatches for p in r.params),
            "orphans": a.counts()["orphans"],
        },
        "crash": r.crash.as_dict() if r.crash else None,
        "params": [
            {
                "name": p.param.name,
                "dtype": p.param.dtype,
                "shape": list(p.param.shape),
                "status": p.status,
                "elements": p.numel,
                "written": p.written,
                "missing": list(p.missing),
                "double_writes": p.double_writes,
                "poisoned": p.poisoned,
                "mismatches": p.mismatches,
                "informational": p.param.informational,
            }
            for p in r.params
        ],
        "findings": [f.to_json() for f in r.findings],
    }


def _unreachable(r: LoadReport) -> list[str]:
    return [p.name for p in r.audit.manifest.params if not p.reachable]


def render_json(r: LoadReport) -> str:
    import json

    return json.dumps(to_json(r), separators=(",", ":"), ensure_ascii=False) + "\n"


def _gb(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _rate(gb_per_s: float) -> str:
    """A throughput in the unit that shows it: a tiny example loads at MB/s, not "0.00 GB/s"."""
    return f"{gb_per_s:.2f} GB/s" if gb_per_s >= 1 else f"{gb_per_s * 1e3:.2f} MB/s"


def headline(r: LoadReport) -> str:
    a = r.audit
    if r.crash is not None:
        c = r.crash
        return (
            f"{a.engine} raises {c.error}{c.where}, after {c.tensors_loaded or 0:,} tensors, "
            f"{_gb(c.bytes_loaded or 0)} in {c.seconds or 0:.2f} s: the server dies here."
        )
    bad = [f for f in r.findings if f.severity == "error"]
    if r.verdict == "clean":
        return f"{a.engine} fills every reachable parameter; every element written once, read back equal to the file."
    return f"{a.engine}: {len(bad)} problem famil{'y' if len(bad) == 1 else 'ies'} in the loaded parameters."


def stats_line(r: LoadReport) -> str:
    peak = f", peak device memory {_gb(r.peak_device_bytes)}" if r.peak_device_bytes is not None else ""
    return (
        f"{r.tensors_loaded:,} tensors, {_gb(r.bytes_loaded)} loaded ({_gb(r.bytes_read)} read) into "
        f"{len(r.params):,} parameters on {r.device} ({r.device_name}) with the {r.reader} reader in "
        f"{r.seconds:.3f} s ({_rate(r.gb_per_s)}){peak}; {r.samples_checked:,} elements read back."
    )


def _problem_groups(r: LoadReport):
    items = [
        ((p.status, p.param.informational, p.missing), p.param.name, p)
        for p in r.params
        if p.status != "filled" and r.crash is None
    ]
    return collapse.group(items)


def render_table(r: LoadReport, console) -> None:
    from rich.markup import escape

    from nhcheck.report import engine_header, findings_table, param_table, print_table, safe

    e = lambda s: escape(safe(s))  # noqa: E731
    a = r.audit
    console.print(
        f"[bold]nhcheck load[/] {e(a.source)} · {e(engine_header(a))} · {e(a.config.wrapper or a.config.architecture)} "
        f"({e(a.quant or 'unquantized')}) · {len(a.records):,} tensors in {len(a.checkpoint.shards)} shard(s)"
    )
    colour = {"clean": "green", "incomplete": "yellow"}.get(r.verdict, "red")
    console.print(f"[bold {colour}]{r.verdict.upper()}[/] {e(headline(r))}")
    console.print(e(stats_line(r)))
    groups = _problem_groups(r)
    if groups:
        print_table(
            console,
            param_table(
                "Runtime parameters not fully written",
                groups,
                lambda status, info, missing: (
                    "engine keeps its default; informational"
                    if info
                    else "missing " + ", ".join(missing)
                    if status == "partial"
                    else "left poisoned"
                ),
            ),
        )
    shown = [f for f in r.findings if f.code not in ("param-unfilled", "param-partial")]
    if shown:
        print_table(console, findings_table(shown))


def render_markdown(r: LoadReport) -> str:
    from nhcheck.report import _md, engine_header, findings_markdown

    a = r.audit
    out = [
        f"### nhcheck load: `{_md(a.source)}` on {_md(engine_header(a))}, {_md(r.device)} ({_md(r.device_name)})",
        "",
        f"**{r.verdict.upper()}**: {_md(headline(r))}",
        "",
        _md(stats_line(r)),
    ]
    groups = _problem_groups(r)
    if groups:
        out += ["", "| status | parameters | count | missing |", "|---|---|---|---|"]
        for (status, info, missing), name, n, _ in groups:
            out.append(f"| {status}{' (info)' if info else ''} | `{_md(name)}` | {n:,} | {_md(', '.join(missing))} |")
    shown = [f for f in r.findings if f.code not in ("param-unfilled", "param-partial")]
    if shown:
        out += findings_markdown(shown)
    return "\n".join(out) + "\n"


def summary_line(r: LoadReport) -> str:
    bad = sum(1 for f in r.findings if f.severity == "error")
    return (
        f"Loaded {r.tensors_loaded:,} tensors ({_gb(r.bytes_loaded)}) on {r.device} in {r.seconds:.2f} s "
        f"({_rate(r.gb_per_s)}): verdict {r.verdict}; {bad} error finding(s)."
    )
