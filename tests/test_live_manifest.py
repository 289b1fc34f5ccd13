"""``--manifest`` with a live engine's ``named_parameters()`` dump (issue 16, item 2).

The dumps under ``tests/golden/live/`` were made from SGLang's real model (``oracle/sglang/sglang_manifest.py
CKPT --live-dump FILE``: the README's two lines, ``{name: {shape, dtype}}`` with ``str(p.dtype)``), not from
nhcheck's manifest. A dump has no slot layout; nhcheck rebuilds it (q/k/v row blocks of ``qkv_proj``,
per-partition scale vectors, padded expert tensors), so ``audit --manifest DUMP`` and ``load --manifest
DUMP`` reach what the built manifest reaches: the same outcome for every tensor, the same parameter
statuses, the same findings and verdict (clean where clean, ``scale-slot0-only`` on 0.5.11).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nhcheck import pipeline
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli

ROOT = Path(__file__).resolve().parent.parent
LIVE = ROOT / "tests" / "golden" / "live"
CONF = ROOT / "tests" / "conformance"
DUMPS = sorted(p.name.removesuffix(".json.gz") for p in LIVE.glob("*.json.gz"))
#: The finding only the built manifest makes: a dump names no MoE backend choice to assume.
BUILT_ONLY = {"moe-backend-assumed"}


def _dump(name: str, tmp_path: Path) -> tuple[Path, Path, str]:
    case, _, version = name.partition("-sglang-")
    out = tmp_path / f"{name}.json"
    out.write_bytes(gzip.decompress((LIVE / f"{name}.json.gz").read_bytes()))
    return CONF / case / "checkpoint", out, f"sglang@{version}"


def test_the_dumps_are_the_readme_format():
    assert len(DUMPS) >= 4
    for name in DUMPS:
        doc = json.loads(gzip.decompress((LIVE / f"{name}.json.gz").read_bytes()))
        assert all(set(v) == {"shape", "dtype"} and v["dtype"].startswith("torch.") for v in doc.values())
        assert any(".qkv_proj." in n for n in doc), name


@pytest.mark.parametrize("name", DUMPS)
def test_audit_with_a_live_dump_agrees_with_the_built_manifest(name, tmp_path):
    ckpt, dump, engine = _dump(name, tmp_path)
    built = pipeline.audit(pipeline.prepare(open_local(str(ckpt)), engine))
    live = pipeline.audit(pipeline.prepare(open_local(str(ckpt)), engine, manifest_file=str(dump)))
    assert live.manifest.source == str(dump)
    assert live.verdict == built.verdict
    assert [(r.tensor.name, r.outcome, r.param) for r in live.records] == [
        (r.tensor.name, r.outcome, r.param) for r in built.records
    ]
    assert {s.name: (s.status, s.missing) for s in live.params} == {s.name: (s.status, s.missing) for s in built.params}
    assert sorted(f.to_json().items() for f in live.findings) == sorted(
        f.to_json().items() for f in built.findings if f.code not in BUILT_ONLY
    )


def test_slot_layout_rebuilt_from_names_and_shapes(tmp_path):
    ckpt, dump, engine = _dump("nano3_nvfp4-sglang-0.5.23", tmp_path)
    m = pipeline.prepare(open_local(str(ckpt)), engine, manifest_file=str(dump)).manifest
    qkv = m.by_name["model.layers.5.mixer.qkv_proj.weight"]
    assert qkv.loader == "stacked" and qkv.slots == (("q", 0, 64), ("k", 64, 32), ("v", 96, 32))
    in_scale = m.by_name["model.layers.0.mixer.in_proj.input_scale"]
    assert in_scale.shape == (5,) and in_scale.quant_method == "ModelOptFp4LinearMethod"
    assert m.by_name["model.layers.5.mixer.attn.k_scale"].informational
    w2 = m.by_name["model.layers.1.mixer.experts.w2_weight"]
    assert w2.loader == "expert" and w2.num_experts == 12 and w2.shape == (12, 64, 16)  # unpadded region
    _, old, _ = _dump("nano3_nvfp4-sglang-0.5.11", tmp_path)
    m11 = pipeline.prepare(open_local(str(ckpt)), "sglang@0.5.11", manifest_file=str(old)).manifest
    assert not m11.by_name["model.layers.1.mixer.experts.w13_blockscale_swizzled"].reachable


def test_audit_cli_with_a_live_dump_is_clean(tmp_path):
    ckpt, dump, engine = _dump("nano3_nvfp4-sglang-0.5.23", tmp_path)
    res = CliRunner().invoke(cli, ["audit", str(ckpt), "--engine", engine, "--manifest", str(dump), "-f", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["summary"]["verdict"] == "clean"
    assert not [f for f in doc["findings"] if f["severity"] == "error"]


@pytest.mark.parametrize(
    ("name", "verdict", "codes"),
    [("nano3_nvfp4-sglang-0.5.23", "clean", set()), ("nano3_nvfp4-sglang-0.5.11", "incomplete", {"scale-slot0-only"})],
)
def test_load_with_a_live_dump_matches_the_built_manifest(name, verdict, codes, tmp_path):
    pytest.importorskip("torch")
    ckpt, dump, engine = _dump(name, tmp_path)
    runs = {}
    for label, extra in (("built", []), ("live", ["--manifest", str(dump)])):
        res = CliRunner().invoke(
            cli, ["load", str(ckpt), "--engine", engine, "--device", "cpu", "-f", "json", "-q", *extra]
        )
        runs[label] = json.loads(res.stdout)
        assert res.exit_code == (0 if verdict == "clean" else 1), res.output
    for doc in runs.values():
        assert doc["summary"]["verdict"] == verdict
        assert {f["code"] for f in doc["findings"] if f["severity"] == "error"} == codes
