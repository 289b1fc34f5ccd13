"""Prune: turn an audit into a fixed copy of the checkpoint that the chosen engine loads cleanly.

One room per module, in the order a run goes through them:

- ``safety``: the safety rule: which tensors the engine does not load may go, and why; what each
  replay branch means is the engine's to say (``Engine.unloaded_kind``, ``Engine.reads_kv_scales``).
- ``plan``: the plan from the audit alone (drops, groups, per-shard actions) or a typed refusal.
- ``outdir``: the output directory: never in place; ``--overwrite`` replaces only nhcheck's own output.
- ``writer``: the atomic writer: temporary name, fsync, rename; cleanup after a failure.
- ``digest``: which digest each shard's receipt entry carries, and whether the Hub already names it.
- ``stream``: each shard read once, hashed, written with O_DIRECT and read back from disk to prove it.
- ``receipt``: the re-audit of the output and the receipt (``nhcheck-prune.json``).
- ``execute``: the run that ties them together.

Rendering (the plan table, the refusal and summary lines) lives in ``nhcheck.report``.
"""

from nhcheck.prune.execute import execute
from nhcheck.prune.outdir import JOURNAL_NAME, check_output
from nhcheck.prune.plan import (
    BuildFails,
    Drop,
    DropGroup,
    FilesDisagree,
    PrunePlan,
    QuantMismatch,
    Refusal,
    ShapeMismatch,
    ShardPlan,
    UnsafeOrphans,
    plan_checkpoint,
    plan_prune,
)
from nhcheck.prune.receipt import RECEIPT_NAME, RECEIPT_SCHEMA, PruneResult, Verification
from nhcheck.prune.stream import Progress
from nhcheck.prune.writer import TMP_PREFIX, TMP_SUFFIX

__all__ = [
    "JOURNAL_NAME",
    "RECEIPT_NAME",
    "RECEIPT_SCHEMA",
    "TMP_PREFIX",
    "TMP_SUFFIX",
    "BuildFails",
    "Drop",
    "DropGroup",
    "FilesDisagree",
    "Progress",
    "PruneResult",
    "PrunePlan",
    "QuantMismatch",
    "Refusal",
    "ShapeMismatch",
    "ShardPlan",
    "UnsafeOrphans",
    "Verification",
    "check_output",
    "execute",
    "plan_checkpoint",
    "plan_prune",
]
