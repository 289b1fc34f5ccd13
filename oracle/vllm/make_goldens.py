#!/usr/bin/env python3
"""Regenerate the vLLM golden files (expected-vllm-<X>.json) from vLLM's real code.

    make_goldens.py 0.34.0 [0.32.0 ...] [--venvs /work/venvs] [--cases c1,c2] [--check]
                    [--work DIR] [--convert-only] [--mtp]

For every release X it needs a venv ``<venvs>/vllm-X`` (see ../README.md, "vLLM") and a stub
``libcuda.so.1`` in ``<venvs>/stub-X`` (make_stub_libcuda.sh). For every conformance case
(``tests/conformance/<case>/checkpoint``) and every shipped example (``examples/<ex>`` with a
config.json and shards; ``examples/fixtures`` is skipped) it runs ``vllm_oracle.py`` under that
venv's python and converts its ``manifest.json`` + ``replay.json`` into

    tests/conformance/<case>/expected-vllm-X.json
    tests/conformance/examples/<ex>/expected-vllm-X.json

``--check`` writes nothing into the repository: it compares what it would write with the files
there and exits 1 on a difference (the self-check for 0.34.0).

``--variant NAME``: the release in another environment (``--venvs``; e.g. ``transformers4``, the newest
transformers 4.x a release that also allows 5.x accepts), written as ``expected-NAME-vllm-X.json``.

``--mtp``: the MTP draft (``vllm_oracle.py --mtp``) on every case under ``tests/conformance/mtp``
(``make_probes.py``), written as ``tests/conformance/mtp/<case>/expected-mtp-vllm-X.json``.

Golden format (same as the committed 0.34.0 files): ``crash`` is null or ``{"tensor", "error"}``
(the first exception of the stream pass, in vLLM's order; ``tensor`` null when vLLM refused
before any tensor was read); ``tensors`` maps every checkpoint name to outcome / param /
shard_id / expert_id / engine_name / message / raised_after_partial_copy in nhcheck's
vocabulary (load, warn, skip, raise, routed). A release that refuses the checkpoint at start-up
has ``crash`` = ``{"tensor": null, "error": "start-up: <Exception>: <message>"}``, ``tensors`` = {} and an
empty manifest (the shape oracle/sglang/make_goldens.py gives refusals): the refusal IS the golden.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

OUTCOME = {"loaded": "load", "stacked": "load", "expert": "load", "raised": "raise",
           "raised_after_load": "raise", "warned": "warn", "skipped": "skip", "routed": "routed",
           "expert_rejected": "skip"}


def cases():
    out = []
    for ck in sorted(glob.glob(os.path.join(REPO, "tests", "conformance", "*", "checkpoint"))):
        case = os.path.dirname(ck)
        out.append((os.path.basename(case), ck, case))
    for ex in sorted(glob.glob(os.path.join(REPO, "examples", "*"))):
        name = os.path.basename(ex)
        if name == "fixtures" or not os.path.isfile(os.path.join(ex, "config.json")):
            continue
        if not glob.glob(os.path.join(ex, "*.safetensors")):
            continue
        out.append(("examples/" + name, ex, os.path.join(REPO, "tests", "conformance", "examples", name)))
    return out


# Log lines that are not about the tensor being loaded: emitted once per process (warning_once) by
# code every tensor of a kind passes through; the per-tensor replay clears the once-caches, so they
# would otherwise tag whichever tensor of that kind happens not to load.
NOT_ABOUT_THE_TENSOR = (
    # 0.28.0 - 0.31.0: NemotronH passes ckpt_up_proj_name="" to the expert mapping (None from 0.32.0)
    "Unexpected gate/up projection names:",
)


def tensor_entry(r):
    if r["outcome"] == "warned" and all(w.startswith(NOT_ABOUT_THE_TENSOR) for w in r.get("warnings") or []):
        r = dict(r, outcome="skipped",
                 skip_reason="no load call; only a once-per-process warning not about this tensor: "
                             + "; ".join(r.get("warnings") or []))
    oc = OUTCOME[r["outcome"]]
    mapped = r.get("mapped_name") or []
    e = OrderedDict(outcome=oc, param=None, shard_id=None, expert_id=None, engine_name=None,
                    message=None, raised_after_partial_copy=None)
    if oc in ("load", "raise"):
        e["param"] = r.get("param")
        e["shard_id"] = r.get("shard_id")
        e["expert_id"] = r.get("expert_id")
    if oc != "routed":
        e["engine_name"] = mapped[-1] if mapped else None
    if oc == "raise":
        e["message"] = r.get("error")
        if r["outcome"] == "raised_after_load":
            e["raised_after_partial_copy"] = True
    elif oc == "skip":
        e["message"] = r.get("skip_reason")
        if r["outcome"] == "expert_rejected":
            e["message"] = "every expert weight_loader returned False (expert not on this rank)"
    elif oc == "warn":
        e["message"] = (r.get("warnings") or [None])[0]
    return e


def convert(version, replay, manifest, note=None, mtp=False):
    g = OrderedDict()
    g["engine"] = f"vllm@{version}"
    g["made_by"] = (f"vllm {version} NemotronH model built on CPU (tiny real shapes), its real "
                    "load_weights per tensor and as one stream")
    if mtp:
        g["mode"] = "mtp"
        g["made_by"] = (f"vllm {version} MTP draft (speculative_config method mtp: NemotronHMTP) built on CPU "
                        "(tiny real shapes), its real load_weights per tensor and as one stream "
                        "(DefaultModelLoader with the draft's model config)")
    standin = (replay.get("meta") or {}).get("config_standin")
    if standin:
        g["made_by"] += "; " + standin
    if (replay.get("meta") or {}).get("attn_backend_head_size_relaxed"):
        g["made_by"] += ("; attention backend chosen with the head-size check relaxed (this release has no "
                         "kernel for the tiny head_dim; real checkpoints use 128; the backend creates no "
                         "parameter)")
    if replay.get("startup_error"):  # same shape as oracle/sglang/make_goldens.py's refusals
        g["made_by"] = f"vllm {version} start-up (engine config / model build) refused this checkpoint"
        if standin:
            g["made_by"] += "; " + standin
    if note:
        g["made_by"] += "; " + note
    if replay.get("startup_error"):
        g["crash"] = OrderedDict(tensor=None, error="start-up: " + replay["startup_error"]["error"])
        g["tensors"] = {}
        g["params_without_tensor"] = []
        g["params_partially_filled"] = []
        g["manifest"] = OrderedDict(quantization=None, moe_methods={}, params=[], param_aliases={})
        return g
    st = replay.get("first_fatal_in_stream")
    g["crash"] = (OrderedDict(tensor=st.get("tensor"), error=st["error"])
                  if st and st.get("raised") else None)
    g["tensors"] = OrderedDict((n, tensor_entry(r)) for n, r in replay["tensors"].items())
    g["params_without_tensor"] = replay["params_without_tensor"]
    g["params_partially_filled"] = [dict(param=k, **v) for k, v in replay["params_partially_filled"].items()]
    g["manifest"] = OrderedDict(
        quantization=manifest["quantization"], moe_methods=manifest["moe_methods"],
        params=[OrderedDict(name=p["name"], shape=p["shape"], dtype=p["dtype"],
                            quant_method=p["quant_method"]) for p in manifest["params"]],
        param_aliases=manifest["param_aliases"])
    return g


# releases whose import initialises torch.cuda (through the stub driver), so a forked child cannot
# build a model ("Cannot re-initialize CUDA in forked subprocess"): one process per checkpoint instead
NO_FORK_BEFORE = "0.20.0"


def release_env(version, venvs):
    """The release's venv python, and the environment its oracle processes run in (the stub ``libcuda.so.1``
    first on ``LD_LIBRARY_PATH``, shared-expert streams off, a fixed hash seed)."""
    py = os.path.join(venvs, f"vllm-{version}", "bin", "python")
    stub = os.path.join(venvs, f"stub-{version}")
    env = dict(os.environ, LD_LIBRARY_PATH=stub + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
               VLLM_DISABLE_SHARED_EXPERTS_STREAM="1", PYTHONHASHSEED="0")
    return py, env


def run_oracle(version, venvs, jobs, platform, work, extra=()):
    """One process per release (vLLM imported once), one forked child per checkpoint."""
    from packaging.version import Version

    py, env = release_env(version, venvs)
    if Version(version) < Version(NO_FORK_BEFORE):
        for ckpt, od in jobs:
            p = subprocess.run([py, os.path.join(HERE, "vllm_oracle.py"), ckpt, "--out-dir", od,
                                "--platform", platform, *extra], env=env, capture_output=True, text=True)
            with open(od + ".log", "w") as f:
                f.write(p.stdout + p.stderr)
        return
    spec = [{"argv": [ckpt, "--out-dir", od, "--platform", platform, *extra], "log": od + ".log",
             "platform": platform} for ckpt, od in jobs]
    path = os.path.join(work, version, "jobs.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    p = subprocess.run([py, os.path.join(HERE, "vllm_oracle.py"), "--batch", path], env=env,
                       capture_output=True, text=True)
    with open(os.path.join(work, version, "batch.log"), "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        print(f"[{version}] some oracle runs failed; see {work}/{version}/*.log", file=sys.stderr)


def dump(g):
    return json.dumps(g, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs="+")
    ap.add_argument("--venvs", default=os.environ.get("VLLM_ORACLE_VENVS", "/work/venvs"))
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--platform", default="sm100")
    ap.add_argument("--work", default=None, help="keep oracle outputs here (default: a temp dir)")
    ap.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    ap.add_argument("--convert-only", action="store_true", help="reuse oracle outputs already in --work")
    ap.add_argument("--note", default=None,
                    help="appended to every golden's made_by: how this release's environment differs from its pins "
                         "(e.g. 'torch 2.9.1 stood in for the pinned 2.9.0')")
    ap.add_argument("--probes", default=None,
                    help="run on the probe checkpoints PROBES/<probe>/checkpoint (make_probes.py; committed: "
                         "tests/conformance/probes) instead; goldens go to PROBES/<probe>/expected-vllm-X.json")
    ap.add_argument("--mtp", action="store_true",
                    help="the MTP draft on tests/conformance/mtp/* (goldens expected-mtp-vllm-X.json)")
    ap.add_argument("--variant", default=None,
                    help="the release under another environment than its row's (e.g. transformers4: --venvs holding "
                         "a vllm-X venv with the newest transformers 4.x the release allows): goldens "
                         "expected-VARIANT-vllm-X.json, which the release's own goldens do not replace; say how the "
                         "environment differs with --note")
    a = ap.parse_args(argv)
    work = a.work or tempfile.mkdtemp(prefix="vllm-goldens-")
    want = set(a.cases.split(",")) if a.cases else None
    bad = 0
    for v in a.versions:
        all_cases = cases()
        if a.mtp:
            mdir = os.path.join(REPO, "tests", "conformance", "mtp")
            all_cases = [("mtp/" + p, os.path.join(mdir, p, "checkpoint"), os.path.join(mdir, p))
                         for p in sorted(os.listdir(mdir))
                         if os.path.isfile(os.path.join(mdir, p, "checkpoint", "config.json"))]
        elif a.probes:
            all_cases = [("probes/" + p, os.path.join(a.probes, p, "checkpoint"), os.path.join(a.probes, p))
                         for p in sorted(os.listdir(a.probes))
                         if os.path.isfile(os.path.join(a.probes, p, "checkpoint", "config.json"))]
        todo = [(name, ckpt, dest, os.path.join(work, v, name.replace("/", "__")))
                for name, ckpt, dest in all_cases
                if not want or name in want or name.split("/")[-1] in want]
        os.makedirs(os.path.join(work, v), exist_ok=True)
        if not a.convert_only:
            for *_, od in todo:
                if os.path.exists(os.path.join(od, "replay.json")):
                    os.remove(os.path.join(od, "replay.json"))
            print(f"[{v}] running the oracle on {len(todo)} checkpoints ...", file=sys.stderr, flush=True)
            run_oracle(v, a.venvs, [(ckpt, od) for _, ckpt, _, od in todo], a.platform, work,
                       ("--mtp",) if a.mtp else ())
        for name, ckpt, dest, od in todo:
            if not os.path.exists(os.path.join(od, "replay.json")):
                print(f"[{v}] {name}: ORACLE FAILED (no replay.json; see {od}.log)", flush=True)
                bad += 1
                continue
            with open(os.path.join(od, "replay.json")) as f:
                replay = json.load(f)
            err = (replay.get("startup_error") or {}).get("error", "")
            if err.startswith(("ModuleNotFoundError", "ImportError")) or "in forked subprocess" in err \
                    or "NVIDIA driver" in err:
                # a package this host lacks (a GPU-kernel package left out of the venv), not vLLM refusing
                print(f"[{v}] {name}: ORACLE ENVIRONMENT FAILURE, no golden written: {err[:200]}", flush=True)
                bad += 1
                continue
            man = None
            if os.path.exists(os.path.join(od, "manifest.json")) and not replay.get("startup_error"):
                with open(os.path.join(od, "manifest.json")) as f:
                    man = json.load(f)
            text = dump(convert(v, replay, man, a.note, a.mtp))
            kind = (f"{a.variant}-" if a.variant else "") + ("mtp-" if a.mtp else "")
            path = os.path.join(dest, f"expected-{kind}vllm-{v}.json")
            if a.check:
                old = open(path).read() if os.path.exists(path) else None
                same = old == text
                if not same and old is not None:
                    same = json.loads(old) == json.loads(text)
                    note = "same JSON, different bytes" if same else "DIFFERENT"
                else:
                    note = "identical" if same else "MISSING"
                print(f"[{v}] {name}: {note}", flush=True)
                bad += 0 if same else 1
            else:
                os.makedirs(dest, exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
                print(f"[{v}] {name}: wrote {os.path.relpath(path, REPO)}"
                      + (f" (startup refusal)" if replay.get("startup_error") else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
