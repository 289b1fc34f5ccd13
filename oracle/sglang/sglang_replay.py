#!/usr/bin/env python3
"""Replay SGLang's REAL NemotronH ``load_weights`` on a checkpoint, name by name.

    sglang_replay.py CKPT_DIR --manifest manifest.json [--out replay.json] [--pre-24434]
                     [--old-python $ORACLE_OLD_PYTHON] [--mode per-tensor|stream]

How (the upstream unit test's technique, test_nemotron_h_weight_loading.py):
  * ``lm = object.__new__(NemotronHForCausalLM)`` from the *installed* sglang; ``config``,
    ``model`` (start/end layer), ``pp_group`` come from the manifest's loader_context; the class
    keeps its own ``remap_prefix`` / ``remap_substr`` / ``stacked_params_mapping``.
    ``lm.named_parameters`` yields one recorder per manifest parameter: an ``nn.Parameter`` on
    the meta device with the manifest shape/dtype, carrying a recording ``weight_loader`` when
    the real parameter has one (none otherwise, exactly like the real parameter).
  * Omni/VL manifests: ``object.__new__(<wrapper class>)`` with ``language_model = lm``, the
    projector (``mlp1``) as recorders, and the vision / sound towers as routing recorders; the
    wrapper's real ``load_weights`` does the routing and the ``language_model.`` strip.
  * Checkpoint tensors come in SGLang's order: index-filtered shard files
    (``weight_utils.filter_duplicate_safetensors_files``), sorted, then ``safe_open().keys()``.
    Tensors are meta tensors of the header shape/dtype (CPU zeros for one-element tensors, so
    ``default_weight_loader``'s scalar path can call ``.item()``). No data is read.

Outcome per checkpoint tensor (the brief's vocabulary):
  loaded   default branch; the parameter's own weight_loader or default_weight_loader was called
  stacked  stacked branch: weight_loader(param, w, shard_id)
  expert   expert branch: weight_loader(param, w, name, shard_id=, expert_id=)
  warned   "Parameter X not found in params_dict" was logged (X is SGLang's remapped name)
  skipped  nothing was called and nothing was logged (silent drop)
  raised   an exception escaped load_weights (e.g. KeyError before PR #24434)
  routed   (Omni/VL only) handed to the vision or sound tower's own loader, outside NemotronH

Modes: ``per-tensor`` (default) calls load_weights once per tensor, so every event belongs to
that tensor even where a wrapper buffers (sglang 0.5.11's VL wrapper does). A ``stream`` pass
(always run as well) feeds the whole checkpoint in one call the way the server does and reports
the first exception it hits (the tensor is identified from the real loader's frame locals), i.e.
the tensor that kills a real start-up.

Instrumentation (recording only, behaviour unchanged; listed in the output):
  * ``default_weight_loader`` in the namespaces of nemotron_h / nano_nemotron_vl is wrapped by
    a function that records the call and then calls SGLang's real default_weight_loader.
  * a logging.Handler on SGLang's loader logger (``sglang.utils``) and the root logger.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter, OrderedDict, defaultdict
from types import SimpleNamespace

DEFAULT_OLD_PYTHON = os.environ.get("ORACLE_OLD_PYTHON", "python-sglang-0.5.11")

ST_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BOOL": "bool",
}


# --------------------------------------------------------------------------- checkpoint
def checkpoint_order(ckpt: str):
    """[(name, shard_file, dtype_str, shape)] in the order SGLang's safetensors iterator yields."""
    import safetensors

    from sglang.srt.model_loader.weight_utils import filter_duplicate_safetensors_files

    files = glob.glob(os.path.join(ckpt, "*.safetensors"))
    files = filter_duplicate_safetensors_files(files, ckpt, "model.safetensors.index.json")
    files.sort()
    out = []
    for f in files:
        with safetensors.safe_open(f, framework="pt", device="cpu") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                out.append((name, os.path.basename(f), sl.get_dtype(), list(sl.get_shape())))
    return out


def make_tensor(dtype_str: str, shape):
    import torch

    dt = getattr(torch, ST_DTYPES[dtype_str])
    numel = 1
    for s in shape:
        numel *= s
    if numel <= 1:
        return torch.zeros(shape, dtype=dt)
    return torch.empty(shape, dtype=dt, device="meta")


# --------------------------------------------------------------------------- recording
class Recorder:
    """Collects what SGLang does while one checkpoint tensor is being processed."""

    def __init__(self):
        self.events = []
        self.logs = []
        self.records = []

    def reset(self):
        self.events, self.logs, self.records = [], [], []


REC = Recorder()


class _LogTap(logging.Handler):
    """Attached to SGLang's loader logger and to the root logger; a record that reaches both
    (propagation) is kept once. Records are compared by identity while they are alive (kept in
    REC.records), never by id() of dead objects."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)

    def emit(self, record):
        if any(r is record for r in REC.records):
            return
        REC.records.append(record)
        if record.levelno >= logging.WARNING:
            REC.logs.append({"logger": record.name, "level": record.levelname,
                             "msg": record.getMessage()})


def make_param_recorder(entry: dict, display_name: str):
    """An nn.Parameter on meta with the manifest shape/dtype; recording weight_loader iff the real
    parameter has one."""
    import torch

    p = torch.nn.Parameter(
        torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]), device="meta"),
        requires_grad=False,
    )
    p._oracle_name = display_name
    if entry.get("weight_loader"):
        def weight_loader(param, loaded_weight, *args, **kwargs):
            REC.events.append({"kind": "weight_loader", "param": param._oracle_name,
                               "tensor_id": id(loaded_weight), "args": list(args),
                               "kwargs": dict(kwargs)})

        p.weight_loader = weight_loader
    return p


def make_recording_default_loader(real_default_loader):
    def default_weight_loader(param, loaded_weight):
        REC.events.append({"kind": "default_weight_loader",
                           "param": getattr(param, "_oracle_name", None),
                           "tensor_id": id(loaded_weight), "args": [], "kwargs": {}})
        return real_default_loader(param, loaded_weight)

    default_weight_loader.__oracle_wrapped__ = real_default_loader
    return default_weight_loader


TOWERS = ("vision_model", "sound_encoder")


class TowerStub:
    """Stands in for the vision / sound tower: records what the wrapper routes to it."""

    def __init__(self, tower: str):
        self.tower = tower

    def load_weights(self, weights):
        for name, w in weights:
            REC.events.append({"kind": "tower", "tower": self.tower, "key": name,
                               "tensor_id": id(w)})
        return set()


class ParamHolder:
    def __init__(self, items):
        self._items = items

    def named_parameters(self, *a, **k):
        return iter(self._items)


# --------------------------------------------------------------------------- model
def build_minimal(man: dict):
    import sglang.srt.models.nemotron_h as nh
    from sglang.srt.models.nemotron_h import NemotronHForCausalLM

    ctx = man["loader_context"]
    lm_prefix = ctx.get("lm_prefix") or ""
    pre = lm_prefix + "." if lm_prefix else ""
    lm_params, other = [], defaultdict(list)
    for e in man["params"]:
        n = e["name"]
        if pre and not n.startswith(pre):
            child = n.split(".", 1)[0]
            other[child].append((n[len(child) + 1:], make_param_recorder(e, n)))
            continue
        inner = n[len(pre):]
        lm_params.append((inner, make_param_recorder(e, n)))

    lm_cls = NemotronHForCausalLM
    if ctx.get("lm_class") == "NemotronHForCausalLMMTP":  # speculative draft (is_mtp=True path)
        from sglang.srt.models.nemotron_h_mtp import NemotronHForCausalLMMTP as lm_cls
    lm = object.__new__(lm_cls)
    n_exp = ctx.get("n_routed_experts")
    object.__setattr__(lm, "config", SimpleNamespace(
        n_routed_experts=n_exp,
        max_n_routed_experts=ctx.get("max_n_routed_experts") or n_exp,
        tie_word_embeddings=ctx.get("tie_word_embeddings", False),
    ))
    object.__setattr__(lm, "model", SimpleNamespace(start_layer=ctx["start_layer"], end_layer=ctx["end_layer"])
                       if ctx.get("model_has_start_layer") else SimpleNamespace())
    object.__setattr__(lm, "pp_group", SimpleNamespace(is_first_rank=ctx.get("pp_is_first_rank", True),
                                                       is_last_rank=ctx.get("pp_is_last_rank", True)))
    object.__setattr__(lm, "named_parameters", lambda *a, **k: iter(lm_params))
    if lm_cls is not NemotronHForCausalLM:
        # the MTP loader's standalone-head check reads lm_head.quant_method's class
        qm_name = next((e.get("quant_method") for e in man["params"]
                        if e["name"] == pre + "lm_head.weight"), None)
        qm = object()
        if qm_name:
            import importlib

            for modname in ("modelopt_quant", "unquant"):
                mod = importlib.import_module(f"sglang.srt.layers.quantization.{modname}")
                cls = getattr(mod, qm_name, None)
                if isinstance(cls, type):
                    qm = object.__new__(cls)
                    break
        object.__setattr__(lm, "lm_head", SimpleNamespace(quant_method=qm))

    patched = []
    real_dwl = nh.default_weight_loader
    nh.default_weight_loader = make_recording_default_loader(real_dwl)
    patched.append("sglang.srt.models.nemotron_h.default_weight_loader (record, then call the real one)")

    if not lm_prefix:
        return lm, lm, patched

    import sglang.srt.models.nano_nemotron_vl as vl

    wcls = getattr(vl, man["wrapper"]["class"], None)
    wrapper_note = None
    if wcls is None:  # e.g. an older sglang without this exact class: use its V2 base
        wrapper_note = (f"{man['wrapper']['class']} not in this sglang; using "
                        f"NemotronH_Nano_VL_V2")
        wcls = vl.NemotronH_Nano_VL_V2
    w = object.__new__(wcls)
    object.__setattr__(w, "language_model", lm)
    object.__setattr__(w, "config", SimpleNamespace())
    children = man["wrapper"]["children"]
    for child in children:
        if child == "language_model":
            continue
        if child in ("vision_model", "sound_encoder"):
            object.__setattr__(w, child, TowerStub(child))
        else:
            object.__setattr__(w, child, ParamHolder(other.get(child, [])))
    if "sound_encoder" not in children:
        object.__setattr__(w, "sound_encoder", None)
    if "vision_final_layernorm" not in children:
        object.__setattr__(w, "vision_final_layernorm", None)
    vl.default_weight_loader = make_recording_default_loader(vl.default_weight_loader)
    patched.append("sglang.srt.models.nano_nemotron_vl.default_weight_loader (record, then call the real one)")
    if wrapper_note:
        patched.append(wrapper_note)
    return w, lm, patched


# --------------------------------------------------------------------------- replay
def classify(events, logs, exc, tensor_id):
    ev = [e for e in events if e.get("tensor_id") == tensor_id]
    r = OrderedDict(outcome=None, param=None, shard_id=None, expert_id=None, error=None)
    if len(ev) > 1:
        r["all_events"] = [{k: v for k, v in e.items() if k != "tensor_id"} for e in ev]
    if ev:
        e = ev[0]
        if e["kind"] == "tower":
            r["outcome"] = "routed"
            r["tower"] = e["tower"]
            r["tower_key"] = e["key"]
        elif e["kind"] == "default_weight_loader":
            r["outcome"] = "loaded"
            r["param"] = e["param"]
            r["via"] = "default_weight_loader"
        else:
            args, kw = e["args"], e["kwargs"]
            r["param"] = e["param"]
            r["via"] = "weight_loader"
            if "expert_id" in kw or "shard_id" in kw:
                r["outcome"] = "expert"
                r["shard_id"] = kw.get("shard_id")
                r["expert_id"] = kw.get("expert_id")
                if args and args[0] != r["param"]:
                    r["loader_name_arg"] = args[0]
            elif len(args) == 1:
                r["outcome"] = "stacked"
                r["shard_id"] = args[0]
            elif not args:
                r["outcome"] = "loaded"
            else:
                r["outcome"] = "loaded"
                r["loader_args"] = args
    warn = [l for l in logs if "not found in params_dict" in l["msg"]]
    if exc is not None:
        r["outcome"] = "raised"
        r["error"] = f"{type(exc).__name__}: {exc}"
    elif r["outcome"] is None:
        if warn:
            r["outcome"] = "warned"
            msg = warn[0]["msg"]
            r["warned_name"] = msg.replace("Parameter ", "", 1).replace(" not found in params_dict", "")
        else:
            r["outcome"] = "skipped"
    if logs:
        r["logs"] = [l["msg"] for l in logs]
    return r


def run_per_tensor(target, tensors):
    results = OrderedDict()
    for name, shard, dt, shape in tensors:
        t = make_tensor(dt, shape)
        REC.reset()
        exc = None
        try:
            target.load_weights([(name, t)])
        except Exception as e:  # the real loader raised: that *is* the outcome
            exc = e
        r = classify(REC.events, REC.logs, exc, id(t))
        r["file"] = shard
        r["dtype"] = dt
        r["shape"] = shape
        results[name] = r
    return results


def run_stream(target, tensors):
    """One load_weights call over the whole checkpoint, as the server does; returns the first
    exception and the checkpoint tensor being processed when it was raised."""
    objs, keep = {}, []  # keep every tensor alive: ids must stay unique for the whole pass

    def gen():
        for name, shard, dt, shape in tensors:
            t = make_tensor(dt, shape)
            keep.append(t)
            objs[id(t)] = name
            yield name, t

    REC.reset()
    try:
        target.load_weights(gen())
    except Exception as e:
        culprit = None
        tb = e.__traceback__
        frames = []
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for fr in reversed(frames):  # innermost SGLang frame holding the tensor being processed
            for var in ("loaded_weight", "w", "weight"):
                v = fr.f_locals.get(var)
                if v is not None and id(v) in objs:
                    culprit = objs[id(v)]
                    break
            if culprit:
                break
        return {"raised": True, "error": f"{type(e).__name__}: {e}", "tensor": culprit,
                "load_calls_before_raise": len(REC.events)}, REC.events, objs
    return {"raised": False, "load_calls": len(REC.events)}, REC.events, objs


def stream_consistency(results, events, objs):
    """Every load call seen in the stream pass must be the one the per-tensor pass recorded for
    that tensor (tensors are matched by object identity, so buffering wrappers are fine)."""
    mism = []
    seen = defaultdict(list)
    for ev in events:
        name = objs.get(ev.get("tensor_id"))
        if name is None:
            mism.append({"tensor": None, "event": ev.get("param")})
            continue
        seen[name].append(ev)
    for name, evs in seen.items():
        r = results[name]
        got = evs[0].get("param") or evs[0].get("tower")
        want = r.get("param") or r.get("tower")
        if len(evs) != 1 or got != want:
            mism.append({"tensor": name, "stream": [e.get("param") or e.get("tower") for e in evs],
                         "per_tensor": want})
    return {"tensors_with_load_calls": len(seen), "mismatches": mism}


def params_coverage(man, results):
    """Which manifest params received something; derived from the recorded events."""
    got = defaultdict(list)
    for name, r in results.items():
        if r["outcome"] in ("loaded", "stacked", "expert") and r.get("param"):
            got[r["param"]].append((r.get("shard_id"), r.get("expert_id")))
    nothing, partial, towers = [], {}, []
    n_exp = man["loader_context"].get("n_routed_experts")
    for e in man["params"]:
        n = e["name"]
        if n.split(".", 1)[0] in TOWERS and man["loader_context"].get("lm_prefix"):
            towers.append(n)  # the tower's own loader is not replayed (TowerStub)
            continue
        if n not in got:
            nothing.append(n)
            continue
        recs = got[n]
        shards = sorted({s for s, _ in recs if s is not None})
        if any(x is not None for _, x in recs) and n_exp:
            have = {x for _, x in recs if x is not None}
            missing = sorted(set(range(n_exp)) - have)
            if missing:
                partial[n] = {"missing_expert_ids": missing}
        elif shards and n.endswith(tuple(f"qkv_proj.{s}" for s in ("weight", "input_scale", "weight_scale",
                                                                   "weight_scale_2", "bias"))):
            miss = [s for s in ("q", "k", "v") if s not in shards]
            if miss:
                partial[n] = {"missing_shards": miss}
    return nothing, partial, towers


def loader_fingerprint():
    import sglang
    import sglang.srt.models.nemotron_h as nh
    from sglang.srt.models.nemotron_h import NemotronHForCausalLM

    src = inspect.getsource(NemotronHForCausalLM.load_weights)
    return {
        "sglang_version": sglang.__version__,
        "nemotron_h_file": nh.__file__,
        "load_weights_sha256": hashlib.sha256(src.encode()).hexdigest(),
        "expert_branch_has_24434_check": "if name_mapped not in params_dict" in src,
        "expert_mapping_num_experts_from": ("max_n_routed_experts" if "max_n_routed_experts" in src
                                            else "n_routed_experts"),
    }


def replay(ckpt: str, man: dict, manifest_path: str | None = None, expect_old: bool = False):
    """Run the replay on ``ckpt`` with an already-loaded manifest dict; returns the output dict
    (None if ``expect_old`` and this sglang already has the PR #24434 check). Used by main() and,
    in-process after the manifest build, by golden_worker.py."""
    t0 = time.time()
    import warnings

    warnings.filterwarnings("ignore")
    fp = loader_fingerprint()
    if expect_old and fp["expert_branch_has_24434_check"]:
        print(f"error: --pre-24434 interpreter runs sglang {fp['sglang_version']}, which already "
              f"has the PR #24434 check", file=sys.stderr)
        return None
    if man.get("sglang_version") != fp["sglang_version"]:
        print(f"[replay] note: manifest built by sglang {man.get('sglang_version')}, loader is "
              f"sglang {fp['sglang_version']}", file=sys.stderr)

    tap = _LogTap()
    import sglang.utils as su

    su.logger.addHandler(tap)
    logging.getLogger().addHandler(tap)
    target, lm, patched = build_minimal(man)
    tensors = checkpoint_order(ckpt)

    results = run_per_tensor(target, tensors)
    stream, stream_events, objs = run_stream(target, tensors)
    stream["consistency_with_per_tensor"] = stream_consistency(results, stream_events, objs)

    counts = Counter(r["outcome"] for r in results.values())
    nothing, partial, towers = params_coverage(man, results)
    raised = [n for n, r in results.items() if r["outcome"] == "raised"]
    out = OrderedDict()
    out["meta"] = OrderedDict(
        oracle="sglang_replay.py",
        checkpoint=os.path.abspath(ckpt),
        manifest=os.path.abspath(manifest_path) if manifest_path else None,
        manifest_sglang_version=man.get("sglang_version"),
        manifest_backend=man.get("moe_runner_backend"),
        manifest_platform=man.get("platform"),
        loader=fp,
        target_class=type(target).__name__,
        num_tensors=len(tensors),
        mode="per-tensor (one load_weights call per tensor) + one stream pass",
        instrumentation=patched + ["logging.Handler on sglang.utils.logger and the root logger"],
        seconds=round(time.time() - t0, 2),
    )
    out["counts"] = dict(sorted(counts.items()))
    out["first_fatal_in_stream"] = stream
    out["raised_tensors"] = raised
    out["params_without_tensor"] = nothing
    out["params_partially_filled"] = partial
    out["tower_params_not_replayed"] = towers
    out["tensors"] = results
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", default=None, help="write JSON here (default: stdout)")
    ap.add_argument("--pre-24434", action="store_true",
                    help="re-run this script under the old sglang (last release before PR #24434)")
    ap.add_argument("--old-python", default=DEFAULT_OLD_PYTHON)
    ap.add_argument("--expect-old", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help="also print SGLang's log lines")
    a = ap.parse_args(argv)

    if a.pre_24434:
        if not os.path.exists(a.old_python):
            print(f"error: old sglang venv python not found: {a.old_python} (see README: "
                  f"a virtual environment with sglang 0.5.11, ORACLE_OLD_PYTHON)", file=sys.stderr)
            return 2
        cmd = [a.old_python, os.path.abspath(__file__), a.ckpt, "--manifest", a.manifest,
               "--expect-old"]
        if a.out:
            cmd += ["--out", a.out]
        return subprocess.run(cmd).returncode

    if a.verbose:
        logging.basicConfig(level=logging.WARNING)
    with open(a.manifest) as f:
        man = json.load(f)
    out = replay(a.ckpt, man, manifest_path=a.manifest, expect_old=a.expect_old)
    if out is None:
        return 2
    fp = out["meta"]["loader"]
    counts = out["counts"]
    nothing = out["params_without_tensor"]
    stream = out["first_fatal_in_stream"]
    text = json.dumps(out, indent=1)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        print(f"[replay] sglang {fp['sglang_version']}: {dict(counts)}; "
              f"{len(nothing)} params without tensor; stream: "
              f"{'raised at ' + str(stream.get('tensor')) if stream['raised'] else 'ok'} -> {a.out}",
              file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
