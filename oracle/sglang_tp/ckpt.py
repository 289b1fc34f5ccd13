"""Tiny Nemotron-H checkpoint *descriptions* for the TP oracle: config.json, hf_quant_config.json and the
list of checkpoint tensors (HF names, shapes, safetensors dtypes). No weights: the oracle fills every tensor
with position-encoding values itself (see tp_oracle.py).

Shapes follow the conformance checkpoints (tests/conformance/*/checkpoint: ModelOpt naming, NVFP4 = U8 packed
pairs + F8_E4M3 block scales of 16 + F32 weight_scale_2/input_scale scalars; FP8 = F8_E4M3 weight + F32
weight_scale/input_scale scalars), with head/group/intermediate counts raised so TP 2, 4 and 8 all construct.
"""
from __future__ import annotations

import json
import os

BASE = dict(
    architectures=["NemotronHForCausalLM"], model_type="nemotron_h", attention_bias=False, attention_dropout=0.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, chunk_size=128, conv_kernel=4, expand=2, head_dim=16,
    hidden_dropout=0.0, hidden_size=128, initializer_range=0.02, intermediate_size=128, layer_norm_epsilon=1e-5,
    mamba_head_dim=16, mamba_hidden_act="silu", mamba_num_heads=8, mamba_n_groups=8, mamba_proj_bias=False,
    mamba_ssm_cache_dtype="float32", max_position_embeddings=4096, mlp_bias=False, mlp_hidden_act="relu2",
    moe_intermediate_size=256, moe_shared_expert_intermediate_size=128, n_group=1, n_groups=8,
    n_routed_experts=4, n_shared_experts=1, norm_eps=1e-5, norm_topk_prob=True, num_attention_heads=8,
    num_experts_per_tok=2, num_key_value_heads=2, num_logits_to_keep=1, partial_rotary_factor=1.0,
    rescale_prenorm_residual=True, residual_in_fp32=False, rope_theta=10000, routed_scaling_factor=2.5,
    sliding_window=None, ssm_state_size=16, tie_word_embeddings=False, time_step_floor=1e-4, time_step_max=0.1,
    time_step_min=0.001, topk_group=1, torch_dtype="bfloat16", use_bias=False, use_cache=True, use_conv_bias=True,
    use_mamba_kernels=True, vocab_size=250,
)

#: model variants. mamba_inner = mamba_num_heads * mamba_head_dim = 128; in_proj rows z|x|B|C|dt =
#: 128|128|128|128|8 (n_groups 8 x ssm_state 16); conv1d channels x|B|C = 128|128|128.
MODELS = {
    # every family but the latent projections: Mamba, attention (8 q heads, 2 KV heads: replicated at TP 4/8),
    # dense MLP, MoE (I=256: I/TP a multiple of 16 at TP<=8 but not of 128 at TP 4/8) + shared expert;
    # vocab 250 pads to 256.
    "hybrid": dict(hybrid_override_pattern="M*-E"),
    # Super-like latent MoE (fc1/fc2_latent_proj, experts in the 64-wide latent space) with an MoE
    # intermediate size 464 = 1856/4: I/TP = 232, 116, 58 — never a multiple of 128 (padding backends pad).
    "latentpad": dict(hybrid_override_pattern="ME", moe_latent_size=64, moe_intermediate_size=464),
    # n_groups 1: the single B/C group replicated onto every rank (unquantized only: SGLang asserts
    # n_groups % tp == 0 for a quantized model).
    # SGLang's NemotronHConfig reads the Mamba group count from ``mamba_n_groups`` (default 8), not from the HF
    # key ``n_groups``: both are written.
    "g1": dict(hybrid_override_pattern="M*", n_groups=1, mamba_n_groups=1),
    # Mamba in_proj/out_proj biases (use_bias): with n_groups 8, and with n_groups 1 (nhcheck's rule
    # mamba-groups-bias says the replicated-group in_proj.bias fails to load at TP > 1).
    "bias": dict(hybrid_override_pattern="M", use_bias=True),
    "g1bias": dict(hybrid_override_pattern="M", n_groups=1, mamba_n_groups=1, use_bias=True),
}

QUANTS = ("bf16", "fp8", "nvfp4", "mixed")


def config(model: str) -> dict:
    c = dict(BASE)
    c.update(MODELS[model])
    c["num_hidden_layers"] = len(c["hybrid_override_pattern"])
    return c


def linear_modules(c: dict) -> list[tuple[str, int, int]]:
    """(HF module name, out, in) of every Linear-like module in checkpoint order."""
    H = c["hidden_size"]
    inner = c["mamba_num_heads"] * c["mamba_head_dim"]
    gs = c["n_groups"] * c["ssm_state_size"]
    out = []
    for i, k in enumerate(c["hybrid_override_pattern"]):
        p = f"backbone.layers.{i}.mixer."
        if k == "M":
            out += [(p + "in_proj", 2 * inner + 2 * gs + c["mamba_num_heads"], H), (p + "out_proj", H, inner)]
        elif k == "*":
            q = c["num_attention_heads"] * c["head_dim"]
            kv = c["num_key_value_heads"] * c["head_dim"]
            out += [(p + "q_proj", q, H), (p + "k_proj", kv, H), (p + "v_proj", kv, H), (p + "o_proj", H, q)]
        elif k == "-":
            out += [(p + "up_proj", c["intermediate_size"], H), (p + "down_proj", H, c["intermediate_size"])]
        elif k == "E":
            mh = c.get("moe_latent_size") or H
            I = c["moe_intermediate_size"]
            for e in range(c["n_routed_experts"]):
                out += [(p + f"experts.{e}.up_proj", I, mh), (p + f"experts.{e}.down_proj", mh, I)]
            S = c["moe_shared_expert_intermediate_size"] * c["n_shared_experts"]
            out += [(p + "shared_experts.up_proj", S, H), (p + "shared_experts.down_proj", H, S)]
            if c.get("moe_latent_size"):
                L = c["moe_latent_size"]
                out += [(p + "fc1_latent_proj", L, H), (p + "fc2_latent_proj", H, L)]
    return out


def algo_of(quant: str, module: str) -> str | None:
    """The ModelOpt algorithm of one linear module under a quant format (None: unquantized BF16)."""
    if quant == "bf16":
        return None
    if quant == "fp8":
        return "FP8"
    if quant == "nvfp4":
        return "NVFP4"
    # mixed: ModelOpt MIXED_PRECISION as in the Omni checkpoint: routed + shared experts NVFP4, the rest FP8
    return "NVFP4" if ".experts." in module or ".shared_experts." in module else "FP8"


def tensors(c: dict, quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Every checkpoint tensor: (HF name, shape, safetensors dtype)."""
    H, V = c["hidden_size"], c["vocab_size"]
    inner = c["mamba_num_heads"] * c["mamba_head_dim"]
    gs = c["n_groups"] * c["ssm_state_size"]
    nh = c["mamba_num_heads"]
    t = [("backbone.embeddings.weight", (V, H), "BF16")]
    lin = {m: (o, i) for m, o, i in linear_modules(c)}
    for li, k in enumerate(c["hybrid_override_pattern"]):
        p = f"backbone.layers.{li}."
        t.append((p + "norm.weight", (H,), "BF16"))
        if k == "M":
            conv = inner + 2 * gs
            t += [(p + "mixer.A_log", (nh,), "BF16"), (p + "mixer.D", (nh,), "BF16"),
                  (p + "mixer.dt_bias", (nh,), "BF16"), (p + "mixer.conv1d.weight", (conv, 1, c["conv_kernel"]), "BF16"),
                  (p + "mixer.conv1d.bias", (conv,), "BF16"), (p + "mixer.norm.weight", (inner,), "BF16")]
        if k == "E":
            E = c["n_routed_experts"]
            t += [(p + "mixer.gate.weight", (E, H), "F32"), (p + "mixer.gate.e_score_correction_bias", (E,), "F32")]
        for m, (o, i) in lin.items():
            if not m.startswith(p):
                continue
            a = algo_of(quant, m)
            if c.get("use_bias") and m.endswith(("mixer.in_proj", "mixer.out_proj")):
                t.append((m + ".bias", (o,), "BF16"))
            if a is None:
                t.append((m + ".weight", (o, i), "BF16"))
            elif a == "FP8":
                t += [(m + ".weight", (o, i), "F8_E4M3"), (m + ".weight_scale", (), "F32"), (m + ".input_scale", (), "F32")]
            else:
                t += [(m + ".weight", (o, i // 2), "U8"), (m + ".weight_scale", (o, i // 16), "F8_E4M3"),
                      (m + ".weight_scale_2", (), "F32"), (m + ".input_scale", (), "F32")]
        if k == "*" and quant != "bf16":
            t += [(p + "mixer.k_proj.k_scale", (), "F32"), (p + "mixer.v_proj.v_scale", (), "F32")]
    t += [("backbone.norm_f.weight", (H,), "BF16"), ("lm_head.weight", (V, H), "BF16")]
    return t


def hf_quant_config(c: dict, quant: str) -> dict | None:
    if quant == "bf16":
        return None
    q: dict = {"kv_cache_quant_algo": "FP8"}
    if quant in ("fp8", "nvfp4"):
        q["quant_algo"] = "FP8" if quant == "fp8" else "NVFP4"
        if quant == "nvfp4":
            q["group_size"] = 16
        q["exclude_modules"] = ["lm_head"] + [f"backbone.layers.{i}.mixer.gate"
                                              for i, k in enumerate(c["hybrid_override_pattern"]) if k == "E"]
    else:
        q["quant_algo"] = "MIXED_PRECISION"
        layers = {}
        for m, _, _ in linear_modules(c):
            a = algo_of(quant, m)
            layers[m] = {"quant_algo": a, "group_size": 16} if a == "NVFP4" else {"quant_algo": a}
        q["quantized_layers"] = layers
    return {"producer": {"name": "modelopt", "version": "0.43.0"}, "quantization": q}


#: ``quant_method`` of config.json's nested ``quantization_config`` (``write(..., nested=True)``): releases that read
#: only the nested section (vLLM 0.9.1 / 0.9.2) pick the config class by this name alone (``modelopt`` is
#: ``ModelOptFp8Config``, ``modelopt_fp4`` ``ModelOptNvFp4Config``; no ``override_quantization_method`` before 0.10.0).
NESTED_METHOD = {"fp8": "modelopt", "nvfp4": "modelopt_fp4", "mixed": "modelopt"}


def write(model: str, quant: str, root: str, nested: bool = False, method: str | None = None) -> str:
    """Write config.json (+ hf_quant_config.json) for one model x quant into root/model-quant; return the dir.

    ``nested``: config.json's ``quantization_config`` is hf_quant_config.json's object (``producer`` and the
    ``quantization`` section) plus ``quant_method`` (``method``, default ``NESTED_METHOD``'s), the form vLLM 0.9.1 /
    0.9.2 read (``get_from_keys(config, ["quantization"])``); else the flat form later exporters write."""
    d = os.path.join(root, f"{model}-{quant}")
    os.makedirs(d, exist_ok=True)
    c = config(model)
    hq = hf_quant_config(c, quant)
    if hq is not None and nested:
        c = dict(c, quantization_config=dict(quant_method=method or NESTED_METHOD[quant], **hq))
    elif hq is not None:  # ModelOpt exports carry it in config.json too (SGLang's NemotronH override reads it there)
        # flat form: the ignore list is "ignore" there (SGLang's from_config reads it, not "exclude_modules")
        flat = dict(quant_method="modelopt", **hq["quantization"])
        flat["ignore"] = list(hq["quantization"].get("exclude_modules", []))
        c = dict(c, quantization_config=flat)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    qp = os.path.join(d, "hf_quant_config.json")
    if hq is not None:
        with open(qp, "w") as f:
            json.dump(hq, f, indent=1)
    elif os.path.exists(qp):
        os.remove(qp)
    with open(os.path.join(d, "tensors.json"), "w") as f:
        json.dump(tensors(c, quant), f)
    return d
