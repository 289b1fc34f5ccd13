#!/usr/bin/env python3
"""vLLM ground-truth oracle for NemotronH weight loading (manifest + replay in one process).

    vllm_oracle.py CKPT_DIR --out-dir DIR [--platform sm100|sm90|sm120] [--no-stream] [--mtp]

Writes DIR/manifest.json (every named_parameters() entry of vLLM's real model) and
DIR/replay.json (what vLLM's real load_weights did with every checkpoint tensor).

Everything that decides anything is vLLM's own code:
  * ``EngineArgs(...).create_engine_config()`` resolves ModelConfig / quantization / parallel
    config exactly as ``vllm serve`` does (quant config class chosen from hf_quant_config.json);
  * ``init_distributed_environment(world_size=1, backend="gloo")`` +
    ``ensure_model_parallel_initialized(1, 1)``;
  * ``model_loader.utils.initialize_model(vllm_config)`` builds the real model class on CPU
    (``set_default_torch_dtype`` + ``torch.device("cpu")``), real tiny shapes, real memory;
  * replay: the real ``model.load_weights`` (AutoWeightsLoader + WeightsMapper + per-module
    ``load_weights`` such as RoutedExperts / QKVParallelLinear) is called with the REAL
    checkpoint tensors (tiny), so every weight_loader really runs, shape checks included.
  * stream: the real ``DefaultModelLoader.load_weights(model, model_config)`` (real shard filter,
    natural sort, safetensors iterator, and the strict "weights not initialized" check).

MTP draft (``--mtp``): ``EngineArgs(..., speculative_config={"method": "mtp", "num_speculative_tokens": 1})``
resolves the draft exactly as ``vllm serve --speculative-config`` does (``SpeculativeConfig``'s
``hf_config_override`` turns a ``nemotron_h`` config with ``num_nextn_predict_layers > 0`` into
``NemotronHMTPModel``); the draft is built as the proposer's ``get_model(vllm_config=...,
model_config=draft_model_config)`` builds it (``initialize_model`` with the draft's model config), and
the stream pass is ``DefaultModelLoader(draft_load_config).load_weights(draft, draft_model_config)``:
the whole checkpoint goes through ``NemotronHMTP.load_weights`` (and the strict check for an
unquantized draft). Text checkpoints only.

Omni/VL (``NemotronH_Nano_Omni_Reasoning_V3`` & co): vLLM has no built-in config class for the
remote-code model_type, and the wrapper's __init__ needs a tokenizer and both towers. The oracle
therefore builds the language model the way ``NemotronH_Nano_VL_V2.__init__`` does
(``configure_quant_config(quant_config, NemotronH_Nano_VL_V2)`` then
``initialize_model(vllm_config.with_hf_config(text_config), prefix="language_model")``), builds
``mlp1`` exactly as the wrapper does, and runs the wrapper's REAL ``load_weights`` on an
``object.__new__`` instance whose vision/sound towers are routing stubs (same technique as the
SGLang oracle).

Host shims (documented in README.md; none changes which parameters exist or how names map):
  * platform: an emulated CUDA platform (capability facts only) is installed as
    ``vllm.platforms.current_platform``; vLLM on a CPU host otherwise resolves
    UnspecifiedPlatform, and the CPU platform refuses to start without triton-cpu;
  * ``LD_LIBRARY_PATH`` must contain a stub ``libcuda.so.1`` (see make_stub_libcuda.sh):
    ``vllm/platforms/cuda.py`` imports the CUDA extension at import time;
  * ``VLLM_DISABLE_SHARED_EXPERTS_STREAM=1`` (vLLM's own debug switch) so SharedExperts does
    not create a CUDA stream;
  * ``skip_tokenizer_init=True`` (checkpoints carry no tokenizer).
Instrumentation only: every parameter's ``weight_loader`` is wrapped (record, then call the
real one); ``default_weight_loader`` in the namespaces that call it is wrapped likewise;
``WeightsMapper.apply`` is wrapped to record the mapped name; a logging.Handler on the
``vllm`` logger (DEBUG, so AutoWeightsLoader's "Ignoring ..." lines are seen);
``warning_once`` caches are cleared between tensors so each tensor sees its own warnings.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import socket
import sys
import time
from collections import Counter, OrderedDict, defaultdict
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

os.environ.setdefault("VLLM_DISABLE_SHARED_EXPERTS_STREAM", "1")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

VL_MODEL_TYPES = ("NemotronH_Nano_VL_V2", "NemotronH_Nano_Omni_Reasoning_V3",
                  "NemotronH_Super_Omni_Reasoning_V3", "NemotronH_Omni_Reasoning_V3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qualname(fn):
    if fn is None:
        return None
    f = getattr(fn, "__func__", fn)
    mod = getattr(f, "__module__", None) or ""
    qn = getattr(f, "__qualname__", None) or repr(f)
    return f"{mod}.{qn}" if mod else qn


def jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        if isinstance(v, (set, frozenset, tuple)):
            return [jsonable(x) for x in v]
        if isinstance(v, dict):
            return {str(k): jsonable(x) for k, x in v.items()}
        return repr(v)


# =========================================================================== recording
class Rec:
    def __init__(self):
        self.reset()
        self.current = None  # name of the checkpoint tensor being processed (stream pass)

    def reset(self):
        self.events, self.logs, self.mapped = [], [], []


REC = Rec()


class LogTap(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover
            msg = str(record.msg)
        REC.logs.append({"logger": record.name, "level": record.levelname, "msg": msg[:600],
                         "tensor": REC.current})


_TAP = None


def install_logging():
    """(Re)attach the tap: vLLM's logging dictConfig can run again while configs are built and
    replaces the 'vllm' logger's handlers, so this is called again right before each pass."""
    global _TAP
    if _TAP is None:
        _TAP = LogTap()
    lg = logging.getLogger("vllm")
    for h in lg.handlers:
        if h is not _TAP:
            h.setLevel(logging.ERROR)  # keep the console quiet; the tap sees everything
    lg.setLevel(logging.DEBUG)
    if _TAP not in lg.handlers:
        lg.addHandler(_TAP)


def clear_once_caches():
    import vllm.logger as vl

    for fn in ("_print_debug_once", "_print_info_once", "_print_warning_once", "_print_error_once"):
        f = getattr(vl, fn, None)
        if f is not None and hasattr(f, "cache_clear"):
            f.cache_clear()


def _shard_of(t):
    s = getattr(t, "shard_id", None)
    return jsonable(s) if s is not None else None


def wrap_param_loaders(model, names: dict):
    """Wrap every parameter's weight_loader: record, then call the real one (its return value
    is passed back, e.g. RoutedExperts' return_success)."""
    n = 0
    for name, p in model.named_parameters():  # canonical names, as vLLM's strict check uses
        names.setdefault(id(p), name)
        real = getattr(p, "weight_loader", None)
        if real is None or getattr(real, "__oracle_real__", None) is not None:
            continue

        def make(real, pname):
            def weight_loader(*args, **kwargs):
                # positional: (param, loaded_weight, [shard_id]) ; RoutedExperts uses kwargs
                lw = kwargs.get("loaded_weight", args[1] if len(args) > 1 else None)
                extra = list(args[2:])
                kw = {k: v for k, v in kwargs.items() if k not in ("param", "loaded_weight")}
                ev = {"kind": "weight_loader", "param": pname, "args": jsonable(extra),
                      "kwargs": jsonable(kw), "tensor_shard_attr": _shard_of(lw) if lw is not None else None,
                      "loaded_shape": list(lw.shape) if lw is not None else None,
                      "tensor": REC.current}
                REC.events.append(ev)
                out = real(*args, **kwargs)
                if out is not None and not isinstance(out, (bool, int)):
                    out_r = repr(type(out))
                else:
                    out_r = out
                ev["returned"] = out_r
                return out

            weight_loader.__oracle_real__ = real
            return weight_loader

        try:
            p.weight_loader = make(real, name)
        except AttributeError:  # BasevLLMParameter's read-only property (0.10.1.1): set what it returns
            p._weight_loader = make(real, name)
        n += 1
    return n


def wrap_default_loader(module_names, names: dict):
    import importlib

    patched = []
    for modname in module_names:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError:  # the release has no such model file (0.10.1.1: no nano_nemotron_vl)
            patched.append(f"{modname}: not in this release")
            continue
        real = getattr(mod, "default_weight_loader", None)
        if real is None or getattr(real, "__oracle_real__", None) is not None:
            continue

        def make(real):
            def default_weight_loader(param, loaded_weight):
                ev = {"kind": "default_weight_loader", "param": names.get(id(param)),
                      "tensor_shard_attr": _shard_of(loaded_weight),
                      "loaded_shape": list(loaded_weight.shape), "tensor": REC.current}
                REC.events.append(ev)
                return real(param, loaded_weight)

            default_weight_loader.__oracle_real__ = real
            return default_weight_loader

        setattr(mod, "default_weight_loader", make(real))
        patched.append(f"{modname}.default_weight_loader (record, then call the real one)")
    return patched


def wrap_mapper():
    from vllm.model_executor.models.utils import WeightsMapper

    real_apply = WeightsMapper.apply
    if getattr(real_apply, "__oracle_real__", None) is not None:
        return

    def apply(self, weights):
        def seen(ws):
            for n, d in ws:
                REC.mapped.append({"input": n, "tensor": REC.current})
                yield n, d

        for out_name, data in real_apply(self, seen(weights)):
            REC.mapped.append({"mapped": out_name, "shard": _shard_of(data), "tensor": REC.current})
            yield out_name, data

    apply.__oracle_real__ = real_apply
    WeightsMapper.apply = apply


# =========================================================================== build
CONFIG_STANDIN = None


def config_standin(log):
    """transformers 4.x (pinned by vLLM 0.11.1 - 0.19.0) has no ``nemotron_h`` config class. The real
    checkpoints ship ``configuration_nemotron_h.py`` (config.json's ``auto_map``) and a real server runs
    with ``--trust-remote-code``; the tiny conformance checkpoints carry no code. Stand-in: the release's
    own copy of that class (``vllm/transformers_utils/configs/nemotron_h.py``, which vLLM keeps but does
    not register) is registered with AutoConfig for ``nemotron_h``. Only when transformers lacks the
    model type; recorded in the golden's ``made_by``. It decides no parameter or name mapping: the model
    code reads the same config fields either way."""
    global CONFIG_STANDIN
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except Exception:  # pragma: no cover
        return
    if "nemotron_h" in CONFIG_MAPPING:
        return
    from transformers import AutoConfig
    from vllm.transformers_utils.configs.nemotron_h import NemotronHConfig

    AutoConfig.register("nemotron_h", NemotronHConfig, exist_ok=True)
    CONFIG_STANDIN = ("config: transformers has no nemotron_h; vLLM's own transformers_utils/configs/"
                      "nemotron_h.py stood in for the repository's configuration_nemotron_h.py "
                      "(--trust-remote-code)")
    log(CONFIG_STANDIN)


def build_text(ckpt: str, platform: str, log):
    import torch
    from vllm.engine.arg_utils import EngineArgs

    config_standin(log)
    ea = EngineArgs(model=ckpt, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
                    load_format="safetensors", tensor_parallel_size=1)
    vc = ea.create_engine_config()
    log(f"engine config: dtype={vc.model_config.dtype} quant={type(vc.quant_config).__name__ if vc.quant_config else None}")
    init_dist(vc)
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    set_default_torch_dtype = default_dtype_helper()

    with set_current_vllm_config(vc):
        with set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
            model = initialize_model(vllm_config=vc)
    return vc, model, model, None


def build_mtp(ckpt: str, platform: str, log):
    """The MTP draft as the speculative proposer builds it (``EagleProposer._get_model``)."""
    import torch
    from vllm.engine.arg_utils import EngineArgs

    config_standin(log)
    ea = EngineArgs(model=ckpt, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
                    load_format="safetensors", tensor_parallel_size=1,
                    speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    vc = ea.create_engine_config()
    sc = vc.speculative_config
    dmc = sc.draft_model_config
    log(f"engine config (MTP draft): method={sc.method} draft arch={dmc.architectures} dtype={dmc.dtype} "
        f"quant={dmc.quantization}")
    init_dist(vc)
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(vc):
        with set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
            # The server builds the target first (GPUModelRunner.load_model, then drafter.load_model): its
            # initialize_model applies the target's hf_to_vllm_mapper to vllm_config.quant_config in place
            # (ModelOpt ``apply_vllm_mapper`` rewrites exclude_modules), and releases before
            # get_draft_quant_config hand that same object to the draft. Built here for that alone.
            target = initialize_model(vllm_config=vc)
            del target
        with set_default_torch_dtype(dmc.dtype), torch.device("cpu"):
            model = initialize_model(vllm_config=vc, model_config=dmc)
    notes = {"draft_architectures": list(dmc.architectures), "draft_model_type": dmc.hf_config.model_type,
             "speculative_method": sc.method, "draft_quantization": dmc.quantization}
    return vc, model, model, notes


def default_dtype_helper():
    """vLLM's ``set_default_torch_dtype``: ``vllm.utils.torch_utils`` from 0.11.1, ``model_loader.utils`` before."""
    try:
        from vllm.utils.torch_utils import set_default_torch_dtype
    except ImportError:
        from vllm.model_executor.model_loader.utils import set_default_torch_dtype
    return set_default_torch_dtype


def init_dist(vc):
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
                                     backend="gloo")
        ensure_model_parallel_initialized(1, 1)


class TowerStub:
    """Stands in for the RADIO vision / Parakeet sound tower: records what the wrapper routes."""

    def __init__(self, tower):
        self.tower = tower

    def load_weights(self, weights):
        for name, w in weights:
            REC.events.append({"kind": "tower", "tower": self.tower, "key": name,
                               "tensor": REC.current, "loaded_shape": list(w.shape)})
        return set()


def build_vl(ckpt: str, platform: str, log, workdir: str):
    """Language model + mlp1 exactly as NemotronH_Nano_VL_V2.__init__ builds them."""
    import shutil

    import torch
    from torch import nn
    from vllm.engine.arg_utils import EngineArgs

    with open(os.path.join(ckpt, "config.json")) as f:
        top = json.load(f)
    # The server's next gate after the (remote-code) config: the architecture must be registered.
    # vLLM's own registry answers, and its own _raise_for_unsupported words the refusal.
    from vllm.model_executor.models.registry import ModelRegistry

    archs = list(top.get("architectures") or [])
    if not any(a in ModelRegistry.get_supported_archs() for a in archs):
        ModelRegistry._raise_for_unsupported(archs)
    llm = dict(top.get("llm_config") or top.get("text_config"))
    llm.setdefault("architectures", ["NemotronHForCausalLM"])
    # shadow dir: config.json = the text config (what text_config resolves to), the checkpoint's
    # hf_quant_config.json, and symlinks to the shards/index (the stream pass reads them).
    sh = os.path.join(workdir, "vl_text_shadow")
    os.makedirs(sh, exist_ok=True)
    with open(os.path.join(sh, "config.json"), "w") as f:
        json.dump(llm, f)
    for fn in os.listdir(ckpt):
        if fn == "config.json":
            continue
        dst = os.path.join(sh, fn)
        if os.path.lexists(dst):
            os.remove(dst)
        if fn.endswith(".json") and fn != "model.safetensors.index.json":
            shutil.copy(os.path.join(ckpt, fn), dst)
        else:
            os.symlink(os.path.join(os.path.abspath(ckpt), fn), dst)
    config_standin(log)
    ea = EngineArgs(model=sh, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
                    load_format="safetensors", tensor_parallel_size=1)
    vc = ea.create_engine_config()
    log(f"engine config (VL text): dtype={vc.model_config.dtype} quant={type(vc.quant_config).__name__ if vc.quant_config else None}")
    init_dist(vc)
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.model_loader.utils import configure_quant_config, initialize_model
    from vllm.model_executor.models.nano_nemotron_vl import NemotronH_Nano_VL_V2
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM
    from vllm.model_executor.layers.activation import ReLUSquaredActivation
    set_default_torch_dtype = default_dtype_helper()

    # what initialize_model(model_class=NemotronH_Nano_VL_V2) does before the wrapper's __init__
    if vc.quant_config is not None:
        configure_quant_config(vc.quant_config, NemotronH_Nano_VL_V2)
    with set_current_vllm_config(vc):
        with set_default_torch_dtype(vc.model_config.dtype), torch.device("cpu"):
            # what init_vllm_registered_model(vllm_config, hf_config=text_config,
            # prefix="language_model") does
            lm = initialize_model(vllm_config=vc, prefix="language_model",
                                  model_class=NemotronHForCausalLM)
            w = object.__new__(NemotronH_Nano_VL_V2)
            nn.Module.__init__(w)
            w.language_model = lm
            dr = top.get("downsample_ratio", 0.5)
            vit_hidden = top.get("vision_hidden_size") or top.get("vit_hidden_size")
            llm_hidden = llm["hidden_size"]
            dt = vc.model_config.dtype
            w.mlp1 = nn.Sequential(
                RMSNorm(hidden_size=vit_hidden * int(round(1 / dr)) ** 2, eps=1e-5),
                nn.Linear(vit_hidden * int(round(1 / dr)) ** 2, top["projector_hidden_size"], bias=False),
                ReLUSquaredActivation(),
                nn.Linear(top["projector_hidden_size"], llm_hidden, bias=False),
            ).to(dt)
            # releases before 0.32.0 have no vision_final_layernorm (the wrapper's __init__ and
            # load_weights never mention it); build it only where this release's __init__ does
            has_vfl = "vision_final_layernorm" in inspect.getsource(NemotronH_Nano_VL_V2.__init__)
            if has_vfl:
                w.vision_final_layernorm = (
                    nn.LayerNorm(vit_hidden, eps=1e-6).to(dt)
                    if (llm.get("num_nextn_predict_layers", 0) or 0) > 0 else None)
    object.__setattr__(w, "vision_model", TowerStub("vision_model"))
    object.__setattr__(w, "sound_encoder", TowerStub("sound_encoder") if top.get("sound_config") else None)
    mm = SimpleNamespace(get_limit_per_prompt=lambda modality: 1)
    object.__setattr__(w, "model_config", SimpleNamespace(multimodal_config=mm))
    notes = {
        "wrapper_class": "vllm.model_executor.models.nano_nemotron_vl.NemotronH_Nano_VL_V2",
        "config_model_type": top.get("model_type"),
        "vl_config_note": (f"vLLM {__import__('vllm').__version__} has no built-in config class for this model_type; the real "
                           "server needs --trust-remote-code and the HF repo's configuration .py files "
                           "(absent from the conformance checkpoint). The text config used is "
                           "config.json's llm_config, as the remote config's text_config."),
        "towers": "vision_model / sound_encoder are routing stubs; their own loaders are not replayed",
        "vision_final_layernorm_built": getattr(w, "vision_final_layernorm", None) is not None,
    }
    return vc, w, lm, notes


# =========================================================================== manifest
def manifest(model, vc, notes) -> dict:
    import vllm

    mods = dict(model.named_modules())
    params = []
    canon = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: canon[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
               if canon.get(id(p)) != n}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        m = mods.get(owner)
        qm = getattr(m, "quant_method", None) if m is not None else None
        wl = getattr(p, "weight_loader", None)
        wl = getattr(wl, "__oracle_real__", wl)
        params.append(OrderedDict(
            name=name, shape=list(p.shape), dtype=str(p.dtype).replace("torch.", ""),
            param_class=type(p).__name__, weight_loader=qualname(wl),
            module_class=type(m).__name__ if m is not None else None,
            quant_method=type(qm).__name__ if qm is not None else None,
        ))
    moe = {}
    for mname, m in mods.items():
        if type(m).__name__ == "RoutedExperts":
            qm = m.quant_method
            be = None
            for attr in ("nvfp4_backend", "fp8_backend", "mxfp8_backend", "unquantized_backend", "backend"):
                if hasattr(qm, attr):
                    be = f"{attr}={getattr(qm, attr)}"
                    break
            moe.setdefault(f"{type(qm).__name__} {be}", []).append(mname)
    qc = vc.quant_config
    qd = None
    if qc is not None:
        qd = {"class": f"{type(qc).__module__}.{type(qc).__name__}", "name": qc.get_name()}
        for attr in ("quant_method", "kv_cache_quant_algo", "kv_cache_quant_method", "group_size",
                     "exclude_modules", "is_checkpoint_nvfp4_serialized", "packed_modules_mapping"):
            if hasattr(qc, attr):
                qd[attr] = jsonable(getattr(qc, attr))
        ql = getattr(qc, "quantized_layers", None)
        if isinstance(ql, dict):
            qd["quantized_layers_count"] = len(ql)
            qd["quantized_layers_sample"] = jsonable(dict(list(ql.items())[:6]))
    from vllm.platforms import current_platform

    return OrderedDict(
        oracle="vllm_oracle.py",
        vllm_version=vllm.__version__,
        model_class=f"{type(model).__module__}.{type(model).__name__}",
        platform=f"{type(current_platform).__name__} capability={current_platform.get_device_capability()}",
        dtype=str(vc.model_config.dtype),
        quantization=vc.model_config.quantization,
        quant_config=qd,
        moe_methods=moe,
        vl=notes,
        num_params=len(params),
        param_aliases=aliases,  # same Parameter object registered under a second name
        params=params,
    )


# =========================================================================== replay
def checkpoint_tensors(vc):
    """(name, tensor, file) in vLLM's order: the real _prepare_weights file filter, natural sort,
    safe_open().keys() (the real safetensors_weights_iterator)."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    dl = DefaultModelLoader(vc.load_config)
    # (folder, files, use_safetensors[, ...]): 3-tuple before 0.31, 4-tuple since
    # (model, [subfolder,] revision, fall_back_to_pt, allow_patterns_overrides): subfolder from 0.18.0
    if "subfolder" in inspect.signature(dl._prepare_weights).parameters:
        prep = dl._prepare_weights(vc.model_config.model, None, vc.model_config.revision, True, None)
    else:
        prep = dl._prepare_weights(vc.model_config.model, vc.model_config.revision, True, None)
    files, use_st = prep[1], prep[2]
    assert use_st
    import safetensors

    where = {}
    for f in files:
        with safetensors.safe_open(f, framework="pt") as h:
            for k in h.keys():
                where[k] = os.path.basename(f)
    out = []
    for name, t in safetensors_weights_iterator(files, False):
        out.append((name, t.clone(), where.get(name)))
    return out, [os.path.basename(f) for f in files]


MTP_MODE = False


def classify(events, logs, mapped, exc):
    r = OrderedDict(outcome=None, param=None, shard_id=None, expert_id=None, error=None)
    loads = [e for e in events if e["kind"] in ("weight_loader", "default_weight_loader", "tower")]
    mapper_in = [m["input"] for m in mapped if "input" in m]
    mapped = [m for m in mapped if "mapped" in m]
    r["mapped_name"] = [m["mapped"] for m in mapped] or None
    if len(loads) > 1:
        r["all_events"] = [{k: v for k, v in e.items() if k != "tensor"} for e in loads]
    if loads:
        e = loads[0]
        if e["kind"] == "tower":
            r["outcome"] = "routed"
            r["tower"] = e["tower"]
            r["tower_key"] = e["key"]
        elif e["kind"] == "default_weight_loader":
            r["outcome"] = "loaded"
            r["param"] = e["param"]
            r["via"] = "default_weight_loader"
        else:
            r["param"] = e["param"]
            r["via"] = "weight_loader"
            kw = e["kwargs"]
            if "expert_id" in kw:
                r["outcome"] = "expert"
                r["shard_id"] = kw.get("shard_id")
                r["expert_id"] = kw.get("expert_id")
                if kw.get("weight_name"):
                    r["loader_weight_name"] = kw["weight_name"]
                if e.get("returned") is False:
                    r["outcome"] = "expert_rejected"
            else:
                sid = e["args"][0] if e["args"] else kw.get("loaded_shard_id", kw.get("shard_id"))
                if sid is None:
                    sid = e.get("tensor_shard_attr")
                if sid is not None:
                    r["outcome"] = "stacked"
                    r["shard_id"] = sid
                else:
                    r["outcome"] = "loaded"
    warn = [l for l in logs if l["level"] in ("WARNING", "ERROR", "CRITICAL")]
    if exc is not None:
        r["outcome"] = "raised" if r["outcome"] is None else "raised_after_load"
        r["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    elif r["outcome"] is None:
        r["outcome"] = "warned" if warn else "skipped"
        if MTP_MODE:  # NemotronHMTP.load_weights maps names by hand (no WeightsMapper)
            r["skip_reason"] = "no load call, no log line (NemotronHMTP.load_weights)"
        elif not mapper_in:
            r["skip_reason"] = "never reached the LM's WeightsMapper (dropped by the VL wrapper's routing)"
        elif not mapped:
            r["skip_reason"] = "dropped by WeightsMapper (maps to None)"
        else:
            ign = [l["msg"] for l in logs if l["msg"].startswith(("Ignoring", "Skipping"))]
            if ign:
                r["skip_reason"] = ign[0]
            elif r["outcome"] == "skipped":
                r["skip_reason"] = "no load call, no log line"
    if warn:
        r["warnings"] = [l["msg"] for l in warn]
    return r


def run_per_tensor(target, tensors):
    results = OrderedDict()
    for name, t, shard in tensors:
        REC.reset()
        clear_once_caches()
        REC.current = name
        exc = None
        try:
            ret = target.load_weights([(name, t)])
            if ret is not None and not isinstance(ret, (set, list, dict)):
                list(ret)  # generators
        except Exception as e:  # the real loader raised: that IS the outcome
            exc = e
        r = classify(REC.events, REC.logs, REC.mapped, exc)
        r["file"] = shard
        r["dtype"] = str(t.dtype).replace("torch.", "")
        r["shape"] = list(t.shape)
        results[name] = r
        REC.current = None
    return results


def run_stream(target, vc, is_vl, mtp=False):
    """The real DefaultModelLoader.load_weights over the whole checkpoint (real iterator, real
    strict check). For VL the wrapper is the model handed to it, as in the server; for the MTP
    draft, the draft's model config and load config."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    sc = vc.speculative_config if mtp else None
    dl = DefaultModelLoader((getattr(sc, "draft_load_config", None) or vc.load_config) if mtp else vc.load_config)
    real_get_all = dl.get_all_weights
    order = []

    def get_all_weights(model_config, model):
        for name, t in real_get_all(model_config, model):
            REC.current = name
            order.append(name)
            yield name, t
        REC.current = None

    dl.get_all_weights = get_all_weights
    # 0.9.1 - 0.10.1.1: NemotronHForCausalLM.load_weights reads every tensor into a list (renaming 'backbone')
    # before AutoWeightsLoader loads any: the i-th weight AutoWeightsLoader takes, once the iteration has
    # ended, is the i-th tensor the loader yielded (same order), so the crash is still attributed to its tensor.
    from vllm.model_executor.models.utils import AutoWeightsLoader

    real_awl = AutoWeightsLoader.load_weights

    def awl_load_weights(self, weights, *args, **kwargs):
        if REC.current is not None or not isinstance(weights, list) or len(weights) != len(order):
            return real_awl(self, weights, *args, **kwargs)

        def tagged(ws):
            for i, w in enumerate(ws):
                REC.current = order[i] if i < len(order) else None
                yield w
            REC.current = None

        return real_awl(self, tagged(weights), *args, **kwargs)

    AutoWeightsLoader.load_weights = awl_load_weights
    REC.reset()
    clear_once_caches()
    mc = sc.draft_model_config if mtp else vc.model_config
    out = OrderedDict()
    try:
        dl.load_weights(target, mc)
        out["raised"] = False
    except Exception as e:
        out["raised"] = True
        out["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        out["tensor"] = REC.current
        out["tensors_yielded_before_raise"] = len(order)
        out["raised_in"] = "iteration" if REC.current is not None else "after iteration (strict check)"
    AutoWeightsLoader.load_weights = real_awl
    out["strict_check_enabled"] = (dl.enable_weights_track if getattr(dl, "enable_weights_track", None) is not None
                                   else mc.quantization is None)
    out["load_calls"] = sum(1 for e in REC.events if e["kind"] != "tower")
    events = list(REC.events)
    REC.current = None
    out["_order"] = order
    return out, events


DEFERRED_PREFIXES = ("mlp1.", "vision_final_layernorm.")


def _is_deferred(p):
    """Loads the VL wrapper buffers and performs after the LM stream (mlp1, towers)."""
    return p in ("vision_model", "sound_encoder") or (p or "").startswith(DEFERRED_PREFIXES)


def stream_consistency(results, events, order):
    """Every load call of the stream pass must be one the per-tensor pass recorded for that
    tensor. Loads the VL wrapper defers until after the LM stream (mlp1 / towers) cannot be
    attributed by name in the stream pass; they are compared as a multiset."""
    seen = defaultdict(list)
    deferred_stream = Counter()
    for ev in events:
        p = ev.get("param") or ev.get("tower")
        if ev.get("tensor") is None and _is_deferred(p):
            deferred_stream[p] += 1
            continue
        seen[ev.get("tensor")].append(p)
    mism = []
    deferred_per_tensor = Counter()
    done = set(order[:-1]) if order and events is not None else set()
    culprit = order[-1] if order else None  # raised mid-load (None when the stream completed)
    seen.pop(culprit, None)
    for name, r in results.items():
        if name not in done:
            continue
        want = [e.get("param") or e.get("tower") for e in r.get("all_events", [])] or \
               ([r.get("param") or r.get("tower")] if (r.get("param") or r.get("tower")) else [])
        if r["outcome"].startswith("raised") and not r["outcome"] == "raised_after_load":
            want = []
        d = [p for p in want if _is_deferred(p)]
        deferred_per_tensor.update(d)
        want = [p for p in want if not _is_deferred(p)]
        got = seen.pop(name, [])
        if got != want:
            mism.append({"tensor": name, "stream": got, "per_tensor": want})
    for name, params in seen.items():
        mism.append({"tensor": name, "stream": params, "per_tensor": None})
    out = {"mismatches": mism[:50], "num_mismatches": len(mism)}
    if deferred_stream or deferred_per_tensor:
        out["deferred_loads_equal"] = deferred_stream == deferred_per_tensor
        out["deferred_loads"] = sum(deferred_stream.values())
    return out


def coverage(man, results, n_exp):
    got = defaultdict(list)
    for name, r in results.items():
        if r["outcome"] in ("loaded", "stacked", "expert", "raised_after_load"):
            evs = r.get("all_events") or [{"param": r.get("param"), "kwargs": {"shard_id": r.get("shard_id"),
                                                                                "expert_id": r.get("expert_id")}}]
            for e in evs:
                if not e.get("param"):
                    continue
                kw = e.get("kwargs") or {}
                sid = kw.get("shard_id")
                if sid is None:
                    sid = (e.get("args") or [None])[0] if e.get("args") else e.get("tensor_shard_attr")
                if sid is None and e is not None and "kwargs" not in e:
                    sid = r.get("shard_id")
                got[e["param"]].append((sid if sid is not None else r.get("shard_id"), kw.get("expert_id", r.get("expert_id"))))
    nothing, partial = [], {}
    for e in man["params"]:
        n = e["name"]
        if n not in got:
            nothing.append(n)
            continue
        recs = got[n]
        if any(x is not None for _, x in recs) and n_exp:
            have = {x for _, x in recs if x is not None}
            missing = sorted(set(range(n_exp)) - have)
            if missing:
                partial[n] = {"missing_expert_ids": missing}
        elif n.rsplit(".", 2)[-2] == "qkv_proj" if n.count(".") >= 2 else False:
            shards = {str(s) for s, _ in recs if s is not None}
            if shards:
                miss = [s for s in ("q", "k", "v") if s not in shards]
                if miss:
                    partial[n] = {"missing_shards": miss}
    return nothing, partial


def loader_fingerprint(mtp=False):
    import vllm

    if mtp:
        import vllm.model_executor.models.nemotron_h_mtp as nm

        src = inspect.getsource(nm.NemotronHMTP.load_weights)
        return {"vllm_version": vllm.__version__, "nemotron_h_mtp_file": nm.__file__,
                "mtp_load_weights_sha256": hashlib.sha256(src.encode()).hexdigest(),
                "nemotron_h_mtp_sha256": hashlib.sha256(inspect.getsource(nm).encode()).hexdigest()}
    import vllm.model_executor.models.nemotron_h as nh
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM
    from vllm.model_executor.models.utils import AutoWeightsLoader

    src = inspect.getsource(NemotronHForCausalLM.load_weights)
    awl = inspect.getsource(AutoWeightsLoader)
    return {
        "vllm_version": vllm.__version__,
        "nemotron_h_file": nh.__file__,
        "load_weights_sha256": hashlib.sha256(src.encode()).hexdigest(),
        "auto_weights_loader_sha256": hashlib.sha256(awl.encode()).hexdigest(),
        # no mapper before 0.10.2 (the 0.10.1.1 loop renames 'backbone' itself)
        "hf_to_vllm_mapper": jsonable({k: v for k, v in vars(mapper).items() if k.startswith("orig_to_new")})
        if (mapper := getattr(NemotronHForCausalLM, "hf_to_vllm_mapper", None)) is not None
        and hasattr(mapper, "__dict__") else None,
    }


# =========================================================================== main
def inspect_in_process(log):
    """``VLLM_ORACLE_INSPECT_IN_PROCESS=1``: the registry's model inspection (``_ModelInfo.from_model_cls`` of the
    model class: which interfaces it implements) runs in this process instead of a fresh Python that imports vLLM
    again. Releases before 0.11.0 cache no answer (``modelinfos``), so every checkpoint paid that second import (about
    two minutes on the shared host). Same function, same class, same answer; the subprocess only keeps CUDA out of
    the server's main process, and this host has none."""
    if os.environ.get("VLLM_ORACLE_INSPECT_IN_PROCESS") != "1":
        return
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()
    log("model inspection in process (VLLM_ORACLE_INSPECT_IN_PROCESS=1)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--platform", default="sm100", choices=["sm100", "sm90", "sm120"])
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--mtp", action="store_true", help="the MTP draft (speculative method mtp) instead")
    ap.add_argument("--work", default=None, help="scratch dir (VL shadow config); default OUT/../.work")
    a = ap.parse_args(argv)
    t0 = time.time()
    log = lambda m: print(f"[vllm-oracle {time.time() - t0:6.1f}s] {m}", file=sys.stderr, flush=True)
    import warnings

    warnings.filterwarnings("ignore")
    import vllm_platform

    vllm_platform.install(a.platform)
    inspect_in_process(log)
    install_logging()
    ckpt = os.path.abspath(a.ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        top = json.load(f)
    is_vl = top.get("model_type") in VL_MODEL_TYPES or "llm_config" in top
    work = a.work or os.path.join(os.path.dirname(os.path.abspath(a.out_dir)), ".work",
                                  os.path.basename(os.path.abspath(a.out_dir)))
    os.makedirs(work, exist_ok=True)
    global MTP_MODE
    MTP_MODE = a.mtp
    try:
        if a.mtp:
            vc, target, lm, notes = build_mtp(ckpt, a.platform, log)
        elif is_vl:
            vc, target, lm, notes = build_vl(ckpt, a.platform, log, work)
        else:
            vc, target, lm, notes = build_text(ckpt, a.platform, log)
    except Exception as e:  # vLLM refused the checkpoint while building config or model
        import traceback

        tb = traceback.extract_tb(e.__traceback__)
        os.makedirs(a.out_dir, exist_ok=True)
        rep = OrderedDict(startup_error=OrderedDict(
            error=f"{type(e).__name__}: {str(e)[:1500]}",
            raised_in=[f"{os.path.relpath(fr.filename, os.path.dirname(os.path.dirname(__import__('vllm').__file__)))}:{fr.lineno} {fr.name}"
                       for fr in tb[-6:]]))
        rep["meta"] = OrderedDict(oracle="vllm_oracle.py", checkpoint=ckpt, mtp=a.mtp, vllm_version=__import__("vllm").__version__,
                                  config_standin=CONFIG_STANDIN)
        with open(os.path.join(a.out_dir, "replay.json"), "w") as f:
            json.dump(rep, f, indent=1)
        log(f"start-up refused: {rep['startup_error']['error'][:300]}")
        return 0
    log(f"model built: {type(target).__name__}")

    names = {}
    n_wrapped = wrap_param_loaders(target, names)
    patched = wrap_default_loader(["vllm.model_executor.models.utils",
                                   "vllm.model_executor.models.nano_nemotron_vl",
                                   "vllm.model_executor.models.nemotron_h"]
                              + (["vllm.model_executor.models.nemotron_h_mtp"] if a.mtp else []), names)
    wrap_mapper()
    man = manifest(target, vc, notes)
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1)
    log(f"manifest: {man['num_params']} params; moe: {list(man['moe_methods'])}")

    tensors, files = checkpoint_tensors(vc)
    log(f"{len(tensors)} checkpoint tensors in {len(files)} files")

    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vc):
        install_logging()
        stream, sev = (None, [])
        if not a.no_stream:
            stream, sev = run_stream(target, vc, is_vl, a.mtp)
            log(f"stream: {'raised at ' + str(stream.get('tensor')) + ': ' + stream['error'][:200] if stream['raised'] else 'ok'}")
        install_logging()
        results = run_per_tensor(target, tensors)
    if stream is not None:
        order = stream.pop("_order")
        if not stream["raised"]:
            order = order + [None]  # every yielded tensor completed
        stream["consistency_with_per_tensor"] = stream_consistency(results, sev, order)
        stream["consistency_with_per_tensor"]["tensors_compared"] = len(order) - 1
    counts = Counter(r["outcome"] for r in results.values())
    n_exp = (top.get("llm_config") or top).get("n_routed_experts")
    nothing, partial = coverage(man, results, n_exp)
    out = OrderedDict()
    out["meta"] = OrderedDict(
        oracle="vllm_oracle.py",
        checkpoint=ckpt,
        files=files,
        loader=loader_fingerprint(a.mtp),
        platform=man["platform"],
        target_class=type(target).__name__,
        quant_config=(man["quant_config"] or {}).get("class"),
        moe_methods=list(man["moe_methods"]),
        num_tensors=len(tensors),
        mode="per-tensor (one load_weights call per tensor, real tensors, real weight_loaders) + one stream pass (real DefaultModelLoader.load_weights)",
        instrumentation=patched + [f"{n_wrapped} parameter weight_loaders wrapped (record, then call the real one)",
                                   "WeightsMapper.apply wrapped to record mapped names",
                                   "logging.Handler on the 'vllm' logger (DEBUG)",
                                   "vllm.logger *_once caches cleared before each tensor"],
        vl=notes,
        config_standin=CONFIG_STANDIN,
        attn_backend_head_size_relaxed=list(vllm_platform.RELAXED) or None,
        seconds=round(time.time() - t0, 1),
    )
    out["counts"] = dict(sorted(counts.items()))
    out["first_fatal_in_stream"] = stream
    out["raised_tensors"] = [n for n, r in results.items() if r["outcome"].startswith("raised")]
    out["params_without_tensor"] = nothing
    out["params_partially_filled"] = partial
    out["tensors"] = results
    with open(os.path.join(a.out_dir, "replay.json"), "w") as f:
        json.dump(out, f, indent=1)
    log(f"replay: {dict(counts)}; {len(nothing)} params without tensor -> {a.out_dir}")
    return 0


def batch(path: str) -> int:
    """``--batch JOBS.json``: [{"argv": [...], "log": PATH}, ...]. Imports vLLM once, then forks one
    child per job (each child runs main(argv) in a fresh copy of this process: its own gloo group,
    its own config). Only start-up time is shared; nothing the child records is."""
    import traceback

    with open(path) as f:
        jobs = json.load(f)
    import warnings

    warnings.filterwarnings("ignore")
    import vllm_platform

    vllm_platform.install(jobs[0].get("platform", "sm100") if jobs else "sm100")
    import vllm.engine.arg_utils  # noqa: F401
    import vllm.model_executor.model_loader.default_loader  # noqa: F401
    import vllm.model_executor.models.nemotron_h  # noqa: F401
    try:
        import vllm.model_executor.models.nano_nemotron_vl  # noqa: F401
    except Exception:  # pragma: no cover - imported again (and failing for real) in the child
        pass
    rcs = []
    for job in jobs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                rc = main(job["argv"])
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc or 0)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        rcs.append(rc)
        print(f"[vllm-oracle batch] rc={rc} {job['argv'][0]}", file=sys.stderr, flush=True)
    return 0 if all(r == 0 for r in rcs) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--batch":
        sys.exit(batch(sys.argv[2]))
    sys.exit(main())
