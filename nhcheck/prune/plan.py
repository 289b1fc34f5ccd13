"""The prune plan: from the audit alone, which tensors go, what happens to each shard, or why prune refuses.

A refusal is a record of its own kind (the checkpoint's files disagree, a quantization or shape
mismatch, a model that cannot be built, tensors the safety rule cannot clear), each carrying the
facts it is about; its ``text`` is what the CLI prints after ``prune refused:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from nhcheck import collapse, engines
from nhcheck.audit import AuditOptions, AuditReport
from nhcheck.engines.base import Crash, EngineId
from nhcheck.findings import Finding
from nhcheck.prune.safety import SafetyRule
from nhcheck.safetensors_header import TensorInfo

#: What happens to one shard: ``rewrite`` (some tensors dropped), ``copy`` (none), ``omit`` (all).
ShardAction = Literal["rewrite", "copy", "omit"]
_STRUCTURE = ("shard-", "index-", "tensor-")


@dataclass(frozen=True)
class Drop:
    """One tensor to leave out, what the engine does with it, and why leaving it out is safe."""

    tensor: TensorInfo
    outcome: str  # warn | skip | raise
    reason: str


@dataclass(frozen=True)
class DropGroup:
    """Drops (or unsafe orphans) collapsed like the audit table: ``layers.{1,49}.…input_scale ×24``."""

    name: str
    count: int
    nbytes: int
    outcome: str
    reason: str


@dataclass(frozen=True)
class ShardPlan:
    """What happens to one shard and how many of its tensors and bytes go."""

    name: str
    tensors: int
    dropped: int
    bytes_saved: int
    action: ShardAction


def _named(f: Finding) -> str:
    """A finding with its tensors named once: a family finding's message already starts with the family."""
    return f.message if f.count > 1 else f"{f.tensor}: {f.message}"


@dataclass(frozen=True)
class FilesDisagree:
    """The index and the shards (or the shards' headers) contradict each other: fix the files first."""

    finding: Finding

    @property
    def text(self) -> str:
        f = self.finding
        return (
            f"the checkpoint's files disagree ({f.code}: {f.tensor or f.shard or ''}: {f.message}); "
            "fix the index or shards first"
        )


@dataclass(frozen=True)
class QuantMismatch:
    """Quantized bytes go into unquantized parameters (or the reverse): stripping scales would hide it."""

    engine: EngineId
    findings: tuple[Finding, ...]
    loads_as_is: tuple[str, ...]
    other_versions: tuple[tuple[EngineId, str], ...]

    @property
    def text(self) -> str:
        first, more = self.findings[0], len(self.findings) - 1
        lines = [
            f"quantization mismatch on {self.engine}: {_named(first)}"
            + (f" (and {more} more tensor famil{'y' if more == 1 else 'ies'})" if more else ""),
            f"Stripping scales would hide a model that {self.engine.label} cannot load correctly; prune refuses.",
        ]
        if self.loads_as_is:
            lines.append("Loads as is (audit clean): " + ", ".join(self.loads_as_is) + ".")
        elif self.other_versions:
            lines.append(
                f"No {self.engine.name} version in nhcheck's table loads it as is: "
                + "; ".join(f"{v}: {s}" for v, s in self.other_versions)
                + "."
            )
        else:
            lines.append("Audit it with the other --engine versions to find one that loads it as is.")
        return "\n".join(lines)


@dataclass(frozen=True)
class ShapeMismatch:
    """A tensor's shape differs from its parameter's: no drop fixes that."""

    engine: EngineId
    finding: Finding

    @property
    def text(self) -> str:
        return f"shape mismatch on {self.engine}: {_named(self.finding)}; dropping tensors cannot fix it"


@dataclass(frozen=True)
class BuildFails:
    """The engine fails before any tensor loads (the quant config or the config itself)."""

    engine: EngineId
    crash: Crash

    @property
    def text(self) -> str:
        return (
            f"{self.engine.label} fails while building the model ({self.crash.error}); "
            "dropping tensors cannot fix the quant config"
        )


@dataclass(frozen=True)
class UnsafeOrphans:
    """Tensors the engine does not load that the safety rule cannot clear: the output would not load cleanly."""

    engine: EngineId
    tensors: int
    groups: tuple[DropGroup, ...]

    @property
    def text(self) -> str:
        return (
            f"{self.tensors:,} tensor(s) {self.engine.label} does not load cannot be proven safe to drop, so the "
            "output would not load cleanly either:\n"
            + "\n".join(f"  {g.name} ×{g.count}: {g.reason}" for g in self.groups)
        )


#: Why prune will not write. Each kind carries its facts; ``text`` is the explanation (first line: the headline).
Refusal = FilesDisagree | QuantMismatch | ShapeMismatch | BuildFails | UnsafeOrphans


@dataclass(frozen=True)
class PrunePlan:
    """What prune would do to ``report.checkpoint`` for ``report.engine``, or why it refuses (``refusal``).

    A refused plan keeps the drops the safety rule did clear (shown to the user), never writes.
    ``loads_as_is``: the other engine epochs whose audit is clean, as ranges of releases.
    """

    report: AuditReport
    drops: tuple[Drop, ...]
    groups: tuple[DropGroup, ...]
    shards: tuple[ShardPlan, ...]
    refusal: Refusal | None = None
    loads_as_is: tuple[str, ...] = ()

    @property
    def engine(self) -> EngineId:
        return self.report.engine

    @property
    def bytes_saved(self) -> int:
        return sum(s.bytes_saved for s in self.shards)

    @cached_property
    def dropped_names(self) -> frozenset[str]:
        """Computed once: execute and the re-audit test every tensor of the checkpoint against it."""
        return frozenset(d.tensor.name for d in self.drops)

    @property
    def nothing_to_drop(self) -> bool:
        """A plan that would write a byte-identical copy: prune writes it only when asked."""
        return self.refusal is None and not self.drops


def group_drops(items: list[tuple[TensorInfo, str, str]]) -> tuple[DropGroup, ...]:
    """Collapse (tensor, outcome, reason) by outcome, reason shape and name shape."""
    out = []
    for (outcome, _), name, count, members in collapse.group(
        ((o, collapse.template(r)[0]), t.name, (t, r)) for t, o, r in items
    ):
        reason = collapse.group((0, r, None) for _, r in members)[0][1]
        out.append(DropGroup(name, count, sum(t.nbytes for t, _ in members), outcome, reason))
    return tuple(out)


def _refusal_before_rule(report: AuditReport, loads_as_is: tuple[str, ...]) -> Refusal | None:
    """Refusals that no drop can fix, decided from the audit's findings before the safety rule runs."""
    structure = [f for f in report.checkpoint.findings if f.severity == "error" and f.code.startswith(_STRUCTURE)]
    if structure:
        return FilesDisagree(structure[0])
    mismatches = tuple(f for f in report.findings if f.code == "quant-mismatch")
    if mismatches:
        return QuantMismatch(report.engine, mismatches, loads_as_is, tuple(report.other_versions.items()))
    shape = next((f for f in report.findings if f.code == "shape-mismatch"), None)
    if shape is not None:
        return ShapeMismatch(report.engine, shape)
    if report.crash is not None and report.crash.tensor is None:
        return BuildFails(report.engine, report.crash)
    return None


def plan_prune(report: AuditReport) -> PrunePlan:
    """Decide what to drop and why, or why prune must refuse (the CLI exits 1 on a refusal)."""
    ckpt = report.checkpoint
    loads_as_is = tuple(engines.spans([v for v, s in report.other_versions.items() if s.startswith("clean")]))
    early = _refusal_before_rule(report, loads_as_is)
    if early is not None:
        untouched = tuple(ShardPlan(s.name, len(s.tensors), 0, 0, "copy") for s in ckpt.shards)
        return PrunePlan(report, drops=(), groups=(), shards=untouched, refusal=early, loads_as_is=loads_as_is)

    rule = SafetyRule(report, engines.get(report.engine))
    drops: list[Drop] = []
    unsafe: list[tuple[TensorInfo, str, str]] = []
    for r in report.records:
        if r.outcome.outcome in ("load", "routed") or not r.orphan:
            continue
        safe, why = rule.judge(r)
        if safe:
            drops.append(Drop(r.tensor, r.outcome.outcome, why))
        else:
            unsafe.append((r.tensor, r.outcome.outcome, why))
    per_shard: dict[str, list[Drop]] = {}
    for d in drops:
        per_shard.setdefault(d.tensor.shard, []).append(d)
    shards = []
    for s in ckpt.shards:
        gone = per_shard.get(s.name, [])
        action: ShardAction = "copy" if not gone else "omit" if len(gone) == len(s.tensors) else "rewrite"
        shards.append(ShardPlan(s.name, len(s.tensors), len(gone), sum(d.tensor.nbytes for d in gone), action))
    unsafe_groups = group_drops(unsafe)
    refusal = UnsafeOrphans(report.engine, len(unsafe), unsafe_groups) if unsafe_groups else None
    return PrunePlan(
        report,
        drops=tuple(drops),
        groups=group_drops([(d.tensor, d.outcome, d.reason) for d in drops]),
        shards=tuple(shards),
        refusal=refusal,
        loads_as_is=loads_as_is,
    )


def plan_checkpoint(inputs) -> PrunePlan:
    """Audit ``inputs`` (``pipeline.Inputs``) and plan; the other engine versions are audited only
    when the plan refuses for a quantization mismatch, to name the one that loads it as is."""
    from nhcheck import pipeline

    plan = plan_prune(pipeline.audit(inputs, AuditOptions(compare_versions=False)))
    if isinstance(plan.refusal, QuantMismatch):
        plan = plan_prune(pipeline.audit(inputs, AuditOptions()))
    return plan
