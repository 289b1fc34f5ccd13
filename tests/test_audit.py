"""Audit-level behaviour: verdicts, findings, coverage, cross-checks, version comparison, MTP mode."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import cross_check, open_local
from nhcheck.engines.base import EngineId
from nhcheck.pipeline import audit, audit_path, prepare
from nhcheck.safetensors_header import ShardHeader, TensorInfo

ROOT = Path(__file__).parent.parent
CONF = Path(__file__).parent / "conformance"
EX = ROOT / "examples"


def _codes(report) -> set[str]:
    return {f.code for f in report.findings}


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_omni_on_three_versions():
    """The #24137 story: crash on 0.5.11, packed bytes into bf16 on 0.5.12, clean on 0.5.23."""
    path = str(EX / "omni-nvfp4-24137")
    r11 = audit_path(path, "sglang@0.5.11", opts=AuditOptions())
    assert r11.verdict == "crash"
    assert r11.crash.tensor == "language_model.backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    assert r11.other_versions[EngineId("sglang", "0.5.23")] == "clean"
    assert r11.other_versions[EngineId("sglang", "0.5.12")].startswith("broken")
    r12 = audit_path(path, "sglang@0.5.12")
    assert r12.verdict == "broken" and "quant-mismatch" in _codes(r12)
    assert r12.counts()["raise"] == 0 and r12.counts()["orphans"] == 1862
    r23 = audit_path(path, "sglang@0.5.23")
    assert r23.verdict == "clean" and r23.exit_code() == 0
    assert r11.exit_code() == 1 and r11.exit_code("none") == 0


def test_pr_24434_example_crashes_then_drops_silently():
    path = str(EX / "nano3-24434-leftover-expert-scales")
    r11 = audit_path(path, "sglang@0.5.11")
    assert r11.verdict == "crash" and "KeyError" in r11.crash.error
    r12 = audit_path(path, "sglang@0.5.12")
    # the orphans are dropped silently; the in_proj scales still land in slot 0 only (before 0.5.16), as load says
    assert r12.verdict == "incomplete" and "scale-slot0-only" in _codes(r12)
    assert {r.outcome.reason for r in r12.records if r.orphan} == {"expert-orphan"}
    assert "quant-mismatch" not in _codes(r12)
    assert audit_path(path, "sglang@0.5.16").verdict == "orphans"


def test_head_dim_default_shape_mismatch():
    """The tiny dense conformance config names attention_head_dim 16 but no head_dim: SGLang builds 128."""
    r = audit_path(str(CONF / "h8b_dense" / "checkpoint"), "sglang@0.5.23")
    assert r.verdict == "broken"
    msgs = [f.message for f in r.findings if f.code == "shape-mismatch"]
    assert any("qkv_proj.weight expects [512, 64]" in m for m in msgs)
    assert audit_path(str(EX / "h8b-dense"), "sglang@0.5.23").verdict == "clean"


def test_missing_expert_tensor_makes_partial_param(tmp_path):
    ck = _copy(EX / "nano3-bf16", tmp_path)
    idx = json.loads((ck / "model.safetensors.index.json").read_text())
    victim = "backbone.layers.1.mixer.experts.7.up_proj.weight"
    shard = ck / idx["weight_map"][victim]
    _drop_tensor(shard, victim)
    del idx["weight_map"][victim]
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))
    r = audit_path(str(ck), "sglang@0.5.23")
    st = {s.name: s for s in r.params}["model.layers.1.mixer.experts.w13_weight"]
    assert (st.status, st.missing) == ("partial", ("expert 7",))
    assert r.verdict == "incomplete"


def _drop_tensor(path: Path, name: str) -> None:
    """Rewrite a shard without one tensor (test helper; prune does this for real)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = hdr.pop("__metadata__", None)
    out, chunks, pos = {}, [], 0
    for k, v in sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if k == name:
            continue
        b, e = v["data_offsets"]
        chunks.append(data[b:e])
        out[k] = {**v, "data_offsets": [pos, pos + e - b]}
        pos += e - b
    if meta is not None:
        out = {"__metadata__": meta, **out}
    h = json.dumps(out).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def test_index_cross_check_findings(tmp_path):
    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    idx_path = ck / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = (
        "model-00004-of-00004.safetensors"
        if idx["weight_map"][name] != "model-00004-of-00004.safetensors"
        else "model-00001-of-00004.safetensors"
    )
    idx["weight_map"]["backbone.ghost.weight"] = "model-00001-of-00004.safetensors"
    idx["metadata"]["total_size"] += 1
    idx_path.write_text(json.dumps(idx))
    shutil.copy(ck / "model-00001-of-00004.safetensors", ck / "stray.safetensors")
    c = open_local(str(ck))
    codes = {f.code for f in c.findings}
    assert {"index-wrong-shard", "index-tensor-missing", "index-total-size", "shard-stray"} <= codes
    r = audit(prepare(c, "sglang@0.5.23"))
    assert r.verdict == "broken" and r.exit_code() == 1


def _shard(name: str, tensors: list[str]) -> ShardHeader:
    infos = tuple(TensorInfo(t, "F32", (1,), 8 + 4 * i, 12 + 4 * i, name) for i, t in enumerate(tensors))
    return ShardHeader(name, name, 0, 8, 8 + 4 * len(tensors), None, False, infos)


def test_index_cross_check_with_as_many_names_as_tensors():
    """The agreeing index is recognised in C (as many names as tensors, each mapped to its own shard); an index
    of the same length that disagrees (a name in two shards plus a ghost, a name on the wrong shard) is still
    compared name by name."""
    a, b = _shard("a", ["x", "y"]), _shard("b", ["z"])
    meta = {"total_size": 12}
    assert cross_check({"metadata": meta, "weight_map": {"x": "a", "y": "a", "z": "b"}}, [a, b], [], []) == []
    dup = _shard("b", ["x"])
    found = cross_check({"metadata": meta, "weight_map": {"x": "a", "y": "a", "ghost": "b"}}, [a, dup], [], [])
    assert [(f.code, f.tensor) for f in found] == [("tensor-duplicate", "x"), ("index-tensor-missing", "ghost")]
    found = cross_check({"metadata": {"total_size": 13}, "weight_map": {"x": "a", "y": "b", "z": "b"}}, [a, b], [], [])
    assert [(f.code, f.tensor) for f in found] == [("index-wrong-shard", "y"), ("index-total-size", None)]
    # A shard of one tensor (looked up alone) on the wrong shard, and a name the headers lack
    found = cross_check({"metadata": meta, "weight_map": {"x": "a", "y": "b", "z": "a"}}, [a, b], [], [])
    assert [(f.code, f.tensor) for f in found] == [("index-wrong-shard", "y"), ("index-wrong-shard", "z")]
    found = cross_check({"metadata": meta, "weight_map": {"x": "a", "w": "a", "z": "b"}}, [a, b], [], [])
    assert [(f.code, f.tensor) for f in found] == [("index-tensor-missing", "w"), ("index-tensor-unlisted", "y")]


def test_missing_shard_and_duplicate_tensor(tmp_path):
    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    (ck / "model-00004-of-00004.safetensors").unlink()
    c = open_local(str(ck))
    assert "shard-missing" in {f.code for f in c.findings}
    r = audit(prepare(c, "sglang@0.5.23"))
    assert r.verdict == "broken"
    assert any(s.status == "unfilled" for s in r.params if not s.param.informational)


def test_no_index_globs_shards(tmp_path):
    ck = _copy(EX / "nano3-bf16", tmp_path)
    (ck / "model.safetensors.index.json").unlink()
    r = audit_path(str(ck), "sglang@0.5.23")
    assert r.verdict == "clean" and len(r.checkpoint.shards) == 3


def test_single_file_source():
    r = audit_path(str(EX / "nano3-bf16" / "model-00001-of-00003.safetensors"), "sglang@0.5.23")
    assert len(r.checkpoint.shards) == 1 and r.verdict == "incomplete"


def test_ignore_patterns_count_and_silence():
    path = str(EX / "omni-nvfp4-24137")
    r = audit_path(
        path,
        "sglang@0.5.12",
        opts=AuditOptions(
            ignore=("*.experts.*_scale*", "*.in_proj.*_scale", "*.out_proj.*_scale", "*.shared_experts.*_scale*"),
            compare_versions=False,
        ),
    )
    assert r.ignored == 1862
    assert r.counts()["orphans"] == 0
    assert "orphan" not in _codes(r)


def test_recipe_mismatch_and_kv_info(tmp_path):
    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    q = json.loads((ck / "hf_quant_config.json").read_text())
    q["quantization"]["exclude_modules"].remove("backbone.layers.4.mixer.in_proj")
    (ck / "hf_quant_config.json").write_text(json.dumps(q))
    r = audit_path(str(ck), "sglang@0.5.23")
    recipe = [f for f in r.findings if f.code == "recipe-mismatch"]
    assert recipe and "NVFP4" in recipe[0].message and recipe[0].tensor == "backbone.layers.4.mixer.in_proj.weight"
    # the engine now builds layer 4's in_proj in NVFP4 while the checkpoint holds BF16: an error, not just a recipe note
    assert "quant-mismatch" in _codes(r)
    assert "kv-scales-absent" in _codes(r)


def test_unknown_quant_algo_is_reported_and_audit_continues(tmp_path):
    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    q = json.loads((ck / "hf_quant_config.json").read_text())
    q["quantization"]["quant_algo"] = "INT4_AWQ"
    (ck / "hf_quant_config.json").write_text(json.dumps(q))
    r = audit_path(str(ck), "sglang@0.5.23")
    assert r.verdict == "crash" and r.crash.tensor is None
    assert "only supports" in r.crash.error
    assert len(r.records) == 2803  # every tensor still replayed (against an unquantised build)


def test_w4a16_refused_before_0_5_23(tmp_path):
    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    q = json.loads((ck / "hf_quant_config.json").read_text())
    q["quantization"]["quant_algo"] = "W4A16_NVFP4"
    (ck / "hf_quant_config.json").write_text(json.dumps(q))
    assert audit_path(str(ck), "sglang@0.5.11").verdict == "crash"
    assert audit_path(str(ck), "sglang@0.5.23").crash is None


def test_mtp_mode_on_omni_and_whitelist_history():
    path = str(EX / "omni-nvfp4-24137")
    r23 = audit_path(path, "sglang@0.5.23", mtp=True)
    assert r23.verdict == "clean" and r23.mtp
    r11 = audit_path(path, "sglang@0.5.11", mtp=True)
    # ≤0.5.12 drops the shared embedding and head in MTP mode (#21138): the draft is left unfilled.
    unfilled = {s.name for s in r11.params if s.status == "unfilled" and not s.param.informational}
    assert "model.embed_tokens.weight" in unfilled and r11.verdict == "incomplete"


def test_manifest_file_from_live_dump(tmp_path):
    """--manifest with a named_parameters() dump gives the same outcomes as the built manifest."""
    path = str(CONF / "nano3_nvfp4_experts_excluded" / "checkpoint")
    built = audit_path(path, "sglang@0.5.11")
    dump = {p.name: {"shape": list(p.shape), "dtype": f"torch.{p.dtype}"} for p in built.manifest.params}
    f = tmp_path / "m.json"
    f.write_text(json.dumps(dump))
    r = audit_path(path, "sglang@0.5.11", manifest_file=str(f))
    assert [(x.outcome.outcome, x.param) for x in r.records] == [(x.outcome.outcome, x.param) for x in built.records]
    assert r.crash == built.crash


def test_audit_is_header_only_and_torch_free(tmp_path):
    """audit never imports torch and never reads tensor data (a shard with garbage data still audits)."""
    import subprocess
    import sys

    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    shard = ck / "model-00002-of-00004.safetensors"
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n :] = b"\xff" * (len(raw) - 8 - n)
    shard.write_bytes(bytes(raw))
    code = (
        "import sys; from nhcheck.pipeline import audit_path; "
        f"r = audit_path({str(ck)!r}, 'sglang@0.5.23'); "
        "assert r.verdict == 'clean', r.verdict; assert 'torch' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_pipeline_rank_audit():
    """One PP rank: its layers load, the rest is skipped by design, embed/head on the end ranks only."""
    path = str(EX / "nano3-nvfp4")
    mid = audit_path(path, "sglang@0.5.23", pp=(1, 4))
    assert mid.verdict == "clean"
    names = {p.name for p in mid.manifest.params}
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert "model.layers.13.norm.weight" in names and "model.layers.12.norm.weight" not in names
    reasons = {r.outcome.reason for r in mid.records if r.outcome.outcome == "skip"}
    assert reasons == {"pp-range", "pp-rank"}
    assert not any(r.orphan for r in mid.records)
    last = audit_path(path, "sglang@0.5.23", pp=(3, 4))
    assert {"model.norm_f.weight", "lm_head.weight"} <= {p.name for p in last.manifest.params}


def test_layer_beyond_the_model_is_an_orphan(tmp_path):
    ck = _copy(EX / "nano3-bf16", tmp_path)
    idx = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = ck / "model-00003-of-00003.safetensors"
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8 : 8 + n])
    end = max(v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__")
    hdr["backbone.layers.60.norm.weight"] = {"dtype": "BF16", "shape": [64], "data_offsets": [end, end + 128]}
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    shard.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :] + b"\0" * 128)
    idx["weight_map"]["backbone.layers.60.norm.weight"] = shard.name
    idx["metadata"]["total_size"] += 128
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))
    r = audit_path(str(ck), "sglang@0.5.23")
    rec = next(x for x in r.records if x.tensor.name == "backbone.layers.60.norm.weight")
    assert (rec.outcome.reason, rec.orphan) == ("pp-range", True)
    assert r.verdict == "orphans"


def test_without_the_recipe_check_only_its_findings_go(tmp_path):
    """``AuditOptions(recipe=False)`` (what a load asks): no recipe finding, and every decision a load takes from
    the audit (records, crash, parameters) and every other finding the same."""
    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    q = json.loads((ck / "hf_quant_config.json").read_text())
    q["quantization"]["exclude_modules"].remove("backbone.layers.4.mixer.in_proj")
    (ck / "hf_quant_config.json").write_text(json.dumps(q))
    inputs = prepare(open_local(str(ck)), "sglang@0.5.23")
    full = audit(inputs, AuditOptions(compare_versions=False))
    lean = audit(inputs, AuditOptions(compare_versions=False, recipe=False))
    recipe = {"recipe-mismatch", "kv-scales-absent"}
    assert recipe <= _codes(full) and not recipe & _codes(lean)
    assert [f for f in full.findings if f.code not in recipe] == list(lean.findings)
    assert (lean.records, lean.crash, lean.params) == (full.records, full.crash, full.params)


def test_exclude_entry_naming_one_expert_index(tmp_path):
    # The recipe check answers expert modules once per name around the index, except where an exclude
    # entry names the index itself as a component: expert 5 of layer 1 and expert 7's down_proj everywhere.
    ck = _copy(EX / "nano3-nvfp4", tmp_path)
    q = json.loads((ck / "hf_quant_config.json").read_text())
    q["quantization"]["exclude_modules"] += ["backbone.layers.1.mixer.experts.5", "experts.7.down_proj"]
    (ck / "hf_quant_config.json").write_text(json.dumps(q))
    r = audit_path(str(ck), "sglang@0.5.23")
    recipe = {(f.tensor, f.count) for f in r.findings if f.code == "recipe-mismatch"}
    assert recipe == {
        ("backbone.layers.1.mixer.experts.5.down_proj.weight", 24),  # 23 MoE layers' expert 7, and layer 1's 5
        ("backbone.layers.1.mixer.experts.5.up_proj.weight", 1),
    }


def test_cross_version_summary_equals_each_epoch_audited_alone():
    # The other epochs are audited once per distinct behaviour (matrix.shared_audits): each summary must be
    # the one its own audit gives.
    from nhcheck.audit import run_audit

    path = str(EX / "nano3-24434-leftover-expert-scales")
    for spec in ("sglang@0.5.11", "vllm@0.16.0"):
        inputs = prepare(open_local(path), spec)
        rep = audit(inputs)
        assert rep.verdict != "clean" and len(rep.other_versions) == len(inputs.engine.others())
        for other in inputs.engine.others():
            m = other.build_manifest(inputs.config, inputs.quant)
            alone = run_audit(
                inputs.checkpoint, inputs.config, inputs.quant, m, other, AuditOptions(compare_versions=False)
            )
            assert rep.other_versions[other.id] == alone.summary_line(), other.id


def test_counts_equal_the_per_record_definition():
    """``counts`` counts outcomes in C and visits only orphans: every mix of outcome, orphan and ignored (loads
    among them, which no audit marks orphan but a report may hold) gives the per-record figures."""
    from dataclasses import replace
    from itertools import product

    base = audit_path(str(EX / "nano3-nvfp4"), "sglang@0.5.23")
    t = base.records[0]
    mixes = list(product(("load", "warn", "skip", "raise", "routed"), (False, True), (False, True)))
    records = tuple(
        t._replace(outcome=t.outcome._replace(outcome=kind), orphan=orphan, ignored=ignored)
        for kind, orphan, ignored in mixes
        for _ in range(1 + len(kind))
    )
    want = {k: sum(r.outcome.outcome == k for r in records) for k in ("load", "warn", "skip", "raise", "routed")}
    want["orphans"] = sum(r.orphan and not r.ignored for r in records)
    want["by_design"] = sum(not r.orphan and r.outcome.outcome != "load" for r in records)
    assert replace(base, records=records).counts() == want


def test_tensor_records_read_as_the_records_they_stand_for():
    """``TensorRecords`` keeps the replay's columns and the records an audit changed: as a sequence it is exactly
    those records (index, negative index, slice, iteration, equality), and ``counts`` and ``not_loading`` see a
    changed record's outcome, not the replay's (a load the audit turned into a raise)."""
    from dataclasses import replace

    from nhcheck.audit import TensorRecords

    base = audit_path(str(EX / "nano3-nvfp4"), "sglang@0.5.23")
    recs = list(base.records)
    raised = recs[1]._replace(outcome=recs[1].outcome._replace(outcome="raise", reason="loader"))
    orphan = recs[2]._replace(orphan=True, outcome=recs[2].outcome._replace(outcome="warn"))
    want = [raised if i == 1 else orphan if i == 2 else r for i, r in enumerate(recs)]
    cols = TensorRecords([r.tensor for r in recs], [r.outcome for r in recs], {1: raised, 2: orphan})
    assert list(cols) == want and cols == want and cols == tuple(want) and len(cols) == len(want)
    assert cols[1] == raised and cols[-1] == want[-1] and cols[1:4] == want[1:4] and cols[-3:] == want[-3:]
    with pytest.raises(IndexError):
        cols[len(want)]
    assert cols.not_loading() == [r for r in want if r.outcome.outcome != "load"]
    counts = {k: sum(r.outcome.outcome == k for r in want) for k in ("load", "warn", "skip", "raise", "routed")}
    counts["orphans"] = sum(r.orphan and not r.ignored for r in want)
    counts["by_design"] = sum(not r.orphan and r.outcome.outcome != "load" for r in want)
    assert replace(base, records=cols).counts() == counts == replace(base, records=tuple(want)).counts()


def test_audit_path_pauses_the_cyclic_collector_and_restores_the_callers_setting(monkeypatch, collector_setting):
    """A library audit runs with the cyclic collector paused, as the CLI runs (``nhcheck.collector``)."""
    import gc

    from nhcheck import pipeline

    seen: list[bool] = []
    real = pipeline.run_audit
    monkeypatch.setattr(pipeline, "run_audit", lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k))
    report = audit_path(str(EX / "nano3-nvfp4"), "sglang@0.5.23")
    assert report.crash is None and seen == [False] and gc.isenabled() == collector_setting
