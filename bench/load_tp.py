"""Benchmark ``nhcheck load --tp N``: per-rank and aggregate throughput of the tensor-parallel load against TP 1.

    python bench/load_tp.py --dir /tmp/nhcheck-bench-tp --tp 1,2[,4] [--reps 3] [--device cuda] [--out r.json]

Builds (once) a Nemotron-3-Nano-like NVFP4 checkpoint of several GB: the release's config
and quant recipe (52-layer ``MEMEM*E…`` pattern, real widths, real vocabulary, NVFP4 experts
and Mamba, the real exclude list) with fewer routed experts (``--experts``, default 32).
``moe_intermediate_size`` stays 1856, which the engine can shard at TP 1, 2 and 4 (232 per
rank at TP 8 would split an NVFP4 block; ``audit --tp 8`` says so). The MoE backend is
``marlin``, SGLang's pick for NVFP4 on SM80-SM90 (flashinfer_trtllm, the Blackwell pick,
misplaces rank windows at this width: see ``nhcheck.tp``).

With a warm page cache, each repetition runs every TP size through the same code path
(``nhcheck.load.tp.run``: torch's elastic launcher, one process per GPU, NCCL), and with
``--reference`` the single-process loader (``nhcheck.load``, fast reader). Reported per TP size:
each rank's slice bytes, seconds and GB/s over its transfer; the aggregate (all ranks' bytes
over the slowest rank's transfer, the ranks starting together after a barrier); the wall time
of the whole command including process start; and the coverage verdict.

Measured 2026-11-28 on 4x NVIDIA H200 (64 host cores, torch 2.11, NCCL with NVLink multicast
off), 6.92 GB, 8 shards, 3 repetitions, medians, every run clean: TP 1 21.2 GB/s; TP 2
19.0 GB/s aggregate (0.90x TP 1; ranks 11.8 and 9.5 GB/s, each reading 4.75 GB for its
3.47 GB); TP 4 18.1 GB/s aggregate (0.85x; ranks 4.5-4.8 GB/s, each reading 3.66 GB for its
1.74 GB). On one host the ranks share the page cache's memory bandwidth, and a row-parallel
(column) slice then read its rows' whole span, so the aggregate stayed near TP 1 instead of
scaling with the GPU count. Since 2026-12-05 a column slice is gathered row window by row window
from the memory-mapped shard, so each rank reads exactly the bytes it places (``bytes_read ==
bytes_loaded``, checked on two gloo ranks by ``tests/test_tp.py``); the multi-GPU aggregate has
not been measured since, as no machine with several GPUs was lent. With CPU ranks (``--device cpu``) on a
16-core H100 host, 2026-12-07: TP 1 14.5-17.2 GB/s, TP 2 20.1-21.1 GB/s, TP 4 19.4 GB/s with 4 lanes a rank
(16.1-18.2 with 8, now no longer the default there: ``load.tp.default_lanes``); on another such host, TP 4 at
that default 14.0-15.0 GB/s against 13.3-13.5 with 8 lanes a rank, in the same run. Before slots carried several
reads (one read, copy and placement per window: ~3,500 Python steps per rank holding the GIL),
TP 2 ran at 0.29x and TP 4 at 0.21x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

import generate  # noqa: E402

from nhcheck.load import LoadOptions, load_path  # noqa: E402
from nhcheck.load import tp as load_tp  # noqa: E402

ENGINE = "sglang@0.5.23"
BACKEND = "marlin"


def build(out: Path, experts: int, shards: int) -> None:
    fixtures = REPO / "examples" / "fixtures" / "nano3-nvfp4"
    config = json.loads((fixtures / "config.json").read_text())
    quant = json.loads((fixtures / "hf_quant_config.json").read_text())
    config.update(n_routed_experts=experts)
    tensors = generate.nemotron_h_tensors(config, quant, router_dtype="F32")
    generate.write_checkpoint(str(out), tensors, config, quant, shards=shards)


def warm_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def run_tp(root: Path, tp: int, device: str, threads: int) -> dict:
    t = time.perf_counter()
    rep = load_tp.run(load_tp.Job(str(root), root.name, tp, device, ENGINE, moe_backend=BACKEND, threads=threads))
    wall = time.perf_counter() - t
    if rep.verdict != "clean":
        raise SystemExit(f"load --tp {tp} is not clean: {rep.verdict}: {[f.message for f in rep.findings[:3]]}")
    return {
        "tp": tp,
        "verdict": rep.verdict,
        "command_seconds": wall,
        "transfer_seconds": rep.wall_seconds,
        "bytes": rep.bytes_loaded,
        "bytes_read": rep.bytes_read,
        "gb_per_s": rep.gb_per_s,
        "samples_checked": rep.samples_checked,
        "params": len(rep.params),
        "params_filled": sum(1 for p in rep.params if p.status == "filled"),
        "ranks": [
            {
                "rank": s.rank,
                "device": s.device,
                "copies": s.copies,
                "bytes": s.bytes_loaded,
                "bytes_read": s.bytes_read,
                "allocated": s.bytes_allocated,
                "seconds": s.seconds,
                "gb_per_s": s.gb_per_s,
            }
            for s in rep.ranks
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nhcheck-bench-tp"))
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--threads", type=int, default=0, help="Reader lanes per rank (0: the load's default, load.tp.default_lanes)."
    )
    ap.add_argument(
        "--reference",
        action="store_true",
        help="Also time the single-process loader (nhcheck.load, fast reader) in each repetition.",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    sizes = [int(x) for x in args.tp.split(",")]
    if not sorted(args.dir.glob("model-*.safetensors")):
        t = time.perf_counter()
        build(args.dir, args.experts, args.shards)
        print(f"built {args.dir} in {time.perf_counter() - t:.1f} s", flush=True)
    files = sorted(args.dir.glob("model-*.safetensors"))
    data = sum(f.stat().st_size for f in files)
    warm_cache(files)
    import torch

    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    print(
        f"{card} x{gpus}; {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"{len(files)} shards, {data / 1e9:.2f} GB",
        flush=True,
    )

    runs: dict[int, list[dict]] = {tp: [] for tp in sizes}
    single: list[float] = []
    loaded = 0
    for rep in range(args.reps):
        for tp in sizes:
            r = run_tp(args.dir, tp, args.device, args.threads)
            runs[tp].append(r)
            ranks = "  ".join(
                f"r{x['rank']} {x['bytes'] / 1e9:.2f} GB ({x['bytes_read'] / 1e9:.2f} GB read) "
                f"{x['seconds']:.2f} s {x['gb_per_s']:.2f} GB/s"
                for x in r["ranks"]
            )
            print(
                f"rep {rep + 1} tp {tp}: aggregate {r['bytes'] / 1e9:.2f} GB in {r['transfer_seconds']:.3f} s = "
                f"{r['gb_per_s']:.2f} GB/s (command {r['command_seconds']:.1f} s) | {ranks}",
                flush=True,
            )
        if not args.reference:
            continue
        t = time.perf_counter()
        res = load_path(str(args.dir), ENGINE, LoadOptions(device=args.device), moe_backend=BACKEND)
        single.append(time.perf_counter() - t)
        loaded = res.report.bytes_loaded
        assert res.report.verdict == "clean", res.report.verdict
        del res
        print(
            f"rep {rep + 1} single-process nhcheck load (fast reader): {loaded / single[-1] / 1e9:.2f} GB/s end to end",
            flush=True,
        )

    print()
    print(f"{'tp':>3} {'aggregate GB/s':>15} {'transfer s':>11} {'per-rank GB/s (median)':>24} {'vs tp 1':>8}")
    base = None
    summary = {}
    for tp in sizes:
        agg = statistics.median(r["gb_per_s"] for r in runs[tp])
        sec = statistics.median(r["transfer_seconds"] for r in runs[tp])
        per = [statistics.median(r["ranks"][k]["gb_per_s"] for r in runs[tp]) for k in range(tp)]
        base = agg if tp == 1 or base is None else base
        summary[tp] = {"aggregate_gb_per_s": agg, "transfer_seconds": sec, "per_rank_gb_per_s": per}
        print(f"{tp:>3} {agg:15.2f} {sec:11.3f} {' '.join(f'{x:.2f}' for x in per):>24} {agg / base:7.2f}x")
    if single:
        print(
            f"single-process nhcheck load (fast reader, end to end incl. audit and checks): "
            f"{loaded / statistics.median(single) / 1e9:.2f} GB/s"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "card": card,
                    "gpus": gpus,
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "bytes": data,
                    "runs": runs,
                    "summary": summary,
                    "single_process_seconds": single,
                    "single_process_bytes": loaded,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
