"""One checkpoint against every behaviour epoch of every engine: a compatibility matrix.

The headers are read once; each epoch builds its own manifest and replays the same tensors.
Consecutive epochs that reach the same answer (verdict, counts, crash) are one row, so the
matrix reads as "crashes on sglang ≤ 0.5.11, clean from 0.5.13".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nhcheck import engines
from nhcheck.audit import AuditOptions, run_audit
from nhcheck.checkpoint import Checkpoint
from nhcheck.engines.base import Crash, EngineId
from nhcheck.findings import Verdict
from nhcheck.model import parse_config
from nhcheck.quant import parse_quant


@dataclass(frozen=True)
class MatrixRow:
    """A run of consecutive releases of one engine that treat the checkpoint alike."""

    engine: str
    releases: tuple[str, ...]
    verdict: Verdict
    orphans: int
    raises: int
    unfilled: int
    partial: int
    crash: Crash | None

    @property
    def span(self) -> str:
        """``sglang 0.5.11`` or ``sglang 0.5.13 … 0.5.22``."""
        first, last = self.releases[0], self.releases[-1]
        return f"{self.engine} {first}" + (f" … {last}" if last != first else "")

    def _answer(self) -> tuple[object, ...]:
        return (self.verdict, self.orphans, self.raises, self.unfilled, self.partial, self.crash)


@dataclass(frozen=True)
class Matrix:
    source: str
    rows: tuple[MatrixRow, ...]

    def headline(self) -> str:
        """One sentence: where it crashes or breaks, and from where it is clean."""
        bits = [f"{r.verdict} on {r.span}" for r in self.rows]
        return "; ".join(bits) + "."

    def exit_code(self) -> int:
        """0 when some release of every engine loads it clean, else 1."""
        by_engine: dict[str, bool] = {}
        for r in self.rows:
            by_engine[r.engine] = by_engine.get(r.engine, False) or r.verdict == "clean"
        return 0 if all(by_engine.values()) else 1


def build(ckpt: Checkpoint, *, moe_backend: str | None = None, mtp: bool = False) -> Matrix:
    """Audit ``ckpt`` once per behaviour epoch of every engine nhcheck answers for."""
    cfg = parse_config(ckpt.config, f"{ckpt.root}/config.json")
    qc = parse_quant(ckpt.config, ckpt.hf_quant_config)
    rows: list[MatrixRow] = []
    for name, releases in engines.epochs():
        engine = engines.get(EngineId(name, releases[0]))
        manifest = engine.build_manifest(cfg, qc, moe_backend=moe_backend, mtp=mtp)
        rep = run_audit(ckpt, cfg, qc, manifest, engine, AuditOptions(mtp=mtp, compare_versions=False))
        counts = rep.counts()
        statuses = [p.status for p in rep.params if not p.param.informational]
        row = MatrixRow(
            name,
            releases,
            rep.verdict,
            counts["orphans"],
            counts["raise"],
            statuses.count("unfilled"),
            statuses.count("partial"),
            rep.crash,
        )
        last = rows[-1] if rows else None
        if last is not None and last.engine == name and last._answer() == row._answer():
            rows[-1] = replace(last, releases=last.releases + releases)
        else:
            rows.append(row)
    return Matrix(ckpt.source, tuple(rows))
