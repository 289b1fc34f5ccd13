# Made the evidence tables of ../EPOCHS.md (run by hand; probe goldens expected in /work/gold/probes, see make_probes.py).
"""Group the releases that ran by identical goldens (conformance + examples + probes)."""
import json, glob, os, sys, hashlib, re
from packaging.version import Version
R = "/work/main/tests/conformance"; P = "/work/gold/probes"
files = {}
for p in glob.glob(f"{R}/*/expected-vllm-*.json") + glob.glob(f"{R}/examples/*/expected-vllm-*.json") + glob.glob(f"{P}/*.goldens/expected-vllm-*.json"):
    v = re.search(r"expected-vllm-(.*)\.json", p).group(1)
    case = os.path.relpath(os.path.dirname(p), R) if p.startswith(R) else os.path.basename(os.path.dirname(p))
    if case.startswith("startup_"): continue
    files.setdefault(v, {})[case] = p
def canon(g, level):
    g = dict(g); g.pop("engine"); g.pop("made_by")
    if level == "outcome":   # outcomes/params/crash tensor, not message texts nor quant_method names
        g["tensors"] = {n: (t["outcome"], t["param"], t["shard_id"], t["expert_id"]) for n, t in g["tensors"].items()}
        g["crash"] = g["crash"] and (g["crash"]["tensor"], g["crash"]["error"].split(":")[0])
        g["manifest"] = sorted(p["name"] for p in g["manifest"]["params"])
        g.pop("params_partially_filled", None)
    return hashlib.sha256(json.dumps(g, sort_keys=True).encode()).hexdigest()[:8]
vs = sorted(files, key=Version)
cases = sorted({c for v in vs for c in files[v]})
for level in ("outcome", "exact"):
    print(f"\n## grouping by {level}")
    prev = None; groups = []
    for v in vs:
        sig = tuple((c, canon(json.load(open(files[v][c])), level) if c in files[v] else None) for c in cases)
        missing = [c for c, s in sig if s is None]
        if prev is not None and all(a == b or a is None or b is None for (_, a), (_, b) in zip(prev, sig)):
            groups[-1].append(v)
        else:
            groups.append([v])
        prev = sig
        if missing: print(f"  {v}: missing {missing}")
    for g in groups: print("  ", " ".join(g))
