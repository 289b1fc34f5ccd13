"""The whole load, in order: read from the first moment, audit, plan, allocate and poison, place, check.

``load_path`` starts reading a local checkpoint's shards while their headers are parsed and the
audit runs (``readers.Transfer``); ``load_checkpoint`` loads an opened checkpoint; ``load_audited``
takes decisions already made. The report holds what memory says of every parameter and the
findings built from it (``nhcheck.coverage``); rendering is ``nhcheck.report``'s. torch is
imported inside functions only.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from nhcheck import collector, slots
from nhcheck import coverage as param_coverage
from nhcheck.audit import AuditOptions, AuditReport
from nhcheck.checkpoint import Checkpoint, open_local
from nhcheck.coverage import ParamState
from nhcheck.dtypes import numel
from nhcheck.engines.base import Crash
from nhcheck.findings import Finding, Verdict, verdict_of
from nhcheck.load import readers
from nhcheck.load.checks import Bookkeeping, Coverage, ReadBack, compare, file_samples
from nhcheck.load.memory import Arenas, resolve_device, torch_module
from nhcheck.load.options import DEFAULT_OPTIONS, LoadOptions, check_options
from nhcheck.load.plan import ByShard, Decided, Op, Plan
from nhcheck.load.readers import Transfer, quick_spans, run_safetensors, spans_of
from nhcheck.manifest import Param

T = TypeVar("T")
#: The checks' bookkeeping once merged: every parameter's coverage, and the read-back per arena dtype.
Books = tuple[dict[str, Coverage], list[ReadBack]]

#: The last load's check phase split, for ``bench/load.py``: ``books_wait`` for the side thread's
#: coverage and read-back samples after the transfer, ``audit_wait`` for its whole audit after them,
#: ``compare`` the read-back, ``close`` the readers and streams let go, ``poison`` the scan, ``report``
#: the findings; and the side thread's timeline against the last byte (``side_*``, seconds after it, negative
#: before): its file samples done, the last installment handed over and its noting started and done, the merge
#: and the audit done.
PHASES: dict[str, float] = {}


@dataclass(frozen=True)
class ParamLoad:
    """One runtime parameter after the load: which of its elements were written, and what memory says."""

    param: Param
    status: ParamState
    written: int
    missing: tuple[str, ...] = ()
    double_writes: int = 0
    poisoned: int = 0
    mismatches: int = 0

    @property
    def numel(self) -> int:
        return numel(self.param.shape)


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


@contextmanager
def _load_interpreter() -> Iterator[None]:
    """The interpreter as a load wants it, restored after.

    Reader threads need the interpreter for microseconds per piece while the main thread parses and audits;
    the default 5 ms switch interval would make each of them wait that long (``readers.SWITCH_INTERVAL``; until the
    plan is handed over ``readers.EARLY_SWITCH_INTERVAL`` where set). And the cyclic collector is paused
    (``collector.paused``).
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(readers.EARLY_SWITCH_INTERVAL or readers.SWITCH_INTERVAL)
    try:
        with collector.paused():
            yield
    finally:
        sys.setswitchinterval(before)


def load_checkpoint(
    ckpt: Checkpoint,
    engine: str | None = None,
    opts: LoadOptions = DEFAULT_OPTIONS,
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

    def planning(by_shard: bool) -> Decided | ByShard:
        inputs = pipeline.prepare(ckpt, engine, manifest_file=manifest_file, moe_backend=moe_backend, mtp=mtp, pp=pp)
        if by_shard and ByShard.eligible(inputs):
            return ByShard(inputs, opts.dtype)
        return Decided(lambda: pipeline.audit(inputs, AuditOptions(compare_versions=False, recipe=False)), opts.dtype)

    return _load(ckpt, planning, opts, t0, transfer)


def load_audited(audit: AuditReport, opts: LoadOptions = DEFAULT_OPTIONS) -> LoadResult:
    """Load with decisions already made (an ``AuditReport`` of this process): the load proper, from the first byte."""
    return _load(audit.checkpoint, lambda _: Decided(lambda: audit, opts.dtype), opts, None, None)


def _load(
    ckpt: Checkpoint,
    planning: Callable[[bool], Decided | ByShard],
    opts: LoadOptions,
    t0: float | None,
    transfer: Transfer | None,
) -> LoadResult:
    """``planning(by_shard)``: how the plan comes, a shard at a time where the readers take it so and it may."""
    t_start = time.perf_counter()
    t0 = t_start if t0 is None else t0
    with ExitStack() as stack:
        if transfer is not None:
            stack.enter_context(transfer)
        check_options(opts)
        torch = torch_module()
        device = resolve_device(opts.device)
        cuda = device.type == "cuda"
        stack.enter_context(_load_interpreter())
        if transfer is None and opts.reader == "fast":
            transfer = stack.enter_context(Transfer(spans_of(ckpt.shards), device, opts, torch))
        baseline = transfer.baseline if transfer is not None else _baseline(torch, device)
        plans = planning(transfer is not None)
        runtime, ops, upto = plans.first()
        t_audit = plans.audited_at
        t_plan = time.perf_counter()
        arenas = Arenas(runtime, device, torch)
        t_alloc = time.perf_counter()
        side = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        samples = max(1, opts.samples)
        if transfer is not None:
            transfer.begin(ops, arenas, upto, plans.bound)
            sys.setswitchinterval(readers.SWITCH_INTERVAL)
        # The checks' side thread, in order: what the files hold at the read-back's samples (no plan needed), the
        # bookkeeping of each installment as it is handed over (and its outcomes gathered for the audit), after the
        # last the merge, then the whole audit (with the plan's check against it). The file samples start only now,
        # at the first handover: beside the work before the plan, their page faults and unmapping (the process's
        # memory map lock) slowed it by 8-90 ms at release size (H100 hosts, 2026-12-06), and that work decides when
        # the staging area starts to drain.
        side_at: dict[str, float] = {}  # when the side thread got to what (``PHASES``)
        files = side.submit(_stamped, side_at, "files", _one_core, file_samples, ckpt.shards, samples)
        books = Bookkeeping(runtime, files.result)
        noted: list[Future[None]] = []
        settled: tuple[Future[Books], Future[tuple[AuditReport, Plan, int]]] | None = None

        def hand_over(ops: Sequence[Op], last: bool) -> None:
            """The installment's bookkeeping on the side thread, and its shard's outcomes gathered by load key; after
            the last, the merge and the whole audit."""
            nonlocal settled
            side_at["handed"] = time.perf_counter()
            noted.append(side.submit(_stamped, side_at, "noted", _one_core, books.add, ops))
            if isinstance(plans, ByShard):
                noted.append(side.submit(plans.gather_pending))
            if last:
                settled = (
                    side.submit(_stamped, side_at, "merged", _one_core, _merged, books, noted),
                    side.submit(_stamped, side_at, "audited", _planned, plans),
                )

        hand_over(ops, upto is None)

        def next_installment() -> bool:
            assert transfer is not None and isinstance(plans, ByShard)  # a decided plan comes in one installment
            ops, upto = plans.next()
            transfer.begin(ops, arenas, upto)
            hand_over(ops, upto is None)
            return upto is not None

        if transfer is not None:
            read = transfer.finish(next_installment if upto is not None else None)
        else:
            read = run_safetensors(ops, arenas, device)  # without the readers, the plan comes whole
        t_data = time.perf_counter()
        # Where the transfer placed by kernel (its module is loaded then), the poison scan in one kernel launch an
        # arena starts now, on the device while the host waits for the side thread (a launch an arena, no host
        # sync; beside the audit's Python, torch's scan would be a call a slice, each giving the interpreter away).
        early = None
        if transfer is not None and transfer.ranges is not None:
            early = arenas.find_poison(transfer.ranges.kernel)
        assert settled is not None
        cov, reads = settled[0].result()
        t_books = time.perf_counter()
        # not beside the read-back: its torch calls each give the interpreter away, and beside the audit's Python
        # each took it back late (H100 host, 2026-12-07, release size: 0.034-0.080 s against 0.007 s alone)
        audit, plan, loaded = settled[1].result()
        t_audited = time.perf_counter()
        checked, bad = compare(reads, arenas)
        t_compare = time.perf_counter()
    t_closed = time.perf_counter()
    poison = arenas.poisoned(early) if plan.crash is None else {}
    t_poison = time.perf_counter()
    crash = None
    if plan.crash is not None:
        crash = msgspec.structs.replace(
            plan.crash, index=None, tensors_loaded=len(plan.ops), bytes_loaded=loaded, seconds=round(t_data - t0, 6)
        )
    params = tuple(_param_load(p, cov[p.name], poison.get(p.name, 0), bad.get(p.name, 0)) for p in plan.params)
    findings = _findings(audit, plan, params, crash)
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else None
    t_end = time.perf_counter()
    PHASES.clear()
    PHASES.update(
        books_wait=t_books - t_data,
        audit_wait=t_audited - t_books,
        compare=t_compare - t_audited,
        close=t_closed - t_compare,
        poison=t_poison - t_closed,
        report=t_end - t_poison,
        **{f"side_{k}": t - t_data for k, t in side_at.items()},
    )
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
            # a shard at a time: "audit" is the inputs only (the whole audit goes on beside the transfer) and "plan"
            # the first shard's replay and plan
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


def _one_core(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this thread's torch CPU operations on one core.

    The side thread's tensor work runs beside the reader threads, and a parallel operation's team of 16 threads
    spins for the cores they need: the 3.12 GB bench's file samples beside 8 threads looping on ``os.preadv``,
    H100 host (2026-12-06), 104 ms with torch's 16 intra-op threads, 20 ms with one (alone: 48 ms and 18 ms).
    The count is the calling thread's (OpenMP's is per thread), so the main thread keeps its own.
    """
    torch = torch_module()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def _stamped(at: dict[str, float], label: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, noting in ``at`` when it started (``label_start``) and ended (``label``)."""
    at[label + "_start"] = time.perf_counter()
    try:
        return fn(*args)
    finally:
        at[label] = time.perf_counter()


def _planned(plans: Decided | ByShard) -> tuple[AuditReport, Plan, int]:
    """The whole audit and its plan (checked against the installments), and the bytes the plan loads."""
    audit, plan = plans.result()
    return audit, plan, sum(op.tensor.nbytes for op in plan.ops)


def _merged(books: Bookkeeping, noted: list[Future[None]]) -> Books:
    """The bookkeeping's result, once every installment was noted (an installment's failure raised here)."""
    for f in noted:
        f.result()
    return books.result()


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
    opts: LoadOptions = DEFAULT_OPTIONS,
    *,
    progress=None,
    t0: float | None = None,
    **kw: Any,
) -> LoadResult:
    """Load a local checkpoint, the reads starting while its headers are parsed; the wall time counts both.

    Before that, while torch is imported and the device starts (seconds, in a fresh process), ``readers.prefetch``
    reads the shards into the page cache: from a cold cache the CLI then waits less on the disk (H100 host,
    2026-12-06: 0.79x the time at 3.12 GB, 0.81x at release size; the same warm).
    """
    t0 = time.perf_counter() if t0 is None else t0
    check_options(opts)
    spans = quick_spans(path) if opts.reader == "fast" else None
    stop_prefetch = readers.prefetch(spans) if spans else None
    with _load_interpreter():
        try:
            transfer = Transfer(spans, resolve_device(opts.device), opts, torch_module()) if spans else None
        finally:
            if stop_prefetch is not None:
                stop_prefetch()  # the readers read on from here
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
    opts: LoadOptions = DEFAULT_OPTIONS,
    *,
    progress=None,
    t0: float | None = None,
    **kw: Any,
) -> LoadResult:
    """What the CLI loads: a local path (reads start at once), or a Hub repo downloaded to the cache first."""
    if os.path.exists(source) and not revision:
        return load_path(source, engine, opts, progress=progress, t0=t0, **kw)
    from nhcheck.sources import open_source

    return load_checkpoint(open_source(source, revision, progress, data=True), engine, opts, t0=t0, **kw)


def _param_load(p: Param, cov: Coverage, poisoned: int, mismatches: int) -> ParamLoad:
    written, missing, doubles = cov
    status: ParamState = "filled" if written >= numel(p.shape) else "partial" if written else "unfilled"
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
    checks = (
        param_coverage.ParamCheck(
            s.param,
            s.status,
            s.missing,
            mismatches=s.mismatches,
            double_writes=s.double_writes,
            poisoned=s.poisoned,
            slot_kind=slots.unwritten_kind(s.param, s.written) if s.status == "partial" else None,
        )
        for s in params
    )
    return out + param_coverage.param_findings(checks, "load", audit.engine.label, crash is not None)
