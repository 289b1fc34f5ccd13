"""Every branch and quirk of the SGLang replay (spec sglang-loading.md §3–§5, §10, §11, §13)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from nhcheck.audit import AuditOptions, run_audit
from nhcheck.checkpoint import Checkpoint
from nhcheck.engines.base import Crash, EngineId
from nhcheck.engines.sglang import (
    PPWindow,
    SGLangEngine,
    get_profile,
    make_replayer,
    mtp_preprocess,
    replay_name,
    replay_projector,
    route_wrapped,
)
from nhcheck.errors import UsageError
from nhcheck.manifest import build_manifest
from nhcheck.model import parse_config
from nhcheck.quant import parse_quant
from nhcheck.safetensors_header import ShardHeader, TensorInfo

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
    assert get_profile("sglang@0.5.9").version == "0.5.9"
    with pytest.raises(UsageError, match="is not a release with Nemotron-H"):
        get_profile("sglang@0.5.2")
    with pytest.raises(UsageError, match="unknown engine"):
        get_profile("vllm@0.11")


def test_expert_count_from_max_on_newest_only(tmp_path):
    """0.5.23 sizes the expert mapping with max_n_routed_experts (Puzzle-aware)."""
    import json
    import shutil
    from pathlib import Path

    from nhcheck.audit import AuditOptions, run_audit
    from nhcheck.checkpoint import open_local
    from nhcheck.manifest import build_manifest
    from nhcheck.model import parse_config

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


# ---------------------------------------------------------------------------
# Rules of sglang-loading.md §3–§5.1, §10–§14 not covered above, and fixes: each test names the spec
# section (or the released SGLang source it paraphrases) it checks. Audit-level cases use small
# in-memory checkpoints (header facts only: no file is read).
CONF = Path(__file__).parent / "conformance"

E1 = "model.layers.1.mixer.experts"
M_EXP = frozenset({f"{E1}.w13_weight", f"{E1}.w2_weight"})


# ---------------------------------------------------------------------------
# helpers


def _ckpt(config: dict, shards: list[list[str]], hf_quant: dict | None = None) -> Checkpoint:
    """An in-memory checkpoint: ``shards`` lists the tensor names of each shard file, in file order."""
    headers = []
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = tuple(TensorInfo(n, "BF16", (1,), 0, 2, fname) for n in names)
        headers.append(ShardHeader(f"/x/{fname}", fname, 8, 16, 16 + 2 * len(names), None, False, tensors))
    return Checkpoint("mem", "/x", config, hf_quant, tuple(headers), None)


def _audit(ck: Checkpoint, profile, **opts):
    cfg = parse_config(ck.config)
    qc = parse_quant(ck.config, ck.hf_quant_config)
    mtp = opts.get("mtp", False)
    m = build_manifest(cfg, qc, profile, mtp=mtp)
    return run_audit(
        ck,
        cfg,
        qc,
        m,
        SGLangEngine(EngineId("sglang", profile.version), profile),
        AuditOptions(compare_versions=False, **opts),
    )


def _conf_config(case: str) -> dict:
    return json.loads((CONF / case / "checkpoint" / "config.json").read_text())


def _record(report, name):
    return next(r for r in report.records if r.tensor.name == name)


# ---------------------------------------------------------------------------
# §14 step 7 with the indexed replay: the memoised replayer must equal replay_name


@pytest.mark.parametrize("profile", ALL, ids=lambda p: p.version)
def test_replayer_keeps_each_expert_index_in_warnings(profile):
    """A per-expert tensor the mapping does not take (gate_proj: §5.1 q4) warns under its own name."""
    replay = make_replayer(M_EXP, 4, profile)
    for e in (0, 2, 3, 1):
        for name in (
            f"backbone.layers.1.mixer.experts.{e}.gate_proj.weight",
            f"backbone.layers.1.mixer.experts.{e}.up_proj",  # no trailing dot: no tuple matches
            f"backbone.layers.1.mixer.experts.{e}.k_scale",
        ):
            assert replay(name) == replay_name(name, M_EXP, 4, profile), name
    o = replay("backbone.layers.1.mixer.experts.3.gate_proj.weight")
    assert o.engine_name == f"{E1}.3.gate_proj.weight"
    assert o.message == f"Parameter {E1}.3.gate_proj.weight not found in params_dict"


def test_replayer_with_per_expert_runtime_names_is_not_memoised():
    """A user manifest may hold per-expert names: then membership tests depend on the index (§14 step 4)."""
    params = frozenset({f"{E1}.0.up_proj.attn.k_scale", f"{E1}.w13_attn.k_scale", f"{E1}.w13_weight"})
    for order in ((0, 1), (1, 0)):
        replay = make_replayer(params, 4, V23)
        for e in order:
            name = f"backbone.layers.1.mixer.experts.{e}.up_proj.k_scale"
            assert replay(name) == replay_name(name, params, 4, V23)
    assert replay_name("backbone.layers.1.mixer.experts.0.up_proj.k_scale", params, 4, V23)[:4] == (
        "load",
        f"{E1}.w13_attn.k_scale",
        "w1",
        0,
    )
    assert replay_name("backbone.layers.1.mixer.experts.1.up_proj.k_scale", params, 4, V23).reason == "kv-drop"


@pytest.mark.parametrize("profile", ALL, ids=lambda p: p.version)
def test_replayer_expert_loads_and_orphans_agree(profile):
    replay = make_replayer(M_EXP, 4, profile)
    for e in (3, 0, 2):
        for proj in ("up_proj", "down_proj"):
            for suffix in ("weight", "input_scale", "bias"):
                name = f"backbone.layers.1.mixer.experts.{e}.{proj}.{suffix}"
                assert replay(name) == replay_name(name, M_EXP, 4, profile), name


# ---------------------------------------------------------------------------
# §4 / §14 step 7: tuple order, several indices, the w3 tuple, bias


def test_several_expert_substrings_follow_tuple_order():
    """Tuples run expert 0…E−1, then w1, w2, w3: the lowest index wins, then up before down."""
    name = "model.layers.1.mixer.experts.2.up_proj.experts.1.down_proj.weight"
    # 0.5.11 stops at the first hit (expert 1, w2) with an unguarded lookup.
    o = replay_name(name, M_EXP, 4, V11)
    assert o.message == "KeyError: 'model.layers.1.mixer.experts.2.up_proj.experts.w2_weight'"
    # ≥0.5.12 keeps scanning the remaining tuples against the unchanged name.
    target = "model.layers.1.mixer.experts.w13_experts.1.down_proj.weight"
    for prof in (V12, V23):
        o = replay_name(name, M_EXP | {target}, 4, prof)
        assert (o.outcome, o.param, o.shard_id, o.expert_id) == ("load", target, "w1", 2)
        o = replay_name(name, M_EXP, 4, prof)
        assert (o.outcome, o.reason) == ("skip", "expert-orphan")


def test_expert_index_at_or_above_E_is_ignored_among_several():
    """With E=2, ``experts.3.`` matches no tuple; ``experts.1.`` still does (§5.1 q3)."""
    name = "model.layers.1.mixer.experts.3.x.experts.1.down_proj.weight"
    o = replay_name(name, M_EXP, 2, V11)
    assert o.message == "KeyError: 'model.layers.1.mixer.experts.3.x.experts.w2_weight'"


def test_w3_tuple_with_the_empty_up_name_matches_a_double_dot():
    """(experts.w13_, ``experts.{e}..``, e, w3): the third tuple of §4 is live for a name with ``..``."""
    o = replay_name("backbone.layers.1.mixer.experts.3..weight", M_EXP, 4, V23)
    assert (o.outcome, o.param, o.shard_id, o.expert_id) == ("load", f"{E1}.w13_weight", "w3", 3)


@pytest.mark.parametrize("profile", (V12, V23), ids=lambda p: p.version)
def test_expert_bias_is_an_expert_orphan_not_a_bias_skip(profile):
    """The expert branch fires before the default branch's .bias rule (§5 steps 8–9)."""
    for proj in ("up_proj", "down_proj"):
        o = replay_name(f"backbone.layers.1.mixer.experts.0.{proj}.bias", M_EXP, 4, profile)
        assert (o.outcome, o.reason) == ("skip", "expert-orphan")


def test_keyerror_message_is_python_repr():
    """``KeyError: <repr(key)>`` as Python prints it, also for a name with a quote."""
    o = replay_name("backbone.layers.1.mixer.experts.0.up_proj.it's", M_EXP, 4, V11)
    assert o.message == 'KeyError: "model.layers.1.mixer.experts.w13_it\'s"'


# ---------------------------------------------------------------------------
# §3 KV-scale remap on every kind of layer


M_KV = frozenset(
    {"model.layers.2.mixer.qkv_proj.weight", "model.layers.2.mixer.attn.k_scale", "model.layers.2.mixer.attn.v_scale"}
)


@pytest.mark.parametrize(
    "name,candidate,suffix",
    [
        ("backbone.layers.0.mixer.in_proj.k_scale", "model.layers.0.mixer.in_proj.attn.k_scale", ".k_scale"),
        ("backbone.layers.3.mixer.down_proj.v_scale", "model.layers.3.mixer.down_proj.attn.v_scale", ".v_scale"),
        ("backbone.layers.2.self_attn.k_proj.k_scale", "model.layers.2.self_attn.attn.attn.k_scale", ".k_scale"),
        ("backbone.layers.2.mixer.o_proj.k_scale", "model.layers.2.mixer.o_proj.attn.k_scale", ".k_scale"),
        ("backbone.layers.2.mixer.v_proj.k_scale", "model.layers.2.mixer.v_proj.attn.k_scale", ".k_scale"),
    ],
)
def test_kv_scale_on_other_modules_is_dropped_with_its_candidate(name, candidate, suffix):
    for prof in ALL:
        o = replay_name(name, M_KV, 4, prof)
        assert (o.outcome, o.reason) == ("warn", "kv-drop")
        assert o.message.startswith(f"Found {suffix} in the checkpoint (e.g. ")
        assert f"(e.g. {candidate}). {suffix} is not loaded." in o.message


def test_self_attn_k_scale_loads_when_its_attn_parameter_exists():
    m = frozenset({"model.layers.2.self_attn.attn.k_scale"})
    assert (
        replay_name("backbone.layers.2.self_attn.k_proj.k_scale", m, 4, V23).param
        == "model.layers.2.self_attn.attn.k_scale"
    )


def test_kv_scale_deprecated_on_a_mamba_layer():
    o = replay_name("backbone.layers.0.mixer.in_proj.kv_scale", M_KV, 4, V11)
    assert (o.outcome, o.reason) == ("warn", "kv-drop")
    assert o.message == (
        "Found kv_scale in the checkpoint (e.g. model.layers.0.mixer.in_proj.kv_scale), but not "
        "found the expected name in the model (e.g. model.layers.0.mixer.in_proj.attn.k_scale). "
        "kv_scale is not loaded."
    )


def test_scale_that_is_already_a_parameter_skips_the_kv_remap():
    m = frozenset({"model.layers.0.mixer.in_proj.k_scale"})
    assert (
        replay_name("backbone.layers.0.mixer.in_proj.k_scale", m, 4, V23).param
        == "model.layers.0.mixer.in_proj.k_scale"
    )


def test_kv_remap_runs_before_the_layer_range_check():
    """§5.1 q11: a KV scale of a layer outside the window is dropped by the remap, with a warning."""
    m = frozenset(M_KV - {"model.layers.2.mixer.attn.k_scale"})
    o = replay_name("backbone.layers.9.mixer.k_proj.k_scale", m, 4, V23, pp=PPWindow(0, 4))
    assert (o.outcome, o.reason) == ("warn", "kv-drop")
    # …while an expert scale of such a layer is range-skipped before the 0.5.11 KeyError.
    o = replay_name("backbone.layers.9.mixer.experts.0.down_proj.input_scale", M_EXP, 4, V11, pp=PPWindow(0, 4))
    assert (o.outcome, o.reason) == ("skip", "pp-range")


def test_pp_rank_skips_apply_in_mtp_mode():
    """§5 step 6 runs in both modes; the range check (step 5) only in the main model."""
    not_first = PPWindow(0, 1, first_rank=False, last_rank=True)
    o = replay_name(
        "backbone.embeddings.weight", frozenset({"model.embed_tokens.weight"}), 4, V23, is_mtp=True, pp=not_first
    )
    assert (o.outcome, o.reason) == ("skip", "pp-rank")


# ---------------------------------------------------------------------------
# §11 wrapper routing: projector lookup and the Omni V3 extra weights


PROJ = frozenset({"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"})


def test_projector_lookup_uses_the_name_minus_its_first_component():
    """``adapter_dict[".".join(name.split(".")[1:])]`` for any name starting with ``mlp1``."""
    o = replay_projector("mlp1.1.weight", PROJ)
    assert (o.outcome, o.param) == ("load", "mlp1.1.weight")
    o = replay_projector("mlp1_ema.1.weight", PROJ)
    assert (o.outcome, o.param) == ("load", "mlp1.1.weight")
    o = replay_projector("mlp1.2.weight", PROJ)
    assert (o.outcome, o.message) == ("raise", "KeyError: '2.weight'")
    assert replay_projector("mlp1", PROJ).message == "KeyError: ''"


@pytest.mark.parametrize("profile", ALL, ids=lambda p: p.version)
def test_projector_routing_is_a_prefix_test(profile):
    r = route_wrapped("mlp1_ema.1.weight", "NemotronH_Nano_VL_V2", profile, False, False)
    assert r.target == "projector"


def test_omni_v3_final_layernorm_without_mtp_raises_its_own_message():
    """``_load_extra_weight`` (VL@0.5.23:461–472): no module without MTP, unknown parameter names raise."""
    name = "vision_projector.vision_final_layernorm.weight"
    r = route_wrapped(name, "NemotronH_Omni_Reasoning_V3", V23, True, False)
    assert (r.target, r.message) == ("raise", f"ValueError: Unexpected vision projector weight: {name}")
    for ok in ("weight", "bias"):
        r = route_wrapped(
            f"vision_projector.vision_final_layernorm.{ok}", "NemotronH_Omni_Reasoning_V3", V23, True, True
        )
        assert r.target == "tower"
    bad = "vision_projector.vision_final_layernorm.running_mean"
    r = route_wrapped(bad, "NemotronH_Omni_Reasoning_V3", V23, True, True)
    assert (r.target, r.message) == ("raise", f"ValueError: Unexpected vision projector weight: {bad}")
    r = route_wrapped("vision_projector.other.weight", "NemotronH_Omni_Reasoning_V3", V23, True, True)
    assert r.message == "ValueError: Unexpected Nemotron-H Omni weight: vision_projector.other.weight"


def _omni_v3_config(nextn: int, mtp_pattern: str | None) -> dict:
    cfg = copy.deepcopy(_conf_config("omni_nvfp4_mixed"))
    cfg["architectures"] = ["NemotronH_Omni_Reasoning_V3"]
    llm = cfg["llm_config"]
    llm["num_nextn_predict_layers"] = nextn
    if mtp_pattern is None:
        llm.pop("mtp_hybrid_override_pattern", None)
    else:
        llm["mtp_hybrid_override_pattern"] = mtp_pattern
    return cfg


@pytest.mark.parametrize("nextn,pattern,loads", [(1, "*E", True), (0, "*E", False), (1, None, True)])
def test_omni_v3_final_layernorm_exists_iff_num_nextn_predict_layers(nextn, pattern, loads):
    """``vision_final_layernorm`` is built when ``llm_config.num_nextn_predict_layers > 0`` (VL@0.5.23)."""
    name = "vision_projector.vision_final_layernorm.weight"
    ck = _ckpt(_omni_v3_config(nextn, pattern), [["language_model.backbone.norm_f.weight", name]])
    r = _audit(ck, V23)
    rec = _record(r, name)
    if loads:
        assert rec.outcome.outcome == "routed" and r.crash is None
    else:
        assert rec.outcome.outcome == "raise"
        assert r.crash.tensor == name


def test_buffering_wrapper_meets_projector_errors_before_language_model_errors():
    """≤0.5.12 buffers language-model names and loads them after routing (§6.1): crash order differs."""
    cfg = _conf_config("omni_nvfp4_mixed")
    lm_bad = "language_model.backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    ck = _ckpt(cfg, [[lm_bad, "language_model.backbone.norm_f.weight"], ["mlp1.2.weight"]])
    # Without the quant config the MoE is unquantised: the expert scale is an orphan (KeyError on 0.5.11).
    for prof in (V11, V12):
        r = _audit(ck, prof)
        assert r.crash.tensor == "mlp1.2.weight" and r.crash.error == "KeyError: '2.weight'"
    r = _audit(ck, V23)  # streams: the language-model tensor comes first, but 0.5.23 only skips it
    assert r.crash.tensor == "mlp1.2.weight"
    assert _record(r, lm_bad).outcome.reason == "expert-orphan"
    r = _audit(_ckpt(cfg, [[lm_bad], ["mlp1.2.weight"]]), V11)
    assert r.crash.tensor == "mlp1.2.weight"


def test_streaming_v3_wrapper_raises_in_stream_order():
    cfg = _omni_v3_config(1, "*E")
    ck = _ckpt(cfg, [["mlp1.2.weight"], ["mtp.layers.0.enorm.weight"]])
    assert _audit(ck, V23).crash.tensor == "mlp1.2.weight"
    ck = _ckpt(cfg, [["mtp.layers.0.enorm.weight"], ["mlp1.2.weight"]])
    r = _audit(ck, V23)
    assert r.crash == Crash(
        "ValueError: Unexpected Nemotron-H Omni weight: mtp.layers.0.enorm.weight",
        "mtp.layers.0.enorm.weight",
        "model-00001-of-00002.safetensors",
    )


# ---------------------------------------------------------------------------
# §10 MTP draft model


def _mtp_config() -> dict:
    cfg = copy.deepcopy(_conf_config("nano3_bf16"))
    cfg["mtp_hybrid_override_pattern"] = "*E"
    cfg["num_nextn_predict_layers"] = 1
    return cfg


MTP_LAYERS = [
    "mtp.layers.0.enorm.weight",
    "mtp.layers.0.hnorm.weight",
    "mtp.layers.0.eh_proj.weight",
    "mtp.layers.0.norm.weight",
    "mtp.layers.0.mixer.q_proj.weight",
]


def test_standalone_mtp_checkpoint_with_incomplete_head_raises_on_0_5_23():
    """§10: ``mtp.layers.*``, no target layers, some ``lm_head.*`` → the head must be complete."""
    ck = _ckpt(_mtp_config(), [MTP_LAYERS + ["lm_head.weight_scale"]])
    r = _audit(ck, V23, mtp=True)
    assert r.crash == Crash("ValueError: Incomplete standalone MTP lm_head: missing ['lm_head.weight']")
    assert r.verdict == "crash"
    # ≤0.5.12 has no such check (and drops lm_head in MTP mode anyway).
    assert _audit(ck, V11, mtp=True).crash is None


def test_standalone_mtp_checkpoint_with_complete_head_loads():
    ck = _ckpt(_mtp_config(), [MTP_LAYERS + ["lm_head.weight"]])
    r = _audit(ck, V23, mtp=True)
    assert r.crash is None
    assert _record(r, "lm_head.weight").outcome.param == "lm_head.weight"


@pytest.mark.parametrize(
    "extra",
    [
        ["backbone.layers.0.norm.weight"],  # target layers present: not standalone
        [],  # no lm_head.* at all: not standalone
    ],
)
def test_mtp_head_check_needs_a_standalone_checkpoint(extra):
    names = MTP_LAYERS + extra + (["lm_head.weight_scale"] if extra else [])
    ck = _ckpt(_mtp_config(), [names])
    assert _audit(ck, V23, mtp=True).crash is None


def test_standalone_detection_sees_names_after_the_language_model_strip():
    names = ["language_model." + n for n in MTP_LAYERS] + ["language_model.lm_head.weight_scale"]
    ck = _ckpt(_mtp_config(), [names])
    r = _audit(ck, V23, mtp=True)
    assert r.crash is not None and "Incomplete standalone MTP lm_head" in r.crash.error


@pytest.mark.parametrize(
    "algo,missing",
    [
        # 0.5.23 gives ``lm_head`` a ModelOpt method (§6.1): its scales are expected too, sorted.
        ("NVFP4", "['lm_head.input_scale', 'lm_head.weight_scale', 'lm_head.weight_scale_2']"),
        # Under W4A16_NVFP4 ``lm_head.input_scale`` is a placeholder the check does not demand.
        ("W4A16_NVFP4", "['lm_head.weight_scale', 'lm_head.weight_scale_2']"),
    ],
)
def test_standalone_check_lists_quantised_head_parameters(algo, missing):
    ck = _ckpt(
        _mtp_config(),
        [MTP_LAYERS + ["lm_head.weight"]],
        {
            "producer": {"name": "modelopt"},
            "quantization": {
                "quant_algo": algo,
                "kv_cache_quant_algo": None,
                "group_size": 16,
                "exclude_modules": ["mtp*"],
            },
        },
    )
    r = _audit(ck, V23, mtp=True)
    assert r.crash.error == f"ValueError: Incomplete standalone MTP lm_head: missing {missing}"


def test_mtp_language_model_strip_is_one_prefix_only():
    assert mtp_preprocess("language_model.language_model.mtp.layers.0.x", V23) == "language_model.mtp.layers.0.x"
    assert mtp_preprocess("xlanguage_model.mtp.layers.0.x", V23) == "xlanguage_model.mtp.layers.0.x"


# ---------------------------------------------------------------------------
# Crash point (§14 "after the stream"): a config SGLang refuses fails before any tensor is loaded


def test_refused_quant_config_is_the_crash_even_when_tensors_would_raise():
    cfg = _conf_config("nano3_bf16")
    q = {
        "producer": {"name": "modelopt"},
        "quantization": {
            "quant_algo": "NVFP4_AWQ",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": [],
        },
    }
    ck = _ckpt(cfg, [["backbone.layers.1.mixer.experts.0.down_proj.input_scale", "backbone.norm_f.weight"]], q)
    r = _audit(ck, V11)
    assert r.crash.tensor is None
    assert r.crash.error.startswith("ValueError: ModelOpt currently only supports")
    # the tensor outcome is still reported as if loaded on its own
    assert _record(r, "backbone.layers.1.mixer.experts.0.down_proj.input_scale").outcome.outcome == "raise"


# ---------------------------------------------------------------------------
# §2.1 / §5 steps 1–3: remaps replace every occurrence; the prefix rule only at the start


def test_substring_rules_replace_every_occurrence_in_order():
    m = frozenset({"model.layers.0.mixer.A.A", "model.embed_tokens.embed_tokens"})
    assert replay_name("backbone.layers.0.mixer.A_log.A_log", m, 4, V23).param == "model.layers.0.mixer.A.A"
    assert (
        replay_name("backbone.embeddings.embeddings", m, 4, V23, pp=PPWindow(0, 4)).param
        == "model.embed_tokens.embed_tokens"
    )


def test_prefix_rule_applies_only_at_the_start():
    o = replay_name("x.backbone.layers.0.norm.weight", frozenset({"x.model.layers.0.norm.weight"}), 4, V23)
    assert (o.outcome, o.engine_name) == ("warn", "x.backbone.layers.0.norm.weight")


def test_mtp_mode_rewrites_every_mtp_layers_occurrence():
    m = frozenset({"model.layers.0.model.layers.1.w"})
    o = replay_name("mtp.layers.0.mtp.layers.1.w", m, 4, V11, is_mtp=True)
    assert (o.outcome, o.param) == ("load", "model.layers.0.model.layers.1.w")
