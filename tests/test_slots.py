"""A scalar scale into a per-partition scale vector: audit and load share one rule (``nhcheck.slots``).

The rule's engine side is what the engines' own loaders did on the fused Mamba ``in_proj`` scales: SGLang
(slot 0 only before 0.5.16, every slot after) in the TP-1 rank maps of tests/golden/tp/; vLLM (slot 0 only in
0.11.x – 0.15.x and 0.17.0 – 0.19.x, every slot from 0.20.0) in tests/golden/vllm_scalar_slots
(oracle/vllm/scalar_slots.py) and its TP-1 rank maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from goldens import read_golden

from nhcheck import engines, slots
from nhcheck.checkpoint import open_local
from nhcheck.load import LoadOptions, load_path
from nhcheck.pipeline import audit_path, prepare

EX = Path(__file__).parent.parent / "examples"
GOLDEN = Path(__file__).parent / "golden" / "tp"


@pytest.mark.parametrize("release", ["0.5.11", "0.5.23"])
def test_engine_semantics_match_sglangs_own_loader(release):
    doc = json.loads((GOLDEN / f"sglang-{release}" / "hybrid-nvfp4-flashinfer_cutlass-tp1.json").read_text())
    params = {n: e for fam in doc["families"].values() for n, e in fam.items()}
    boxes = params["model.layers.0.mixer.in_proj.input_scale"]["ranks"]["0"]
    written = sum(b["dst"][0][1] - b["dst"][0][0] for b in boxes if "src" in b)
    every = engines.get(f"sglang@{release}").loader_semantics("ModelOptFp4LinearMethod").scalar_every_slot
    assert written == (5 if every else 1)


@pytest.mark.parametrize("release", ["0.5.11", "0.5.12", "0.5.15", "0.5.16", "0.5.23"])
def test_audit_reaches_the_loads_verdict(release):
    engine = f"sglang@{release}"
    audit = audit_path(str(EX / "nano3-nvfp4"), engine)
    load = load_path(str(EX / "nano3-nvfp4"), engine, opts=LoadOptions(device="cpu")).report
    assert audit.verdict == load.verdict == ("clean" if release in ("0.5.16", "0.5.23") else "incomplete")
    a = sorted((f.code, f.message) for f in audit.findings if f.code == "scale-slot0-only")
    b = sorted((f.code, f.message) for f in load.findings if f.code == "scale-slot0-only")
    assert a == b and len(a) == (0 if release in ("0.5.16", "0.5.23") else 2)


# ---------------------------------------------------------------------------------------------------------------
# vLLM: slot 0 only in 0.17.0 – 0.19.x (and the merged in_proj of 0.11.0 – 0.15.x), every slot from 0.20.0.

VLLM_GOLDEN = Path(__file__).parent / "golden" / "vllm_scalar_slots"
VLLM_RELEASES = sorted(p.name[len("vllm-") : -len(".json.gz")] for p in VLLM_GOLDEN.glob("vllm-*.json.gz"))
CONF = Path(__file__).parent / "conformance"


def test_vllm_goldens_span_the_change():
    assert {"0.17.0", "0.18.0", "0.19.0", "0.20.0", "0.34.0"} <= set(VLLM_RELEASES)


@pytest.mark.parametrize("release", VLLM_RELEASES)
def test_vllm_semantics_match_vllms_own_loader(release):
    """Every multi-slot in_proj scale vLLM built: nhcheck's manifest has it (shape, quant method), the slots
    its semantics write are the slots vLLM's real loader wrote, and what the others hold after the build
    (finfo(float32).min sentinel in every element, or not) is what ``slots.unwritten_kind`` says."""
    doc = read_golden(VLLM_GOLDEN / f"vllm-{release}.json")
    engine = engines.get(f"vllm@{release}")
    checked = built = 0
    for case, rec in doc["cases"].items():
        if "startup_error" in rec:
            continue
        built += 1
        manifest = prepare(open_local(str(CONF / case / "checkpoint")), f"vllm@{release}").manifest
        by_name = manifest.by_name
        vectors = {p.name for p in manifest.params if ".in_proj." in p.name and slots.is_scale(p.name)}
        vectors = {n for n in vectors if len(by_name[n].shape) == 1 and by_name[n].shape[0] > 1}
        assert vectors == set(rec["vectors"]), case  # 0.16.0: none (one ColumnParallelLinear, one slot)
        for name, v in rec["vectors"].items():
            p = by_name[name]
            assert (list(p.shape), p.quant_method) == (v["shape"], v["quant_method"]), (case, name)
            src = v["checkpoint_tensor"]
            if src is None or rec["loads"][src]["raised"] or rec["loads"][src]["shape"] not in ([], [1]):
                continue  # no scalar reached the vector (an NVFP4 block scale into an FP8 vector raises)
            every = engine.loader_semantics(p.quant_method).scalar_every_slot
            assert v["written_slots"] == (list(range(p.shape[0])) if every else [0]), (case, name)
            assert v["written_hold_checkpoint_value"], (case, name)
            if not every:
                sentinel = v["after_build_sentinel"]
                kind = slots.unwritten_kind(p, 1)
                assert kind == ("sentinel" if all(sentinel) else "empty" if not any(sentinel) else None), (case, name)
                # ... and process_weights_after_loading reduces the vector with a max (vLLM's own source).
                assert any(".max(" in line for line in v["process_weights_after_loading"]), (case, name)
            checked += 1
    assert built and (checked or release == "0.16.0")


def _in_proj_scales(doc: dict) -> dict[str, dict]:
    params = {n: e for fam in doc["families"].values() for n, e in fam.items()}
    return {n: e for n, e in params.items() if ".in_proj." in n and "scale" in n and len(e["shape"]) == 1}


def _vllm_tp_vectors() -> list[tuple[str, str]]:
    """(release, rank map) of every vLLM TP-1 rank map with a multi-slot in_proj scale (0.16.0 has one slot; maps
    of models vLLM refused to build have none)."""
    out = []
    for d in sorted(GOLDEN.glob("vllm-*")):
        for f in sorted(d.glob("*-vllm-tp1.json.gz")):
            doc = read_golden(f.with_suffix(""))
            if "families" in doc and any(e["shape"][0] > 1 for e in _in_proj_scales(doc).values()):
                out.append((d.name[len("vllm-") :], f.name[: -len("-vllm-tp1.json.gz")]))
    return out


VLLM_TP = _vllm_tp_vectors()


def test_vllm_tp1_rank_maps_span_the_change():
    releases = {r for r, _ in VLLM_TP}
    assert {"0.11.2", "0.12.0", "0.13.0", "0.14.0", "0.15.1", "0.17.0", "0.18.0", "0.19.0", "0.20.0"} <= releases
    assert "0.34.0" in releases and "0.16.0" not in releases


@pytest.mark.parametrize(("release", "case"), VLLM_TP)
def test_vllm_semantics_match_vllms_tp1_rank_maps(release, case):
    """vLLM's own TP-1 rank maps (oracle/vllm_tp) on the FP8 / MIXED / NVFP4 checkpoints: a scalar written into a
    multi-slot in_proj scale fills what ``loader_semantics`` says; the rest is ``untouched``."""
    doc = read_golden(GOLDEN / f"vllm-{release}" / f"{case}-vllm-tp1.json")
    engine = engines.get(f"vllm@{release}")
    vectors = {n: e for n, e in _in_proj_scales(doc).items() if e["shape"][0] > 1}
    assert vectors
    for name, e in vectors.items():
        boxes = e["ranks"]["0"]
        written = sum(b["dst"][0][1] - b["dst"][0][0] for b in boxes if "src" in b)
        untouched = sum(b["dst"][0][1] - b["dst"][0][0] for b in boxes if b.get("fill") == "untouched")
        every = engine.loader_semantics(e["quant_method"]).scalar_every_slot
        assert (written, untouched) == ((e["shape"][0], 0) if every else (1, e["shape"][0] - 1)), name


@pytest.mark.parametrize("release", ["0.16.0", "0.17.0", "0.19.1", "0.20.0"])
def test_vllm_audit_reaches_the_loads_verdict(release):
    """NVFP4: vLLM 0.17.0 – 0.19.x leave torch.empty memory in slots 1..4 of every in_proj input_scale /
    weight_scale_2 — the same error as SGLang before 0.5.16, from audit and from load alike."""
    engine = f"vllm@{release}"
    slot0 = release in ("0.17.0", "0.19.1")
    audit = audit_path(str(EX / "nano3-nvfp4"), engine)
    load = load_path(str(EX / "nano3-nvfp4"), engine, opts=LoadOptions(device="cpu")).report
    assert audit.verdict == load.verdict == ("incomplete" if slot0 else "clean")
    a = sorted((f.code, f.message) for f in audit.findings if f.code == "scale-slot0-only")
    b = sorted((f.code, f.message) for f in load.findings if f.code == "scale-slot0-only")
    assert a == b and len(a) == (2 if slot0 else 0)
    assert all("vllm 0.20.0 and later fill every slot" in m for _, m in a)


@pytest.mark.parametrize(("release", "slot0"), [("0.18.1", True), ("0.20.0", False)])
def test_vllm_fp8_sentinel_is_info(release, slot0):
    """FP8 (a flat MIXED recipe of FP8 layers): the other slots keep create_weights' finfo(float32).min
    sentinel, which the max over the vector never picks — an info, never an error."""
    audit = audit_path(str(CONF / "startup_mixed_no_nvfp4" / "checkpoint"), f"vllm@{release}")
    info = [f for f in audit.findings if f.message.endswith(slots.SENTINEL_MESSAGE)]
    assert [(f.severity, f.code) for f in info] == ([("info", "param-partial")] if slot0 else [])
    assert all(".in_proj.input_scale" in (f.tensor or "") for f in info)
    assert not [f for f in audit.findings if f.code == slots.SLOT0]
