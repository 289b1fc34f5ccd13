"""The plan a shard at a time (``load.plan.ByShard``) is the whole audit's plan, for every example and engine epoch.

Every load through the fast reader also checks it at run time (an internal error otherwise); here it is checked
directly, eligible or not, including checkpoints on which the engine raises mid-stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nhcheck import pipeline
from nhcheck.audit import AuditOptions, gather, replay_tensors
from nhcheck.checkpoint import open_local
from nhcheck.errors import UsageError
from nhcheck.load import LoadOptions, load_path
from nhcheck.load.checks import Bookkeeping, expected_samples, file_samples, read_back
from nhcheck.load.memory import layout
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


def _installments(name: str, engine: str):
    """The inputs of checkpoint ``name`` for ``engine``, where a load takes its plan in installments (else a skip)."""
    try:
        inputs = pipeline.prepare(open_local(str(EXAMPLES.parent / name)), engine)
    except UsageError:
        pytest.skip(f"{engine} does not take {name}")
    if not ByShard.eligible(inputs):
        pytest.skip("one installment")
    return inputs


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_replay_gathered_a_shard_at_a_time_is_the_whole_replays(name, engine):
    """Gathered by load key a shard at a time (as a load gathers it, beside the transfer), the replay's keys (in
    order), loads and tensors that do not load are those of the whole replay gathered at once; the audit is not
    made before every shard is decided."""
    inputs = _installments(name, engine)
    plans = ByShard(inputs)
    _, _, upto = plans.first()
    plans.gather_pending()
    with pytest.raises(RuntimeError, match="internal error: the audit asked for after 1 of"):
        plans.result()
    steps = [plans.gatherer.n]
    while upto is not None:
        _, upto = plans.next()
        plans.gather_pending()
        steps.append(plans.gatherer.n)
    ckpt = inputs.checkpoint
    assert steps == [sum(len(s.tensors) for s in ckpt.shards[: i + 1]) for i in range(len(ckpt.shards))]
    whole = gather(replay_tensors(ckpt, inputs.config, inputs.manifest, inputs.engine, AuditOptions()))
    got = plans.gatherer.gathered(whole.records, None)
    assert list(got.keys.items()) == list(whole.keys.items()) and got.loads == whole.loads
    assert got.unloaded == whole.unloaded


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


def _samples(reads) -> dict[str, list]:
    """Every read-back sample, per arena dtype: (its element's position, what must be there), in any grouping."""
    out: dict[str, list] = {}
    for r in reads:
        assert r.index.tolist() == [i for e in r.groups for i in e.index.tolist()]
        assert {e.dtype for e in r.groups} == {r.dtype}
    for e in (e for r in reads for e in r.groups):
        out.setdefault(e.dtype, []).extend(zip(e.index.tolist(), e.want.tolist(), strict=True))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("engine", ("sglang@0.5.23", "vllm@0.34.0"))
@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if n.startswith("examples/")])
def test_the_bookkeeping_an_installment_at_a_time_is_the_whole_plans(name, engine):
    """Coverage and read-back samples noted an installment at a time (as the load notes them, beside the transfer)
    are those of the whole plan at once; a write that a later installment overwrites drops its samples, as the
    whole plan's bookkeeping drops them."""
    inputs = _installments(name, engine)
    plans = ByShard(inputs)
    params, ops, upto = plans.first()
    installments = [list(ops)]
    while upto is not None:
        ops, upto = plans.next()
        installments.append(list(ops))
    last = installments[-1][-1] if installments[-1] else installments[0][-1]
    again = last._replace(idx=last.idx + 1_000_000)  # the last write once more, in an installment of its own
    files = file_samples(inputs.checkpoint.shards, 2)
    for feed, overwritten in ((installments, set()), (installments + [[again]], {last.idx})):
        books, once = Bookkeeping(params, lambda: files), Bookkeeping(params, lambda: files)
        for mine in feed:
            books.add(mine)
        once.add([op for mine in feed for op in mine])
        (cov, expected), (cov_once, _) = books.result(), once.result()
        whole = expected_samples([op for mine in feed for op in mine], layout(params)[0], files, overwritten)
        assert cov == cov_once and _samples(expected) == _samples(read_back(whole))
    assert cov[last.param].double_writes == 1
