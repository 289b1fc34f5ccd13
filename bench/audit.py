"""How close is `nhcheck audit` to the cost of just parsing the shard headers?

Builds the full-size Nano-3 NVFP4 (24,147 tensors) and Super-120B NVFP4 (165,860 tensors)
layouts as sparse files (headers real, data holes: no disk used), then in the same run and
alternating, several repetitions each:

  baseline  a bare Python process that reads every shard header and json-parses it;
  nhcheck   the whole `python -m nhcheck audit DIR --format json -o FILE` process.

Prints the median wall times and the ratio (target ≤ 1.5×). Also times the expert-mapping
replay indexed (what nhcheck does) against SGLang's literal scan over E × 3 tuples per name,
on a slice of the Super names, to back the "indexed, not O(names × experts)" claim.

Usage: python bench/audit.py [--reps 5] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

BARE = r"""
import json, os, struct, sys
d = sys.argv[1]
for fn in sorted(os.listdir(d)):
    if fn.endswith(".safetensors"):
        with open(os.path.join(d, fn), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            json.loads(f.read(n))
"""


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode not in (0, 1):
        raise SystemExit(f"{cmd} failed: {r.stderr.decode()[-500:]}")
    return dt


def _literal_expert_scan(names: list[str], num_experts: int) -> int:
    """SGLang's loop: for every name, every (e, shard) tuple until a substring hits."""
    tuples = [(f"experts.{e}.{w}.", e) for e in range(num_experts) for w in ("up_proj", "down_proj", "")]
    hits = 0
    for n in names:
        for sub, _e in tuples:
            if sub in n:
                hits += 1
                break
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import generate  # examples/generate.py

    work = args.workdir or tempfile.mkdtemp(prefix="nhcheck-bench-audit-")
    out_json = os.path.join(work, "audit.json")
    try:
        layouts = generate.full_layouts()
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; workdir {work}")
        for name in ("nano3-nvfp4", "super-nvfp4"):
            d = os.path.join(work, name)
            if not os.path.isdir(d):
                totals = layouts[name](d)
                print(
                    f"{name}: generated {totals['tensors']:,} tensors, {totals['bytes']:,} bytes (sparse), {totals['shards']} shards"
                )
            bare_cmd = [sys.executable, "-c", BARE, d]
            nh_cmd = [sys.executable, "-m", "nhcheck", "audit", d, "--format", "json", "-o", out_json, "-q"]
            table_cmd = [sys.executable, "-m", "nhcheck", "audit", d, "-q"]
            floor_cmd = [sys.executable, "-m", "nhcheck", "--version"]
            _wall(bare_cmd), _wall(nh_cmd)  # warm the page cache and imports
            bare, nh, table, floor = [], [], [], []
            for _ in range(args.reps):
                bare.append(_wall(bare_cmd))
                nh.append(_wall(nh_cmd))
                table.append(_wall(table_cmd))
                floor.append(_wall(floor_cmd))
            b, n, tb, fl = (statistics.median(x) for x in (bare, nh, table, floor))
            print(
                f"{name}: baseline (parse headers only) median {b:.3f} s  min {min(bare):.3f} s | "
                f"nhcheck audit --format json median {n:.3f} s  min {min(nh):.3f} s | ratio {n / b:.2f}x (target <= 1.5x)"
            )
            print(
                f"{name}: nhcheck audit (table) median {tb:.3f} s, ratio {tb / b:.2f}x; "
                f"interpreter+import floor (nhcheck --version) {fl:.3f} s"
            )

        from nhcheck.checkpoint import open_local
        from nhcheck.engines.sglang import get_profile, make_replayer

        ck = open_local(os.path.join(work, "super-nvfp4"))
        names = [t.name.replace("backbone", "model", 1) for t in ck.tensors() if ".experts." in t.name][:20000]
        t = time.perf_counter()
        replay = make_replayer(frozenset(), 512, get_profile("sglang@0.5.23"))
        for n in names:
            replay(n)
        indexed = time.perf_counter() - t
        t = time.perf_counter()
        _literal_expert_scan(names, 512)
        literal = time.perf_counter() - t
        print(
            f"expert mapping on {len(names):,} Super names (E=512): literal scan {literal:.3f} s, "
            f"nhcheck indexed replay {indexed:.3f} s, ratio {literal / indexed:.0f}x"
        )
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
