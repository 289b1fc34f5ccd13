# Made the evidence tables of ../EPOCHS.md (run by hand; probe goldens expected in /work/gold/probes, see make_probes.py).
import json, glob, os, re, subprocess
from packaging.version import Version
R = "/work/main/tests/conformance"
cases = ["startup_mixed_cfg_text", "startup_mixed_hfq_only", "startup_mixed_no_nvfp4", "startup_mixed_cfg_omni"]
tracked = set(subprocess.run(["git", "-C", "/work/main", "ls-files", *[f"tests/conformance/{c}" for c in cases]], capture_output=True, text=True).stdout.split())
vs = sorted({re.search(r"expected-vllm-(.*)\.json", p).group(1) for p in tracked if "expected-vllm-" in p}, key=Version, reverse=True)
def short(g):
    if g["crash"] and g["crash"]["tensor"] is None:
        e = g["crash"]["error"]
        for p in (r"Unknown ModelOpt quant algo: \w+", r"are not supported for now", r"[A-Za-z]+Error"):
            m = re.search(p, e)
            if m: return "refused: " + m.group(0)
    n = sum(1 for t in g["tensors"].values() if t["outcome"] == "load"); r = sum(1 for t in g["tensors"].values() if t["outcome"] == "raise")
    return f"{n} load" + (f", {r} raise" if r else "") + (f"; crash {g['crash']['error'].split(':')[0]}" if g["crash"] else "")
print("| release | " + " | ".join(cases) + " |"); print("|---" * (len(cases) + 1) + "|")
for v in vs:
    row = []
    for c in cases:
        p = f"{R}/{c}/expected-vllm-{v}.json"
        row.append(short(json.load(open(p))) if os.path.relpath(p, "/work/main") in tracked else "—")
    print(f"| {v} | " + " | ".join(row) + " |")
