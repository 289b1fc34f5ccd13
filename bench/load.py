"""Benchmark ``nhcheck load`` against the loaders people use instead and against the I/O ceiling, in one process.

    python bench/load.py --dir /tmp/nano-like [--reps 5] [--device cuda] [--cold] [--cap] [--out results.json]
    python bench/load.py --before main --only safetensors,nhcheck,nhcheck_decided,nhcheck_before,\
        nhcheck_before_decided --also-pinned-mb 2048   # this tree against main's, same process

Builds (once) a Nemotron-3-Nano-like NVFP4 checkpoint of about 3 GB with real data: the
release's config and quant recipe (hybrid ``MEMEM*E…`` 52-layer pattern, NVFP4 experts,
Mamba and shared experts, the real exclude list) with fewer experts (16), half the expert
width and half the vocabulary, so it fits a few GB while keeping every tensor family
(3.5k tensors); ``--experts 128`` builds the release's expert count (24k tensors, 10.4 GB), where the
work before the plan scales with the tensors and the staging area stays 1 GB. Then, with a warm page cache,
times in turn and several times:

  (a) ``safetensors.torch.load_file(shard, device=...)`` over every shard;
  (b) the ceiling: a thread pool of ``os.preadv`` of the shard bytes into pinned host buffers
      (allocated before timing), then one asynchronous host-to-device copy per shard;
  (c) ``nhcheck.load.load_path`` end to end: headers, audit, plan, allocation and poisoning,
      transfer, coverage, read-back sample and poison scan;
  (d) ``nhcheck.load.load_audited``: the same load with the audit made before the clock (``_decided``);
  (e) fastsafetensors: ``SafeTensorsFileLoader`` (``nogds=True`` with its default O_DIRECT reads,
      the same through the page cache, and with GDS where libcufile and /dev/nvidia-fs load),
      ``copy_files_to_device`` and every tensor taken with ``get_tensor``;
  (f) Run:ai model streamer: ``SafetensorsStreamer.stream_files`` with every tensor moved to the
      device as it streams (``RUNAI_STREAMER_CONCURRENCY`` = the thread count).

nhcheck is also timed with one ``readers`` switch changed (``VARIANTS``, where the tree has it): on CUDA
its staged byte ranges placed through tensor views (``_views``, ``DRIVER_COPIES`` off) and one driver copy
per range instead of one kernel launch per staged read (``_perrange``, ``KERNEL`` off); and every reader
reading before the plan arrives (``_allearly``, ``EARLY_SHARE`` 1), or a quarter of them (``_quarterearly``);
and the interpreter's switch interval at 1 ms instead of 0.2 ms (``_switch1ms``, ``SWITCH_INTERVAL``), or at 5 ms until
the plan is handed over (``_switchlate``, ``EARLY_SWITCH_INTERVAL``).
``--also-lanes N`` adds nhcheck with N reader threads in pieces of the ring's size over N (``_lanesN``).
``--also-pinned-mb MB`` adds nhcheck with that pinned host ring (``_pinnedMB``), ``--also-staging-mb MB``
with that device staging area (``_stagingMB``): how far the reads run ahead of the plan. ``--before REF``
imports git REF's ``nhcheck/`` (``git archive``; or REF is a directory holding an ``nhcheck`` package,
for a machine without the history) beside this tree's, each with modules of its own, and times its load
the same way (``nhcheck_before``, ``nhcheck_before_decided``), so one run gives before/after on the same
machine, page cache and GPU. ``--only`` keeps the named contenders (the ceiling always runs).

GB/s is the checkpoint's data bytes over the wall time, for all of them; every ratio is printed,
and for every nhcheck contender its phases (medians): the report's ``timings``, the transfer's
split (``readers.STATS``: reader sums over threads; ``plan_at``, when the plan reached the
readers; ``cut``, the ops cut into the reads' rows at the handover; ``compile``, that plus deciding
each read's byte ranges before it is placed (ahead of its landing where the main thread would wait);
``place``, the main thread's placement; ``place_wait``, its waits for reads) and the check phase's
(``run.PHASES``, where the tree has it).
``--cold`` adds one run of each after dropping the page cache (``echo 3 > /proc/sys/vm/drop_caches``,
root only). ``--cap`` loads once more in a process capped with
``torch.cuda.set_per_process_memory_fraction`` to the parameters plus the staging area (plus a
fixed 256 MB for the checks' temporaries), with the default 1 GB staging and with 64 MB.
``--contention`` times the main thread's work before the plan (headers, audit, plan, the ops cut into
the reads' pieces) alone, beside N threads of this process looping on ``os.preadv`` of the shards, and beside
N such threads in another process (N = half the threads, then all): what ``readers.EARLY_SHARE`` weighs; each at
the switch interval a load sets (``readers.SWITCH_INTERVAL``) and at Python's default 5 ms.
``--fresh`` times whole processes, as a user starts them (round-robin, every other round reversed, wall time,
``--reps`` each): CUDA's start alone (``torch.empty(1, device=...)``; on the CPU torch's import, and no ring),
the same plus pinning each tree's default host ring (its one-time cost, which the in-process figures above pay once, in
their warm-up), ``safetensors.torch.load_file`` of every shard, and each tree's ``python -m nhcheck load DIR`` (the
CLI: imports, CUDA start, the ring, the load and its checks, the report); with ``--cold`` also the last two
from shards dropped from the page cache (``POSIX_FADV_DONTNEED``, the libraries left cached: a checkpoint
the machine has not read lately).
``--side`` times the checks' side-thread work of a load alone, for each tree (minima of ``--reps``; one torch
thread and the cyclic GC off, as in a load): the read-back's file samples, the noting of every installment (its
writes and read-back samples, ``checks.Bookkeeping.add``) and the gathering of its outcomes by load key
(``ByShard.gather_pending``), then the merge and the audit; and what of it follows the last installment's handover.
On a GPU host this work runs beside the transfer and shares its interpreter, so less of it is what a release-size
load waits on after its last byte; it needs no GPU to measure (docs/performance.md).
A loader whose package is missing is reported as such, not timed. Figures: README's performance table (the latest),
docs/performance.md (all).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import pkgutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

import generate  # noqa: E402

import nhcheck  # noqa: E402
from nhcheck.dtypes import ITEMSIZE  # noqa: E402
from nhcheck.fileio import usable_cores  # noqa: E402

ENGINE = "sglang@0.5.23"
PIECE = 16 << 20


def _ours(name: str) -> bool:
    return name == "nhcheck" or name.startswith("nhcheck.")


class Tree:
    """One nhcheck tree's modules, imported side by side with the others in this process.

    Every module of the tree is imported up front from ``root`` (None: this checkout) into module
    objects of its own; ``active`` puts them in ``sys.modules`` for the length of a call, so the
    imports nhcheck makes inside functions resolve to the same tree. Each tree keeps its own pinned
    ring and streams: the trees share the process, the GPU and the page cache, and nothing else.
    """

    def __init__(self, label: str, root: str | None) -> None:
        self.label = label
        if root is None:
            self.mods = self._import_all()
        else:
            saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _ours(k)}
            sys.path.insert(0, root)
            try:
                self.mods = self._import_all()
            finally:
                sys.path.remove(root)
                for k in [k for k in sys.modules if _ours(k)]:
                    del sys.modules[k]
                sys.modules.update(saved)
            got = os.path.realpath(self.mods["nhcheck"].__file__ or "")
            if not got.startswith(os.path.realpath(root) + os.sep):
                raise SystemExit(f"--before: imported nhcheck from {got}, not from {root}")
        self.load: ModuleType = self.mods["nhcheck.load"]
        self.readers: ModuleType = self.mods["nhcheck.load.readers"]
        self.run: ModuleType = self.mods["nhcheck.load.run"]
        self.pipeline: ModuleType = self.mods["nhcheck.pipeline"]

    @staticmethod
    def _import_all() -> dict[str, ModuleType]:
        pkg = importlib.import_module("nhcheck")
        for m in pkgutil.walk_packages(pkg.__path__, "nhcheck."):
            try:
                importlib.import_module(m.name)
            except Exception:  # noqa: BLE001 - a module needing what this machine lacks is not the load's
                pass
        return {k: v for k, v in sys.modules.items() if _ours(k)}

    @contextmanager
    def active(self) -> Iterator[None]:
        saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _ours(k)}
        sys.modules.update(self.mods)
        try:
            yield
        finally:
            for k in [k for k in sys.modules if _ours(k)]:
                del sys.modules[k]
            sys.modules.update(saved)

    def options(self, **kw):
        return self.load.LoadOptions(**kw)


def export_tree(ref: str, dest: str) -> str:
    """``ref``'s ``nhcheck/`` unpacked into ``dest`` (``git archive``), or ``ref`` itself when it is a
    directory holding an ``nhcheck`` package (a machine without the git history: export it beforehand)."""
    if os.path.isdir(os.path.join(ref, "nhcheck")):
        return os.path.abspath(ref)
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "nhcheck"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


def build(out: Path, shards: int, experts: int = 16) -> None:
    """The scaled Nano-3 NVFP4 layout, real (generated) bytes, written with examples/generate.py."""
    fixtures = REPO / "examples" / "fixtures" / "nano3-nvfp4"
    config = json.loads((fixtures / "config.json").read_text())
    quant = json.loads((fixtures / "hf_quant_config.json").read_text())
    config.update(n_routed_experts=experts, moe_intermediate_size=928, vocab_size=65536)
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


#: ``--fresh --cold``: a process started with the shards' pages dropped (``drop_shards``).
COLD_SHARDS = " (shards cold)"


def drop_shards(files: list[Path]) -> None:
    """Drop the shards' pages from the page cache (``POSIX_FADV_DONTNEED``: clean pages go; no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_nhcheck(tree: Tree, root: Path, opts, audit=None) -> tuple[float, dict]:
    """End to end from the path; or, given ``audit``, the load proper (decisions made before the clock)."""
    with tree.active():
        t = time.perf_counter()
        res = tree.load.load_path(str(root), ENGINE, opts) if audit is None else tree.load.load_audited(audit, opts)
        dt = time.perf_counter() - t
    r = res.report
    if r.verdict != "clean":
        raise SystemExit(f"{tree.label} load is not clean on the bench checkpoint: {r.verdict}: {r.findings[:3]}")
    info = {
        "seconds": dt,
        "bytes_loaded": r.bytes_loaded,
        "bytes_read": r.bytes_read,
        "timings": r.timings,
        "peak_device_bytes": r.peak_device_bytes,
        "samples_checked": r.samples_checked,
        "param_bytes": sum(p.numel * ITEMSIZE[p.param.dtype] for p in r.params),
        "transfer": dict(tree.readers.STATS),
        "checks": dict(getattr(tree.run, "PHASES", {})),
        "tensors_loaded": r.tensors_loaded,
    }
    del res
    return dt, info


#: nhcheck variants timed beside the default in the same run: suffix -> (a ``readers`` switch, its value for
#: the run, whether it needs CUDA).
VARIANTS = {
    # the staged byte ranges through tensor views and ``_foreach_copy_`` (the path before the driver copies)
    "_views": ("DRIVER_COPIES", False, True),
    # one driver copy per staged byte range instead of one kernel launch per staged read
    "_perrange": ("KERNEL", False, True),
    # every reader thread reading before the plan arrives (as before ``EARLY_SHARE``)
    "_allearly": ("EARLY_SHARE", 1.0, False),
    # a quarter of them: less memory traffic beside the main thread's parsing while the staging area fills
    "_quarterearly": ("EARLY_SHARE", 0.25, False),
    # the interpreter's switch interval at 1 ms instead of 0.2 ms: fewer forced handovers to the reader threads
    "_switch1ms": ("SWITCH_INTERVAL", 1e-3, False),
    # Python's 5 ms until the plan is handed over (the main thread's Python then pays for each forced handover),
    # the load's 0.2 ms after it
    "_switchlate": ("EARLY_SWITCH_INTERVAL", 5e-3, False),
}


def run_variant(tree: Tree, root: Path, opts, switch: str, value) -> tuple[float, dict]:
    """nhcheck end to end with ``tree.readers.<switch>`` set to ``value`` for the run (then restored)."""
    before = getattr(tree.readers, switch)
    setattr(tree.readers, switch, value)
    try:
        return run_nhcheck(tree, root, opts)
    finally:
        setattr(tree.readers, switch, before)


def contenders(args, files, device, trees: list[Tree], ceiling) -> dict:
    """Every loader that can run here, as name -> callable returning (seconds, nhcheck's phases or None);
    the missing ones said once. ``--only`` keeps the named ones."""
    wanted = set(args.only.split(",")) if args.only else None

    def keep(name: str) -> bool:
        return wanted is None or name in wanted

    out: dict = {}
    if keep("safetensors"):
        out["safetensors"] = lambda: (run_safetensors(files, device), None)
    out["ceiling"] = lambda: (ceiling.run(), None)  # every ratio is against it
    for tree in trees:
        ring = {"pinned_bytes": args.pinned_mb << 20} if args.pinned_mb else {}
        opts = tree.options(device=str(device), threads=args.threads, **ring)
        name = "nhcheck" + tree.label
        variants = (
            ["", "_decided", *VARIANTS]
            + [f"_pinned{mb}" for mb in args.also_pinned_mb]
            + [f"_lanes{n}" for n in args.also_lanes]
            + [f"_staging{mb}" for mb in args.also_staging_mb]
        )
        if not any(keep(name + v) for v in variants):
            continue
        # warm-up: the pinned ring this tree keeps, its streams, the allocator's cache
        run_nhcheck(tree, args.dir, opts)
        with tree.active():
            decided = tree.pipeline.audit_path(str(args.dir), ENGINE)
        run_nhcheck(tree, args.dir, opts, decided)
        if keep(name):
            out[name] = lambda tree=tree, opts=opts: run_nhcheck(tree, args.dir, opts)
        if keep(name + "_decided"):
            out[name + "_decided"] = lambda tree=tree, opts=opts, d=decided: run_nhcheck(tree, args.dir, opts, d)
        for suffix, (switch, value, cuda_only) in VARIANTS.items():
            if keep(name + suffix) and hasattr(tree.readers, switch) and (device.type == "cuda" or not cuda_only):
                out[name + suffix] = lambda tree=tree, opts=opts, sw=switch, v=value: run_variant(
                    tree, args.dir, opts, sw, v
                )
        sized = [(f"_pinned{mb}", {"pinned_bytes": mb << 20}) for mb in args.also_pinned_mb] + [
            (f"_staging{mb}", {"staging_bytes": mb << 20, **ring}) for mb in args.also_staging_mb
        ]
        for suffix, size in sized:  # a larger (or smaller) host ring or device staging area
            more = tree.options(device=str(device), threads=args.threads, **size)
            if keep(name + suffix):
                run_nhcheck(tree, args.dir, more)
                out[name + suffix] = lambda tree=tree, more=more: run_nhcheck(tree, args.dir, more)
        for n in args.also_lanes:  # n reader threads, pieces of the ring's size over n: a ring slot each
            more = tree.options(device=str(device), threads=n, chunk_bytes=opts.pinned_bytes // n)
            if keep(f"{name}_lanes{n}"):
                run_nhcheck(tree, args.dir, more)
                out[f"{name}_lanes{n}"] = lambda tree=tree, more=more: run_nhcheck(tree, args.dir, more)
    for name, fn in (
        ("fastsafetensors", lambda: run_fastsafetensors(files, device, args.threads, False)),
        ("fastsafetensors_cached", lambda: run_fastsafetensors(files, device, args.threads, False, True)),
        ("fastsafetensors_gds", lambda: run_fastsafetensors(files, device, args.threads, True)),
        ("runai_streamer", lambda: run_runai(files, device)),
    ):
        if not keep(name):
            continue
        try:
            fn()  # warm-up, and the proof it runs here
            out[name] = lambda fn=fn: (fn(), None)
        except Exception as exc:  # noqa: BLE001 - an absent package or GDS is a line in the output, not a crash
            print(f"{name}: not timed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
    return out


_SPINNER = r"""
import os, sys, threading
nth, piece, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
jobs = [(f, o) for f in files for o in range(0, os.path.getsize(f), piece)]
def spin(k):
    view = memoryview(bytearray(piece))
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    while True:
        f, o = jobs[k % len(jobs)]
        os.preadv(fds[f], [view], o)
        k += nth
for k in range(nth):
    threading.Thread(target=spin, args=(k,), daemon=True).start()
sys.stdin.read()
"""


def _pre_plan(root: Path) -> float:
    """The main thread's work before the readers learn the plan, as ``load_path`` does it: headers, audit,
    plan, the ops cut into the reads' rows (arenas on the meta device: no allocation)."""
    from nhcheck import pipeline
    from nhcheck.audit import AuditOptions
    from nhcheck.checkpoint import open_local
    from nhcheck.load import readers
    from nhcheck.load.memory import Arenas
    from nhcheck.load.plan import plan_load

    t = time.perf_counter()
    ckpt = open_local(str(root))
    audit = pipeline.audit(pipeline.prepare(ckpt, ENGINE), AuditOptions(compare_versions=False, recipe=False))
    plan = plan_load(audit)
    arenas = Arenas(plan.params, torch.device("meta"), torch)
    spans = readers.spans_of(ckpt.shards)
    reads = readers.plan_reads(spans, 64 << 20)
    of_shard: list[list[int]] = [[] for _ in spans]
    for j, r in enumerate(reads):
        of_shard[r.shard].append(j)
    readers.cut_plan(plan.ops, spans, reads, of_shard, arenas.where)
    return time.perf_counter() - t


def contention(args, files: list[Path], reps: int = 15) -> dict[str, float]:
    """Median seconds of ``_pre_plan`` alone, beside N reader threads here, beside N in a child process; each
    at the switch interval a load sets (``readers.SWITCH_INTERVAL``) and at Python's default 5 ms."""
    import ctypes

    from nhcheck.load import readers

    def median() -> float:
        gc.collect()
        gc.disable()
        try:
            return statistics.median(_pre_plan(args.dir) for _ in range(reps))
        finally:
            gc.enable()

    for _ in range(3):
        _pre_plan(args.dir)  # imports, caches
    out: dict[str, float] = {}
    pinned = args.device.startswith("cuda")
    jobs = [(str(f), o) for f in files for o in range(0, f.stat().st_size, PIECE)]

    def spin(k: int, n: int, stop: threading.Event) -> None:
        buf = torch.empty(PIECE, dtype=torch.uint8, pin_memory=pinned)
        view = memoryview((ctypes.c_char * PIECE).from_address(buf.data_ptr())).cast("B")
        fds = {f: os.open(f, os.O_RDONLY) for f in {f for f, _ in jobs}}
        while not stop.is_set():
            f, o = jobs[k % len(jobs)]
            os.preadv(fds[f], [view], o)
            k += n
        for fd in fds.values():
            os.close(fd)

    default = sys.getswitchinterval()
    try:
        for interval in (readers.SWITCH_INTERVAL, 5e-3):
            sys.setswitchinterval(interval)
            at = f"switch {interval * 1e3:g} ms"
            out[f"alone, {at}"] = median()
            for n in sorted({max(1, args.threads // 2), args.threads}):
                stop = threading.Event()
                with ThreadPoolExecutor(n) as pool:
                    for k in range(n):
                        pool.submit(spin, k, n, stop)
                    time.sleep(0.3)
                    out[f"beside {n} threads here, {at}"] = median()
                    stop.set()
                cmd = [sys.executable, "-c", _SPINNER, str(n), str(PIECE), *map(str, files)]
                with subprocess.Popen(cmd, stdin=subprocess.PIPE) as child:
                    time.sleep(0.5)
                    out[f"beside {n} threads in a child process, {at}"] = median()
                    child.kill()
    finally:
        sys.setswitchinterval(default)
    return out


def _side_once(tree: Tree, root: Path, samples: int) -> dict[str, float] | None:
    """One load's side-thread work, alone (``--side``), in seconds per step; None where the tree has no such split
    (a plan not handed over a shard at a time, or no ``checks.Bookkeeping``)."""
    m = tree.mods
    checks, plan = m["nhcheck.load.checks"], m["nhcheck.load.plan"]
    if not hasattr(checks, "Bookkeeping") or not hasattr(plan, "ByShard"):
        return None
    with tree.active():
        ckpt = m["nhcheck.checkpoint"].open_local(str(root))
        inputs = tree.pipeline.prepare(ckpt, ENGINE)
        if not plan.ByShard.eligible(inputs):
            return None
        plans = plan.ByShard(inputs)
        params, ops, upto = plans.first()
        installments = [ops]
        while upto is not None:  # the main thread's work: not timed
            ops, upto = plans.next()
            installments.append(ops)
        t = time.perf_counter()
        files = checks.file_samples(ckpt.shards, samples)
        out = {"files": time.perf_counter() - t, "note": 0.0, "gather": 0.0}
        books = checks.Bookkeeping(params, lambda: files)
        for ops in installments:
            t = time.perf_counter()
            books.add(ops)
            t1 = time.perf_counter()
            plans.gather_pending()
            t2 = time.perf_counter()
            out["note"] += t1 - t
            out["gather"] += t2 - t1
        out["last installment"] = t2 - t
        t = time.perf_counter()
        books.result()
        t1 = time.perf_counter()
        plans.result()
        out["merge"], out["audit"] = t1 - t, time.perf_counter() - t1
    out["after the last handover"] = out["last installment"] + out["merge"] + out["audit"]
    return out


def side(args, trees: list[Tree]) -> dict[str, dict[str, float]]:
    """``--side``: per tree, the minimum over ``--reps`` of each step of ``_side_once``, the trees interleaved."""
    samples = trees[0].load.LoadOptions().samples
    best: dict[str, dict[str, float]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.disable()
    try:
        for _ in range(max(1, args.reps)):
            for tree in trees:
                got = _side_once(tree, args.dir, samples)
                if got is None:
                    continue
                mine = best.setdefault(f"nhcheck{tree.label}", {})
                for k, v in got.items():
                    mine[k] = min(mine.get(k, v), v)
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    return best


def capped(args, tree: Tree, device: torch.device, staging: int) -> dict:
    """Load in a process whose allocator may hold only the parameters + ``staging`` + 256 MB."""
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    probe = run_nhcheck(tree, args.dir, tree.options(device=str(device), threads=args.threads))[1]
    params = probe["param_bytes"]
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device)  # the CUDA context's own use is outside the allocator
    limit = params + staging + (256 << 20)
    torch.cuda.set_per_process_memory_fraction((held + limit) / total, device)
    try:
        opts = tree.options(device=str(device), threads=args.threads, staging_bytes=staging)
        dt, info = run_nhcheck(tree, args.dir, opts)
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


_FRESH = {
    "cuda start": "import torch; torch.empty(1, device={dev!r}); {sync}",
    "safetensors.load_file": (
        "import sys, torch; from safetensors.torch import load_file; "
        "[load_file(f, device={dev!r}) for f in sys.argv[1:]]; {sync}"
    ),
}
#: ``_FRESH``'s first process on the CPU: the import alone
_TORCH_START = "torch import"
#: the tree's own pinned ring, as its first load makes it (the default size)
_RING = (
    "import torch; torch.empty(1, device={dev!r}); torch.cuda.synchronize(); "
    "from nhcheck.load import readers; from nhcheck.load.options import LoadOptions; "
    "readers._host_ring(torch, LoadOptions().pinned_bytes, True, *([torch.device({dev!r})] if {new} else []))"
)


def fresh(args, files: list[Path], device: torch.device, trees: list[Tree]) -> dict[str, list[float]]:
    """Wall seconds of whole processes (``--fresh``), round-robin (every other round reversed): each name's runs.
    Each tree's ring and CLI run from that tree (in its directory, which ``-c`` and ``-m`` put first on the path)."""
    cuda = device.type == "cuda"
    sync = "torch.cuda.synchronize()" if cuda else "pass"
    cmds = {
        name if cuda or name != "cuda start" else _TORCH_START: (
            [sys.executable, "-c", code.format(dev=str(device), sync=sync), *(str(f.resolve()) for f in files)],
            None,
        )
        for name, code in _FRESH.items()
    }
    for tree in trees:
        root = os.path.dirname(os.path.dirname(tree.mods["nhcheck"].__file__ or ""))
        if cuda:
            new = "device" in inspect.signature(tree.readers._host_ring).parameters
            cmds["cuda start + pinned ring" + tree.label] = (
                [sys.executable, "-c", _RING.format(dev=str(device), new=new)],
                root,
            )
        cmds["nhcheck load (CLI)" + tree.label] = (
            [sys.executable, "-m", "nhcheck", "load", str(args.dir.resolve()), "--engine", ENGINE,
             "--device", str(device), "--format", "json", "-o", os.devnull, "-q"],
            root,
        )  # fmt: skip
    if args.cold:  # the same from shards out of the page cache (the libraries stay cached)
        cmds.update({k + COLD_SHARDS: v for k, v in cmds.items() if k.startswith(("safetensors", "nhcheck load"))})
    runs: dict[str, list[float]] = {k: [] for k in cmds}
    forward = list(cmds.items())
    for rep in range(args.reps):
        # every other round in reverse order: on the 2-core dev VM (2026-12-06) two trees read 0.80x in a fixed
        # order, the one run second the faster, and 1.04x the other way when 4 pairs were alternated by hand
        for name, (cmd, root) in forward if rep % 2 == 0 else forward[::-1]:
            if name.endswith(COLD_SHARDS):
                drop_shards(files)
            path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
            t = time.perf_counter()
            env = dict(os.environ, PYTHONPATH=path)
            done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)  # cwd: first on sys.path
            runs[name].append(time.perf_counter() - t)
            if done.returncode:
                raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return runs


def _median(infos: list[dict], key: str) -> dict[str, float]:
    """The median of each figure under ``key`` over the runs (a figure a run lacks counts as 0)."""
    names = list(dict.fromkeys(k for i in infos for k in i.get(key, {})))
    return {k: statistics.median(i.get(key, {}).get(k, 0.0) for i in infos) for k in names}


def print_phases(name: str, infos: list[dict]) -> None:
    """Where one nhcheck contender's time went, as medians over its runs."""
    line = ", ".join(f"{k} {v:.3f}" for k, v in _median(infos, "timings").items())
    print(f"{name} phases (median s; the reads run from the start, under headers, audit and plan): {line}")
    line = ", ".join(f"{k} {v:.3f}" for k, v in _median(infos, "transfer").items())
    print(
        f"{name} transfer (median s; reader sums over threads, then the main thread's work and moments "
        f"since the reads began: plan_at = the plan reached the readers): {line}"
    )
    if any(i.get("checks") for i in infos):
        print(f"{name} checks (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in _median(infos, "checks").items()))
    last = infos[-1]
    print(
        f"{name} peak device memory {last['peak_device_bytes']} for {last['param_bytes']:,} bytes of parameters, "
        f"read {last['bytes_read']:,} bytes, loaded {last['bytes_loaded']:,} in {last['tensors_loaded']:,} "
        f"tensors, {last['samples_checked']:,} elements read back"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nhcheck-bench-nano-like"))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument(
        "--experts",
        type=int,
        default=16,
        help="routed experts per MoE layer when building --dir (128, the release's: 24k tensors, 10.4 GB)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=min(16, usable_cores()))  # as the load's default
    ap.add_argument(
        "--pinned-mb", type=int, default=None, help="nhcheck's pinned host ring (default: each tree's LoadOptions')"
    )
    ap.add_argument(
        "--also-pinned-mb",
        type=int,
        nargs="*",
        default=[],
        metavar="MB",
        help="also time each nhcheck tree with this pinned ring (contenders nhcheck_pinnedMB, nhcheck_before_pinnedMB)",
    )
    ap.add_argument(
        "--also-staging-mb",
        type=int,
        nargs="*",
        default=[],
        metavar="MB",
        help="also time each nhcheck tree with this device staging area (contenders nhcheck_stagingMB): how much "
        "of the reads a larger one lets run ahead of the plan",
    )
    ap.add_argument(
        "--also-lanes",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also time each nhcheck tree with N reader threads, each a ring slot (pieces of ring / N bytes): "
        "contenders nhcheck_lanesN. Pick N with slots that divide 64 MB (32 for the 1 GB ring): other slots "
        "re-register the ring whenever contenders alternate (0.17 s on the next load, 2026-12-06)",
    )
    ap.add_argument(
        "--before",
        metavar="REF",
        default=None,
        help="also time git REF's nhcheck (git archive; or a directory holding an nhcheck/ package) in this "
        "process: contenders nhcheck_before, nhcheck_before_decided",
    )
    ap.add_argument(
        "--only",
        default=None,
        metavar="NAMES",
        help="comma-separated contenders to time (the ceiling always is), e.g. "
        "safetensors,nhcheck,nhcheck_decided,nhcheck_before,nhcheck_before_decided",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="Also one run of each after dropping the page cache (with --fresh: the CLIs from cold shards too).",
    )
    ap.add_argument("--cap", action="store_true", help="Also load under a memory cap of parameters + staging.")
    ap.add_argument("--sweep", action="store_true", help="Also time nhcheck with other thread/piece settings.")
    ap.add_argument(
        "--contention", action="store_true", help="Also time the pre-plan work alone and beside reader threads."
    )
    ap.add_argument(
        "--side", action="store_true", help="Also time a load's side-thread work alone (no GPU needed), per tree."
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="Also time whole processes: CUDA's start (or torch's import), the ring, the CLI.",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    os.environ.setdefault("RUNAI_STREAMER_CONCURRENCY", str(args.threads))
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not shard_files(args.dir):
        t = time.perf_counter()
        build(args.dir, args.shards, args.experts)
        print(f"built {args.dir} in {time.perf_counter() - t:.1f} s", flush=True)
    files = shard_files(args.dir)
    data = sum(f.stat().st_size for f in files)
    warm_cache(files)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ours = Tree("", None)
    trees = [ours]
    work = tempfile.TemporaryDirectory(prefix="nhcheck-bench-before-")
    if args.before:
        trees.append(Tree("_before", export_tree(args.before, work.name)))
    print(
        f"device {device} ({card}); {os.cpu_count()} CPU cores ({usable_cores()} usable); torch {torch.__version__}; "
        f"{len(files)} shards, {data / 1e9:.2f} GB; nhcheck from {os.path.dirname(nhcheck.__file__ or '')}"
        + (f", nhcheck_before = {args.before} from {trees[1].mods['nhcheck'].__file__}" if args.before else ""),
        flush=True,
    )

    ceiling = Ceiling(files, device, args.threads)
    # warm-up: CUDA context, kernels; each nhcheck tree warms its own ring and streams in contenders()
    run_safetensors(files[:1], device)
    ceiling.run()
    loaders = contenders(args, files, device, trees, ceiling)

    # The CLI runs with the cyclic GC off (nhcheck.cli.main); so do all of them here.
    gc.collect()
    gc.disable()
    runs: dict[str, list[float]] = {k: [] for k in loaders}
    infos: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        for name, fn in loaders.items():
            dt, info = fn()
            runs[name].append(dt)
            if info is not None:
                infos.setdefault(name, []).append(info)
        print(
            f"rep {rep + 1}: " + "  ".join(f"{k} {data / v[-1] / 1e9:.2f}" for k, v in runs.items()) + " GB/s",
            flush=True,
        )
    gc.enable()

    cold: dict[str, float] = {}
    if args.cold:
        for name, fn in loaders.items():
            if name.endswith("_decided"):
                continue  # its audit read the headers before the clock: not a cold start
            if not drop_page_cache():
                print("cold: /proc/sys/vm/drop_caches is not writable here; no cold figures", flush=True)
                break
            cold[name] = fn()[0]
        warm_cache(files)

    sweep = {}
    if args.sweep:
        # Fewer readers than cores too: the main thread and the checks' side thread run beside them
        grid = [(t, c, 1024) for t in (8, args.threads) for c in (32, 64, 128)] + [
            (2 * args.threads, 32, 1024),
            (args.threads, 64, 512),
            (args.threads, 64, 2048),
            *((t, 64, 1024) for t in (args.threads - 4, args.threads - 2) if t > 8),
            (args.threads, 64, 1024),
        ]
        for threads, chunk_mb, pinned_mb in grid:
            o = ours.options(
                device=str(device), threads=threads, chunk_bytes=chunk_mb << 20, pinned_bytes=pinned_mb << 20
            )
            run_nhcheck(ours, args.dir, o)
            key = f"threads={threads} piece={chunk_mb}MB pinned={pinned_mb}MB"
            sweep[key] = statistics.median(run_nhcheck(ours, args.dir, o)[0] for _ in range(3))
            print(f"sweep {key}: {data / sweep[key] / 1e9:.2f} GB/s", flush=True)

    contended = {}
    if args.contention:
        contended = contention(args, files)
        alone = min(contended.values())
        for k, v in contended.items():
            print(f"pre-plan work {k}: {v * 1e3:.1f} ms = {v / alone:.2f}x the fastest", flush=True)

    sided = {}
    if args.side:
        sided = side(args, trees)
        for name, steps in sided.items():
            print(f"{name} side thread alone (min ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in steps.items()))
        if len(sided) == 2 and "nhcheck_before" in sided:
            side_ours, side_before = sided["nhcheck"], sided["nhcheck_before"]
            print(
                "ratio side thread nhcheck/nhcheck_before: "
                + ", ".join(f"{k} {side_ours[k] / side_before[k]:.2f}x" for k in side_ours if side_before.get(k)),
                flush=True,
            )

    fresh_runs: dict[str, list[float]] = {}
    if args.fresh:
        fresh_runs = fresh(args, files, device, trees)
        med = {k: statistics.median(v) for k, v in fresh_runs.items()}
        print("whole processes (median wall s of the runs, as a user starts them):", flush=True)
        for k, v in fresh_runs.items():
            print(f"  {k:36s} {med[k]:7.3f} s   runs " + " ".join(f"{x:.3f}" for x in v), flush=True)
        start, st = med.get("cuda start", med.get(_TORCH_START, 0.0)), med["safetensors.load_file"]
        for tree in trees:
            cli = med["nhcheck load (CLI)" + tree.label]
            ring = med.get("cuda start + pinned ring" + tree.label)
            pin = "" if ring is None else f"pinning its default ring, once per process: {ring - start:.3f} s; "
            print(
                f"  nhcheck{tree.label}: {pin}safetensors.load_file / its CLI = {st / cli:.2f}x, "
                f"beyond the {'CUDA' if ring is not None else 'torch'} start {(st - start) / (cli - start):.2f}x",
                flush=True,
            )
            if args.cold:
                cold_cli = med["nhcheck load (CLI)" + tree.label + COLD_SHARDS]
                print(
                    f"  nhcheck{tree.label}, shards cold: safetensors.load_file / its CLI = "
                    f"{med['safetensors.load_file' + COLD_SHARDS] / cold_cli:.2f}x",
                    flush=True,
                )
        for suffix in ("", COLD_SHARDS) if args.cold else ("",):
            if len(trees) > 1:
                a, b = (med["nhcheck load (CLI)" + t.label + suffix] for t in trees[:2])
                print(f"  CLI{suffix}: nhcheck{trees[1].label} / nhcheck = {b / a:.2f}x the time", flush=True)

    caps = []
    if args.cap and device.type == "cuda":
        del ceiling, loaders  # the ceiling's whole-shard device buffers would count against the cap
        for st in (1 << 30, 64 << 20):
            try:
                caps.append(capped(args, ours, device, st))
            except Exception as exc:  # noqa: BLE001 - reported, the figures above still print
                print(f"capped run with staging {st:,}: {type(exc).__name__}: {exc}", flush=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    gbs = {k: data / v / 1e9 for k, v in med.items()}
    print()
    print(f"{'loader (warm cache)':<24} {'median s':>9} {'GB/s':>7} {'x ceiling':>9}   per run GB/s")
    for k, v in runs.items():
        print(
            f"{k:<24} {med[k]:9.3f} {gbs[k]:7.2f} {gbs[k] / gbs['ceiling']:9.2f}   "
            + " ".join(f"{data / x / 1e9:.2f}" for x in v)
        )
    for name, mine in infos.items():
        print_phases(name, mine)
    ns = [k for k in gbs if k.startswith("nhcheck")]
    for k in ns:
        for other in gbs:
            if other not in ns:
                print(f"ratio {k}/{other} = {gbs[k] / gbs[other]:.2f}x")
    for k in ("nhcheck", "nhcheck_decided"):
        if args.before and k in gbs and k.replace("nhcheck", "nhcheck_before") in gbs:
            b = k.replace("nhcheck", "nhcheck_before")
            print(f"ratio {k}/{b} = {gbs[k] / gbs[b]:.2f}x (this tree over --before {args.before}, same run)")
    for k in gbs:
        if k not in ns and k != "ceiling":
            print(f"ratio {k}/ceiling = {gbs[k] / gbs['ceiling']:.2f}x")
    if cold:
        print("cold page cache (dropped before each run: echo 3 > /proc/sys/vm/drop_caches), one run each:")
        for k, v in cold.items():
            print(f"  {k:<24} {v:9.3f} s {data / v / 1e9:7.2f} GB/s {cold['ceiling'] / v:5.2f}x cold ceiling")
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
                    "before": args.before,
                    "runs": runs,
                    "median_s": med,
                    "gb_per_s": gbs,
                    "nhcheck": infos,
                    "cold_s": cold,
                    "contention_s": contended,
                    "side_s": sided,
                    "fresh_s": fresh_runs,
                    "capped": caps,
                    "sweep": sweep,
                },
                indent=1,
            )
        )
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
