#!/usr/bin/env python3
"""Write the start-up path variants (issue 13 §5) as conformance cases: copies of an existing
conformance checkpoint in which only config files differ.

    python3 oracle/sglang/make_startup_variants.py      # (re)writes tests/conformance/startup_*/checkpoint

Cases (tensor files are byte copies of the source case's shards; git stores them once):
  startup_mixed_hfq_only     nano3_nvfp4 tensors; hf_quant_config.json turned into a ModelOpt
                             MIXED_PRECISION recipe (every NVFP4 module listed, NVFP4 group 16, the
                             same exclude list); config.json unchanged, i.e. no quantization_config
                             (0.5.23: AttributeError 'NemotronHConfig' has no 'quantization_config').
  startup_mixed_cfg_text     the same recipe, also in config.json as a flat ModelOpt
                             quantization_config (the Super-NVFP4 layout): text arch under MIXED.
  startup_mixed_cfg_omni     omni_nvfp4_mixed with its hf_quant_config.json recipe also copied into
                             config.json as quantization_config: Omni arch under MIXED, to set
                             against startup_mixed_cfg_text (MoE runner backend choice on sm100).
  startup_mixed_no_nvfp4     like startup_mixed_cfg_text but every listed module is FP8: a MIXED
                             recipe with no NVFP4/W4A16_NVFP4 layer (0.5.23 resolves it to w4afp8).
  sglang_probe_kv_scale_shape     nano3_nvfp4 plus one more shard (``model-kv-scales.safetensors``, listed in
                             the index, sorted last) holding each attention layer's checkpoint KV scales:
                             ``k_proj.k_scale`` of shape [1] and ``v_proj.v_scale`` of shape [2]. The runtime
                             ``attn.k_scale`` / ``attn.v_scale`` are scalars without their own weight_loader,
                             so ``default_weight_loader`` takes them: one element into one element fills,
                             a [2] into a scalar fails its size assertion (issue 13 §5, last bullet).
  sglang_probe_substring_mtp  nano3_nvfp4 with one more exclude entry, ``mixer.out_proj`` (no layer: it names every
                             Mamba out_proj only under substring or path matching, so 0.5.6's exact
                             ``is_layer_skipped`` quantizes them and 0.5.6.post1 does not), and one more shard
                             (``model-mtp.safetensors``) holding ``mtp.layers.0.enorm.weight``: the main model
                             warns on it until 0.5.7 and filters it as the MTP draft's from 0.5.8.
The goldens beside them come from make_goldens.py like every other case.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "conformance")


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def nvfp4_modules(ckpt):
    mods = []
    for fn in sorted(os.listdir(ckpt)):
        if fn.endswith(".safetensors"):
            for name, info in header(os.path.join(ckpt, fn)).items():
                if name != "__metadata__" and name.endswith(".weight") and info["dtype"] == "U8":
                    mods.append(name[: -len(".weight")])
    key = lambda m: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", m)]
    return sorted(mods, key=key)


def write_safetensors(path, tensors):
    """A safetensors file of float32 tensors, every element 1.0: {name: shape}, in the given order."""
    meta, blobs, off = {}, [], 0
    for name, shape in tensors.items():
        n = 1
        for d in shape:
            n *= d
        blob = struct.pack(f"<{n}f", *([1.0] * n))
        meta[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def copy_case(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def dump(path, obj):
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=4) + "\n")


def main():
    src = os.path.join(CONF, "nano3_nvfp4", "checkpoint")
    hfq = json.load(open(os.path.join(src, "hf_quant_config.json")))
    cfg = json.load(open(os.path.join(src, "config.json")))
    q = hfq["quantization"]
    mods = nvfp4_modules(src)

    def recipe(algo_of):
        return {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
                "exclude_modules": q["exclude_modules"],
                "quantized_layers": {m: algo_of(m) for m in mods}}

    def flat(rec):  # config.json quantization_config, Super-NVFP4 style
        return {"producer": hfq["producer"], "quant_method": "modelopt",
                "quant_algo": "MIXED_PRECISION", "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
                "ignore": rec["exclude_modules"], "quantized_layers": rec["quantized_layers"]}

    nv = recipe(lambda m: {"quant_algo": "NVFP4", "group_size": 16})
    fp8 = recipe(lambda m: {"quant_algo": "FP8"})
    for name, rec, in_cfg in (("startup_mixed_hfq_only", nv, False),
                              ("startup_mixed_cfg_text", nv, True),
                              ("startup_mixed_no_nvfp4", fp8, True)):
        dst = os.path.join(CONF, name, "checkpoint")
        copy_case(src, dst)
        dump(os.path.join(dst, "hf_quant_config.json"), {"producer": hfq["producer"], "quantization": rec})
        c = dict(cfg)
        if in_cfg:
            c["quantization_config"] = flat(rec)
        dump(os.path.join(dst, "config.json"), c)

    dst = os.path.join(CONF, "sglang_probe_kv_scale_shape", "checkpoint")
    copy_case(src, dst)
    attn = [i for i, k in enumerate(cfg["hybrid_override_pattern"]) if k == "*"]
    scales = {}
    for i in attn:
        scales[f"backbone.layers.{i}.mixer.k_proj.k_scale"] = (1,)
        scales[f"backbone.layers.{i}.mixer.v_proj.v_scale"] = (2,)
    shard = "model-kv-scales.safetensors"
    write_safetensors(os.path.join(dst, shard), scales)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    index["weight_map"].update({n: shard for n in scales})
    dump(os.path.join(dst, "model.safetensors.index.json"), index)

    dst = os.path.join(CONF, "sglang_probe_substring_mtp", "checkpoint")
    copy_case(src, dst)
    probe = json.loads(json.dumps(hfq))
    probe["quantization"]["exclude_modules"].append("mixer.out_proj")
    dump(os.path.join(dst, "hf_quant_config.json"), probe)
    shard = "model-mtp.safetensors"
    write_safetensors(os.path.join(dst, shard), {"mtp.layers.0.enorm.weight": (cfg["hidden_size"],)})
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    index["weight_map"]["mtp.layers.0.enorm.weight"] = shard
    dump(os.path.join(dst, "model.safetensors.index.json"), index)

    osrc = os.path.join(CONF, "omni_nvfp4_mixed", "checkpoint")
    dst = os.path.join(CONF, "startup_mixed_cfg_omni", "checkpoint")
    copy_case(osrc, dst)
    ohfq = json.load(open(os.path.join(osrc, "hf_quant_config.json")))
    ocfg = json.load(open(os.path.join(osrc, "config.json")))
    oq = ohfq["quantization"]
    ocfg["quantization_config"] = {"producer": ohfq["producer"], "quant_method": "modelopt",
                                   "quant_algo": oq["quant_algo"],
                                   "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
                                   "ignore": oq.get("exclude_modules", []),
                                   "quantized_layers": oq["quantized_layers"]}
    dump(os.path.join(dst, "config.json"), ocfg)
    print("wrote", ", ".join(sorted(d for d in os.listdir(CONF) if d.startswith(("startup_", "sglang_probe_")))))


if __name__ == "__main__":
    main()
