"""How close is `nhcheck audit` to the cost of just parsing the shard headers?

Builds the full-size Nano-3 NVFP4 (24,147 tensors) and Super-120B NVFP4 (165,860 tensors)
layouts as sparse files (headers real, data holes: no disk used), then in the same run,
round-robin, several repetitions each (whole processes, wall time):

  baseline  a bare Python process that reads every shard header and json-parses it;
  json      `python -m nhcheck audit DIR --format json -o FILE -q`;
  table     `python -m nhcheck audit DIR -q` (stdout to a pipe: plain rows);
  summary   the json command without `-q`, as a script runs it: its summary line on stderr (a pipe);
  floor     `python -c pass` and `python -m nhcheck --version` (interpreter, and imports), and the inputs
            floor: a process that imports what `audit` imports and decodes every file `audit` must read (each
            header into typed entries with msgspec, as nhcheck does, and the index, config.json and
            hf_quant_config.json), then stops: no replay, no report. What no audit written this way can go
            below, whatever its pipeline after the decode.

With ``--workers 4,16``, also the floor of a parallel design: worker processes that each own a run of shards from
the header to the JSON rows and hand back no per-tensor record (``WORKERS``; a lower bound, checked to write the
audit's very rows).

With ``--before REF`` the same two audit commands also run from a copy of git REF's tree
(``git archive``), so one run gives before/after figures for the same machine and load.

Prints, for each, the minimum wall time (the least disturbed repetition) with the median, and the
minimum CPU time (user + system of the process, which a shared machine disturbs least); every ratio
against the baseline of the same run (target <= 1.5x), of the minima and of the medians; and the load
average before and after. Every tree is run with its bytecode compiled, as an installed nhcheck is.
Also times the expert-mapping replay indexed (what nhcheck does) against SGLang's literal scan
over E x 3 tuples per name, on a slice of the Super names.

With ``--stages``, also where an audit's time goes, in a fresh process (GC off, as the CLI runs): the CPU
seconds (user + system) and the minor page faults of each stage of ``audit`` on each layout in its first run
(a CLI process audits once: it maps its memory and fills its caches then), and the minimum of ``--reps`` runs,
beside the bare parse's work (``json.loads`` of every header) in the same process: open (headers, index,
configs and their cross-checks), prepare (config, recipe, manifest), replay, gather, the rest of the audit
(decisions, coverage, findings), and writing the JSON document and the table to a file.

Usage: python bench/audit.py [--reps 7] [--before REF] [--workdir DIR] [--keep] [--stages] [--workers N,...]
"""

from __future__ import annotations

import argparse
import json
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

from processes import timed, tree_env  # noqa: E402

BARE = r"""
import json, os, struct, sys
d = sys.argv[1]
for fn in sorted(os.listdir(d)):
    if fn.endswith(".safetensors"):
        with open(os.path.join(d, fn), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            json.loads(f.read(n))
"""

#: The inputs floor: ``audit``'s imports, and every file it reads decoded as fast as msgspec decodes it (the
#: headers into typed entries, without the Python loop that makes them tensor records), GC off as in ``audit``.
INPUTS = r"""
import gc, os, struct, sys
gc.disable()
import msgspec
import nhcheck.cli, nhcheck.pipeline
class Entry(msgspec.Struct, gc=False):
    dtype: str = ""
    shape: tuple[int, ...] | None = None
    data_offsets: tuple[int, int] | None = None
headers = msgspec.json.Decoder(dict[str, Entry]).decode
d = sys.argv[1]
for fn in sorted(os.listdir(d)):
    with open(os.path.join(d, fn), "rb") as f:
        if fn.endswith(".safetensors"):
            n = struct.unpack("<Q", f.read(8))[0]
            headers(f.read(n))
        elif fn.endswith(".json"):
            msgspec.json.decode(f.read())
os._exit(0)
"""


#: ``--workers``: the floor of an audit whose worker processes own their shards from the header to the JSON rows
#: (argv: DIR OUT W), the one parallel design that hands back no per-tensor record. The parent imports what
#: ``audit`` imports, reads the configs and the index and builds the manifest, then forks W workers over contiguous
#: runs of shards; each parses its headers, replays every name, gathers by load key, decides each key and writes its
#: rows to a file of its own, and hands back only its loads and the tensors that do not load. The parent merges
#: the loads into coverage and copies the rows into the document in the kernel. It leaves out the document's head,
#: the findings, the index cross-check and the recipe check: a lower bound of such a pipeline, not one.
WORKERS = r"""
import gc, json, os, pickle, sys
gc.disable()
import nhcheck.cli
from nhcheck import engines
from nhcheck.audit import Gatherer, TensorRecords, _coverage, load_decider
from nhcheck.checkpoint import load_json, read_config, read_quant_sidecar
from nhcheck.model import parse_config
from nhcheck.quant import parse_quant
from nhcheck.report import _json_pieces
from nhcheck.safetensors_header import read_shard
d, out, w = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = read_config(d)
shards = sorted(set(load_json(os.path.join(d, "model.safetensors.index.json"), "index")["weight_map"].values()))
engine = engines.get(None)
cfg = parse_config(config, d)
manifest = engine.build_manifest(cfg, parse_quant(config, read_quant_sidecar(d)), moe_backend=None, mtp=False, pp=None)
decide = load_decider(manifest, engine)
def work(mine, part):
    replay = engine.replayer(manifest, cfg, mtp=False, pp=None)
    tensors = [t for s in mine for t in read_shard(os.path.join(d, s), s).tensors]
    outcomes = [replay(t[0]) for t in tensors]
    g = Gatherer()
    g.add(tensors, outcomes, [o[1] for o in outcomes])
    odd = g.unloaded + [i for key, at in g.keys.items() if any(decide(key)) for i in at]
    rows = b"".join(_json_pieces(b"", TensorRecords(tensors, outcomes, {}), b""))
    with open(part, "wb") as f:
        f.write(rows)
    return pickle.dumps((len(rows), dict(g.loads), [(tensors[i], outcomes[i]) for i in odd]))
pipes = []
for k in range(w):
    r, wr = os.pipe()
    if os.fork() == 0:
        os.close(r)
        with os.fdopen(wr, "wb") as f:
            f.write(work(shards[len(shards) * k // w : len(shards) * (k + 1) // w], f"{out}.{k}"))
        os._exit(0)
    os.close(wr)
    pipes.append(r)
results = []
for r in pipes:
    with os.fdopen(r, "rb") as f:
        results.append(pickle.loads(f.read()))
for _ in pipes:
    os.wait()  # reaped, so that the workers' CPU time counts in this process's
loads = {}
for _, part, _ in results:
    for param, where in part.items():
        loads.setdefault(param, set()).update(where)
params = json.dumps([s.name for s in _coverage(manifest, loads)])
with open(out, "wb") as f:
    f.write(b'{"tensors":[')
    f.flush()
    sep = b""
    for k, (size, _, _) in enumerate(results):
        if size:
            f.write(sep)
            f.flush()
            sep = b","
            with open(f"{out}.{k}", "rb") as part:
                while size:
                    size -= os.copy_file_range(part.fileno(), f.fileno(), size)
        os.unlink(f"{out}.{k}")
    f.write(b'],"params":' + params.encode() + b"}\n")
os._exit(0)
"""


#: ``--stages``: where an audit's time goes, in a fresh process (argv: DIR REPS WORK). The CPU seconds (user +
#: system) and the minor page faults of each stage: the first run, as a CLI process audits, and the minimum of the
#: runs (memory already mapped, caches filled), GC off as in ``cli.main``.
STAGES = r"""
import gc, json, os, resource, struct, sys
gc.disable()
from nhcheck import audit, pipeline, report
from nhcheck.checkpoint import open_local
from nhcheck.report import format as formats
d, reps, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = {}
def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt
def lap(stage, since):
    now = usage()
    runs.setdefault(stage, []).append((now[0] - since[0], now[1] - since[1]))
    return now
for _ in range(reps):
    t = usage()
    ckpt = open_local(d)
    t = lap("open: headers, index, configs, cross-checks", t)
    inputs = pipeline.prepare(ckpt)
    t = lap("prepare: config, recipe, manifest", t)
    opts = audit.AuditOptions()
    replayed = audit.replay_tensors(ckpt, inputs.config, inputs.manifest, inputs.engine, opts)
    t = lap("replay: one outcome per tensor", t)
    gathered = audit.gather(replayed)
    t = lap("gather: tensors by load key", t)
    rep = audit.run_audit(ckpt, inputs.config, inputs.quant, inputs.manifest, inputs.engine, opts, replayed=gathered)
    t = lap("audit: decisions, coverage, findings", t)
    formats.get("json", os.path.join(work, "stages.json")).write(report.audit_renderer(), rep)
    t = lap("write the JSON document", t)
    formats.get("table", os.path.join(work, "stages.txt")).write(report.audit_renderer(), rep)
    t = lap("write the table", t)
    del ckpt, inputs, replayed, gathered, rep
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            with open(os.path.join(d, fn), "rb") as f:
                json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    lap("(the bare parse's work: json.loads of every header)", t)
for stage, got in runs.items():
    print(f"{os.path.basename(d)}: stage {stage:<52} cpu first run {got[0][0]:.3f} s ({got[0][1]:,} page faults), "
          f"min {min(c for c, _ in got):.3f} s")
os._exit(0)
"""


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


def _export(ref: str, dest: str) -> str:
    """The tree of git ``ref`` unpacked into ``dest`` (only ``nhcheck/`` is needed to run it); ``ref`` itself
    when it is a directory holding an ``nhcheck`` package (a machine without this repository's history)."""
    if os.path.isdir(os.path.join(ref, "nhcheck")):
        return os.path.abspath(ref)
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "nhcheck"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--before", default=None, metavar="REF", help="also time git REF's nhcheck, or a directory holding one"
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--stages", action="store_true", help="also the CPU time of each stage of an audit, in-process")
    ap.add_argument(
        "--workers",
        default="",
        metavar="N,...",
        help="also time the shard-owning workers floor with N worker processes (each N of the list)",
    )
    args = ap.parse_args()
    import generate  # examples/generate.py

    work = args.workdir or tempfile.mkdtemp(prefix="nhcheck-bench-audit-")
    out_json = os.path.join(work, "audit.json")
    py = sys.executable
    try:
        layouts = generate.full_layouts()
        load = os.getloadavg()
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load average {load[0]:.2f} {load[1]:.2f}")
        trees = {"": tree_env(ROOT)}
        if args.before:
            trees[f" (before: {args.before})"] = tree_env(_export(args.before, os.path.join(work, "before")))
        for name in ("nano3-nvfp4", "super-nvfp4"):
            d = os.path.join(work, name)
            if not os.path.isdir(d):
                totals = layouts[name](d)
                print(
                    f"{name}: generated {totals['tensors']:,} tensors, {totals['bytes']:,} bytes (sparse), "
                    f"{totals['shards']} shards"
                )
            cmds: dict[str, tuple[list[str], dict[str, str] | None]] = {
                "baseline (parse headers only)": ([py, "-c", BARE, d], None),
                "python -c pass": ([py, "-c", "pass"], None),
                "nhcheck --version": ([py, "-m", "nhcheck", "--version"], trees[""]),
                "inputs floor (imports + decode every input)": ([py, "-c", INPUTS, d], trees[""]),
            }
            out_workers = os.path.join(work, "workers.json")
            for n in filter(None, args.workers.split(",")):
                cmds[f"workers floor ({int(n)} workers)"] = ([py, "-c", WORKERS, d, out_workers, n], trees[""])
            for label, env in trees.items():
                cmds["audit --format json" + label] = (
                    [py, "-m", "nhcheck", "audit", d, "--format", "json", "-o", out_json, "-q"],
                    env,
                )
                cmds["audit (table)" + label] = ([py, "-m", "nhcheck", "audit", d, "-q"], env)
                cmds["audit --format json, summary line" + label] = (
                    [py, "-m", "nhcheck", "audit", d, "--format", "json", "-o", out_json],
                    env,
                )
            for cmd, run_env in cmds.values():
                timed(cmd, run_env, work)  # warm the page cache and the bytecode caches
            wall: dict[str, list[float]] = {k: [] for k in cmds}
            cpu: dict[str, list[float]] = {k: [] for k in cmds}
            for _ in range(args.reps):
                for k, (cmd, run_env) in cmds.items():
                    w, c = timed(cmd, run_env, work)
                    wall[k].append(w)
                    cpu[k].append(c)
            base = "baseline (parse headers only)"
            base_wall, base_cpu = min(wall[base]), min(cpu[base])
            med_wall, med_cpu = statistics.median(wall[base]), statistics.median(cpu[base])
            for k in cmds:
                print(
                    f"{name}: {k:<44} wall min {min(wall[k]):.3f} s (median {statistics.median(wall[k]):.3f}) "
                    f"ratio {min(wall[k]) / base_wall:.2f}x (of medians {statistics.median(wall[k]) / med_wall:.2f}x) "
                    f"| cpu min {min(cpu[k]):.3f} s ratio {min(cpu[k]) / base_cpu:.2f}x (of medians "
                    f"{statistics.median(cpu[k]) / med_cpu:.2f}x)"
                    + ("  (target <= 1.5x)" if k.startswith("audit") else "")
                )
            if args.workers:  # the floor wrote every row the audit wrote, in the same order
                with open(out_json, "rb") as a, open(out_workers, "rb") as b:
                    if json.load(a)["tensors"] != json.load(b)["tensors"]:
                        raise SystemExit("the workers floor's rows differ from the audit's")
            if args.stages:
                stages = subprocess.run([py, "-c", STAGES, d, str(args.reps), work], env=trees[""], cwd=work)
                if stages.returncode:
                    raise SystemExit("--stages failed")
            if args.before:
                for fmt in ("audit --format json", "audit (table)", "audit --format json, summary line"):
                    b = fmt + f" (before: {args.before})"
                    print(
                        f"{name}: {fmt}: after / before wall {min(wall[fmt]) / min(wall[b]):.2f} "
                        f"({min(wall[b]):.3f} s -> {min(wall[fmt]):.3f} s), cpu {min(cpu[fmt]) / min(cpu[b]):.2f} "
                        f"({min(cpu[b]):.3f} s -> {min(cpu[fmt]):.3f} s)"
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
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f} {load[1]:.2f}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
