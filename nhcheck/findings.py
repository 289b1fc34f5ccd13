"""Findings and the verdict they add up to: the facts every pipeline stage reports, in one vocabulary."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec

from nhcheck import collapse

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")
#: Most severe last; the headline of an audit, a load or a TP load.
Verdict = Literal["clean", "orphans", "incomplete", "broken", "crash"]
VERDICTS: tuple[Verdict, ...] = ("clean", "orphans", "incomplete", "broken", "crash")

#: Parameters the checkpoint leaves (partly) unwritten: silent garbage.
INCOMPLETE_CODES = frozenset({"param-unfilled", "param-partial", "scale-slot0-only"})
#: Errors that do not by themselves make the files broken: a crash and orphans have verdicts of
#: their own, a refused quant config is a crash, the TP and value checks report at their own gates,
#: and a cross-check disagreement is about nhcheck's table, not the files.
_NOT_BROKEN = INCOMPLETE_CODES | {"orphan", "crash", "quant-config", "tp-indivisible", "bad-scale", "cross-check"}


class Finding(msgspec.Struct, frozen=True):
    """One reportable problem (or note), tied to a shard and/or tensor where it has one.

    ``code`` is a stable machine key (``orphan``, ``crash``, ``quant-mismatch``, …) that
    ``--ignore`` and JSON consumers match on; ``message`` is for people. ``tp`` is the tensor-parallel
    size a ``--tp`` finding is about (the report counts per size from it, never from the message).
    A finding that stands for a family of tensors (``count`` > 1) names the family in ``family``
    (``layers.{1,49}.…×24``), ``tensor`` its first member, and its message starts with both.
    """

    severity: Severity
    code: str
    message: str
    shard: str | None = None
    tensor: str | None = None
    tp: int | None = None
    count: int = 1
    family: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "shard": self.shard,
            "tensor": self.tensor,
        }


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def verdict_of(findings: Iterable[Finding], crashed: bool) -> Verdict:
    """The one verdict rule shared by audit, load and the TP load: the most severe class present."""
    if crashed:
        return "crash"
    codes: set[str] = set()
    for f in findings:
        if f.severity == "error" and f.code not in _NOT_BROKEN:
            return "broken"
        if f.severity != "info":
            codes.add(f.code)
    if codes & INCOMPLETE_CODES:
        return "incomplete"
    if "orphan" in codes:
        return "orphans"
    return "clean"


def grouped(found: Iterable[tuple[str, str | None, Finding]]) -> list[Finding]:
    """One finding per collapsed family (same code and message shape), naming the first tensor.

    ``found``: (kind, name, finding) triples in report order; names that differ only in their
    layer / expert numbers collapse into one finding that says how many (``name ×N: message``).
    """
    out: list[Finding] = []
    for _key, name, count, fs in collapse.group(
        (f.code + "|" + collapse.template(f.message)[0], n or f.message, f) for _, n, f in found
    ):
        f = fs[0]
        out.append(
            f
            if count == 1
            else msgspec.structs.replace(f, message=f"{name} ×{count}: {f.message}", count=count, family=name)
        )
    return out
