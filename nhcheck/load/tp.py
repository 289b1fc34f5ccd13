"""``nhcheck load --tp N``: every rank of a torch.distributed group loads only its tensor-parallel partition.

The single-device loader decides what the engine does with every checkpoint tensor
(``nhcheck.load.plan_load``: the audit's outcomes, the loader semantics, where the engine
raises). This module cuts each of those copies with the engine's sharding (``nhcheck.tp``, the
rules ``audit --tp`` checks), so a rank allocates only its partition of every parameter, reads
only the slice rows/columns it needs (one ``os.preadv`` per contiguous slice, a gather from
the memory-mapped shard for column slices) and applies the copy there with the same semantics (cast, scalar
broadcast, ``A = -exp(A_log)``). The ranks then agree on coverage with all-reduces: every
element of every parameter is written by exactly one owning rank (the lowest rank that holds
its slice), no poison is left on any rank, and read-backs match the file.

With ``ep`` (vLLM's ``--enable-expert-parallel``, ``Job.ep``) the sharding is ``nhcheck.tp.plan(..., ep=True)``:
each rank allocates and reads only the experts it owns, whole (``tp.ep_experts``), the rest is cut as in plain
TP; the report names each rank's experts and which rank's partition a missing expert leaves poisoned.

torch.distributed is the process fabric (NCCL on CUDA, gloo on CPU). Outside ``torchrun`` the
command starts its ranks through torch's elastic launcher, the one ``torchrun`` runs.
torch is imported inside functions only.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgspec

from nhcheck import coverage as param_coverage
from nhcheck import slots
from nhcheck import tp as tensor_parallel
from nhcheck.coverage import ParamState
from nhcheck.dtypes import ITEMSIZE, numel
from nhcheck.engines.base import Crash, EngineId
from nhcheck.errors import CheckpointError, UsageError
from nhcheck.fileio import read_into, usable_cores
from nhcheck.findings import Finding, Verdict, verdict_of
from nhcheck.load.memory import Arenas, apply
from nhcheck.load.plan import Plan, plan_load
from nhcheck.manifest import Param

#: NVLink multicast off: a program using it can take a shared host's GPUs out of service.
_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Copy(NamedTuple):
    """One TP-1 load op cut to one rank: a box of the checkpoint tensor into a box of the local parameter.

    ``owned`` counts the parameter elements this rank is the owner of (coverage); ``nbytes`` is
    what the slice reads.
    """

    op: int
    path: str
    tensor: str
    t_start: int
    t_shape: tuple[int, ...]
    src: str
    param: str
    kind: str
    src_box: tuple[tuple[int, int], ...]
    dst_box: tuple[tuple[int, int], ...]
    owned: int
    nbytes: int


@dataclass(frozen=True)
class Job:
    """What every rank needs to rebuild the same plan (picklable: it crosses the process spawn)."""

    root: str
    source: str
    tp: int
    device: str
    engine: EngineId | None = None
    dtype: str = "auto"
    moe_backend: str | None = None
    mtp: bool = False
    pp: tuple[int, int] | None = None
    manifest_file: str | None = None
    threads: int = 0
    ep: bool = False


@dataclass(frozen=True)
class RankStats:
    """One rank's load: ``bytes_loaded`` the slice bytes placed, ``bytes_read`` what the reads spanned;
    ``experts``: under expert parallelism, the expert ids whose tensors this rank holds (every MoE layer alike)."""

    rank: int
    device: str
    copies: int
    bytes_loaded: int
    bytes_read: int
    bytes_allocated: int
    seconds: float
    experts: range | None = None

    @property
    def gb_per_s(self) -> float:
        return self.bytes_loaded / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ParamCoverage:
    name: str
    elements: int
    covered: int
    poisoned: int
    mismatches: int
    informational: bool
    poisoned_ranks: tuple[int, ...] = ()

    @property
    def status(self) -> ParamState:
        if self.covered == self.elements:
            return "filled"
        return "over" if self.covered > self.elements else "partial" if self.covered else "unfilled"


@dataclass(frozen=True)
class TPLoadReport:
    source: str
    engine: str
    tp: int
    backend: str
    device_name: str
    ranks: tuple[RankStats, ...]
    wall_seconds: float
    params: tuple[ParamCoverage, ...]
    findings: tuple[Finding, ...]
    verdict: Verdict | Literal["refused"]
    crash: Crash | None
    samples_checked: int
    ep: bool = False

    @property
    def bytes_loaded(self) -> int:
        return sum(r.bytes_loaded for r in self.ranks)

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.ranks)

    @property
    def gb_per_s(self) -> float:
        """All ranks' placed bytes over the slowest rank's transfer (they start together after a barrier)."""
        return self.bytes_loaded / self.wall_seconds / 1e9 if self.wall_seconds > 0 else 0.0

    def exit_code(self) -> int:
        return 0 if self.verdict == "clean" else 1


# ---------------------------------------------------------------------------
# Cutting the plan (no torch)


def _full_box(shape: tuple[int, ...], start: int, count: int) -> tuple[tuple[int, int], ...]:
    """The box of the TP-1 parameter an op fills: the whole of it, or a run of dim-0 rows (a q/k/v block, an expert)."""
    if not shape:
        return ()
    if start == 0 and count == numel(shape):
        return tuple((0, d) for d in shape)
    row = numel(shape[1:])
    return ((start // row, (start + count) // row),) + tuple((0, d) for d in shape[1:])


def rank_copies(plan: Plan, shards: dict[str, tensor_parallel.Sharding], rank: int) -> list[Copy]:
    """Every op of ``plan`` cut to what ``rank`` holds, in stream order."""
    full = {p.name: p for p in plan.params}
    out: list[Copy] = []
    for op in plan.ops:
        if op.kind == "corner":
            raise UsageError(
                f"load --tp: {op.tensor.name} is written into part of its expert slot (slot-narrowed); nhcheck does "
                "not cut such writes across ranks: run load without --tp (audit --tp still checks the sharding)"
            )
        p = full[op.param]
        sh = shards[p.name]
        t = op.tensor
        tshape = tuple(t.shape)
        es = ITEMSIZE[op.src]
        box = _full_box(p.shape, 0, numel(p.shape)) if op.kind == "broadcast" else _full_box(p.shape, op.start, op.n)
        whole = tuple((0, d) for d in tshape)
        if sh.dim is None:
            n = numel(tuple(b - a for a, b in box))
            out.append(
                Copy(
                    op.idx,
                    op.path,
                    t.name,
                    t.start,
                    tshape,
                    op.src,
                    p.name,
                    op.kind,
                    whole,
                    box,
                    n if rank == 0 else 0,
                    t.nbytes,
                )
            )
            continue
        d = sh.dim
        lead = len(box) - len(tshape)
        for s, n, dst, owner in sh.windows(rank):
            lo, hi = max(s, box[d][0]), min(s + n, box[d][1])
            if lo >= hi:
                continue
            dbox = box[:d] + ((dst + lo - s, dst + hi - s),) + box[d + 1 :]
            sbox = tuple(
                (lo - box[d][0], hi - box[d][0]) if i + lead == d else (0, tshape[i]) for i in range(len(tshape))
            )
            size = numel(tuple(b - a for a, b in dbox))
            out.append(
                Copy(
                    op.idx,
                    op.path,
                    t.name,
                    t.start,
                    tshape,
                    op.src,
                    p.name,
                    op.kind,
                    sbox,
                    dbox,
                    size if rank == owner else 0,
                    numel(tuple(b - a for a, b in sbox)) * es,
                )
            )
    return out


def _padding(p: Param, sh: tensor_parallel.Sharding, rank: int) -> list[tuple[tuple[int, int], ...]]:
    """Boxes of the local partition no window fills (vocabulary padding): the engine zero-fills them."""
    if sh.dim is None:
        return []
    local = sh.local_shape(p.shape)
    d = sh.dim
    covered = sorted((dst, dst + n) for _, n, dst, _ in sh.windows(rank))
    gaps, pos = [], 0
    for a, b in covered:
        if a > pos:
            gaps.append((pos, a))
        pos = max(pos, b)
    if pos < local[d]:
        gaps.append((pos, local[d]))
    return [tuple((0, x) for x in local[:d]) + (g,) + tuple((0, x) for x in local[d + 1 :]) for g in gaps]


# ---------------------------------------------------------------------------
# Static refusal and the launcher


def static_findings(inputs, tp: int, ep: bool = False) -> list[Finding]:
    """``audit --tp``'s findings at ``tp`` (``ep``: under the engine's expert parallelism; an engine release whose
    expert placement is not proven is a usage error, ``tp.plan``)."""
    return tensor_parallel.check(inputs.manifest, inputs.config, (tp,), inputs.engine.tp_rules(), ep)


def _refused(source: str, engine: str, tp: int, findings: list[Finding], ep: bool) -> TPLoadReport:
    return TPLoadReport(source, engine, tp, "", "", (), 0.0, (), tuple(findings), "refused", None, 0, ep)


def run(job: Job, quiet: bool = False) -> TPLoadReport | None:
    """Check the sharding statically, then load on ``job.tp`` ranks (under torchrun: this process is one of them).

    Returns rank 0's report; None in a torchrun process of another rank (rank 0 reports).
    """
    from nhcheck import pipeline
    from nhcheck.checkpoint import open_local

    if job.tp < 1:
        raise UsageError("--tp must be at least 1")
    if job.device not in ("cuda", "cpu"):
        raise UsageError(f"--device {job.device!r} with --tp: use cuda (rank r takes cuda:r of its node) or cpu")
    inputs = pipeline.prepare(
        open_local(job.root),
        job.engine,
        manifest_file=job.manifest_file,
        moe_backend=job.moe_backend,
        mtp=job.mtp,
        pp=job.pp,
    )
    unproven = inputs.engine.tp_unproven()
    if unproven:
        raise UsageError(f"load --tp: {unproven}")
    errors = [f for f in static_findings(inputs, job.tp, job.ep) if f.severity == "error"]
    if errors:
        return _refused(job.source, inputs.manifest.engine, job.tp, errors, job.ep)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != job.tp:
            raise UsageError(f"--tp {job.tp} but torchrun started {os.environ['WORLD_SIZE']} processes")
        return _rank_main(job)
    for k, v in _SAFE_ENV.items():
        os.environ.setdefault(k, v)
    if job.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device cuda: CUDA is not available (torch {torch.__version__}); use --device cpu")
        if torch.cuda.device_count() < job.tp:
            raise UsageError(f"--tp {job.tp} needs {job.tp} GPUs; {torch.cuda.device_count()} visible")
    return launch(job)


def launch(job: Job) -> TPLoadReport:
    """Start ``job.tp`` ranks with torch's elastic launcher (torchrun's engine) on this node; rank 0's report."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    cfg = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=job.tp,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        results = elastic_launch(cfg, _rank_entry)(job)
    except ChildFailedError as exc:
        first = next(iter(exc.failures.values()), None)
        why = first.message if first is not None and isinstance(first.message, str) else str(exc).splitlines()[0]
        raise CheckpointError(job.source, f"a tensor-parallel rank failed: {why}") from None
    got = results.get(0)
    if isinstance(got, dict) and "error" in got:
        raise CheckpointError(job.source, got["error"])
    return got


def _rank_entry(job: Job):
    """Launcher entry point: a rank's anticipated failures come back as a value (one line), not a traceback."""
    from nhcheck.errors import NhcheckError

    try:
        return _rank_main(job)
    except NhcheckError as exc:
        return {"error": str(exc)}


# ---------------------------------------------------------------------------
# One rank


def default_lanes() -> int:
    """A rank's reader lanes when ``--threads`` is 0: at most 8, and no more than its share of the cores the process
    may use among the ranks on this host (``LOCAL_WORLD_SIZE``, which the launcher sets).

    The ranks of one host share its cores, and more reader threads than cores slowed the reads (``usable_cores``).
    Measured on a 16-core H100 host with CPU ranks (``bench/load_tp.py --device cpu --threads``, 6.92 GB, 2026-12-07,
    medians of 3): TP 4 19.4 GB/s aggregate with 4 lanes a rank against 16.1 and 18.2 GB/s with 8; TP 2 20.1 and
    21.1 GB/s with 8 against 15.7 with 4; TP 1 17.2 GB/s with 8, 11.7 with 4.
    """
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(8, usable_cores() // ranks))


def _rank_main(job: Job) -> TPLoadReport | None:
    import torch
    import torch.distributed as dist

    from nhcheck import pipeline
    from nhcheck.audit import AuditOptions
    from nhcheck.checkpoint import open_local

    torch.set_num_threads(1)  # the reader's lanes are the parallelism; intra-op threads would oversubscribe
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = job.device == "cuda"
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend, device_id=device if cuda else None)
    try:
        inputs = pipeline.prepare(
            open_local(job.root),
            job.engine,
            manifest_file=job.manifest_file,
            moe_backend=job.moe_backend,
            mtp=job.mtp,
            pp=job.pp,
        )
        audit = pipeline.audit(inputs, AuditOptions(compare_versions=False, recipe=False))
        plan = plan_load(audit, job.dtype)
        cut = tensor_parallel.plan(inputs.manifest, inputs.config, job.tp, inputs.engine.tp_rules(), job.ep)
        sharded = {s.param.name: s.sharding for s in cut}
        shards: dict[str, tensor_parallel.Sharding] = {}
        for p in plan.params:
            sh = sharded.get(p.name)
            if sh is None:  # the static check refuses these; a parameter it let through is still not loadable
                raise CheckpointError(job.source, f"{p.name}: the engine cannot shard this parameter at --tp {job.tp}")
            shards[p.name] = sh
        copies = rank_copies(plan, shards, rank)
        local_params = tuple(msgspec.structs.replace(p, shape=shards[p.name].local_shape(p.shape)) for p in plan.params)
        arenas = Arenas(local_params, device, torch)
        for p in plan.params:
            for box in _padding(p, shards[p.name], rank):
                arenas.view(p.name, box).zero_()
        reader = _Reader(copies, arenas, device, job.threads or default_lanes())
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        try:
            placed, read = reader.run()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        finally:
            reader.close()
        checked, bad = _verify(copies, arenas)
        poison = arenas.poisoned() if plan.crash is None else {}
        names = [p.name for p in plan.params]
        owned: dict[str, int] = {}
        for c in copies:
            owned[c.param] = owned.get(c.param, 0) + c.owned
        # one row per rank, summed: rank 0 learns whose partition holds poison, not only how much
        counters = torch.zeros((job.tp, max(1, len(names)), 3), dtype=torch.int64, device=device)
        if names:
            counters[rank] = torch.tensor(
                [[owned.get(n, 0), poison.get(n, 0), bad.get(n, 0)] for n in names], dtype=torch.int64
            )
        dist.all_reduce(counters)
        stats = torch.zeros((job.tp, 6), dtype=torch.float64, device=device)
        allocated = sum(numel(p.shape) * ITEMSIZE[p.dtype] for p in local_params)
        stats[rank] = torch.tensor([len(copies), placed, read, allocated, seconds, checked], dtype=torch.float64)
        dist.all_reduce(stats)
        wall = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        if rank != 0:
            return None
        rows = stats.cpu().tolist()
        dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
        experts = inputs.config.n_routed_experts if job.ep and job.tp > 1 else 0
        ranks = tuple(
            RankStats(
                r,
                f"cuda:{r}" if cuda else "cpu",
                int(x[0]),
                int(x[1]),
                int(x[2]),
                int(x[3]),
                x[4],
                tensor_parallel.ep_experts(experts, job.tp, r) if experts else None,
            )
            for r, x in enumerate(rows)
        )
        per_rank = counters.cpu().tolist()
        params = tuple(
            ParamCoverage(
                p.name,
                numel(p.shape),
                sum(rk[i][0] for rk in per_rank),
                sum(rk[i][1] for rk in per_rank),
                sum(rk[i][2] for rk in per_rank),
                p.informational,
                _some_ranks(tuple(r for r, rk in enumerate(per_rank) if rk[i][1]), job.tp),
            )
            for i, p in enumerate(plan.params)
        )
        crash = plan.crash
        findings = _findings(audit, plan, params, crash)
        if job.ep:  # where nhcheck's placement is an assumption about the GPU's MoE backend (tp-assumed notes)
            findings += [f for f in static_findings(inputs, job.tp, True) if f.code == tensor_parallel.ASSUMED_CODE]
        return TPLoadReport(
            job.source,
            str(audit.engine),
            job.tp,
            backend,
            dev_name,
            ranks,
            float(wall.item()),
            params,
            tuple(findings),
            verdict_of(findings, crash is not None),
            crash,
            int(sum(x[5] for x in rows)),
            job.ep,
        )
    finally:
        if own_group:
            dist.destroy_process_group()


def _some_ranks(ranks: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The ranks holding poison when they are not all of them (then the report can say whose partition it is)."""
    return ranks if len(ranks) < tp else ()


def _contiguous(box: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> bool:
    """Whether a box of a row-major tensor is one byte range: dims of extent 1, then one partial dim, then full dims."""
    dims = [(b - a, d) for (a, b), d in zip(box, shape, strict=True)]
    i = 0
    while i < len(dims) and dims[i][0] == 1:
        i += 1
    return all(n == d for n, d in dims[i + 1 :])


def _split_dim(box: tuple[tuple[int, int], ...]) -> int | None:
    """The first source dim with more than one index: pieces of a large slice are runs along it."""
    return next((i for i, (a, b) in enumerate(box) if b - a > 1), None)


class _Piece(NamedTuple):
    """A copy, or a run of rows of it along its first source dim, and the file bytes it reads.

    ``lo``: the file byte of the slice's first element. A slice that is one byte range of the
    file (rows of a column-parallel weight, an expert, a vocabulary window) is read with
    ``os.preadv``: ``span`` bytes. A column slice (row-parallel weights) is a row window of
    each row: ``gather`` is set and it is copied out of the memory-mapped shard row window by row
    window into ``span`` = ``nbytes`` packed bytes, so a rank reads only the bytes it places,
    never the other ranks' columns between its rows.
    """

    copy: Copy
    src_box: tuple[tuple[int, int], ...]
    dst_box: tuple[tuple[int, int], ...]
    nbytes: int
    lo: int
    span: int
    gather: bool = False


def _piece(c: Copy, src_box, dst_box) -> _Piece:
    es = ITEMSIZE[c.src]
    n = numel([b - a for a, b in src_box])
    first = _flat_index(c.t_shape, src_box, 0)
    if c.kind != "broadcast" and not _contiguous(src_box, c.t_shape) and (c.t_start + first * es) % es == 0:
        return _Piece(c, src_box, dst_box, n * es, c.t_start + first * es, n * es, True)
    last = _flat_index(c.t_shape, src_box, n - 1)
    return _Piece(c, src_box, dst_box, n * es, c.t_start + first * es, (last - first + 1) * es)


def _pieces(copies: list[Copy], limit: int) -> list[_Piece]:
    out = []
    for c in copies:
        whole = _piece(c, c.src_box, c.dst_box)
        sd = _split_dim(c.src_box)
        if whole.span <= limit or c.kind == "broadcast" or sd is None:
            out.append(whole)
            continue
        lead = len(c.dst_box) - len(c.src_box)
        (a, b), (da, _) = c.src_box[sd], c.dst_box[sd + lead]
        step = max(1, limit * (b - a) // whole.span)
        for r in range(a, b, step):
            e = min(b, r + step)
            out.append(
                _piece(
                    c,
                    c.src_box[:sd] + ((r, e),) + c.src_box[sd + 1 :],
                    c.dst_box[: sd + lead] + ((da + r - a, da + e - a),) + c.dst_box[sd + lead + 1 :],
                )
            )
    return out


def _strided(buf, c: Copy, src_box, torch, packed: bool = False):
    """The slice inside the bytes from its first to its last element (``packed``: the slice's bytes
    alone, row windows gathered), as a typed strided view."""
    dtype = getattr(torch, c.src)
    shape = tuple(b - a for a, b in src_box)
    if packed or _contiguous(src_box, c.t_shape):
        return buf.view(dtype).view(shape)
    strides, acc = [], 1
    for d in reversed(c.t_shape):
        strides.append(acc)
        acc *= d
    return buf.view(dtype).as_strided(shape, tuple(reversed(strides)))


class _Read(NamedTuple):
    """One ``os.preadv`` (a run of touching byte ranges of one shard) or one gather (``_Piece.gather``),
    and where it lands in the staging slot."""

    path: str
    lo: int
    span: int
    at: int
    pieces: tuple[_Piece, ...]
    gather: bool = False


class _Batch(NamedTuple):
    """What one staging slot carries: several reads, then one host-to-device copy and one batched placement.

    Ranks read disjoint windows, so at TP > 1 a rank's byte ranges rarely touch: one read (and
    one copy and one placement) per window made thousands of steps whose Python work held the
    GIL and serialised the reader threads. A batch fills the slot with many reads instead.
    """

    reads: tuple[_Read, ...]
    used: int


def _batches(pieces: list[_Piece], limit: int) -> list[_Batch]:
    """Pieces in file order, merged into reads while they touch, the reads packed into slots of ``limit`` bytes.

    Nothing outside the slices is read: a gap between byte ranges ends a read, not a batch.
    Each read starts 64-byte aligned in the slot so typed views of its bytes stay aligned.
    """
    runs: list[list[_Piece]] = []
    for pc in sorted(pieces, key=lambda p: (p.copy.path, p.lo)):
        cur = runs[-1] if runs else None
        if (
            cur
            and not pc.gather
            and not cur[0].gather
            and pc.copy.path == cur[0].copy.path
            and pc.lo == cur[-1].lo + cur[-1].span
            and pc.lo + pc.span - cur[0].lo <= limit
        ):
            cur.append(pc)
        else:
            runs.append([pc])
    out: list[_Batch] = []
    reads: list[_Read] = []
    used = 0
    for run in runs:
        span = run[-1].lo + run[-1].span - run[0].lo
        if reads and used + span > limit:
            out.append(_Batch(tuple(reads), used))
            reads, used = [], 0
        reads.append(_Read(run[0].copy.path, run[0].lo, span, used, tuple(run), run[0].gather))
        used = -(-(used + span) // 64) * 64
    if reads:
        out.append(_Batch(tuple(reads), used))
    return out


class _Reader:
    """Reads the slices and places them; staging memory, streams and every view are set up before the clock.

    Pieces are read in file order, one ``os.preadv`` per run of touching byte ranges, packed
    into a pinned staging slot. A dim-0 slice (rows of a column-parallel weight, an expert, a
    vocabulary window) reads exactly its bytes; a column slice reads from its first to its last
    element and skips the other ranks' columns when placed. Each filled slot goes to the device
    in one copy and is placed with one batched copy (casts included); scalar broadcasts,
    ``A = -exp(A_log)`` and byte-misaligned slices go one by one. Each thread owns two slots and
    a CUDA stream, so one slot is read while the other's host-to-device copy and placement run;
    the hot loop creates no tensors.
    """

    def __init__(self, copies: list[Copy], arenas: Arenas, device, threads: int, stage_bytes: int = 32 << 20) -> None:
        import torch

        from nhcheck.load.readers import host_view

        self.torch = torch
        self.arenas = arenas
        self.device = device
        self.cuda = device.type == "cuda"
        rows = []
        for c in copies:
            sd = _split_dim(c.src_box)
            if sd is not None:
                rows.append(-(-_piece(c, c.src_box, c.dst_box).span // (c.src_box[sd][1] - c.src_box[sd][0])))
        limit = max([stage_bytes] + rows)
        batches = _batches(_pieces(copies, limit), limit)
        self.fds: dict[str, int] = {}
        self.maps: dict[str, tuple] = {}
        for c in copies:
            if c.path not in self.fds:
                try:
                    self.fds[c.path] = os.open(c.path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(c.path, f"cannot open: {exc.strerror or exc}") from None
        workers = max(1, min(threads, len(batches)))
        self.lanes = []
        for k in range(workers):
            mine = batches[k::workers]
            slot = -(-max((b.used for b in mine), default=64) // 64) * 64
            host = torch.empty(2 * slot, dtype=torch.uint8, pin_memory=self.cuda)
            stage = torch.empty(2 * slot, dtype=torch.uint8, device=device) if self.cuda else host
            stream = torch.cuda.Stream(device) if self.cuda else None
            events = [torch.cuda.Event(), torch.cuda.Event()] if self.cuda else []
            steps = []
            for i, batch in enumerate(mine):
                s = (i % 2) * slot
                dsts, srcs, special = [], [], []
                reads: list[tuple[int | None, str, Any, int, int]] = []  # fd None: a gather (source, packed)
                for rd in batch.reads:
                    if rd.gather:
                        (pc,) = rd.pieces
                        shape = tuple(b - a for a, b in pc.src_box)
                        dtype = getattr(torch, pc.copy.src)
                        n = numel(shape)
                        es = ITEMSIZE[pc.copy.src]
                        full = (_flat_index(pc.copy.t_shape, pc.src_box, n - 1) + 1) * es - (rd.lo - pc.copy.t_start)
                        src = _strided(self._file(rd.path)[rd.lo : rd.lo + full], pc.copy, pc.src_box, torch)
                        packed = host[s + rd.at : s + rd.at + rd.span].view(dtype).view(shape)
                        reads.append((None, rd.path, (src, packed), rd.lo, rd.span))
                    else:
                        view = host_view(host, s + rd.at, rd.span)
                        reads.append((self.fds[rd.path], rd.path, view, rd.lo, rd.span))
                    for pc in rd.pieces:
                        off = s + rd.at + pc.lo - rd.lo
                        raw = stage[off : off + pc.span]
                        dst = arenas.view(pc.copy.param, pc.dst_box)
                        if off % ITEMSIZE[pc.copy.src]:
                            special.append((pc, raw, dst))  # a typed view needs an aligned start: clone first
                        elif pc.copy.kind in ("copy", "cast"):
                            try:  # a view, never a copy: the slot holds no data yet
                                src = _strided(raw, pc.copy, pc.src_box, torch, pc.gather).view(dst.shape)
                            except RuntimeError:
                                special.append((pc, raw, dst))
                                continue
                            dsts.append(dst)
                            srcs.append(src)
                        else:
                            special.append((pc, raw, dst))
                steps.append(
                    (
                        tuple(reads),
                        host[s : s + batch.used],
                        stage[s : s + batch.used],
                        i % 2,
                        dsts,
                        srcs,
                        special,
                        sum(pc.nbytes for rd in batch.reads for pc in rd.pieces),
                    )
                )
            self.lanes.append((steps, stream, events))

    def run(self) -> tuple[int, int]:
        """(bytes placed, bytes read)."""
        if len(self.lanes) == 1:
            return self._lane(*self.lanes[0])
        with ThreadPoolExecutor(max_workers=len(self.lanes)) as pool:
            got = list(pool.map(lambda lane: self._lane(*lane), self.lanes))
        return sum(g[0] for g in got), sum(g[1] for g in got)

    def _lane(self, steps: list, stream, events) -> tuple[int, int]:
        torch = self.torch
        if self.cuda:
            # The current device is per thread and a new thread starts on cuda:0: without this, every
            # rank but 0 made a context on cuda:0 and switched devices on each step.
            torch.cuda.set_device(self.device)
        placed = read = 0
        for i, (reads, host, dev, s, dsts, srcs, special, nbytes) in enumerate(steps):
            if self.cuda and i >= 2:
                events[s].synchronize()  # the slot's previous host-to-device copy has landed
            for fd, path, view, lo, span in reads:
                if fd is None:  # row windows out of the mapped shard: only the bytes this rank places
                    src, packed = view
                    packed.copy_(src)
                else:
                    read_into(fd, path, view, lo, "file ends at byte {offset}, inside tensor data")
                read += span
            if self.cuda:
                with torch.cuda.stream(stream):
                    dev.copy_(host, non_blocking=True)
                    self._place_all(dsts, srcs, special)
                    events[s].record(stream)
            else:
                self._place_all(dsts, srcs, special)
            placed += nbytes
        if self.cuda:
            stream.synchronize()
        return placed, read

    def _place_all(self, dsts, srcs, special) -> None:
        if dsts:
            self.torch._foreach_copy_(dsts, srcs)
        for pc, raw, dst in special:
            apply(pc.copy.kind, dst, _strided(raw.clone(), pc.copy, pc.src_box, self.torch, pc.gather))

    def _file(self, path: str):
        """The shard as a uint8 tensor over a private read-only-in-practice mapping (pages map in as touched)."""
        import mmap

        got = self.maps.get(path)
        if got is None:
            mm = mmap.mmap(self.fds[path], 0, access=mmap.ACCESS_COPY)
            got = self.maps[path] = (mm, self.torch.frombuffer(mm, dtype=self.torch.uint8))
        return got[1]

    def close(self) -> None:
        self.lanes.clear()
        while self.maps:
            _, (mm, view) = self.maps.popitem()
            del view
            try:
                mm.close()
            except BufferError:  # a view is still held somewhere: the mapping goes with it
                pass
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _verify(copies: list[Copy], arenas: Arenas) -> tuple[int, dict[str, int]]:
    """Compare the first and last element of every placed slice with the file bytes (read with ``os.pread``).

    A slice cut at the wrong offset, a wrong rank window or a misplaced local box differs at a
    corner; the expected values come from the file, not from the reader. One gather per dtype.
    """
    import torch

    fds: dict[str, int] = {}
    want: dict[str, list] = {}  # dst dtype -> [(param, arena element, expected tensor, mamba_A?)]
    try:
        for c in copies:
            if c.path not in fds:
                fds[c.path] = os.open(c.path, os.O_RDONLY)
            es = ITEMSIZE[c.src]
            p = arenas.params[c.param]
            dtype, base = arenas.where[c.param]
            n_src = numel([b - a for a, b in c.src_box])
            n_dst = numel([b - a for a, b in c.dst_box])
            corners = [(0, 0)] if c.kind == "broadcast" else [(0, 0), (n_src - 1, n_dst - 1)]
            for s_idx, d_idx in corners:
                raw = os.pread(fds[c.path], es, c.t_start + _flat_index(c.t_shape, c.src_box, s_idx) * es)
                x = torch.frombuffer(bytearray(raw), dtype=getattr(torch, c.src))
                pos = base + _flat_index(p.shape, c.dst_box, d_idx)
                want.setdefault(dtype, []).append((c.param, pos, x, c.kind == "mamba_A"))
    finally:
        for fd in fds.values():
            os.close(fd)
    bad: dict[str, int] = {}
    checked = 0
    for dtype, rows in want.items():
        de = ITEMSIZE[dtype]
        tdt = getattr(torch, dtype)
        positions = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        raw = arenas.raw[dtype]
        got = raw[((positions * de).unsqueeze(1) + torch.arange(de)).reshape(-1).to(raw.device)].cpu().view(tdt)
        for (name, _, x, is_a), g in zip(rows, got, strict=True):
            if is_a:
                ok = bool(torch.isclose(g.float(), -torch.exp(x.float()), rtol=1e-5, atol=0.0).all())
            else:
                ok = bool((g.reshape(1).view(torch.uint8) == x.to(tdt).reshape(1).view(torch.uint8)).all())
            checked += 1
            if not ok:
                bad[name] = bad.get(name, 0) + 1
    return checked, bad


def _flat_index(shape: tuple[int, ...], box: tuple[tuple[int, int], ...], k: int) -> int:
    """Row-major index in ``shape`` of the k-th element (row-major) of ``box``."""
    if not shape:
        return 0
    idx, rest = [], k
    for a, b in reversed(box):
        n = b - a
        idx.append(a + rest % n)
        rest //= n
    idx.reverse()
    flat = 0
    for i, d in zip(idx, shape, strict=True):
        flat = flat * d + i
    return flat


def _findings(audit, plan: Plan, params: tuple[ParamCoverage, ...], crash: Crash | None) -> list[Finding]:
    out: list[Finding] = list(audit.checkpoint.findings) + list(plan.findings)
    if crash is not None:
        out.append(
            Finding(
                "error",
                "crash",
                f"{audit.engine.label} raises {crash.error} at {crash.tensor}; the load stops here",
                crash.shard,
                crash.tensor,
            )
        )
    checks = (
        param_coverage.ParamCheck(
            p,
            c.status,
            unwritten=c.elements - c.covered,
            mismatches=c.mismatches,
            poisoned=c.poisoned,
            slot_kind=slots.unwritten_kind(p, c.covered) if c.status == "partial" else None,
            ranks=c.poisoned_ranks,
        )
        for p, c in zip(plan.params, params, strict=True)
    )
    return out + param_coverage.param_findings(checks, "tp", audit.engine.label, crash is not None)
