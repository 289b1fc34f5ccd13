"""What does `audit --values` cost on top of the header-only audit?

Builds the full-size Nano-3 NVFP4 layout (24,147 tensors, 4 shards, 19.3 GB) as sparse files,
then times the whole `python -m nhcheck audit DIR --format json -o FILE` process with and
without `--values`, alternating, several repetitions each (medians):

  sparse      the data are holes: every scale reads as zero (all flagged) and costs no disk I/O;
  real warm   the scale tensors (1.9 GB of FP8 block scales + 12k float scalars) are written
              with real positive values, the rest stays holes; page cache warm;
  real cold   the same, with the shards evicted from the page cache before each run
              (posix_fadvise DONTNEED), so the scale bytes come from the disk.

Usage: python bench/values.py [--reps 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

from processes import timed  # noqa: E402


def _shards(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def _evict(d: str) -> None:
    for p in _shards(d):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _fill_scales(d: str) -> tuple[int, int]:
    """Write real values into every scale tensor (the rest stays holes); returns (tensors, bytes)."""
    import generate

    from nhcheck.safetensors_header import read_shard
    from nhcheck.values import scale_kind

    n = nbytes = 0
    for p in _shards(d):
        fd = os.open(p, os.O_WRONLY)
        try:
            for t in read_shard(p).tensors:
                if scale_kind(t):
                    os.pwrite(fd, generate.tensor_bytes(t.name, t.dtype, list(t.shape)), t.start)
                    n += 1
                    nbytes += t.nbytes
        finally:
            os.close(fd)
    return n, nbytes


def _compare(label: str, d: str, out: str, reps: int, cold: bool) -> tuple[float, float]:
    base = [sys.executable, "-m", "nhcheck", "audit", d, "--format", "json", "-q", "-o", out]
    plain: list[float] = []
    values: list[float] = []
    for _ in range(reps):
        for args, times in ((base, plain), (base + ["--values"], values)):
            if cold:
                _evict(d)
            times.append(timed(args)[0])
    p, v = statistics.median(plain), statistics.median(values)
    print(f"{label:10} audit {p:6.2f} s   audit --values {v:6.2f} s   ratio {v / p:5.2f}×   (+{v - p:.2f} s)")
    return p, v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import generate

    from nhcheck import values
    from nhcheck.pipeline import audit_path

    work = args.workdir or tempfile.mkdtemp(prefix="nhcheck-bench-values-")
    d = os.path.join(work, "nano3-nvfp4")
    out = os.path.join(work, "report.json")
    try:
        totals = generate.full_layouts()["nano3-nvfp4"](d)
        print(
            f"Nano-3 NVFP4 full layout: {totals['tensors']:,} tensors, {totals['bytes'] / 1e9:.1f} GB in "
            f"{totals['shards']} sparse shards"
        )
        rep = audit_path(d)
        t = time.perf_counter()
        scan = values.scan(rep)
        print(
            f"--values reads {scan.tensors_read:,} scale tensors, {scan.bytes_read / 1e9:.2f} GB "
            f"({scan.bytes_read / totals['bytes']:.1%} of the data); in-process scan {time.perf_counter() - t:.2f} s; "
            f"sparse = all zero: {len(scan.findings)} bad-scale module families"
        )
        _compare("sparse", d, out, args.reps, cold=False)
        t = time.perf_counter()
        n, nbytes = _fill_scales(d)
        print(f"wrote real values into {n:,} scale tensors ({nbytes / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
        scan = values.scan(audit_path(d))
        assert not scan.findings, scan.findings[:3]
        _compare("real warm", d, out, args.reps, cold=False)
        _compare("real cold", d, out, args.reps, cold=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
