"""Verification of the written checkpoint, and the receipt that records what prune did.

Two proofs: every written byte was read back from disk and compared with its source
(``stream``), and the output, audited again with the same engine, is no worse than the input: no
orphans, no crash, no parameter less filled than before, exactly the source's tensors minus the
dropped ones. The receipt (``nhcheck-prune.json``, schema ``nhcheck.prune/1``) lists each dropped
tensor with its sha256 and reason, each output shard with its digest, the other files copied, and
the verification.

A shard entry's digest (``digest`` names the algorithm, ``digest_from`` its origin; see ``digest``):
``sha256`` for a copied or linked shard, the very digest the Hub's LFS pointer carries, computed
(``computed``) or, where the source is a Hub cache blob or an ``hf download --local-dir`` file, as the
Hub's cache / download record names it (``hub-cache-blob``, ``hub-download-metadata``: the copy was
compared byte for byte with that source, the source not hashed again); ``blake3`` for a rewritten
shard (``sha256`` null then), the digest of the bytes written. Both keys are present on every entry,
null where not carried; receipts written before ``blake3`` have sha256 everywhere and no ``digest``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nhcheck import __version__
from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import open_local
from nhcheck.findings import Verdict
from nhcheck.prune.plan import PrunePlan
from nhcheck.prune.stream import ShardJob
from nhcheck.safetensors_header import ShardHeader

RECEIPT_NAME = "nhcheck-prune.json"
RECEIPT_SCHEMA = "nhcheck.prune/1"
_STATUS_RANK = {"unfilled": 0, "partial": 1, "filled": 2, "unreachable": 2}


@dataclass(frozen=True)
class Verification:
    """Result of re-auditing the output and comparing every written byte with its source."""

    problems: tuple[str, ...]
    verdict: Verdict
    bytes_compared: int

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class PruneResult:
    out_dir: str
    receipt: dict
    verification: Verification | None


def reaudit(plan: PrunePlan, out_dir: str, compared: int) -> Verification:
    """Re-audit the output with the same engine: no orphans, no crash, no parameter less filled than before."""
    from nhcheck import pipeline

    before = plan.report
    ckpt = open_local(out_dir)
    after = pipeline.audit(
        pipeline.prepare(ckpt, before.engine, moe_backend=before.manifest.moe_backend),
        AuditOptions(compare_versions=False),
    )
    problems: list[str] = []
    if after.crash is not None:
        problems.append(f"{after.engine} still raises {after.crash.error} at {after.crash.tensor}")
    orphans = after.counts()["orphans"]
    if orphans:
        problems.append(f"{orphans:,} orphan tensor(s) remain on {after.engine}")
    was = {s.name: s for s in before.params}
    for s in after.params:
        b = was.get(s.name)
        if b is None:
            continue
        worse = _STATUS_RANK[s.status] < _STATUS_RANK[b.status] or (
            s.status == b.status == "partial" and not set(s.missing) <= set(b.missing)
        )
        if worse:
            problems.append(f"{s.name} is {s.status} after pruning (was {b.status})")
    for f in ckpt.findings:
        if f.severity == "error":
            problems.append(f"output {f.code}: {f.tensor or f.shard or ''} {f.message}")
    dropped = plan.dropped_names
    expected = [
        (t.name, t.dtype, t.shape) for s in before.checkpoint.shards for t in s.tensors if t.name not in dropped
    ]
    got = [(t.name, t.dtype, t.shape) for s in ckpt.shards for t in s.tensors]
    if got != expected:
        problems.append("the output's tensors are not the source's minus the dropped ones")
    return Verification(tuple(problems), after.verdict, compared)


def json_path(rel: str) -> str:
    """A file name for JSON.

    Names that are not UTF-8 (``surrogateescape`` from the OS) keep their bytes as ``\\xNN``.
    """
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def build_receipt(
    plan: PrunePlan,
    outs: list[tuple[ShardHeader, ShardJob | None]],
    dropped_rows: list[dict[str, object]],
    sidecars: list[tuple[str, str]],
    verification: Verification | None,
    link: bool,
) -> dict:
    shards = []
    plans = {sp.name: sp for sp in plan.shards}
    for shard, job in outs:
        sp = plans[shard.name]
        action = sp.action if not (link and sp.action == "copy") else "link"
        shards.append(
            {
                "name": shard.name,
                "action": action,
                "tensors": sp.tensors - sp.dropped,
                "dropped": sp.dropped,
                "bytes": os.path.getsize(job.final) if job else 0,
                "sha256": job.digest if job and job.how.algorithm == "sha256" else None,
                "blake3": job.digest if job and job.how.algorithm == "blake3" else None,
                "digest": job.how.algorithm if job else None,
                "digest_from": job.how.origin if job else None,
            }
        )
    return {
        "schema": RECEIPT_SCHEMA,
        "nhcheck_version": __version__,
        "source": plan.report.source,
        "source_root": plan.report.checkpoint.root,
        "engine": str(plan.engine),
        "moe_backend": plan.report.manifest.moe_backend,
        "moe_backend_requested": plan.report.manifest.moe_backend_requested,
        "audit_verdict": plan.report.verdict,
        "dropped": dropped_rows,
        "shards": shards,
        "files": [json_path(rel) for rel, _ in sidecars],
        "verification": None
        if verification is None
        else {
            "ok": verification.ok,
            "verdict": verification.verdict,
            "bytes_compared": verification.bytes_compared,
            "problems": list(verification.problems),
        },
    }
