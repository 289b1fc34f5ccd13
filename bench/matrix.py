"""What does the whole compatibility matrix cost next to one audit?

Builds the full-size Super-120B NVFP4 layout (165,860 tensors, 17 shards) as sparse files (headers real,
data holes), then in the same run and alternating, several repetitions each:

  audit   the whole `python -m nhcheck audit DIR --format json -o FILE` process (one release);
  matrix  the whole `python -m nhcheck matrix DIR --format json -o FILE` process (every release
          nhcheck answers for: 37 SGLang releases in 18 epochs).

Prints the median wall times, the ratio (target < 2x) and how many audits the matrix ran for its epochs.

Usage: python bench/matrix.py [--reps 5] [--workdir DIR] [--keep]
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


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode not in (0, 1):
        raise SystemExit(f"{cmd} failed: {r.stderr.decode()[-500:]}")
    return dt


def _audits_run(d: str) -> tuple[int, int]:
    """(audits the matrix ran, epochs it answered), counted in this process."""
    from nhcheck import engines
    from nhcheck import matrix as compat
    from nhcheck.checkpoint import open_local

    runs = 0
    real = compat.run_audit

    def counting(*args, **kwargs):
        nonlocal runs
        runs += 1
        return real(*args, **kwargs)

    compat.run_audit = counting  # type: ignore[assignment]
    try:
        compat.build(open_local(d))
    finally:
        compat.run_audit = real  # type: ignore[assignment]
    return runs, len(engines.epochs())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import generate  # examples/generate.py

    work = args.workdir or tempfile.mkdtemp(prefix="nhcheck-bench-matrix-")
    out_json = os.path.join(work, "out.json")
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; workdir {work}")
        d = os.path.join(work, "super-nvfp4")
        if not os.path.isdir(d):
            totals = generate.full_layouts()["super-nvfp4"](d)
            print(f"super-nvfp4: generated {totals['tensors']:,} tensors in {totals['shards']} shards (sparse)")
        audit_cmd = [sys.executable, "-m", "nhcheck", "audit", d, "--format", "json", "-o", out_json, "-q"]
        matrix_cmd = [sys.executable, "-m", "nhcheck", "matrix", d, "--format", "json", "-o", out_json]
        _wall(audit_cmd), _wall(matrix_cmd)  # warm the page cache and imports
        audit, matrix = [], []
        for _ in range(args.reps):
            audit.append(_wall(audit_cmd))
            matrix.append(_wall(matrix_cmd))
        a, m = statistics.median(audit), statistics.median(matrix)
        runs, epochs = _audits_run(d)
        print(
            f"super-nvfp4: audit median {a:.3f} s (min {min(audit):.3f}) | matrix median {m:.3f} s "
            f"(min {min(matrix):.3f}) | ratio {m / a:.2f}x (target < 2x); min/min {min(matrix) / min(audit):.2f}x"
        )
        print(f"super-nvfp4: the matrix ran {runs} audits for {epochs} epochs (the others shared one)")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
