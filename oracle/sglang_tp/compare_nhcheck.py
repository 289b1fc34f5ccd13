#!/usr/bin/env python3
"""Check nhcheck's TP rules (``nhcheck.tp.plan``) against the golden rank maps SGLang's real loaders produced.

    compare_nhcheck.py GOLDEN_DIR [--nhcheck PATH] [--json out.json] > report.md

For every case file ``<model>-<quant>-<backend>-tp<N>.json`` with a ``-tp1`` sibling:
  * nhcheck builds its SGLang manifest for the same config.json / hf_quant_config.json and backend
    (``build_manifest`` with the profile of the release, TP-1 shapes) and ``plan(manifest, cfg, N)``;
  * the TP-1 golden map says which checkpoint element every TP-1 parameter element holds;
  * nhcheck's claim for rank r is its ``Sharding.windows(r)`` applied to that TP-1 map (positions no window
    covers: zero-fill) — compared element by element with what SGLang's loaders put on rank r.
Outcomes per parameter: ``agree``; ``differs`` (nhcheck gives a sharding, SGLang's bytes are elsewhere);
``shape`` (local shapes differ); ``nhcheck-problem`` (nhcheck says this TP size fails or loads wrong weights,
listing its rule) while SGLang built and loaded it — with ``consistent`` true when SGLang's placement is a
plain partition of the TP-1 tensor (every TP-1 element on some rank, nothing else but zero fill).
No torch needed; numpy only. ``--nhcheck`` points at a directory holding the ``nhcheck`` package (default:
the repository's).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ckpt  # noqa: E402

ZERO = -1
UNTOUCHED = -2


class Keys:
    """Element keys: one int per (source tensor pattern, source coordinates)."""

    def __init__(self):
        self.ix: dict[str, int] = {}

    def pid(self, name: str) -> int:
        return self.ix.setdefault(name, len(self.ix))


def expand(boxes, shape, keys: Keys) -> np.ndarray:
    """Boxes -> int64 array of element keys (pattern id << 40 | flattened coords), ZERO/UNTOUCHED for fills."""
    arr = np.full(shape if shape else (1,), -3, dtype=np.int64)
    for b in boxes:
        sl = tuple(slice(a, z) for a, z in b["dst"])
        if "fill" in b:
            arr[sl] = ZERO if b["fill"] == "zero" else UNTOUCHED if b["fill"] == "untouched" else -3
            continue
        at = b["at"]
        mp = b.get("map") or list(range(len(b["dst"])))
        # coords of each src dim as a broadcast array over the dst box
        nd = len(b["dst"])
        lens = [z - a for a, z in b["dst"]]
        coords = []
        for sd in range(len(at)):
            c = np.full([1] * nd, at[sd], dtype=np.int64)
            for di, m in enumerate(mp):
                if m == sd:
                    shp = [1] * nd
                    shp[di] = lens[di]
                    c = c + np.arange(lens[di]).reshape(shp)
            coords.append(c)
        flat = np.zeros([1] * nd, dtype=np.int64)
        for c in coords:  # mixed radix 4096 per dim (tiny shapes)
            flat = flat * 4096 + c
        arr[sl] = (keys.pid(b["src"]) << 40) + np.broadcast_to(flat, lens)
    return arr.reshape(shape) if shape else arr


def nh_claim(tp1: np.ndarray, sh, local_shape, rank) -> np.ndarray:
    if sh.dim is None:
        return tp1.copy()
    out = np.full(local_shape, ZERO, dtype=np.int64)
    d = sh.dim
    for s, n, dst, _owner in sh.windows(rank):
        src_sl = [slice(None)] * tp1.ndim
        dst_sl = [slice(None)] * tp1.ndim
        src_sl[d] = slice(s, s + n)
        dst_sl[d] = slice(dst, dst + n)
        out[tuple(dst_sl)] = tp1[tuple(src_sl)]
    return out


def describe_diff(got: np.ndarray, want: np.ndarray) -> str:
    bad = np.argwhere(got != want)
    lo, hi = bad.min(0), bad.max(0) + 1
    return f"{len(bad)} of {got.size} elements differ within [{', '.join(f'{a}:{z}' for a, z in zip(lo, hi))}]"


PADDED = ("flashinfer_trtllm", "flashinfer_trtllm_routed")
#: (param suffix, dim along the intermediate size, intermediate elements per unit of that dim for NVFP4 / others)
PADDED_PARAMS = (("w13_weight", 1, 1, 1), ("w13_weight_scale", 1, 1, 1), ("w2_weight", 2, 2, 1),
                 ("w2_weight_scale", 2, 16, 1))


def check_padded_rule(doc) -> list[str]:
    """The padded-window rule of the issue, checked on one golden file: P = round_up(ceil(I / tp), 128); rank r's
    local extent is P (in units), its source window starts at r*P in every tensor of the expert alike and holds
    min(P, I - r*P) intermediates (none past I), the rest zero. Returns the violations ([] = rule holds)."""
    bad = []
    I = doc["config"]["moe_intermediate_size"]
    tp = doc["tp"]
    P = -(-(-(-I // tp)) // 128) * 128
    fp4 = doc["case"]["quant"] in ("nvfp4", "mixed")  # the experts are NVFP4 in both
    keys = Keys()
    for fam in doc["families"].values():
        for name, e in fam.items():
            for suffix, dim, u4, u in PADDED_PARAMS:
                if not name.endswith(".experts." + suffix):
                    continue
                if suffix.endswith("_scale") and e["dtype"] != "float8_e4m3fn":
                    continue  # per-tensor / per-expert float scales: no intermediate dim
                unit = u4 if e["dtype"] in ("uint8", "float8_e4m3fn") and fp4 else u
                if e["shape"][dim] * unit != P:
                    bad.append(f"{name}: local extent {e['shape'][dim]} x {unit} != P {P}")
                    continue
                for r, boxes in e["ranks"].items():
                    arr = expand(boxes, tuple(e["shape"]), keys)
                    line = np.moveaxis(arr, dim, -1)[(0,) * (arr.ndim - 1)]
                    start, n = int(r) * P // unit, max(0, min(P, I - int(r) * P)) // unit
                    b0 = next(b for b in boxes if "fill" not in b) if n else None
                    for j, v in enumerate(line.tolist()):
                        if j < n:
                            want_at = list(b0["at"])
                            want_at = [0] * len(want_at)
                            want_at[dim] = start + j
                            want = (keys.pid(b0["src"]) << 40) + int(np.ravel_multi_index(
                                want_at, [4096] * len(want_at)))
                            if v != want:
                                bad.append(f"{name} rank {r}: local {j} is not source {start + j}")
                                break
                        elif v != ZERO:
                            bad.append(f"{name} rank {r}: local {j} (past the window) is not zero")
                            break
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("golden")
    ap.add_argument("--nhcheck", default=os.path.abspath(os.path.join(HERE, "..", "..")))
    ap.add_argument("--json")
    ap.add_argument("--label", help="how to name the nhcheck version in the report (e.g. a commit)")
    a = ap.parse_args()
    sys.path.insert(0, a.nhcheck)
    from nhcheck import tp as T
    from nhcheck.engines.sglang import PROFILES
    from nhcheck.manifest import build_manifest
    from nhcheck.model import parse_config
    from nhcheck.quant import parse_quant

    files = sorted(glob.glob(os.path.join(a.golden, "*-tp[0-9]*.json")))
    results = []
    for f in files:
        m = re.match(r"(.+)-tp(\d+)\.json$", os.path.basename(f))
        stem, tp = m.group(1), int(m.group(2))
        if tp == 1:
            continue
        p1 = os.path.join(a.golden, f"{stem}-tp1.json")
        if not os.path.exists(p1):
            continue
        doc, doc1 = json.load(open(f)), json.load(open(p1))
        case = doc["case"]
        row = {"file": os.path.basename(f), "tp": tp, "case": case, "params": {}}
        results.append(row)
        ver = doc["sglang_version"]
        profile = PROFILES.get(ver)
        if profile is None:
            row["skipped"] = f"nhcheck has no sglang@{ver} profile"
            continue
        c = ckpt.config(case["model"])
        hq = ckpt.hf_quant_config(c, case["quant"])
        if hq is not None:
            c = dict(c, quantization_config=dict(quant_method="modelopt", **hq["quantization"],
                                                 ignore=hq["quantization"].get("exclude_modules", [])))
        cfg = parse_config(c)
        qc = parse_quant(c, hq)
        backend = doc1.get("moe_runner_backend") or case["moe_runner_backend_requested"]
        man = build_manifest(cfg, qc, profile, moe_backend=backend)
        shards = {s.param.name: s for s in T.plan(man, cfg, tp)}
        if "construct_error" not in doc and doc.get("moe_runner_backend") in PADDED:
            row["padded_rule_violations"] = check_padded_rule(doc)
        if "construct_error" in doc:
            row["sglang_refused"] = sorted(set(doc["construct_error"].values()))
            row["nhcheck_problems"] = sorted({f"{p.rule}: {p.detail}" for s in shards.values() for p in s.problems})
            continue
        keys = Keys()
        p1s = {n: e for fam in doc1["families"].values() for n, e in fam.items()}
        for fam, ps in doc["families"].items():
            for name, e in ps.items():
                s = shards.get(name)
                e1 = p1s.get(name)
                if s is None or e1 is None:
                    row["params"][name] = {"family": fam, "outcome": "not-in-nhcheck" if s is None else "no-tp1"}
                    continue
                tp1 = expand(e1["ranks"]["0"], tuple(e1["shape"]), keys)
                gots = {int(r): expand(bx, tuple(e.get("shape_per_rank", {}).get(r, e["shape"])), keys)
                        for r, bx in e["ranks"].items()}
                ent = {"family": fam}
                if s.sharding is None:
                    if not s.problems:
                        ent["outcome"] = "nhcheck-unreachable"
                    else:
                        ent["outcome"] = "nhcheck-problem"
                        ent["nhcheck"] = [f"{p.rule}: {p.detail}" for p in s.problems]
                        # is SGLang's placement a plain partition (each TP-1 element somewhere, rest zero)?
                        have = np.concatenate([g.reshape(-1) for g in gots.values()])
                        real = have[have >= 0]
                        want = tp1[tp1 >= 0].reshape(-1)
                        ent["consistent"] = bool(np.isin(want, real).all() and np.isin(real, want).all()
                                                 and not (have == UNTOUCHED).any())
                        ent["sglang_shape"] = e["shape"]
                    row["params"][name] = ent
                    continue
                lshape = s.sharding.local_shape(tuple(e1["shape"]))
                if tuple(lshape) != tuple(e["shape"]):
                    ent.update(outcome="shape", nhcheck_shape=list(lshape), sglang_shape=e["shape"])
                    row["params"][name] = ent
                    continue
                diffs = {}
                for r, got in gots.items():
                    want = nh_claim(tp1, s.sharding, tuple(lshape), r)
                    if got.shape != want.shape or (got != want).any():
                        diffs[r] = describe_diff(got, want) if got.shape == want.shape else "shape"
                if diffs:
                    ent.update(outcome="differs", ranks=diffs)
                else:
                    ent["outcome"] = "agree"
                row["params"][name] = ent
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    # markdown
    print("# nhcheck.tp vs SGLang's real loaders\n")
    print(f"Golden dir `{os.path.relpath(a.golden)}`.\n")
    tally: dict = {}
    for row in results:
        for n, ent in row["params"].items():
            tally[ent["outcome"]] = tally.get(ent["outcome"], 0) + 1
    print("Totals (parameter x case): " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())) + "\n")
    pr = [r for r in results if "padded_rule_violations" in r]
    print(f"Padded-window rule (P = round_up(ceil(I/tp), 128); rank r: source [r*P, min((r+1)*P, I)) in w13 rows, "
          f"w13 block-scale rows, w2 columns/bytes, w2 block-scale columns alike; zero to P) checked on {len(pr)} "
          f"padding-backend files: {sum(1 for r in pr if not r['padded_rule_violations'])} hold, violations: "
          f"{[(r['file'], r['padded_rule_violations'][:3]) for r in pr if r['padded_rule_violations']]}\n")
    print(f"nhcheck: {a.label or a.nhcheck}\n")
    for row in results:
        bad = {n: e for n, e in row["params"].items() if e["outcome"] != "agree"}
        if not bad and "sglang_refused" not in row and "skipped" not in row:
            continue
        print(f"## {row['file']}\n")
        if "skipped" in row:
            print(row["skipped"] + "\n")
            continue
        if "sglang_refused" in row:
            print(f"SGLang refused: {row['sglang_refused']}; nhcheck problems: {row['nhcheck_problems']}\n")
            continue
        for n, e in bad.items():
            extra = {k: v for k, v in e.items() if k not in ("family", "outcome")}
            print(f"- `{n}` **{e['outcome']}** {json.dumps(extra)}")
        print()


if __name__ == "__main__":
    main()
