#!/usr/bin/env python3
"""Group SGLang releases by their goldens and summarise what changes between adjacent groups.

    python3 oracle/sglang/epoch_diff.py [--extra-roots DIR:DIR] [--markdown OUT.md]

Reads tests/conformance/sglang-epochs.json (made by make_goldens.py) for the per-release digests,
and the golden files themselves (tests/conformance/<case>/expected-sglang-<X>.json, or under an
--extra-roots directory for releases whose goldens are not committed) for the diffs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter, OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_goldens as MG  # noqa: E402


def load_goldens(release, roots):
    out = {}
    for root in roots:
        for case, _, gdir in MG.discover_cases(root):
            p = MG.golden_path(gdir, release)
            if case not in out and os.path.exists(p):
                with open(p) as f:
                    out[case] = json.load(f)
    return out


def generalise(name: str) -> str:
    """Collapse layer / expert indices so a diff reads as a rule, not 2000 lines."""
    return re.sub(r"\.(\d+)\.", ".N.", re.sub(r"\.(\d+)\.", ".N.", name))


def diff_case(a: dict, b: dict) -> list[str]:
    """What changes from golden a (older) to golden b (newer), in a few lines."""
    lines = []
    if a["crash"] != b["crash"]:
        lines.append(f"crash: {short(a['crash'])} -> {short(b['crash'])}")
    ma, mb = a["manifest"], b["manifest"]
    for k in ("moe_runner_backend", "quantization"):
        if ma[k] != mb[k]:
            lines.append(f"manifest {k}: {ma[k]} -> {mb[k]}")
    pa = {p["name"]: p for p in ma["params"]}
    pb = {p["name"]: p for p in mb["params"]}
    gone = Counter(generalise(n) for n in pa if n not in pb)
    new = Counter(generalise(n) for n in pb if n not in pa)
    if gone:
        lines.append("params removed: " + fmt_counter(gone))
    if new:
        lines.append("params added: " + fmt_counter(new))
    chg = Counter()
    for n in pa:
        if n in pb and pa[n] != pb[n]:
            what = [f"{k} {pa[n][k]}->{pb[n][k]}" for k in ("shape", "dtype", "quant_method")
                    if pa[n][k] != pb[n][k]]
            chg[f"{generalise(n)}: {', '.join(what)}"] += 1
    if chg:
        lines.append("params changed: " + fmt_counter(chg))
    ta, tb = a["tensors"], b["tensors"]
    oc = Counter()
    for n in ta.keys() | tb.keys():
        x, y = ta.get(n), tb.get(n)
        if x == y:
            continue
        if x is None or y is None:
            oc[f"{generalise(n)}: {'absent' if x is None else x['outcome']} -> "
               f"{'absent' if y is None else y['outcome']}"] += 1
            continue
        if x["outcome"] != y["outcome"]:
            oc[f"{generalise(n)}: {x['outcome']} -> {y['outcome']}"] += 1
        else:
            fields = [k for k in ("param", "shard_id", "expert_id", "engine_name", "message")
                      if x[k] != y[k]]
            oc[f"{generalise(n)}: {x['outcome']}, {'/'.join(fields)} "
               f"{short(generalise(str(x[fields[0]])))} -> {short(generalise(str(y[fields[0]])))}"] += 1
    if oc:
        lines.append("tensors: " + fmt_counter(oc))
    wa, wb = set(a["params_without_tensor"]), set(b["params_without_tensor"])
    if wa != wb:
        g1 = Counter(generalise(n) for n in wb - wa)
        g2 = Counter(generalise(n) for n in wa - wb)
        if g1:
            lines.append("params_without_tensor +: " + fmt_counter(g1))
        if g2:
            lines.append("params_without_tensor -: " + fmt_counter(g2))
    if a["params_partially_filled"] != b["params_partially_filled"]:
        lines.append(f"params_partially_filled: {short(a['params_partially_filled'])} -> "
                     f"{short(b['params_partially_filled'])}")
    return lines


def short(x, n=160):
    s = json.dumps(x) if not isinstance(x, str) else x
    return s if len(s) <= n else s[: n - 3] + "..."


def fmt_counter(c: Counter, k=6) -> str:
    items = c.most_common()
    s = "; ".join(f"{n} (x{v})" if v > 1 else n for n, v in items[:k])
    if len(items) > k:
        s += f"; ... {len(items) - k} more kinds"
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra-roots", default=os.environ.get("SGL_GOLDEN_EXTRA", ""))
    ap.add_argument("--key", default="digest", choices=["digest", "conformance_digest"],
                    help="group by the digest over all cases, or over tests/conformance cases only")
    ap.add_argument("--markdown", default=None, help="write the table (markdown) here instead of JSON")
    a = ap.parse_args(argv)
    roots = [MG.CONF] + [r for r in a.extra_roots.split(":") if r]
    with open(MG.EPOCHS_JSON) as f:
        epochs = json.load(f)
    rels = sorted(epochs, key=MG.vkey)
    if a.key == "digest":  # only releases run over every case: a digest over fewer cases differs anyway
        full = max(epochs[r].get("num_cases", 0) for r in rels)
        rels = [r for r in rels if epochs[r].get("num_cases", 0) == full]
    groups = []  # consecutive runs of the same digest
    for r in rels:
        d = epochs[r][a.key]
        if groups and groups[-1]["digest"] == d:
            groups[-1]["releases"].append(r)
        else:
            groups.append({"digest": d, "releases": [r]})
    # also: non-adjacent identical digests
    by_digest = OrderedDict()
    for r in rels:
        by_digest.setdefault(epochs[r][a.key], []).append(r)
    out = []
    prev = None
    for g in groups:
        rep = g["releases"][-1]
        entry = {"releases": g["releases"], "spec_epochs": sorted({epochs[r]["epoch"] for r in g["releases"]}),
                 "digest": g["digest"][:12], "identical_to": by_digest[g["digest"]], "diff_vs_previous": {}}
        if prev is not None:
            ga, gb = load_goldens(prev, roots), load_goldens(g["releases"][0], roots)
            for case in sorted(ga.keys() | gb.keys()):
                if case not in ga or case not in gb:
                    if a.key == "digest":
                        entry["diff_vs_previous"][case] = ["case missing in one release"]
                    continue
                d = diff_case(ga[case], gb[case])
                if d:
                    entry["diff_vs_previous"][case] = d
        out.append(entry)
        prev = rep
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(out, epochs))
    else:
        print(json.dumps(out, indent=1))
    return 0


def markdown(groups, epochs) -> str:
    L = ["| releases (identical goldens) | spec epoch(s) | digest | identical to (non-adjacent) | "
         "what differs from the previous group |", "|---|---|---|---|---|"]
    for g in groups:
        others = [r for r in g["identical_to"] if r not in g["releases"]]
        same = OrderedDict()  # identical diff text -> the cases showing it
        for case, lines in g["diff_vs_previous"].items():
            for ln in lines:
                same.setdefault(ln, []).append(case)
        diff = [f"**{', '.join(cases)}**: {ln}" for ln, cases in same.items()]
        cell = "<br>".join(diff) if diff else ("(first group)" if g is groups[0] else "—")
        L.append(f"| {', '.join(g['releases'])} | {', '.join(e or '?' for e in g['spec_epochs'])} | "
                 f"`{g['digest']}` | {', '.join(others) or '—'} | {cell.replace('|', '/')} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
