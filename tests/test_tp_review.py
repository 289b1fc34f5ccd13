"""Review of ``nhcheck.tp`` against the released SGLang 0.5.23 (and 0.5.11) source.

Each test pins one discrepancy found by reading the engine (function named in the test), first
failing, then fixed in ``nhcheck/tp.py``.
"""

from __future__ import annotations

from nhcheck import tp as tensor_parallel
from nhcheck.engines.sglang import get_profile
from nhcheck.manifest import build_manifest
from nhcheck.model import parse_config

from test_tp import _h8b, _manifest, _nano, _rules, _simulate, _write_unique


def _as_released(config: dict, layers: dict) -> dict:
    """A MIXED recipe as NVIDIA ships one: in config.json too (SGLang >= 0.5.18's server-args override reads it
    there), and with an NVFP4 layer (here ``lm_head``, which no TP rule looks at), else SGLang >= 0.5.15
    resolves the recipe to w4afp8 (tests/conformance/startup_*)."""
    layers = dict(layers, lm_head={"quant_algo": "NVFP4", "group_size": 16})
    config["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "MIXED_PRECISION",
        "quantized_layers": layers,
    }
    return {
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers},
    }


def _mx_quant(config: dict) -> dict:
    """MIXED_PRECISION: MXFP8 (block [1, 32]) on the experts, the shared down_proj and every out_proj."""
    layers = {}
    for i, k in enumerate(config["hybrid_override_pattern"]):
        if k == "E":
            layers[f"backbone.layers.{i}.mixer.experts.0.up_proj"] = {"quant_algo": "MXFP8"}
            layers[f"backbone.layers.{i}.mixer.shared_experts.down_proj"] = {"quant_algo": "MXFP8"}
        elif k == "M":
            layers[f"backbone.layers.{i}.mixer.out_proj"] = {"quant_algo": "MXFP8"}
    return _as_released(config, layers)


def _block_quant(config: dict) -> dict:
    """MIXED_PRECISION: 128×128 block FP8 (FP8_PB_WO) on the experts only."""
    layers = {
        f"backbone.layers.{i}.mixer.experts.0.up_proj": {"quant_algo": "FP8_PB_WO"}
        for i, k in enumerate(config["hybrid_override_pattern"])
        if k == "E"
    }
    return _as_released(config, layers)


def test_mxfp8_linear_uses_block_k_32():
    """Fp8LinearMethod.validate_block_quant_shapes with MXFP8's weight_block_size [1, 32]: a row-parallel
    input_size_per_partition must be a multiple of 32 (not 128); the manifest's MX scale is the uint8
    ``weight_scale_inv`` (Fp8LinearMethod.create_weights), so that is what tells MX from 128×128 blocks."""
    c = _nano(True)
    q = _mx_quant(c)
    # out_proj: 128 / 2 = 64, shared down_proj: 64 / 2 = 32, both whole 32-blocks
    assert "fp8-block-linear" not in _rules(c, 2, q)
    got = _rules(c, 4, q)  # shared down_proj: 64 / 4 = 16 is not; out_proj 128 / 4 = 32 is
    assert {n.rsplit(".", 2)[0].split(".mixer.")[1] for n in got["fp8-block-linear"]} == {"shared_experts"}


def test_mxfp8_moe_uses_block_n_1_and_block_k_32_only_at_tp_gt_1():
    """Fp8MoEMethod.create_fp8_moe_weight_ (layers/quantization/fp8.py): ``isp % block_n`` (1 for MXFP8)
    always, ``isp % block_k`` (32) only when moe_tp_size > 1."""
    c = _nano(True, moe_intermediate_size=96)
    q = _mx_quant(c)
    assert "fp8-block-moe" not in _rules(c, 1, q)  # 96 % 128 != 0, but MXFP8's block_n is 1
    assert "fp8-block-moe" not in _rules(c, 3, q)  # 32 per rank
    assert "fp8-block-moe" in _rules(c, 2, q)  # 48 per rank: not a whole 32-block


def test_block_fp8_moe_checks_the_trtllm_padded_size():
    """FusedMoE.__init__ rounds intermediate_size_per_partition up to 128 for flashinfer_trtllm before
    Fp8MoEMethod.create_weights runs (only NVFP4 pads later), so the 128-block check sees the padded size:
    no ValueError; at TP 1 rank 0's window starts at 0 and the load is right."""
    c = _nano(True)  # moe_intermediate_size 32
    q = _block_quant(c)
    assert set(_rules(c, 1, q, backend="flashinfer_cutlass")) == {"fp8-block-moe"}  # 32 % 128
    assert _rules(c, 1, q, backend="flashinfer_trtllm") == {}
    assert _rules(c, 2, q, backend="flashinfer_trtllm") == {}  # padded windows: exact (tests/golden/tp/)


def test_nvfp4_moe_under_trtllm_is_a_padded_window_not_a_straddle():
    """ModelOptNvFp4FusedMoEMethod.create_weights pads isp to 128 under flashinfer_trtllm before sizing
    w2 (isp // 2 bytes, isp // 16 scales): nothing straddles, and the padded windows partition the
    intermediates exactly (tests/golden/tp/)."""
    c = _nano(True, moe_intermediate_size=34)  # 17 per rank at TP 2
    from test_tp import NANO_Q

    assert _rules(c, 2, NANO_Q, backend="flashinfer_trtllm") == {}
    assert set(_rules(c, 2, NANO_Q, backend="flashinfer_cutlass")) == {"nvfp4-moe-pair"}


def test_mamba_in_proj_bias_with_one_group_is_not_replicated():
    """MambaMixer2.__init__ (n_groups == 1, tp > 1) builds in_proj as a plain ColumnParallelLinear and swaps
    in mamba_v2_sharded_weight_loader for in_proj.weight and conv1d.weight/bias only: in_proj.bias keeps
    ColumnParallelLinear.weight_loader, whose last rank narrows past the end of the checkpoint tensor
    (the per-rank size counts the replicated groups) — a RuntimeError at load."""
    c = _h8b(n_groups=1, mamba_n_groups=1, use_bias=True)
    got = _rules(c, 2)
    assert set(got) == {"mamba-groups-bias"}
    assert "model.layers.0.mixer.in_proj.bias" in got["mamba-groups-bias"]
    assert _rules(c, 1) == {}
    assert _rules(_h8b(n_groups=2, mamba_n_groups=2, use_bias=True), 2) == {}  # merged loader: fine


def test_nvfp4_awq_pre_quant_scale_on_a_column_parallel_layer():
    """ModelOptFp4LinearMethod.create_weights (NVFP4_AWQ) registers pre_quant_scale as a
    ModelWeightParameter with output_dim=0 and input_size_per_partition rows; on a ColumnParallelLinear
    that is the whole input, and load_column_parallel_weight (layers/parameter.py) narrows the checkpoint
    from tp_rank × that size: every rank ≥ 1 reads past the end (RuntimeError). Row-parallel layers cut
    it by input_dim=0, which is right."""
    c = _nano(True)
    q = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4_AWQ", "group_size": 16}}
    m, cfg = _manifest(c, q)
    assert any(p.name.endswith("shared_experts.up_proj.pre_quant_scale") for p in m.params)
    got = _rules(c, 2, q)
    assert "nvfp4-awq-column" in got
    names = got["nvfp4-awq-column"]
    assert any(n.endswith("shared_experts.up_proj.pre_quant_scale") for n in names)
    assert not any("down_proj" in n or "out_proj" in n or "o_proj" in n for n in names)
    assert "nvfp4-awq-column" not in _rules(c, 1, q)
    shards = {s.param.name: s for s in tensor_parallel.plan(m, cfg, 2)}
    down = next(s for n, s in shards.items() if n.endswith("shared_experts.down_proj.pre_quant_scale"))
    assert down.sharding is not None and down.sharding.dim == 0  # input_dim=0: cut by rank


def test_mtp_draft_without_a_pattern_uses_the_default_attention_moe_layers():
    """NemotronHConfig's mtp_layers_block_type defaults to ["attention", "moe"] (the manifest builds "*E");
    the TP planner must shard those layers too, not treat them as replicated."""
    c = _nano(num_attention_heads=6, num_key_value_heads=3)
    cfg = parse_config(c)
    assert cfg.mtp_pattern == ""
    m = build_manifest(cfg, None, get_profile("sglang@0.5.23"), moe_backend="flashinfer_cutlass", mtp=True)
    rules = {pr.rule for s in tensor_parallel.plan(m, cfg, 2) for pr in s.problems}
    assert "attn-kv-heads" in rules
    shards = {s.param.name: s.sharding for s in tensor_parallel.plan(m, cfg, 4)}
    assert shards["model.layers.1.mixer.experts.w13_weight"].dim == 1


def test_one_group_rank_cuts_reassemble_at_tp_4_with_vocab_padding(tmp_path):
    """mamba_v2_sharded_weight_loader with duplicate_groups (every rank takes group 0), QKV replication
    (one KV head held by all 4 ranks), vocab padded to 64 × tp: rebuilt exactly."""
    c = _h8b(n_groups=1, mamba_n_groups=1, vocab_size=250, num_attention_heads=4, num_key_value_heads=1)
    _simulate(_write_unique(tmp_path, c, None), 4)


def test_every_rule_is_documented_and_reported():
    doc = tensor_parallel.__doc__
    assert [r for r in tensor_parallel.RULES if f"``{r}``" not in doc] == []
    m, cfg = _manifest(_h8b(n_groups=1, mamba_n_groups=1, use_bias=True), None)
    found = [f for f in tensor_parallel.check(m, cfg, (2,)) if f.code == "tp-indivisible"]
    assert len(found) == 1 and "in_proj.bias" in found[0].message and "MambaMixer2.__init__" in found[0].message
