# Made the evidence tables of ../EPOCHS.md (run by hand; probe goldens expected in /work/gold/probes, see make_probes.py).
import subprocess, re
p = "/work/main/oracle/vllm/EPOCHS.md"
s = open(p).read()
head = s.split("## Evidence: releases run")[0]
ev = subprocess.run(["python3", "/work/gold/evidence.py"], capture_output=True, text=True).stdout
vs = re.findall(r"^\| (\d+\.\d+\.\d+) \|", ev, re.M)
mx = subprocess.run(["python3", "/work/gold/matrix.py", *vs], capture_output=True, text=True).stdout
gout = subprocess.run(["python3", "/work/gold/groups.py"], capture_output=True, text=True).stdout
GROUPS = "\n".join(l.strip() for l in gout.split("## grouping by exact")[0].splitlines() if l.strip() and "missing" not in l and "grouping" not in l)
text = head + """## Evidence: releases run

Goldens committed for every release in the first table (`tests/conformance/<case>/expected-vllm-X.json`, and for
the releases with "6/6" also `tests/conformance/examples/<example>/expected-vllm-X.json`; the start-up variants
`startup_mixed_*` where listed under "Start-up variants"). Cells: tensors loaded / raised per tensor, the class of
the stream's first exception, or the start-up refusal. "head-size shim": the release has no attention kernel for
the tiny head_dim 16 with an FP8 KV cache and the selection was repeated without that check (`made_by` says so);
"config stand-in": vLLM's own `NemotronHConfig` stood in for the repository's remote code (transformers 4.x).

""" + ev + """
Releases grouped by identical goldens (outcome, parameter, shard, expert of every tensor, class of the stream's
first exception, parameter names; conformance cases + examples + probes — `groups.py` over the committed files):

```
""" + GROUPS + """
```
The groups are the epochs V5/V6 (0.16.0, 0.17.0: V6's changes need an MTP-carrying wrapper, which no case has),
V7/V8 (0.20.0 – 0.23.0: V8 changes the VL stream order, but every VL case is refused by MIXED_PRECISION there),
V9 (0.24.0), V9b (0.25.1), V10, V11 — no run contradicts the reading, and every boundary the runs can see is where the reading put it.

Not run (no golden): 0.9.1 – 0.12.0 (V1 – V3: torch 2.7 / 2.8 / 2.9.0 CUDA-12 wheels and their layers were not
built in the time available; V1/V2 also cannot build Nemotron-3 configs), 0.13.0 (V4: venv built on the torch
2.9.1 layer, not run in time), and the patch releases inside the epochs (0.10.1.1, 0.11.2, 0.14.1, 0.15.x,
0.17.1, 0.18.x, 0.19.x, 0.20.1/.2, 0.21.0, 0.22.1, 0.25.0, 0.27.1) — their loading code hashes equal a neighbour
that ran or differ only in code listed under the epoch.

Start-up variants (`tests/conformance/startup_mixed_*`, ModelOpt MIXED_PRECISION declared in config.json and/or
hf_quant_config.json):

""" + subprocess.run(["python3", "/work/gold/startup_table.py"], capture_output=True, text=True).stdout + """
Probes (`make_probes.py`; outcome per trap tensor, each loaded on its own; not committed — regenerate with
`make_goldens.py X --probes DIR`):
""" + mx + "\n"
open(p, "w").write(text)
print(len(text))
