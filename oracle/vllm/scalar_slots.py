#!/usr/bin/env python3
"""Which slots of a fused Mamba ``in_proj`` scale vector vLLM's real loader fills from the checkpoint's one scalar.

    scalar_slots.py CASE --out FILE.json [--platform sm100]          (run with a vllm-X venv's python)
    make: python3 oracle/vllm/scalar_slots.py --make 0.17.0 0.18.0 0.19.0 0.20.0 0.34.0   (writes the goldens)

A ModelOpt checkpoint ships one ``input_scale`` / ``weight_scale`` (FP8) / ``weight_scale_2`` (NVFP4) for the
Mamba ``in_proj``, which vLLM (0.17.0 on) builds as a ``MergedColumnParallelLinear`` of five parts with one
scale slot per part (``PerTensorScaleParameter`` of shape ``[5]``). The scalar reaches
``MergedColumnParallelLinear.weight_loader_v2`` without a shard id. This script, for each conformance case
in ``CASES`` (NVFP4, a flat MIXED recipe with NVFP4 Mamba layers, a flat MIXED recipe with FP8 Mamba layers):

  * builds vLLM's real model on the CPU (``vllm_oracle.build_text``: the full ``vllm serve`` config resolution);
  * records every multi-slot ``in_proj`` scale vector right after the build: for every element, whether it holds
    ``torch.finfo(float32).min`` (the sentinel ModelOpt FP8's ``create_weights`` writes) — anything else is the
    ``torch.empty`` memory the parameter was made with;
  * fills those vectors with NaN, then hands each checkpoint ``in_proj`` scale tensor on its own to the real
    ``model.load_weights`` (real mapper, real weight loader) and records the slots no longer NaN, and whether
    they hold the checkpoint's value;
  * records the lines of the layer's ``quant_method.process_weights_after_loading`` (vLLM's own source, by
    ``inspect``) that reduce the vector (``.max(`` / ``requantize_with_max_scale``), so the golden says what
    becomes of the slots the loader did not write.

The goldens (``tests/golden/vllm_scalar_slots/vllm-X.json.gz``) are what ``tests/test_slots_vllm.py`` holds
nhcheck's ``Engine.loader_semantics``, ``audit`` and ``load`` to.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONF = os.path.join(ROOT, "tests", "conformance")
#: Conformance cases whose Mamba ``in_proj`` scales are scalars (and which vLLM 0.17.0 – 0.34.0 build).
CASES = ("nano3_nvfp4", "startup_mixed_cfg_text", "startup_mixed_no_nvfp4")
#: The checkpoint tensors handed to the loader.
SCALE = re.compile(r"\.mixer\.in_proj\.(input_scale|weight_scale|weight_scale_2)$")
#: Lines of ``process_weights_after_loading`` that reduce a scale vector.
REDUCE = re.compile(r"\.max\(|requantize_with_max_scale|amax")


def reduction_lines(method) -> list[str]:
    fn = type(method).process_weights_after_loading
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return []
    return [ln.strip() for ln in src.splitlines() if REDUCE.search(ln)]


def record(case: str, platform: str) -> dict:
    import torch
    from safetensors import safe_open

    sys.path.insert(0, HERE)
    import vllm_oracle
    import vllm_platform

    t0 = time.time()

    def log(m: str) -> None:
        print(f"[scalar-slots {time.time() - t0:6.1f}s] {m}", file=sys.stderr, flush=True)

    ckpt = os.path.join(CONF, case, "checkpoint")
    vllm_platform.install(platform)
    try:
        vc, model, _, _ = vllm_oracle.build_text(ckpt, platform, log)
    except Exception as e:  # refused at start-up: nothing to record
        return {"startup_error": f"{type(e).__name__}: {str(e)[:300]}"}
    modules = dict(model.named_modules())
    sentinel = torch.finfo(torch.float32).min
    vectors = {}
    for name, p in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if ".mixer.in_proj." not in name or "scale" not in last or p.ndim != 1 or p.numel() < 2:
            continue
        layer = modules[name.rsplit(".", 1)[0]]
        method = getattr(layer, "quant_method", None)
        vectors[name] = {
            "shape": list(p.shape),
            "dtype": str(p.dtype).replace("torch.", ""),
            "param_class": type(p).__name__,
            "module_class": type(layer).__name__,
            "quant_method": type(method).__name__ if method is not None else None,
            "weight_loader": vllm_oracle.qualname(getattr(p, "weight_loader", None)),
            "after_build_sentinel": [bool(x == sentinel) for x in p.data.float().tolist()],
            "process_weights_after_loading": reduction_lines(method) if method is not None else [],
        }
        p.data.fill_(float("nan"))
    tensors = {}
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    for shard in shards:
        with safe_open(os.path.join(ckpt, shard), "pt") as h:
            for k in h.keys():
                if SCALE.search(k):
                    tensors[k] = h.get_tensor(k)
    params = dict(model.named_parameters())
    from vllm.config import set_current_vllm_config

    loads = {}
    with set_current_vllm_config(vc):
        for k in sorted(tensors):
            t = tensors[k]
            entry: dict = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            try:
                model.load_weights(iter([(k, t)]))
                entry["raised"] = None
            except Exception as e:  # the real loader's outcome for this tensor alone
                entry["raised"] = f"{type(e).__name__}: {str(e)[:200]}"
            loads[k] = entry
    for name, v in vectors.items():
        data = params[name].data.float()
        written = [i for i, x in enumerate(data.tolist()) if x == x]
        src = name.replace("model.", "backbone.", 1)
        value = tensors.get(src)
        v["checkpoint_tensor"] = src if value is not None else None
        v["written_slots"] = written
        v["written_hold_checkpoint_value"] = (
            bool(all(data[i].item() == value.float().flatten()[0].item() for i in written))
            if value is not None and value.numel() == 1 and written
            else None
        )
    import vllm

    return {
        "engine": f"vllm@{vllm.__version__}",
        "case": case,
        "quant_config": type(vc.quant_config).__name__ if vc.quant_config else None,
        "vectors": vectors,
        "loads": loads,
    }


def make(versions: list[str], venvs: str, out_dir: str, platform: str) -> int:
    from make_goldens import release_env

    os.makedirs(out_dir, exist_ok=True)
    for v in versions:
        py, env = release_env(v, venvs)
        cases = {}
        for case in CASES:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "out.json")
                p = subprocess.run([py, os.path.abspath(__file__), case, "--out", out, "--platform", platform],
                                   env=env, cwd=HERE)
                if p.returncode:
                    print(f"vllm {v} {case}: oracle failed (exit {p.returncode})", file=sys.stderr)
                    return 1
                with open(out) as f:
                    cases[case] = json.load(f)
        engines = {d["engine"] for d in cases.values() if "engine" in d}
        doc = {
            "engine": engines.pop() if len(engines) == 1 else f"vllm@{v}",
            "made_by": (
                "oracle/vllm/scalar_slots.py: vLLM's NemotronH model built on CPU; multi-slot Mamba in_proj scale "
                "vectors read after the build (finfo(float32).min sentinel or not, per element), filled with NaN, "
                "then each checkpoint in_proj scale handed alone to the real model.load_weights; written = slots "
                "no longer NaN; process_weights_after_loading = its reducing lines, from vLLM's own source"
            ),
            "cases": cases,
        }
        path = os.path.join(out_dir, f"vllm-{v}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        subprocess.run(["gzip", "-n", "-9", "-f", path], check=True)
        print(f"vllm {v}: {path}.gz")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?")
    ap.add_argument("--make", nargs="+", metavar="VERSION", help="run every release's venv and write the goldens")
    ap.add_argument("--venvs", default=os.environ.get("VLLM_ORACLE_VENVS", "/work/venvs"))
    ap.add_argument("--golden-dir", default=os.path.join(ROOT, "tests", "golden", "vllm_scalar_slots"))
    ap.add_argument("--out")
    ap.add_argument("--platform", default="sm100")
    a = ap.parse_args(argv)
    if a.make:
        return make(a.make, a.venvs, a.golden_dir, a.platform)
    import warnings

    warnings.filterwarnings("ignore")
    doc = record(a.case, a.platform)
    with open(a.out, "w") as f:
        json.dump(doc, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
