#!/usr/bin/env python3
"""Golden data from SGLang's real code, for any list of SGLang releases, in one command.

    python3 oracle/sglang/make_goldens.py 0.5.23 0.5.11          # releases to (re)make
    python3 oracle/sglang/make_goldens.py --epoch-reps            # last release of each epoch B1-B18
    python3 oracle/sglang/make_goldens.py --all                   # all 37 releases
    python3 oracle/sglang/make_goldens.py 0.5.23 --check          # compare with committed files, write nothing
    python3 oracle/sglang/make_goldens.py --digests-only          # recompute tests/conformance/sglang-epochs.json

    python3 oracle/sglang/make_goldens.py 0.5.13.post1 --cases h8b_dense,nano3_nvfp4 \
        --out-root /work/venvs/goldens-extra --raw-dir /work/venvs/golden-raw-extra   # not committed
    python3 oracle/sglang/make_goldens.py --digests-only --extra-roots /work/venvs/goldens-extra

Options: ``--venv-root /work/venvs`` (venvs are ``<root>/sgl-<X>``, the shared base ``<root>/sgl-base``),
``--out-root DIR`` (write goldens under DIR instead of tests/conformance), ``--extra-roots A:B`` (also digest
goldens found there), ``--reuse-raw`` (re-assemble from raw output already there; run the oracle only for
cases without any), ``--venvs-only``, ``--log FILE`` (a JSON line per release),
``--no-build`` (use existing venvs only), ``--cases nano3_nvfp4,examples/h8b-dense`` (a subset),
``--raw-dir DIR`` (keep the oracle's raw manifest/replay JSON; default ``<venv-root>/golden-raw``),
``--platform sm100`` (as every committed file).

What it does, per release X:
  1. Locates ``<venv-root>/sgl-X/bin/python`` or builds it: a light venv whose ``.pth`` file points
     at the base venv (CPU torch 2.13.0 + sglang's pure-Python deps, built once), then
     ``pip install --no-deps sglang==X`` and the release's ``transformers`` pin (spec §4) with its
     deps. A missing import is installed by name and recorded in ``<venv>/oracle-venv.json``.
  2. Runs ``golden_worker.py`` under that python over every case: each
     ``tests/conformance/<case>/checkpoint`` and each shipped example ``examples/<name>/`` (a
     directory with config.json and safetensors shards; ``examples/fixtures`` is skipped).
     The worker builds SGLang's real model (``sglang_manifest.build``) and runs its real
     ``load_weights`` on recorder parameters (``sglang_replay.replay``).
  3. Assembles each expectation file (``assemble``: the same fields and rules as the committed
     ``expected-sglang-0.5.23.json`` / ``-0.5.11.json``, which this reproduces byte for byte) and
     writes ``tests/conformance/<case>/expected-sglang-X.json`` or
     ``tests/conformance/examples/<name>/expected-sglang-X.json``.
  4. Updates ``tests/conformance/sglang-epochs.json``: {release: {epoch, digest, cases}} where
     ``digest`` is the sha256 of the canonical JSON of all the release's goldens minus ``engine`` /
     ``made_by`` (so two releases with the same digest behave identically on every case).

A start-up refusal (SGLang raises while building the model for a checkpoint: a config it cannot
parse, a quantization it rejects) is itself the golden datum: ``crash`` is
``{"tensor": null, "error": "start-up: <Exception>: <message>"}``, ``tensors`` is ``{}`` and
``manifest`` is ``{"moe_runner_backend": null, "quantization": null, "params": []}``.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONF = os.path.join(REPO, "tests", "conformance")
EXAMPLES = os.path.join(REPO, "examples")
EPOCHS_JSON = os.path.join(CONF, "sglang-epochs.json")

# The 18 behavioural epochs of /work/shared/spec/sglang-releases.md (oldest first).
EPOCHS = {
    "B1": ["0.5.3.post1", "0.5.3.post2", "0.5.3.post3"],
    "B2": ["0.5.4", "0.5.4.post1", "0.5.4.post2", "0.5.4.post3", "0.5.5", "0.5.5.post1",
           "0.5.5.post2", "0.5.5.post3"],
    "B3": ["0.5.6"],
    "B4": ["0.5.6.post1", "0.5.6.post2", "0.5.7"],
    "B5": ["0.5.8", "0.5.8.post1"],
    "B6": ["0.5.9"],
    "B7": ["0.5.10rc0", "0.5.10", "0.5.10.post1"],
    "B8": ["0.5.11"],
    "B9": ["0.5.12", "0.5.12.post1"],
    "B10": ["0.5.13", "0.5.13.post1", "0.5.14"],
    "B11": ["0.5.15", "0.5.15.post1"],
    "B12": ["0.5.16"],
    "B13": ["0.5.17"],
    "B14": ["0.5.18"],
    "B15": ["0.5.19"],
    "B16": ["0.5.20"],
    "B17": ["0.5.21", "0.5.22"],
    "B18": ["0.5.23"],
}
EPOCH_OF = {r: e for e, rs in EPOCHS.items() for r in rs}
ALL_RELEASES = [r for rs in EPOCHS.values() for r in rs]


def vkey(r: str):
    """0.5.10rc0 < 0.5.10 < 0.5.10.post1."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)(rc(\d+))?(\.post(\d+))?$", r)
    a, b, c, _, rc, _, post = m.groups()
    return (int(a), int(b), int(c), int(rc) if rc is not None else 10**6, int(post or 0))


# transformers pin of each release (wheel METADATA; spec §4)
def transformers_pin(r: str) -> str:
    k = vkey(r)
    if r == "0.5.3.post1":
        return "4.57.0"
    if r == "0.5.6.post1":
        return "5.0.0rc0"
    if k < vkey("0.5.10rc0"):
        return "4.57.1"
    if k < vkey("0.5.11"):
        return "5.3.0"
    if k < vkey("0.5.13"):
        return "5.6.0"
    if k < vkey("0.5.15"):
        return "5.8.1"
    if k < vkey("0.5.22"):
        return "5.12.1"
    return "5.19.0"


# The shared base venv: CPU torch + the pure-Python part of sglang's requirements (no GPU kernels).
BASE_TORCH = "torch==2.13.0"  # the local CPU build in /opt/wheels
BASE_PACKAGES = [
    "numpy", "transformers==5.19.0", "tokenizers==0.23.2", "safetensors", "einops", "pydantic",
    "fastapi", "uvicorn", "requests", "aiohttp", "orjson", "msgspec", "psutil", "pyzmq",
    "packaging", "regex", "tqdm", "pillow", "scipy", "sentencepiece==0.2.1", "tiktoken",
    "partial_json_parser", "python-multipart", "setproctitle", "pybase64", "interegular",
    "openai==2.8.0", "anthropic", "prometheus-client", "xxhash", "zstandard", "uvloop",
    "watchfiles", "easydict", "distro", "blobfile", "openai-harmony==0.0.4", "soundfile==0.13.1",
    "gguf", "ninja", "build", "modelscope", "datasets", "nvidia-ml-py", "python-dateutil",
    "IPython", "loguru", "frozendict",
]
BASE_NODEPS = ["compressed-tensors==0.18.0", "timm==1.0.25", "xgrammar==0.2.7",
               "llguidance>=1.7.6,<2", "torchvision==0.28.0", "triton", "apache-tvm-ffi==0.1.11"]
# import name -> distribution, for imports an older release needs that the base lacks
MODULE_TO_DIST = {"cv2": "opencv-python-headless", "PIL": "pillow", "yaml": "pyyaml",
                  "tvm_ffi": "apache-tvm-ffi", "google": "protobuf", "zmq": "pyzmq",
                  "dateutil": "python-dateutil", "sklearn": "scikit-learn"}

TORCHVISION_SHIM = '''# oracle venv shim: the PyPI torchvision wheel is a CUDA build whose compiled ops cannot load
# on the CPU torch; skip its op registrations (transformers only needs its Python parts).
'''


def sh(cmd, **kw):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, **kw)


def pip(venv, *args):
    r = sh([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
            *args], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
    return r.returncode


def site_packages(venv):
    return glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))[0]


def patch_torchvision(venv):
    """CUDA torchvision wheel on CPU torch: make its op registrations optional."""
    tv = os.path.join(site_packages(venv), "torchvision")
    if not os.path.isdir(tv):
        return
    p = os.path.join(tv, "__init__.py")
    s = open(p).read()
    old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
    if old in s:
        s = s.replace(old, "try:  # oracle venv shim (CUDA torchvision wheel on CPU torch): no "
                      "compiled ops\n    from torchvision import _autograd_registrations, "
                      "_meta_registrations\nexcept Exception:\n    pass\nfrom torchvision import (\n", 1)
        open(p, "w").write(s)
    p = os.path.join(tv, "_meta_registrations.py")
    s = open(p).read()
    old = "import torchvision.extension  # noqa: F401\n"
    if old in s and "oracle venv shim" not in s:
        s = s.replace(old, old + "if not torchvision.extension._has_ops():  # oracle venv shim\n"
                      "    raise ImportError(\"torchvision ops unavailable\")\n", 1)
        open(p, "w").write(s)


def ensure_base(root) -> str:
    base = os.path.join(root, "sgl-base")
    if os.path.exists(os.path.join(base, "bin", "python")):
        return base
    sh([sys.executable, "-m", "venv", base], check=True)
    assert pip(base, BASE_TORCH) == 0
    assert pip(base, *BASE_PACKAGES) == 0
    assert pip(base, "--no-deps", *BASE_NODEPS) == 0
    patch_torchvision(base)
    return base


NEVER_INSTALL = {"vllm", "sgl_kernel", "flashinfer", "deep_gemm", "cutlass"}  # GPU stacks: a shim or nothing
PROBE = ("import sys; sys.path.insert(0, %r)\nimport sglang_manifest as M\nM.preimport('sm100')\n"
         "import sglang, sglang.srt.server_args, sglang.srt.model_loader.loader, "
         "sglang.srt.models.nemotron_h\n" % HERE +
         "import importlib.util\n"
         "if importlib.util.find_spec('sglang.srt.models.nano_nemotron_vl'):  # >= 0.5.6\n"
         "  try:\n    import sglang.srt.models.nano_nemotron_vl\n"
         "  except ModuleNotFoundError:\n    raise\n  except Exception as e:\n"
         "    print('VL import:', type(e).__name__, e)\nprint('PROBE-OK')\n")


def probe(venv):
    r = subprocess.run([os.path.join(venv, "bin", "python"), "-c", PROBE], capture_output=True,
                       text=True, timeout=600)
    out = r.stdout + r.stderr
    if "PROBE-OK" in r.stdout:
        return None
    m = re.findall(r"No module named '([^']+)'", out)
    return ("missing", m[-1]) if m else ("error", out[-2000:])


def ensure_venv(root, release, build=True) -> str | None:
    venv = os.path.join(root, f"sgl-{release}")
    py = os.path.join(venv, "bin", "python")
    info_p = os.path.join(venv, "oracle-venv.json")
    if os.path.exists(info_p):
        with open(info_p) as f:
            if json.load(f).get("ready"):
                return py
    if not build:
        return py if os.path.exists(py) else None
    base = ensure_base(root)
    if not os.path.exists(py):
        sh([sys.executable, "-m", "venv", venv], check=True)
    with open(os.path.join(site_packages(venv), "_oracle_sgl_base.pth"), "w") as f:
        f.write(site_packages(base) + "\n")
    info = {"release": release, "base": base, "installed": [], "ready": False}
    if pip(venv, "--no-deps", f"sglang=={release}") != 0:
        info["error"] = f"pip install sglang=={release} failed"
        json.dump(info, open(info_p, "w"), indent=1)
        return None
    tf = transformers_pin(release)
    if tf != "5.19.0":
        # with deps: pulls the tokenizers / huggingface-hub that this transformers needs into this
        # venv, shadowing the base's (this venv's site-packages come before the .pth path)
        if pip(venv, f"transformers=={tf}") != 0:
            info["error"] = f"transformers=={tf} failed"
        info["installed"].append(f"transformers=={tf}")
    for _ in range(12):
        p = probe(venv)
        if p is None:
            info["ready"] = True
            break
        kind, what = p
        if kind != "missing" and ("tvm_ffi" in what or "xgrammar" in what) \
                and not any(x.startswith("xgrammar") for x in info["installed"]):
            # e.g. 0.5.4: the base venv's xgrammar 0.2.x fails under this release; use its own pin
            pin = subprocess.run(
                [os.path.join(venv, "bin", "python"), "-c",
                 "import importlib.metadata as m; print(next(r.split(';')[0].strip() for r in "
                 "m.requires('sglang') if r.startswith('xgrammar')))"],
                capture_output=True, text=True).stdout.strip()
            if pin and pip(venv, "--no-deps", pin) == 0:
                info["installed"].append(pin)
                continue
        if kind != "missing":
            info["error"] = what
            break
        top = what.split(".")[0]
        if top in NEVER_INSTALL:
            info["error"] = f"needs {what} (a GPU stack; not installed here)"
            break
        dist = MODULE_TO_DIST.get(top, top.replace("_", "-"))
        if dist in info["installed"] or pip(venv, dist) != 0:
            info["error"] = f"cannot import {what} (tried {dist})"
            break
        info["installed"].append(dist)
    json.dump(info, open(info_p, "w"), indent=1)
    return py if info["ready"] else None


# ----------------------------------------------------------------------------- cases
def discover_cases(out_root=CONF):
    """[(case_id, checkpoint_dir, golden_dir)]; golden_dir = out_root/case_id"""
    out = []
    for d in sorted(glob.glob(os.path.join(CONF, "*", "checkpoint"))):
        if os.path.exists(os.path.join(d, "config.json")):
            case = os.path.basename(os.path.dirname(d))
            out.append((case, d, os.path.join(out_root, case)))
    for d in sorted(glob.glob(os.path.join(EXAMPLES, "*"))):
        name = os.path.basename(d)
        if name == "fixtures" or not os.path.isdir(d):
            continue
        if not (os.path.exists(os.path.join(d, "config.json"))
                and glob.glob(os.path.join(d, "*.safetensors"))):
            continue
        out.append((f"examples/{name}", d, os.path.join(out_root, "examples", name)))
    return out


# ----------------------------------------------------------------------------- assembly
OUTCOME = {"loaded": "load", "stacked": "load", "expert": "load", "warned": "warn",
           "skipped": "skip", "raised": "raise", "routed": "routed"}
KV_DROP = re.compile(r"not found the expected name in the model \(e\.g\. (.+?)\)\. \S+ is not loaded")


def tensor_entry(r: dict) -> dict:
    oc = OUTCOME[r["outcome"]]
    e = {"outcome": oc, "param": None, "shard_id": None, "expert_id": None,
         "engine_name": None, "message": None}
    if oc == "load":
        e["param"], e["shard_id"], e["expert_id"] = r.get("param"), r.get("shard_id"), r.get("expert_id")
    elif oc == "warn":
        e["engine_name"] = r.get("warned_name")
        e["message"] = next((m for m in r.get("logs", []) if "not found in params_dict" in m), None)
    elif oc == "raise":
        e["message"] = r.get("error")
    elif oc == "skip":
        # a tensor dropped by the KV-scale remap is logged by the engine: that is `warn`
        for m in r.get("logs", []):
            k = KV_DROP.search(m)
            if k:
                e.update(outcome="warn", engine_name=k.group(1), message=m)
                break
    return e


# errors that mean the oracle did not set the process up as SGLang's scheduler would (or this CPU
# host's torch refused a .cuda()), not that SGLang refused the checkpoint: no golden is written
ORACLE_SETUP_ERRORS = ("Torch not compiled with CUDA", "dp attention not initialized",
                       "not initialized", "context not published")


def assemble(release: str, man: dict | None, rep: dict | None, startup: dict | None,
             ckpt: str | None = None) -> dict:
    out = {"engine": f"sglang@{release}"}
    if startup is not None and ckpt:  # no machine-specific path in a golden
        startup = dict(startup, error=startup["error"].replace(os.path.abspath(ckpt), "<checkpoint>"))
    if startup is not None:
        prog = startup.get("progress") or {}
        stage = prog.get("stage", "start-up")
        out["made_by"] = f"sglang {release} start-up refused this checkpoint (stage {stage})"
        out["crash"] = {"tensor": None, "error": f"start-up ({stage}): {startup['error']}"}
        out["tensors"] = {}
        out["params_without_tensor"] = []
        out["params_partially_filled"] = []
        # what start-up had resolved before it raised (null: not reached)
        out["manifest"] = {"moe_runner_backend": prog.get("moe_runner_backend"),
                           "quantization": prog.get("quantization"), "params": []}
        return out
    out["made_by"] = f"sglang {release} NemotronH load_weights on stub parameters"
    st = rep["first_fatal_in_stream"]
    out["crash"] = {"tensor": st.get("tensor"), "error": st.get("error")} if st.get("raised") else None
    out["tensors"] = {n: tensor_entry(r) for n, r in rep["tensors"].items()}
    out["params_without_tensor"] = rep["params_without_tensor"]
    # a list of parameter names, in manifest order (the committed files' form)
    out["params_partially_filled"] = list(rep["params_partially_filled"])
    out["manifest"] = {
        "moe_runner_backend": man["moe_runner_backend"],
        "quantization": man["quantization"],
        "params": [{"name": p["name"], "shape": p["shape"], "dtype": p["dtype"],
                    "quant_method": p["quant_method"]} for p in man["params"]],
    }
    return out


def dumps(d) -> str:
    return json.dumps(d, indent=1)  # the committed files' format (no trailing newline)


def canonical_digest(goldens: dict) -> str:
    body = {c: {k: v for k, v in g.items() if k not in ("engine", "made_by")}
            for c, g in sorted(goldens.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def golden_path(golden_dir, release):
    return os.path.join(golden_dir, f"expected-sglang-{release}.json")


def read_committed(path):
    """The text of a golden as committed: ``expected-*.json`` or its gzipped ``.json.gz``; None if neither."""
    if os.path.exists(path + ".gz"):
        import gzip
        with gzip.open(path + ".gz", "rt") as f:
            return f.read()
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    return None


def load_raw(raw_case_dir):
    def rd(n):
        p = os.path.join(raw_case_dir, n)
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
        return None
    return rd("manifest.json"), rd("replay.json"), rd("startup_error.json"), rd("replay_error.json")


# ----------------------------------------------------------------------------- digests
def update_epochs_json(roots, releases=None):
    """Digest every release whose goldens lie under one of ``roots`` (the repository's
    tests/conformance first, then --out-root directories holding non-committed releases)."""
    data = {}
    if os.path.exists(EPOCHS_JSON):
        with open(EPOCHS_JSON) as f:
            data = json.load(f)
    rels = releases or ALL_RELEASES
    for r in rels:
        goldens = {}
        for root in roots:
            for case, _, gdir in discover_cases(root):
                text = None if case in goldens else read_committed(golden_path(gdir, r))
                if text is not None:
                    goldens[case] = json.loads(text)
        if not goldens:
            continue
        conf = {c: g for c, g in goldens.items() if not c.startswith("examples/")}
        data[r] = {"epoch": EPOCH_OF.get(r), "digest": canonical_digest(goldens),
                   # the same over tests/conformance cases only (some releases ran without examples)
                   "conformance_digest": canonical_digest(conf),
                   "num_cases": len(goldens),
                   "cases": {c: canonical_digest({c: g}) for c, g in sorted(goldens.items())}}
        data[r]["committed"] = read_committed(golden_path(os.path.join(CONF, "h8b_dense"), r)) is not None
    data = dict(sorted(data.items(), key=lambda kv: vkey(kv[0])))
    with open(EPOCHS_JSON, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    return data


# ----------------------------------------------------------------------------- main
def run_release(release, args, cases) -> dict:
    t0 = time.time()
    py = ensure_venv(args.venv_root, release, build=not args.no_build)
    if py is None:
        info_p = os.path.join(args.venv_root, f"sgl-{release}", "oracle-venv.json")
        why = json.load(open(info_p)).get("error") if os.path.exists(info_p) else "no venv"
        print(f"[make_goldens] {release}: NO VENV: {why}", file=sys.stderr)
        return {"release": release, "status": "no-venv", "error": why}
    raw = os.path.join(args.raw_dir, release)
    os.makedirs(raw, exist_ok=True)
    todo = cases
    if args.reuse_raw:  # keep raw oracle output already there (same release, same platform)
        todo = [c for c in cases if not any(
            os.path.exists(os.path.join(raw, c[0].replace("/", "__"), f))
            for f in ("replay.json", "startup_error.json"))]
    specs = [f"{c.replace('/', '__')}={ck}" for c, ck, _ in todo]
    rc = 0
    if specs:
        rc = sh([py, os.path.join(HERE, "golden_worker.py"), "--raw-dir", raw, "--platform",
                 args.platform, *specs]).returncode
    res = {"release": release, "status": "ok", "cases": {}, "seconds": None}
    diffs = 0
    for case, ck, gdir in cases:
        man, rep, startup, rerr = load_raw(os.path.join(raw, case.replace("/", "__")))
        if startup is not None and ((startup.get("at") or "").startswith(HERE)
                                    or (startup.get("progress") or {}).get("stage") == "dump"
                                    or any(m in startup["error"] for m in ORACLE_SETUP_ERRORS)):
            # raised by the oracle's own code (an API this release lacks) or by this CPU host's
            # torch (a .cuda() call), not by SGLang's refusal of the checkpoint: no golden
            res["cases"][case] = f"ORACLE ERROR: {startup['error']} (at {startup['at']})"
            res["status"] = "partial"
            continue
        if rerr is not None or (startup is None and (man is None or rep is None)):
            res["cases"][case] = f"ORACLE ERROR: {(rerr or {}).get('error', 'no output')}"
            res["status"] = "partial"
            continue
        g = assemble(release, man, rep, startup, ck)
        text = dumps(g)
        p = golden_path(gdir, release)
        status = "startup-refused" if startup else ("crash" if g["crash"] else "ok")
        if args.check:
            committed = read_committed(p)
            if committed is None:
                status += " (no committed file)"
            elif committed == text:
                status += " == committed"
            else:
                status += " DIFFERS from committed"
                diffs += 1
                if args.diff_dir:
                    os.makedirs(args.diff_dir, exist_ok=True)
                    with open(os.path.join(args.diff_dir, f"{case.replace('/', '__')}-{release}.json"), "w") as f:
                        f.write(text)
        else:
            os.makedirs(gdir, exist_ok=True)
            with open(p, "w") as f:
                f.write(text)
        res["cases"][case] = status
    res["seconds"] = round(time.time() - t0, 1)
    res["worker_rc"] = rc
    if args.check:
        res["differs"] = diffs
    print(f"[make_goldens] {release}: {json.dumps(res, indent=1)}", file=sys.stderr, flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("releases", nargs="*")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--epoch-reps", action="store_true", help="last release of each epoch")
    ap.add_argument("--venv-root", default=os.environ.get("SGL_ORACLE_VENVS", "/work/venvs"))
    ap.add_argument("--raw-dir", default=None)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--cases", default=None, help="comma-separated case ids (default: all)")
    ap.add_argument("--platform", default="sm100")
    ap.add_argument("--check", action="store_true", help="compare with committed files only")
    ap.add_argument("--diff-dir", default=None, help="with --check: write differing goldens here")
    ap.add_argument("--reuse-raw", action="store_true",
                    help="do not re-run the oracle for cases whose raw output is in --raw-dir")
    ap.add_argument("--digests-only", action="store_true")
    ap.add_argument("--venvs-only", action="store_true", help="build/locate the venvs, run nothing")
    ap.add_argument("--out-root", default=CONF,
                    help="write goldens under this root (<root>/<case>/, <root>/examples/<name>/) "
                         "instead of tests/conformance (for releases whose files are not committed)")
    ap.add_argument("--extra-roots", default=os.environ.get("SGL_GOLDEN_EXTRA", ""),
                    help="colon-separated roots of non-committed goldens to include in sglang-epochs.json")
    ap.add_argument("--log", default=None, help="append a JSON line per release here")
    a = ap.parse_args(argv)
    a.raw_dir = a.raw_dir or os.path.join(a.venv_root, "golden-raw")
    cases = discover_cases(a.out_root)
    roots = [CONF] + [r for r in a.extra_roots.split(":") if r]
    if a.out_root != CONF and a.out_root not in roots:
        roots.append(a.out_root)
    if a.cases:
        want = a.cases.split(",")
        cases = [c for c in cases if c[0] in want]
    if a.digests_only:
        update_epochs_json(roots)
        return 0
    rels = list(a.releases)
    if a.all:
        rels = ALL_RELEASES[::-1]
    elif a.epoch_reps:
        rels = [rs[-1] for rs in EPOCHS.values()][::-1]
    if a.venvs_only:
        for r in rels:
            print(f"[make_goldens] {r}: venv {ensure_venv(a.venv_root, r)}", file=sys.stderr, flush=True)
        return 0
    for r in rels:
        res = run_release(r, a, cases)
        if a.log:
            with open(a.log, "a") as f:
                f.write(json.dumps(res) + "\n")
    if not a.check:
        update_epochs_json(roots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
