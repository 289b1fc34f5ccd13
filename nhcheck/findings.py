"""Findings: the facts an audit reports, shared by every pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One reportable problem (or note), tied to a shard and/or tensor where it has one.

    ``code`` is a stable machine key (``orphan``, ``crash``, ``quant-mismatch``, …) that
    ``--ignore`` and JSON consumers match on; ``message`` is for people.
    """

    severity: str
    code: str
    message: str
    shard: str | None = None
    tensor: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"severity": self.severity, "code": self.code, "message": self.message,
                "shard": self.shard, "tensor": self.tensor}


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)
