#!/usr/bin/env python3
"""Probe checkpoints for telling vLLM epochs apart (not conformance cases; written outside the repo).

    V/bin/python make_probes.py OUT_DIR      # needs torch + safetensors (any oracle venv)

Each probe is a conformance checkpoint plus one extra shard (``model-probe.safetensors``, listed in
the index) holding "trap" tensors whose fate changed between vLLM releases (EPOCHS.md). Run the oracle
on them per release (``make_goldens.py --probes OUT_DIR``): the per-tensor outcomes of the traps are
the empirical epoch table. Traps (attention layer A, first MoE layer E1, E = n_routed_experts):
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
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "conformance")
BASES = {"probe_nano3_nvfp4": "nano3_nvfp4", "probe_nano3_bf16": "nano3_bf16"}


def main(out):
    for probe, base in BASES.items():
        src = os.path.join(CONF, base, "checkpoint")
        dst = os.path.join(out, probe)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        cfg = json.load(open(os.path.join(src, "config.json")))
        idx = json.load(open(os.path.join(src, "model.safetensors.index.json")))
        wm = idx["weight_map"]
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
        save_file(traps, os.path.join(dst, "model-probe.safetensors"), metadata={"format": "pt"})
        for k in traps:
            wm[k] = "model-probe.safetensors"
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump(idx, f, indent=2)
        print(dst, len(traps), "traps")


if __name__ == "__main__":
    main(sys.argv[1])
