#!/usr/bin/env python3
"""Benchmark ``nhcheck prune`` against ``cp -r`` (and ``cp -r`` + ``sha256sum``) of the same checkpoint.

Standalone: needs only nhcheck's base install (no torch) and writes its own input, a ~2 GiB
synthetic Nemotron-H NVFP4 checkpoint (random bytes, not holes) with the PR #24434 defect (the
experts of two MoE layers exported as BF16 but still carrying their NVFP4 scales), so prune
rewrites the two shards that hold them and copies the other two whole. Then, in the same run,
each round times, in a rotated order (on a shared machine the position in a round matters):

- ``cp -r``: the baseline (page cache only: cp neither fsyncs nor checks anything; on a file system
  with reflinks, XFS or btrfs, coreutils 9's cp clones the extents instead of copying bytes, and no
  copy that writes and reads back its bytes can come near it: use ext4, or read the durable rows);
- ``cp -r && sync``: the same copy made durable, as prune's is (prune fsyncs every file);
- ``cp -r + sha256sum``: a copy and the sha256 of each copied shard (what a careful user runs to get
  digests of a copy; sha256sum reads the copy back from the page cache);
- ``sha256 of the shards (hashlib)``: sha256 of every byte alone (prune hashes only the copies it cannot
  take from the Hub's records with sha256, and the rewrites with BLAKE3);
- ``nhcheck prune`` (verified, the default) and ``nhcheck prune --no-verify``;
- ``nhcheck prune --dry-run``: the start-up, audit and plan prune runs before it writes anything (a fixed
  cost that does not grow with the bytes; the re-audit of the output adds less than the audit);
- unless ``--no-hub-cache``, the same checkpoint laid out as the Hugging Face cache lays out a download
  (blobs named by their sha256, the snapshot's files symlinks into them; hard links, no extra disk):
  ``cp -rL`` of the snapshot and ``nhcheck prune`` of it, where the kept shards' sha256 is the blob's name
  (what ``nhcheck prune org/name`` works on);
- with ``--before REF`` (e.g. ``main``) or ``--compare DIR``, another version's prune (and ``--no-verify``,
  and of the snapshot) in the same rounds: before/after figures from one run.

Medians over the rounds, the ratio of each to ``cp -r`` and to ``cp -r + sha256sum``, CPU seconds
(the steadier measure on a shared machine) and peak RSS (GNU ``time``, else ``wait4``). Outputs
are deleted and synced between runs so one run's writeback does not bill the next. The machine
(cores, ``uptime`` before and after) is printed with the figures, then one JSON line.

    python bench/prune.py                 # ~2 GiB, 4 shards, 3 rounds (medians of 3)
    python bench/prune.py --gib 4 --shards 1 --reps 5 --dir /work/tmp
    python bench/prune.py --compare ../nhcheck-main   # also time another checkout's prune, same rounds
    python bench/prune.py --before main   # main's prune (a git archive of it) too, in the same rounds
    python bench/prune.py --gib 8 --before main   # fixed costs (audit, re-audit) matter less at real sizes
    python bench/prune.py --write-paths   # also: durable copies by O_DIRECT / buffered / copy_file_range writes,
                                          # and by O_DIRECT writes each read back (the disk work "verified" needs)

Targets: verified prune ≤ 1.25 × cp -r; peak RSS ≤ 100 MB at any shard size.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "examples")]  # this checkout's nhcheck and its example generator

import generate  # noqa: E402

from nhcheck.safetensors_header import read_shard  # noqa: E402

ENGINE = "sglang@0.5.11"


def build(out: Path, gib: float, shards: int) -> int:
    """Write the synthetic checkpoint (real random-looking data, not holes); returns its data bytes."""
    c = generate.nano3_tiny_config(quantized=True)
    c.update(hidden_size=1024, n_routed_experts=32)
    target = gib * 2**30
    mi = 256
    for _ in range(8):  # expert bytes dominate and scale linearly with the intermediate size
        c["moe_intermediate_size"] = mi
        tensors = generate.nano3_leftover_expert_scale_tensors(config=c)
        total = sum(generate.tensor_nbytes(d, s) for _, d, s in tensors)
        mi = max(64, int(mi * target / total) // 64 * 64)
    q = generate.nano3_tiny_quant(generate.EXPERTS_EXCLUDED_LAYERS)
    generate.write_checkpoint(
        str(out),
        tensors,
        c,
        q,
        shards=shards,
        sparse=True,
        extra_files={"tokenizer_config.json": "{}\n", "generation_config.json": "{}\n"},
    )
    block = os.urandom(16 << 20)
    for p in sorted(out.glob("*.safetensors")):
        h = read_shard(str(p))
        with open(p, "r+b") as f:
            f.seek(h.data_start)
            left = h.file_size - h.data_start
            while left:
                n = f.write(block[: min(left, len(block))])
                left -= n
    os.sync()
    return total


def hub_cache(src: Path, base: Path) -> Path:
    """``src`` laid out as the Hugging Face cache does, by hard links: ``blobs/<sha256>`` (the name an LFS file's
    blob has there; a small file's is its git sha1 there, and is not used as a digest), and the snapshot's files
    as relative symlinks into ``blobs/``. Returns the snapshot directory."""
    import hashlib

    repo = base / "models--bench--nemotron-h"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        h = hashlib.sha256() if p.suffix == ".safetensors" else hashlib.sha1(b"blob %d\0" % p.stat().st_size)
        with open(p, "rb", buffering=0) as f:
            while b := f.read(4 << 20):
                h.update(b)
        blob = repo / "blobs" / h.hexdigest()
        if not blob.exists():  # equal files share one blob, as in the cache
            os.link(p, blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    return snap


def archive(ref: str, dest: Path) -> Path:
    """The tree of git ``ref`` of this repository (``git archive``: no worktree, no checkout touched)."""
    dest.mkdir()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "nhcheck"], capture_output=True, check=False)
    if tar.returncode != 0:
        raise SystemExit(f"git archive {ref}: {tar.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)
    return dest


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system, the child and what it waited for) and peak RSS (bytes).

    On a shared machine the wall time swings with the neighbours' disk and CPU load; the CPU time
    is the steadier measure of the work each command does.

    Peak RSS comes from GNU time when present: ``wait4`` on a child forked from this
    interpreter also counts the pages it inherited before exec.
    """
    gnu_time = os.path.exists("/usr/bin/time")
    full = ["/usr/bin/time", "-f", "%M"] + cmd if gnu_time else cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): {err.strip()}")
    peak_kb = int(err.strip().splitlines()[-1]) if gnu_time else usage.ru_maxrss
    return wall, usage.ru_utime + usage.ru_stime, peak_kb * 1024


def uptime() -> str:
    """``uptime``'s line (the load averages), else the load averages alone."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


#: Hash files given on the command line, 4 MiB at a time (hashlib.file_digest needs Python 3.11).
HASH_FILES = (
    "import hashlib, sys\n"
    "for p in sys.argv[1:]:\n"
    "    h = hashlib.sha256()\n"
    "    with open(p, 'rb', buffering=0) as f:\n"
    "        while b := f.read(4 << 20):\n"
    "            h.update(b)\n"
)


def _copy_direct(src: str, dst: str, read_back: bool = False) -> None:
    """Prune's write path: 4 MiB page-aligned windows read into user space, written with O_DIRECT. With
    ``read_back``, each window is then read back from the file with O_DIRECT (from the device, not a cache) and
    compared: the least disk work a verified copy does (every byte written, then read), with none of prune's other
    work, its floor here."""
    import mmap

    win = 4 << 20
    buf, back = mmap.mmap(-1, win), mmap.mmap(-1, win)
    size = os.path.getsize(src)
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0), 0o644)
    r = os.open(dst, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) if read_back else -1
    try:
        for off in range(0, size, win):
            n = os.preadv(s, [buf], off)
            aligned = memoryview(buf)[: -(-n // 4096) * 4096]
            os.pwrite(d, aligned, off)
            if read_back:
                os.preadv(r, [memoryview(back)[: len(aligned)]], off)
                if back[:n] != buf[:n]:
                    raise SystemExit(f"{dst}: read-back differs at {off}")
        os.ftruncate(d, size)
        os.fsync(d)
    finally:
        for fd in (s, d, r):
            if fd >= 0:
                os.close(fd)


def _copy_buffered(src: str, dst: str) -> None:
    """The same windows written through the page cache, then fsync."""
    with open(src, "rb", buffering=0) as f, open(dst, "xb", buffering=0) as g:
        while b := f.read(4 << 20):
            g.write(b)
        os.fsync(g.fileno())


def _copy_kernel(src: str, dst: str) -> None:
    """``copy_file_range`` (the bytes never reach user space: nothing to hash or compare), then fsync."""
    size = os.path.getsize(src)
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < size:
            done += os.copy_file_range(s, d, size - done, done, done)
        os.fsync(d)
    finally:
        os.close(s)
        os.close(d)


def _into(cmd: list[str], *extra: str) -> Callable[[Path], list[str]]:
    """``cmd`` with the output directory, then ``extra``, as a command of the rounds."""
    return lambda out: [*cmd, str(out), *extra]


def write_paths(shards: list[str], work: Path, reps: int) -> list[dict[str, Any]]:
    """Durable copies of the shards, one file after another, by each write path prune could take;
    rotated rounds, medians, ratio to O_DIRECT (what prune uses)."""
    paths: dict[str, Callable[[str, str], None]] = {
        "O_DIRECT writes + fsync": _copy_direct,
        "O_DIRECT writes, read back + fsync": functools.partial(_copy_direct, read_back=True),
        "buffered writes + fsync": _copy_buffered,
    }
    if hasattr(os, "copy_file_range"):
        paths["copy_file_range + fsync"] = _copy_kernel
    times: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            out = work / "paths"
            out.mkdir()
            t0 = time.perf_counter()
            for p in shards:
                paths[name](p, str(out / os.path.basename(p)))
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(out)
            os.sync()
    base = statistics.median(times["O_DIRECT writes + fsync"])
    return [
        {
            "write path": k,
            "median_s": round(statistics.median(v), 3),
            "ratio_vs_o_direct": round(statistics.median(v) / base, 2),
            "runs_s": [round(t, 3) for t in v],
        }
        for k, v in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    ap.add_argument("--shards", type=int, default=4, help="number of shards (default 4)")
    ap.add_argument("--reps", type=int, default=3, help="rounds; every figure is the median over them (default 3)")
    ap.add_argument("--dir", default=None, help="work directory (default: a new one under the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument(
        "--compare",
        metavar="DIR",
        default=None,
        help="another nhcheck source tree (e.g. a worktree of main): its prune is timed in the same rounds",
    )
    ap.add_argument(
        "--before",
        metavar="REF",
        default=None,
        help="a git ref of this repository (e.g. main): its prune (a git archive of it) is timed in the same rounds",
    )
    ap.add_argument(
        "--no-hub-cache",
        dest="hub_cache",
        action="store_false",
        help="skip cp -rL and prune of the checkpoint laid out as a Hugging Face cache snapshot",
    )
    ap.add_argument(
        "--write-paths",
        action="store_true",
        help="also time durable copies of the shards by O_DIRECT, buffered and copy_file_range writes, and by O_DIRECT "
        "writes each read back with O_DIRECT (the disk work a verified copy needs, nothing else)",
    )
    args = ap.parse_args(argv)
    if args.reps < 1 or args.shards < 1 or args.gib <= 0:
        ap.error("--reps and --shards must be at least 1, --gib positive")

    work = Path(tempfile.mkdtemp(prefix="nhcheck-bench-", dir=args.dir))
    try:
        free = shutil.disk_usage(work).free
        need = int(args.gib * 2**30 * 2.2) + (1 << 30)
        if free < need:
            print(
                f"not enough free disk in {work}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed "
                "(source + one output + 1 GiB to spare); use --gib or --dir",
                file=sys.stderr,
            )
            return 2
        src = work / "src"
        t0 = time.perf_counter()
        data = build(src, args.gib, args.shards)
        print(
            f"built {data / 2**30:.2f} GiB in {args.shards} shard(s) at {src} ({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
        shards = [str(p) for p in sorted(src.glob("*.safetensors"))]
        snap = hub_cache(src, work / "hub") if args.hub_cache else None

        def nhcheck_in(tree: Path, source: Path = src) -> list[str]:
            """``nhcheck prune`` imported from ``tree`` (``-m`` puts the working directory first on sys.path)."""
            run = [sys.executable, "-m", "nhcheck", "prune", str(source), "--engine", ENGINE, "-q"]
            return ["sh", "-c", 'cd "$0" && exec "$@"', str(tree), *run, "--out"]

        copy_and_hash = (
            'cp -r "$0" "$1" && sha256sum -- "$1"/*.safetensors >/dev/null'
            if shutil.which("sha256sum")
            else 'cp -r "$0" "$1" && exec "$2" -c "$3" "$1"/*.safetensors'  # no coreutils sha256sum: hashlib
        )
        prune = nhcheck_in(REPO)
        commands: dict[str, Callable[[Path], list[str]]] = {
            "cp -r": lambda out: ["cp", "-r", str(src), str(out)],
            "cp -r && sync": lambda out: ["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(out)],
            "cp -r + sha256sum": lambda out: [
                "sh",
                "-c",
                copy_and_hash,
                str(src),
                str(out),
                sys.executable,
                HASH_FILES,
            ],
            "sha256 of the shards (hashlib)": lambda out: [sys.executable, "-c", HASH_FILES, *shards],
            "nhcheck prune --dry-run": _into(prune, "--dry-run"),
            "nhcheck prune": _into(prune),
            "nhcheck prune --no-verify": _into(prune, "--no-verify"),
        }
        others = []
        if args.compare:
            others.append((Path(args.compare).resolve().name, Path(args.compare).resolve()))
        if args.before:
            others.append((args.before, archive(args.before, work / "before")))
        for label, other in others:
            theirs = nhcheck_in(other)
            commands[f"{label}: prune"] = _into(theirs)
            commands[f"{label}: prune --no-verify"] = _into(theirs, "--no-verify")
        if snap is not None:
            commands["hub cache: cp -rL"] = lambda out: ["cp", "-rL", str(snap), str(out)]
            ours = nhcheck_in(REPO, snap)
            commands["hub cache: nhcheck prune"] = _into(ours)
            for label, other in others:
                theirs = nhcheck_in(other, snap)
                commands[f"hub cache: {label}: prune"] = _into(theirs)
        times: dict[str, list[float]] = {k: [] for k in commands}
        rss: dict[str, list[int]] = {k: [] for k in commands}
        cpu: dict[str, list[float]] = {k: [] for k in commands}
        blake3_ok = subprocess.run([sys.executable, "-c", "import blake3"], capture_output=True).returncode == 0
        up_before = uptime()
        load_before = os.getloadavg()
        names = list(commands)
        for rep in range(args.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                make = commands[name]
                out = work / "out"
                wall, used, peak = timed(make(out))
                times[name].append(wall)
                cpu[name].append(used)
                rss[name].append(peak)
                shutil.rmtree(out, ignore_errors=True)  # the hashing alone writes nothing
                os.sync()
        paths = write_paths(shards, work, args.reps) if args.write_paths else []
        up_after = uptime()
        base = statistics.median(times["cp -r"])
        base_hub = statistics.median(times["hub cache: cp -rL"]) if snap is not None else base
        base_sha = statistics.median(times["cp -r + sha256sum"])
        base_cpu = statistics.median(cpu["cp -r"])
        rows: list[dict[str, Any]] = []
        for name in commands:
            med = statistics.median(times[name])
            rows.append(
                {
                    "command": name,
                    "median_s": round(med, 3),
                    "runs_s": [round(t, 3) for t in times[name]],
                    "ratio_vs_cp": round(med / base, 2),
                    "ratio_vs_cp_rL": round(med / base_hub, 2) if name.startswith("hub cache: ") else None,
                    "ratio_vs_cp_sha256sum": round(med / base_sha, 2),
                    "cpu_s": round(statistics.median(cpu[name]), 3),
                    "cpu_ratio_vs_cp": round(statistics.median(cpu[name]) / base_cpu, 2),
                    "peak_rss_mb": round(max(rss[name]) / 1e6, 1),
                }
            )
        print(
            f"{data / 2**30:.2f} GiB, {args.shards} shard(s), medians of {args.reps} round(s); "
            f"{os.cpu_count()} CPUs; work dir on {work}; blake3 {'importable' if blake3_ok else 'NOT importable'} here"
        )
        print("× cp: the ratio to the copy of the same source (cp -r; for 'hub cache:' rows cp -rL of the snapshot)")
        print(
            f"{'command':40} {'median s':>9} {'× cp':>6} {'× cp+sha':>9} {'CPU s':>6} {'CPU × cp':>9}"
            f" {'peak RSS MB':>12}  runs"
        )
        for r in rows:
            ratio = r["ratio_vs_cp_rL"] if r["ratio_vs_cp_rL"] is not None else r["ratio_vs_cp"]
            print(
                f"{r['command']:40} {r['median_s']:9.2f} {ratio:6.2f} {r['ratio_vs_cp_sha256sum']:9.2f} "
                f"{r['cpu_s']:6.2f} {r['cpu_ratio_vs_cp']:9.2f} {r['peak_rss_mb']:12.1f}  "
                + ", ".join(f"{t:.2f}" for t in r["runs_s"])
            )
        for r in paths:
            print(
                f"{r['write path']:40} {r['median_s']:9.2f} {r['median_s'] / base:6.2f}  "
                f"× O_DIRECT {r['ratio_vs_o_direct']:.2f}  " + ", ".join(f"{t:.2f}" for t in r["runs_s"])
            )
        print(f"uptime before: {up_before}")
        print(f"uptime after:  {up_after}")
        machine = {
            "cpus": os.cpu_count(),
            "uptime_before": up_before,
            "uptime_after": up_after,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }
        print(
            json.dumps(
                {
                    "gib": round(data / 2**30, 3),
                    "blake3": blake3_ok,
                    "shards": args.shards,
                    "reps": args.reps,
                    "machine": machine,
                    "rows": rows,
                    "write_paths": paths,
                }
            )
        )
        return 0
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
