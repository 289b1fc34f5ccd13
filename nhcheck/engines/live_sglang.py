"""The installed SGLang's own code on one checkpoint's headers: the worker behind ``audit --live``.

    python -m nhcheck.engines.live_sglang REQUEST.json

Runs in a child process of ``nhcheck.live`` (SGLang sets process-wide state while it builds a
model: distributed groups, the published server arguments, the platform it believes it runs on),
under the same interpreter, so it sees the SGLang installed next to nhcheck. For each checkpoint in
the request it forks once more and, in that child:

1. resolves the start-up as SGLang's scheduler does: ``ServerArgs`` (with the Nemotron-H model
   override that picks the MoE backend), a one-rank gloo group, ``initialize_moe_config``,
   ``ModelConfig.from_server_args``, the load config and the ModelOpt quant config;
2. builds the real model with ``_initialize_model`` on the **meta** device (no weight memory, so a
   full-size config costs nothing) and writes every ``named_parameters()`` entry as an nhcheck
   ``Param``;
3. replaces every parameter's ``weight_loader`` by a recorder and wraps the module-level
   ``default_weight_loader`` of the model's modules so that a call is recorded and then made (on
   meta, its size assertion is real), stands recorders in for the vision / sound towers' loaders,
   and feeds the real ``load_weights`` the checkpoint's tensors as meta tensors of the header
   shapes and dtypes (one-element tensors as CPU zeros, for the scalar path) in SGLang's own
   order (its duplicate-file filter, files sorted, ``safe_open().keys()``). No tensor data is read.

The stream is run as the server runs it. When it raises, the tensor being processed is recorded
with the error (the first such is the crash point) and the stream resumes with the tensors not yet
processed, so every tensor gets the outcome it has on its own. Log records are tied to the tensor
the loader loop last took. A loader that takes the whole stream before it loads anything (releases
up to 0.5.9 remap every name into a list first) holds no tensor while it works: there, each tensor
it did not load is given to ``load_weights`` again on its own, and the first that raises, in stream
order, is the crash point. Results use nhcheck's vocabulary (``load`` / ``warn`` / ``skip`` /
``raise`` / ``routed``).

Releases before 0.5.11 import CUDA packages at module level; on a host without them the worker
runs again with stand-ins for those imports (``live_sglang_host``).

The platform is stated as a Blackwell GPU (sm100) at TP 1, the assumption the release table makes
too: through ``runtime_context.override_platform`` where the release has it, else by answering the
capability probes (``is_sm100_supported`` …) in SGLang's module namespaces. ``torch.Tensor.cuda`` is
the identity on a host without CUDA (NVFP4 MoE sizes its swizzled block scales through ``.cuda()``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from nhcheck.dtypes import TORCH_DTYPE
from nhcheck.engines import live_sglang_host
from nhcheck.engines.worker import is_setup_error, run_jobs

#: Capability facts of a B200-class GPU, by the names SGLang's platform record uses.
_SM100_FACTS = {
    "is_cuda": True,
    "is_blackwell": True,
    "is_sm100": True,
    "is_sm100_or_sm110": True,
    "is_sm110": False,
    "is_sm120": False,
    "is_sm90": False,
    "device_capability": (10, 0),
    "device_sm": 100,
}
#: The same, as the module-level probe functions of releases without ``override_platform``.
_SM100_PROBES = {
    "is_sm100_supported": True,
    "is_blackwell_supported": True,
    "is_sm120_supported": False,
    "is_sm90_supported": False,
}
#: How an error message names the checkpoint's own path (as the release table and the goldens do).
CHECKPOINT = "<checkpoint>"
#: Set in the worker's environment when it runs again with ``live_sglang_host``'s import stand-ins.
_STAND_INS = "NHCHECK_LIVE_STAND_INS"
_NOT_FOUND = re.compile(r"Parameter (\S+) not found in params_dict")
_KV_DROP = re.compile(r"not found the expected name in the model \(e\.g\. (\S+?)\)")
_SCALE_LEAF = re.compile(r"(?:^|_)scale(?:_\d+)?$|_scale_")


def _has(module: str) -> bool:
    """Whether this SGLang release ships ``module`` (its parent package may be missing too)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _has_modern_context() -> bool:
    """SGLang with ``runtime_context.publish`` and ``override_platform`` (0.5.19 on)."""
    if not _has("sglang.srt.runtime_context"):
        return False
    rc = importlib.import_module("sglang.srt.runtime_context")
    return hasattr(rc, "publish") and hasattr(rc, "override_platform")


def _call(fn, **kw):
    """Call an SGLang function with the keyword arguments its signature in this release takes."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kw)
    return fn(**{k: v for k, v in kw.items() if k in params})


def preimport() -> None:
    """Import what the build reads before it states the platform (once, before forking)."""
    for mod in (
        "sglang.srt.server_args",
        "sglang.srt.layers.quantization.modelopt_quant",
        "sglang.srt.model_loader.loader",
        "sglang.srt.models.nemotron_h",
    ):
        importlib.import_module(mod)


def _state_platform(shims: list[str]) -> None:
    import torch

    if _has_modern_context():
        rc = importlib.import_module("sglang.srt.runtime_context")
        known = set(getattr(rc, "_PLATFORM_PROBES", {})) | set(getattr(rc, "_PLATFORM_VALUES", {}))
        facts = {k: v for k, v in _SM100_FACTS.items() if not known or k in known}
        rc.override_platform(**facts).install()
    else:
        count = 0
        for name, mod in list(sys.modules.items()):
            if mod is None or not name.startswith("sglang"):
                continue
            for probe, value in _SM100_PROBES.items():
                fn = getattr(mod, probe, None)
                if callable(fn) and not isinstance(fn, type):
                    setattr(mod, probe, lambda _v=value: _v)
                    count += 1
        shims.append(f"capability probes answered as sm100 in {count} SGLang namespaces (no override_platform)")
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        shims.append("torch.Tensor.cuda is the identity (no CUDA device here)")


@dataclass
class _Build:
    model: Any
    lm: Any
    quantization: str | None
    moe_backend: str
    shims: list[str] = field(default_factory=list)


class StartupRefused(Exception):
    """SGLang raised while resolving the start-up or building the model; ``stage`` says where."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.stage = stage


def _meta_unless_small_mode():
    """``torch.device("meta")``, except that a tensor of at most ``_SMALL`` elements is made on the CPU.

    Model construction sometimes reads a value it has just made (the vision tower's drop-path
    rates: ``torch.linspace(...)[i].item()``), which a meta tensor cannot answer. Each factory call
    without a device runs on meta first (free), and again on the CPU only if its result is small,
    so no weight of a full-size model is ever allocated (the replay loads into meta stand-ins of those
    small parameters, ``replay``).
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    factories = _device_constructors()

    class MetaUnlessSmall(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories and kwargs.get("device") is None:
                out = func(*args, **dict(kwargs, device="meta"))
                if out.numel() <= _SMALL:
                    out = func(*args, **dict(kwargs, device="cpu"))
                return out
            return func(*args, **kwargs)

    return MetaUnlessSmall()


_SMALL = 1024
#: Errors that say this process was not set up as the engine's scheduler sets itself up (or that the
#: host has no CUDA where the release wants it): failures of the live run, never of the checkpoint.
_SETUP_ERRORS = ("not initialized", "Torch not compiled with CUDA", "context not published")


def _set_global_server_args(server_args: Any, sa: Any) -> None:
    """Make the resolved arguments the process's, as the scheduler does before it builds a model."""
    if hasattr(server_args, "set_global_server_args_for_scheduler"):
        server_args.set_global_server_args_for_scheduler(sa)
        return
    # 0.5.3.post1: the model runner copies the arguments the layers read into schedule_batch's dict
    sb = importlib.import_module("sglang.srt.managers.schedule_batch")
    sb.global_server_args_dict.update({k: getattr(sa, k) for k in sb.GLOBAL_SERVER_ARGS_KEYS})


def build(root: str, moe_backend: str) -> _Build:
    """The real start-up up to the model object, on the meta device."""
    shims: list[str] = []
    _state_platform(shims)
    stage = "server_args"
    try:
        server_args = importlib.import_module("sglang.srt.server_args")
        sa = server_args.ServerArgs(
            model_path=root,
            device="cpu",
            tp_size=1,
            moe_runner_backend=moe_backend,
            disable_radix_cache=True,  # its Mamba 'extra_buffer' check asserts CUDA; builds no parameter
        )
        rc = importlib.import_module("sglang.srt.runtime_context") if _has("sglang.srt.runtime_context") else None
        if rc is not None and hasattr(rc, "publish"):
            args: dict[str, Any] = {"role": "scheduler"}
            if "ranks" in inspect.signature(rc.publish).parameters:
                args["ranks"] = rc.SpawnRanks(world_rank=0)
            if not _has_modern_context():
                _set_global_server_args(server_args, sa)
            rc.publish(sa, **args)
        else:
            _set_global_server_args(server_args, sa)
        stage = "model_config"
        ps = importlib.import_module("sglang.srt.distributed.parallel_state")
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
        _call(ps.initialize_model_parallel, tensor_model_parallel_size=1, backend="gloo")
        moe = importlib.import_module("sglang.srt.layers.moe.utils")
        if inspect.signature(moe.initialize_moe_config).parameters:
            moe.initialize_moe_config(sa)
        else:
            moe.initialize_moe_config()
        ModelConfig = importlib.import_module("sglang.srt.configs.model_config").ModelConfig
        mc = ModelConfig.from_server_args(sa)
        dpa = importlib.import_module("sglang.srt.layers.dp_attention")
        if not _has_modern_context() and any(getattr(dpa, g, 0) is None for g in ("_ATTN_TP_SIZE", "_ATTN_DP_SIZE")):
            # what the model runner does after the groups exist; these releases read the attention TP
            # size while building the Mamba layers
            _call(dpa.initialize_dp_attention, server_args=sa, model_config=mc)
        stage = "quant_config"
        loader = importlib.import_module("sglang.srt.model_loader.loader")
        utils = importlib.import_module("sglang.srt.model_loader.utils")
        if _has("sglang.srt.model_executor.model_runner_components.load_model_utils"):
            lmu = importlib.import_module("sglang.srt.model_executor.model_runner_components.load_model_utils")
            lc = _call(
                lmu.build_load_config,
                server_args=sa,
                tp_rank=0,
                remote_instance_weight_transporter_engine=None,
                remote_instance_weight_transporter_session_id="",
                draft_model_idx=None,
                weight_cache_mode="off",
                weight_cache_socket=None,
            )
        else:
            LoadConfig = importlib.import_module("sglang.srt.configs.load_config").LoadConfig
            lc = LoadConfig(load_format=sa.load_format, download_dir=sa.download_dir)
        # before 0.5.10, _initialize_model(model_config, load_config) resolves the quant config itself
        resolves_quant = "quant_config" not in inspect.signature(loader._initialize_model).parameters
        qc = None if resolves_quant else loader._get_quantization_config(mc, lc)
        stage = "model_build"
        with utils.set_default_torch_dtype(mc.dtype), _meta_unless_small_mode():
            model = loader._initialize_model(mc, lc) if resolves_quant else loader._initialize_model(mc, lc, qc)
        backend = str(moe.get_moe_runner_backend().value)
    except ImportError:
        raise  # this environment lacks a module: not the engine refusing the checkpoint
    except Exception as exc:
        if is_setup_error(exc, __file__, _SETUP_ERRORS):
            raise  # our set-up of the process, not the engine refusing the checkpoint: never a verdict
        raise StartupRefused(stage, exc) from exc
    nh = importlib.import_module("sglang.srt.models.nemotron_h")
    lm = next((m for m in model.modules() if isinstance(m, nh.NemotronHForCausalLM)), model)
    return _Build(model, lm, mc.quantization, backend, shims)


# ---------------------------------------------------------------------------- the manifest


def _class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _towers(b: _Build) -> dict[str, Any]:
    """The wrapper's children with a loader of their own (vision / sound towers), by name."""
    if b.lm is b.model:
        return {}
    return {
        name: child
        for name, child in b.model.named_children()
        if child is not b.lm and callable(getattr(child, "load_weights", None))
    }


def manifest(b: _Build) -> dict:
    """Every runtime parameter as an nhcheck ``Param`` (towers excluded: their loaders are theirs)."""
    from nhcheck.quant import A16_LINEAR

    towers = tuple(f"{n}." for n in _towers(b))
    lm_prefix = next((f"{n}." for n, m in b.model.named_modules() if m is b.lm and n), "")
    n_experts = getattr(b.lm.config, "n_routed_experts", None)
    modules = dict(b.model.named_modules())
    out = []
    for name, p in b.model.named_parameters():
        if towers and name.startswith(towers):
            continue
        owner = modules.get(name.rpartition(".")[0])
        qm = getattr(owner, "quant_method", None)
        leaf = name.rpartition(".")[2]
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(p.shape),
            "dtype": str(p.dtype).removeprefix("torch."),
            "quant_method": type(qm).__name__ if qm is not None else None,
            "loader": "default",
        }
        classes = _class_names(owner) if owner is not None else set()
        if "FusedMoE" in classes and getattr(owner, "use_padded_loading", False):
            entry["padded"] = True  # the backend pads expert dimensions; the loader narrows to the tensor
        if "blockscale_swizzled" in leaf:
            entry["reachable"] = False  # filled from *_weight_scale after loading, by no checkpoint name
        elif "FusedMoE" in classes:
            entry.update(
                loader="expert",
                num_experts=n_experts or (p.shape[0] if p.dim() else 0),
                shard_ids=["w2"] if leaf.startswith("w2_") else ["w1"],
            )
        elif owner is not None and "QKVParallelLinear" in classes:
            entry["loader"] = "stacked"
            sizes = [owner.num_heads * owner.head_size] + [
                owner.num_kv_heads * getattr(owner, a, owner.head_size) for a in ("head_size", "v_head_size")
            ]
            if p.dim() and p.shape[0] == sum(sizes):
                entry["slots"] = [[s, sum(sizes[:i]), n] for i, (s, n) in enumerate(zip("qkv", sizes, strict=True))]
            elif p.dim() == 1 and p.shape[0] == 3:
                entry["slots"] = [[s, i, 1] for i, s in enumerate("qkv")]
        if qm is not None and "BaseKVCacheMethod" in _class_names(qm):
            entry["informational"] = True  # the attention keeps its default KV scales
        elif entry["quant_method"] == A16_LINEAR and leaf == "input_scale":
            entry["informational"] = True  # weight-only NVFP4: the activation scale is a placeholder
        out.append(entry)
    return {"lm_prefix": lm_prefix, "quantization": b.quantization, "moe_backend": b.moe_backend, "params": out}


# ---------------------------------------------------------------------------- the replay


@dataclass
class _Tape:
    """What happened while the loader loop held each tensor (by index in SGLang's order)."""

    current: int | None = None
    exhausted: bool = False
    outer_done: bool = False
    lm_started_after_outer: bool | None = None
    processed: set[int] = field(default_factory=set)
    #: a tensor was loaded or logged while the loop held it (False: the loader took the whole
    #: stream before it loaded anything, so ``current`` names no tensor while it works)
    interleaved: bool = False
    events: dict[int, tuple] = field(default_factory=dict)
    logs: dict[int, list[str]] = field(default_factory=dict)
    raised: dict[int, str] = field(default_factory=dict)

    def held(self) -> int | None:
        """The tensor the loader loop holds now (None: none, or it has taken the whole stream)."""
        return None if self.exhausted else self.current


class _LogTap(logging.Handler):
    def __init__(self, tape: _Tape) -> None:
        super().__init__(logging.WARNING)
        self.tape = tape
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if any(r is record for r in self.seen[-8:]):  # reached twice through propagation
            return
        self.seen.append(record)
        self.tape.interleaved = self.tape.interleaved or self.tape.held() is not None
        if self.tape.current is not None:
            self.tape.logs.setdefault(self.tape.current, []).append(record.getMessage())


def engine_order(root: str, given: list[list]) -> list[tuple[str, str, str, list[int]]]:
    """(name, shard, dtype, shape) in SGLang's stream order, from the local shard headers."""
    import glob

    import safetensors

    wu = importlib.import_module("sglang.srt.model_loader.weight_utils")
    files = glob.glob(os.path.join(root, "*.safetensors"))
    if not files:
        return [(str(n), str(f), str(d), list(s)) for n, f, d, s in given]
    files = wu.filter_duplicate_safetensors_files(files, root, "model.safetensors.index.json")
    out = []
    for f in sorted(files):
        with safetensors.safe_open(f, framework="pt", device="cpu") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                out.append((name, os.path.basename(f), sl.get_dtype(), list(sl.get_shape())))
    return out


def replay(b: _Build, tensors: list[tuple[str, str, str, list[int]]]) -> dict:
    """Run the real ``load_weights`` over every tensor; outcomes per tensor and the crash point."""
    import torch

    tape = _Tape()
    names = [t[0] for t in tensors]
    objs = []
    for _, _, dtype, shape in tensors:
        dt = getattr(torch, TORCH_DTYPE.get(dtype, "uint8"))  # F4/F6 have none: held as bytes
        n = 1
        for d in shape:
            n *= d
        objs.append(torch.zeros(shape, dtype=dt) if n <= 1 else torch.empty(shape, dtype=dt, device="meta"))
    index = {id(o): i for i, o in enumerate(objs)}
    full = {id(p): n for n, p in b.model.named_parameters()}

    def record(kind: str, param: object, w: object, args: tuple = (), kwargs: dict | None = None) -> None:
        i = index.get(id(w))
        if i is not None and i not in tape.events:
            tape.events[i] = (kind, full.get(id(param)), args, kwargs or {})
            tape.interleaved = tape.interleaved or tape.held() is not None

    for p in b.model.parameters():
        if hasattr(p, "weight_loader"):

            def recorder(param, loaded_weight, *args, **kwargs):
                record("loader", param, loaded_weight, args, kwargs)

            try:
                p.weight_loader = recorder
            except AttributeError:  # BasevLLMParameter: a read-only property over _weight_loader
                p._weight_loader = recorder
    for cls in {*type(b.model).__mro__, *type(b.lm).__mro__}:
        mod = sys.modules.get(cls.__module__)
        real = getattr(mod, "default_weight_loader", None)
        if real is None or getattr(real, "__nhcheck_real__", None):
            continue

        def default_weight_loader(param, loaded_weight, _real=real):
            record("default", param, loaded_weight)
            if param.device.type != "meta":  # a small parameter made on the CPU: same size and dtype on meta
                param = torch.nn.Parameter(torch.empty_like(param.data, device="meta"), requires_grad=False)
            return _real(param, loaded_weight)

        default_weight_loader.__nhcheck_real__ = real  # type: ignore[attr-defined]
        mod.default_weight_loader = default_weight_loader  # type: ignore[union-attr]
    for tower in _towers(b).values():

        def routed(weights, *a, **k):
            for _name, w in weights:
                i = index.get(id(w))
                if i is not None and i not in tape.events:
                    tape.events[i] = ("routed", None, (), {})
            return set()

        tower.load_weights = routed
    real_lm_load = b.lm.load_weights

    def lm_load_weights(weights, *a, **k):
        def taken(it):
            for name, w in it:
                if tape.lm_started_after_outer is None:
                    tape.lm_started_after_outer = tape.outer_done
                i = index.get(id(w))
                tape.current, tape.exhausted = i, False
                if i is not None:
                    tape.processed.add(i)
                yield name, w
            tape.exhausted = True

        return real_lm_load(taken(weights), *a, **k)

    b.lm.load_weights = lm_load_weights

    def feed(order: list[int]):
        tape.outer_done = False
        for i in order:
            tape.current, tape.exhausted = i, False
            yield names[i], objs[i]
        tape.outer_done = tape.exhausted = True

    tap = _LogTap(tape)
    loggers = [logging.getLogger()] + [
        lg
        for n, lg in logging.Logger.manager.loggerDict.items()
        if n.startswith("sglang") and isinstance(lg, logging.Logger) and not lg.propagate
    ]
    for lg in loggers:
        lg.addHandler(tap)
    crash: dict | None = None
    todo = list(range(len(tensors)))
    while todo:
        tape.current, tape.exhausted = None, False
        try:
            with torch.no_grad():
                b.model.load_weights(feed(todo))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            culprit = tape.held()
            if crash is None:
                crash = {"tensor": names[culprit] if culprit is not None else None, "error": error}
            if culprit is None or culprit in tape.raised:
                break
            tape.raised[culprit] = error
            todo = [i for i in todo if i not in tape.processed and i not in tape.events and i not in tape.raised]
            continue
        break
    if tape.processed and not tape.interleaved:
        # a loader that takes the whole stream before it loads (0.5.9 and older:
        # NemotronHForCausalLM.load_weights remaps every name into a list first) leaves no tensor
        # to tie a log or an error to: each tensor it did not hand to a recorder (none, or the real
        # default_weight_loader, whose size check may raise) is given to it again, on its own
        tape.logs.clear()
        tape.raised.clear()
        _forget_warnings_once()
        for i in range(len(tensors)):
            if i in tape.events and tape.events[i][0] != "default":
                continue
            try:
                with torch.no_grad():
                    b.model.load_weights(feed([i]))
            except Exception as exc:
                tape.raised[i] = f"{type(exc).__name__}: {exc}"
        if crash is not None and crash["tensor"] is None:
            # the loader works through its list in stream order: the first tensor that raises is the crash point
            first = min(tape.raised, default=None)
            if first is not None and tape.raised[first] == crash["error"]:
                crash["tensor"] = names[first]
    for lg in loggers:
        lg.removeHandler(tap)
    return {
        "tensors": {names[i]: _outcome(tape, i) for i in range(len(tensors))},
        "crash": crash,
        "buffers": bool(tape.lm_started_after_outer) and b.lm is not b.model,
    }


def _forget_warnings_once() -> None:
    """Let SGLang's once-per-process warnings (``print_warning_once``: lru-cached per message, e.g. the
    KV-scale remap's) be logged again, for a replay of the same tensors in the same order."""
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith("sglang"):
            for attr, fn in list(vars(mod).items()):
                if attr.endswith("_once") and callable(getattr(fn, "cache_clear", None)):
                    fn.cache_clear()


def _outcome(tape: _Tape, i: int) -> dict:
    o: dict[str, Any] = {
        "outcome": "skip",
        "param": None,
        "shard_id": None,
        "expert_id": None,
        "engine_name": None,
        "message": None,
    }
    if i in tape.raised:
        return dict(o, outcome="raise", message=tape.raised[i])
    ev = tape.events.get(i)
    if ev is not None:
        kind, param, args, kwargs = ev
        if kind == "routed":
            return dict(o, outcome="routed")
        o.update(outcome="load", param=param)
        if "shard_id" in kwargs or "expert_id" in kwargs:
            o.update(shard_id=kwargs.get("shard_id"), expert_id=kwargs.get("expert_id"))
        elif kind == "loader" and len(args) == 1:
            o["shard_id"] = args[0]
        return o
    for msg in tape.logs.get(i, ()):
        m = _NOT_FOUND.search(msg) or _KV_DROP.search(msg)
        if m:
            return dict(o, outcome="warn", engine_name=m.group(1), message=msg)
    return o


# ---------------------------------------------------------------------------- the process


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _one(job: dict, moe_backend: str, host_shims: list[str]) -> dict:
    import sglang

    os.environ["MASTER_PORT"] = _free_port()
    out: dict[str, Any] = {"sglang": sglang.__version__, "startup": None, "shims": host_shims}
    try:
        b = build(job["root"], moe_backend)
    except StartupRefused as exc:
        # the checkpoint's path as the table and the goldens write it, so that answers compare anywhere
        out["startup"] = {"stage": exc.stage, "error": str(exc).replace(job["root"], CHECKPOINT)}
        return out
    out["shims"] = host_shims + b.shims
    out["manifest"] = manifest(b)
    out.update(replay(b, engine_order(job["root"], job.get("tensors") or [])))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0]) as fh:
        request = json.load(fh)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    logging.getLogger().setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    stand_ins = os.environ.get(_STAND_INS) == "1"
    host_shims = live_sglang_host.install() if stand_ins else []
    try:
        preimport()
    except ModuleNotFoundError as exc:
        if stand_ins or not live_sglang_host.missing_host_package(exc):
            raise
        # a release before 0.5.11 on a host without CUDA: again, in a fresh process, with stand-ins
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *args], {**os.environ, _STAND_INS: "1"})
    moe_backend = request.get("moe_backend") or "auto"
    run_jobs(request["jobs"], lambda job: _one(job, moe_backend, host_shims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
