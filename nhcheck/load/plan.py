"""The load plan: every copy the load makes, decided from the audit before any byte moves (no torch).

For each checkpoint tensor the audit says loads, in the order the engine meets them: which runtime
parameter, which contiguous range of it (the q/k/v row block, one expert, the whole parameter, a
scale slot), and how the bytes enter (copy, cast, broadcast, ``A = -exp(A_log)``), with the
engine's loader semantics (``Engine.loader_semantics``). A tensor whose quantization, dtype or
shape the parameter cannot take is refused as a finding, not copied — unless the engine's loader
takes it anyway (vLLM's expert slot narrowed to a smaller tensor): then the plan writes exactly what
that loader writes and reports it. The plan ends at the tensor where the engine raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from nhcheck import engines, slots
from nhcheck.audit import (
    AuditOptions,
    AuditReport,
    Gatherer,
    TensorRecord,
    TensorRecords,
    as_raised,
    load_decider,
    startup_refusal,
)
from nhcheck.dtypes import FLOAT_PARAM, ITEMSIZE, TORCH_DTYPE, numel
from nhcheck.engines.base import Crash, Engine, LoaderSemantics, Outcome
from nhcheck.errors import UsageError
from nhcheck.findings import Finding, grouped
from nhcheck.manifest import Manifest, Param
from nhcheck.model import NemotronHConfig
from nhcheck.safetensors_header import TensorInfo

if TYPE_CHECKING:
    from nhcheck.pipeline import Inputs

#: How an op's bytes enter the parameter (see ``Op``).
OpKind = Literal["copy", "cast", "broadcast", "mamba_A", "corner"]


class Op(NamedTuple):
    """One checkpoint tensor placed into one slot of one runtime parameter.

    ``idx``: the tensor's position in the audit. ``start``/``n``: the slot as a range of the
    flattened parameter (every slot the engine fills is a contiguous range: dim 0 is the q/k/v
    row block or the expert). ``kind``:
    ``copy`` (same dtype, bytes), ``cast`` (float to float), ``broadcast`` (one scalar into every
    partition), ``mamba_A`` (``-exp(float(x))``), ``corner`` (the tensor, converted to the
    parameter's dtype, into the leading corner of the slot, whose shape is ``within``: only that
    box of the range is written, ``LoaderSemantics.expert_corner``).
    """

    idx: int
    tensor: TensorInfo
    path: str
    param: str
    kind: OpKind
    src: str
    start: int
    n: int
    slot: str
    within: tuple[int, ...] = ()

    @property
    def src_elements(self) -> int:
        """Elements the op reads from the file (and writes): one for a broadcast, the tensor for a corner."""
        return 1 if self.kind == "broadcast" else numel(self.tensor.shape) if self.kind == "corner" else self.n

    def spans(self) -> list[tuple[int, int]]:
        """The ranges of the flattened parameter the op writes: its slot, or the rows of its corner."""
        if self.kind != "corner":
            return [(self.start, self.start + self.n)]
        return [(self.start + a, self.start + b) for a, b in corner_runs(self.tensor.shape, self.within)]


def corner_runs(corner: tuple[int, ...], within: tuple[int, ...]) -> list[tuple[int, int]]:
    """The contiguous runs (start, end) of the leading ``corner`` of a row-major block of shape ``within``."""
    d = max((i for i, (c, w) in enumerate(zip(corner, within, strict=True)) if c != w), default=-1)
    if d < 0:
        return [(0, numel(within))]
    row = numel(within[d + 1 :])
    run = corner[d] * row
    strides = [numel(within[i + 1 :]) for i in range(d)]
    starts = [0]
    for i in range(d):
        starts = [s + k * strides[i] for s in starts for k in range(corner[i])]
    return [(s, s + run) for s in starts]


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


def runtime_params(
    manifest: Manifest, config: NemotronHConfig, dtype: str = "auto"
) -> tuple[tuple[Param, ...], tuple[str, ...]]:
    """The parameters to allocate (reachable ones, in the runtime dtype) and the unreachable names.

    ``dtype`` overrides the model dtype as SGLang's ``--dtype`` does: parameters built in the
    config's dtype change, explicit float32 ones (scales, ``A``, router bias) and quantized
    storage do not.
    """
    model = config.dtype if config.dtype in FLOAT_PARAM else "bfloat16"
    out, unreachable = [], []
    for p in manifest.params:
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


def _narrowed(p: Param, shape: tuple[int, ...], loader: LoaderSemantics) -> bool:
    """Whether the engine narrows ``p``'s expert slot to a smaller tensor of ``shape`` (``expert_corner``)."""
    sub = p.shape[1:]
    return (
        loader.expert_corner
        and p.loader == "expert"
        and len(sub) >= 2
        and len(shape) == len(sub)
        and tuple(shape) != sub
        and all(0 < n <= s for n, s in zip(shape, sub, strict=True))
    )


def _place(
    p: Param, shape: tuple[int, ...], shard_id: str | None, expert_id: int | None, loader: LoaderSemantics
) -> tuple[int, int, str, bool]:
    """(first element, element count, slot label, broadcast?) of the slot a tensor of ``shape`` fills in ``p``.

    Mirrors the loaders: FusedMoE puts expert e at ``[e]`` (a scalar scale into a one-element
    slot; a smaller tensor into the corner of the slot, where the engine narrows it); the stacked
    loader puts the q/k/v row block at its offset (a scalar scale at its
    index); the default loader copies the whole tensor, fills a one-element parameter from
    any one-element tensor, and puts a scalar scale into a per-partition scale vector: over
    every partition or into slot 0 only (``LoaderSemantics.scalar_every_slot``).
    """
    n = numel(shape)
    pshape = p.shape
    if p.loader == "expert":
        experts = pshape[0] if pshape else 0
        if expert_id is None or not 0 <= expert_id < experts:
            raise _Mismatch("shape-mismatch", f"expert {expert_id} outside {p.name} ({experts} experts)")
        sub = pshape[1:]
        per = numel(sub)
        if sub in ((), (1,)):
            if n != 1:
                raise _Mismatch("shape-mismatch", f"{list(shape)} into the one-element slot [{expert_id}] of {p.name}")
        elif tuple(shape) != sub and not _narrowed(p, shape, loader):
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
        row = numel(pshape[1:])
        return off * row, size * row, f"shard {sid}", False
    total = numel(pshape)
    if n == 1 and len(shape) > 1 and loader.scale_0d_only and slots.is_scale(p.name):
        raise _Mismatch(
            "shape-mismatch",
            f"{list(shape)} into the one-element scale {p.name}: the linear loader "
            "reshapes only a 0-d scale and asserts equal shapes",
        )
    if tuple(shape) == tuple(pshape) or (n == 1 and total == 1):
        return 0, total, "whole", False
    if slots.scalar_into_vector(p, shape):
        if not loader.scalar_every_slot:
            return 0, 1, "slot 0", False
        return 0, total, "every partition", True
    raise _Mismatch("shape-mismatch", f"{list(shape)} but {p.name} is {list(pshape)}")


def _kind(p: Param, t: TensorInfo, narrowed: bool) -> OpKind:
    """How the bytes of ``t`` may enter ``p``; a quantization or dtype mismatch is refused, not copied.

    Checked before the shape: packed NVFP4 bytes meeting a bf16 parameter also differ in
    shape, but the quantization is the cause worth naming — unless the engine narrows the slot
    to the tensor (``narrowed``): its loader's ``copy_`` then converts whatever arrives, and so does
    the load.
    """
    src = TORCH_DTYPE.get(t.dtype)
    dst = p.dtype
    if src is None:
        raise _Mismatch(
            "dtype-mismatch", f"{t.dtype} has no torch dtype; cannot be placed in the {dst} parameter {p.name}"
        )
    if narrowed:
        return "corner"
    if (src in FLOAT_PARAM) != (dst in FLOAT_PARAM):
        what = (
            f"quantized ({t.dtype}) bytes into the unquantized {dst} parameter"
            if dst in FLOAT_PARAM
            else f"an unquantized {t.dtype} tensor into the quantized {dst} parameter"
        )
        raise _Mismatch("quant-mismatch", f"would load {what} {p.name}; not copied")
    if p.loader == "mamba_A":
        return "mamba_A"
    if src != dst and src not in FLOAT_PARAM:
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


def _stream(report: AuditReport, engine) -> Iterator[tuple[TensorInfo, Outcome, str | None]]:
    """(tensor, outcome, runtime parameter) of every record in stream order (``stream_order``); read straight from
    the records' columns where the engine meets the tensors in checkpoint order (no record made per tensor)."""
    recs = report.records
    if engine.routes_before_lm(report.config, mtp=report.mtp) or recs.changed:
        return ((r.tensor, r.outcome, r.param) for r in stream_order(report))
    return zip(recs.tensors, recs.outcomes, map(itemgetter(1), recs.outcomes), strict=True)  # o[1]: o.param


class Planner:
    """The plan, decided tensor by tensor in stream order: ``plan_load`` feeds it a whole audit's stream; a load
    may feed it a shard at a time (``run``), the readers placing what it has decided while it decides the rest.

    Stops at the tensor where the engine raises: nothing fed after that is planned.
    """

    def __init__(self, manifest: Manifest, config: NemotronHConfig, engine: Engine, shards, dtype: str = "auto"):
        self.params, self.unreachable = runtime_params(manifest, config, dtype)
        self.by_name = {p.name: p for p in self.params}
        self.engine = engine
        self.paths = {s.name: s.path for s in shards}
        self.ops: list[Op] = []
        self.refused: list[tuple[str, str, Finding]] = []  # and what the engine loads silently (slot-narrowed)
        self.crash: Crash | None = None
        self.fed = 0  # tensors fed so far: the next one's position in the stream
        self.semantics: dict[str | None, LoaderSemantics] = {}  # per quant method: one engine call, not one per tensor
        # Expert slots decided once per (parameter, dtype, shape): the expert id only moves the slot (Nano: 23k of
        # 24k loads are experts, ~200 keys). Everything else, and any refusal, is decided per tensor.
        self.experts: dict[tuple[str, str, tuple[int, ...]], tuple[OpKind, int]] = {}
        self.labels: dict[int, str] = {}

    def feed(self, stream: Iterable[tuple[TensorInfo, Outcome, str | None]]) -> list[Op]:
        """Plan the next tensors of the stream, (tensor, outcome, runtime parameter) each; returns their ops."""
        ops, refused, by_name, paths = self.ops, self.refused, self.by_name, self.paths
        experts, labels, semantics, engine = self.experts, self.labels, self.semantics, self.engine
        first = len(ops)
        new = tuple.__new__  # an expert's Op given positionally: no generated __new__ call per tensor
        i = self.fed - 1
        for i, (t, o, param) in enumerate(stream if self.crash is None else (), self.fed):
            if o.outcome == "raise":
                self.crash = Crash(o.message or "", t.name, t.shard, index=i)
                break
            if o.outcome != "load":
                continue
            p = by_name.get(param or "")
            if p is None:
                continue  # an unreachable parameter: nothing the engine keeps
            e = o.expert_id
            if p.loader == "expert" and e is not None and 0 <= e < (p.shape[0] if p.shape else 0):
                hit = experts.get((p.name, t.dtype, t.shape))
                if hit is not None:
                    kind, per = hit
                    slot = labels.get(e) or labels.setdefault(e, f"expert {e}")
                    ops.append(
                        new(Op, (i, t, paths[t.shard], p.name, kind, TORCH_DTYPE[t.dtype], e * per, per, slot, ()))
                    )
                    continue
            loader = semantics.get(p.quant_method)
            if loader is None:
                loader = semantics[p.quant_method] = engine.loader_semantics(p.quant_method)
            narrowed = _narrowed(p, t.shape, loader)
            try:
                kind = _kind(p, t, narrowed)
                start, count, slot, bcast = _place(p, t.shape, o.shard_id, o.expert_id, loader)
            except _Mismatch as exc:
                refused.append((exc.code, t.name, Finding("error", exc.code, str(exc), t.shard, t.name)))
                continue
            if p.loader == "expert" and not narrowed and not bcast:
                experts[(p.name, t.dtype, t.shape)] = (kind, count)
            if narrowed:
                note = (
                    engine.slot_note(p, t.dtype, t.shape) or f"{t.dtype} {list(t.shape)} fills part of its {slot} slot"
                )
                refused.append(("slot-narrowed", t.name, Finding("error", "slot-narrowed", note, t.shard, t.name)))
            ops.append(
                Op(
                    i,
                    t,
                    paths[t.shard],
                    p.name,
                    "broadcast" if bcast else kind,
                    TORCH_DTYPE[t.dtype],
                    start,
                    count,
                    slot,
                    p.shape[1:] if narrowed else (),
                )
            )
        self.fed = i + 1
        return ops[first:]

    def plan(self) -> Plan:
        """What has been decided, as the plan."""
        return Plan(tuple(self.ops), self.params, tuple(grouped(self.refused)), self.crash, tuple(self.unreachable))


def plan_load(report: AuditReport, dtype: str = "auto") -> Plan:
    """Every copy the load makes, in stream order, up to the tensor where the engine raises."""
    engine = engines.get(report.engine)
    planner = Planner(report.manifest, report.config, engine, report.checkpoint.shards, dtype)
    if report.crash is not None and report.crash.tensor is None:
        planner.crash = report.crash
    else:
        planner.feed(_stream(report, engine))
    return planner.plan()


class Decided:
    """The plan of a whole audit, given or made on first use: one installment (``ByShard``'s counterpart)."""

    def __init__(self, decide: Callable[[], AuditReport], dtype: str = "auto") -> None:
        self.decide, self.dtype = decide, dtype
        self.audited_at = 0.0  # when the audit was done (``perf_counter``), for the load's timings
        self.bound = 0

    def first(self) -> tuple[tuple[Param, ...], Sequence[Op], int | None]:
        """The parameters, the ops, and the shards they decide where more installments follow (never: None)."""
        self.audit = self.decide()
        self.audited_at = time.perf_counter()
        self.whole = plan_load(self.audit, self.dtype)
        return self.whole.params, self.whole.ops, None

    def result(self) -> tuple[AuditReport, Plan]:
        return self.audit, self.whole


class ByShard:
    """The plan a shard at a time, in checkpoint order: each shard's tensors replayed, their loads checked per key as
    the audit checks them (``audit.load_decider``: where the engine raises instead), and planned (``Planner``), so the
    readers place the first shard while the rest is decided; the audit of the whole replay at the end (its outcomes
    gathered by load key shard by shard before it: ``gather_pending``).

    Exact, and checked: the planner (``plan_load``'s own) was fed the very stream ``plan_load`` feeds it from that
    audit, tensor by tensor, or the load fails (an internal error); so the ops handed over are that audit's plan. Only
    where the engine can raise at no other point than a tensor (``eligible``).
    """

    def __init__(self, inputs: Inputs, dtype: str = "auto") -> None:
        engine = inputs.engine
        self.inputs = inputs
        self.shards = inputs.checkpoint.shards
        self.planner = Planner(inputs.manifest, inputs.config, engine, self.shards, dtype)
        self.replay = engine.replayer(inputs.manifest, inputs.config, mtp=inputs.mtp, pp=inputs.pp)
        self.decide = load_decider(inputs.manifest, engine)
        self.raising: dict[tuple, Any] = {}  # load key → the decision where the engine raises on it, else None
        self.outcomes: list[Outcome] = []
        self.tensors: list[TensorInfo] = []  # of the shards decided so far, in checkpoint order
        self.gatherer = Gatherer()  # the outcomes gathered by load key so far (``gather_pending``)
        self.stream: list[tuple[TensorInfo, Outcome, str | None]] = []  # what the planner was fed, in order
        self.done = 0  # shards planned
        self.bound = sum(len(s.tensors) for s in self.shards)  # at most one op a tensor
        self.audited_at = 0.0

    @staticmethod
    def eligible(inputs: Inputs) -> bool:
        """Whether the plan may come a shard at a time: a checkpoint of several shards without a wrapper (whose
        routing orders the stream), no MTP draft, and an engine that refuses nothing before the first tensor and
        raises nothing after the last (``startup_error`` from the names alone): its start-up can then end only at a
        tensor."""
        m = inputs.manifest
        names = (t.name for t in inputs.checkpoint.tensors())
        return (
            len(inputs.checkpoint.shards) > 1
            and inputs.config.wrapper is None
            and not inputs.mtp
            and bool(m.params)
            and startup_refusal(m) is None
            and inputs.engine.startup_error(names, m, mtp=False) is None
        )

    def first(self) -> tuple[tuple[Param, ...], Sequence[Op], int | None]:
        """The parameters (known before any tensor), the first shard's ops, and the shards decided so far where more
        follow (None: none do)."""
        self.audited_at = time.perf_counter()
        ops, upto = self.next()
        return self.planner.params, ops, upto

    def next(self) -> tuple[Sequence[Op], int | None]:
        """The next shard's ops, and the shards decided so far where more follow (None: none do)."""
        shard = self.shards[self.done]
        self.done += 1
        tensors = shard.by_name  # the checkpoint's order (``Checkpoint.tensors``)
        outcomes = [self.replay(t[0]) for t in tensors]  # as ``audit.replay_tensors``, a shard at a time
        self.tensors += tensors  # before the outcomes: ``gather_pending`` (side thread) gathers up to the outcomes
        self.outcomes += outcomes
        stream = list(self._decided(tensors, outcomes))
        self.stream += stream
        return self.planner.feed(stream), self.done if self.done < len(self.shards) else None

    def _decided(self, tensors, outcomes) -> Iterator[tuple[TensorInfo, Outcome, str | None]]:
        """(tensor, outcome, parameter) of each, a load the engine raises on as it raises (``audit.as_raised``)."""
        raising, decide = self.raising, self.decide
        for t, o in zip(tensors, outcomes, strict=True):
            param = o[1]  # positional (Outcome: outcome, param, shard_id, ...; TensorInfo: name, dtype, shape, ...)
            if o[0] == "load" and param is not None:
                key = (param, o[2], t[1], t[2])
                d = raising.get(key, raising)
                if d is raising:
                    d = decide(key)
                    d = raising[key] = d if d.plain_error is not None or d.load_error is not None else None
                if d is not None:  # as the audit records it: the size assertion leaves the tensor no parameter
                    o = as_raised(o, d)
                    param = None if d.plain_error is not None else param
            yield t, o, param

    def gather_pending(self) -> None:
        """Gather by load key the outcomes of the shards decided since the last call (a load calls it on its side
        thread after each installment, so that after the last only the audit itself is left)."""
        g = self.gatherer
        upto = len(self.outcomes)  # the shards decided by now (the main thread may add one meanwhile)
        outcomes = self.outcomes[g.n : upto]
        g.add(self.tensors[g.n : upto], outcomes, map(itemgetter(1), outcomes))  # o[1]: o.param

    def result(self) -> tuple[AuditReport, Plan]:
        """The audit of the whole replay, and the plan: the installments', if the audit's stream is what they were fed
        (else an internal error)."""
        from nhcheck import pipeline

        if self.done != len(self.shards):
            raise RuntimeError(f"internal error: the audit asked for after {self.done} of {len(self.shards)} shards")
        self.gather_pending()
        records = TensorRecords(self.tensors, self.outcomes, {})  # every shard's, in order: the checkpoint's tensors
        opts = AuditOptions(compare_versions=False, recipe=False)
        audit = pipeline.audit(self.inputs, opts, self.gatherer.gathered(records, None))
        if audit.crash is not None and audit.crash.tensor is None:
            raise RuntimeError(f"internal error: the plan was decided a shard at a time, but {audit.crash.error}")
        stream = list(_stream(audit, self.planner.engine))
        if stream != self.stream:
            at = next((a[0].name for a, b in zip(stream, self.stream, strict=False) if a != b), "its end")
            raise RuntimeError(f"internal error: the plan decided a shard at a time differs from the audit's at {at}")
        return audit, self.planner.plan()
