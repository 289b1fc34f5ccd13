"""Quant-config resolution (spec §9) and the manifest builder (§8, §15)."""

from __future__ import annotations

import json

import pytest

from nhcheck.engines.sglang import PPWindow, get_profile
from nhcheck.errors import CheckpointError
from nhcheck.manifest import build_manifest, load_manifest
from nhcheck.model import parse_config
from nhcheck.quant import (
    FP4_LINEAR,
    FP4_MOE,
    FP8_LINEAR,
    FP8_MOE,
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


# ---------------------------------------------------------------------------
# Checked against SGLang's released source (0.5.11 / 0.5.12 / 0.5.23): each test names the rule and
# where it comes from (spec section or SGLang function).

CAUSAL = "NemotronHForCausalLM"


def _nested(algo="NVFP4", **q) -> dict:
    section = {"quant_algo": algo, **q}
    if "NVFP4" in algo and "group_size" not in section:
        section["group_size"] = 16
    return {"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization": section}


def _released(config: dict, hf: dict) -> dict:
    """The config.json of a MIXED release: the recipe in quantization_config too (SGLang >= 0.5.18 reads it)."""
    return dict(config, quantization_config={"quant_method": "modelopt", **hf["quantization"]})


def _flat_cfg(qc: dict, **kw) -> dict:
    return _cfg(quantization_config=qc, **kw)


def _resolver(config: dict, hf: dict | None, profile, outer=CAUSAL):
    return build_resolver(parse_quant(config, hf), outer, profile)


def _manifest(config: dict, hf: dict | None = None, profile=V23, **kw):
    return build_manifest(parse_config(config), parse_quant(config, hf), profile, **kw)


def _names_hf(config: dict, hf: dict | None = None, profile=V23, **kw) -> set[str]:
    return {p.name for p in _manifest(config, hf, profile, **kw).params}


# -- §9.3 A: is_layer_skipped / _module_path_match ------------------------------------------------------


def test_trailing_dot_entry_is_stripped_only_on_newest():
    # QU@0.5.23 _module_path_match strips trailing dots; the 0.5.11/0.5.12 function does not.
    hf = _nested("NVFP4", exclude_modules=["backbone.layers.0.mixer.in_proj."])
    assert _resolver(_cfg(), hf, V23).linear_method("model.layers.0.mixer.in_proj") == UNQUANT
    for old in (V11, V12):
        assert _resolver(_cfg(), hf, old).linear_method("model.layers.0.mixer.in_proj") == FP4_LINEAR
    # a trailing-dot layer entry ("…layers.0.") covers the whole layer on 0.5.23 only
    hf = _nested("NVFP4", exclude_modules=["backbone.layers.0."])
    assert _resolver(_cfg(), hf, V23).linear_method("model.layers.0.mixer.out_proj") == UNQUANT
    assert _resolver(_cfg(), hf, V11).linear_method("model.layers.0.mixer.out_proj") == FP4_LINEAR


def test_component_match_not_substring_and_backbone_or_model_prefix():
    qc = {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "ignore": ["model.layers.0.mixer.in_proj", "backbone.layers.2.mixer.o_proj"],
    }
    for prof in (V11, V23):
        r = _resolver(_flat_cfg(qc), None, prof)
        assert r.linear_method("model.layers.0.mixer.in_proj") == UNQUANT  # runtime-style entry
        assert r.linear_method("model.layers.2.mixer.o_proj") == UNQUANT  # exporter-style, via the mapper
        assert r.linear_method("model.layers.0.mixer.out_proj") == FP8_LINEAR
    big = _cfg("M" * 12)
    r = _resolver(big, _nested("NVFP4", exclude_modules=["backbone.layers.1.mixer.in_proj"]), V23)
    assert r.linear_method("model.layers.11.mixer.in_proj") == FP4_LINEAR  # layers.1 ≠ layers.11


def test_language_model_entry_in_causal_config_does_not_reach_model_prefix():
    # apply_weight_name_mapper maps first (backbone. → model. only at the start), then adds the copy
    # without language_model.: the copy stays "backbone.…" and matches no runtime prefix.
    qc = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["language_model.backbone.layers.0.mixer.in_proj"]}
    r = _resolver(_flat_cfg(qc), None, V23)
    assert r.linear_method("model.layers.0.mixer.in_proj") == FP8_LINEAR


# -- §9.3 B: is_layer_excluded globs ----------------------------------------------------------------------


def test_exclude_globs_keep_regex_syntax():
    # MQ is_layer_excluded: only "." is escaped and "*" becomes ".*"; the rest is regex syntax.
    hf = _nested("FP8", exclude_modules=["backbone.layers.[0-1].mixer.in_proj", "out_projs?"])
    for prof in (V11, V23):
        r = _resolver(_cfg("MMM"), hf, prof)
        assert r.linear_method("model.layers.1.mixer.in_proj") == UNQUANT
        assert r.linear_method("model.layers.2.mixer.in_proj") == FP8_LINEAR
        assert r.linear_method("model.layers.2.mixer.out_proj") == UNQUANT  # "s?" optional, part match


def test_glob_star_excludes_everything_under_a_component_and_moe():
    hf = _nested("FP8", exclude_modules=["*.experts", "layers.1*"], kv_cache_quant_algo="FP8")
    r = _resolver(_cfg("ME*EE"), hf, V23)
    assert r.moe_method("model.layers.1.mixer.experts") == UNQUANT_MOE  # "*.experts" full match
    assert r.moe_method("model.layers.4.mixer.experts") == UNQUANT_MOE
    # "layers.1*" is a full-prefix glob: it matches model.layers.1… only if the whole prefix matches,
    # which it does not ("model." comes first), and no single component matches either
    assert r.linear_method("model.layers.1.mixer.shared_experts.up_proj") == FP8_LINEAR


# -- §9.1: which quant config and which keys --------------------------------------------------------------


def test_quantization_config_without_quant_method_is_modelopt():
    # ModelConfig._parse_quant_hf_config: "quant_method" absent is treated like "modelopt".
    qc = {"quant_algo": "NVFP4", "group_size": 16, "ignore": ["lm_head"]}
    r = _resolver(_flat_cfg(qc), None, V23)
    assert r.kind == "fp4" and r.linear_method("model.layers.0.mixer.in_proj") == FP4_LINEAR


def test_flat_exclude_key_depends_on_config_class():
    # ModelOptFp8Config flat form reads only "ignore"; exclude_modules there is not read.
    qc = {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["backbone.layers.0.mixer.in_proj"]}
    for prof in (V11, V23):
        assert _resolver(_flat_cfg(qc), None, prof).linear_method("model.layers.0.mixer.in_proj") == FP8_LINEAR
    # ModelOptFp4Config: 0.5.23 falls back to modules_to_not_convert / exclude_modules, 0.5.11 reads "ignore" only
    qc = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "modules_to_not_convert": ["backbone.layers.0.mixer.in_proj"],
    }
    assert _resolver(_flat_cfg(qc), None, V23).linear_method("model.layers.0.mixer.in_proj") == UNQUANT
    assert _resolver(_flat_cfg(qc), None, V11).linear_method("model.layers.0.mixer.in_proj") == FP4_LINEAR
    # nested hf_quant_config.json: only "exclude_modules" is read, never "ignore"
    hf = _nested("NVFP4", ignore=["backbone.layers.0.mixer.in_proj"])
    assert _resolver(_cfg(), hf, V23).linear_method("model.layers.0.mixer.in_proj") == FP4_LINEAR


def test_flat_fp8_kv_cache():
    # ModelOptFp8Config flat: a kv_cache_scheme dict decides; without one 0.5.23 reads kv_cache_quant_algo,
    # 0.5.11 reads nothing.
    base = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": []}
    algo_only = _flat_cfg({**base, "kv_cache_quant_algo": "FP8"})
    assert _resolver(algo_only, None, V23).kv_on
    assert not _resolver(algo_only, None, V11).kv_on
    int8 = _flat_cfg({**base, "kv_cache_quant_algo": "FP8", "kv_cache_scheme": {"type": "int", "num_bits": 8}})
    assert not _resolver(int8, None, V23).kv_on and not _resolver(int8, None, V11).kv_on
    fp8 = _flat_cfg({**base, "kv_cache_scheme": {"type": "float", "num_bits": 8}})
    assert _resolver(fp8, None, V23).kv_on and _resolver(fp8, None, V11).kv_on
    null = _flat_cfg({**base, "kv_cache_quant_algo": None})
    assert not _resolver(null, None, V23).kv_on
    # nested: kv_cache_quant_algo only (null / absent → no KV scales)
    assert not _resolver(_cfg(), _nested("FP8", kv_cache_quant_algo=None), V23).kv_on
    assert not _resolver(_cfg(), _nested("FP8"), V11).kv_on
    assert _resolver(_cfg(), _nested("FP8", kv_cache_quant_algo="FP8"), V11).kv_on
    n = _names_hf(_cfg(), _nested("FP8", kv_cache_quant_algo="FP8"))
    assert {"model.layers.2.mixer.attn.k_scale", "model.layers.2.mixer.attn.v_scale"} <= n
    assert not any("k_scale" in x for x in _names_hf(_cfg(), _nested("FP8")))


def test_nvfp4_kv_defaults_to_auto_in_every_layout():
    for cfg, hf in (
        (_cfg(), _nested("NVFP4", kv_cache_quant_algo=None)),
        (
            _flat_cfg(
                {
                    "quant_method": "modelopt",
                    "quant_algo": "NVFP4",
                    "group_size": 16,
                    "kv_cache_scheme": {"type": "int", "num_bits": 8},
                }
            ),
            None,
        ),
    ):
        for prof in (V11, V23):
            assert _resolver(cfg, hf, prof).kv_on


def test_flat_mixed_kv_cache():
    layers = {"backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16}}
    base = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "ignore": [], "quantized_layers": layers}
    # any kv_cache_scheme dict is truthy ("auto" when not float/8 or float/4)
    odd = _flat_cfg({**base, "kv_cache_scheme": {"type": "int", "num_bits": 8}})
    assert _resolver(odd, None, V23).kv_on and _resolver(odd, None, V11).kv_on
    # without a scheme: 0.5.23 reads kv_cache_quant_algo, 0.5.11 does not
    algo = _flat_cfg({**base, "kv_cache_quant_algo": "FP8"})
    assert _resolver(algo, None, V23).kv_on
    assert not _resolver(algo, None, V11).kv_on


def test_mixed_falls_back_to_the_whole_file_only_on_newest():
    layers = {
        "backbone.layers.0.mixer.in_proj": {"quant_algo": "FP8"},
        "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
    }
    flat = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "quantized_layers": layers}  # no KV keys
    hf = _nested(
        "MIXED_PRECISION",
        kv_cache_quant_algo="FP8",
        quantized_layers=layers,
        exclude_modules=["backbone.layers.0.mixer.in_proj"],
    )
    cfg = _flat_cfg(flat)
    new = _resolver(cfg, hf, V23)  # the whole hf_quant_config.json: its KV algo and its exclude list
    assert new.kv_on and new.linear_method("model.layers.0.mixer.in_proj") == UNQUANT
    for old in (V11, V12):  # config.json copy as is: no KV, no exclusion
        r = _resolver(cfg, hf, old)
        assert not r.kv_on and r.linear_method("model.layers.0.mixer.in_proj") == FP8_LINEAR
    # quantized_layers missing from config.json: ≤0.5.12 refuses, 0.5.23 reads the file
    no_layers = _flat_cfg(
        {
            "quant_method": "modelopt",
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_scheme": {"type": "float", "num_bits": 8},
        }
    )
    assert _resolver(no_layers, hf, V11).refusal.startswith("ValueError: MIXED_PRECISION")
    assert _resolver(no_layers, hf, V23).moe_method("model.layers.1.mixer.experts") == FP4_MOE
    # 0.5.23 with nothing to fall back to
    assert "Cannot find the config file" in _resolver(cfg, None, V23).refusal
    m = _manifest(cfg, None, V23)
    assert any("Cannot find the config file" in p for p in m.problems)


def test_nvfp4_group_size_is_required():
    # ModelOptFp4Config.from_config raises without a group_size; 0.5.23 defaults the flat form to 16.
    flat = _flat_cfg({"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": []})
    assert _resolver(flat, None, V11).refusal.startswith("ValueError: NVFP4 quantization requires group_size")
    assert _resolver(flat, None, V23).refusal is None
    groups = _flat_cfg(
        {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "ignore": [],
            "config_groups": {"group_0": {"weights": {"group_size": 16}}},
        }
    )
    assert _resolver(groups, None, V11).refusal is None
    nested = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4"}}
    for prof in (V11, V23):
        assert _resolver(_cfg(), nested, prof).refusal.startswith("ValueError: NVFP4 quantization requires")


# -- §8.4 / §8.5 suffixes ---------------------------------------------------------------------------------


def test_mxfp8_registers_block_scale_inv():
    # Fp8LinearMethod / Fp8MoEMethod: use_mxfp8 implies block_quant, so the scale is weight_scale_inv (uint8).
    layers = {
        "backbone.layers.0.mixer.in_proj": {"quant_algo": "MXFP8"},
        "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "MXFP8"},
        "backbone.layers.1.mixer.shared_experts.up_proj": {"quant_algo": "FP8_PB_WO"},
        # an NVFP4 layer keeps the recipe modelopt_mixed: without one SGLang >= 0.5.15 resolves it to w4afp8
        "lm_head": {"quant_algo": "NVFP4", "group_size": 16},
    }
    hf = _nested("MIXED_PRECISION", quantized_layers=layers)
    m = _manifest(_released(_cfg(), hf), hf, V23)
    n = {p.name for p in m.params}
    assert "model.layers.0.mixer.in_proj.weight_scale_inv" in n
    assert "model.layers.0.mixer.in_proj.weight_scale" not in n
    assert "model.layers.0.mixer.in_proj.input_scale" not in n  # dynamic activations
    assert m.by_name["model.layers.0.mixer.in_proj.weight_scale_inv"].dtype == "uint8"
    assert m.by_name["model.layers.1.mixer.experts.w13_weight_scale_inv"].dtype == "uint8"
    assert "model.layers.1.mixer.experts.w13_input_scale" not in n
    assert m.by_name["model.layers.1.mixer.shared_experts.up_proj.weight_scale_inv"].dtype == "float32"
    # 0.5.11 maps neither algorithm: everything is unquantised
    old = _names_hf(_cfg(), hf, V11)
    assert not any(x.endswith(("_scale_inv", "weight_scale")) for x in old)


def test_lm_head_quantised_only_on_newest_when_not_excluded():
    hf = _nested("NVFP4", exclude_modules=[])
    assert "lm_head.weight_scale_2" in _names_hf(_cfg(), hf, V23)
    assert {x for x in _names_hf(_cfg(), hf, V11) if x.startswith("lm_head")} == {"lm_head.weight"}
    excluded = _nested("NVFP4", exclude_modules=["lm_head"])
    assert {x for x in _names_hf(_cfg(), excluded, V23) if x.startswith("lm_head")} == {"lm_head.weight"}


def test_conv1d_and_router_never_quantised_even_if_keyed():
    layers = {
        "backbone.layers.0.mixer.conv1d": {"quant_algo": "FP8"},
        "backbone.layers.1.mixer.gate": {"quant_algo": "FP8"},
        "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
    }
    hf = _nested("MIXED_PRECISION", quantized_layers=layers)
    n = _names_hf(_released(_cfg(), hf), hf)
    assert {x for x in n if ".conv1d." in x} == {
        "model.layers.0.mixer.conv1d.weight",
        "model.layers.0.mixer.conv1d.bias",
    }
    assert {x for x in n if ".gate." in x} == {
        "model.layers.1.mixer.gate.weight",
        "model.layers.1.mixer.gate.e_score_correction_bias",
    }


def test_mixed_layers_missing_from_map_are_unquantised_and_first_key_rule():
    layers = {
        "backbone.layers.1.mixer.experts.3.down_proj": {"quant_algo": "FP8"},
        "backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
    }
    r = _resolver(_cfg(), _nested("MIXED_PRECISION", quantized_layers=layers), V23)
    assert r.moe_method("model.layers.1.mixer.experts") == FP8_MOE  # first key in map order
    assert r.linear_method("model.layers.1.mixer.shared_experts.up_proj") == UNQUANT
    assert r.linear_method("model.layers.2.mixer.qkv_proj") == UNQUANT
    assert r.linear_method("model.layers.0.mixer.in_proj") == UNQUANT


# -- §10 MTP, §11 VL, §8.1 PP -----------------------------------------------------------------------------


def test_mtp_quant_names_map_language_model_mtp_on_newest():
    layers = {"language_model.mtp.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16}}
    cfg = _cfg("ME", mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1)
    hf = _nested("MIXED_PRECISION", quantized_layers=layers, kv_cache_quant_algo="FP8")
    new = _manifest(_released(cfg, hf), hf, V23, mtp=True)
    assert new.by_name["model.layers.1.mixer.experts.w13_weight"].quant_method == FP4_MOE
    old = _manifest(cfg, hf, V11, mtp=True)
    assert old.by_name["model.layers.1.mixer.experts.w13_weight"].quant_method == UNQUANT_MOE
    assert "model.layers.0.mixer.attn.k_scale" in {p.name for p in old.params}


def test_mtp_pattern_from_layers_block_type_and_class_default():
    cfg = _cfg(
        "ME", mtp_layers_block_type=["moe", "attention"], num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E"
    )
    assert parse_config(cfg).mtp_pattern == "E*"  # non-default list wins over the legacy pattern
    cfg = _cfg("ME", mtp_layers_block_type=["attention", "moe"], mtp_hybrid_override_pattern="E")
    assert parse_config(cfg).mtp_pattern == "E"  # default-valued list yields to the pattern
    n = _names_hf(_cfg("ME", num_nextn_predict_layers=1), None, V23, mtp=True)  # class default *E
    assert {
        "model.layers.0.mixer.qkv_proj.weight",
        "model.layers.1.mixer.experts.w13_weight",
        "model.layers.1.final_layernorm.weight",
        "model.layers.0.eh_proj.weight",
    } <= n


def test_vl_wrapper_prefixes_and_projector():
    llm = {k: v for k, v in _cfg().items() if k != "architectures"}
    outer = {
        "architectures": ["NemotronH_Nano_Omni_Reasoning_V3"],
        "llm_config": llm,
        "vit_hidden_size": 32,
        "projector_hidden_size": 48,
        "downsample_ratio": 0.5,
    }
    layers = {"language_model.backbone.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16}}
    hf = _nested("MIXED_PRECISION", quantized_layers=layers, kv_cache_quant_algo="FP8")
    new = _manifest(outer, hf, V23)
    assert new.lm_prefix == "language_model."
    assert new.by_name["language_model.model.layers.1.mixer.experts.w13_weight"].quant_method == FP4_MOE
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"} <= {p.name for p in new.params}
    assert new.by_name["mlp1.1.weight"].shape == (48, 128)
    old = _manifest(outer, hf, V12)
    assert old.by_name["language_model.model.layers.1.mixer.experts.w13_weight"].quant_method == UNQUANT_MOE


def test_pp_windows_and_tied_embeddings():
    cfg = parse_config(_cfg(tie_word_embeddings=True))
    first = {p.name for p in build_manifest(cfg, None, V23, pp=PPWindow(0, 2, True, False)).params}
    last = {p.name for p in build_manifest(cfg, None, V23, pp=PPWindow(2, 4, False, True)).params}
    assert "model.embed_tokens.weight" in first and "model.norm_f.weight" not in first and "lm_head.weight" not in first
    assert not any(x.startswith("model.layers.2.") for x in first)
    assert "model.embed_tokens.weight" not in last and {"model.norm_f.weight", "lm_head.weight"} <= last
    assert not any(x.startswith("model.layers.1.") for x in last)
    single = {p.name for p in build_manifest(cfg, None, V23).params}
    assert "lm_head.weight" not in single  # tied with PP=1: de-duplicated


# -- config parsing (model.py) -----------------------------------------------------------------------------


def test_shared_experts_default_to_one():
    cfg = _cfg()
    del cfg["n_shared_experts"]
    assert "model.layers.1.mixer.shared_experts.up_proj.weight" in _names_hf(cfg)
    assert "model.layers.1.mixer.shared_experts.up_proj.weight" not in _names_hf(_cfg(n_shared_experts=0))
    assert "model.layers.1.mixer.shared_experts.up_proj.weight" not in _names_hf(_cfg(n_shared_experts=None))


def test_layers_block_type_wins_over_pattern():
    cfg = _cfg("ME*-", layers_block_type=["mamba", "attention", "mlp", "moe"])
    assert parse_config(cfg).pattern == "M*-E"


def test_latent_and_mamba_dims():
    m = build_manifest(parse_config(_cfg(moe_latent_size=16, mamba_num_heads=4, mamba_head_dim=8, expand=8)), None, V23)
    assert m.by_name["model.layers.1.mixer.fc1_latent_proj.weight"].shape == (16, 64)
    assert m.by_name["model.layers.1.mixer.experts.w2_weight"].shape == (4, 16, 32)
    assert m.by_name["model.layers.0.mixer.out_proj.weight"].shape == (64, 32)
    assert "model.layers.1.mixer.fc1_latent_proj.weight" not in _names_hf(_cfg())


@pytest.mark.parametrize("profile", [V11, V23])
def test_hand_built_quant_configs_unchanged(profile):
    # QuantConfig built by hand (no raw sections) is taken as given.
    qc = QuantConfig("hf_quant_config.json", "modelopt", "FP8", "FP8", None, ("backbone.layers.0.mixer.in_proj",))
    r = build_resolver(qc, CAUSAL, profile)
    assert r.kv_on and r.linear_method("model.layers.0.mixer.in_proj") == UNQUANT


# -- Mamba groups: MambaMixer2(n_groups=config.mamba_n_groups), CFG default 8 -----------------------------


@pytest.mark.parametrize("extra, groups", [({}, 8), ({"n_groups": 4}, 8), ({"n_groups": 4, "mamba_n_groups": 4}, 4)])
def test_mamba_shapes_follow_mamba_n_groups_not_n_groups(extra, groups):
    cfg = _cfg(**extra)
    if "n_groups" not in extra:
        cfg.pop("n_groups")
    params = {p.name: p for p in _manifest(cfg).params}
    inner, ds, heads = 8 * 16, 16, 8
    assert params["model.layers.0.mixer.in_proj.weight"].shape == (2 * inner + 2 * groups * ds + heads, 64)
    assert params["model.layers.0.mixer.conv1d.weight"].shape[0] == inner + 2 * groups * ds


@pytest.mark.parametrize("profile", [V11, V23])
def test_mtp_draft_builds_its_own_lm_head_even_when_tied(profile):
    # MTPF: self.lm_head = ParallelLMHead(...) unconditionally; the main model drops it when tied (PP=1).
    cfg = _cfg(tie_word_embeddings=True, mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1)
    assert "lm_head.weight" in _names_hf(cfg, profile=profile, mtp=True)
    assert "lm_head.weight" not in _names_hf(cfg, profile=profile)


# -- exclude entries as runs of dotted components (``quant.component_runs``) ---------------------------------


def test_component_runs_is_the_dotted_substring_test():
    # The definition it replaces: ``.entry.`` occurs in ``.name.`` (one regex search over every entry before).
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nhcheck.quant import component_runs

    part = st.sampled_from(["", "a", "b", "1", "10", "experts", "layers"])
    dotted = st.lists(part, min_size=1, max_size=5).map(".".join)

    @settings(max_examples=400, deadline=None)
    @given(st.lists(dotted, max_size=4), dotted)
    def check(entries, name):
        want = any(f".{e}." in f".{name}." for e in entries)
        assert component_runs(entries)(name) == want

    check()
    matches = component_runs(["layers.1", "mixer.", "lm_head"])
    assert matches("backbone.layers.1.mixer") and not matches("backbone.layers.10.mixer")
    assert not matches("backbone.layers.2.mixer")  # "mixer." is [mixer, ""]: a run only before an empty component
    assert matches("lm_head") and matches("a..mixer..b")
