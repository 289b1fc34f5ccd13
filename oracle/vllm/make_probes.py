#!/usr/bin/env python3
"""Probe checkpoints for telling vLLM epochs apart (conformance cases of their own).

    V/bin/python make_probes.py [ROOT]   # needs torch + safetensors (any oracle venv, or the dev venv)

Writes ``ROOT/probes/<probe>/checkpoint``, ``ROOT/mtp/<probe>/checkpoint``, ``ROOT/expert_sizes/<probe>/checkpoint`` and
``ROOT/dense_probes/<probe>/checkpoint`` (default ROOT:
``tests/conformance``); the goldens are
made there like any case's (``make_goldens.py X --probes tests/conformance/probes``). The output is
deterministic: rerunning this script rewrites the committed checkpoints byte for byte.

``probe_nano3_nvfp4`` / ``probe_nano3_bf16``: a conformance checkpoint plus one extra shard
(``model-probe.safetensors``, listed in the index) holding "trap" tensors whose fate changed between
vLLM releases (EPOCHS.md). Traps (attention layer A, first MoE layer E1, E = n_routed_experts):
  prefused_qkv      backbone.layers.A.mixer.qkv_proj.weight            (q, k, v already fused)
  expert_id_E       backbone.layers.E1.mixer.experts.E.up_proj.weight    (one past the last expert)
  q_bias / o_bias   backbone.layers.A.mixer.{q,o}_proj.bias
  k_scale / v_scale backbone.layers.A.mixer.{k,v}_proj.{k,v}_scale      (ModelOpt FP8 KV-cache scales)
  kv_scale          backbone.layers.A.mixer.kv_scale                    (deprecated fused form)
  q_scale           backbone.layers.A.mixer.q_proj.q_scale
  mtp               mtp.layers.0.eh_proj.weight                         (top-level MTP tensor)
  unknown           backbone.layers.0.mixer.not_a_param.weight
  lm_head_bias      lm_head.bias
  rotary_inv_freq   backbone.layers.A.mixer.rotary_emb.inv_freq

``probe_nano3_bf16_missing``: ``nano3_bf16`` without four tensors, for the strict "weights not
initialized" check vLLM runs after the stream for unquantized models: ``backbone.norm_f.weight``,
``backbone.layers.1.norm.weight``, ``backbone.layers.0.mixer.D`` (checked) and
``backbone.layers.0.mixer.in_proj.weight`` (a linear: exempt, its quant method post-processes).

``probe_nano3_bf16_mtp`` / ``probe_nano3_nvfp4_mtp``: the Super layout on the tiny Nano-3 geometry, for the MTP
draft (``--speculative-config '{"method": "mtp"}'``, vLLM's ``NemotronHMTP``): the conformance checkpoint with
``num_nextn_predict_layers: 1`` and ``mtp_hybrid_override_pattern: "*E"`` in config.json, plus one shard
(``model-mtp.safetensors``) holding the whole BF16 MTP block (``examples/generate.py``'s ``mtp=True`` layout:
``mtp.layers.0`` attention with ``enorm`` / ``hnorm`` / ``eh_proj``, ``mtp.layers.1`` MoE with
``final_layernorm``) and MTP traps: a pre-fused ``mtp.layers.0.mixer.qkv_proj.weight``, an expert id = E,
``mtp.layers.0.mixer.not_a_param.weight``, ModelOpt FP8 KV scales ``mtp.layers.0.mixer.{k,v}_proj.{k,v}_scale``,
``mtp.layers.0.mixer.q_proj.bias``, ``mtp.layers.2.norm.weight`` (a layer past the draft's pattern) and a
``rotary_emb.inv_freq``. The NVFP4 one adds ``mtp*`` to ``exclude_modules`` (Super's BF16 MTP block). They are
written to ``tests/conformance/mtp/`` (goldens ``expected-mtp-vllm-X.json``: ``make_goldens.py X --mtp``), beside
``probes/`` and not in it: the main model's goldens are not made on them.

``probe_omni_bf16_order``: an unquantized tiny Nano Omni (``examples/generate.py``'s, no quant config,
so every release with the Omni architecture starts it) plus two shards read after the others, in this
order: ``model-probe-a.safetensors`` with ``language_model.backbone.layers.0.mixer.not_a_param.weight``
and ``model-probe-b.safetensors`` with ``mlp1.9.weight`` (the projector has no such parameter). Which of
the two raises first is the VL wrapper's routing order: 0.20.0 – 0.21.0 buffer the language model and
load ``mlp1`` as they iterate (the later ``mlp1`` trap raises first); from 0.22.0 the language model
streams first and ``mlp1`` loads after it (the language-model trap raises first).

``expert_sizes/probe_expert_sizes_{bf16,nvfp4}`` (their own folder, beside ``probes/``: they ask one question of the
releases whose expert loaders differ, not of every row): ``nano3_bf16`` / ``nano3_nvfp4`` with some expert tensors
of layer 1 rewritten in place, one wrong extent each (``SIZES``: longer or shorter on the sharded dim, the
intermediate rows of ``up_proj`` / columns of ``down_proj``, or on the hidden dim; weights, packed bytes and NVFP4
block scales). The original values stay in the overlap, zeros fill an extension. Whether vLLM trims, narrows the
slot or raises is ``FusedMoE._load_w13`` / ``_load_w2``'s (``RoutedExperts``' from 0.24.0).

``dense_probes/probe_h8b_dense_traps`` (its own folder: a question for the releases that build only Nemotron-H v1
configs, 0.10.1.1 – 0.10.2): ``h8b_dense`` plus ``q_proj.bias`` and ModelOpt FP8 KV scales on its attention layer.

``dense_probes/probe_h8b_dense_geometry_{wide,narrow}`` / ``probe_h8b_dense_mlp_list`` (the question 0.9.1 – 0.10.0 ask:
their layers size themselves from other config fields than 0.10.1 on): ``h8b_dense`` with a config whose fields
disagree, the tensors shaped as the fields 0.10.1 reads say (``head_dim``, ``mamba_num_heads * mamba_head_dim``).
``wide``: ``head_dim`` 32 (``hidden_size // num_attention_heads`` is 16) and ``expand`` 1 (``expand * hidden_size``
64, the Mamba width 128): the checkpoint is wider than what 0.10.0 builds. ``narrow``: ``head_dim`` 8 and ``expand`` 4
(narrower). ``mlp_list``: ``intermediate_size`` as a per-MLP list (0.10.1 reads one entry per MLP layer).
``dense_probes/probe_h8b_dense_hfq_fp8``: ``h8b_dense`` plus a ModelOpt FP8 ``hf_quant_config.json`` (export form, no
``quantization_config`` in config.json) and the FP8 scales of one Mamba ``in_proj``: whether the release reads that file
(the config normaliser of 0.10.1 on does; 0.10.0 and earlier read config.json's ``quantization_config`` only).
``dense_probes/probe_lmhead_{fp8,nvfp4}[_bf16]`` (the question of ``modelopt_lm_head``: does the release's ModelOpt config
quantize an ``lm_head`` its recipe does not exclude?): a three-layer ``M*-`` model (``oracle/sglang_tp/ckpt.py``'s
geometry) with config.json's flat ModelOpt ``quantization_config`` (FP8 / NVFP4, ``ignore`` = the Mamba ``conv1d`` only,
no hf_quant_config.json), every linear quantized; ``lm_head.weight`` shipped quantized with its scales (FP8:
``weight_scale`` / ``input_scale``; NVFP4: packed bytes, block ``weight_scale``, ``weight_scale_2``, ``input_scale``), or
as bf16 (``_bf16``).
``dense_probes/probe_nested_{fp8,nvfp4}`` / ``probe_nested_fp4method_nvfp4``: the same model, ``lm_head`` excluded and
bf16, with config.json's *nested* ModelOpt ``quantization_config`` (``{"quant_method": "modelopt", "producer": …,
"quantization": {"quant_algo": …, "exclude_modules": …}}``, hf_quant_config.json's object plus ``quant_method``; the
last one names ``modelopt_fp4``) and no hf_quant_config.json: which releases read that form.
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONF = os.path.join(REPO, "tests", "conformance")
BASES = {"probe_nano3_nvfp4": "nano3_nvfp4", "probe_nano3_bf16": "nano3_bf16"}
MISSING = ("backbone.norm_f.weight", "backbone.layers.1.norm.weight", "backbone.layers.0.mixer.D",
           "backbone.layers.0.mixer.in_proj.weight")


def _fresh(out, probe, base):
    dst = os.path.join(out, probe, "checkpoint")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(os.path.join(CONF, base, "checkpoint"), dst)
    return dst


def _add_shard(dst, fname, tensors):
    save_file(tensors, os.path.join(dst, fname), metadata={"format": "pt"})
    path = os.path.join(dst, "model.safetensors.index.json")
    idx = json.load(open(path))
    for k in tensors:
        idx["weight_map"][k] = fname
    with open(path, "w") as f:
        json.dump(idx, f, indent=2)


def trap_probe(out, probe, base):
    src = os.path.join(CONF, base, "checkpoint")
    dst = _fresh(out, probe, base)
    cfg = json.load(open(os.path.join(src, "config.json")))
    wm = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    pat = cfg["hybrid_override_pattern"]
    a = pat.index("*")
    e1 = pat.index("E")
    n_exp = cfg["n_routed_experts"]
    h = cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def get(name):
        with safe_open(os.path.join(src, wm[name]), framework="pt") as f:
            return f.get_tensor(name)

    up0 = f"backbone.layers.{e1}.mixer.experts.0.up_proj.weight"
    traps = {
        f"backbone.layers.{a}.mixer.qkv_proj.weight": torch.zeros((nq + 2 * nkv) * hd, h, dtype=torch.bfloat16),
        f"backbone.layers.{e1}.mixer.experts.{n_exp}.up_proj.weight": get(up0).clone(),
        f"backbone.layers.{a}.mixer.q_proj.bias": torch.zeros(nq * hd, dtype=torch.bfloat16),
        f"backbone.layers.{a}.mixer.o_proj.bias": torch.zeros(h, dtype=torch.bfloat16),
        f"backbone.layers.{a}.mixer.k_proj.k_scale": torch.tensor(1.0, dtype=torch.float32),
        f"backbone.layers.{a}.mixer.v_proj.v_scale": torch.tensor(1.0, dtype=torch.float32),
        f"backbone.layers.{a}.mixer.kv_scale": torch.tensor(1.0, dtype=torch.float32),
        f"backbone.layers.{a}.mixer.q_proj.q_scale": torch.tensor(1.0, dtype=torch.float32),
        "mtp.layers.0.eh_proj.weight": torch.zeros(h, 2 * h, dtype=torch.bfloat16),
        "backbone.layers.0.mixer.not_a_param.weight": torch.zeros(4, dtype=torch.bfloat16),
        "lm_head.bias": torch.zeros(cfg["vocab_size"], dtype=torch.bfloat16),
        f"backbone.layers.{a}.mixer.rotary_emb.inv_freq": torch.zeros(hd // 2, dtype=torch.float32),
    }
    _add_shard(dst, "model-probe.safetensors", traps)
    print(dst, len(traps), "traps")


def missing_probe(out, probe="probe_nano3_bf16_missing", base="nano3_bf16"):
    dst = _fresh(out, probe, base)
    path = os.path.join(dst, "model.safetensors.index.json")
    idx = json.load(open(path))
    for fname in sorted({idx["weight_map"][n] for n in MISSING}):
        with safe_open(os.path.join(dst, fname), framework="pt") as f:
            keep = {k: f.get_tensor(k) for k in f.keys() if k not in MISSING}
            gone = sum(f.get_tensor(k).nbytes for k in f.keys() if k in MISSING)
        save_file(keep, os.path.join(dst, fname), metadata={"format": "pt"})
        idx["metadata"]["total_size"] -= gone
    for n in MISSING:
        del idx["weight_map"][n]
    with open(path, "w") as f:
        json.dump(idx, f, indent=2)
    print(dst, len(MISSING), "tensors left out")


def omni_order_probe(out, probe="probe_omni_bf16_order"):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import generate as g

    dst = os.path.join(out, probe, "checkpoint")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    c = g.omni_tiny_config()
    lm = g.nemotron_h_tensors(c["llm_config"], None, prefix="language_model.backbone",
                              lm_head="language_model.lm_head.weight", mtp=True, mtp_prefix="mtp")
    towers = [(n, d, list(s)) for n, d, s in g.OMNI_TOWER_TENSORS]
    g.write_checkpoint(dst, lm + towers, c, None, shards=3)
    _add_shard(dst, "model-probe-a.safetensors",
               {"language_model.backbone.layers.0.mixer.not_a_param.weight": torch.zeros(4, dtype=torch.bfloat16)})
    _add_shard(dst, "model-probe-b.safetensors", {"mlp1.9.weight": torch.zeros(64, 64, dtype=torch.bfloat16)})
    print(dst, "2 order traps")


MTP_BASES = {"probe_nano3_bf16_mtp": "nano3_bf16", "probe_nano3_nvfp4_mtp": "nano3_nvfp4"}


def mtp_probe(out, probe, base):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import generate as g

    dst = _fresh(out, probe, base)
    cpath = os.path.join(dst, "config.json")
    cfg = json.load(open(cpath))
    cfg["num_nextn_predict_layers"] = 1
    cfg["mtp_hybrid_override_pattern"] = "*E"
    with open(cpath, "w") as f:
        json.dump(cfg, f, indent=2)
    qpath = os.path.join(dst, "hf_quant_config.json")
    if os.path.exists(qpath):
        q = json.load(open(qpath))
        q["quantization"]["exclude_modules"].append("mtp*")
        with open(qpath, "w") as f:
            json.dump(q, f, indent=4)
    specs = [s for s in g.nemotron_h_tensors(cfg, None, mtp=True) if s[0].startswith("mtp.")]
    h, n_exp = cfg["hidden_size"], cfg["n_routed_experts"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    specs += [
        ("mtp.layers.0.mixer.qkv_proj.weight", "BF16", [(nq + 2 * nkv) * hd, h]),
        (f"mtp.layers.1.mixer.experts.{n_exp}.up_proj.weight", "BF16", [cfg["moe_intermediate_size"], h]),
        ("mtp.layers.0.mixer.not_a_param.weight", "BF16", [4]),
        ("mtp.layers.0.mixer.k_proj.k_scale", "F32", []),
        ("mtp.layers.0.mixer.v_proj.v_scale", "F32", []),
        ("mtp.layers.0.mixer.q_proj.bias", "BF16", [nq * hd]),
        ("mtp.layers.2.norm.weight", "BF16", [h]),
        ("mtp.layers.0.mixer.rotary_emb.inv_freq", "F32", [hd // 2]),
    ]
    dt = {"BF16": torch.bfloat16, "F32": torch.float32}
    tensors = {
        n: torch.frombuffer(bytearray(g.tensor_bytes(n, d, s, seed=i)), dtype=dt[d]).reshape(s).clone()
        for i, (n, d, s) in enumerate(specs)
    }
    _add_shard(dst, "model-mtp.safetensors", tensors)
    path = os.path.join(dst, "model.safetensors.index.json")
    idx = json.load(open(path))
    idx["metadata"]["total_size"] += sum(t.nbytes for t in tensors.values())
    with open(path, "w") as f:
        json.dump(idx, f, indent=2)
    print(dst, len(tensors), "MTP tensors")


#: ``expert_sizes`` probes: (expert, tensor, dim, delta) per base; dim 0 = rows, 1 = columns of the on-disk tensor.
#: ``up_proj`` is sharded on its rows (w13, dim 0), ``down_proj`` on its columns (w2, dim 1).
SIZES = {
    "probe_expert_sizes_bf16": ("nano3_bf16", (
        (0, "up_proj.weight", 0, +8), (1, "up_proj.weight", 1, +8), (2, "down_proj.weight", 1, +8),
        (3, "down_proj.weight", 0, +8), (4, "up_proj.weight", 0, -8), (5, "up_proj.weight", 1, -8),
        (6, "down_proj.weight", 1, -8), (7, "down_proj.weight", 0, -8),
    )),
    "probe_expert_sizes_nvfp4": ("nano3_nvfp4", (
        (0, "up_proj.weight", 0, +8), (1, "up_proj.weight", 1, +8), (2, "down_proj.weight", 1, +8),
        (3, "down_proj.weight", 0, +8), (4, "up_proj.weight_scale", 0, +8), (5, "down_proj.weight_scale", 1, +2),
        (6, "up_proj.weight", 0, -8), (7, "down_proj.weight", 1, -8), (8, "up_proj.weight_scale", 0, -8),
        (9, "down_proj.weight_scale", 0, -8),
    )),
}


def _resized(t, dim, delta):
    if delta < 0:
        return t.narrow(dim, 0, t.shape[dim] + delta).clone()
    pad = list(t.shape)
    pad[dim] = delta
    return torch.cat([t, torch.zeros(pad, dtype=t.dtype)], dim=dim)


def expert_size_probe(out, probe, base, sizes, layer=1):
    dst = _fresh(out, probe, base)
    change = {
        f"backbone.layers.{layer}.mixer.experts.{e}.{t}": (lambda x, dim=dim, d=d: _resized(x, dim, d))
        for e, t, dim, d in sizes
    }
    _rewrite(dst, change)
    print(dst, len(change), "expert tensors resized")


def dense_trap_probe(out, probe="probe_h8b_dense_traps", base="h8b_dense"):
    """``h8b_dense`` (a Nemotron-H v1 config, the one kind 0.10.2 and earlier build) plus attention traps that split
    the own loops of 0.10.1.1 and 0.10.2: KV-cache scales (0.10.2 sends scale names to
    ``maybe_remap_kv_scale_name`` first) and a ``q_proj.bias`` (0.10.2 skips a stacked bias without a parameter)."""
    src = os.path.join(CONF, base, "checkpoint")
    dst = _fresh(out, probe, base)
    cfg = json.load(open(os.path.join(src, "config.json")))
    a = cfg["hybrid_override_pattern"].index("*")
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    traps = {
        f"backbone.layers.{a}.mixer.q_proj.bias": torch.zeros(cfg["num_attention_heads"] * hd, dtype=torch.bfloat16),
        f"backbone.layers.{a}.mixer.k_proj.k_scale": torch.tensor(1.0, dtype=torch.float32),
        f"backbone.layers.{a}.mixer.v_proj.v_scale": torch.tensor(1.0, dtype=torch.float32),
    }
    _add_shard(dst, "model-probe.safetensors", traps)
    print(dst, len(traps), "traps")


def _rewrite(dst, change, cfg_update=None):
    """Rewrite tensors of ``dst`` in place (``change``: name -> function of the tensor) and update its config."""
    path = os.path.join(dst, "model.safetensors.index.json")
    idx = json.load(open(path))
    for fname in sorted({idx["weight_map"][n] for n in change}):
        with safe_open(os.path.join(dst, fname), framework="pt") as f:
            names = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
        for k in names:
            if k in change:
                old = tensors[k].nbytes
                tensors[k] = change[k](tensors[k])
                idx["metadata"]["total_size"] += tensors[k].nbytes - old
        save_file(tensors, os.path.join(dst, fname), metadata={"format": "pt"})
    with open(path, "w") as f:
        json.dump(idx, f, indent=2)
    if not cfg_update:
        return
    cpath = os.path.join(dst, "config.json")
    cfg = json.load(open(cpath))
    cfg.update(cfg_update)
    with open(cpath, "w") as f:
        json.dump(cfg, f, indent=2)


def dense_geometry_probe(out, probe, head_dim, expand, base="h8b_dense"):
    """``h8b_dense`` with ``head_dim`` / ``expand`` that disagree with ``hidden_size // num_attention_heads`` and
    ``mamba_num_heads * mamba_head_dim``; the attention tensors resized to ``head_dim`` (the overlap keeps the
    original values, zeros fill an extension), the Mamba tensors left at ``mamba_num_heads * mamba_head_dim``."""
    dst = _fresh(out, probe, base)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    old = cfg["hidden_size"] // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    change = {}
    for i, k in enumerate(cfg["hybrid_override_pattern"]):
        if k != "*":
            continue
        pre = f"backbone.layers.{i}.mixer."
        change[pre + "q_proj.weight"] = lambda t: _resized(t, 0, (head_dim - old) * nq)
        change[pre + "k_proj.weight"] = lambda t: _resized(t, 0, (head_dim - old) * nkv)
        change[pre + "v_proj.weight"] = lambda t: _resized(t, 0, (head_dim - old) * nkv)
        change[pre + "o_proj.weight"] = lambda t: _resized(t, 1, (head_dim - old) * nq)
    _rewrite(dst, change, {"head_dim": head_dim, "attention_head_dim": head_dim, "expand": expand})
    print(dst, len(change), "attention tensors resized")


def dense_mlp_list_probe(out, probe="probe_h8b_dense_mlp_list", base="h8b_dense"):
    """``h8b_dense`` with ``intermediate_size`` written as one entry per MLP layer (same sizes, same tensors)."""
    dst = _fresh(out, probe, base)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    n = cfg["hybrid_override_pattern"].count("-")
    _rewrite(dst, {}, {"intermediate_size": [cfg["intermediate_size"]] * n})
    print(dst, "intermediate_size as a list of", n)


def dense_hfq_probe(out, probe="probe_h8b_dense_hfq_fp8", base="h8b_dense"):
    """``h8b_dense`` plus a ModelOpt FP8 ``hf_quant_config.json`` and ``in_proj`` FP8 scales of layer 0."""
    dst = _fresh(out, probe, base)
    hfq = {"producer": {"name": "modelopt", "version": "0.29.0"},
           "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}
    with open(os.path.join(dst, "hf_quant_config.json"), "w") as f:
        json.dump(hfq, f, indent=2)
    scales = {f"backbone.layers.0.mixer.in_proj.{s}": torch.tensor(1.0, dtype=torch.float32)
              for s in ("weight_scale", "input_scale")}
    _add_shard(dst, "model-probe.safetensors", scales)
    print(dst, len(scales), "scales")


#: ``probe_lmhead_*`` / ``probe_nested_*``: (quant, lm_head quantized, config form, quant_method of the nested form).
LMHEAD = {
    "probe_lmhead_fp8": ("fp8", True, "flat", None),
    "probe_lmhead_fp8_bf16": ("fp8", False, "flat", None),
    "probe_lmhead_nvfp4": ("nvfp4", True, "flat", None),
    "probe_lmhead_nvfp4_bf16": ("nvfp4", False, "flat", None),
    "probe_nested_fp8": ("fp8", False, "nested", "modelopt"),
    "probe_nested_nvfp4": ("nvfp4", False, "nested", "modelopt"),
    "probe_nested_fp4method_nvfp4": ("nvfp4", False, "nested", "modelopt_fp4"),
}


def lmhead_probe(out, probe, quant, lm_head_quantized, form, method):
    """A ``M*-`` ModelOpt checkpoint (``LMHEAD``): flat recipe not excluding ``lm_head``, or nested recipe."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    sys.path.insert(0, os.path.join(REPO, "oracle", "sglang_tp"))
    import ckpt
    import generate as g

    dst = os.path.join(out, probe, "checkpoint")
    if os.path.exists(dst):
        shutil.rmtree(dst)
    # vocab 256: a multiple of vLLM's vocabulary padding (64), so the lm_head slot has the tensor's rows;
    # rms_norm_eps and expand 1 (expand * hidden_size = mamba_num_heads * mamba_head_dim): the Nemotron-H v1 keys and
    # sizes 0.9.1 - 0.10.2 build from, so every release builds the model
    c = dict(ckpt.BASE, hybrid_override_pattern="M*-", num_hidden_layers=3, vocab_size=256, rms_norm_eps=1e-5,
             expand=1)
    algo = "FP8" if quant == "fp8" else "NVFP4"
    conv = [f"backbone.layers.{i}.mixer.conv1d" for i, k in enumerate(c["hybrid_override_pattern"]) if k == "M"]
    recipe = {"quant_algo": algo, "kv_cache_quant_algo": "FP8"}
    if quant == "nvfp4":
        recipe["group_size"] = 16
    specs = [(n, d, list(s)) for n, s, d in ckpt.tensors(c, quant)]
    if form == "flat":
        c["quantization_config"] = dict(quant_method="modelopt", **recipe, ignore=conv)
    else:
        c["quantization_config"] = dict(quant_method=method, producer={"name": "modelopt", "version": "0.29.0"},
                                        quantization=dict(recipe, exclude_modules=["lm_head", *conv]))
    if lm_head_quantized:
        v, h = c["vocab_size"], c["hidden_size"]
        specs = [t for t in specs if t[0] != "lm_head.weight"]
        if quant == "fp8":
            specs += [("lm_head.weight", "F8_E4M3", [v, h]), ("lm_head.weight_scale", "F32", []),
                      ("lm_head.input_scale", "F32", [])]
        else:
            specs += [("lm_head.weight", "U8", [v, h // 2]), ("lm_head.weight_scale", "F8_E4M3", [v, h // 16]),
                      ("lm_head.weight_scale_2", "F32", []), ("lm_head.input_scale", "F32", [])]
    g.write_checkpoint(dst, specs, c, None, shards=2)
    print(dst, len(specs), "tensors")


def main(out, sizes_out):
    for probe, base in MTP_BASES.items():
        mtp_probe(os.path.join(os.path.dirname(out), "mtp"), probe, base)
    for probe, base in BASES.items():
        trap_probe(out, probe, base)
    missing_probe(out)
    omni_order_probe(out)
    for probe, (base, sizes) in SIZES.items():
        expert_size_probe(sizes_out, probe, base, sizes)
    dense = os.path.join(os.path.dirname(out), "dense_probes")
    dense_trap_probe(dense)
    dense_geometry_probe(dense, "probe_h8b_dense_geometry_wide", head_dim=32, expand=1)
    dense_geometry_probe(dense, "probe_h8b_dense_geometry_narrow", head_dim=8, expand=4)
    dense_mlp_list_probe(dense)
    dense_hfq_probe(dense)
    for probe, spec in LMHEAD.items():
        lmhead_probe(dense, probe, *spec)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else CONF
    main(os.path.join(root, "probes"), os.path.join(root, "expert_sizes"))
