#!/usr/bin/env python3
"""Which elements vLLM's real weight loader writes when a tensor is smaller than its expert slot.

    slot_writes.py CKPT --out FILE.json [--platform sm100]        (run with a vllm-X venv's python)
    make: python3 oracle/vllm/slot_writes.py --make 0.19.0 0.20.0 0.34.0   (runs each venv, writes the goldens)

The case: ``nano3_nvfp4_experts_excluded`` (experts of layers 1 and 49 excluded from NVFP4, so vLLM builds
them in bf16, but the files hold packed NVFP4 bytes for them) with the expert scales vLLM raises on removed
(what a hand-made "fix" does; nhcheck's prune refuses it). vLLM >= 0.19.0 then loads the packed ``U8``
tensors into the bigger bf16 expert slots without a word. This script:

  * derives that checkpoint from the committed conformance case (``DROP`` below; every other tensor as is);
  * builds vLLM's real model on the CPU (``vllm_oracle.build_text``: the full ``vllm serve`` config resolution);
  * fills every floating parameter with NaN (nhcheck's load poisons with 0xFF bytes, a NaN too), then runs the real
    ``DefaultModelLoader.load_weights`` over the checkpoint (real iterator, real loaders);
  * records, for every unquantized (bf16/f16/f32) expert parameter and every expert, the elements the
    loader wrote (not NaN afterwards) as a box when they form one, and the sha256 of the written values
    (bf16 bytes, row-major).

The golden (``tests/golden/vllm_slot_writes/vllm-X.json.gz``) is what ``tests/test_load_vllm.py`` holds
nhcheck's ``load --engine vllm@X`` to.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CASE = os.path.join(ROOT, "tests", "conformance", "nano3_nvfp4_experts_excluded", "checkpoint")
#: The expert scales vLLM raises on in the case (layers 1 and 49 are built unquantized): a hand-made fix drops them.
DROP = r"backbone\.layers\.(1|49)\.mixer\.experts\.\d+\.(up|down)_proj\.(input_scale|weight_scale|weight_scale_2)$"

#: The tensors whose writes are recorded: the excluded experts' weights.
WATCH = r"backbone\.layers\.(1|49)\.mixer\.experts\."


def derive(src: str, dst: str) -> dict[str, str]:
    """Write the case without the ``DROP`` tensors (same shards, same order of the rest); the sha256 of each kept
    tensor of the excluded experts (so a test can tell it rebuilt the same input)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    drop, watch = re.compile(DROP), re.compile(WATCH)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index = json.load(f)
    digests: dict[str, str] = {}
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(src, shard), "pt") as h:
            kept = {k: h.get_tensor(k) for k in h.keys() if not drop.match(k)}
        for k, t in kept.items():
            total += t.numel() * t.element_size()
            if not watch.match(k):
                continue
            digests[k] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        save_file(kept, os.path.join(dst, shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not drop.match(k)}
    index.setdefault("metadata", {})["total_size"] = total
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    for name in ("config.json", "hf_quant_config.json"):
        with open(os.path.join(src, name)) as a, open(os.path.join(dst, name), "w") as b:
            b.write(a.read())
    return digests


def box_of(mask) -> list[list[int]] | None:
    """The box ``[[lo, hi], ...]`` the True elements fill exactly, or None when they fill none or no box."""
    import torch

    if not bool(mask.any()):
        return None
    box = []
    for d in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != d)
        hit = mask.any(dim=other) if other else mask
        idx = torch.nonzero(hit).flatten()
        box.append([int(idx[0]), int(idx[-1]) + 1])
    inside = torch.zeros_like(mask)
    inside[tuple(slice(a, b) for a, b in box)] = True
    return box if bool((inside == mask).all()) else None


def record(ckpt: str, platform: str) -> dict:
    import torch

    sys.path.insert(0, HERE)
    import vllm_oracle
    import vllm_platform

    t0 = time.time()

    def log(m: str) -> None:
        print(f"[slot-writes {time.time() - t0:6.1f}s] {m}", file=sys.stderr, flush=True)

    vllm_platform.install(platform)
    vc, model, _, _ = vllm_oracle.build_text(ckpt, platform, log)
    watched = {}
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point:
            p.data.fill_(float("nan"))
            if ".experts." in name and p.ndim >= 3 and p.dtype in (torch.bfloat16, torch.float16, torch.float32):
                watched[name] = p
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    stream: dict = {"raised": False}
    with set_current_vllm_config(vc):
        try:
            DefaultModelLoader(vc.load_config).load_weights(model, vc.model_config)
        except Exception as e:  # the real loader's outcome
            stream = {"raised": True, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    params = {}
    for name, p in sorted(watched.items()):
        data = p.data
        experts = {}
        for e in range(data.shape[0]):
            written = ~torch.isnan(data[e].float())
            box = box_of(written)
            values = data[e][tuple(slice(a, b) for a, b in box)] if box else None
            experts[str(e)] = {
                "written": int(written.sum()),
                "box": box,
                "sha256": hashlib.sha256(values.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                if values is not None
                else None,
            }
        params[name] = {"shape": list(data.shape), "dtype": str(data.dtype).replace("torch.", ""), "experts": experts}
    import vllm

    return {
        "engine": f"vllm@{vllm.__version__}",
        "made_by": (
            f"vllm {vllm.__version__} NemotronH model built on CPU (oracle/vllm/slot_writes.py): floating parameters "
            "filled with NaN, then the real DefaultModelLoader.load_weights over the derived checkpoint; "
            "written = elements no longer NaN"
        ),
        "derived": {"from": "tests/conformance/nano3_nvfp4_experts_excluded/checkpoint", "drop": DROP},
        "stream": stream,
        "params": params,
    }


def make(versions: list[str], venvs: str, out_dir: str, platform: str) -> int:
    from make_goldens import release_env

    os.makedirs(out_dir, exist_ok=True)
    for v in versions:
        py, env = release_env(v, venvs)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            p = subprocess.run([py, os.path.abspath(__file__), "--out", out, "--platform", platform, "--work", tmp],
                               env=env, cwd=HERE)
            if p.returncode:
                print(f"vllm {v}: oracle failed (exit {p.returncode})", file=sys.stderr)
                return 1
            with open(out) as f:
                doc = json.load(f)
        path = os.path.join(out_dir, f"vllm-{v}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        subprocess.run(["gzip", "-n", "-9", "-f", path], check=True)
        print(f"vllm {v}: {path}.gz (stream raised: {doc['stream']['raised']})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", nargs="+", metavar="VERSION", help="run every release's venv and write the goldens")
    ap.add_argument("--venvs", default=os.environ.get("VLLM_ORACLE_VENVS", "/work/venvs"))
    ap.add_argument("--golden-dir", default=os.path.join(ROOT, "tests", "golden", "vllm_slot_writes"))
    ap.add_argument("--out")
    ap.add_argument("--work")
    ap.add_argument("--platform", default="sm100")
    a = ap.parse_args(argv)
    if a.make:
        return make(a.make, a.venvs, a.golden_dir, a.platform)
    import warnings

    warnings.filterwarnings("ignore")
    ckpt = os.path.join(a.work or tempfile.mkdtemp(), "derived")
    sources = derive(CASE, ckpt)
    doc = record(ckpt, a.platform)
    doc["derived"]["tensors_sha256"] = sources
    with open(a.out, "w") as f:
        json.dump(doc, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
