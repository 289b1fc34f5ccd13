"""Every branch and quirk of the SGLang replay (spec sglang-loading.md §3–§5, §10, §11, §13)."""

from __future__ import annotations

import pytest

from nhcheck.engines.base import EngineId
from nhcheck.engines.sglang import PPWindow, SGLangEngine, get_profile, mtp_preprocess, replay_name, route_wrapped
from nhcheck.errors import UsageError

V11, V12, V23 = (get_profile(f"sglang@{v}") for v in ("0.5.11", "0.5.12", "0.5.23"))
ALL = (V11, V12, V23)


def _fp4(prefix: str) -> set[str]:
    return {f"{prefix}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")}


def _manifest_13_1(kv: bool = True) -> set[str]:
    """§13.1: pattern ME*-, 4 experts; Mamba/experts/shared NVFP4; latent and attention unquantised."""
    p = {"model.embed_tokens.weight", "model.norm_f.weight", "lm_head.weight"}
    m = "model.layers.0.mixer"
    p |= {f"{m}.A", f"{m}.D", f"{m}.dt_bias", f"{m}.conv1d.weight", f"{m}.conv1d.bias", f"{m}.norm.weight"}
    p |= _fp4(f"{m}.in_proj") | _fp4(f"{m}.out_proj")
    e = "model.layers.1.mixer"
    p |= {
        f"{e}.gate.weight",
        f"{e}.gate.e_score_correction_bias",
        f"{e}.fc1_latent_proj.weight",
        f"{e}.fc2_latent_proj.weight",
    }
    p |= {
        f"{e}.experts.{w}_{s}"
        for w in ("w13", "w2")
        for s in ("weight", "weight_scale", "weight_scale_2", "input_scale", "blockscale_swizzled")
    }
    p |= _fp4(f"{e}.shared_experts.up_proj") | _fp4(f"{e}.shared_experts.down_proj")
    a = "model.layers.2.mixer"
    p |= {f"{a}.qkv_proj.weight", f"{a}.o_proj.weight"}
    if kv:
        p |= {f"{a}.attn.k_scale", f"{a}.attn.v_scale"}
    p |= {"model.layers.3.mixer.up_proj.weight", "model.layers.3.mixer.down_proj.weight"}
    p |= {f"model.layers.{i}.norm.weight" for i in range(4)}
    return p


M = frozenset(_manifest_13_1())
PP = PPWindow(0, 4)

# (checkpoint name, outcome, param-or-engine-name, shard, expert) — §13.1, identical on every version.
VECTORS_13_1 = [
    ("backbone.embeddings.weight", "load", "model.embed_tokens.weight", None, None),
    ("backbone.norm_f.weight", "load", "model.norm_f.weight", None, None),
    ("lm_head.weight", "load", "lm_head.weight", None, None),
    ("backbone.layers.0.mixer.A_log", "load", "model.layers.0.mixer.A", None, None),
    (
        "backbone.layers.0.mixer.in_proj.weight_scale_2",
        "load",
        "model.layers.0.mixer.in_proj.weight_scale_2",
        None,
        None,
    ),
    ("backbone.layers.0.mixer.conv1d.bias", "load", "model.layers.0.mixer.conv1d.bias", None, None),
    (
        "backbone.layers.1.mixer.gate.e_score_correction_bias",
        "load",
        "model.layers.1.mixer.gate.e_score_correction_bias",
        None,
        None,
    ),
    ("backbone.layers.1.mixer.experts.3.up_proj.weight", "load", "model.layers.1.mixer.experts.w13_weight", "w1", 3),
    (
        "backbone.layers.1.mixer.experts.3.up_proj.weight_scale",
        "load",
        "model.layers.1.mixer.experts.w13_weight_scale",
        "w1",
        3,
    ),
    (
        "backbone.layers.1.mixer.experts.3.up_proj.weight_scale_2",
        "load",
        "model.layers.1.mixer.experts.w13_weight_scale_2",
        "w1",
        3,
    ),
    (
        "backbone.layers.1.mixer.experts.3.up_proj.input_scale",
        "load",
        "model.layers.1.mixer.experts.w13_input_scale",
        "w1",
        3,
    ),
    ("backbone.layers.1.mixer.experts.3.down_proj.weight", "load", "model.layers.1.mixer.experts.w2_weight", "w2", 3),
    (
        "backbone.layers.1.mixer.experts.3.down_proj.input_scale",
        "load",
        "model.layers.1.mixer.experts.w2_input_scale",
        "w2",
        3,
    ),
    (
        "backbone.layers.1.mixer.experts.4.down_proj.weight",
        "warn",
        "model.layers.1.mixer.experts.4.down_proj.weight",
        None,
        None,
    ),
    (
        "backbone.layers.1.mixer.shared_experts.down_proj.weight_scale_2",
        "load",
        "model.layers.1.mixer.shared_experts.down_proj.weight_scale_2",
        None,
        None,
    ),
    (
        "backbone.layers.1.mixer.fc1_latent_proj.weight",
        "load",
        "model.layers.1.mixer.fc1_latent_proj.weight",
        None,
        None,
    ),
    (
        "backbone.layers.1.mixer.fc1_latent_proj.input_scale",
        "warn",
        "model.layers.1.mixer.fc1_latent_proj.input_scale",
        None,
        None,
    ),
    ("backbone.layers.2.mixer.q_proj.weight", "load", "model.layers.2.mixer.qkv_proj.weight", "q", None),
    ("backbone.layers.2.mixer.k_proj.weight", "load", "model.layers.2.mixer.qkv_proj.weight", "k", None),
    ("backbone.layers.2.mixer.v_proj.weight", "load", "model.layers.2.mixer.qkv_proj.weight", "v", None),
    ("backbone.layers.2.mixer.q_proj.input_scale", "warn", "model.layers.2.mixer.qkqkv_proj.input_scale", None, None),
    ("backbone.layers.2.mixer.k_proj.weight_scale", "warn", "model.layers.2.mixer.qkqkv_proj.weight_scale", None, None),
    ("backbone.layers.2.mixer.v_proj.input_scale", "warn", "model.layers.2.mixer.qkv_proj.input_scale", None, None),
    ("backbone.layers.2.mixer.k_proj.k_scale", "load", "model.layers.2.mixer.attn.k_scale", None, None),
    ("backbone.layers.2.mixer.v_proj.v_scale", "load", "model.layers.2.mixer.attn.v_scale", None, None),
    ("backbone.layers.2.mixer.o_proj.bias", "skip", "model.layers.2.mixer.o_proj.bias", None, None),
    ("backbone.layers.3.mixer.down_proj.input_scale", "warn", "model.layers.3.mixer.down_proj.input_scale", None, None),
    ("backbone.layers.4.norm.weight", "skip", None, None, None),
    ("mtp.layers.0.enorm.weight", "skip", None, None, None),
    (
        "language_model.backbone.layers.0.norm.weight",
        "warn",
        "language_model.backbone.layers.0.norm.weight",
        None,
        None,
    ),
]


@pytest.mark.parametrize("profile", ALL, ids=lambda p: p.version)
@pytest.mark.parametrize("name,outcome,target,shard,expert", VECTORS_13_1, ids=[v[0] for v in VECTORS_13_1])
def test_vectors_13_1(profile, name, outcome, target, shard, expert):
    o = replay_name(name, M, 4, profile, pp=PP)
    assert o.outcome == outcome
    if outcome == "load":
        assert (o.param, o.shard_id, o.expert_id) == (target, shard, expert)
    elif target is not None:
        assert o.engine_name == target
    if outcome == "warn" and o.reason == "not-found":
        assert o.message == f"Parameter {target} not found in params_dict"


def test_skip_reasons():
    assert replay_name("backbone.layers.4.norm.weight", M, 4, V23, pp=PP).reason == "pp-range"
    assert replay_name("mtp.layers.0.enorm.weight", M, 4, V23, pp=PP).reason == "mtp-filter"
    assert replay_name("backbone.layers.2.mixer.o_proj.bias", M, 4, V23).reason == "bias"


def test_without_pp_window_no_range_skip():
    # A layer index past the model is only dropped when the engine's start/end layer says so.
    assert replay_name("backbone.layers.9.norm.weight", M, 4, V23).outcome == "warn"


def test_pp_rank_skips():
    not_first = PPWindow(0, 4, first_rank=False, last_rank=True)
    not_last = PPWindow(0, 4, first_rank=True, last_rank=False)
    assert replay_name("backbone.embeddings.weight", M, 4, V23, pp=not_first).reason == "pp-rank"
    assert replay_name("lm_head.weight", M, 4, V23, pp=not_last).reason == "pp-rank"
    assert replay_name("backbone.norm_f.weight", M, 4, V23, pp=not_last).reason == "pp-rank"


def test_kv_drop_without_kv_quantisation():
    m = frozenset(_manifest_13_1(kv=False))
    o = replay_name("backbone.layers.2.mixer.k_proj.k_scale", m, 4, V23)
    assert (o.outcome, o.reason) == ("warn", "kv-drop")
    assert "model.layers.2.mixer.attn.attn.k_scale" in o.message
    assert o.message.startswith("Found .k_scale in the checkpoint (e.g. model.layers.2.mixer.attn.k_scale)")
    o = replay_name("backbone.layers.2.mixer.v_proj.v_scale", m, 4, V23)
    assert "model.layers.2.mixer.attn.attn.v_scale" in o.message


def test_deprecated_kv_scale_never_loads():
    o = replay_name("backbone.layers.2.mixer.k_proj.kv_scale", M, 4, V23)
    assert (o.outcome, o.reason) == ("warn", "kv-drop")
    assert "model.layers.2.mixer.k_proj.attn.k_scale" in o.message
    # A bare mixer.kv_scale maps onto attn.k_scale and loads.
    assert replay_name("backbone.layers.2.mixer.kv_scale", M, 4, V23).param == "model.layers.2.mixer.attn.k_scale"


def test_quark_output_scale_continues_to_default_branch():
    o = replay_name("backbone.layers.2.mixer.q_proj.output_scale", M, 4, V23)
    # .q_proj.output_scale → .attn.q_scale (no existence check), then no stacked match → WARN.
    assert (o.outcome, o.engine_name) == ("warn", "model.layers.2.mixer.attn.q_scale")


# §13.2: experts unquantised at runtime, checkpoint NVFP4.
M_UNQ = frozenset(
    n for n in M if not n.startswith("model.layers.1.mixer.experts.") or n.endswith(("w13_weight", "w2_weight"))
)


def test_pr_24434_unit_cases():
    """The two cases of PR #24434's own unit test."""
    name = "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    o = replay_name(name, M_UNQ, 4, V11)
    assert (o.outcome, o.message) == ("raise", "KeyError: 'model.layers.1.mixer.experts.w2_input_scale'")
    for prof in (V12, V23):
        o = replay_name(name, M_UNQ, 4, prof)
        assert (o.outcome, o.reason) == ("skip", "expert-orphan")
    for prof in ALL:
        o = replay_name("backbone.layers.1.mixer.experts.0.down_proj.weight", M_UNQ, 4, prof)
        assert (o.outcome, o.param, o.shard_id, o.expert_id) == (
            "load",
            "model.layers.1.mixer.experts.w2_weight",
            "w2",
            0,
        )


@pytest.mark.parametrize("suffix", ["weight_scale", "weight_scale_2", "input_scale"])
@pytest.mark.parametrize("proj,w", [("up_proj", "w13"), ("down_proj", "w2")])
def test_13_2_all_expert_scales(suffix, proj, w):
    name = f"backbone.layers.1.mixer.experts.0.{proj}.{suffix}"
    assert replay_name(name, M_UNQ, 4, V11).message == f"KeyError: 'model.layers.1.mixer.experts.{w}_{suffix}'"
    assert replay_name(name, M_UNQ, 4, V12).reason == "expert-orphan"


def test_expert_trailing_dot_and_index_bounds():
    big = frozenset({"model.layers.1.mixer.experts.w13_weight"})
    # experts.1. must not match experts.11.; with E=2, index 11 falls to the default branch.
    o = replay_name("backbone.layers.1.mixer.experts.11.up_proj.weight", big, 2, V23)
    assert (o.outcome, o.engine_name) == ("warn", "model.layers.1.mixer.experts.11.up_proj.weight")
    assert replay_name("backbone.layers.1.mixer.experts.11.up_proj.weight", big, 12, V23).expert_id == 11
    # leading zeros match no tuple
    assert replay_name("backbone.layers.1.mixer.experts.03.up_proj.weight", big, 12, V23).outcome == "warn"
    # batched, non-indexed expert tensors are not handled
    assert replay_name("backbone.layers.1.mixer.experts.up_proj.weight", big, 12, V23).outcome == "warn"


def test_shared_experts_with_index_matches_expert_rule():
    """The literal substring test also matches inside ``shared_experts.3.up_proj.`` (no dot required before)."""
    m = frozenset({"model.layers.1.mixer.shared_experts.w13_weight"})
    o = replay_name("backbone.layers.1.mixer.shared_experts.3.up_proj.weight", m, 4, V23)
    assert (o.outcome, o.param, o.expert_id) == ("load", "model.layers.1.mixer.shared_experts.w13_weight", 3)
    o = replay_name("backbone.layers.1.mixer.shared_experts.up_proj.weight", m, 4, V23)
    assert o.outcome == "warn"


def test_bias_silence_in_stacked_branch():
    for proj in ("q_proj", "k_proj", "v_proj"):
        o = replay_name(f"backbone.layers.2.mixer.{proj}.bias", M, 4, V23)
        assert (o.outcome, o.reason) == ("skip", "bias")


def test_expert_bias_orphan_raises_before_fix():
    o = replay_name("backbone.layers.1.mixer.experts.0.up_proj.bias", M, 4, V11)
    assert o.message == "KeyError: 'model.layers.1.mixer.experts.w13_bias'"


def test_names_in_runtime_form_pass_through():
    assert replay_name("model.layers.0.mixer.A", M, 4, V23).param == "model.layers.0.mixer.A"


def test_prefix_remap_needs_no_dot_and_mtp_is_a_substring():
    assert replay_name("backboneX.y", frozenset({"modelX.y"}), 4, V23).param == "modelX.y"
    # any name containing "mtp" is dropped by the main model
    assert replay_name("backbone.layers.0.mixer.smtpx.weight", M, 4, V23).reason == "mtp-filter"


def test_tied_lm_head_warns():
    tied = frozenset(M - {"lm_head.weight"})
    o = replay_name("lm_head.weight", tied, 4, V23)
    assert (o.outcome, o.engine_name) == ("warn", "lm_head.weight")


def test_no_rotary_skip():
    assert replay_name("model.rotary_emb.inv_freq", M, 4, V23).outcome == "warn"


# §13.3 MTP mode
M_MTP = frozenset(
    {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.enorm.weight",
        "model.layers.0.hnorm.weight",
        "model.layers.0.eh_proj.weight",
        "model.layers.0.mixer.qkv_proj.weight",
        "model.layers.1.mixer.experts.w13_weight",
        "model.layers.1.final_layernorm.weight",
    }
)


@pytest.mark.parametrize(
    "name,new,old",
    [
        ("backbone.embeddings.weight", "model.embed_tokens.weight", None),
        ("lm_head.weight", "lm_head.weight", None),
        ("backbone.layers.0.mixer.in_proj.weight", None, None),
        ("backbone.norm_f.weight", None, None),
        ("mtp.layers.0.enorm.weight", "model.layers.0.enorm.weight", "model.layers.0.enorm.weight"),
        ("mtp.layers.0.hnorm.weight", "model.layers.0.hnorm.weight", "model.layers.0.hnorm.weight"),
        ("mtp.layers.0.eh_proj.weight", "model.layers.0.eh_proj.weight", "model.layers.0.eh_proj.weight"),
        (
            "mtp.layers.0.mixer.q_proj.weight",
            "model.layers.0.mixer.qkv_proj.weight",
            "model.layers.0.mixer.qkv_proj.weight",
        ),
        (
            "mtp.layers.1.mixer.experts.3.up_proj.weight",
            "model.layers.1.mixer.experts.w13_weight",
            "model.layers.1.mixer.experts.w13_weight",
        ),
        (
            "mtp.layers.1.final_layernorm.weight",
            "model.layers.1.final_layernorm.weight",
            "model.layers.1.final_layernorm.weight",
        ),
    ],
)
def test_vectors_13_3_mtp(name, new, old):
    for prof, want in ((V23, new), (V11, old), (V12, old)):
        o = replay_name(mtp_preprocess(name, prof), M_MTP, 4, prof, is_mtp=True, pp=PPWindow(0, 2))
        if want is None:
            assert (o.outcome, o.reason) == ("skip", "mtp-filter"), (prof.version, name)
        else:
            assert (o.outcome, o.param) == ("load", want), (prof.version, name)


def test_mtp_language_model_prefix():
    name = "language_model.mtp.layers.0.enorm.weight"
    o = replay_name(mtp_preprocess(name, V23), M_MTP, 4, V23, is_mtp=True)
    assert o.param == "model.layers.0.enorm.weight"
    o = replay_name(mtp_preprocess(name, V11), M_MTP, 4, V11, is_mtp=True)
    assert (o.outcome, o.engine_name) == ("warn", "language_model.model.layers.0.enorm.weight")


def test_mtp_mode_has_no_layer_range_check():
    o = replay_name(
        "mtp.layers.7.enorm.weight", frozenset({"model.layers.7.enorm.weight"}), 4, V23, is_mtp=True, pp=PPWindow(0, 2)
    )
    assert o.outcome == "load"


# §13.4 wrapper routing
@pytest.mark.parametrize(
    "name,target_old,target_new_v3",
    [
        ("language_model.backbone.layers.0.mixer.in_proj.weight", "lm", "lm"),
        ("language_model.lm_head.weight", "lm", "lm"),
        ("mtp.layers.0.enorm.weight", "ignored", "raise"),
        ("mlp1.1.weight", "projector", "projector"),
        ("vision_projector.mlp1.linear1.weight", "ignored", "projector"),
        ("vision_model.radio_model.model.blocks.0.attn.qkv.weight", "tower", "tower"),
        ("sound_encoder.encoder.layers.0.norm_out.weight", "tower", "tower"),
    ],
)
def test_wrapper_routing(name, target_old, target_new_v3):
    assert route_wrapped(name, "NemotronH_Nano_Omni_Reasoning_V3", V11, True, False).target == target_old
    assert route_wrapped(name, "NemotronH_Nano_Omni_Reasoning_V3", V23, True, False).target == target_old
    assert route_wrapped(name, "NemotronH_Omni_Reasoning_V3", V23, True, False).target == target_new_v3


def test_wrapper_details():
    r = route_wrapped("language_model.backbone.layers.0.norm.weight", "NemotronH_Nano_VL_V2", V23, False, False)
    assert r.inner == "backbone.layers.0.norm.weight"
    assert route_wrapped("sound_encoder.x", "NemotronH_Nano_VL_V2", V23, False, False).target == "ignored"
    r = route_wrapped("vision_projector.mlp1.linear2.weight", "NemotronH_Omni_Reasoning_V3", V23, True, False)
    assert r.inner == "mlp1.3.weight"
    r = route_wrapped("vision_model.blocks.0.w", "NemotronH_Omni_Reasoning_V3", V23, True, False)
    assert r.target == "tower"
    r = route_wrapped("vision_projector.vision_final_layernorm.weight", "NemotronH_Omni_Reasoning_V3", V23, True, True)
    assert r.target == "tower"
    r = route_wrapped("mtp.layers.0.enorm.weight", "NemotronH_Omni_Reasoning_V3", V23, True, False)
    assert r.message == "ValueError: Unexpected Nemotron-H Omni weight: mtp.layers.0.enorm.weight"


def test_engine_spec_parsing():
    assert get_profile(None).version == "0.5.23"
    assert get_profile("sglang").version == "0.5.23"
    assert get_profile("sglang@latest").version == "0.5.23"
    assert get_profile("sglang@0.5.15").version == "0.5.15"
    with pytest.raises(UsageError, match="not modelled yet"):
        get_profile("sglang@0.5.9")
    with pytest.raises(UsageError, match="unknown engine"):
        get_profile("vllm@0.11")


def test_expert_count_from_max_on_newest_only(tmp_path):
    """0.5.23 sizes the expert mapping with max_n_routed_experts (Puzzle-aware)."""
    from nhcheck.audit import AuditOptions, run_audit
    from nhcheck.checkpoint import open_local
    from nhcheck.manifest import build_manifest
    from nhcheck.model import parse_config
    import json
    import shutil
    from pathlib import Path

    src = Path(__file__).parent / "conformance" / "nano3_bf16" / "checkpoint"
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    cfg_json = json.loads((dst / "config.json").read_text())
    cfg_json["max_n_routed_experts"] = 8  # a Puzzle config whose largest block has 8 experts
    (dst / "config.json").write_text(json.dumps(cfg_json))
    ck = open_local(str(dst))
    cfg = parse_config(ck.config)
    for prof, expect_warn in ((V11, False), (V23, True)):
        m = build_manifest(cfg, None, prof)
        rep = run_audit(
            ck, cfg, None, m, SGLangEngine(EngineId("sglang", prof.version), prof), AuditOptions(compare_versions=False)
        )
        r = next(r for r in rep.records if r.tensor.name == "backbone.layers.1.mixer.experts.9.up_proj.weight")
        assert (r.outcome.outcome == "warn") is expect_warn


@pytest.mark.parametrize(
    "layers,size,expected",
    [
        (52, 1, [(0, 52)]),
        (52, 4, [(0, 13), (13, 26), (26, 39), (39, 52)]),
        (10, 4, [(0, 2), (2, 4), (4, 7), (7, 10)]),  # the last 10 % 4 ranks get one extra layer
    ],
)
def test_pp_window_matches_get_pp_indices(layers, size, expected):
    from nhcheck.engines.sglang import pp_window

    got = [pp_window(layers, r, size) for r in range(size)]
    assert [(w.start, w.end) for w in got] == expected
    assert got[0].first_rank and got[-1].last_rank
    assert not (size > 1 and (got[0].last_rank or got[-1].first_rank))
