"""What is said of each runtime parameter's coverage: one findings builder for audit, load and the TP load.

The audit knows from the headers which slots some tensor fills; the load knows from device memory
which elements were written, how often, whether poison is left and whether read-backs match; the
TP load knows the same summed over ranks. Each states its facts as ``ParamCheck`` rows and this
module turns them into findings with one rule (which code, which severity, which words), grouped
into families the same way everywhere. Must not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, NamedTuple

from nhcheck import slots
from nhcheck.dtypes import numel
from nhcheck.findings import Finding, Severity, grouped
from nhcheck.manifest import Param

#: A parameter's coverage: every element written once, some, none; ``over``: more than once (TP sums).
ParamState = Literal["filled", "partial", "unfilled", "unreachable", "over"]
#: Who states the facts: the header-only audit, a one-device load, or a tensor-parallel load.
Surface = Literal["audit", "load", "tp"]


class ParamCheck(NamedTuple):
    """One parameter's coverage facts, as one surface knows them.

    ``missing``: the slots left unwritten, in words; ``unwritten``: elements left (TP); ``slot_kind``:
    what a scalar written into slot 0 of a scale vector leaves in the other slots (``slots.unwritten_kind``);
    ``ranks``: the ranks whose partition still holds poison, when some ranks' do not (TP: under expert
    parallelism a missing expert leaves poison on its owner alone).
    """

    param: Param
    status: ParamState
    missing: tuple[str, ...] = ()
    unwritten: int = 0
    mismatches: int = 0
    double_writes: int = 0
    poisoned: int = 0
    slot_kind: Literal["sentinel", "empty"] | None = None
    ranks: tuple[int, ...] = ()


def param_findings(
    checks: Iterable[ParamCheck], surface: Surface, engine_label: str, crashed: bool = False
) -> list[Finding]:
    """Findings for every parameter that is not cleanly filled, grouped into families.

    ``engine_label``: how the sentences name the engine (the audit: its display name, ``SGLang``;
    a load: the release, ``sglang 0.5.23``).

    After a crash only what memory shows of the writes made (read-back, double writes) is said: the
    rest of the stream never ran, so unwritten parameters are not findings of their own.
    """
    items: list[tuple[str, str | None, Finding]] = []
    for c in checks:
        name = c.param.name
        for code, sev, msg in _facts(c, surface, engine_label, crashed):
            items.append((code, name, Finding(sev, code, msg, None, name)))
    return grouped(items)


def _facts(c: ParamCheck, surface: Surface, engine_label: str, crashed: bool) -> list[tuple[str, Severity, str]]:
    out: list[tuple[str, Severity, str]] = []
    if c.mismatches:
        out.append(
            (
                "readback-mismatch",
                "error",
                "a placed slice differs from the checkpoint bytes"
                if surface == "tp"
                else "read back differs from the checkpoint bytes (misplaced or wrong data)",
            )
        )
    if c.double_writes:
        out.append(("double-write", "error", "written more than once; the last tensor in stream order wins"))
    if crashed:
        return out
    if c.status == "over":
        out.append(
            (
                "double-write",
                "error",
                "the ranks' owned elements add up to more than the parameter: a slice is written twice",
            )
        )
    elif c.status == "filled":
        if c.poisoned:
            out.append(
                (
                    "poison-left",
                    "error",
                    f"covered, yet poison is left in {_on_ranks(c.ranks) or 'a rank'}'s partition"
                    if surface == "tp"
                    else "every slot was written, yet poison is left in memory",
                )
            )
    elif c.status in ("partial", "unfilled"):
        out.append(_unwritten(c, surface, engine_label))
    return out


def _unwritten(c: ParamCheck, surface: Surface, engine_label: str) -> tuple[str, Severity, str]:
    p, code = c.param, f"param-{c.status}"
    if surface == "audit":
        sev: Severity = "info" if p.informational else "warning" if c.status == "partial" else "error"
        if c.status == "partial":
            return code, sev, "only partly filled: missing " + ", ".join(c.missing)
        if p.informational:
            return code, sev, f"no checkpoint tensor fills it; {engine_label} keeps its default"
        return code, sev, f"no checkpoint tensor fills it; {engine_label} leaves it uninitialised and does not say so"
    # a scalar written into slot 0 of its scale vector (``load``, ``load --tp``): what the other slots hold
    if c.status == "partial" and c.slot_kind == "sentinel":
        return code, "info", slots.SENTINEL_MESSAGE
    if c.status == "partial" and c.slot_kind == "empty" and not p.informational:
        return slots.SLOT0, "error", slots.empty_message(engine_label, p, ", ".join(c.missing) or slots.missing_text(p))
    if surface == "tp":
        return (
            code,
            "info" if p.informational else "error",
            f"the ranks together leave {c.unwritten:,} of {numel(p.shape):,} elements unwritten"
            + (f", poison left in the partition of {_on_ranks(c.ranks)} only" if c.ranks else ""),
        )
    if p.informational:
        return code, "info", "no checkpoint tensor fills it; the engine keeps its default"
    if c.status == "unfilled":
        return code, "error", "never written: still holds the poison"
    return code, "error", "only partly written: missing " + ", ".join(c.missing)


def _on_ranks(ranks: tuple[int, ...]) -> str:
    if not ranks:
        return ""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
