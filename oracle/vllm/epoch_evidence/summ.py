# Made the evidence tables of ../EPOCHS.md (run by hand; probe goldens expected in /work/gold/probes, see make_probes.py).
import json, sys, glob, os, collections
R = "/work/main/tests/conformance"
def load(case, v):
    p = f"{R}/{case}/expected-vllm-{v}.json"
    return json.load(open(p)) if os.path.exists(p) else None
cases = sorted([os.path.relpath(os.path.dirname(p), R) for p in glob.glob(f"{R}/*/checkpoint")] +
               [os.path.relpath(p, R) for p in glob.glob(f"{R}/examples/*")])
vs = sys.argv[1:]
for case in cases:
    print("==", case)
    prev = None
    for v in vs:
        g = load(case, v)
        if g is None: print("  ", v, "missing"); continue
        c = collections.Counter(t["outcome"] for t in g["tensors"].values())
        crash = g["crash"] and (str(g["crash"]["tensor"]) + " | " + g["crash"]["error"][:160])
        line = f"   {v}: {dict(sorted(c.items()))} params={len(g['manifest']['params']) if g['manifest'] else None} pwt={len(g['params_without_tensor'])} crash={crash}"
        if prev is not None:
            a, b = prev["tensors"], g["tensors"]
            diffs = [n for n in set(a) | set(b) if a.get(n) != b.get(n)]
            ma = {p["name"]: p for p in (prev["manifest"] or {}).get("params", [])}
            mb = {p["name"]: p for p in (g["manifest"] or {}).get("params", [])}
            line += f"\n        vs prev: {len(diffs)} tensor diffs; manifest +{len(set(mb)-set(ma))} -{len(set(ma)-set(mb))} changed={sum(1 for n in set(ma)&set(mb) if ma[n]!=mb[n])}; pwt_same={prev['params_without_tensor']==g['params_without_tensor']} crash_same={prev['crash']==g['crash']}"
            for n in sorted(diffs)[:3]:
                line += f"\n          {n}: {json.dumps(a.get(n))[:230]}\n             -> {json.dumps(b.get(n))[:230]}"
        print(line)
        prev = g
