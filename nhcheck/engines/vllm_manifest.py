"""The runtime parameters vLLM builds for a Nemotron-H config (``named_parameters()`` at load time).

Differs from SGLang's (``nhcheck.manifest``): attention layers get ``q_scale`` / ``prob_scale`` besides
``k_scale`` / ``v_scale`` under any ModelOpt config; ``head_dim`` comes from transformers'
``NemotronHConfig`` (default 128; the older ``attention_head_dim`` key is ignored); the experts live
under ``experts.routed_experts.`` from 0.24.0; ModelOpt exclusion also matches by substring and
``fnmatch`` (``ModelOptQuantConfigBase.is_layer_excluded``). Checked against every vLLM golden's
manifest names (``tests/test_conformance_vllm.py``).

This module must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace
from fnmatch import fnmatch

import msgspec

from nhcheck.engines.base import PPWindow
from nhcheck.engines.vllm import VLLMProfile, map_name
from nhcheck.engines.vllm_mtp import draft_quant_name, mtp_profile
from nhcheck.errors import UsageError
from nhcheck.manifest import Manifest, Param
from nhcheck.model import NemotronHConfig
from nhcheck.quant import QuantConfig, first_under, nested_recipe

_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
UNQUANT = "UnquantizedLinearMethod"
EMBED = "UnquantizedEmbeddingMethod"
NVFP4_MOE = "ModelOptNvFp4FusedMoE"
#: What ``ModelOptNvFp4FusedMoE.__init__`` raises for a non-gated MoE without FlashInfer's CUTLASS backend
#: (``VLLMProfile.nvfp4_moe_needs_flashinfer``).
NVFP4_MOE_REFUSAL = (
    "NotImplementedError: Non-gated activations are only supported by FlashInfer CUTLASS NvFP4 MoE backend."
)
#: ``FusedMoE.__init__`` before 0.12.0 (0.11.1 ``layers/fused_moe/layer.py:571``): a non-gated MoE (Nemotron-H's
#: relu²) takes only unquantized or ModelOpt FP8 experts.
NON_GATED_MOE_REFUSAL = (
    "NotImplementedError: is_act_and_mul=False is supported only for unquantized and ModelOpt FP8 moe for now"
)
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
#: ModelOpt algorithms → (linear kind, MoE method) as vLLM's ModelOpt configs build them.
_ALGOS = {"NVFP4": ("nvfp4", "ModelOptNvFp4FusedMoE"), "FP8": ("fp8", "ModelOptFp8MoEMethod")}


class _Quant:
    """The ModelOpt config after ``apply_vllm_mapper``: which algorithm each module prefix gets (or None).

    ``draft``: the MTP draft's view of the module names (``vllm_mtp.draft_quant_name``) and a key naming it;
    None: the main model's ``hf_to_vllm_mapper``.
    """

    def __init__(
        self,
        qc: QuantConfig,
        profile: VLLMProfile,
        lm_prefix: str,
        draft: tuple[Hashable, Callable[[str], str]] | None = None,
    ) -> None:
        self.algo = qc.quant_algo
        self.profile = profile
        self.lm_prefix = lm_prefix
        # The mapping below reads no profile flag (quantized=False, own_loop off), so it is one per recipe and
        # prefix, however many releases build a manifest from it (``QuantConfig.derived``).
        key = ("vllm-quant", lm_prefix) if draft is None else ("vllm-quant-mtp", draft[0])
        cached = qc.derived.get(key)
        if cached is None:
            mapper = msgspec.structs.replace(profile, own_loop=False)
            rename = draft[1] if draft is not None else (lambda n: self._map(n, mapper))
            rules: list[str] = []
            for e in qc.exclude:
                # ``module_path*`` becomes ``module_path`` and ``module_path.*`` (vllm-project/vllm#28072).
                rules += [e[:-1], e[:-1] + ".*"] if len(e) >= 2 and e[-1] == "*" and e[-2] != "." else [e]
            exclude = [m for m in map(rename, rules) if m is not None]
            layers: dict[str, str] = {}
            for k, v in qc.quantized_layers.items():
                m = rename(k)
                if m is not None:
                    layers[m] = v
            cached = qc.derived[key] = (exclude, layers, first_under(layers))
        self.exclude: list[str] = cached[0]
        self.layers: dict[str, str] = cached[1]
        self.under: dict[str, str] = cached[2]

    def _map(self, name: str, mapper: VLLMProfile) -> str | None:
        mapped, _ = map_name(name, mapper, quantized=False)
        if self.lm_prefix and name.startswith(self.lm_prefix):
            inner, _ = map_name(name[len(self.lm_prefix) :], mapper, quantized=False)
            return None if inner is None else self.lm_prefix + inner
        return mapped

    def excluded(self, prefix: str) -> bool:
        if not self.exclude:
            return False
        last = prefix.rsplit(".", 1)[-1]
        shards = _PACKED.get(last)
        if shards:
            base = prefix[: -len(last)]
            if all(any(_component_match(e, base + s) for e in self.exclude) for s in shards):
                return True
        if any(_component_match(e, prefix) for e in self.exclude):
            return True
        bare = prefix.removeprefix("language_model.") if prefix.startswith("language_model.") else None
        for e in self.exclude:
            if e != prefix and (e in prefix or (bare is not None and e in bare)):
                return True
        return any(fnmatch(prefix, e) for e in self.exclude)

    def resolve(self, prefix: str) -> str | None:
        """``_resolve_quant_algo`` (MIXED_PRECISION): exact key, fused shards, then any key under the prefix."""
        cands = [prefix]
        if prefix.endswith(".lm_head"):
            cands.append("lm_head")
        for c in cands:
            if c in self.layers:
                return self.layers[c].upper()
        last = prefix.rsplit(".", 1)[-1]
        if last in _PACKED:
            base = prefix[: -len(last)]
            algos = {self.layers[base + s].upper() for s in _PACKED[last] if base + s in self.layers}
            if len(algos) == 1:
                return algos.pop()
        for c in cands:  # the first key under the prefix, in map order (``first_under``)
            if c in self.under:
                return self.under[c].upper()
        if prefix.endswith(".experts"):
            parent = prefix.rsplit(".experts", 1)[0]
            if parent in self.under:
                return self.under[parent].upper()
        return None

    def algo_of(self, prefix: str) -> str | None:
        """The algorithm of one linear / MoE prefix, None when it stays unquantized."""
        if self.excluded(prefix):
            return None
        if self.algo == "MIXED_PRECISION":
            algo = self.resolve(prefix)
            return algo if algo in _ALGOS else None
        return self.algo if self.algo in _ALGOS else None


def _component_match(entry: str, prefix: str) -> bool:
    """``is_layer_skipped``: the entry is a run of whole dotted components of the prefix."""
    return prefix == entry or prefix.startswith(entry + ".") or ("." + entry + ".") in ("." + prefix + ".")


def nvfp4_moe_environment(release: str) -> str:
    """The assumption behind ``NVFP4_MOE_REFUSAL``: vLLM's default environment."""
    return (
        f"vllm {release} builds ModelOpt NVFP4 experts for Nemotron-H's non-gated MoE only with "
        "VLLM_USE_FLASHINFER_MOE_FP4=1 and FlashInfer's CUTLASS MoE on a Blackwell GPU; nhcheck answers for the "
        "default environment (the variable unset)"
    )


def sizes_from_hidden_note(cfg: NemotronHConfig, profile: VLLMProfile, release: str) -> tuple[str, ...]:
    """Where 0.9.1 – 0.10.0 size a layer other than the config fields later releases read say (``sizes_from_hidden``):
    the checkpoint's tensors then meet slots of another width (``load_error`` / ``slot_note`` per tensor)."""
    if not profile.sizes_from_hidden:
        return ()
    H, out = cfg.hidden_size, []
    if "*" in cfg.pattern and cfg.num_attention_heads and H // cfg.num_attention_heads != cfg.head_dim:
        out.append(
            f"attention head_dim = hidden_size // num_attention_heads = {H // cfg.num_attention_heads} "
            f"(from 0.10.1 config.head_dim: {cfg.head_dim})"
        )
    if "M" in cfg.pattern and cfg.mamba_expand * H != cfg.mamba_inner:
        out.append(
            f"Mamba width = expand * hidden_size = {cfg.mamba_expand * H} "
            f"(from 0.10.1 mamba_num_heads * mamba_head_dim: {cfg.mamba_inner})"
        )
    if not out:
        return ()
    return (
        f"vllm {release} sizes its layers from hidden_size: {'; '.join(out)}: the checkpoint's tensors meet slots of "
        "another width",
    )


def hf_quant_config_unread(release: str) -> str:
    """Why a checkpoint quantized in hf_quant_config.json alone is answered as unquantized (0.9.1 – 0.10.0)."""
    return (
        f"vllm {release} reads the quantization from config.json's quantization_config only: hf_quant_config.json "
        "is not read unless --quantization modelopt is passed, so the model is built unquantized (nhcheck answers "
        "for the default; the config normaliser reads the file from 0.10.1)"
    )


#: The ModelOpt config class 0.9.1 / 0.9.2 build for config.json's ``quant_method`` — by that name alone
#: (``get_quantization_config``; ModelOpt's ``override_quantization_method`` comes with 0.10.0) — as the algorithm
#: its ``from_config`` serializes (0.9.2 ``layers/quantization/modelopt.py:77``, :220), and the ``QUANT_ALGOS`` both
#: accept (:35).
_NESTED_CLASS_ALGO = {"modelopt": "FP8", "modelopt_fp4": "NVFP4"}
_NESTED_ALGOS = ("FP8", "NVFP4")


def _reads_nested_only(cfg: NemotronHConfig, qc: QuantConfig, profile: VLLMProfile) -> bool:
    """Whether the release reads config.json's ModelOpt ``quantization_config`` through its nested ``quantization``
    section only (``modelopt_flat_form`` off; the nested hf_quant_config.json and a VL wrapper's config are read as
    such by every release)."""
    return not profile.modelopt_flat_form and qc.source == "config.json" and cfg.wrapper is None


def nested_only_recipe(qc: QuantConfig) -> QuantConfig | str:
    """config.json's ModelOpt ``quantization_config`` as 0.9.1 / 0.9.2 read it (``modelopt_flat_form`` off): the
    recipe the model is built with, or what ``from_config`` (0.9.2 ``layers/quantization/modelopt.py:69``, :212)
    or the first NVFP4 linear (:308) raises at start-up.

    ``from_config`` takes the nested ``quantization`` section (``get_from_keys(config, ["quantization"])``): the
    flat form is refused. ``ModelOptFp8Config`` reads nothing but ``quant_algo`` (no exclude list: every linear is
    FP8); ``ModelOptNvFp4Config`` needs ``exclude_modules``, ``kv_cache_quant_algo`` and ``group_size`` and
    excludes by ``exclude_modules``. Both give attention the FP8 KV-cache method whatever ``kv_cache_quant_algo``
    says. Rank maps ``tests/golden/tp/vllm-0.9.2/*-nested-vllm-tp*`` (the config.json they record)."""
    raw = qc.flat or {}
    section = raw.get("quantization")
    if not isinstance(section, dict):
        return "ValueError: Cannot find any of ['quantization'] in the model's quantization config."
    method = str(raw.get("quant_method", "")).lower()
    built = _NESTED_CLASS_ALGO.get(method)
    if built is None:
        raise UsageError(
            f"vllm 0.9.1 / 0.9.2: quantization_config.quant_method {method!r} with a nested 'quantization' section is "
            "not modelled (nhcheck answers for 'modelopt' and 'modelopt_fp4')"
        )
    if "quant_algo" not in section:
        return "KeyError: 'quant_algo'"
    algo = section["quant_algo"]
    if algo not in _NESTED_ALGOS:
        return (
            f"ValueError: ModelOpt currently only supports: {list(_NESTED_ALGOS)} quantizations in vLLM. Please check "
            "the `hf_quant_config.json` file for your model's quant configuration."
        )
    exclude: object = []
    if built == "NVFP4":
        if "exclude_modules" not in section:
            return (
                "ValueError: NVFP4 quantization requires group size and kv_cache_quant_algo specified in "
                "hf_quant_config.json"
            )
        for key in ("kv_cache_quant_algo", "group_size"):
            if key not in section:
                return f"KeyError: {key!r}"
        if algo != "NVFP4":
            return "ValueError: NVFP4 quantization was selected,  dynamic quantization is not supported."
        exclude = section["exclude_modules"]
    elif algo != "FP8":
        raise UsageError(
            f"vllm 0.9.1 / 0.9.2: quant_method 'modelopt' builds ModelOptFp8Config, which takes quant_algo {algo!r} as "
            "an unserialized FP8 checkpoint (bf16 linears without scales): not modelled; 'modelopt_fp4' names the "
            "NVFP4 config"
        )
    return replace(
        qc,
        quant_algo=built,
        kv_cache_quant_algo=section["kv_cache_quant_algo"] if built == "NVFP4" else None,
        kv_cache_scheme=None,
        exclude=tuple(e for e in exclude if isinstance(e, str)) if isinstance(exclude, list) else (),
        quantized_layers={},
        group_size=section["group_size"] if built == "NVFP4" else None,
        derived={},
    )


def strict_config_refusal(cfg: NemotronHConfig) -> str | None:
    """What transformers 5's ``NemotronHConfig`` (a strict dataclass) refuses in config.json before vLLM sees it: a
    list ``intermediate_size`` (goldens ``dense_probes/probe_h8b_dense_mlp_list``). The checkpoint's own
    configuration code under transformers 4.x takes it (goldens 0.16.0, 0.19.0, ``expected-transformers4-*``)."""
    if cfg.intermediate_is_list:
        return (
            "StrictDataclassFieldValidationError: Validation error for field 'intermediate_size':\n    TypeError: "
            f"Field 'intermediate_size' expected int, got list (value: {list(cfg.intermediate_size)})"
        )
    return None


def _config_section(qc: QuantConfig) -> dict | None:
    """config.json's ``quantization_config`` in ModelOpt's nested form: its ``quantization`` section, else None."""
    section = (qc.flat or {}).get("quantization") if qc.source == "config.json" else None
    return section if isinstance(section, dict) else None


def read_recipe(cfg: NemotronHConfig, qc: QuantConfig, profile: VLLMProfile) -> QuantConfig | str:
    """The ModelOpt recipe release ``profile`` builds the model with (``qc`` as nhcheck parsed it), or the error its
    start-up raises reading it.

    0.9.1 / 0.9.2 read config.json's ``quantization_config`` through its nested section only
    (``nested_only_recipe``). From 0.10.0 ModelOpt's ``from_config`` takes either form: a ``quantization`` section
    is read first, and alone (``exclude_modules``, ``quant_algo``, ``kv_cache_quant_algo``, ``group_size`` from it;
    0.10.0 ``layers/quantization/modelopt.py:112``, :547; 0.16.0 :255), and the class is picked from its
    ``quant_algo`` (``override_quantization_method``, 0.10.0 :95, :528; from 0.10.1 also the config normaliser's
    ``producer`` rule, 0.16.0 ``transformers_utils/model_arch_config_convertor.py:194``): the recipe is the one
    hf_quant_config.json's same object gives (goldens ``dense_probes/probe_nested_{fp8,nvfp4}``,
    ``probe_nested_fp4method_nvfp4``)."""
    if qc.quant_method != "modelopt":
        return qc
    if _reads_nested_only(cfg, qc, profile):
        return nested_only_recipe(qc)
    section = _config_section(qc) if cfg.wrapper is None else None
    if section is not None:
        return nested_recipe(section, "config.json", flat=qc.flat, hf_file=qc.hf_file)
    return qc


def startup_refusal(cfg: NemotronHConfig, qc: QuantConfig | None, profile: VLLMProfile) -> str | None:
    """The error vLLM's start-up raises before the model exists (engine-config resolution)."""
    registered = (None, "NemotronH_Nano_VL_V2") if profile.vl_v2_registered else (None,)
    if cfg.wrapper not in registered and not profile.omni_registered:
        return f"ValueError: Model architectures [{cfg.wrapper!r}] are not supported for now."
    strict = strict_config_refusal(cfg) if profile.transformers_config else None
    if strict is not None:
        return strict
    if qc is None or qc.quant_method != "modelopt":
        return None
    read = read_recipe(cfg, qc, profile)
    if isinstance(read, str) or _reads_nested_only(cfg, qc, profile):
        return read if isinstance(read, str) else None
    # The config normaliser (0.10.1 on) refuses a nested recipe's unknown algorithm when ModelOpt produced it
    # (``producer.name``, 0.16.0 ``transformers_utils/model_arch_config_convertor.py:194``): hf_quant_config.json's,
    # a VL wrapper's, config.json's nested form.
    produced = str(((qc.flat or {}).get("producer") or {}).get("name", "")) == "modelopt"
    in_config = _config_section(qc) is not None and produced and profile.reads_hf_quant_config
    nested = qc.source == "hf_quant_config.json" or cfg.wrapper is not None or in_config
    qc = read
    if qc.is_mixed and nested and not profile.nested_mixed_accepted:
        return "ValueError: Unknown ModelOpt quant algo: MIXED_PRECISION"
    if qc.is_mixed and not nested and not profile.flat_mixed_accepted:
        return (
            f"ValueError: ModelOpt currently only supports: {list(profile.modelopt_algos)} quantizations in vLLM. "
            "Please check the `hf_quant_config.json` file for your model's quant configuration."
        )
    if qc.quant_algo not in _ALGOS and not qc.is_mixed:
        return f"ValueError: Unknown ModelOpt quant algo: {qc.quant_algo}"
    return None


def build_refusal(cfg: NemotronHConfig, profile: VLLMProfile) -> str | None:
    """The error the model build raises before 0.11.1, at the first layer that cannot be built: an ``E`` layer has
    no class (``KeyError``); 0.9.1 – 0.10.0 hand an MLP's ``ColumnParallelLinear`` the whole ``intermediate_size``, so
    a list fails its ``divide()`` before the layer's norm is built; any layer reads ``config.rms_norm_eps``."""
    for kind in cfg.pattern:
        if kind == "E" and not profile.moe_layers:
            return "KeyError: 'E'"
        if kind == "-" and profile.sizes_from_hidden and cfg.intermediate_is_list:
            return "TypeError: unsupported operand type(s) for %: 'list' and 'int'"
        if not profile.reads_layer_norm_epsilon and not cfg.has_rms_norm_eps:
            return "AttributeError: 'NemotronHConfig' object has no attribute 'rms_norm_eps'"
    return None


class _Builder:
    """``qname``: a parameter's module → the prefix its layer was built with (the MTP draft builds
    ``model.layers.j`` under ``mtp.layers.j``); default: the parameter name under the wrapper's prefix."""

    def __init__(
        self,
        cfg: NemotronHConfig,
        profile: VLLMProfile,
        quant: _Quant | None,
        prefix: str,
        qname: Callable[[str], str] | None = None,
    ) -> None:
        self.cfg, self.profile, self.q, self.np = cfg, profile, quant, prefix
        self.qname = qname or (lambda name: prefix + name)
        self.dtype = _DTYPES.get(cfg.dtype, "bfloat16")
        self.out: list[Param] = []

    def mamba_inner(self) -> int:
        """The Mamba width: ``mamba_num_heads * mamba_head_dim``; 0.9.1 – 0.10.0 ``expand * hidden_size``."""
        c = self.cfg
        return c.mamba_expand * c.hidden_size if self.profile.sizes_from_hidden else c.mamba_inner

    def mamba_parts(self, sizes: tuple[int, ...]) -> tuple[tuple[str, int, int], ...]:
        """The row blocks ``mamba_v2_sharded_weight_loader`` copies one by one, where the replay models that loader
        (0.9.1 – 0.10.0, ``sizes_from_hidden``; golden ``dense_probes/probe_h8b_dense_geometry_narrow``)."""
        if not self.profile.sizes_from_hidden:
            return ()
        return tuple((str(i), sum(sizes[:i]), n) for i, n in enumerate(sizes))

    def add(self, name: str, shape: tuple[int, ...], dtype: str | None = None, method: str | None = None, **kw) -> None:
        self.out.append(Param(self.np + name, tuple(shape), dtype or self.dtype, quant_method=method, **kw))

    def linear(
        self,
        name: str,
        outs: tuple[int, ...],
        inp: int,
        *,
        bias: bool = False,
        stacked: tuple[str, ...] = (),
        mamba_parts: tuple[tuple[str, int, int], ...] = (),
    ):
        quantizable = name != "lm_head" or self.profile.modelopt_lm_head
        algo = self.q.algo_of(self.qname(name)) if self.q and quantizable else None
        rows, parts = sum(outs), len(outs)
        slots: tuple[tuple[str, int, int], ...] = ()
        idx: tuple[tuple[str, int, int], ...] = ()
        if stacked:
            offs = [sum(outs[:i]) for i in range(parts)]
            slots = tuple(zip(stacked, offs, outs, strict=True))
            idx = tuple((s, i, 1) for i, s in enumerate(stacked))
        loader = "stacked" if stacked else "default"
        # One scale per stacked checkpoint tensor (q/k/v) in every release, FP8 and NVFP4 (goldens
        # dense_probes/probe_nested_nvfp4, 0.16.0: three); a module fused in the checkpoint (Mamba in_proj) holds one
        # per part only where the row says so (golden dense_probes/probe_h8b_dense_hfq_fp8, 0.16.0: one).
        nscale = parts if self.profile.fused_scale_per_shard or stacked else 1
        if algo is None:
            method = UNQUANT
            if name == "lm_head":
                method = self.profile.quantized_lm_head_method if self.q else EMBED
            self.add(f"{name}.weight", (rows, inp), method=method, loader=loader, slots=slots or mamba_parts)
        elif algo == "NVFP4":
            m = self.profile.linear_method_name
            self.add(f"{name}.weight", (rows, inp // 2), "uint8", m, loader=loader, slots=slots)
            self.add(f"{name}.weight_scale_2", (nscale,), "float32", m, loader=loader, slots=idx)
            self.add(f"{name}.weight_scale", (rows, inp // 16), "float8_e4m3fn", m, loader=loader, slots=slots)
            self.add(f"{name}.input_scale", (nscale,), "float32", m, loader=loader, slots=idx)
        else:
            m = (
                "ModelOptLinearMethod"
                if self.profile.linear_method_name == "ModelOptLinearMethod"
                else "ModelOptFp8LinearMethod"
            )
            self.add(f"{name}.weight", (rows, inp), "float8_e4m3fn", m, loader=loader, slots=slots)
            self.add(f"{name}.weight_scale", (nscale,), "float32", m, loader=loader, slots=idx)
            self.add(f"{name}.input_scale", (nscale,), "float32", m, loader=loader, slots=idx)
        if bias:
            self.add(f"{name}.bias", (rows,), method=UNQUANT if algo is None else None, loader=loader, slots=slots)

    def experts(self, layer: int) -> None:
        c = self.cfg
        module = f"model.layers.{layer}.mixer.experts"
        pre = module + (".routed_experts" if self.profile.routed_experts else "")
        algo = self.q.algo_of(self.qname(module)) if self.q else None
        E, mi = c.n_routed_experts, c.moe_intermediate_size
        X = c.expert_input if self.profile.latent_moe else c.hidden_size
        w13 = {"loader": "expert", "num_experts": E, "shard_ids": ("w1",)}
        w2 = {"loader": "expert", "num_experts": E, "shard_ids": ("w2",)}
        if algo is None:
            m = "UnquantizedFusedMoEMethod"
            self.add(f"{pre}.w13_weight", (E, mi, X), None, m, **w13)
            self.add(f"{pre}.w2_weight", (E, X, mi), None, m, **w2)
        elif algo == "NVFP4":
            m = NVFP4_MOE
            self.add(f"{pre}.w13_weight", (E, mi, X // 2), "uint8", m, **w13)
            self.add(f"{pre}.w2_weight", (E, X, mi // 2), "uint8", m, **w2)
            self.add(f"{pre}.w13_weight_scale", (E, mi, X // 16), "float8_e4m3fn", m, **w13)
            self.add(f"{pre}.w2_weight_scale", (E, X, mi // 16), "float8_e4m3fn", m, **w2)
            self.add(f"{pre}.w13_weight_scale_2", (E, 1), "float32", m, **w13)
            self.add(f"{pre}.w2_weight_scale_2", (E,), "float32", m, **w2)
            self.add(f"{pre}.w13_input_scale", (E, 1), "float32", m, **w13)
            self.add(f"{pre}.w2_input_scale", (E,), "float32", m, **w2)
        else:
            m = "ModelOptFp8MoEMethod"
            self.add(f"{pre}.w13_weight", (E, mi, X), "float8_e4m3fn", m, **w13)
            self.add(f"{pre}.w2_weight", (E, X, mi), "float8_e4m3fn", m, **w2)
            self.add(f"{pre}.w13_weight_scale", (E, 1), "float32", m, **w13)
            self.add(f"{pre}.w2_weight_scale", (E,), "float32", m, **w2)
            self.add(f"{pre}.w13_input_scale", (E,), "float32", m, **w13)
            self.add(f"{pre}.w2_input_scale", (E,), "float32", m, **w2)

    def layer(self, i: int, kind: str) -> None:
        c, P, H = self.cfg, f"model.layers.{i}.mixer", self.cfg.hidden_size
        if kind == "M":
            nh = c.mamba_num_heads
            inner, gs = self.mamba_inner(), c.n_groups * c.ssm_state_size
            in_parts = (inner, inner, gs, gs, nh)
            self.add(f"{P}.A", (nh,), "float32", loader="mamba_A")
            self.add(f"{P}.D", (nh,))
            self.add(f"{P}.dt_bias", (nh,))
            # ``mamba_v2_sharded_weight_loader`` copies conv1d / an unquantized in_proj part by part; where the
            # replay models it (``VLLMEngine.load_error``) the parts ride along as offsets.
            conv = self.mamba_parts((inner, gs, gs))
            self.add(f"{P}.conv1d.weight", (inner + 2 * gs, 1, c.conv_kernel), method=UNQUANT, slots=conv)
            if c.use_conv_bias:
                self.add(f"{P}.conv1d.bias", (inner + 2 * gs,), method=UNQUANT, slots=conv)
            parts = in_parts if self.profile.mamba_in_proj_merged else (sum(in_parts),)
            self.linear(f"{P}.in_proj", parts, H, bias=c.use_bias, mamba_parts=self.mamba_parts(in_parts))
            self.linear(f"{P}.out_proj", (H,), inner, bias=c.use_bias)
            self.add(f"{P}.norm.weight", (inner,))
        elif kind == "*":
            # transformers' NemotronHConfig: head_dim defaults to 128; ``attention_head_dim`` is not read
            # (0.9.1 – 0.10.0: hidden_size // num_attention_heads).
            hd = H // max(c.num_attention_heads, 1) if self.profile.sizes_from_hidden else c.head_dim
            q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
            self.linear(f"{P}.qkv_proj", (q, kv, kv), H, stacked=("q", "k", "v"))
            self.linear(f"{P}.o_proj", (H,), q)
            if self.q is not None and self.profile.attn_quant_scales:
                for s in ("q_scale", "k_scale", "v_scale", "prob_scale"):
                    self.add(f"{P}.attn.{s}", (), None, self.profile.kv_method_name, informational=True)
        elif kind == "-":
            inter = c.intermediate_size[0] if self.profile.sizes_from_hidden else c.mlp_intermediate(i)
            self.linear(f"{P}.up_proj", (inter,), H, bias=c.mlp_bias)
            self.linear(f"{P}.down_proj", (H,), inter, bias=c.mlp_bias)
        elif kind == "E":
            E = c.n_routed_experts
            self.add(f"{P}.gate.weight", (E, H), "float32" if self.profile.router_fp32 else None, UNQUANT)
            self.add(f"{P}.gate.e_score_correction_bias", (E,), "float32", UNQUANT)
            self.experts(i)
            if c.n_shared_experts:
                si = c.shared_intermediate
                self.linear(f"{P}.shared_experts.up_proj", (si,), H)
                self.linear(f"{P}.shared_experts.down_proj", (H,), si)
            if c.moe_latent_size is not None and self.profile.latent_moe:
                L = c.moe_latent_size
                self.linear(f"{P}.fc1_latent_proj", (L,), H, bias=c.mlp_bias)
                self.linear(f"{P}.fc2_latent_proj", (H,), L, bias=c.mlp_bias)
        self.add(f"model.layers.{i}.norm.weight", (H,))


def _quant_kind(quant: _Quant | None, qc: QuantConfig | None) -> str | None:
    """The manifest's quantization label (the config class's ``get_name()``): ``modelopt_mixed`` / ``modelopt`` (FP8,
    ``ModelOptFp8Config``; golden ``dense_probes/probe_h8b_dense_hfq_fp8``, 0.10.1.1) / ``modelopt_fp4``, None
    unquantized."""
    if quant is None:
        return None
    if qc is not None and qc.is_mixed:
        return "modelopt_mixed"
    return {"FP8": "modelopt"}.get(quant.algo or "", "modelopt_fp4")


def _manifest(
    params: tuple[Param, ...],
    engine: str,
    problems: tuple[str, ...],
    *,
    prefix: str = "",
    kind: str | None = None,
    mode: str = "main",
) -> Manifest:
    """A vLLM manifest, built or refused. vLLM's MoE backend (chosen from the GPU) changes no parameter name, so
    none is named, asked or assumed (SGLang's manifests carry the backend their parameters were built for)."""
    return Manifest(params, engine, prefix, kind, "", mode, "built", problems, moe_backend_requested="")


def build_manifest(
    cfg: NemotronHConfig,
    qc: QuantConfig | None,
    profile: VLLMProfile,
    *,
    release: str,
    mtp: bool = False,
    pp: PPWindow | None = None,
) -> Manifest:
    """The manifest vLLM ``release`` builds for ``cfg`` (main model, tensor parallel 1, one pipeline rank)."""
    engine = f"vllm@{release}"
    if pp is not None and not (pp.first_rank and pp.last_rank):
        raise UsageError(f"vllm {release}: pipeline-parallel ranks are not modelled; run without --pp")
    if mtp:
        return _mtp_manifest(cfg, qc, profile, release)
    unread: tuple[str, ...] = ()
    if qc is not None and qc.source == "hf_quant_config.json" and not profile.reads_hf_quant_config:
        unread = (hf_quant_config_unread(release),)
        qc = None
    refusal = startup_refusal(cfg, qc, profile) or build_refusal(cfg, profile)
    if refusal is not None:
        return _manifest((), engine, (refusal, *unread))
    if qc is not None:
        recipe = read_recipe(cfg, qc, profile)  # a refusal here was startup_refusal's, returned above
        qc = recipe if isinstance(recipe, QuantConfig) else qc
    wrapped = cfg.wrapper is not None
    prefix = "language_model." if wrapped else ""
    quant = _Quant(qc, profile, prefix) if qc is not None and qc.quant_method == "modelopt" else None
    kind = _quant_kind(quant, qc)
    b = _Builder(cfg, profile, quant, prefix)
    H, V = cfg.hidden_size, cfg.vocab_size
    b.add("model.embed_tokens.weight", (V, H), method=EMBED)
    for i, k in enumerate(cfg.pattern):
        b.layer(i, k)
    b.add("model.norm_f.weight", (H,))
    if not cfg.tie_word_embeddings:
        b.linear("lm_head", (V,), H)
    if wrapped and cfg.vit_hidden_size:
        vit = cfg.vit_hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
        b.out.append(Param("mlp1.0.weight", (vit,), b.dtype))
        b.out.append(Param("mlp1.1.weight", (cfg.projector_hidden_size, vit), b.dtype))
        b.out.append(Param("mlp1.3.weight", (H, cfg.projector_hidden_size), b.dtype))
        if cfg.has_mtp and profile.vision_final_norm:
            # Built to match HF checkpoints trained with MTP (0.32.0 ``nano_nemotron_vl.py:1005``).
            # Unfilled, it keeps nn.LayerNorm's initial values (weight 1, bias 0): the engine's default.
            for s in ("weight", "bias"):
                b.out.append(Param(f"vision_final_layernorm.{s}", (cfg.vit_hidden_size,), b.dtype, informational=True))
    problems = (tuple(qc.problems) if qc else ()) + unread + sizes_from_hidden_note(cfg, profile, release)
    if cfg.moe_latent_size is not None and not profile.latent_moe:
        problems += (
            f"vllm {release} does not read moe_latent_size (latent MoE from 0.13.0): its experts take hidden_size "
            "inputs and it has no fc1/fc2_latent_proj; nhcheck answers from that release's code, no golden checkpoint "
            "has a latent MoE",
        )
    if not profile.nvfp4_moe_non_gated and any(p.quant_method == NVFP4_MOE for p in b.out):
        return _manifest((), engine, (NON_GATED_MOE_REFUSAL, *problems))
    if profile.nvfp4_moe_needs_flashinfer and any(p.quant_method == NVFP4_MOE for p in b.out):
        return _manifest((), engine, (NVFP4_MOE_REFUSAL, nvfp4_moe_environment(release), *problems))
    return _manifest(tuple(b.out), engine, problems, prefix=prefix, kind=kind)


def _mtp_manifest(cfg: NemotronHConfig, qc: QuantConfig | None, profile: VLLMProfile, release: str) -> Manifest:
    """What ``NemotronHMTP.__init__`` builds (``models/nemotron_h_mtp.py``): ``model.layers.j`` for each character
    of the MTP pattern (the main model's attention / MoE decoder layers, the first with ``enorm`` / ``hnorm`` /
    ``eh_proj``, the last with ``final_layernorm``), built under the prefix ``mtp.layers.j``; the embedding and
    the head where the release builds them (``MTPProfile.own_embed_head``)."""
    engine = f"vllm@{release}"
    mp = mtp_profile(release)
    if cfg.wrapper is not None:
        raise UsageError(
            f"vllm {release}: the MTP draft of a {cfg.wrapper} checkpoint is not modelled (vLLM derives it from the "
            "wrapper's text config only for some Omni architectures and releases); run without --mtp"
        )
    if not cfg.has_mtp:
        raise UsageError(
            f"vllm {release} derives the MTP draft (NemotronHMTPModel) only from a config with "
            "num_nextn_predict_layers > 0; this config declares none: run without --mtp"
        )
    refusal = startup_refusal(cfg, qc, profile)
    if refusal is not None:
        return _manifest((), engine, (refusal,), mode="mtp")
    pattern = cfg.draft_pattern
    if cfg.num_nextn_predict_layers != 1 or any(ch not in "*E" for ch in pattern):
        # NemotronHMultiTokenPredictor asserts one MTP layer and builds only '*' / 'E' layers; no golden has another.
        raise UsageError(
            f"vllm {release}: an MTP draft of {cfg.num_nextn_predict_layers} layers or pattern {pattern!r} is not "
            "modelled (vLLM's NemotronHMultiTokenPredictor builds one MTP layer of '*' / 'E' layers)"
        )
    quant = None
    if qc is not None and qc.quant_method == "modelopt":
        quant = _Quant(qc, profile, "", draft=(mp, lambda n: draft_quant_name(n, mp)))
    kind = _quant_kind(quant, qc)
    b = _Builder(cfg, profile, quant, "", qname=lambda n: n.replace("model.layers.", "mtp.layers.", 1))
    H, V = cfg.hidden_size, cfg.vocab_size
    if mp.own_embed_head:
        b.add("model.embed_tokens.weight", (V, H), method=EMBED)
    for j, ch in enumerate(pattern):
        if j == 0:
            b.add(f"model.layers.{j}.enorm.weight", (H,))
            b.add(f"model.layers.{j}.hnorm.weight", (H,))
            b.linear(f"model.layers.{j}.eh_proj", (H,), 2 * H)
        b.layer(j, ch)
        if j == len(pattern) - 1:
            b.add(f"model.layers.{j}.final_layernorm.weight", (H,))
    if mp.own_embed_head:
        if mp.lm_head_quantized:
            b.linear("lm_head", (V,), H)
        else:
            b.add("lm_head.weight", (V, H), method=EMBED)
    # After loading, the proposer replaces the draft's embedding and head by the target's at PP 1
    # (``_maybe_share_embeddings`` / ``_maybe_share_lm_head``, 0.17.0 ``v1/spec_decode/eagle.py:1334`` / :1403;
    # from 0.30.0 the head only when the draft met none or an equal one, and the checkpoint's is the target's):
    # what fills them before that is not what the draft runs with, so an unfilled one is informational.
    shared = ("model.embed_tokens.", "lm_head.")
    params = tuple(msgspec.structs.replace(p, informational=True) if p.name.startswith(shared) else p for p in b.out)
    problems = tuple(qc.problems) if qc else ()
    return _manifest(params, engine, problems, kind=kind, mode="mtp")
