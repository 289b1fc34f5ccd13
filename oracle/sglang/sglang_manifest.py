#!/usr/bin/env python3
"""Build SGLang's REAL model for a NemotronH checkpoint on the meta device and dump its manifest.

    sglang_manifest.py CKPT_DIR --out manifest.json [--tp 1]
        [--moe-runner-backend auto|flashinfer_trtllm|flashinfer_cutlass|marlin|triton|...]
        [--platform sm100|sm120|sm90|cpu] [--device auto|meta|cpu] [--backend-matrix]
        [--draft] [--pre-24434 [--old-python PY]]

``--pre-24434`` re-runs this script under the old sglang venv (0.5.11, the last release before
PR #24434); that version predates runtime_context, so ``build_legacy`` is used there (see its
docstring and the README for the two capability/device shims it needs).

What runs (all SGLang code, nothing re-implemented):
  1. ``ServerArgs(model_path=CKPT_DIR, device="cpu", ...)`` is published with
     ``runtime_context.publish`` -> SGLang's full server-args resolution pipeline runs, including
     the NemotronH model override that picks the MoE runner backend and the quantization name.
  2. ``init_distributed_environment(world_size=1, backend="gloo")`` +
     ``initialize_model_parallel(backend="gloo")`` and ``initialize_moe_config()`` (what the
     scheduler does before building a model).
  3. ``ModelConfig.from_server_args`` -> ``build_load_config`` ->
     ``model_loader.loader._get_quantization_config`` (SGLang picks ModelOptFp4Config /
     ModelOptFp8Config / ModelOptMixedPrecisionConfig from config.json / hf_quant_config.json and
     applies the model class's hf_to_sglang_mapper) -> ``_initialize_model`` under
     ``set_default_torch_dtype(model_config.dtype)`` and ``torch.device("meta")``.
     This is DefaultModelLoader.initialize_model_for_startup with "meta" instead of the GPU.
  4. Every ``model.named_parameters()`` entry is dumped: name, shape, dtype, parameter class,
     weight_loader, owning module class and its quant_method class.

Capability probes
  SGLang answers "what machine is this" through ``runtime_context.get_platform()``, and offers
  ``runtime_context.override_platform(...)`` as the sanctioned way to state it. ``--platform``
  uses only that API (no monkeypatching): the facts are installed before publish, so the
  resolution pipeline (e.g. NemotronH's "auto" MoE-backend choice) and model construction both
  see the emulated GPU. The facts touch only capability checks: they decide which backend "auto"
  resolves to and whether NVFP4 MoE's constructor accepts the backend; parameter registration is
  then a function of the resolved backend (recorded in the manifest), not of the facts.
  Without an emulated Blackwell/Hopper, SGLang refuses to build NVFP4 MoE on a CPU host
  ("Current platform does not support NVFP4 quantization with the selected MoE backend").

Other non-parameter settings (documented in README): ``disable_radix_cache=True`` (the Mamba
radix-cache 'extra_buffer' check asserts CUDA; it is a KV-cache policy and builds no parameter).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Platform fact sets for runtime_context.override_platform (names are SGLang's probe names).
PLATFORMS = {
    # datacenter Blackwell (B200/GB200): NemotronH "auto" -> flashinfer_trtllm
    "sm100": dict(is_cuda=True, is_blackwell=True, is_sm100=True, is_sm100_or_sm110=True,
                  is_sm110=False, is_sm120=False, is_sm90=False, device_capability=(10, 0),
                  device_sm=100),
    # consumer/workstation Blackwell (RTX PRO 6000, DGX Spark): "auto" -> flashinfer_cutlass
    "sm120": dict(is_cuda=True, is_blackwell=True, is_sm100=False, is_sm100_or_sm110=False,
                  is_sm110=False, is_sm120=True, is_sm90=False, device_capability=(12, 0),
                  device_sm=120),
    # Hopper (H100/H200): NVFP4 "auto" -> marlin (W4A16 fallback)
    "sm90": dict(is_cuda=True, is_blackwell=False, is_sm100=False, is_sm100_or_sm110=False,
                 is_sm110=False, is_sm120=False, is_sm90=True, device_capability=(9, 0),
                 device_sm=90),
    # this host as it is (no override)
    "cpu": {},
}

NVFP4_BACKENDS = ["flashinfer_trtllm", "flashinfer_trtllm_routed", "flashinfer_cutlass",
                  "flashinfer_cutedsl", "flashinfer_megamoe", "marlin", "triton", "cutlass",
                  "auto"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qualname(fn) -> str | None:
    if fn is None:
        return None
    f = getattr(fn, "__func__", fn)
    mod = getattr(f, "__module__", None) or ""
    qn = getattr(f, "__qualname__", None) or repr(f)
    return f"{mod}.{qn}" if mod else qn


def quant_summary(qc) -> dict | None:
    if qc is None:
        return None
    out = {"class": f"{type(qc).__module__}.{type(qc).__name__}"}
    try:
        out["name"] = qc.get_name()
    except Exception as e:  # pragma: no cover - informational only
        out["name"] = f"<{e!r}>"
    for attr in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules",
                 "is_checkpoint_nvfp4_serialized", "is_checkpoint_fp8_serialized",
                 "packed_modules_mapping"):
        if hasattr(qc, attr):
            v = getattr(qc, attr)
            if isinstance(v, (set, tuple)):
                v = sorted(v) if isinstance(v, set) else list(v)
            try:
                json.dumps(v)
            except TypeError:
                v = repr(v)
            out[attr] = v
    ql = getattr(qc, "quantized_layers", None)
    if isinstance(ql, dict):
        out["quantized_layers_count"] = len(ql)
        out["quantized_layers_sample"] = dict(list(ql.items())[:8])
    return out


def is_current_api() -> bool:
    """runtime_context with the publish/override_platform API (0.5.20 .. 0.5.23 here; 0.5.18 has
    a runtime_context module without it)."""
    import importlib.util

    if importlib.util.find_spec("sglang.srt.runtime_context") is None:
        return False
    import sglang.srt.runtime_context as rc

    return all(hasattr(rc, n) for n in ("publish", "override_platform"))


def _call_with_accepted(fn, **kw):
    """Call an sglang function with the keyword arguments its signature of this release accepts."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kw)
    return fn(**{k: v for k, v in kw.items() if k in params})


def preimport(platform: str) -> None:
    """Import exactly what ``build`` imports before it states the platform, so that a process
    forked after this call starts ``build`` in the same state as a fresh process would
    (golden_worker.py)."""
    if is_current_api():
        import sglang.srt.runtime_context  # noqa: F401
        import sglang.srt.server_args  # noqa: F401
    else:
        import torch  # noqa: F401
        legacy_preimport()


PROGRESS: dict = {}  # how far the build got, and what it had resolved (golden_worker reports it on failure)
IMPORT_SHIMS: list = []  # what legacy_preimport had to do; copied into the manifest's "patches"


# vLLM fallbacks that sglang < 0.5.8 imports at module level on a non-CUDA host, and the sglang
# module (already half-initialised at that point) whose own classes a GPU host uses instead
VLLM_FALLBACKS = {
    "vllm.model_executor.layers.layernorm": "sglang.srt.layers.layernorm",
    "vllm.model_executor.layers.activation": "sglang.srt.layers.activation",
}


def _layernorm_without_vllm() -> None:
    """sglang < 0.5.8 (layers/layernorm.py, layers/activation.py): on a host that is neither CUDA,
    HIP, NPU, XPU nor an AMX CPU, these modules end with ``from vllm.model_executor.layers.<m>
    import RMSNorm, ...`` (a fallback kernel library). vLLM is not installed here; a GPU host keeps
    SGLang's own classes, defined earlier in the same module. Serve those imports from the
    half-initialised sglang module itself, then remove the stand-in ``vllm`` modules again."""
    import importlib
    import importlib.abc
    import importlib.machinery
    import types

    parents = ("vllm", "vllm.model_executor", "vllm.model_executor.layers")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname in parents or fullname in VLLM_FALLBACKS:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            return types.ModuleType(spec.name)

        def exec_module(self, module):
            module.__path__ = []
            src_name = VLLM_FALLBACKS.get(module.__name__)
            if src_name:
                src = sys.modules[src_name]
                module.__getattr__ = lambda attr, _src=src: getattr(_src, attr)
                used.append(module.__name__)

    used = []
    f = Finder()
    sys.meta_path.insert(0, f)
    try:
        for m in VLLM_FALLBACKS.values():
            importlib.import_module(m)
    finally:
        sys.meta_path.remove(f)
        for n in parents + tuple(VLLM_FALLBACKS):
            sys.modules.pop(n, None)
    for n in used:
        IMPORT_SHIMS.append(
            f"{VLLM_FALLBACKS[n]} imported its non-CUDA fallback 'from {n} import ...' (sglang < "
            "0.5.8 on a CPU host); answered with SGLang's own classes of that module (what a GPU "
            "host uses), vllm being absent")


# sgl_kernel submodules whose import must keep failing: sglang builds module-level *objects*
# from them (scalar_types.uint4b8, ...) and has a fallback for their absence
SGL_KERNEL_ABSENT = ("sgl_kernel.scalar_type",)


def _stub_missing_kernel_package(pkg: str = "sgl_kernel", absent=SGL_KERNEL_ABSENT) -> None:
    """sglang <= 0.5.10 imports ``sgl_kernel`` (CUDA kernels) at module level even on hosts that
    are not CUDA (``from sgl_kernel.kvcacheio import ...``, ``from sgl_kernel import
    silu_and_mul``). Its wheel is a CUDA build that cannot load on a CPU torch. Where it is not
    importable, stand in a package in which every name is a function that raises if *called*
    (as on a GPU host, the imports succeed; kernels are never run here, and parameters are created
    by Python code). ``absent`` submodules still fail to import (their fallback is used)."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    try:
        if importlib.util.find_spec(pkg) is not None:
            return
    except Exception:
        pass

    def make_stub(qual):
        def kernel_stub(*a, **k):
            raise RuntimeError(f"oracle stub: {qual} called (no CUDA kernels here)")
        kernel_stub.__qualname__ = kernel_stub.__name__ = qual.rsplit(".", 1)[-1]
        kernel_stub.__module__ = qual.rsplit(".", 1)[0]
        return kernel_stub

    class StubModule(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__") or f"{self.__name__}.{attr}" in absent:
                raise AttributeError(attr)
            v = make_stub(f"{self.__name__}.{attr}")
            setattr(self, attr, v)
            return v

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if (fullname == pkg or fullname.startswith(pkg + ".")) and fullname not in absent:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = StubModule(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            if module.__name__ == pkg:
                module.__version__ = "0.0.0+oracle-stub"
                IMPORT_SHIMS.append(
                    f"'{pkg}' (CUDA kernel wheel; cannot load on a CPU torch, and this release "
                    "imports it at module level on any host) answered by a stub package whose "
                    f"functions raise if called; {list(absent)} still fail to import")

    sys.meta_path.append(Finder())


def _stub_missing_dsl_packages(pkgs=("cuda", "cutlass")) -> None:
    """sglang 0.5.8 - 0.5.9 (jit_kernel/cutedsl_gdn.py, imported by the hybrid linear-attention
    backend that nemotron_h imports) does ``import cuda.bindings.driver``, ``import cutlass``,
    ``import cutlass.cute`` at module level and decorates kernels with ``@cute.jit``. These CUDA
    packages (cuda-python, nvidia-cutlass-dsl) are not installed here. Where one is not importable,
    stand in a permissive stub: every attribute is a stub object, calling one returns another (so
    decorators at import work); no kernel is ever run, and no parameter depends on them."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    missing = []
    for pkg in pkgs:
        try:
            if importlib.util.find_spec(pkg) is None:
                missing.append(pkg)
        except Exception:
            missing.append(pkg)
    if not missing:
        return

    class Anything:
        def __init__(self, qual):
            self._qual = qual

        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return Anything(f"{self._qual}.{attr}")

        def __call__(self, *a, **k):
            if len(a) == 1 and callable(a[0]) and not k:
                return a[0]  # used as a decorator
            return Anything(f"{self._qual}()")

        def __getitem__(self, k):
            return Anything(f"{self._qual}[]")

        def __mro_entries__(self, bases):
            return (object,)

        def __repr__(self):
            return f"<oracle stub {self._qual}>"

    class StubModule(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return Anything(f"{self.__name__}.{attr}")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in missing:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = StubModule(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            if module.__name__ in missing:
                IMPORT_SHIMS.append(
                    f"'{module.__name__}' (CUDA DSL package, imported at module level by a kernel "
                    "module of this release) answered by a permissive stub; no kernel runs here")

    sys.meta_path.append(Finder())


def _sglang_version_key():
    import importlib.metadata
    import re

    v = importlib.metadata.version("sglang")
    return tuple(int(x) for x in re.findall(r"\d+", v.split("rc")[0].split(".post")[0])[:3])


def legacy_preimport() -> None:
    # only the releases that import CUDA packages unguarded on any host get stand-ins; from 0.5.11
    # on, sglang imports them behind checks, and a stand-in would change which branch is taken
    if _sglang_version_key() < (0, 5, 11):
        _stub_missing_kernel_package("sgl_kernel")
        _stub_missing_dsl_packages()
    _layernorm_without_vllm()
    import sglang.srt.layers.quantization.modelopt_quant  # noqa: F401
    import sglang.srt.model_loader.loader  # noqa: F401
    import sglang.srt.models.nemotron_h  # noqa: F401
    import sglang.srt.server_args  # noqa: F401


def build(ckpt: str, tp: int, backend: str, platform: str, device: str, log,
          draft: bool = False) -> dict:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    if not is_current_api():
        man = build_legacy(ckpt, tp, backend, platform, device, log, draft)
    else:
        man = build_current(ckpt, tp, backend, platform, device, log, draft)
    man["draft_model"] = draft
    return man


def _cuda_identity_without_gpu(patches: list) -> None:
    """0.5.11 .. 0.5.19's NVFP4 MoE create_weights calls swizzle_blockscale(), which ends in
    .cuda() just to size the *_blockscale_swizzled parameters. On a host without CUDA keep such
    tensors where they are (meta/CPU): same shape, same registration."""
    import torch

    if torch.cuda.is_available() or hasattr(torch.Tensor.cuda, "__oracle_real__"):
        return
    real_cuda = torch.Tensor.cuda

    def cuda_noop_without_gpu(self, *a, **k):
        return self

    torch.Tensor.cuda = cuda_noop_without_gpu
    torch.Tensor.cuda.__oracle_real__ = real_cuda
    patches.append("torch.Tensor.cuda -> identity (no GPU here): swizzle_blockscale "
                   "moves a shape-only tensor to CUDA during NVFP4 MoE create_weights; "
                   "the *_blockscale_swizzled Parameter is registered with the same shape")


def build_current(ckpt: str, tp: int, backend: str, platform: str, device: str, log,
                  draft: bool = False) -> dict:
    """sglang >= the runtime_context refactor (0.5.23 here)."""
    t0 = time.time()
    import torch

    import inspect

    import sglang.srt.runtime_context as rc
    from sglang.srt.runtime_context import get_exec, get_platform, override_platform, publish
    from sglang.srt.server_args import ServerArgs

    facts = dict(PLATFORMS[platform])
    patches = []
    known = set(getattr(rc, "_PLATFORM_PROBES", {})) | set(getattr(rc, "_PLATFORM_VALUES", {}))
    if known:  # a release that does not know a fact does not probe it (0.5.20/0.5.21: is_sm110)
        dropped = sorted(set(facts) - known)
        facts = {k: v for k, v in facts.items() if k in known}
        if dropped:
            patches.append(f"platform facts this release does not know, not stated: {dropped}")
    plat = override_platform(**facts)
    plat.install()  # stays installed for the whole (short-lived) process
    _cuda_identity_without_gpu(patches)
    PROGRESS["stage"] = "server_args"  # ServerArgs resolution (incl. the model overrides)
    sa = ServerArgs(
        model_path=ckpt,
        device="cpu",
        tp_size=tp,
        moe_runner_backend=backend,
        disable_radix_cache=True,
        load_format="auto",
    )
    if "ranks" in inspect.signature(publish).parameters:
        publish(sa, role="scheduler", ranks=rc.SpawnRanks(world_rank=0))
    else:  # 0.5.20-0.5.22: no rank record
        publish(sa, role="scheduler")
    log(f"published ServerArgs; resolved moe_runner_backend={get_exec().moe.moe_runner_backend}")
    PROGRESS.update(stage="model_config", moe_runner_backend=str(get_exec().moe.moe_runner_backend))

    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    init_distributed_environment(world_size=tp, rank=0, local_rank=0, backend="gloo")
    initialize_model_parallel(backend="gloo")
    from sglang.srt.layers.moe.utils import (
        get_moe_a2a_backend,
        get_moe_runner_backend,
        initialize_moe_config,
    )

    initialize_moe_config()
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner_components.load_model_utils import (
        build_load_config,
    )
    from sglang.srt.model_loader.loader import _get_quantization_config, _initialize_model
    from sglang.srt.model_loader.utils import get_model_architecture, set_default_torch_dtype

    # draft=True: what a speculative (MTP) worker builds from the same checkpoint
    mc = ModelConfig.from_server_args(sa, is_draft_model=draft)
    PROGRESS.update(stage="quant_config", quantization=mc.quantization)
    lc = _call_with_accepted(
        build_load_config,
        server_args=sa, tp_rank=0, remote_instance_weight_transporter_engine=None,
        remote_instance_weight_transporter_session_id="", draft_model_idx=None,
        weight_cache_mode="off", weight_cache_socket=None,
    )
    model_class, arch = get_model_architecture(mc)
    qc = _get_quantization_config(mc, lc)
    log(f"model class {model_class.__name__}; quant config {type(qc).__name__ if qc else None}")
    PROGRESS["stage"] = "model_build"
    with set_default_torch_dtype(mc.dtype):
        with torch.device(device):
            model = _initialize_model(mc, lc, qc)
    log(f"model built on {device} in {time.time() - t0:.1f}s")

    facts_seen = {}
    for k in ("is_cuda", "is_blackwell", "is_sm100", "is_sm120", "is_sm90"):
        try:
            facts_seen[k] = getattr(get_platform(), k)
        except Exception as e:  # pragma: no cover
            facts_seen[k] = repr(e)
    return dump(model, mc, qc, arch, ckpt, tp, platform, facts_seen, backend,
                str(get_moe_runner_backend().value), str(get_moe_a2a_backend().value), device,
                patches=patches)


# Capability probes of the pre-runtime_context releases (0.5.11): plain lru_cached functions in
# sglang.srt.utils.common, re-imported by name into many modules.
LEGACY_PROBES = {
    "sm100": {"is_sm100_supported": True, "is_blackwell_supported": True,
              "is_sm120_supported": False, "is_sm90_supported": False},
    "sm120": {"is_sm100_supported": False, "is_blackwell_supported": True,
              "is_sm120_supported": True, "is_sm90_supported": False},
    "sm90": {"is_sm100_supported": False, "is_blackwell_supported": False,
             "is_sm120_supported": False, "is_sm90_supported": True},
    "cpu": {},
}


def build_legacy(ckpt: str, tp: int, backend: str, platform: str, device: str, log,
                 draft: bool = False) -> dict:
    """sglang releases before the runtime_context refactor (e.g. 0.5.11, the last release
    without PR #24434): global ServerArgs, module-level capability probes."""
    t0 = time.time()
    import inspect

    import torch

    # import the modules holding capability-probe references before patching them
    legacy_preimport()
    import sglang.srt.model_loader.loader as L
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    patches = list(IMPORT_SHIMS)
    probes = LEGACY_PROBES[platform]
    n = 0
    for mname, mod in list(sys.modules.items()):
        if not mname.startswith("sglang") or mod is None:
            continue
        for pname, val in probes.items():
            cur = getattr(mod, pname, None)
            if callable(cur) and not isinstance(cur, type):
                setattr(mod, pname, (lambda _v=val: _v))
                n += 1
    if probes:
        patches.append(
            f"capability probes {sorted(probes)} -> {platform} values in {n} sglang module "
            "namespaces (legacy sglang has no override_platform); they gate NVFP4 MoE's "
            "Blackwell check and the 'auto' MoE-backend choice, not parameter registration")
    # 0.5.11's NVFP4 MoE create_weights calls swizzle_blockscale(), which ends in .cuda() just to
    # size the *_blockscale_swizzled parameters ("Only use swizzle_blockscale for shapes"). On a
    # host without CUDA, keep such tensors where they are (meta/CPU): same shape, same
    # registration.
    _cuda_identity_without_gpu(patches)

    PROGRESS["stage"] = "server_args"  # ServerArgs resolution (incl. the model overrides)
    sa = ServerArgs(model_path=ckpt, device="cpu", tp_size=tp, moe_runner_backend=backend,
                    disable_radix_cache=True)
    set_global_server_args_for_scheduler(sa)
    import importlib.util

    if importlib.util.find_spec("sglang.srt.runtime_context") is not None:
        import sglang.srt.runtime_context as rc

        if hasattr(rc, "publish"):  # 0.5.18: publish exists, override_platform does not yet
            publish_args = {"role": "scheduler"}
            if "ranks" in inspect.signature(rc.publish).parameters:
                publish_args["ranks"] = rc.SpawnRanks(world_rank=0)
            rc.publish(sa, **publish_args)
    PROGRESS.update(stage="model_config", moe_runner_backend=str(sa.moe_runner_backend), quantization=sa.quantization)
    log(f"legacy ServerArgs; resolved moe_runner_backend={sa.moe_runner_backend}, "
        f"quantization={sa.quantization}")
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    init_distributed_environment(world_size=tp, rank=0, local_rank=0, backend="gloo")
    initialize_model_parallel(tensor_model_parallel_size=tp, backend="gloo")
    from sglang.srt.layers.moe.utils import (
        get_moe_a2a_backend,
        get_moe_runner_backend,
        initialize_moe_config,
    )

    if inspect.signature(initialize_moe_config).parameters:
        initialize_moe_config(sa)
    else:  # reads the published context
        initialize_moe_config()
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.utils import get_model_architecture, set_default_torch_dtype

    mc = ModelConfig.from_server_args(sa, is_draft_model=draft)
    PROGRESS.update(stage="quant_config", quantization=mc.quantization)
    import sglang.srt.layers.dp_attention as dpa

    if (any(getattr(dpa, g, 0) is None for g in ("_ATTN_TP_SIZE", "_ATTN_DP_SIZE"))
            and hasattr(dpa, "initialize_dp_attention")):
        # what ModelRunner.init_torch_distributed does after initialize_model_parallel (<= 0.5.10
        # read the attention TP size from here while building the Mamba layers)
        _call_with_accepted(dpa.initialize_dp_attention, server_args=sa, model_config=mc)
    lc = LoadConfig(load_format=sa.load_format, download_dir=sa.download_dir)
    _, arch = get_model_architecture(mc)
    import inspect

    PROGRESS["stage"] = "model_build"  # (<= 0.5.9: the quant config is resolved in here too)
    if "quant_config" in inspect.signature(L._initialize_model).parameters:
        qc = L._get_quantization_config(mc, lc)
        log(f"quant config {type(qc).__name__ if qc else None}")
        with set_default_torch_dtype(mc.dtype):
            with torch.device(device):
                model = L._initialize_model(mc, lc, qc)
    else:
        # <= 0.5.9: _initialize_model(model_config, load_config) resolves the quant config itself
        # (with the model class's packed_modules_mapping / remap_prefix); record what it returns
        real_gqc = L._get_quantization_config
        seen = []

        def recording_gqc(*a, **k):
            r = real_gqc(*a, **k)
            seen.append(r)
            return r

        L._get_quantization_config = recording_gqc
        try:
            with set_default_torch_dtype(mc.dtype):
                with torch.device(device):
                    model = L._initialize_model(mc, lc)
        finally:
            L._get_quantization_config = real_gqc
        qc = seen[0] if seen else None
        patches.append("loader._get_quantization_config wrapped to record the quant config "
                       "_initialize_model(model_config, load_config) resolves (<= 0.5.9 API)")
    log(f"model built on {device} in {time.time() - t0:.1f}s")
    return dump(model, mc, qc, arch, ckpt, tp, platform, dict(probes), backend,
                str(get_moe_runner_backend().value), str(get_moe_a2a_backend().value), device,
                patches=patches)


def dump(model, mc, qc, arch, ckpt, tp, platform, facts_seen, backend, backend_resolved,
         a2a, device, patches) -> dict:
    import torch

    PROGRESS["stage"] = "dump"  # the model is built; a failure from here on is the oracle's

    import sglang

    modules = dict(model.named_modules())
    params = []
    for name, p in model.named_parameters():
        mod_name = name.rsplit(".", 1)[0] if "." in name else ""
        mod = modules.get(mod_name)
        qm = getattr(mod, "quant_method", None) if mod is not None else None
        wl = getattr(p, "weight_loader", None)
        entry = {
            "name": name,
            "shape": list(p.shape),
            "dtype": str(p.dtype).replace("torch.", ""),
            "param_class": type(p).__name__,
            "weight_loader": qualname(wl),
            "module_class": type(mod).__name__ if mod is not None else None,
            "quant_method": type(qm).__name__ if qm is not None else None,
        }
        for attr in ("_sglang_require_global_experts", "output_dim", "input_dim", "packed_dim"):
            v = getattr(p, attr, None)
            if isinstance(v, (bool, int)):
                entry[attr.lstrip("_")] = v
        params.append(entry)

    # where the NemotronHForCausalLM sits (wrappers: language_model) and its loader context
    from sglang.srt.models.nemotron_h import NemotronHForCausalLM

    lm_prefix = None
    lm = None
    for mname, m in modules.items():
        if isinstance(m, NemotronHForCausalLM):
            lm_prefix, lm = mname, m
            break
    ctx = {}
    if lm is not None:
        cfg = lm.config
        ctx = {
            "lm_prefix": lm_prefix,  # "" for a plain CausalLM, "language_model" for Omni/VL
            "lm_class": type(lm).__name__,
            "n_routed_experts": getattr(cfg, "n_routed_experts", None),
            "max_n_routed_experts": getattr(cfg, "max_n_routed_experts", None),
            "model_has_start_layer": hasattr(lm.model, "start_layer"),
            "start_layer": getattr(lm.model, "start_layer", None),
            "end_layer": getattr(lm.model, "end_layer", None),
            # releases before 0.5.8 have no pipeline parallelism (no pp_group): one rank
            "pp_is_first_rank": bool(getattr(getattr(lm, "pp_group", None), "is_first_rank", True)),
            "pp_is_last_rank": bool(getattr(getattr(lm, "pp_group", None), "is_last_rank", True)),
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "hybrid_override_pattern": getattr(cfg, "hybrid_override_pattern", None),
        }
    wrapper = None
    if lm_prefix:
        wrapper = {
            "class": type(model).__name__,
            "module": type(model).__module__,
            "children": [n for n, _ in model.named_children()],
            "sound_encoder": getattr(model, "sound_encoder", None) is not None,
        }

    return {
        "oracle": "sglang_manifest.py",
        "checkpoint": os.path.abspath(ckpt),
        "sglang_version": sglang.__version__,
        "torch_version": torch.__version__,
        "device": device,
        "tp_size": tp,
        "platform": platform,
        "platform_facts": facts_seen,
        "moe_runner_backend_requested": backend,
        "moe_runner_backend": backend_resolved,
        "moe_a2a_backend": a2a,
        "architecture": arch,
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "dtype": str(mc.dtype).replace("torch.", ""),
        "quantization": mc.quantization,
        "quant_config": quant_summary(qc),
        "loader_context": ctx,
        "wrapper": wrapper,
        "num_params": len(params),
        "num_buffers": sum(1 for _ in model.named_buffers()),
        "params": params,
        "patches": patches,  # current sglang: none (platform facts go through override_platform)
        "settings": {"disable_radix_cache": True, "device": "cpu (ServerArgs)",
                     "construction_device": device},
    }


def backend_matrix(ckpt: str, tp: int, platform: str, device: str, backends: list[str], log) -> dict:
    """Build once per (backend, platform) in a fresh process; report the parameter differences.
    Every backend is tried on ``platform``; "auto" is also tried on the other GPU platforms, which
    is how SGLang's own per-GPU default (trtllm / cutlass / marlin) shows up."""
    results = {}
    combos = [(b, platform) for b in backends]
    combos += [("auto", p) for p in ("sm100", "sm120", "sm90") if p != platform]
    for b, plat in combos:
        key = b if plat == platform else f"{b}@{plat}"
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = f.name
        cmd = [sys.executable, os.path.abspath(__file__), ckpt, "--out", tmp, "--tp", str(tp),
               "--moe-runner-backend", b, "--platform", plat, "--device", device, "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        b = key
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).strip().splitlines()
            errs = [ln for ln in lines if "Error" in ln or "Exception" in ln] or lines[-1:]
            results[b] = {"ok": False, "error": errs[-1].replace("[rank0]:", "").strip()}
            log(f"  backend {b}: FAILED: {results[b]['error'][:200]}")
        else:
            with open(tmp) as f:
                m = json.load(f)
            results[b] = {"ok": True, "resolved": m["moe_runner_backend"],
                          "params": {p["name"]: p["shape"] for p in m["params"]}}
            log(f"  backend {b}: resolved {m['moe_runner_backend']}, {m['num_params']} params")
        os.unlink(tmp)
    ok = {b: r for b, r in results.items() if r["ok"]}
    union = set().union(*(set(r["params"]) for r in ok.values())) if ok else set()
    common = set.intersection(*(set(r["params"]) for r in ok.values())) if ok else set()
    out = {"platform": platform, "backends": {}}
    for b, r in results.items():
        if not r["ok"]:
            out["backends"][b] = {"ok": False, "error": r["error"]}
            continue
        names = set(r["params"])
        extra = sorted(names - common)
        shape_diff = {}
        for n in sorted(common):
            shapes = {bb: rr["params"][n] for bb, rr in ok.items()}
            if len({tuple(s) for s in shapes.values()}) > 1:
                shape_diff[n] = r["params"][n]
        out["backends"][b] = {
            "ok": True,
            "resolved": r["resolved"],
            "num_params": len(names),
            "params_not_in_every_backend": extra,
            "params_missing_vs_union": sorted(union - names),
            "shape_differs_from_other_backends": shape_diff,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--moe-runner-backend", default="auto")
    ap.add_argument("--platform", default="sm100", choices=sorted(PLATFORMS))
    ap.add_argument("--device", default="auto", choices=["auto", "meta", "cpu"],
                    help="construction device; auto = meta, and if SGLang cannot build the model "
                         "on meta, a fresh process builds it on CPU (tiny configs only)")
    ap.add_argument("--backend-matrix", action="store_true",
                    help="also build with every NVFP4-capable MoE runner backend (one process "
                         "each) and record which parameters/shapes each registers")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--draft", action="store_true",
                    help="build the speculative draft model SGLang makes from this checkpoint "
                         "(ModelConfig(is_draft_model=True): NemotronHForCausalLMMTP)")
    ap.add_argument("--live-dump", default=None, metavar="FILE",
                    help="also write the README's live-engine dump of the same named_parameters(): "
                         "{name: {shape, dtype}} with dtype as str(p.dtype) (what `audit --manifest` reads)")
    ap.add_argument("--meta-error", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pre-24434", action="store_true",
                    help="build with the old sglang (last release before PR #24434, 0.5.11) "
                         "by re-running this script under --old-python")
    ap.add_argument("--old-python", default=os.environ.get("ORACLE_OLD_PYTHON",
                                                           "python-sglang-0.5.11"))
    a = ap.parse_args(argv)
    if a.pre_24434:
        if not os.path.exists(a.old_python):
            print(f"error: old sglang venv python not found: {a.old_python}", file=sys.stderr)
            return 2
        args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--pre-24434"]
        return subprocess.run([a.old_python, os.path.abspath(__file__)] + args).returncode
    if a.tp != 1:
        ap.error("only --tp 1 is supported (world size 1, gloo, CPU)")

    def log(msg):
        if not a.quiet:
            print(f"[manifest] {msg}", file=sys.stderr, flush=True)

    import logging

    logging.getLogger().setLevel(logging.ERROR if a.quiet else logging.WARNING)
    if a.device == "auto":
        try:
            man = build(a.ckpt, a.tp, a.moe_runner_backend, a.platform, "meta", log, a.draft)
        except Exception as e:  # SGLang itself failed on meta: rebuild on CPU in a new process
            import traceback

            where = traceback.extract_tb(e.__traceback__)[-1]
            meta_err = f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"
            log(f"meta construction failed ({meta_err}); rebuilding on cpu in a fresh process")
            cmd = [sys.executable, os.path.abspath(__file__), a.ckpt, "--out", a.out, "--tp",
                   str(a.tp), "--moe-runner-backend", a.moe_runner_backend, "--platform",
                   a.platform, "--device", "cpu", "--meta-error", meta_err]
            if a.backend_matrix:
                cmd.append("--backend-matrix")
            if a.draft:
                cmd.append("--draft")
            if a.quiet:
                cmd.append("--quiet")
            if a.live_dump:
                cmd += ["--live-dump", a.live_dump]
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(subprocess.run(cmd).returncode)
    else:
        man = build(a.ckpt, a.tp, a.moe_runner_backend, a.platform, a.device, log, a.draft)
    if a.meta_error:
        man["meta_construction_error"] = a.meta_error
    if a.backend_matrix:
        log("backend matrix ...")
        man["backend_matrix"] = backend_matrix(a.ckpt, a.tp, a.platform, man["device"],
                                               NVFP4_BACKENDS, log)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(man, f, indent=1)
    log(f"{man['num_params']} params -> {a.out}")
    if a.live_dump:
        # The README's two lines, {n: {"shape": list(p.shape), "dtype": str(p.dtype)}}, over the same
        # named_parameters() entries in their order (``dump`` stored str(p.dtype) without "torch.").
        live = {e["name"]: {"shape": e["shape"], "dtype": "torch." + e["dtype"]} for e in man["params"]}
        with open(a.live_dump, "w") as f:
            json.dump(live, f)
        log(f"live dump ({len(live)} params) -> {a.live_dump}")
    # torch.distributed process group teardown is skipped on purpose: the process exits now.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
