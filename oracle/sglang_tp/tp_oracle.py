#!/usr/bin/env python3
"""Run SGLang's REAL Nemotron-H weight loaders on a real gloo process group (one process per TP rank) and
record which checkpoint rows/columns land where on every rank.

    tp_oracle.py --tp N --out DIR [--case MODEL:QUANT:BACKEND ...] [--platform sm100]

Per case (model variant x quant format x MoE runner backend), every rank:
  1. publishes ``ServerArgs(model_path=<config-only dir>, device="cpu", tp_size=N, moe_runner_backend=B)``
     with ``SpawnRanks(world_rank=rank)`` (SGLang's own resolution pipeline), on the first case
     ``init_distributed_environment(world_size=N, rank=rank, backend="gloo")`` +
     ``initialize_model_parallel(backend="gloo")``, then ``initialize_moe_config()``;
  2. builds the REAL model (``ModelConfig.from_server_args`` -> ``_get_quantization_config`` ->
     ``_initialize_model``: real ModelOpt FP8 / NVFP4 / MIXED_PRECISION create_weights) on the CPU;
  3. runs the model's REAL ``load_weights`` (name remapping, stacked/expert mappings, every parameter's own
     weight_loader) once per checkpoint tensor, four times ("passes") with position-encoding values;
  4. decodes every parameter back to "which checkpoint element is here" and compresses it to boxes.

Exact encoding (works for every dtype, packed uint8 and fp8 included):
  every checkpoint element gets a global id (tensor base offset + row-major flat index). Pass k fills each
  element with digit_k(id) + 1, where digit_k is the k-th base-64 digit: values 1..64, exact in bf16/fp16/fp32;
  for U8 / F8_E4M3 tensors the *byte* is set to 1..64 (fp8 copies are bit copies). Before each pass every
  parameter is pre-filled with a sentinel (-3.0 for floats, byte 200 for 8-bit, +0.5 for Mamba ``A``).
  After the pass a parameter element reads back: the sentinel (no loader wrote it), 0 (the loader zero-filled
  it) or a digit. Four passes give ids up to 64**4. ``A`` is loaded through ``-exp(x)``: its decoder applies
  ``log(-v)`` first (digits <= 64 keep exp finite in fp32; the +0.5 sentinel decodes to a non-integer).
No value is ever computed on: the loaders only narrow/copy/fill, which is what is being recorded.

Output (one JSON per case): per parameter family, per parameter: local shape, dtype, parameter class,
weight_loader, quant method, and per rank a list of boxes
  {"dst": [[a,b],...], "src": HF tensor name, "at": [source start per dim]}          (loaded; dst dim i <- src dim i)
  {"dst": ..., "src": ..., "at": ..., "map": [src dim per dst dim, null = length 1]}   (when not that identity)
  {"dst": ..., "fill": "zero" | "untouched"}
Routed-expert tensors are folded: "src" reads ``experts.*.`` and "at"[0] is the expert id (dst dim 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ckpt  # noqa: E402

BASE = 64
PASSES = 4
SENT_FLOAT = -3.0
SENT_BYTE = 200
SENT_A = 0.5

PLATFORMS = {
    "sm100": dict(is_cuda=True, is_blackwell=True, is_sm100=True, is_sm100_or_sm110=True, is_sm110=False,
                  is_sm120=False, is_sm90=False, device_capability=(10, 0), device_sm=100),
    "sm90": dict(is_cuda=True, is_blackwell=False, is_sm100=False, is_sm100_or_sm110=False, is_sm110=False,
                 is_sm120=False, is_sm90=True, device_capability=(9, 0), device_sm=90),
    "cpu": {},
}
LEGACY_PROBES = {
    "sm100": {"is_sm100_supported": True, "is_blackwell_supported": True, "is_sm120_supported": False,
              "is_sm90_supported": False},
    "sm90": {"is_sm100_supported": False, "is_blackwell_supported": False, "is_sm120_supported": False,
             "is_sm90_supported": True},
    "cpu": {},
}

FAMILIES = [
    ("embed", r"embed_tokens\."), ("lm_head", r"^lm_head\."),
    ("attn_qkv", r"\.qkv_proj\."), ("attn_o", r"\.o_proj\."), ("attn_kv_scale", r"\.attn\."),
    ("mamba_in_proj", r"mixer\.in_proj\."), ("mamba_out_proj", r"mixer\.out_proj\."),
    ("mamba_conv1d", r"mixer\.conv1d\."), ("mamba_A_D_dt", r"mixer\.(A|D|dt_bias)$"),
    ("mamba_norm", r"mixer\.norm\."),
    ("moe_experts", r"mixer\.experts\."), ("moe_shared", r"shared_experts\."),
    ("moe_latent", r"_latent_proj\."), ("moe_gate", r"mixer\.gate\."),
    ("mlp", r"mixer\.(up|down)_proj\."), ("norms", r"norm"),
]


def family(name: str) -> str:
    for f, pat in FAMILIES:
        if re.search(pat, name):
            return f
    return "other"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qualname(fn) -> str | None:
    if fn is None:
        return None
    f = getattr(fn, "__func__", fn)
    if hasattr(f, "func"):  # functools.partial
        f = f.func
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"


# ---------------------------------------------------------------------------------------------- encoding


def build_sources(tensors):
    """Global id bases and the folded (expert-pattern) naming of every checkpoint tensor."""
    bases, total = [], 0
    pats, pat_ix, pref = [], {}, []
    for name, shape, _ in tensors:
        bases.append(total)
        total += math.prod(shape) if shape else 1
        m = re.search(r"experts\.(\d+)\.", name)
        if m and ".shared_experts." not in name:
            pat = name[:m.start()] + "experts.*." + name[m.end():]
            lead = int(m.group(1))
        else:
            pat, lead = name, None
        if pat not in pat_ix:
            pat_ix[pat] = len(pats)
            pats.append(pat)
        pref.append((pat_ix[pat], lead))
    assert total < BASE ** PASSES, total
    return bases, total, pats, pref


def make_tensor(torch, shape, dtype, base, k):
    n = math.prod(shape) if shape else 1
    ids = torch.arange(base, base + n, dtype=torch.int64)
    dig = (ids // (BASE ** k)) % BASE + 1
    if dtype in ("U8", "F8_E4M3"):
        t = dig.to(torch.uint8)
        if dtype == "F8_E4M3":
            t = t.view(torch.float8_e4m3fn)
    else:
        t = dig.to({"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[dtype])
    return t.reshape(shape)


def prefill(torch, p, is_a: bool):
    if p.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        p.data.view(torch.uint8).fill_(SENT_BYTE)
    elif p.dtype.is_floating_point:
        p.data.fill_(SENT_A if is_a else SENT_FLOAT)
    else:
        p.data.fill_(-3)


def read_digits(torch, np, p, is_a: bool):
    """Per element: -1 untouched (sentinel), 0 zero-filled, 1..64 a digit; -9 anything else."""
    d = p.data.detach().cpu()
    if d.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        v = d.contiguous().view(torch.uint8).numpy().astype(np.int64)
        out = np.where(v == SENT_BYTE, -1, np.where((v >= 0) & (v <= BASE), v, -9))
        return out
    v = d.to(torch.float64).numpy()
    if is_a:
        with np.errstate(all="ignore"):
            x = np.where(v < 0, np.log(-v), np.nan)
        r = np.rint(x)
        ok = np.abs(x - r) < 1e-3
        return np.where(v > 0, -1, np.where(ok & (r >= 0) & (r <= BASE), r, -9)).astype(np.int64)
    r = np.rint(v)
    ok = v == r
    return np.where(v == SENT_FLOAT, -1, np.where(ok & (r >= 0) & (r <= BASE), r, -9)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- compression


def _shift(a, b):
    """How description b follows a along one more dst index: ('src', j) all loaded boxes advance src dim j by 1,
    ('fill',) fills only and equal, or None."""
    if len(a) != len(b):
        return None
    j = None
    loaded = False
    for x, y in zip(a, b):
        if x[0] != y[0] or x[2] != y[2] or x[3] != y[3]:
            return None
        if x[0] < 0:
            continue
        loaded = True
        diff = [q - p for p, q in zip(x[1], y[1])]
        nz = [i for i, dv in enumerate(diff) if dv]
        if len(nz) != 1 or diff[nz[0]] != 1:
            return None
        if j is None:
            j = nz[0]
        elif j != nz[0]:
            return None
    return ("src", j) if loaded else ("fill",)


def describe(T, C):
    """Boxes (tid, at, dst ranges, map) of a (sub)array; tid -1 zero, -2 untouched, -3 garbage."""
    if T.ndim == 0:
        t = int(T)
        return [(t, tuple(C.tolist()) if t >= 0 else (), (), ())]
    n = T.shape[0]
    subs = [describe(T[i], C[i]) for i in range(n)]
    out = []
    i = 0
    while i < n:
        k = i + 1
        mode = None
        while k < n:
            s = _shift(subs[k - 1], subs[k])
            if s is None or (mode is not None and s != mode):
                break
            mode = s
            k += 1
        j = mode[1] if mode and mode[0] == "src" else None
        for tid, at, dst, mp in subs[i]:
            out.append((tid, at, ((i, k),) + dst, (j if tid >= 0 else None,) + mp))
        i = k
    return out


def boxes_json(boxes, pats):
    res = []
    for tid, at, dst, mp in boxes:
        d = [list(r) for r in dst]
        if tid >= 0:
            b = {"dst": d, "src": pats[tid], "at": list(at)}
            ident = len(mp) == len(at) and all(m == i or (m is None and r[1] - r[0] == 1)
                                               for i, (m, r) in enumerate(zip(mp, dst)))
            if not ident:
                b["map"] = list(mp)
            res.append(b)
        else:
            res.append({"dst": d, "fill": {-1: "zero", -2: "untouched"}.get(tid, "garbage")})
    return res


def decode_param(np, digit_passes, bases, pref, shapes):
    """digit arrays per pass -> (T, C): pattern id (or -1 zero, -2 untouched, -3 garbage) + source coords."""
    D = np.stack(digit_passes)  # [PASSES, *shape]
    shape = D.shape[1:]
    untouched = (D == -1).any(0)
    garbage = (D == -9).any(0) | ((D == 0).any(0) & ~(D == 0).all(0))
    zero = (D == 0).all(0)
    ids = np.zeros(shape, dtype=np.int64)
    for k in range(D.shape[0]):
        ids += np.clip(D[k] - 1, 0, None) * (BASE ** k)
    T = np.full(shape, -3, dtype=np.int64)
    T[zero] = -1
    T[untouched] = -2
    loaded = ~(untouched | garbage | zero)
    maxnd = 1 + max(len(s) for s in shapes)
    C = np.zeros(shape + (maxnd,), dtype=np.int64)
    bases_a = np.asarray(bases)
    flat_idx = np.nonzero(loaded.reshape(-1))[0]
    if flat_idx.size:
        idv = ids.reshape(-1)[flat_idx]
        tix = np.searchsorted(bases_a, idv, side="right") - 1
        Tf = T.reshape(-1)
        Cf = C.reshape(-1, maxnd)
        for t in np.unique(tix):
            sel = tix == t
            pid, lead = pref[t]
            off = idv[sel] - bases[t]
            shp = shapes[t]
            coords = np.unravel_index(off, shp) if shp else ()
            cols = ([np.full(off.shape, lead)] if lead is not None else []) + list(coords)
            pos = flat_idx[sel]
            Tf[pos] = pid
            for ci, col in enumerate(cols):
                Cf[pos, ci] = col
    return T, C, loaded


# ---------------------------------------------------------------------------------------------- worker


def _legacy_patches(platform, log):
    import torch

    import sglang.srt.layers.quantization.modelopt_quant  # noqa: F401
    import sglang.srt.models.nemotron_h  # noqa: F401
    n = 0
    for mname, mod in list(sys.modules.items()):
        if not mname.startswith("sglang") or mod is None:
            continue
        for pname, val in LEGACY_PROBES[platform].items():
            cur = getattr(mod, pname, None)
            if callable(cur) and not isinstance(cur, type):
                setattr(mod, pname, (lambda _v=val: _v))
                n += 1
    patches = [f"legacy capability probes -> {platform} in {n} namespaces"]
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        patches.append("torch.Tensor.cuda -> identity (0.5.11 swizzle_blockscale sizes a tensor with .cuda())")
    return patches


_OVERRIDE: list = []


def no_device_communicators(patches):
    """Process groups on the CPU: SGLang picks PyNccl for every group unless the platform is an out-of-tree one
    that says otherwise (``init_model_parallel_group``); gloo needs none of the device communicators. Only the
    ``use_*`` defaults of that one function change; group membership and ranks are SGLang's."""
    from sglang.srt.distributed import parallel_state as ps

    orig = ps.init_model_parallel_group
    if getattr(orig, "__oracle__", False):
        return

    import inspect

    known = set(inspect.signature(orig).parameters)

    def init_model_parallel_group(*a, **k):
        for key in ("use_pynccl", "use_custom_allreduce", "use_mscclpp", "use_torch_symm_mem_allreduce"):
            if key in known:
                k[key] = False
        return orig(*a, **k)

    init_model_parallel_group.__oracle__ = True
    ps.init_model_parallel_group = init_model_parallel_group
    patches.append("parallel_state.init_model_parallel_group: use_pynccl/custom_allreduce/mscclpp/symm_mem "
                   "forced False (CPU gloo groups; no device communicator)")


def build_model(rank, world, case, ckdir, port, first, platform, log):
    import importlib.util

    import torch

    legacy = importlib.util.find_spec("sglang.srt.runtime_context") is None
    model_name, quant, backend = case
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.moe import utils as moe_utils
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(model_path=ckdir, device="cpu", tp_size=world, moe_runner_backend=backend,
                    disable_radix_cache=True, load_format="auto")
    if not legacy:
        from sglang.srt.runtime_context import SpawnRanks, publish

        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=rank))
        if first:
            init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(backend="gloo")
        if not _OVERRIDE and PLATFORMS[platform]:
            # the emulated GPU is stated only after the groups exist (with is_cuda the GroupCoordinator would
            # open a PyNccl communicator); the config is then published again (last publish wins) so the
            # resolution pipeline and the model constructors see it.
            from sglang.srt.runtime_context import override_platform

            _OVERRIDE.append(override_platform(**PLATFORMS[platform]).install())
            sa = ServerArgs(model_path=ckdir, device="cpu", tp_size=world, moe_runner_backend=backend,
                            disable_radix_cache=True, load_format="auto")
            publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=rank))
        moe_utils.initialize_moe_config()
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.model_executor.model_runner_components.load_model_utils import build_load_config
        from sglang.srt.model_loader.loader import _get_quantization_config, _initialize_model
        from sglang.srt.model_loader.utils import set_default_torch_dtype

        mc = ModelConfig.from_server_args(sa)
        lc = build_load_config(server_args=sa, tp_rank=rank, remote_instance_weight_transporter_engine=None,
                               remote_instance_weight_transporter_session_id="", draft_model_idx=None,
                               weight_cache_mode="off", weight_cache_socket=None)
    else:
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(sa)
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.model_loader.loader import _get_quantization_config, _initialize_model
        from sglang.srt.model_loader.utils import set_default_torch_dtype

        mc = ModelConfig.from_server_args(sa)
        if first:
            init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
        # what ModelRunner.init_torch_distributed does next (attention DP off: attention TP = TP)
        from sglang.srt.layers.dp_attention import initialize_dp_attention

        initialize_dp_attention(server_args=sa, model_config=mc)
        moe_utils.initialize_moe_config(sa)
        lc = LoadConfig(load_format=sa.load_format, download_dir=sa.download_dir)
    qc = _get_quantization_config(mc, lc)
    with set_default_torch_dtype(mc.dtype):
        with torch.device("cpu"):
            model = _initialize_model(mc, lc, qc)
    resolved = str(moe_utils.get_moe_runner_backend().value)
    return model, qc, resolved


def run_case(rank, world, case, ckdir, port, first, platform, log):
    import numpy as np
    import torch

    t0 = time.time()
    res = {"case": list(case), "rank": rank}
    try:
        model, qc, resolved = build_model(rank, world, case, ckdir, port, first, platform, log)
    except Exception as e:  # construction refused (an assert / ValueError of SGLang): that is the result
        res["construct_error"] = f"{type(e).__name__}: {e}"
        res["construct_traceback"] = traceback.format_exc()[-3000:]
        return res
    t_built = time.time()
    res["moe_runner_backend"] = resolved
    res["quant_config"] = type(qc).__name__ if qc is not None else None
    tensors = json.load(open(os.path.join(ckdir, "tensors.json")))
    tensors = [(n, tuple(s), d) for n, s, d in tensors]
    bases, total, pats, pref = build_sources(tensors)
    shapes = [s for _, s, _ in tensors]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    is_a = {n: n.endswith("mixer.A") for n in params}
    digits = {n: [] for n in params}
    errors = {}
    for k in range(PASSES):
        with torch.no_grad():
            for n, p in params.items():
                prefill(torch, p, is_a[n])
            for (name, shape, dt), b in zip(tensors, bases):
                t = make_tensor(torch, shape, dt, b, k)
                try:
                    model.load_weights([(name, t)])
                except Exception as e:
                    if k == 0:
                        errors[name] = f"{type(e).__name__}: {e}"[:500]
            for n, p in params.items():
                digits[n].append(read_digits(torch, np, p, is_a[n]))
    out = {}
    placed = set()
    for n, p in params.items():
        T, C, loaded = decode_param(np, digits[n], bases, pref, shapes)
        placed.update(np.unique(T[T >= 0]).tolist())
        mod = modules.get(n.rsplit(".", 1)[0])
        qm = getattr(mod, "quant_method", None)
        ent = {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
               "param_class": type(p).__name__, "weight_loader": qualname(getattr(p, "weight_loader", None)),
               "module_class": type(mod).__name__ if mod is not None else None,
               "quant_method": type(qm).__name__ if qm is not None else None}
        if T.ndim == 0:
            T1, C1 = T.reshape(1), C.reshape(1, -1)
            ent["scalar"] = True
        else:
            T1, C1 = T, C
        ent["boxes"] = boxes_json(describe(T1, C1), pats)
        out[n] = ent
    # trim "at" to the source rank (pattern dims)
    pat_nd = {}
    for (name, shape, _), (pid, lead) in zip(tensors, pref):
        pat_nd[pats[pid]] = len(shape) + (1 if lead is not None else 0)
    for ent in out.values():
        for b in ent["boxes"]:
            if "at" in b:
                nd = pat_nd[b["src"]]
                b["at"] = b["at"][:nd]
                if "map" in b:
                    mp = [m if (m is None or m < nd) else None for m in b["map"]]
                    ident = len(mp) == nd and all(m == i or (m is None and r[1] - r[0] == 1)
                                                  for i, (m, r) in enumerate(zip(mp, b["dst"])))
                    if ident:
                        del b["map"]
                    else:
                        b["map"] = mp
    res["params"] = out
    res["load_errors"] = errors
    placed_names = {pats[i] for i in placed}
    res["sources_not_placed"] = sorted({pats[pid] for pid, _ in pref} - placed_names)
    res["seconds"] = round(time.time() - t0, 2)
    res["build_seconds"] = round(t_built - t0, 2)
    return res


def worker(rank, world, port, cases, root, outdir, platform):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("SGLANG_LOG_LEVEL", "error")
    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    import importlib.util

    patches = []
    if importlib.util.find_spec("sglang.srt.runtime_context") is None:
        patches = _legacy_patches(platform, print)
    no_device_communicators(patches)
    import sglang

    first = True
    for case in cases:
        ckdir = os.path.join(root, f"{case[0]}-{case[1]}")
        try:
            res = run_case(rank, world, case, ckdir, port, first, platform, print)
        except Exception as e:
            res = {"case": list(case), "rank": rank, "harness_error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
        # the process group is set up by the first build that reached init_distributed_environment
        from sglang.srt.distributed import parallel_state as ps

        first = not ps.model_parallel_is_initialized()
        res["sglang_version"] = sglang.__version__
        res["torch_version"] = torch.__version__
        res["platform"] = platform
        res["patches"] = patches
        with open(os.path.join(outdir, f"{'-'.join(case)}-rank{rank}.json"), "w") as f:
            json.dump(res, f)
        print(f"[rank {rank}] {case} done ({res.get('build_seconds')}s build, {res.get('seconds')}s) "
              f"{res.get('construct_error') or res.get('harness_error') or ''}", flush=True)


def merge(world, case, outdir):
    """The per-rank records of one case -> one document grouped by family."""
    ranks = []
    for r in range(world):
        with open(os.path.join(outdir, f"{'-'.join(case)}-rank{r}.json")) as f:
            ranks.append(json.load(f))
    r0 = ranks[0]
    doc = {"case": {"model": case[0], "quant": case[1], "moe_runner_backend_requested": case[2]},
           "tp": world, "sglang_version": r0.get("sglang_version"), "torch_version": r0.get("torch_version"),
           "platform": r0.get("platform"), "patches": r0.get("patches"),
           "moe_runner_backend": r0.get("moe_runner_backend"), "quant_config": r0.get("quant_config"),
           "config": ckpt.config(case[0])}
    errs = {r["rank"]: r.get("construct_error") or r.get("harness_error") for r in ranks
            if r.get("construct_error") or r.get("harness_error")}
    if errs:
        doc["construct_error"] = errs
        return doc
    fams: dict = {}
    for name, ent in r0["params"].items():
        e = {k: v for k, v in ent.items() if k != "boxes"}
        shapes = {r["rank"]: r["params"][name]["shape"] for r in ranks}
        if len({tuple(s) for s in shapes.values()}) > 1:
            e["shape_per_rank"] = shapes
        e["ranks"] = {str(r["rank"]): r["params"][name]["boxes"] for r in ranks}
        fams.setdefault(family(name), {})[name] = e
    doc["families"] = dict(sorted(fams.items()))
    le = {r["rank"]: r["load_errors"] for r in ranks if r.get("load_errors")}
    if le:
        doc["load_errors"] = le
    nf = {r["rank"]: r["sources_not_placed"] for r in ranks if r.get("sources_not_placed")}
    if nf:
        doc["sources_not_placed"] = nf
    return doc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--out", required=True, help="directory for <model>-<quant>-<backend>-tp<N>.json")
    ap.add_argument("--case", action="append", default=[], help="MODEL:QUANT:BACKEND (repeatable)")
    ap.add_argument("--platform", default="sm100", choices=sorted(PLATFORMS))
    a = ap.parse_args()
    cases = [tuple(c.split(":")) for c in a.case]
    work = tempfile.mkdtemp(prefix="tp_oracle_")
    for m, q in sorted({(c[0], c[1]) for c in cases}):
        ckpt.write(m, q, work)
    raw = os.path.join(work, "raw")
    os.makedirs(raw)
    import torch.multiprocessing as mp

    port = free_port()
    t0 = time.time()
    mp.start_processes(worker, args=(a.tp, port, cases, work, raw, a.platform), nprocs=a.tp, join=True,
                       start_method="spawn")
    os.makedirs(a.out, exist_ok=True)
    for case in cases:
        doc = merge(a.tp, case, raw)
        path = os.path.join(a.out, f"{'-'.join(case)}-tp{a.tp}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=None, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {path} {'(construct error)' if 'construct_error' in doc else ''}")
    print(f"tp {a.tp}: {len(cases)} cases in {time.time() - t0:.0f}s (work dir {work})")


if __name__ == "__main__":
    main()
