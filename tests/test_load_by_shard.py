"""The plan a shard at a time (``load.plan.ByShard``) is the whole audit's plan, for every example and engine epoch.

Every load through the fast reader also checks it at run time (an internal error otherwise); here it is checked
directly, eligible or not, including checkpoints on which the engine raises mid-stream.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import generate  # examples/generate.py, on the path from conftest.py
import pytest

from nhcheck import pipeline
from nhcheck.audit import AuditOptions, gather, replay_tensors
from nhcheck.checkpoint import Opening, open_local
from nhcheck.errors import CheckpointError, UsageError
from nhcheck.load import LoadOptions, load_path, run
from nhcheck.load.checks import Bookkeeping, Sampler, expected_samples, file_samples, read_back
from nhcheck.load.memory import layout
from nhcheck.load.plan import ByShard, Replan, plan_load
from nhcheck.load.readers import spans_of
from nhcheck.safetensors_header import max_tensors

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
        if self.done == self.count:
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


# ---------------------------------------------------------------------------
# Each header read when the readers need its plan (``load.run._read_ahead``)


def _ahead(name: str, engine: str) -> tuple[ByShard | None, Opening]:
    """``ByShard`` as a load begins it from the configs alone (no header read), or None where it may not."""
    opening = Opening(str(EXAMPLES.parent / name))
    try:
        inputs = pipeline.prepare(opening.partial(), engine)
    except UsageError:
        pytest.skip(f"{engine} does not take {name}")
    if not ByShard.eligible_before(inputs, len(opening.names)):
        return None, opening
    whole = open_local(str(EXAMPLES.parent / name))
    bound = sum(max_tensors(s.header_len) for s in whole.shards)
    return ByShard(inputs, "auto", opening, bound, spans_of(whole.shards)), opening


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_plan_from_each_header_as_it_is_needed_is_the_plan_from_every_header(name, engine):
    """Begun before any header is read, each read when its shard's plan is asked for: the installments, the plan and
    the audit (its findings, the index cross-checks among them) are those of a plan by shard from every header; where
    the names alone make the engine refuse the checkpoint, ``Replan`` once the last header is read."""
    plans, opening = _ahead(name, engine)
    inputs = pipeline.prepare(open_local(str(EXAMPLES.parent / name)), engine)
    if plans is None:
        assert not ByShard.eligible(inputs) and opening.read_upto == 0
        return
    assert opening.read_upto == 0
    if not ByShard.eligible(inputs):
        with pytest.raises(Replan):
            _run(plans)
        return
    reads = []
    _, ops, upto = plans.first()
    reads.append(opening.read_upto)
    every = _by_shard(inputs)
    while upto is not None:
        _, upto = plans.next()
        reads.append(opening.read_upto)
    assert reads == list(range(1, len(inputs.checkpoint.shards) + 1))
    assert plans.planner.plan() == every.planner.plan() and plans.stream == every.stream
    audit, plan = plans.result()
    theirs, their_plan = every.result()
    assert plan == their_plan and audit.records == theirs.records and audit.findings == theirs.findings
    assert plans.inputs.checkpoint == inputs.checkpoint


def _run(plans: ByShard) -> None:
    _, _, upto = plans.first()
    while upto is not None:
        _, upto = plans.next()


def test_file_samples_a_shard_at_a_time_are_those_of_every_shard_at_once():
    shards = open_local(str(EXAMPLES / "nano3-nvfp4")).shards
    whole, sampler = file_samples(shards, 3), Sampler(3)
    for s in shards:
        sampler.add([s])
    mine = sampler()
    assert mine.rows == whole.rows and mine.width == whole.width and len(shards) == len(mine.data) > 1
    assert all(a.equal(b) for a, b in zip(mine.rel + mine.data, whole.rel + whole.data, strict=True))


def _loaded(res) -> tuple:
    r = res.report
    params = [(p.param.name, p.status, p.written, p.missing, p.mismatches) for p in r.params]
    crash = None if r.crash is None else (r.crash.error, r.crash.tensor, r.crash.tensors_loaded)
    return r.verdict, crash, params, [(f.code, f.tensor) for f in r.findings], r.samples_checked


def test_a_load_reads_each_header_when_its_plan_is_needed(monkeypatch):
    """Only the first shard's header is read before the readers get its plan; the load is the one from every
    header read first."""
    seen: list[tuple[str, int]] = []
    real_read, real_begin = Opening.read, run.Transfer.begin

    def read(self):
        seen.append(("header", self.read_upto))
        return real_read(self)

    def begin(self, *a, **kw):
        seen.append(("plan", len(self.spans)))
        return real_begin(self, *a, **kw)

    monkeypatch.setattr(Opening, "read", read)
    monkeypatch.setattr(run.Transfer, "begin", begin)
    path = str(EXAMPLES / "nano3-nvfp4")
    res = load_path(path, "sglang@0.5.23", LoadOptions(device="cpu"))
    assert seen == [x for i in range(4) for x in (("header", i), ("plan", 4))]
    seen.clear()
    whole = run.load_checkpoint(open_local(path), "sglang@0.5.23", LoadOptions(device="cpu"))
    assert [x for x in seen if x[0] == "plan"] == [("plan", 4)] * 4  # a plan by shard from every header
    assert _loaded(res) == _loaded(whole) and res.report.verdict == "clean"
    assert all(res.tensors[n].equal(whole.tensors[n]) for n in whole.tensors)


def test_a_checkpoint_the_engine_refuses_from_its_names_is_loaded_again_from_every_header(tmp_path, monkeypatch):
    """vLLM's strict check after the stream (a norm missing from a BF16 checkpoint) is known once the last header
    is read: the load read ahead starts over, headers first, and reports what that load reports."""
    c = generate.nano3_tiny_config()
    tensors = [t for t in generate.nemotron_h_tensors(c, None) if t[0] != "backbone.norm_f.weight"]
    root = tmp_path / "ckpt"
    generate.write_checkpoint(str(root), tensors, c, None, shards=3)
    replans = []
    real = ByShard._opened

    def opened(self):
        try:
            real(self)
        except Replan as exc:
            replans.append(str(exc))
            raise

    monkeypatch.setattr(ByShard, "_opened", opened)
    res = load_path(str(root), "vllm@0.34.0", LoadOptions(device="cpu"))
    assert replans == ["the engine refuses the checkpoint outside its tensors"]
    whole = load_path(str(root), "vllm@0.34.0", LoadOptions(device="cpu", reader="safetensors"))
    assert res.report.crash is not None and "not initialized from checkpoint" in res.report.crash.error
    assert _loaded(res) == _loaded(whole)


def test_a_later_header_that_does_not_parse_fails_the_load_as_reading_it_first_does(tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(EXAMPLES / "nano3-nvfp4", root)
    last = sorted(root.glob("*.safetensors"))[-1]
    os.truncate(last, last.stat().st_size - 1)  # its header now runs past the data
    with pytest.raises(CheckpointError) as first:
        open_local(str(root))
    with pytest.raises(CheckpointError) as loading:
        load_path(str(root), "sglang@0.5.23", LoadOptions(device="cpu"))
    assert str(loading.value) == str(first.value) and "past the end of the file" in str(first.value)


def test_a_header_where_the_readers_did_not_guess_it_starts_the_load_over(monkeypatch):
    """The readers' guess of a later shard's data offset (the length prefix read before its header) is wrong (the
    file changed between): that shard is never planned from the guess; the load starts over, headers first."""
    real = run.quick_spans

    def off(path):
        spans = real(path)
        return spans[:2] + [spans[2]._replace(data_start=spans[2].data_start + 8)] + spans[3:]

    monkeypatch.setattr(run, "quick_spans", off)
    path = str(EXAMPLES / "nano3-nvfp4")
    res = load_path(path, "sglang@0.5.23", LoadOptions(device="cpu"))
    monkeypatch.undo()
    whole = load_path(path, "sglang@0.5.23", LoadOptions(device="cpu"))
    assert _loaded(res) == _loaded(whole) and res.report.verdict == "clean"
    assert all(res.tensors[n].equal(whole.tensors[n]) for n in whole.tensors)
