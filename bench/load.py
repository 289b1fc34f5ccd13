"""Benchmark ``nhcheck load`` against the loaders people use instead and against the I/O ceiling, in one process.

    python bench/load.py --dir /tmp/nano-like [--reps 5] [--device cuda] [--cold] [--cap] [--out results.json]

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
  (d) ``nhcheck.load.load_audited``: the same load with the audit made before the clock;
  (e) fastsafetensors: ``SafeTensorsFileLoader`` (``nogds=True`` with its default O_DIRECT reads,
      the same through the page cache, and with GDS where libcufile and /dev/nvidia-fs load),
      ``copy_files_to_device`` and every tensor taken with ``get_tensor``;
  (f) Run:ai model streamer: ``SafetensorsStreamer.stream_files`` with every tensor moved to the
      device as it streams (``RUNAI_STREAMER_CONCURRENCY`` = the thread count).

GB/s is the checkpoint's data bytes over the wall time, for all of them; every ratio is printed.
``--cold`` adds one run of each after dropping the page cache (``echo 3 > /proc/sys/vm/drop_caches``,
root only). ``--cap`` loads once more in a process capped with
``torch.cuda.set_per_process_memory_fraction`` to the parameters plus the staging area (plus a
fixed 256 MB for the checks' temporaries), with the default 1 GB staging and with 64 MB.
A loader whose package is missing is reported as such, not timed. Figures: README's performance table.
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

from nhcheck.dtypes import ITEMSIZE  # noqa: E402
from nhcheck.load import LoadOptions, load_audited, load_path, readers  # noqa: E402
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


def run_fastsafetensors(files: list[Path], device: torch.device, threads: int, gds: bool, cache: bool = False) -> float:
    """fastsafetensors' own loader: every file to the device, then every tensor as users take them.

    Its default ``disable_cache=True`` reads around the page cache (O_DIRECT); ``cache`` turns that off."""
    from fastsafetensors import SafeTensorsFileLoader

    t = time.perf_counter()
    loader = SafeTensorsFileLoader(None, str(device), nogds=not gds, max_threads=threads, disable_cache=not cache)
    try:
        loader.add_filenames({0: [str(f) for f in files]})
        fb = loader.copy_files_to_device()
        out = {k: fb.get_tensor(k) for k in loader.get_keys()}
        sync(device)
        dt = time.perf_counter() - t
        del out
        fb.close()
    finally:
        loader.close()
    return dt


def run_runai(files: list[Path], device: torch.device) -> float:
    """The Run:ai model streamer: tensors stream from its native readers and go to the device as they arrive."""
    from runai_model_streamer import SafetensorsStreamer

    t = time.perf_counter()
    out = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(f) for f in files])
        for name, tensor in streamer.get_tensors():
            out[name] = tensor.to(device)
    sync(device)
    dt = time.perf_counter() - t
    del out
    return dt


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root); False where the kernel does not let us."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


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
        "param_bytes": sum(p.numel * ITEMSIZE[p.param.dtype] for p in r.params),
        "transfer": dict(readers.STATS),
        "tensors_loaded": r.tensors_loaded,
    }
    del res
    return dt, info


def run_views(root: Path, opts: LoadOptions) -> float:
    """nhcheck end to end with the staged byte ranges placed through tensor views and ``_foreach_copy_``
    (the path before the driver copies), to show what the driver copies buy in the same run."""
    readers.DRIVER_COPIES = False
    try:
        return run_nhcheck(root, opts)[0]
    finally:
        readers.DRIVER_COPIES = True


def contenders(args, files, device, base, decided, ceiling) -> dict:
    """Every loader that can run here, as name -> callable returning seconds; the missing ones said once."""
    out = {
        "safetensors": lambda: run_safetensors(files, device),
        "ceiling": ceiling.run,
        "nhcheck": lambda: run_nhcheck(args.dir, base)[0],
        "nhcheck_decided": lambda: run_nhcheck(args.dir, base, decided)[0],
    }
    if device.type == "cuda":
        out["nhcheck_views"] = lambda: run_views(args.dir, base)
    for name, fn in (
        ("fastsafetensors", lambda: run_fastsafetensors(files, device, args.threads, False)),
        ("fastsafetensors_cached", lambda: run_fastsafetensors(files, device, args.threads, False, True)),
        ("fastsafetensors_gds", lambda: run_fastsafetensors(files, device, args.threads, True)),
        ("runai_streamer", lambda: run_runai(files, device)),
    ):
        try:
            fn()  # warm-up, and the proof it runs here
            out[name] = fn
        except Exception as exc:  # noqa: BLE001 - an absent package or GDS is a line in the output, not a crash
            print(f"{name}: not timed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
    return out


def capped(args, device: torch.device, staging: int) -> dict:
    """Load in a process whose allocator may hold only the parameters + ``staging`` + 256 MB."""
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    probe = run_nhcheck(args.dir, LoadOptions(device=str(device), threads=args.threads))[1]
    params = probe["param_bytes"]
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device)  # the CUDA context's own use is outside the allocator
    limit = params + staging + (256 << 20)
    torch.cuda.set_per_process_memory_fraction((held + limit) / total, device)
    try:
        opts = LoadOptions(device=str(device), threads=args.threads, staging_bytes=staging)
        dt, info = run_nhcheck(args.dir, opts)
        ok = f"loaded clean in {dt:.3f} s"
    except torch.OutOfMemoryError as exc:
        info, ok = {"peak_device_bytes": None}, f"out of memory: {str(exc).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        gc.collect()
        torch.cuda.empty_cache()
    return {
        "staging_bytes": staging,
        "param_bytes": params,
        "cap_bytes": limit,
        "peak_device_bytes": info["peak_device_bytes"],
        "result": ok,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nhcheck-bench-nano-like"))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 4))
    ap.add_argument("--cold", action="store_true", help="Also one run of each after dropping the page cache.")
    ap.add_argument("--cap", action="store_true", help="Also load under a memory cap of parameters + staging.")
    ap.add_argument("--sweep", action="store_true", help="Also time nhcheck with other thread/piece settings.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    os.environ.setdefault("RUNAI_STREAMER_CONCURRENCY", str(args.threads))
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
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
    decided = audit_path(str(args.dir), ENGINE)
    run_nhcheck(args.dir, base, decided)
    loaders = contenders(args, files, device, base, decided, ceiling)

    # The CLI runs with the cyclic GC off (nhcheck.cli.main); so do all of them here.
    gc.collect()
    gc.disable()
    runs: dict[str, list[float]] = {k: [] for k in loaders}
    infos = []
    for rep in range(args.reps):
        for name, fn in loaders.items():
            if name == "nhcheck":
                dt, info = run_nhcheck(args.dir, base)
                infos.append(info)
            else:
                dt = fn()
            runs[name].append(dt)
        print(
            f"rep {rep + 1}: " + "  ".join(f"{k} {data / v[-1] / 1e9:.2f}" for k, v in runs.items()) + " GB/s",
            flush=True,
        )
    gc.enable()

    cold: dict[str, float] = {}
    if args.cold:
        for name, fn in loaders.items():
            if name == "nhcheck_decided":
                continue  # its audit read the headers before the clock: not a cold start
            if not drop_page_cache():
                print("cold: /proc/sys/vm/drop_caches is not writable here; no cold figures", flush=True)
                break
            cold[name] = fn()
        warm_cache(files)

    sweep = {}
    if args.sweep:
        grid = [(t, c, 512) for t in (8, args.threads) for c in (32, 64, 128)] + [
            (args.threads, 64, 1024),
            (args.threads, 64, 2048),
        ]
        for threads, chunk_mb, pinned_mb in grid:
            o = LoadOptions(
                device=str(device), threads=threads, chunk_bytes=chunk_mb << 20, pinned_bytes=pinned_mb << 20
            )
            run_nhcheck(args.dir, o)
            key = f"threads={threads} piece={chunk_mb}MB pinned={pinned_mb}MB"
            sweep[key] = statistics.median(run_nhcheck(args.dir, o)[0] for _ in range(3))
            print(f"sweep {key}: {data / sweep[key] / 1e9:.2f} GB/s", flush=True)

    caps = []
    if args.cap and device.type == "cuda":
        del ceiling, loaders  # the ceiling's whole-shard device buffers would count against the cap
        for st in (1 << 30, 64 << 20):
            try:
                caps.append(capped(args, device, st))
            except Exception as exc:  # noqa: BLE001 - reported, the figures above still print
                print(f"capped run with staging {st:,}: {type(exc).__name__}: {exc}", flush=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    gbs = {k: data / v / 1e9 for k, v in med.items()}
    timing = {k: statistics.median(i["timings"][k] for i in infos) for k in infos[0]["timings"]}
    print()
    print(f"{'loader (warm cache)':<22} {'median s':>9} {'GB/s':>7} {'x ceiling':>9}   per run GB/s")
    for k, v in runs.items():
        print(
            f"{k:<22} {med[k]:9.3f} {gbs[k]:7.2f} {gbs[k] / gbs['ceiling']:9.2f}   "
            + " ".join(f"{data / x / 1e9:.2f}" for x in v)
        )
    print(
        "nhcheck phases (median s; the reads run from the start, under headers, audit and plan): "
        + ", ".join(f"{k} {v:.3f}" for k, v in timing.items())
    )
    moves = {k: statistics.median(i["transfer"].get(k, 0.0) for i in infos) for k in infos[-1]["transfer"]}
    print(
        "nhcheck transfer (median s; reader sums over threads, then the main thread's placement, then "
        "moments since the reads began): " + ", ".join(f"{k} {v:.3f}" for k, v in moves.items())
    )
    last = infos[-1]
    print(
        f"nhcheck peak device memory {last['peak_device_bytes']} for {last['param_bytes']:,} bytes of parameters "
        f"(staging {base.staging_bytes:,}), read {last['bytes_read']:,} bytes, loaded {last['bytes_loaded']:,} "
        f"in {last['tensors_loaded']:,} tensors, {last['samples_checked']:,} elements read back"
    )
    for k in ("nhcheck", "nhcheck_decided"):
        for other in gbs:
            if other not in ("nhcheck", "nhcheck_decided"):
                print(f"ratio {k}/{other} = {gbs[k] / gbs[other]:.2f}x")
    for k in gbs:
        if k not in ("nhcheck", "nhcheck_decided", "ceiling"):
            print(f"ratio {k}/ceiling = {gbs[k] / gbs['ceiling']:.2f}x")
    if cold:
        print("cold page cache (dropped before each run: echo 3 > /proc/sys/vm/drop_caches), one run each:")
        for k, v in cold.items():
            print(f"  {k:<22} {v:9.3f} s {data / v / 1e9:7.2f} GB/s {cold['ceiling'] / v:5.2f}x cold ceiling")
    for c in caps:
        print(
            f"capped (set_per_process_memory_fraction): parameters {c['param_bytes']:,} + staging "
            f"{c['staging_bytes']:,} + 256 MB = cap {c['cap_bytes']:,}: {c['result']}, "
            f"peak {c['peak_device_bytes']}"
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
                    "cold_s": cold,
                    "capped": caps,
                    "sweep": sweep,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
