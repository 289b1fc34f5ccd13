# Made the evidence tables of ../EPOCHS.md (run by hand; probe goldens expected in /work/gold/probes, see make_probes.py).
import json, glob, os, re, sys
from packaging.version import Version
R = "/work/main/tests/conformance"; P = "/work/gold/probes"
EPOCH = [("0.9.1","V1"),("0.10.2","V2"),("0.11.1","V3"),("0.13.0","V4"),("0.14.0","V5"),("0.17.0","V6"),("0.20.0","V7"),("0.22.0","V8"),("0.24.0","V9"),("0.25.0","V9b"),("0.26.0","V10"),("0.33.0","V11")]
def epoch(v):
    e = None
    for s, n in EPOCH:
        if Version(v) >= Version(s): e = n
    return e
TORCH = lambda v: ("2.14.1 (base)" if Version(v) >= Version("0.27.0") else "2.11.0 layer" if Version(v) >= Version("0.20.0")
                   else "2.10.0 + cu12 layers" if Version(v) >= Version("0.17.0") else "2.9.1 + cu12 layers")
cases = ["h8b_dense","nano3_bf16","nano3_nvfp4","nano3_nvfp4_experts_excluded","omni_nvfp4_mixed"]
import subprocess
tracked = set(subprocess.run(["git", "-C", "/work/main", "ls-files", "tests/conformance/h8b_dense"], capture_output=True, text=True).stdout.split())
vs = sorted({re.search(r"expected-vllm-(.*)\.json", p).group(1) for p in glob.glob(f"{R}/h8b_dense/expected-vllm-*.json")
             if os.path.relpath(p, "/work/main") in tracked}, key=Version, reverse=True)
def short(g):
    if g is None: return "—"
    if g["crash"] and g["crash"]["tensor"] is None:
        e = g["crash"]["error"]; m = next((re.search(p, e) for p in (r"Unknown ModelOpt quant algo: \w+", r"are not supported for now", r"No valid attention backend", r"[A-Za-z]+Error") if re.search(p, e)), None)
        return "refused: " + (m.group(0) if m else e[:40])
    n = sum(1 for t in g["tensors"].values() if t["outcome"] == "load")
    r = sum(1 for t in g["tensors"].values() if t["outcome"] == "raise")
    s = f"{n} load" + (f", {r} raise" if r else "")
    if g["crash"]: s += f"; crash {g['crash']['error'].split(':')[0]}"
    return s
print("| release | epoch | torch | " + " | ".join(cases) + " | examples | notes |")
print("|---" * (len(cases) + 5) + "|")
for v in vs:
    gs = {c: (json.load(open(f"{R}/{c}/expected-vllm-{v}.json")) if os.path.exists(f"{R}/{c}/expected-vllm-{v}.json") else None) for c in cases}
    ex = len(glob.glob(f"{R}/examples/*/expected-vllm-{v}.json"))
    notes = []
    mb = " ".join(g["made_by"] for g in gs.values() if g)
    if "head-size check relaxed" in mb: notes.append("head-size shim")
    if "stood in" in mb: notes.append("config stand-in")
    print(f"| {v} | {epoch(v)} | {TORCH(v)} | " + " | ".join(short(gs[c]) for c in cases) + f" | {ex}/6 | {', '.join(notes)} |")
