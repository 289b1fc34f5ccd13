"""The plan a shard at a time (``load.plan.ByShard``) is the whole audit's plan, for every example and engine epoch.

Every load through the fast reader also checks it at run time (an internal error otherwise); here it is checked
directly, eligible or not, including checkpoints on which the engine raises mid-stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nhcheck import pipeline
from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import open_local
from nhcheck.errors import UsageError
from nhcheck.load import LoadOptions, load_path
from nhcheck.load.plan import ByShard, plan_load

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFORMANCE = Path(__file__).resolve().parent / "conformance"
#: The examples, and every checkpoint the conformance goldens were made over (headers are all a plan reads).
CHECKPOINTS = sorted(
    [str(p.relative_to(EXAMPLES.parent)) for p in EXAMPLES.iterdir() if (p / "config.json").exists()]
    + [str(p.parent.relative_to(EXAMPLES.parent)) for p in CONFORMANCE.glob("**/checkpoint/config.json")]
)
ENGINES = ("sglang@0.5.23", "sglang@0.5.11", "sglang@0.5.6", "vllm@0.34.0", "vllm@0.18.1")


def _by_shard(inputs) -> ByShard:
    plans = ByShard(inputs)
    _, _, upto = plans.first()
    while upto is not None:
        _, upto = plans.next()
    return plans


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_plan_by_shard_is_the_audits_plan(name, engine):
    try:
        inputs = pipeline.prepare(open_local(str(EXAMPLES.parent / name)), engine)
    except UsageError:
        pytest.skip(f"{engine} does not take {name}")
    whole = plan_load(pipeline.audit(inputs, AuditOptions(compare_versions=False, recipe=False)))
    if not ByShard.eligible(inputs):
        one = len(inputs.checkpoint.shards) == 1
        assert one or inputs.config.wrapper is not None or whole.crash is not None and whole.crash.tensor is None
        return
    plans = _by_shard(inputs)
    mine = plans.planner.plan()
    assert mine.ops == whole.ops and mine.crash == whole.crash and mine.findings == whole.findings
    assert mine.params == whole.params and mine.unreachable == whole.unreachable
    audit, checked = plans.result()  # the audit of the replay made a shard at a time, and its plan checked
    assert checked.ops == whole.ops
    assert audit.records == pipeline.audit(inputs, AuditOptions(compare_versions=False, recipe=False)).records


def test_a_load_by_shard_that_raises_mid_stream_reports_what_the_whole_plan_does():
    """The engine raises at a tensor of a later shard: the shards before it are placed, and the report (crash,
    tensors loaded, verdict, every parameter's state) is the one-installment load's."""
    path = str(EXAMPLES / "nano3-24434-leftover-expert-scales")
    inputs = pipeline.prepare(open_local(path), "sglang@0.5.11")
    assert ByShard.eligible(inputs) and len(inputs.checkpoint.shards) > 1
    by_shard = load_path(path, "sglang@0.5.11", LoadOptions(device="cpu", chunk_bytes=4096)).report
    whole = load_path(path, "sglang@0.5.11", LoadOptions(device="cpu", reader="safetensors")).report
    assert by_shard.crash is not None and by_shard.verdict == whole.verdict
    assert (by_shard.crash.tensor, by_shard.crash.error, by_shard.tensors_loaded) == (
        whole.crash.tensor,
        whole.crash.error,
        whole.tensors_loaded,
    )
    assert [(p.param.name, p.status, p.written) for p in by_shard.params] == [
        (p.param.name, p.status, p.written) for p in whole.params
    ]


def test_a_plan_by_shard_that_differs_from_the_audits_fails_the_load(monkeypatch):
    """The check at run time: an installment fed one tensor other than the audit's stream holds is an internal
    error (here the last shard's first load planned into another parameter)."""
    real = ByShard._decided

    def wrong(self, tensors, outcomes):
        out = list(real(self, tensors, outcomes))
        if self.done == len(self.shards):
            k = next(i for i, (_, o, _) in enumerate(out) if o.outcome == "load")
            t, o, _ = out[k]
            out[k] = (t, o, next(p.name for p in self.planner.params if p.name != o.param and p.shape == ()))
        return iter(out)

    monkeypatch.setattr(ByShard, "_decided", wrong)
    with pytest.raises(RuntimeError, match="internal error: the plan decided a shard at a time differs"):
        load_path(str(EXAMPLES / "nano3-nvfp4"), "sglang@0.5.23", LoadOptions(device="cpu"))
