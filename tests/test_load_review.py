"""Loader semantics of ``nhcheck load`` checked against SGLang's own weight loaders, per release.

Each test names the SGLang function whose behaviour it pins (read in the 0.5.11 and 0.5.23
wheels); the tiny checkpoints come from examples/generate.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nhcheck.load import LoadOptions, load_path

from test_load import EXAMPLES, generate, poison_everywhere, write

CPU = LoadOptions(device="cpu")
MAMBA_QUANT = "model.layers.0.mixer.in_proj"  # layer 0 is not in the Nano-3 exclude list: quantized in_proj


def _file_scalar(root: Path, name: str) -> torch.Tensor:
    for f in sorted(root.glob("*.safetensors")):
        t = load_file(str(f))
        if name in t:
            return t[name]
    raise KeyError(name)


def _quant(algo: str) -> dict:
    q = copy.deepcopy(generate.nano3_tiny_quant())
    q["quantization"]["quant_algo"] = algo
    q["quantization"].pop("kv_cache_quant_algo", None)
    return q


def _ckpt(tmp_path: Path, algo: str) -> Path:
    c = generate.nano3_tiny_config(quantized=True)
    q = _quant(algo)
    return write(tmp_path, generate.nemotron_h_tensors(c, q), c, q)


# ---------------------------------------------------------------------------
# Mamba in_proj: a MergedColumnParallelLinear (5 logical partitions z, x, B, C, dt) whose weight
# is fused in the checkpoint, so NemotronH's default branch calls its loader with no shard id.
# A scalar per-tensor scale (PerTensorScaleParameter of shape (5,)) then lands:
#   0.5.11/0.5.12 MergedColumnParallelLinear.weight_loader_v2 → load_merged_column_weight(shard_id=0): slot 0 only;
#   0.5.23        MergedColumnParallelLinear.weight_loader_v2 → every slot ("Fill every logical slot");
#   0.5.23 W4A16  (ModelOptNvFp4A16LinearMethod is not in WEIGHT_LOADER_V2_SUPPORTED) → weight_loader →
#                 adjust_scalar_to_fused_array(param, w, 0): slot 0 only.


@pytest.mark.parametrize("engine", ["0.5.11", "0.5.12"])
def test_nvfp4_in_proj_scalar_scales_fill_only_slot_0_before_0_5_23(engine):
    """ModelOptFp4LinearMethod allocates input_scale/weight_scale_2 with torch.empty; ≤0.5.12 writes
    slot 0 and leaves 1..4 uninitialised, which process_weights_after_loading then reduces with max()."""
    root = EXAMPLES / "nano3-nvfp4"
    res = load_path(str(root), f"sglang@{engine}", CPU)
    r = res.report
    for suffix in ("input_scale", "weight_scale_2"):
        name = f"{MAMBA_QUANT}.{suffix}"
        got = res.tensors[name]
        assert got.shape == (5,)
        want = _file_scalar(root, name.replace("model.", "backbone.", 1)).reshape(1)
        assert torch.equal(got[:1], want.to(got.dtype)), name
        assert poison_everywhere(got[1:]), name
        p = next(p for p in r.params if p.param.name == name)
        assert p.status == "partial" and p.written == 1 and p.missing == ("elements 1..4",)
    partial = [f for f in r.findings if f.code == "scale-slot0-only"]
    assert partial and all(f.severity == "error" and f"sglang {engine} writes" in f.message for f in partial)
    assert r.verdict == "incomplete"


def test_nvfp4_in_proj_scalar_scales_fill_every_slot_on_0_5_23():
    root = EXAMPLES / "nano3-nvfp4"
    res = load_path(str(root), "sglang@0.5.23", CPU)
    assert res.report.verdict == "clean"
    for suffix in ("input_scale", "weight_scale_2"):
        name = f"{MAMBA_QUANT}.{suffix}"
        want = _file_scalar(root, name.replace("model.", "backbone.", 1))
        assert torch.equal(res.tensors[name], want.reshape(1).expand(5)), name


@pytest.mark.parametrize("engine, every_slot", [("0.5.11", False), ("0.5.12", False), ("0.5.23", True)])
def test_fp8_in_proj_scalar_scales_slot_0_keeps_the_engine_sentinel_elsewhere(tmp_path, engine, every_slot):
    """ModelOptFp8LinearMethod fills weight_scale/input_scale with finfo(float32).min; ≤0.5.12 loads the
    scalar into slot 0 and requantize_with_max_scale treats the sentinel as "fused in checkpoint":
    by design, so the untouched slots are reported as information, not as an error."""
    root = _ckpt(tmp_path, "FP8")
    res = load_path(str(root), f"sglang@{engine}", CPU)
    r = res.report
    for suffix in ("input_scale", "weight_scale"):
        name = f"{MAMBA_QUANT}.{suffix}"
        got = res.tensors[name]
        want = _file_scalar(root, name.replace("model.", "backbone.", 1)).reshape(1).to(got.dtype)
        if every_slot:
            assert torch.equal(got, want.expand(5)), name
        else:
            assert torch.equal(got[:1], want) and poison_everywhere(got[1:]), name
            p = next(p for p in r.params if p.param.name == name)
            assert p.status == "partial" and p.missing == ("elements 1..4",)
    assert not [f for f in r.findings if f.severity == "error"], r.findings
    assert r.verdict == "clean"
    if not every_slot:
        info = [f for f in r.findings if f.code == "param-partial"]
        assert info and all(f.severity == "info" and "finfo" in f.message for f in info)


def test_w4a16_in_proj_weight_scale_2_fills_only_slot_0_on_0_5_23(tmp_path):
    """ModelOptNvFp4A16LinearMethod is loaded by the v1 MergedColumnParallelLinear.weight_loader:
    a fused-in-checkpoint scalar goes through adjust_scalar_to_fused_array(param, w, 0)."""
    root = _ckpt(tmp_path, "W4A16_NVFP4")
    res = load_path(str(root), "sglang@0.5.23", CPU)
    name = f"{MAMBA_QUANT}.weight_scale_2"
    got = res.tensors[name]
    want = _file_scalar(root, name.replace("model.", "backbone.", 1)).reshape(1)
    assert torch.equal(got[:1], want) and poison_everywhere(got[1:])
    p = next(p for p in res.report.params if p.param.name == name)
    assert p.status == "partial" and p.missing == ("elements 1..4",)
    assert res.report.verdict == "incomplete"
    slot0 = [f for f in res.report.findings if f.code == "scale-slot0-only"]
    assert slot0 and all("v1 weight_loader on every version" in f.message for f in slot0)
    # the non-fused linears (RowParallelLinear out_proj) still take the scalar into their one slot
    out = res.tensors["model.layers.0.mixer.out_proj.weight_scale_2"]
    assert out.shape == (1,) and not poison_everywhere(out)


# ---------------------------------------------------------------------------
# One-element scales of rank > 1. FusedMoE's _load_single_value / _load_per_tensor_weight_scale
# assign ``param[e] = w`` (any one-element tensor broadcasts), and default_weight_loader fills a
# one-element parameter from any one-element tensor; but the linear loaders only reshape a 0-d
# scale to (1,) and then assert equal shapes (ColumnParallelLinear/RowParallelLinear/
# ReplicatedLinear.weight_loader(_v2), PerTensorScaleParameter._load_into_shard_id asserts
# ``loaded_weight.shape[0] == 1`` and compares ``loaded_weight[0]`` with the 0-d slot).


def _reshape_scales(tensors, names, shape):
    return [(n, d, list(shape) if n in names else s) for n, d, s in tensors]


def test_rank_2_one_element_linear_scale_is_refused_not_copied(tmp_path):
    c = generate.nano3_tiny_config(quantized=True)
    q = _quant("FP8")
    q["quantization"]["exclude_modules"] = [
        e for e in q["quantization"]["exclude_modules"] if not e.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    ]
    bad = {
        "backbone.layers.0.mixer.out_proj.weight_scale",  # RowParallelLinear: (1,) slot
        "backbone.layers.5.mixer.k_proj.input_scale",
    }  # QKVParallelLinear: slot k of (3,)
    tensors = generate.nemotron_h_tensors(c, q)
    assert bad <= {n for n, _, _ in tensors}
    root = write(tmp_path, _reshape_scales(tensors, bad, (1, 1)), c, q)
    r = load_path(str(root), "sglang@0.5.23", CPU).report
    refused = [f for f in r.findings if f.code == "shape-mismatch"]
    assert refused and all(f.tensor in bad and f.severity == "error" for f in refused)
    assert r.verdict == "broken"
    by = {p.param.name: p for p in r.params}
    assert by["model.layers.0.mixer.out_proj.weight_scale"].status == "unfilled"
    assert by["model.layers.5.mixer.qkv_proj.input_scale"].missing == ("shard k",)


def test_rank_2_one_element_expert_scale_still_lands_in_its_slot(tmp_path):
    c = generate.nano3_tiny_config(quantized=True)
    q = _quant("FP8")
    tensors = generate.nemotron_h_tensors(c, q)
    name = "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    assert name in {n for n, _, _ in tensors}
    root = write(tmp_path, _reshape_scales(tensors, {name}, (1, 1)), c, q)
    res = load_path(str(root), "sglang@0.5.23", CPU)
    assert not [f for f in res.report.findings if f.code == "shape-mismatch"]
    got = res.tensors["model.layers.1.mixer.experts.w2_input_scale"][0]
    assert torch.equal(got.reshape(1), _file_scalar(root, name).reshape(1))


def test_audit_flags_the_rank_2_linear_scale_from_headers_alone(tmp_path):
    """The header replay agrees with the load: the same [1, 1] linear scales are shape mismatches, the expert one is not."""
    from nhcheck.pipeline import audit_path

    c = generate.nano3_tiny_config(quantized=True)
    q = _quant("FP8")
    q["quantization"]["exclude_modules"] = [
        e for e in q["quantization"]["exclude_modules"] if not e.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    ]
    bad = {"backbone.layers.0.mixer.out_proj.weight_scale", "backbone.layers.5.mixer.k_proj.input_scale"}
    expert = "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    tensors = _reshape_scales(generate.nemotron_h_tensors(c, q), bad | {expert}, (1, 1))
    rep = audit_path(str(write(tmp_path, tensors, c, q)), "sglang@0.5.23")
    flagged = [f for f in rep.findings if f.code == "shape-mismatch"]
    text = " ".join(f.message + " " + (f.tensor or "") for f in flagged)
    assert flagged and "reshapes only a 0-d scale" in text and rep.verdict == "broken"
    assert "out_proj" in text and "k_proj" in text and "experts" not in text
