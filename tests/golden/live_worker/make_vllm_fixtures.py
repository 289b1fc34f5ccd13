"""Record what the vLLM live worker answered for a few checkpoints, under real vLLM releases.

    python tests/golden/live_worker/make_vllm_fixtures.py [--venvs /work/venvs]

Runs ``python -m nhcheck.engines.live_vllm`` (the worker behind ``audit --live --engine vllm``)
under each release's own interpreter (``<venvs>/vllm-<release>/bin/python``, with the stub
``libcuda.so.1`` of ``<venvs>/stub-<release>`` on the loader path: see ``oracle/README.md``, "vLLM")
and writes its JSON answer, gzipped, as ``vllm-<release>-<case>.json.gz`` here.
``tests/test_live_vllm.py`` replays these files through ``nhcheck.live`` without vLLM installed: the
answers are the engine's, only the integration (typed records, ``LiveEngine``, the audit, the
cross-check) is under test there.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
CONF = "tests/conformance"

#: (release, case name, checkpoint directory relative to the repository)
FIXTURES = [
    # AutoWeightsLoader + RoutedExperts: the orphan expert scales raise AttributeError (PR #24434's checkpoint)
    ("0.34.0", "nano3-24434-leftover-expert-scales", "examples/nano3-24434-leftover-expert-scales"),
    # packed NVFP4 expert bytes narrowed into the bf16 expert slots without an error (slot-narrowed)
    ("0.34.0", "nano3-nvfp4-experts-excluded", "examples/nano3-nvfp4-experts-excluded"),
    # the q/k/v loader's own refusal (head_dim 128 vs the checkpoint's 16): a raise after the loader ran
    ("0.34.0", "h8b_dense", f"{CONF}/h8b_dense/checkpoint"),
    # the strict "weights not initialized" check after the stream (unquantized model)
    ("0.34.0", "probe_nano3_bf16_missing", f"{CONF}/probes/probe_nano3_bf16_missing/checkpoint"),
    # ValueError listings of AutoWeightsLoader (a set, written sorted), ignored suffixes
    ("0.34.0", "probe_nano3_bf16", f"{CONF}/probes/probe_nano3_bf16/checkpoint"),
    # a [2] v_scale: the KV-cache scale loader raises (a case vLLM's table answered without a golden)
    ("0.34.0", "sglang_probe_kv_scale_shape", f"{CONF}/sglang_probe_kv_scale_shape/checkpoint"),
    # the Omni wrapper (language model, projector, routed towers), its projector loaded after the stream
    ("0.34.0", "omni-nvfp4-24137", "examples/omni-nvfp4-24137"),
    # the own loop: KeyError, the KV-scale remap's warnings
    ("0.20.0", "probe_nano3_bf16", f"{CONF}/probes/probe_nano3_bf16/checkpoint"),
    # the fused in_proj loader refusing a block-FP8 layout (AssertionError after the loader ran)
    ("0.20.0", "startup_mixed_no_nvfp4", f"{CONF}/startup_mixed_no_nvfp4/checkpoint"),
    # the wrapper that buffers the language model's tensors: the projector's KeyError comes first
    ("0.20.0", "probe_omni_bf16_order", f"{CONF}/probes/probe_omni_bf16_order/checkpoint"),
    # the Omni architecture not registered before 0.20.0: the registry's own refusal
    ("0.16.0", "omni-nvfp4-24137", "examples/omni-nvfp4-24137"),
    # a start-up refusal wrapped by the engine-args layer in pydantic's ValidationError
    ("0.16.0", "startup_mixed_hfq_only", f"{CONF}/startup_mixed_hfq_only/checkpoint"),
    # FusedMoE before 0.20.0 narrows the incoming tensor and raises on the packed bytes
    ("0.16.0", "nano3-nvfp4-experts-excluded", "examples/nano3-nvfp4-experts-excluded"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venvs", default="/work/venvs")
    ap.add_argument("--releases", default=None, help="comma-separated releases (default: every one above)")
    a = ap.parse_args()
    wanted = set(a.releases.split(",")) if a.releases else None
    for release in dict.fromkeys(r for r, _, _ in FIXTURES):
        if wanted and release not in wanted:
            continue
        jobs = [(case, ck) for r, case, ck in FIXTURES if r == release]
        with tempfile.TemporaryDirectory() as tmp:
            req = {"jobs": [{"root": os.path.join(REPO, ck), "out": os.path.join(tmp, f"{c}.json")} for c, ck in jobs]}
            with open(os.path.join(tmp, "req.json"), "w") as fh:
                json.dump(req, fh)
            py = os.path.join(a.venvs, f"vllm-{release}", "bin", "python")
            stub = os.path.join(a.venvs, f"stub-{release}")
            env = dict(os.environ, PYTHONPATH=REPO, LD_LIBRARY_PATH=stub)
            subprocess.run([py, "-m", "nhcheck.engines.live_vllm", os.path.join(tmp, "req.json")], env=env, check=True)
            for case, _ in jobs:
                with open(os.path.join(tmp, f"{case}.json")) as fh:
                    data = json.load(fh)
                out = os.path.join(HERE, f"vllm-{release}-{case}.json.gz")
                with open(out, "wb") as fh:
                    fh.write(gzip.compress(json.dumps(data, sort_keys=True).encode(), 9, mtime=0))
                print(f"{release} {case}: {os.path.getsize(out):,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
