"""What does the whole compatibility matrix cost next to one audit?

Builds the full-size Super-120B NVFP4 layout (165,860 tensors, 17 shards) as sparse files (headers real,
data holes), then in the same run and alternating, several repetitions each:

  audit   the whole `python -m nhcheck audit DIR --format json -o FILE` process (one release);
  matrix  the whole `python -m nhcheck matrix DIR --format json -o FILE` process (every release of
          every engine nhcheck answers for: each behaviour epoch of SGLang and vLLM).

Prints the median and minimum wall and CPU times (user + system), the ratios (target < 2x), how many audits
the matrix ran for its epochs, and the load average. The tree runs with its bytecode compiled.

Usage: python bench/matrix.py [--reps 5] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

from processes import timed, tree_env  # noqa: E402


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

    compat.run_audit = counting
    try:
        compat.build(open_local(d))
    finally:
        compat.run_audit = real
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
        load = os.getloadavg()
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load average {load[0]:.2f}; workdir {work}")
        d = os.path.join(work, "super-nvfp4")
        if not os.path.isdir(d):
            totals = generate.full_layouts()["super-nvfp4"](d)
            print(f"super-nvfp4: generated {totals['tensors']:,} tensors in {totals['shards']} shards (sparse)")
        audit_cmd = [sys.executable, "-m", "nhcheck", "audit", d, "--format", "json", "-o", out_json, "-q"]
        matrix_cmd = [sys.executable, "-m", "nhcheck", "matrix", d, "--format", "json", "-o", out_json]
        env = tree_env(ROOT)
        timed(audit_cmd, env), timed(matrix_cmd, env)  # warm the page cache
        times: dict[str, tuple[list[float], list[float]]] = {"audit": ([], []), "matrix": ([], [])}
        for _ in range(args.reps):
            for k, cmd in (("audit", audit_cmd), ("matrix", matrix_cmd)):
                w, c = timed(cmd, env)
                times[k][0].append(w)
                times[k][1].append(c)
        for i, what in enumerate(("wall", "cpu")):
            a, m = times["audit"][i], times["matrix"][i]
            print(
                f"super-nvfp4 {what}: audit median {statistics.median(a):.3f} s (min {min(a):.3f}) | matrix median "
                f"{statistics.median(m):.3f} s (min {min(m):.3f}) | ratio of medians "
                f"{statistics.median(m) / statistics.median(a):.2f}x (target < 2x); of minima {min(m) / min(a):.2f}x"
            )
        runs, epochs = _audits_run(d)
        print(f"super-nvfp4: the matrix ran {runs} audits for {epochs} epochs (the others shared one)")
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
