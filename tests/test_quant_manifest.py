"""Quant-config resolution (spec §9) and the manifest builder (§8, §15)."""

from __future__ import annotations

import json

import pytest

from nhcheck.engines.sglang import get_profile
from nhcheck.errors import CheckpointError
from nhcheck.manifest import build_manifest, load_manifest
from nhcheck.model import parse_config
from nhcheck.quant import (
    FP4_LINEAR,
    FP4_MOE,
    FP8_LINEAR,
    UNQUANT,
    UNQUANT_MOE,
    QuantConfig,
    QuantResolveError,
    build_resolver,
    parse_quant,
)

V11, V12, V23 = (get_profile(f"sglang@{v}") for v in ("0.5.11", "0.5.12", "0.5.23"))


def _qc(algo="NVFP4", exclude=(), layers=None, kv=None, source="hf_quant_config.json", scheme=None) -> QuantConfig:
    return QuantConfig(source, "modelopt", algo, kv, scheme, tuple(exclude), dict(layers or {}))


def _cfg(pattern="ME*-", **kw) -> dict:
    cfg = {
        "model_type": "nemotron_h",
        "architectures": ["NemotronHForCausalLM"],
        "hybrid_override_pattern": pattern,
        "num_hidden_layers": len(pattern),
        "hidden_size": 64,
        "vocab_size": 256,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "n_groups": 8,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 96,
        "n_routed_experts": 4,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 64,
        "n_shared_experts": 1,
    }
    cfg.update(kw)
    return cfg


# -- config parsing ---------------------------------------------------------------------------------


def test_both_config_layouts():
    nested = {"quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}
    q = parse_quant({}, nested)
    assert (q.source, q.quant_algo, q.exclude, q.kv_cache_quant_algo) == (
        "hf_quant_config.json",
        "NVFP4",
        ("lm_head",),
        "FP8",
    )
    flat = {
        "quantization_config": {
            "quant_method": "modelopt",
            "quant_algo": "MIXED_PRECISION",
            "ignore": ["mtp*"],
            "kv_cache_scheme": {"type": "float", "num_bits": 8},
            "quantized_layers": {"backbone.layers.0.mixer.in_proj": {"quant_algo": "fp8"}},
        }
    }
    q = parse_quant(flat, None)
    assert (q.source, q.is_mixed, q.exclude) == ("config.json", True, ("mtp*",))
    assert q.quantized_layers == {"backbone.layers.0.mixer.in_proj": "FP8"}


def test_mixed_falls_back_to_hf_quant_config_for_missing_parts():
    flat = {"quantization_config": {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION"}}
    nested = {
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": "FP8",
            "quantized_layers": {"a.b": {"quant_algo": "NVFP4"}},
        }
    }
    q = parse_quant(flat, nested)
    assert q.quantized_layers == {"a.b": "NVFP4"} and q.kv_cache_quant_algo == "FP8"


def test_non_modelopt_is_reported_not_replayed():
    q = parse_quant({"quantization_config": {"quant_method": "compressed-tensors"}}, None)
    assert q.problems and build_resolver(q, "NemotronHForCausalLM", V23).kind is None


# -- exclusion --------------------------------------------------------------------------------------


def test_is_layer_skipped_matches_whole_components():
    r = build_resolver(_qc(exclude=["backbone.layers.4.mixer.in_proj", "mixer.conv1d"]), "NemotronHForCausalLM", V23)
    assert r.is_layer_skipped("model.layers.4.mixer.in_proj")
    assert not r.is_layer_skipped("model.layers.40.mixer.in_proj")
    assert r.is_layer_skipped("model.layers.0.mixer.conv1d")


def test_fused_qkv_needs_all_shards():
    full = ["backbone.layers.2.mixer.q_proj", "backbone.layers.2.mixer.k_proj", "backbone.layers.2.mixer.v_proj"]
    r = build_resolver(_qc(exclude=full), "NemotronHForCausalLM", V23)
    assert r.linear_method("model.layers.2.mixer.qkv_proj") == UNQUANT
    r = build_resolver(_qc(exclude=full[:2]), "NemotronHForCausalLM", V23)
    with pytest.raises(QuantResolveError, match="some but not all shards"):
        r.linear_method("model.layers.2.mixer.qkv_proj")


def test_experts_substring_rule_and_globs():
    r = build_resolver(_qc(exclude=["backbone.layers.1.mixer.experts.0.up_proj"]), "NemotronHForCausalLM", V23)
    # a linear under "experts" is skipped if it is a plain substring of an exclude entry containing "experts"
    assert r.is_layer_skipped("model.layers.1.mixer.experts")
    r = build_resolver(_qc(exclude=["mtp*"]), "NemotronHForCausalLM", V23)
    assert r.is_layer_excluded("mtp.layers.1.mixer.experts")
    assert r.moe_method("mtp.layers.1.mixer.experts") == UNQUANT_MOE
    assert r.moe_method("model.layers.1.mixer.experts") == FP4_MOE
    r = build_resolver(_qc(exclude=["*.conv1d"]), "NemotronHForCausalLM", V23)
    assert r.is_layer_excluded("model.layers.0.mixer.conv1d") and not r.is_layer_excluded(
        "model.layers.0.mixer.in_proj"
    )


def test_moe_exclusion_uses_only_the_glob_matcher():
    # is_layer_skipped is not consulted for FusedMoE: a dotted-component entry that is not a glob match…
    r = build_resolver(_qc(exclude=["backbone.layers.1.mixer"]), "NemotronHForCausalLM", V23)
    assert r.moe_method("model.layers.1.mixer.experts") == FP4_MOE
    assert r.linear_method("model.layers.1.mixer.shared_experts.up_proj") == UNQUANT


def test_exclude_prefix_remap_and_language_model_copies():
    r = build_resolver(
        _qc(exclude=["language_model.backbone.layers.0.mixer.in_proj"], source="config.json"),
        "NemotronHForCausalLM",
        V23,
    )
    assert "backbone.layers.0.mixer.in_proj" in r.exclude  # copy without language_model.
    vl_old = build_resolver(
        _qc("MIXED_PRECISION", layers={"language_model.backbone.layers.0.mixer.in_proj": "FP8"}),
        "NemotronH_Nano_Omni_Reasoning_V3",
        V11,
    )
    vl_new = build_resolver(
        _qc("MIXED_PRECISION", layers={"language_model.backbone.layers.0.mixer.in_proj": "FP8"}),
        "NemotronH_Nano_Omni_Reasoning_V3",
        V23,
    )
    p = "language_model.model.layers.0.mixer.in_proj"
    assert vl_old.linear_method(p) == UNQUANT  # no mapper before PR #25023
    assert vl_new.linear_method(p) == FP8_LINEAR


# -- mixed precision --------------------------------------------------------------------------------


def test_mixed_resolution_order():
    layers = {
        "backbone.layers.1.mixer.experts.0.up_proj": "NVFP4",
        "backbone.layers.2.mixer.q_proj": "FP8",
        "backbone.layers.2.mixer.k_proj": "FP8",
        "backbone.layers.2.mixer.v_proj": "FP8",
        "backbone.layers.3.mixer.q_proj": "FP8",
        "backbone.layers.3.mixer.k_proj": "NVFP4",
        "lm_head": "NVFP4",
    }
    r = build_resolver(_qc("MIXED_PRECISION", layers=layers), "NemotronHForCausalLM", V23)
    assert r.moe_method("model.layers.1.mixer.experts") == FP4_MOE  # first key under the prefix
    assert r.linear_method("model.layers.2.mixer.qkv_proj") == FP8_LINEAR  # packed shards agree
    with pytest.raises(QuantResolveError, match="Mixed quant_algo"):
        r.linear_method("model.layers.3.mixer.qkv_proj")
    assert r.linear_method("model.layers.0.mixer.in_proj") == UNQUANT
    assert r.linear_method("lm_head", lm_head=True) == FP4_LINEAR
    old = build_resolver(_qc("MIXED_PRECISION", layers=layers), "NemotronHForCausalLM", V11)
    assert old.linear_method("lm_head", lm_head=True) == UNQUANT  # lm_head not quantisable ≤0.5.12


def test_candidate_prefixes_only_on_newest():
    layers = {"model.language_model.layers.0.mixer.in_proj": "FP8"}
    new = build_resolver(_qc("MIXED_PRECISION", layers=layers, source="config.json"), "NemotronHForCausalLM", V23)
    old = build_resolver(_qc("MIXED_PRECISION", layers=layers, source="config.json"), "NemotronHForCausalLM", V11)
    assert new.linear_method("model.layers.0.mixer.in_proj") == FP8_LINEAR
    assert old.linear_method("model.layers.0.mixer.in_proj") == UNQUANT


def test_algorithms_by_version():
    assert build_resolver(_qc("W4A16_NVFP4"), "NemotronHForCausalLM", V23).kind == "fp4"
    r = build_resolver(_qc("W4A16_NVFP4"), "NemotronHForCausalLM", V11)
    assert r.kind is None and "only supports" in r.refusal
    mixed = {"backbone.layers.0.mixer.in_proj": "MXFP8"}
    assert (
        build_resolver(_qc("MIXED_PRECISION", layers=mixed), "NemotronHForCausalLM", V11).linear_method(
            "model.layers.0.mixer.in_proj"
        )
        == UNQUANT
    )
    assert (
        build_resolver(_qc("MIXED_PRECISION", layers=mixed), "NemotronHForCausalLM", V23).linear_method(
            "model.layers.0.mixer.in_proj"
        )
        == "Fp8LinearMethod"
    )


def test_kv_cache_truthiness():
    assert build_resolver(_qc("NVFP4"), "NemotronHForCausalLM", V23).kv_on  # FP4 defaults to auto
    assert not build_resolver(_qc("FP8"), "NemotronHForCausalLM", V23).kv_on
    assert build_resolver(_qc("FP8", kv="FP8"), "NemotronHForCausalLM", V23).kv_on
    assert build_resolver(_qc("FP8", scheme={"type": "float", "num_bits": 8}), "NemotronHForCausalLM", V23).kv_on
    assert not build_resolver(_qc("MIXED_PRECISION", layers={"a.b": "FP8"}), "NemotronHForCausalLM", V23).kv_on


# -- manifest -----------------------------------------------------------------------------------------


def _names(cfg: dict, qc=None, profile=V23, **kw) -> set[str]:
    return {p.name for p in build_manifest(parse_config(cfg), qc, profile, **kw).params}


def test_layer_kinds_unquantised():
    n = _names(_cfg())
    assert {
        "model.layers.0.mixer.A",
        "model.layers.0.mixer.conv1d.bias",
        "model.layers.0.mixer.in_proj.weight",
        "model.layers.1.mixer.gate.weight",
        "model.layers.1.mixer.experts.w13_weight",
        "model.layers.1.mixer.shared_experts.down_proj.weight",
        "model.layers.2.mixer.qkv_proj.weight",
        "model.layers.3.mixer.up_proj.weight",
        "model.norm_f.weight",
        "lm_head.weight",
    } <= n
    assert not any("attn.k_scale" in x for x in n)  # no quant config: no KV scales
    assert {x for x in n if x.endswith("bias")} == {
        "model.layers.0.mixer.conv1d.bias",
        "model.layers.0.mixer.dt_bias",
        "model.layers.1.mixer.gate.e_score_correction_bias",
    }


def test_tied_embeddings_conv_bias_use_bias_mlp_bias_latent():
    n = _names(_cfg(tie_word_embeddings=True, use_conv_bias=False, use_bias=True, mlp_bias=True, moe_latent_size=16))
    assert "lm_head.weight" not in n
    assert "model.layers.0.mixer.conv1d.bias" not in n
    assert "model.layers.0.mixer.in_proj.bias" in n and "model.layers.0.mixer.out_proj.bias" in n
    assert "model.layers.3.mixer.up_proj.bias" in n
    assert "model.layers.2.mixer.qkv_proj.bias" not in n  # attention never has bias
    assert "model.layers.1.mixer.fc1_latent_proj.weight" in n and "model.layers.1.mixer.fc2_latent_proj.bias" in n
    m = build_manifest(parse_config(_cfg(moe_latent_size=16)), None, V23)
    assert m.by_name["model.layers.1.mixer.experts.w13_weight"].shape == (4, 32, 16)


def test_layers_block_type_and_pattern_errors():
    cfg = _cfg()
    del cfg["hybrid_override_pattern"]
    cfg["layers_block_type"] = ["mamba", "moe", "attention", "mlp"]
    assert parse_config(cfg).pattern == "ME*-"
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        parse_config(_cfg(num_hidden_layers=7))
    with pytest.raises(CheckpointError, match="model_type"):
        parse_config(_cfg(model_type="llama"))


def test_mamba_width_from_heads_not_expand():
    m = build_manifest(parse_config(_cfg(expand=2, hidden_size=64, mamba_num_heads=10, mamba_head_dim=16)), None, V23)
    assert m.by_name["model.layers.0.mixer.norm.weight"].shape == (160,)
    assert m.by_name["model.layers.0.mixer.in_proj.weight"].shape == (2 * 160 + 2 * 8 * 16 + 10, 64)


def test_fp4_and_fp8_suffixes_and_kv_scales():
    n = _names(_cfg(), _qc("NVFP4", exclude=["lm_head"]))
    assert {
        "model.layers.0.mixer.in_proj.weight_scale_2",
        "model.layers.1.mixer.experts.w13_input_scale",
        "model.layers.2.mixer.attn.k_scale",
        "model.layers.2.mixer.qkv_proj.weight_scale",
    } <= n
    assert "model.layers.1.mixer.experts.w13_blockscale_swizzled" not in n  # trtllm default on 0.5.23
    assert "model.layers.1.mixer.experts.w13_blockscale_swizzled" in _names(_cfg(), _qc("NVFP4"), moe_backend="auto")
    assert "model.layers.1.mixer.experts.w13_blockscale_swizzled" in _names(_cfg(), _qc("NVFP4"), V11)
    n8 = _names(_cfg(), _qc("FP8", kv="FP8"))
    assert {
        "model.layers.0.mixer.in_proj.input_scale",
        "model.layers.1.mixer.experts.w2_weight_scale",
        "model.layers.2.mixer.attn.v_scale",
    } <= n8
    assert not any(x.endswith("weight_scale_2") for x in n8)
    nawq = _names(_cfg(), _qc("NVFP4_AWQ"))
    assert "model.layers.0.mixer.in_proj.pre_quant_scale" in nawq
    a16 = build_manifest(parse_config(_cfg()), _qc("W4A16_NVFP4"), V23)
    assert a16.by_name["model.layers.0.mixer.in_proj.input_scale"].informational


def test_gate_and_conv_never_quantised():
    m = build_manifest(parse_config(_cfg()), _qc("NVFP4"), V23)
    assert m.by_name["model.layers.1.mixer.gate.weight"].dtype == "bfloat16"
    assert m.by_name["model.layers.0.mixer.conv1d.weight"].quant_method == UNQUANT
    assert (
        build_manifest(parse_config(_cfg()), _qc("NVFP4"), V11).by_name["model.layers.1.mixer.gate.weight"].dtype
        == "float32"
    )


def test_mtp_manifest():
    cfg = _cfg("ME", mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1)
    m = build_manifest(parse_config(cfg), _qc("NVFP4", exclude=["mtp*"]), V23, mtp=True)
    n = {p.name for p in m.params}
    assert {
        "model.layers.0.enorm.weight",
        "model.layers.0.hnorm.weight",
        "model.layers.0.eh_proj.weight",
        "model.layers.1.final_layernorm.weight",
        "model.layers.0.mixer.qkv_proj.weight",
        "lm_head.weight",
    } <= n
    assert m.by_name["model.layers.1.mixer.experts.w13_weight"].quant_method == UNQUANT_MOE  # mtp* excluded
    assert "model.layers.0.mixer.attn.k_scale" in n  # KV scales have no exclusion check
    assert "model.norm_f.weight" not in n


def test_foreign_manifest_dumps(tmp_path):
    lst = tmp_path / "names.json"
    lst.write_text(json.dumps(["model.layers.1.mixer.experts.w13_weight", "model.layers.2.mixer.qkv_proj.weight"]))
    m = load_manifest(str(lst), "sglang@0.5.23")
    assert m.by_name["model.layers.1.mixer.experts.w13_weight"].loader == "expert"
    assert m.by_name["model.layers.2.mixer.qkv_proj.weight"].loader == "stacked"
    d = tmp_path / "dump.json"
    d.write_text(json.dumps({"language_model.model.layers.0.mixer.A": {"shape": [8], "dtype": "torch.float32"}}))
    m = load_manifest(str(d), "sglang@0.5.23")
    assert m.lm_prefix == "language_model." and m.by_name["language_model.model.layers.0.mixer.A"].dtype == "float32"
    ours = tmp_path / "ours.json"
    built = build_manifest(parse_config(_cfg()), _qc("NVFP4"), V23)
    ours.write_text(json.dumps(built.to_json()))
    assert load_manifest(str(ours), "x").params == built.params
    bad = tmp_path / "bad.json"
    bad.write_text("42")
    with pytest.raises(CheckpointError):
        load_manifest(str(bad), "x")
