"""The installed vLLM's own code on one checkpoint's headers: the worker behind ``audit --live --engine vllm``.

    python -m nhcheck.engines.live_vllm REQUEST.json

Runs in a child process of ``nhcheck.live`` (vLLM sets process-wide state while it builds a model:
the current platform, the distributed groups, the current ``VllmConfig``), under the same
interpreter, so it sees the vLLM installed next to nhcheck. For each checkpoint in the request it
forks once more (releases before 0.20.0 initialise CUDA while vLLM is imported, so there the child
imports vLLM itself) and, in that child:

1. resolves the start-up as ``vllm serve`` does: ``EngineArgs(...).create_engine_config()`` (the
   quant config class chosen from the checkpoint's files), a one-rank gloo group;
2. builds the real model with ``model_loader.utils.initialize_model`` on the **meta** device (no
   weight memory: a full-size config costs nothing) and writes every ``named_parameters()`` entry
   as an nhcheck ``Param``;
3. wraps every parameter's ``weight_loader`` and the ``default_weight_loader`` of vLLM's model
   modules with recorders that record the call and then make it (on meta, the loaders' narrowing
   and shape checks are real), and ``WeightsMapper.apply`` to learn the mapped names;
4. lists the checkpoint's tensors with vLLM's own ``DefaultModelLoader.get_all_weights`` (its file
   filter, natural sort and safetensors iterator) over a header-only ``safe_open`` that hands out
   meta tensors of the header shapes and dtypes (one-element tensors as CPU zeros: the scalar path
   reads their value). No tensor data is read;
5. runs the real ``DefaultModelLoader.load_weights`` over that stream (the crash point, and the
   strict "weights not initialized" check of unquantized models). When it raises, the tensor being
   processed is recorded with the error and the stream resumes after it through the model's
   ``load_weights``, so every tensor gets the outcome it has on its own (vLLM's goldens record
   each tensor loaded alone); loader calls, mapped names and log records are tied to the tensor
   the stream last yielded.

Outcomes use nhcheck's vocabulary (``load`` / ``warn`` / ``skip`` / ``raise``); a tensor whose
weight loader was called and then raised has ``raise`` with its parameter (``loaded``: the loader's
own shape check refused it). A warning counts as the engine dropping a tensor only where it is
logged without a load: the once-per-process warnings every tensor of a kind passes through
(0.28.0 – 0.31.0 ``Unexpected gate/up projection names``) also accompany loads and are left out.
``AutoWeightsLoader``'s errors list parameters as a Python ``set`` (in the process's string-hash
order); the worker writes those lists sorted, so two runs of one release say the same.

Host facts, stated as the release table states them: a Blackwell GPU (compute capability 10.0) at
TP 1 — an emulated CUDA platform that answers only the device facts is installed as
``vllm.platforms.current_platform`` (torch's own capability probe answers the same, for releases
before 0.20.0), ``VLLM_DISABLE_SHARED_EXPERTS_STREAM=1`` (vLLM's switch; shared experts then make
no CUDA stream). Where transformers has no ``nemotron_h`` config class (vLLM 0.16.0 – 0.19.x pin
transformers 4.x; a real server runs the checkpoint's own config code with ``--trust-remote-code``),
vLLM's own copy of that class is registered for it. Each shim is listed in the answer (``shims``).
On a host without a GPU the CUDA extension vLLM imports needs a ``libcuda.so.1`` on the loader path
(``oracle/vllm/make_stub_libcuda.sh`` makes one whose calls all answer "no device").
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from nhcheck.dtypes import TORCH_DTYPE
from nhcheck.engines.worker import is_setup_error, run_jobs

#: The emulated GPU: compute capability and name of a B200 (the capability picks the NVFP4 kernels).
_CAPABILITY = (10, 0)
_DEVICE_NAME = "NVIDIA B200"
#: ``AutoWeightsLoader``'s and the strict check's errors: a prefix, then a Python set of names.
_SET_ERROR = re.compile(
    r"^(.*?(?:The available parameters belonging to .*? are: |were not initialized from checkpoint: ))\{(.*)\}(.*)$",
    re.S,
)
#: Errors that say this process was not set up as vLLM's own start-up sets itself up (or that the host
#: lacks what the release imports): failures of the live run, never the engine refusing the checkpoint.
_SETUP_ERRORS = ("in forked subprocess", "NVIDIA driver", "not initialized", "Torch not compiled with CUDA")
_SMALL = 1
#: torch names a tensor's device in some errors (``expand(CPUFloatType{[64, 2]}, …)``): the server's
#: checkpoint tensors are CPU tensors where the worker's stand-ins are meta ones.
_META_TYPE = re.compile(r"\bMeta(\w+)Type\{")
#: The registry's refusal lists every architecture vLLM knows after the ones it refuses: not about the checkpoint.
_REGISTRY_LISTING = re.compile(r"\s*Supported architectures: dict_keys\(\[.*\]\)\.?$", re.S)


def _release() -> str:
    from importlib import metadata

    return metadata.version("vllm")


def _old_cuda_import() -> bool:
    """Releases before 0.20.0 initialise torch.cuda while vLLM is imported: a forked child could not build."""
    parts = tuple(int(x) for x in re.findall(r"\d+", _release())[:2])
    return parts < (0, 20)


# ---------------------------------------------------------------------------- host facts


_STATED: list[str] = []
#: What the answer rests on beyond the loader, for the report (``info`` findings).
NOTES: list[str] = []


def state_platform(shims: list[str]) -> None:
    """A CUDA platform that answers device facts only: compute capability 10.0, one device, no NVML (once)."""
    if _STATED:
        shims.extend(_STATED)
        return
    import torch
    import vllm.platforms as vp
    from vllm.platforms.cuda import NonNvmlCudaPlatform
    from vllm.platforms.interface import DeviceCapability

    major, minor = _CAPABILITY

    class StatedCudaPlatform(NonNvmlCudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id=0):
            return DeviceCapability(major=major, minor=minor)

        @classmethod
        def get_device_name(cls, device_id=0):
            return _DEVICE_NAME

        @classmethod
        def get_device_total_memory(cls, device_id=0):
            return 180 << 30

        @classmethod
        def is_fully_connected(cls, physical_device_ids):
            return True

        @classmethod
        def is_pin_memory_available(cls):
            return False

        @classmethod
        def device_count(cls):
            return 1

        @classmethod
        def get_attn_backend_cls(cls, *args, **kwargs):
            """The real selection; where it finds no backend only because of the head size (the attention
            backend builds no parameter and maps no name), again with that one check relaxed, said in
            ``NOTES``: kernels' head-size support is the GPU's and its kernel packages', not the loader's."""
            try:
                return super().get_attn_backend_cls(*args, **kwargs)
            except ValueError as exc:
                if "No valid attention backend" not in str(exc) or "head_size not supported" not in str(exc):
                    raise
                backend = importlib.import_module("vllm.v1.attention.backend").AttentionBackend
                real = backend.__dict__["validate_configuration"]

                def relaxed(klass, *a, **k):
                    return [r for r in real.__func__(klass, *a, **k) if r != "head_size not supported"]

                backend.validate_configuration = classmethod(relaxed)
                try:
                    chosen = super().get_attn_backend_cls(*args, **kwargs)
                finally:
                    backend.validate_configuration = real
                NOTES.append(
                    "no attention kernel of this host takes the checkpoint's head size; the attention backend was "
                    f"chosen without that check ({chosen}): it builds no parameter, and on the GPU the server "
                    "needs a kernel for this head size"
                )
                return chosen

    vp.current_platform = StatedCudaPlatform()
    torch.cuda.get_device_capability = lambda device=None: (major, minor)
    os.environ.setdefault("VLLM_DISABLE_SHARED_EXPERTS_STREAM", "1")
    _STATED.append(f"platform stated as a CUDA GPU of compute capability {major}.{minor} at TP 1")
    shims.extend(_STATED)


def config_standin(shims: list[str]) -> None:
    """Register vLLM's own ``NemotronHConfig`` where transformers has no ``nemotron_h`` model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "nemotron_h" in CONFIG_MAPPING:
        return
    from transformers import AutoConfig

    cls = importlib.import_module("vllm.transformers_utils.configs.nemotron_h").NemotronHConfig
    AutoConfig.register("nemotron_h", cls, exist_ok=True)
    shims.append(
        "transformers has no nemotron_h config class: vLLM's own transformers_utils/configs/nemotron_h.py "
        "stands in for the checkpoint's configuration code (--trust-remote-code)"
    )


def preimport() -> None:
    """Import what every build reads (once, before forking; releases from 0.20.0)."""
    for mod in (
        "vllm.engine.arg_utils",
        "vllm.model_executor.model_loader.default_loader",
        "vllm.model_executor.models.nemotron_h",
    ):
        importlib.import_module(mod)


# ---------------------------------------------------------------------------- the build


class StartupRefused(Exception):
    """vLLM raised while resolving the engine config or building the model; ``stage`` says where."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(error_text(error))
        self.stage = stage


def error_text(exc: BaseException) -> str:
    """``Type: message``; an error the engine-args layer wrapped in pydantic's ``ValidationError`` is
    written as the error vLLM's validator raised (its ``ctx``), the set in a listing sorted, a stand-in
    tensor's device (meta) as the server's checkpoint tensor's (CPU), the registry's refusal without its
    list of every architecture vLLM knows."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):
        try:
            inner = [e.get("ctx", {}).get("error") for e in errors()]
        except Exception:  # noqa: BLE001 - not pydantic's: keep the error as it is
            inner = []
        if len(inner) == 1 and isinstance(inner[0], BaseException):
            exc = inner[0]
    text = _META_TYPE.sub(r"CPU\1Type{", f"{type(exc).__name__}: {exc}")
    return sorted_sets(_REGISTRY_LISTING.sub("", text))


def sorted_sets(message: str) -> str:
    """A message listing a Python ``set`` of names, with the names sorted (the set's order is the hash's)."""
    m = _SET_ERROR.match(message)
    if m is None:
        return message
    items = sorted(x for x in m.group(2).split(", ") if x)
    return f"{m.group(1)}{{{', '.join(items)}}}{m.group(3)}"


@dataclass
class _Build:
    vc: Any
    model: Any
    lm: Any
    shims: list[str] = field(default_factory=list)
    towers: list[_Tower] = field(default_factory=list)


class _Tower:
    """Stands in for the wrapper's vision / sound tower: records what the wrapper routes to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tape: _Tape | None = None

    def load_weights(self, weights) -> set[str]:
        for _name, w in weights:
            if self.tape is not None:
                self.tape.add(self.tape.events, ("routed", None, [], {}), w)
        return set()


def _init_distributed(vc: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(vc):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
        )
        ensure_model_parallel_initialized(1, 1)


def wrapped_config(root: str) -> tuple[dict, dict] | None:
    """(the wrapper's config.json, its language model's config) of an Omni / VL checkpoint; None for text."""
    with open(os.path.join(root, "config.json")) as fh:
        top = json.load(fh)
    text = top.get("llm_config") or top.get("text_config")
    return (top, dict(text)) if isinstance(text, dict) else None


def _text_view(root: str, text: dict, work: str) -> str:
    """A directory whose config.json is the language model's config (what the wrapper's ``text_config``
    resolves to) beside the checkpoint's own quant config and shards (linked, never copied)."""
    view = os.path.join(work, "text-view")
    os.makedirs(view, exist_ok=True)
    with open(os.path.join(view, "config.json"), "w") as fh:
        json.dump(dict(text, architectures=text.get("architectures") or ["NemotronHForCausalLM"]), fh)
    for name in os.listdir(root):
        if name != "config.json":
            os.symlink(os.path.join(os.path.abspath(root), name), os.path.join(view, name))
    return view


def _wrapper(vc: Any, top: dict, text: dict, shims: list[str]) -> tuple[Any, list[_Tower]]:
    """``NemotronH_Nano_VL_V2`` with its language model and projector built as its ``__init__`` builds them.

    The wrapper's own ``__init__`` needs the checkpoint's remote config class (``--trust-remote-code``) and
    builds the RADIO / Parakeet towers, which load through their own loaders; here the language model is
    vLLM's ``initialize_model(..., prefix="language_model")`` under the wrapper's quant-config set-up, the
    projector ``mlp1`` is made of vLLM's layers in the ``__init__``'s order, and the towers are routing
    recorders. ``load_weights`` is the wrapper's own.
    """
    from torch import nn

    vl = importlib.import_module("vllm.model_executor.models.nano_nemotron_vl")
    nh = importlib.import_module("vllm.model_executor.models.nemotron_h")
    utils = importlib.import_module("vllm.model_executor.model_loader.utils")
    rms = importlib.import_module("vllm.model_executor.layers.layernorm").RMSNorm
    relu2 = importlib.import_module("vllm.model_executor.layers.activation").ReLUSquaredActivation
    cls = vl.NemotronH_Nano_VL_V2
    if vc.quant_config is not None and hasattr(utils, "configure_quant_config"):
        utils.configure_quant_config(vc.quant_config, cls)
    lm = utils.initialize_model(vllm_config=vc, prefix="language_model", model_class=nh.NemotronHForCausalLM)
    w = object.__new__(cls)
    nn.Module.__init__(w)
    w.language_model = lm
    dt = vc.model_config.dtype
    vit = int(top.get("vision_hidden_size") or top["vit_hidden_size"])
    wide = vit * int(round(1 / top.get("downsample_ratio", 0.5))) ** 2
    proj = top["projector_hidden_size"]
    w.mlp1 = nn.Sequential(
        rms(hidden_size=wide, eps=1e-5),
        nn.Linear(wide, proj, bias=False),
        relu2(),
        nn.Linear(proj, text["hidden_size"], bias=False),
    ).to(dt)
    if "vision_final_layernorm" in inspect.getsource(cls.__init__):  # the release builds it (0.32.0 on)
        mtp = (text.get("num_nextn_predict_layers") or 0) > 0
        w.vision_final_layernorm = nn.LayerNorm(vit, eps=1e-6).to(dt) if mtp else None
    towers = [_Tower("vision_model")] + ([_Tower("sound_encoder")] if top.get("sound_config") else [])
    object.__setattr__(w, "vision_model", towers[0])
    object.__setattr__(w, "sound_encoder", towers[1] if len(towers) > 1 else None)
    limits = SimpleNamespace(get_limit_per_prompt=lambda modality: 1)
    object.__setattr__(w, "model_config", SimpleNamespace(multimodal_config=limits))
    shims.append(
        f"{top.get('architectures')}: the wrapper's language model and projector built as its __init__ builds "
        "them, its towers routing recorders (its own __init__ needs the checkpoint's remote config code)"
    )
    return w, towers


def build(root: str, work: str) -> _Build:
    """The real engine-config resolution and model build, on the meta device."""
    import torch

    shims: list[str] = []
    state_platform(shims)
    config_standin(shims)
    wrapped = wrapped_config(root)
    towers: list[_Tower] = []
    stage = "engine_config"
    try:
        from vllm.engine.arg_utils import EngineArgs

        if wrapped is not None:  # the server's gate after the config: the architecture must be registered
            registry = importlib.import_module("vllm.model_executor.models.registry").ModelRegistry
            archs = list(wrapped[0].get("architectures") or [])
            if not any(a in registry.get_supported_archs() for a in archs):
                registry._raise_for_unsupported(archs)
        args = EngineArgs(
            model=root if wrapped is None else _text_view(root, wrapped[1], work),
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=256,
            load_format="safetensors",
            tensor_parallel_size=1,
        )
        vc = args.create_engine_config()
        _init_distributed(vc)
        stage = "model_build"
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.utils import initialize_model
        from vllm.utils.torch_utils import set_default_torch_dtype

        with set_current_vllm_config(vc), set_default_torch_dtype(vc.model_config.dtype), torch.device("meta"):
            if wrapped is None:
                model = initialize_model(vllm_config=vc)
            else:
                model, towers = _wrapper(vc, *wrapped, shims)
    except ImportError:
        raise  # this environment lacks a module: not the engine refusing the checkpoint
    except Exception as exc:
        if is_setup_error(exc, __file__, _SETUP_ERRORS):
            raise  # our set-up of the process, not the engine refusing the checkpoint: never a verdict
        raise StartupRefused(stage, exc) from exc
    nh = importlib.import_module("vllm.model_executor.models.nemotron_h")
    lm = next((m for m in model.modules() if isinstance(m, nh.NemotronHForCausalLM)), model)
    return _Build(vc, model, lm, shims, towers)


# ---------------------------------------------------------------------------- the manifest


def _classes(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def manifest(b: _Build) -> dict:
    """Every runtime parameter as an nhcheck ``Param``, its loader kind read from the module that owns it."""
    modules = dict(b.model.named_modules())
    lm_prefix = next((f"{n}." for n, m in b.model.named_modules() if m is b.lm and n), "")
    n_experts = getattr(b.lm.config, "n_routed_experts", None) or 0
    out = []
    for name, p in b.model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        qm = getattr(owner, "quant_method", None)
        classes = _classes(owner) if owner is not None else set()
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(p.shape),
            "dtype": str(p.dtype).removeprefix("torch."),
            "quant_method": type(qm).__name__ if qm is not None else None,
            "loader": "default",
        }
        if classes & {"FusedMoE", "RoutedExperts"}:
            entry.update(
                loader="expert",
                num_experts=int(getattr(owner, "global_num_experts", 0) or n_experts or (p.shape[0] if p.dim() else 0)),
                shard_ids=["w2"] if leaf.startswith("w2_") else ["w1"],
            )
        elif "QKVParallelLinear" in classes:
            entry["loader"] = "stacked"
            sizes = [int(s) for s in getattr(owner, "output_sizes", ())]
            if len(sizes) == 3 and p.dim() and p.shape[0] == sum(sizes):
                entry["slots"] = [[s, sum(sizes[:i]), n] for i, (s, n) in enumerate(zip("qkv", sizes, strict=True))]
            elif p.dim() == 1 and p.shape[0] <= 3:
                entry["slots"] = [[s, i, 1] for i, s in enumerate("qkv")]
        elif leaf == "A" and "MambaMixer2" in classes:
            entry["loader"] = "mamba_A"
        if "Attention" in classes and leaf.endswith("_scale"):
            entry["informational"] = True  # the attention keeps its default scales when none is given
        elif owner_name.endswith("vision_final_layernorm"):
            entry["informational"] = True  # nn.LayerNorm's initial values stand when no tensor fills it
        out.append(entry)
    return {
        "lm_prefix": lm_prefix,
        "quantization": b.vc.model_config.quantization,
        "moe_backend": "",  # vLLM's MoE backend (picked from the GPU) changes no parameter
        "params": out,
    }


# ---------------------------------------------------------------------------- the tensors


class _HeaderOnly:
    """``safe_open`` over one shard's header: real names, dtypes and shapes; stand-in tensors, no data read."""

    def __init__(self, filename: str, framework: str = "pt", device: str = "cpu") -> None:
        import safetensors

        self._real = safetensors.safe_open(filename, framework="pt", device="cpu")

    def __enter__(self) -> _HeaderOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None  # the header handle closes with this object

    def keys(self) -> list[str]:
        return list(self._real.keys())

    def metadata(self) -> dict | None:
        return self._real.metadata()

    def get_slice(self, name: str):
        return self._real.get_slice(name)

    def get_tensor(self, name: str):
        import torch

        sl = self._real.get_slice(name)
        dtype = getattr(torch, TORCH_DTYPE.get(sl.get_dtype(), "uint8"))
        shape = list(sl.get_shape())
        n = 1
        for d in shape:
            n *= d
        if n <= _SMALL:
            return torch.zeros(shape, dtype=dtype)
        return torch.empty(shape, dtype=dtype, device="meta")


def engine_stream(b: _Build) -> tuple[Any, list[tuple[str, Any]]]:
    """The loader and the checkpoint's (name, stand-in tensor) pairs in the order vLLM's loader yields them."""
    from vllm.model_executor.model_loader import weight_utils
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    dl = DefaultModelLoader(b.vc.load_config)
    real_open = weight_utils.safe_open
    weight_utils.safe_open = _HeaderOnly
    try:
        tensors = list(dl.get_all_weights(b.vc.model_config, b.model))
    finally:
        weight_utils.safe_open = real_open
    return dl, tensors


# ---------------------------------------------------------------------------- the replay


@dataclass
class _Tape:
    """What happened while the loader held each tensor (by index in vLLM's order)."""

    current: int | None = None
    exhausted: bool = False
    #: one tensor fed alone: everything that happens belongs to it
    pinned: bool = False
    #: stand-in tensor id → index: a load is the tensor's it is given, wherever the stream is
    index: dict[int, int] = field(default_factory=dict)
    events: dict[int, list[tuple]] = field(default_factory=dict)
    logs: dict[int, list[str]] = field(default_factory=dict)
    mapped: dict[int, list[str]] = field(default_factory=dict)
    #: a wrapper: the outer stream ended; whether the language model took its first name after that
    outer_done: bool = False
    lm_started_after_outer: bool | None = None
    lm_done: bool = False
    #: a wrapper: the projector loaded while the language model's stream was still running
    other_before_lm_done: bool = False

    def add(self, book: dict[int, list], item: object, tensor: object = None) -> None:
        i = None if tensor is None or self.pinned else self.index.get(id(tensor))
        if i is None and self.current is not None and (self.pinned or not self.exhausted):
            i = self.current
        if i is not None:
            book.setdefault(i, []).append(item)


class _LogTap(logging.Handler):
    def __init__(self, tape: _Tape) -> None:
        super().__init__(logging.WARNING)
        self.tape = tape

    def emit(self, record: logging.LogRecord) -> None:
        self.tape.add(self.tape.logs, record.getMessage())


def _clear_once_caches() -> None:
    """vLLM logs some warnings once per process; each tensor is to see the warnings it causes."""
    vl = importlib.import_module("vllm.logger")
    for fn in ("_print_debug_once", "_print_info_once", "_print_warning_once", "_print_error_once"):
        f = getattr(vl, fn, None)
        if f is not None and hasattr(f, "cache_clear"):
            f.cache_clear()


def instrument(b: _Build, tape: _Tape) -> None:
    """Recorders around every weight loader (record, then call the real one) and around the name mapper;
    under a wrapper also around the language model's ``load_weights`` (which tensor it holds)."""
    names = {id(p): n for n, p in b.model.named_parameters()}
    lm_prefix = next((f"{n}." for n, m in b.model.named_modules() if m is b.lm and n), "")

    def note(item: tuple, tensor: object) -> None:
        if lm_prefix and not tape.lm_done and not (item[1] or "").startswith(lm_prefix):
            tape.other_before_lm_done = True
        tape.add(tape.events, item, tensor)

    for p in b.model.parameters():
        real = getattr(p, "weight_loader", None)
        if real is None:
            continue

        def weight_loader(*args, _real=real, **kwargs):
            param = args[0] if args else kwargs.get("param")
            loaded = args[1] if len(args) > 1 else kwargs.get("loaded_weight")
            extra = list(args[2:])
            note(("loader", names.get(id(param)), extra, dict(kwargs)), loaded)
            out = _real(*args, **kwargs)
            if out is False:  # an expert loader that did not take the tensor (not on this rank)
                tape.add(tape.events, ("rejected", names.get(id(param)), extra, dict(kwargs)), loaded)
            return out

        try:
            p.weight_loader = weight_loader
        except AttributeError:  # a read-only property over _weight_loader
            p._weight_loader = weight_loader
    for modname, mod in list(sys.modules.items()):
        if mod is None or not modname.startswith("vllm.model_executor"):
            continue
        real = getattr(mod, "default_weight_loader", None)
        if real is None or not callable(real) or getattr(real, "__nhcheck_real__", None):
            continue

        def default_weight_loader(param, loaded_weight, _real=real):
            note(("default", names.get(id(param)), [], {}), loaded_weight)
            return _real(param, loaded_weight)

        default_weight_loader.__nhcheck_real__ = real  # type: ignore[attr-defined]
        mod.default_weight_loader = default_weight_loader  # type: ignore[attr-defined]
    utils = importlib.import_module("vllm.model_executor.models.utils")
    real_apply = utils.WeightsMapper.apply
    if not getattr(real_apply, "__nhcheck_real__", None):

        def apply(self, weights):
            for out_name, data in real_apply(self, weights):
                tape.add(tape.mapped, out_name)
                yield out_name, data

        apply.__nhcheck_real__ = real_apply  # type: ignore[attr-defined]
        utils.WeightsMapper.apply = apply
    for tower in b.towers:
        tower.tape = tape
    if b.lm is not b.model:
        real_lm = b.lm.load_weights

        def lm_load_weights(weights, *a, **k):
            def taken(it):
                for name, w in it:
                    if tape.lm_started_after_outer is None:
                        tape.lm_started_after_outer = tape.outer_done
                    i = tape.index.get(id(w))
                    if i is not None and not tape.pinned:
                        tape.current, tape.exhausted = i, False
                    yield name, w
                tape.lm_done = True
                if not tape.pinned:
                    tape.exhausted = True

            return real_lm(taken(weights), *a, **k)

        b.lm.load_weights = lm_load_weights
    vllm_logger = logging.getLogger("vllm")
    for h in vllm_logger.handlers:
        h.setLevel(logging.ERROR)  # the console stays quiet; the tap sees every warning
    vllm_logger.setLevel(logging.WARNING)
    vllm_logger.addHandler(_LogTap(tape))


def replay(b: _Build, dl: Any, tensors: list[tuple[str, Any]], tape: _Tape) -> dict:
    """The real ``DefaultModelLoader.load_weights`` over the stream, resumed after each raise.

    The first error is the crash point (``tensor`` None: raised after the last tensor, the strict
    check). The raising tensor is recorded with its error, and the stream goes on from the next
    tensor through the model's ``load_weights``, so every tensor gets the outcome it has on its own.
    """
    import torch
    from vllm.config import set_current_vllm_config

    names = [n for n, _ in tensors]
    tape.index = {id(t): i for i, (_, t) in enumerate(tensors)}
    raised: dict[int, str] = {}
    crash: dict | None = None

    def feed(start: int):
        tape.exhausted = tape.outer_done = tape.lm_done = False
        for i in range(start, len(tensors)):
            tape.current = i
            _clear_once_caches()
            yield tensors[i]
        tape.exhausted = tape.outer_done = True

    start, whole = 0, True
    dl.get_all_weights = lambda model_config, model: feed(0)
    while start < len(tensors) or whole:
        tape.current = None
        try:
            with set_current_vllm_config(b.vc), torch.no_grad():
                if whole:
                    dl.load_weights(b.model, b.vc.model_config)
                else:
                    b.model.load_weights(feed(start))
        except Exception as exc:
            culprit = None if tape.exhausted else tape.current
            if crash is None:
                crash = {"tensor": names[culprit] if culprit is not None else None, "error": error_text(exc)}
            if culprit is None:
                break
            raised[culprit] = error_text(exc)
            start, whole = culprit + 1, False
            continue
        break
    # What no load was tied to (a wrapper's copies of the projector's and towers' tensors, loaded after
    # the stream; a tensor the loaders drop): the tensor fed alone, as vLLM's goldens record every tensor.
    tape.pinned = True
    for i, (name, t) in enumerate(tensors):
        if i in raised or tape.events.get(i):
            continue
        for book in (tape.events, tape.logs, tape.mapped):
            book.pop(i, None)
        tape.current = i
        _clear_once_caches()
        try:
            with set_current_vllm_config(b.vc), torch.no_grad():
                b.model.load_weights([(name, t)])
        except Exception as exc:
            raised[i] = error_text(exc)
    tape.pinned = False
    buffers, defers = _wrapper_order(b, tensors, tape, raised)
    with_load = {m for i, evs in tape.events.items() if evs for m in tape.logs.get(i, ())}
    header = {v: k for k, v in TORCH_DTYPE.items()}
    out = {}
    for i, (name, t) in enumerate(tensors):
        o = out[name] = _outcome(
            tape.events.get(i, []), tape.logs.get(i, []), tape.mapped.get(i, []), raised.get(i), with_load
        )
        if o.get("loaded"):  # the loader's refusal depends on the tensor's dtype and shape: say which
            o.update(dtype=header.get(str(t.dtype).removeprefix("torch."), "U8"), shape=list(t.shape))
    return {"tensors": out, "crash": crash, "buffers": buffers, "defers": defers}


def _wrapper_order(b: _Build, tensors: list[tuple[str, Any]], tape: _Tape, raised: dict[int, str]) -> tuple[bool, bool]:
    """(buffers, defers) of a wrapper, seen on two tensors that load, one of the language model's and one of
    the projector's, streamed through its ``load_weights`` in the stream's order: whether it takes every name
    before its language model loads one (0.20.0 – 0.21.x), or streams the language model while the projector
    waits for the stream's end (0.22.0 on). The crash order of a wrapped checkpoint follows from it."""
    import torch
    from vllm.config import set_current_vllm_config

    if b.lm is b.model:
        return False, False
    prefix = next(f"{n}." for n, m in b.model.named_modules() if m is b.lm and n)

    def first(lm: bool) -> int | None:
        for i, evs in sorted(tape.events.items()):
            params = [e[1] or "" for e in evs if e[0] in ("loader", "default")]
            if i not in raised and params and all(p.startswith(prefix) == lm for p in params):
                return i
        return None

    pair = [first(True), first(False)]
    if None in pair:
        return False, False
    saved = tape.events, tape.logs, tape.mapped
    tape.events, tape.logs, tape.mapped = {}, {}, {}
    tape.lm_started_after_outer, tape.lm_done, tape.other_before_lm_done = None, False, False

    def feed():
        tape.exhausted = tape.outer_done = False
        for i in sorted(i for i in pair if i is not None):
            tape.current = i
            yield tensors[i]
        tape.exhausted = tape.outer_done = True

    try:
        with set_current_vllm_config(b.vc), torch.no_grad():
            b.model.load_weights(feed())
    finally:
        tape.events, tape.logs, tape.mapped = saved
    return bool(tape.lm_started_after_outer), tape.lm_started_after_outer is False and not tape.other_before_lm_done


def _outcome(events: list, logs: list, mapped: list, error: str | None, not_about_drops: set[str]) -> dict:
    """One tensor's outcome in nhcheck's vocabulary, from what its loaders and the logs recorded."""
    o: dict[str, Any] = {
        "outcome": "skip",
        "param": None,
        "shard_id": None,
        "expert_id": None,
        "engine_name": mapped[-1] if mapped else None,
        "message": None,
    }
    loads = [e for e in events if e[0] in ("loader", "default")]
    if not loads and error is None and any(e[0] == "routed" for e in events):
        return dict(o, outcome="routed", engine_name=None)
    if loads:
        kind, param, extra, kwargs = loads[0]
        o["param"] = param
        if "expert_id" in kwargs:
            o.update(shard_id=kwargs.get("shard_id"), expert_id=kwargs.get("expert_id"))
        elif kind == "loader":
            sid = extra[0] if extra else kwargs.get("loaded_shard_id", kwargs.get("shard_id"))
            o["shard_id"] = sid if isinstance(sid, str | int) else None
        if error is None and any(e[0] == "rejected" for e in events):
            return dict(o, param=None, shard_id=None, expert_id=None)
    if error is not None:
        return dict(o, outcome="raise", message=error, loaded=bool(loads))
    if loads:
        return dict(o, outcome="load")
    drops = [m for m in logs if m not in not_about_drops]
    if drops:
        return dict(o, outcome="warn", message=drops[0])
    return o


# ---------------------------------------------------------------------------- the process


def _one(job: dict) -> dict:
    out: dict[str, Any] = {"vllm": _release(), "startup": None}
    with tempfile.TemporaryDirectory(prefix="nhcheck-live-vllm-") as work:
        try:
            b = build(job["root"], work)
        except StartupRefused as exc:
            out["startup"] = {"stage": exc.stage, "error": str(exc)}
            return out
        tape = _Tape()
        dl, tensors = engine_stream(b)
        out["manifest"] = manifest(b)
        instrument(b, tape)
        out.update(replay(b, dl, tensors, tape))
    out["shims"] = b.shims
    out["notes"] = list(dict.fromkeys(NOTES))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0]) as fh:
        request = json.load(fh)
    os.environ.setdefault("VLLM_DISABLE_SHARED_EXPERTS_STREAM", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import warnings

    warnings.filterwarnings("ignore")
    if not _old_cuda_import():
        state_platform([])
        preimport()
    run_jobs(request["jobs"], _one)
    return 0


if __name__ == "__main__":
    sys.exit(main())
