#!/usr/bin/env python3
"""Run vLLM's REAL Nemotron-H weight loaders on a real gloo process group (one process per TP rank) and record
which checkpoint rows/columns land where on every rank — the vLLM twin of ``oracle/sglang_tp/tp_oracle.py``.

    tp_oracle.py --tp N --out DIR [--case MODEL:QUANT ...] [--platform sm100]   (a vllm-X venv's python)

Per case (a ``oracle/sglang_tp/ckpt.py`` model variant x quant format), every rank:
  1. resolves the engine config as ``vllm serve`` does (``EngineArgs(model=<config-only dir>,
     tensor_parallel_size=N, distributed_executor_backend="external_launcher").create_engine_config()``: vLLM's
     own mode for one process per rank started from outside), on the first case
     ``init_distributed_environment(world_size=N, rank=rank, backend="gloo")`` +
     ``ensure_model_parallel_initialized(N, 1)``;
  2. builds the REAL model on the CPU (``model_loader.utils.initialize_model``: real ModelOpt create_weights, real
     TP sizes and ranks);
  3. runs the model's REAL ``load_weights`` (``WeightsMapper``, stacked/expert mappings, every parameter's own
     weight_loader) once per checkpoint tensor, four times with position-encoding values;
  4. decodes every parameter back to "which checkpoint element is here" and compresses it to boxes.
The encoding, the decoding and the JSON format are ``oracle/sglang_tp``'s (imported from there; see its README),
so ``tests/test_tp_golden.py`` reads both engines' maps alike. ``"sglang_version"`` is ``"vllm_version"`` here.

Host shims (none creates, removes or reshapes a parameter): the emulated CUDA platform of
``oracle/vllm/vllm_platform.py`` (capability facts only), whose device communicator is vLLM's
``DeviceCommunicatorBase`` (gloo CPU groups need no NCCL; group membership and ranks are vLLM's), the stub
``libcuda.so.1`` and ``VLLM_DISABLE_SHARED_EXPERTS_STREAM=1`` as for ``oracle/vllm/vllm_oracle.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ORACLE = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ORACLE, "sglang_tp"))
sys.path.insert(0, os.path.join(ORACLE, "vllm"))
import ckpt  # noqa: E402
import tp_oracle as enc  # noqa: E402  (engine-neutral encoding / decoding / merge of the SGLang TP oracle)

PATCHES: list[str] = []

#: Variants beyond ``ckpt.MODELS``, each sized so that TP 2 breaks one of vLLM's divisibility rules (the
#: refusal, or the load error, is the golden).
EXTRA = {
    "attn3": dict(hybrid_override_pattern="*", num_attention_heads=3, num_key_value_heads=1),
    "kv3": dict(hybrid_override_pattern="*", num_attention_heads=6, num_key_value_heads=3),
    "mamba5": dict(hybrid_override_pattern="M", mamba_num_heads=5),
    "groups3": dict(hybrid_override_pattern="M", n_groups=3, mamba_n_groups=3),
    "moe255": dict(hybrid_override_pattern="E", moe_intermediate_size=255),
    "moe272": dict(hybrid_override_pattern="E", moe_intermediate_size=272),
    "mlp255": dict(hybrid_override_pattern="-", intermediate_size=255),
    # expert parallelism (``--ep``): 5 experts on 2 ranks, an uneven split
    "moe5e": dict(hybrid_override_pattern="E", n_routed_experts=5),
}
#: Nemotron-H v1 configs (``rms_norm_eps``, no MoE layers: the 8B / 47B / 56B layout): vLLM 0.10.2 / 0.11.0 read
#: ``config.rms_norm_eps`` and refuse every config without it (all of the above), so their TP rules show on these.
#: ``v1`` has every dense family, the others are the rule-breaking variants above with the v1 norm key.
EXTRA["v1"] = dict(hybrid_override_pattern="M*-")
for _k in ("g1", "bias", "g1bias"):
    EXTRA["v1" + _k] = dict(ckpt.MODELS[_k])
for _k in ("attn3", "kv3", "mamba5", "groups3", "mlp255"):
    EXTRA["v1" + _k] = dict(EXTRA[_k])
#: No Mamba layer, so a quantized model builds at TP 2 where the Mamba mixer refuses quantized TP (``mamba-quant``,
#: 0.9.1 – 0.10.2) and its quantized linears' rank maps show: ``v1dense`` (attention + MLP), ``v1mlp48`` (NVFP4
#: ``down_proj`` K 48 / 2 = 24 per rank: not whole 16-element blocks).
EXTRA["v1dense"] = dict(hybrid_override_pattern="*-")
EXTRA["v1mlp48"] = dict(hybrid_override_pattern="-", intermediate_size=48)
#: ``expand`` is made ``mamba_num_heads * mamba_head_dim // hidden_size`` where that divides (1 here; real v1 configs
#: hold ``expand * hidden_size == mamba_num_heads * mamba_head_dim``): 0.9.1 – 0.10.0 size the Mamba mixer from
#: ``expand * hidden_size``, later releases never read ``expand`` (their maps, made with the base's 2, are unchanged
#: by it). The maps record the config they ran.
for _k in EXTRA:
    if _k.startswith("v1"):
        EXTRA[_k]["rms_norm_eps"] = 1e-5
        _c = {**ckpt.BASE, **EXTRA[_k]}
        if (_c["mamba_num_heads"] * _c["mamba_head_dim"]) % _c["hidden_size"] == 0:
            EXTRA[_k]["expand"] = _c["mamba_num_heads"] * _c["mamba_head_dim"] // _c["hidden_size"]
ckpt.MODELS.update(EXTRA)


def install_platform(platform: str) -> None:
    import vllm_platform

    vllm_platform.install(platform)
    from vllm.platforms import current_platform

    cls = type(current_platform)

    @classmethod
    def get_device_communicator_cls(c):
        return "vllm.distributed.device_communicators.base_device_communicator.DeviceCommunicatorBase"

    cls.get_device_communicator_cls = get_device_communicator_cls
    PATCHES.append("emulated CUDA platform (oracle/vllm/vllm_platform.py); device communicator "
                   "DeviceCommunicatorBase (CPU gloo groups, no NCCL)")
    PATCHES.extend(vllm_platform.TRITON_STANDIN)
    relax_paged_attention_head_sizes()


def relax_paged_attention_head_sizes() -> None:
    """Releases that build Nemotron-H on the V0 engine (0.10.1.1) pick the XFormers backend on this host, whose
    constructor refuses a head size outside ``PagedAttention.get_supported_head_sizes()`` (32 – 256; the variants'
    head_dim is 16, real models' 128): that list gains 16, recorded when asked. A kernel's limit, as
    ``vllm_platform``'s relaxed backend selection: the backend creates no parameter and maps no name."""
    try:
        from vllm.attention.ops.paged_attn import PagedAttention
    except ImportError:
        return
    real = PagedAttention.get_supported_head_sizes

    def sizes():
        note = "PagedAttention.get_supported_head_sizes() + [16] (the XFormers backend's head-size limit)"
        if note not in PATCHES:
            PATCHES.append(note)
        return [*real(), 16]

    PagedAttention.get_supported_head_sizes = staticmethod(sizes)


def build_model(rank, world, ckdir, port, first, log, ep=False):
    import torch
    import vllm_oracle
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model

    set_default_torch_dtype = vllm_oracle.default_dtype_helper()  # its home moved in 0.11.1
    vllm_oracle.config_standin(log)
    # external_launcher asserts a seed; 0 is EngineArgs' default from 0.10.2, None before (no parameter depends on it)
    seed = {"seed": 0} if next(f for f in dataclasses.fields(EngineArgs) if f.name == "seed").default is None else {}
    if seed and not any(p.startswith("seed=0") for p in PATCHES):
        PATCHES.append("seed=0 (external_launcher asserts a seed; the default of later releases)")
    ea = EngineArgs(model=ckdir, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
                    load_format="safetensors", tensor_parallel_size=world,
                    distributed_executor_backend="external_launcher", enable_expert_parallel=ep, **seed)
    vc = ea.create_engine_config()
    with set_current_vllm_config(vc):
        if first:
            init_distributed_environment(world_size=world, rank=rank, local_rank=rank,
                                         distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
            ensure_model_parallel_initialized(world, 1)
        with set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
            model = initialize_model(vllm_config=vc)
    return vc, model


def run_case(rank, world, case, ckdir, port, first, log, ep=False):
    import numpy as np
    import torch
    from vllm.config import set_current_vllm_config

    t0 = time.time()
    res = {"case": list(case), "rank": rank}
    try:
        vc, model = build_model(rank, world, ckdir, port, first, log, ep)
    except Exception as e:  # construction refused (an assert / ValueError of vLLM): that is the result
        res["construct_error"] = f"{type(e).__name__}: {e}"
        res["construct_traceback"] = traceback.format_exc()[-3000:]
        return res
    t_built = time.time()
    res["quant_config"] = type(vc.quant_config).__name__ if vc.quant_config is not None else None
    res["moe_runner_backend"] = "vllm"
    with open(os.path.join(ckdir, "tensors.json")) as f:
        tensors = [(n, tuple(s), d) for n, s, d in json.load(f)]
    bases, _total, pats, pref = enc.build_sources(tensors)
    shapes = [s for _, s, _ in tensors]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    is_a = {n: n.endswith("mixer.A") for n in params}
    digits = {n: [] for n in params}
    errors = {}
    with set_current_vllm_config(vc):
        for k in range(enc.PASSES):
            with torch.no_grad():
                for n, p in params.items():
                    enc.prefill(torch, p, is_a[n])
                for (name, shape, dt), b in zip(tensors, bases, strict=True):
                    t = enc.make_tensor(torch, shape, dt, b, k)
                    try:
                        model.load_weights([(name, t)])
                    except Exception as e:
                        if k == 0:
                            errors[name] = f"{type(e).__name__}: {e}"[:500]
                for n, p in params.items():
                    digits[n].append(enc.read_digits(torch, np, p, is_a[n]))
    out = {}
    placed = set()
    for n, p in params.items():
        T, C, _loaded = enc.decode_param(np, digits[n], bases, pref, shapes)
        placed.update(np.unique(T[T >= 0]).tolist())
        mod = modules.get(n.rsplit(".", 1)[0])
        qm = getattr(mod, "quant_method", None)
        ent = {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
               "param_class": type(p).__name__, "weight_loader": enc.qualname(getattr(p, "weight_loader", None)),
               "module_class": type(mod).__name__ if mod is not None else None,
               "quant_method": type(qm).__name__ if qm is not None else None}
        if T.ndim == 0:
            T1, C1 = T.reshape(1), C.reshape(1, -1)
            ent["scalar"] = True
        else:
            T1, C1 = T, C
        ent["boxes"] = enc.boxes_json(enc.describe(T1, C1), pats)
        out[n] = ent
    pat_nd = {}
    for (_name, shape, _), (pid, lead) in zip(tensors, pref, strict=True):
        pat_nd[pats[pid]] = len(shape) + (1 if lead is not None else 0)
    for ent in out.values():
        for b in ent["boxes"]:
            if "at" in b:
                nd = pat_nd[b["src"]]
                b["at"] = b["at"][:nd]
                if "map" in b:
                    mp = [m if (m is None or m < nd) else None for m in b["map"]]
                    ident = len(mp) == nd and all(m == i or (m is None and r[1] - r[0] == 1)
                                                  for i, (m, r) in enumerate(zip(mp, b["dst"], strict=False)))
                    if ident:
                        del b["map"]
                    else:
                        b["map"] = mp
    res["params"] = out
    res["load_errors"] = errors
    res["sources_not_placed"] = sorted({pats[pid] for pid, _ in pref} - {pats[i] for i in placed})
    res["seconds"] = round(time.time() - t0, 2)
    res["build_seconds"] = round(t_built - t0, 2)
    return res


def worker(rank, world, port, cases, root, outdir, platform, ep=False):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    install_platform(platform)
    import vllm
    import vllm_oracle

    vllm_oracle.inspect_in_process(print)  # VLLM_ORACLE_INSPECT_IN_PROCESS=1: 0.10.x caches no inspection
    from vllm.distributed import parallel_state as ps

    first = True
    for case in cases:
        ckdir = os.path.join(root, f"{case[0]}-{case[1]}")
        try:
            res = run_case(rank, world, case, ckdir, port, first, print, ep)
        except Exception as e:
            res = {"case": list(case), "rank": rank, "harness_error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
        first = not ps.model_parallel_is_initialized()
        res["sglang_version"] = res["vllm_version"] = vllm.__version__
        res["torch_version"] = torch.__version__
        res["platform"] = platform
        res["patches"] = PATCHES
        with open(os.path.join(outdir, f"{'-'.join(case)}-rank{rank}.json"), "w") as f:
            json.dump(res, f)
        print(f"[rank {rank}] {case} done ({res.get('build_seconds')}s build, {res.get('seconds')}s) "
              f"{res.get('construct_error') or res.get('harness_error') or ''}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--out", required=True, help="directory for <model>-<quant>-vllm-tp<N>.json")
    ap.add_argument("--case", action="append", default=[], help="MODEL:QUANT (repeatable)")
    ap.add_argument("--platform", default="sm100")
    ap.add_argument("--ep", action="store_true",
                    help="--enable-expert-parallel (EngineArgs.enable_expert_parallel): files end -tp<N>-ep.json")
    ap.add_argument("--nested-modelopt", action="store_true",
                    help="config.json carries the nested ModelOpt quantization_config 0.9.1 / 0.9.2 read "
                         "(ckpt.write(nested=True)): files end <quant>-nested-vllm-tp<N>.json")
    ap.add_argument("--nested-method", default=None,
                    help="with --nested-modelopt: this quant_method for every case (a name that does not match the "
                         "recipe's algorithm): files end <quant>-nested-<method>-vllm-tp<N>.json")
    a = ap.parse_args()
    cases = [tuple(c.split(":")) + ("vllm",) for c in a.case]
    work = tempfile.mkdtemp(prefix="vllm_tp_oracle_")
    for m, q, _ in cases:
        ckpt.write(m, q, work, nested=a.nested_modelopt, method=a.nested_method)
    raw = os.path.join(work, "raw")
    os.makedirs(raw)
    import torch.multiprocessing as mp

    port = enc.free_port()
    t0 = time.time()
    mp.start_processes(worker, args=(a.tp, port, cases, work, raw, a.platform, a.ep), nprocs=a.tp, join=True,
                       start_method="spawn")
    os.makedirs(a.out, exist_ok=True)
    for case in cases:
        doc = enc.merge(a.tp, case, raw)
        doc["vllm_version"] = doc.pop("sglang_version")
        doc["case"]["engine"] = "vllm"
        doc["enable_expert_parallel"] = a.ep
        # the config files as written (config.json with its quantization_config, hf_quant_config.json or None):
        # tests/test_tp_golden.py gives nhcheck the very files the engine read
        ckdir = os.path.join(work, f"{case[0]}-{case[1]}")
        with open(os.path.join(ckdir, "config.json")) as f:
            doc["config"] = json.load(f)
        hq = os.path.join(ckdir, "hf_quant_config.json")
        doc["hf_quant_config"] = json.load(open(hq)) if os.path.exists(hq) else None
        form = ("nested", a.nested_method) if a.nested_method else ("nested",)
        stem = "-".join((*case[:2], *form, case[2]) if a.nested_modelopt else case)
        path = os.path.join(a.out, f"{stem}-tp{a.tp}{'-ep' if a.ep else ''}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=None, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {path} {'(construct error)' if 'construct_error' in doc else ''}")
    print(f"tp {a.tp}: {len(cases)} cases in {time.time() - t0:.0f}s (work dir {work})")


if __name__ == "__main__":
    main()
