"""Record what the live worker answered for a few checkpoints, under real SGLang releases.

    python tests/golden/live_worker/make_fixtures.py [--venvs /work/venvs] [RELEASE ...]

Runs ``python -m nhcheck.engines.live_sglang`` (the worker behind ``audit --live``) under each
release's own interpreter (``<venvs>/sgl-<release>/bin/python``) and writes its JSON answer,
gzipped, as ``sglang-<release>-<case>.json.gz`` here. ``tests/test_live.py`` replays these files
through ``nhcheck.live`` without SGLang installed: the answers are the engine's, only the
integration (typed records, ``LiveEngine``, the audit, the cross-check) is under test there.
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

#: (release, case name, checkpoint directory relative to the repository)
FIXTURES = [
    ("0.5.11", "omni-nvfp4-24137", "examples/omni-nvfp4-24137"),  # crash, buffering wrapper, towers
    ("0.5.11", "nano3-24434-leftover-expert-scales", "examples/nano3-24434-leftover-expert-scales"),
    ("0.5.23", "nano3-nvfp4", "examples/nano3-nvfp4"),  # flashinfer_trtllm: padded expert slots
    ("0.5.23", "startup_mixed_hfq_only", "tests/conformance/startup_mixed_hfq_only/checkpoint"),  # refused
    # releases before 0.5.11: CUDA imports answered by stand-ins (live_sglang_host)
    ("0.5.3.post1", "h8b-dense", "examples/h8b-dense"),  # server args into schedule_batch's dict; no oracle run
    ("0.5.6", "nano3-nvfp4", "examples/nano3-nvfp4"),  # NVFP4 MoE on flashinfer_cutlass
    # a loader that takes the whole stream first: raises, warnings and the crash point per tensor
    ("0.5.8", "sglang_probe_kv_scale_shape", "tests/conformance/sglang_probe_kv_scale_shape/checkpoint"),  # warned once
    ("0.5.9", "nano3-nvfp4-experts-excluded", "examples/nano3-nvfp4-experts-excluded"),
    ("0.5.9", "sglang_probe_kv_scale_shape", "tests/conformance/sglang_probe_kv_scale_shape/checkpoint"),
    ("0.5.9", "sglang_probe_substring_mtp", "tests/conformance/sglang_probe_substring_mtp/checkpoint"),  # warnings
    ("0.5.10rc0", "omni-nvfp4-24137", "examples/omni-nvfp4-24137"),  # refused: the path written <checkpoint>
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venvs", default="/work/venvs")
    ap.add_argument("releases", nargs="*", help="only these releases' fixtures (default: all)")
    a = ap.parse_args()
    for release in dict.fromkeys(r for r, _, _ in FIXTURES if not a.releases or r in a.releases):
        jobs = [(case, ck) for r, case, ck in FIXTURES if r == release]
        with tempfile.TemporaryDirectory() as tmp:
            req = {
                "jobs": [{"root": os.path.join(REPO, ck), "out": os.path.join(tmp, f"{c}.json")} for c, ck in jobs],
                "moe_backend": "auto",
            }
            with open(os.path.join(tmp, "req.json"), "w") as fh:
                json.dump(req, fh)
            py = os.path.join(a.venvs, f"sgl-{release}", "bin", "python")
            env = dict(os.environ, PYTHONPATH=REPO)
            subprocess.run(
                [py, "-m", "nhcheck.engines.live_sglang", os.path.join(tmp, "req.json")], env=env, check=True
            )
            for case, _ in jobs:
                with open(os.path.join(tmp, f"{case}.json")) as fh:
                    data = json.load(fh)
                out = os.path.join(HERE, f"sglang-{release}-{case}.json.gz")
                with open(out, "wb") as fh:
                    fh.write(gzip.compress(json.dumps(data, sort_keys=True).encode(), 9, mtime=0))
                print(f"{release} {case}: {os.path.getsize(out):,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
