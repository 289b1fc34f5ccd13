# Made the evidence tables of ../EPOCHS.md (run by hand; probe goldens expected in /work/gold/probes, see make_probes.py).
import json, sys, os, re
P = "/work/gold/probes"
vs = sys.argv[1:]
def cell(e):
    if e is None: return "—"
    o = e["outcome"]; m = e.get("message") or ""
    if o == "load":
        p = (e["param"] or "").split(".mixer.")[-1] if e["param"] else ""
        return f"load `{p}`" + (f" ({e['shard_id']})" if e.get("shard_id") else "")
    if o == "raise":
        return "raise " + m.split(":")[0]
    if o == "warn": return "warn"
    return o
for probe in ["probe_nano3_nvfp4", "probe_nano3_bf16"]:
    wm = json.load(open(f"{P}/{probe}/model.safetensors.index.json"))["weight_map"]
    traps = [k for k, f in wm.items() if f == "model-probe.safetensors"]
    have = [v for v in vs if os.path.exists(f"{P}/{probe}.goldens/expected-vllm-{v}.json")]
    gs = {v: json.load(open(f"{P}/{probe}.goldens/expected-vllm-{v}.json")) for v in have}
    print(f"\n`{probe}` (per tensor):\n")
    print("| trap | " + " | ".join(have) + " |"); print("|---" * (len(have) + 1) + "|")
    for t in traps:
        short = re.sub(r"backbone\.layers\.\d+\.mixer\.", "L.mixer.", t)
        print(f"| `{short}` | " + " | ".join(cell(gs[v]["tensors"].get(t)) if gs[v]["tensors"] else "start-up refusal" for v in have) + " |")
    print("| **stream crash** | " + " | ".join((f"`{re.sub(r'backbone.layers.[0-9]+.mixer.', 'L.mixer.', gs[v]['crash']['tensor'] or '')}` " + gs[v]['crash']['error'].split(':')[0]) if gs[v]['crash'] else "none" for v in have) + " |")
