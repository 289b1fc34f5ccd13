"""Benchmark ``nhcheck load`` against plain safetensors and against the I/O ceiling, in one process.

    python bench/load.py --dir /tmp/nano-like [--reps 5] [--device cuda] [--out results.json]

Builds (once) a Nemotron-3-Nano-like NVFP4 checkpoint of about 3 GB with real data: the
release's config and quant recipe (hybrid ``MEMEM*E…`` 52-layer pattern, NVFP4 experts,
Mamba and shared experts, the real exclude list) with fewer experts (16), half the expert
width and half the vocabulary, so it fits a few GB while keeping every tensor family
(3.5k tensors). Then, with a warm page cache, times in turn and several times:

  (a) ``safetensors.torch.load_file(shard, device=...)`` over every shard;
  (b) the ceiling: a thread pool of ``os.preadv`` of the shard bytes into pinned host buffers
      (allocated before timing), then one asynchronous host-to-device copy per shard;
  (c) ``nhcheck.load.load_path`` end to end: headers, audit, plan, allocation and poisoning,
      transfer, coverage, read-back sample and poison scan;
  (d) ``nhcheck.load.load_audited``: the same load with the audit made before the clock (the
      load proper: mapping, placement, coverage and checks, from the first byte).

GB/s is the checkpoint's data bytes over the wall time, for all of them. Prints a table and
the ratios to (a) and (b); writes every run to ``--out`` as JSON.

Measured 2026-11-28 on one NVIDIA H200 (16 host cores, torch 2.11, 3.12 GB, 3,539 tensors,
7 runs, medians): (a) 4.23 GB/s, (b) 29.7 GB/s, (c) 13.2 GB/s = 3.1x (a), 0.44x (b),
(d) 17.3 GB/s = 4.1x (a), 0.58x (b). A later run (5 reps): (a) 4.56, (b) 29.8, (c) 15.2 GB/s =
3.34x (a), 0.51x (b); (d) 18.3 GB/s = 4.0x (a), 0.61x (b); phases of (c): headers 0.065 s, audit 0.059 s
(the reads run under both), plan 0.010, allocate 0.003, transfer tail 0.037, checks 0.030. Peak device memory of (c): 6.2 GB (parameters plus the
shards' landing buffers). Left between (d) and (b): the reader threads share the interpreter
with the main thread's Python (plan, placement, checks), and (c) adds header parsing and the
audit, which the ceiling does not do.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

import generate  # noqa: E402

from nhcheck.load import LoadOptions, load_audited, load_path  # noqa: E402
from nhcheck.pipeline import audit_path  # noqa: E402

ENGINE = "sglang@0.5.23"
PIECE = 16 << 20


def build(out: Path, shards: int) -> None:
    """The scaled Nano-3 NVFP4 layout, real (generated) bytes, written with examples/generate.py."""
    fixtures = REPO / "examples" / "fixtures" / "nano3-nvfp4"
    config = json.loads((fixtures / "config.json").read_text())
    quant = json.loads((fixtures / "hf_quant_config.json").read_text())
    config.update(n_routed_experts=16, moe_intermediate_size=928, vocab_size=65536)
    tensors = generate.nemotron_h_tensors(config, quant, router_dtype="F32")
    generate.write_checkpoint(str(out), tensors, config, quant, shards=shards)


def shard_files(root: Path) -> list[Path]:
    return sorted(root.glob("model-*.safetensors"))


def warm_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_safetensors(files: list[Path], device: torch.device) -> float:
    from safetensors.torch import load_file

    t = time.perf_counter()
    out = [load_file(str(f), device=str(device)) for f in files]
    sync(device)
    dt = time.perf_counter() - t
    del out
    return dt


class Ceiling:
    """Whole-shard pinned buffers and device buffers, allocated once, outside the timing."""

    def __init__(self, files: list[Path], device: torch.device, threads: int) -> None:
        self.files = files
        self.device = device
        self.threads = threads
        self.sizes = [f.stat().st_size for f in files]
        cuda = device.type == "cuda"
        self.host = [torch.empty(n, dtype=torch.uint8, pin_memory=cuda) for n in self.sizes]
        self.dev = [torch.empty(n, dtype=torch.uint8, device=device) for n in self.sizes] if cuda else None

    def run(self) -> float:
        import ctypes

        cuda = self.dev is not None
        stream = torch.cuda.Stream(self.device) if cuda else None
        fds = [os.open(f, os.O_RDONLY) for f in self.files]
        t = time.perf_counter()

        def read(i: int, off: int, n: int) -> None:
            view = memoryview((ctypes.c_char * n).from_address(self.host[i].data_ptr() + off)).cast("B")
            got = 0
            while got < n:
                got += os.preadv(fds[i], [view[got:]], off + got)

        with ThreadPoolExecutor(self.threads) as pool:
            futs = [
                [pool.submit(read, i, off, min(PIECE, n - off)) for off in range(0, n, PIECE)]
                for i, n in enumerate(self.sizes)
            ]
            for i, fs in enumerate(futs):
                for f in fs:
                    f.result()
                if cuda:
                    with torch.cuda.stream(stream):
                        self.dev[i].copy_(self.host[i], non_blocking=True)
        if cuda:
            stream.synchronize()
        dt = time.perf_counter() - t
        for fd in fds:
            os.close(fd)
        return dt


def run_nhcheck(root: Path, opts: LoadOptions, audit=None) -> tuple[float, dict]:
    """End to end from the path; or, given ``audit``, the load proper (decisions made before the clock)."""
    t = time.perf_counter()
    res = load_path(str(root), ENGINE, opts) if audit is None else load_audited(audit, opts)
    dt = time.perf_counter() - t
    r = res.report
    if r.verdict != "clean":
        raise SystemExit(f"nhcheck load is not clean on the bench checkpoint: {r.verdict}: {r.findings[:3]}")
    info = {
        "seconds": dt,
        "bytes_loaded": r.bytes_loaded,
        "bytes_read": r.bytes_read,
        "timings": r.timings,
        "peak_device_bytes": r.peak_device_bytes,
        "samples_checked": r.samples_checked,
        "tensors_loaded": r.tensors_loaded,
    }
    del res
    return dt, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nhcheck-bench-nano-like"))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 4))
    ap.add_argument("--sweep", action="store_true", help="Also time nhcheck with other thread/chunk/pinned settings.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    if not shard_files(args.dir):
        t = time.perf_counter()
        build(args.dir, args.shards)
        print(f"built {args.dir} in {time.perf_counter() - t:.1f} s", flush=True)
    files = shard_files(args.dir)
    data = sum(f.stat().st_size for f in files)
    warm_cache(files)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({card}); {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"{len(files)} shards, {data / 1e9:.2f} GB",
        flush=True,
    )

    base = LoadOptions(device=str(device), threads=args.threads)
    ceiling = Ceiling(files, device, args.threads)
    # warm-up: CUDA context, kernels, the pinned ring nhcheck keeps, the allocator's cache
    run_safetensors(files[:1], device)
    ceiling.run()
    run_nhcheck(args.dir, base)

    # The CLI runs with the cyclic GC off (nhcheck.cli.main); so do all three here.
    gc.collect()
    gc.disable()
    decided = audit_path(str(args.dir), ENGINE)
    run_nhcheck(args.dir, base, decided)
    runs: dict[str, list[float]] = {"safetensors": [], "ceiling": [], "nhcheck": [], "nhcheck_decided": []}
    infos = []
    for rep in range(args.reps):
        runs["safetensors"].append(run_safetensors(files, device))
        runs["ceiling"].append(ceiling.run())
        dt, info = run_nhcheck(args.dir, base)
        runs["nhcheck"].append(dt)
        infos.append(info)
        runs["nhcheck_decided"].append(run_nhcheck(args.dir, base, decided)[0])
        print(
            f"rep {rep + 1}: " + "  ".join(f"{k} {data / v[-1] / 1e9:6.2f} GB/s" for k, v in runs.items()), flush=True
        )

    sweep = {}
    if args.sweep:
        for threads in (8, args.threads):
            for chunk_mb in (8, 16, 32):
                for pinned_mb in (512,):
                    o = LoadOptions(
                        device=str(device), threads=threads, chunk_bytes=chunk_mb << 20, pinned_bytes=pinned_mb << 20
                    )
                    run_nhcheck(args.dir, o)
                    times = [run_nhcheck(args.dir, o)[0] for _ in range(3)]
                    key = f"threads={threads} chunk={chunk_mb}MB pinned={pinned_mb}MB"
                    sweep[key] = statistics.median(times)
                    print(f"sweep {key}: {data / sweep[key] / 1e9:.2f} GB/s", flush=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    gbs = {k: data / v / 1e9 for k, v in med.items()}
    timing = {k: statistics.median(i["timings"][k] for i in infos) for k in infos[0]["timings"]}
    print()
    print(f"{'reader':<16} {'median s':>9} {'GB/s':>7}   per run GB/s")
    for k, v in runs.items():
        print(f"{k:<16} {med[k]:9.3f} {gbs[k]:7.2f}   " + " ".join(f"{data / x / 1e9:.2f}" for x in v))
    print(
        "nhcheck phases (median s; the reads run from the start, under headers, audit and plan): "
        + ", ".join(f"{k} {v:.3f}" for k, v in timing.items())
    )
    print(
        f"nhcheck peak device memory {infos[-1]['peak_device_bytes']}, read {infos[-1]['bytes_read']:,} bytes, "
        f"loaded {infos[-1]['bytes_loaded']:,} in {infos[-1]['tensors_loaded']:,} tensors, "
        f"{infos[-1]['samples_checked']:,} elements read back"
    )
    for k in ("nhcheck", "nhcheck_decided"):
        print(
            f"ratio {k}/safetensors = {gbs[k] / gbs['safetensors']:.2f}x (target >= 3); "
            f"{k}/ceiling = {gbs[k] / gbs['ceiling']:.2f}x (target >= 0.7)"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "card": card,
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "bytes": data,
                    "runs": runs,
                    "median_s": med,
                    "gb_per_s": gbs,
                    "nhcheck": infos,
                    "sweep": sweep,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
