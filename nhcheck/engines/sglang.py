"""The SGLang NemotronH load path, replayed name by name (spec: sglang-loading.md §5, §10, §11, §14).

One algorithm; releases differ only in the flags of ``SGLangProfile``. The replay is
indexed: the expert mapping is a regex plus an integer bound, never a scan over
E × 3 tuples per name (a literal scan is 60–180× slower on a 165k-tensor checkpoint).
This module must not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from nhcheck.errors import UsageError

# ---------------------------------------------------------------------------
# Version table


@dataclass(frozen=True)
class SGLangProfile:
    """Behaviour flags of one SGLang release (spec §6.1). Each flag names one upstream change."""

    version: str
    #: ≤0.5.11: orphan expert tensor → unguarded dict lookup → KeyError (fixed by PR #24434).
    expert_missing_is_keyerror: bool
    #: 0.5.23: expert mapping sized by ``max_n_routed_experts`` (Puzzle-aware).
    expert_count_from_max: bool
    #: 0.5.23: MTP draft keeps ``embed_tokens``/``lm_head`` (PR #30456, bug #21138).
    mtp_whitelist_embed_head: bool
    #: 0.5.23: MTP wrapper strips a leading ``language_model.`` and maps ``language_model.mtp.`` quant names.
    mtp_strip_language_model: bool
    #: 0.5.23: VL/Omni wrapper maps ``language_model.backbone.`` → ``language_model.model.`` on quant names (PR #25023).
    vl_quant_mapper: bool
    #: 0.5.23: VL wrapper streams weights (≤0.5.12 buffers language-model names and loads them after routing).
    vl_streams: bool
    #: 0.5.23: the ``NemotronH_Omni_Reasoning_V3`` class exists (name rewrites, strict extra-weight check).
    omni_v3_class: bool
    #: ModelOpt non-mixed ``quant_algo`` values the release accepts.
    modelopt_algos: frozenset[str]
    #: MIXED_PRECISION per-layer algorithms the release maps to a method.
    mixed_algos: frozenset[str]
    #: 0.5.23: ``_resolve_quant_algo`` tries prefix variants (``lm_head``, ``model.language_model.``…).
    mixed_candidate_prefixes: bool
    #: 0.5.23: ``lm_head`` (ParallelLMHead) can receive a ModelOpt quant method.
    lm_head_quantizable: bool
    #: MoE backends under which the NVFP4 MoE does not register ``*_blockscale_swizzled``.
    swizzled_omitted_backends: frozenset[str]
    #: Router ``gate.weight`` dtype the release builds (0.5.11/0.5.12 float32, 0.5.23 model dtype).
    router_fp32: bool
    #: 0.5.23: the MTP wrapper checks a standalone MTP checkpoint's ``lm_head`` for completeness (§10).
    mtp_standalone_head_check: bool = False
    #: 0.5.23: a scalar per-tensor scale loaded with no shard id into a fused ``MergedColumnParallelLinear``
    #: (Mamba ``in_proj``, weight fused in the checkpoint) fills every logical slot
    #: (``MergedColumnParallelLinear.weight_loader_v2``); ≤0.5.12 loads it into slot 0 only.
    merged_scalar_every_slot: bool = False
    #: 0.5.23: ``_module_path_match`` strips trailing dots from exclude entries (≤0.5.12 compares them as written).
    exclude_strips_dots: bool = False
    #: 0.5.23: ``get_quant_config`` / ``from_config`` read quant configs the newer way: the modelopt_mixed
    #: fallback to hf_quant_config.json, more exclude keys, ``kv_cache_quant_algo`` in the flat form and a
    #: default NVFP4 group size (see ``nhcheck.quant._engine_view``).
    quant_config_v2: bool = False


_OLD_ALGOS = frozenset({"FP8", "NVFP4"})
_NEW_ALGOS = frozenset({"FP8", "NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"})
_NEW_MIXED = frozenset({"FP8", "NVFP4", "FP8_PB_WO", "FP8_BLOCK_SCALES", "MXFP8", "W4A16_NVFP4"})

PROFILES: dict[str, SGLangProfile] = {
    "0.5.11": SGLangProfile("0.5.11", True, False, False, False, False, False, False, _OLD_ALGOS, _OLD_ALGOS,
                            False, False, frozenset(), True),
    "0.5.12": SGLangProfile("0.5.12", False, False, False, False, False, False, False, _OLD_ALGOS, _OLD_ALGOS,
                            False, False, frozenset(), True),
    "0.5.23": SGLangProfile("0.5.23", False, True, True, True, True, True, True, _NEW_ALGOS, _NEW_MIXED,
                            True, True, frozenset({"flashinfer_trtllm", "flashinfer_trtllm_routed", "flashinfer_megamoe"}),
                            False, True, merged_scalar_every_slot=True, exclude_strips_dots=True,
                            quant_config_v2=True),
}
NEWEST = "0.5.23"
MOE_BACKENDS = ("auto", "triton", "flashinfer_trtllm", "flashinfer_trtllm_routed", "flashinfer_cutlass",
                "flashinfer_megamoe", "cutlass", "cutedsl", "marlin")


def get_profile(spec: str | None) -> SGLangProfile:
    """Parse ``sglang@0.5.11`` (or ``sglang`` for the newest); unknown versions are a usage error."""
    spec = (spec or "sglang").strip()
    name, _, version = spec.partition("@")
    if name != "sglang":
        raise UsageError(f"unknown engine {name!r}; nhcheck replays sglang (e.g. --engine sglang@{NEWEST})")
    version = version or NEWEST
    if version == "latest":
        version = NEWEST
    if version not in PROFILES:
        raise UsageError(f"sglang {version} is not in nhcheck's version table; choose one of "
                         + ", ".join(f"sglang@{v}" for v in PROFILES))
    return PROFILES[version]


def default_moe_backend(profile: SGLangProfile, quantization: str | None) -> str:
    """The MoE runner backend SGLang picks on a Blackwell GPU at TP 1, as recorded in the conformance set.

    Only the NVFP4 MoE's swizzled block-scale parameters depend on it.
    """
    if quantization == "modelopt_mixed":
        return "auto"
    if quantization == "modelopt_fp4" or profile.version == NEWEST:
        return "flashinfer_trtllm"
    return "auto"


# ---------------------------------------------------------------------------
# Replay of NemotronHForCausalLM.load_weights (§14)


class Outcome(NamedTuple):
    """What the engine does with one checkpoint tensor.

    ``outcome`` is ``load|warn|skip|raise|routed``; ``param`` is the engine's name for
    the target (inner model for the language model); ``reason`` says which branch fired.
    NamedTuple for the same reason as ``TensorInfo``: one per tensor, on the hot path.
    """

    outcome: str
    param: str | None = None
    shard_id: str | None = None
    expert_id: int | None = None
    engine_name: str | None = None
    message: str | None = None
    reason: str = "load"


#: Reasons that are intended behaviour, not orphans.
BY_DESIGN_REASONS = frozenset({"mtp-filter", "pp-range", "pp-rank", "routed", "wrapper-mtp"})

#: What each replay branch does, in words (findings and report rows share them).
REASON_TEXT = {
    "keyerror": "KeyError: no such parameter (before PR #24434)",
    "expert-orphan": "dropped silently: no such expert parameter",
    "not-found": "warned 'not found in params_dict', dropped",
    "kv-drop": "KV-scale remap found no target: warned, dropped",
    "bias": "dropped silently: .bias with no target",
    "mtp-filter": "by design: MTP block (the draft model loads it)",
    "wrapper-mtp": "by design: MTP block (the draft model loads it)",
    "wrapper-ignored": "dropped silently: the wrapper routes it nowhere",
    "wrapper-raise": "the wrapper raises on it",
    "pp-range": "by design: layer outside this pipeline rank",
    "pp-rank": "by design: not on this pipeline rank",
    "routed": "by design: a tower or the projector loads it",
    "load": "loaded",
}

_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))
_SUBSTR = (("A_log", "A"), ("embeddings", "embed_tokens"), ("k_proj.k_scale", "attn.k_scale"),
           ("v_proj.v_scale", "attn.v_scale"))
# FusedMoE.make_expert_params_mapping(gate="up_proj", down="down_proj", up=""): for each e the
# tuples (w1, "experts.{e}.up_proj."), (w2, "experts.{e}.down_proj."), (w3, "experts.{e}..").
# The regex finds every such substring; the integer bound and the tuple order are applied after.
_EXPERT_RE = re.compile(r"experts\.(0|[1-9][0-9]*)\.(up_proj|down_proj|)\.")
_EXPERT_SHARD = {"up_proj": ("w1", "experts.w13_", 0), "down_proj": ("w2", "experts.w2_", 1), "": ("w3", "experts.w13_", 2)}
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
_QUARK = ((".q_proj.output_scale", ".attn.q_scale"), (".k_proj.output_scale", ".attn.k_scale"),
          (".v_proj.output_scale", ".attn.v_scale"), ("self_attn.prob_output_scale", ".attn.prob_scale"))


@dataclass(frozen=True)
class PPWindow:
    """Pipeline-parallel view of one rank: layers [start, end), and whether it holds embed / head."""

    start: int
    end: int
    first_rank: bool = True
    last_rank: bool = True


def pp_window(num_layers: int, rank: int, size: int) -> PPWindow:
    """``get_pp_indices`` (``distributed/utils.py``): even split, the last ``num_layers % size`` ranks get one more."""
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"pipeline rank {rank} is outside 0..{size - 1}")
    base, extra = divmod(num_layers, size)
    if rank >= size - extra:
        start = rank * (base + 1) - (size - extra)
        end = start + base + 1
    else:
        start = rank * base
        end = start + base
    return PPWindow(start, end, rank == 0, rank == size - 1)


def _kv_remap(name: str, params: frozenset[str] | set[str]) -> tuple[str | None, str | None]:
    """``maybe_remap_kv_scale_name`` (§3): (new name, None) or (None, warning) when dropped."""
    if name.endswith(".kv_scale"):
        cand = name.replace(".kv_scale", ".attn.k_scale")
        if cand in params:
            return cand, None
        return None, (f"Found kv_scale in the checkpoint (e.g. {name}), but not found the expected name in "
                      f"the model (e.g. {cand}). kv_scale is not loaded.")
    for suffix in (".k_scale", ".v_scale"):
        if name.endswith(suffix):
            proj = "k_proj" if suffix == ".k_scale" else "v_proj"
            if f".self_attn.{proj}{suffix}" in name:
                cand = name.replace(f".self_attn.{proj}{suffix}", f".self_attn.attn{suffix}")
            elif f".mixer.{proj}{suffix}" in name:
                cand = name.replace(f".mixer.{proj}{suffix}", f".mixer.attn{suffix}")
            else:
                cand = name.replace(suffix, f".attn{suffix}")
            if cand in params:
                return cand, None
            return None, (f"Found {suffix} in the checkpoint (e.g. {name}), but not found the expected name in "
                          f"the model (e.g. {cand}). {suffix} is not loaded.")
    for old, new in _QUARK:
        if name.endswith(old):
            return name.replace(old, new), None
    return name, None


def replay_name(
    name: str,
    params: frozenset[str] | set[str],
    num_experts: int,
    profile: SGLangProfile,
    *,
    is_mtp: bool = False,
    pp: PPWindow | None = None,
) -> Outcome:
    """Replay one checkpoint name through ``load_weights`` against the runtime names ``params``."""
    n = name
    # 1. prefix remap: a leading "backbone" (no dot needed) becomes "model", first occurrence only.
    if n.startswith("backbone"):
        n = "model" + n[len("backbone"):]
    # 2. substring remaps, in order, every occurrence.
    for old, new in _SUBSTR:
        if old in n:
            n = n.replace(old, new)
    # 3. MTP filters.
    if is_mtp:
        keep = "mtp" in n or (profile.mtp_whitelist_embed_head and ("embed_tokens" in n or "lm_head" in n))
        if not keep:
            return Outcome("skip", reason="mtp-filter")
        n = n.replace("mtp.layers.", "model.layers.")
    elif "mtp" in n:
        return Outcome("skip", reason="mtp-filter")
    # 4. KV-scale remap, only for names with "scale" that are not parameters.
    if "scale" in n and n not in params:
        new, warning = _kv_remap(n, params)
        if new is None:
            return Outcome("warn", engine_name=n, message=warning, reason="kv-drop")
        n = new
    # 5. PP layer range (main model only: the MTP predictor has no start/end layer).
    if not is_mtp and pp is not None:
        m = _LAYER_RE.search(n)
        if m is not None and not pp.start <= int(m.group(1)) < pp.end:
            return Outcome("skip", reason="pp-range")
    if pp is not None:
        if ("embed_tokens" in n and not pp.first_rank) or (("norm_f" in n or "lm_head" in n) and not pp.last_rank):
            return Outcome("skip", reason="pp-rank")
    # 6. stacked q/k/v: the rewrite persists across triples (the "qkqkv_proj" quirk).
    for param_name, weight_name, shard in _STACKED:
        if weight_name not in n:
            continue
        n = n.replace(weight_name, param_name)
        if n.endswith(".bias") and n not in params:
            continue
        if n in params:
            return Outcome("load", n, shard)
    # 7. expert mapping with the trailing dot; ids ≥ E match no tuple.
    if "experts." in n:
        hits = []
        for m in _EXPERT_RE.finditer(n):
            e = int(m.group(1))
            if e < num_experts:
                shard, repl, order = _EXPERT_SHARD[m.group(2)]
                hits.append((e, order, m.group(0), repl, shard))
        if hits:
            hits.sort()
            for e, _, sub, repl, shard in hits:
                mapped = n.replace(sub, repl)
                if mapped in params:
                    return Outcome("load", mapped, shard, e)
                if profile.expert_missing_is_keyerror:
                    # Python prints a KeyError as the repr of its key.
                    return Outcome("raise", engine_name=mapped, message=f"KeyError: {mapped!r}", reason="keyerror")
            return Outcome("skip", engine_name=n.replace(hits[0][2], hits[0][3]), reason="expert-orphan")
    # 8. default branch.
    if n.endswith(".bias") and n not in params:
        return Outcome("skip", engine_name=n, reason="bias")
    if n in params:
        return Outcome("load", n)
    return Outcome("warn", engine_name=n, message=f"Parameter {n} not found in params_dict", reason="not-found")


_new_outcome = tuple.__new__
_ONE_EXPERT = re.compile(r"experts\.(0|[1-9][0-9]*)\.")
_ANY_EXPERT_INDEX = re.compile(r"experts\.[0-9]+\.")
_EXPERT_BRANCH = frozenset({"expert-orphan", "keyerror"})
_UNCACHED = Outcome("uncached")


def make_replayer(params: frozenset[str] | set[str], num_experts: int, profile: SGLangProfile, *,
                  is_mtp: bool = False, pp: PPWindow | None = None):
    """``replay_name`` with the expert index factored out: one replay per layer × projection × suffix.

    For a name with exactly one ``experts.{e}.`` (e < E), and runtime names that carry no
    expert index (a built manifest never does), every membership test of the replay is
    false for a name still holding ``experts.{e}.``; so the outcome of the expert branch
    (§14 step 7: load, orphan, KeyError) is the same for every e except the reported
    expert id, and Super's 163k expert tensors cost ~2k replays. Any other outcome names
    the tensor (warning text, engine name) and is replayed per name; so is everything
    when a supplied manifest has per-expert names (the index then decides steps 4–6).
    """
    cache: dict[tuple[str, str], Outcome] = {}
    direct = any(_ANY_EXPERT_INDEX.search(p) for p in params if "experts." in p)

    def replay(name: str) -> Outcome:
        if not direct and "experts." in name:
            hits = list(_ONE_EXPERT.finditer(name))
            if len(hits) == 1 and int(hits[0].group(1)) < num_experts:
                m = hits[0]
                e = int(m.group(1))
                key = (name[:m.start()], name[m.end():])
                o = cache.get(key)
                if o is None:
                    o = replay_name(name, params, num_experts, profile, is_mtp=is_mtp, pp=pp)
                    expert_branch = o.expert_id is not None or o.reason in _EXPERT_BRANCH
                    cache[key] = o if expert_branch else _UNCACHED
                    return o
                if o is not _UNCACHED:
                    # tuple.__new__ directly: _replace goes through _make, twice the cost on 163k names
                    return o if o.expert_id is None or o.expert_id == e else _new_outcome(
                        Outcome, (o[0], o[1], o[2], e, o[4], o[5], o[6]))
        return replay_name(name, params, num_experts, profile, is_mtp=is_mtp, pp=pp)

    return replay


# ---------------------------------------------------------------------------
# Omni / VL wrapper routing (§11) and the MTP wrapper's pre-processing (§10)

_OMNI_V3_RENAMES = (("vision_projector.mlp1.norm.", "mlp1.0."), ("vision_projector.mlp1.linear1.", "mlp1.1."),
                    ("vision_projector.mlp1.linear2.", "mlp1.3."))


class Route(NamedTuple):
    """Where a wrapper sends a checkpoint name: to the LM replay (with the inner name) or elsewhere."""

    target: str  # "lm" | "projector" | "tower" | "ignored" | "raise"
    inner: str | None = None
    message: str | None = None


def route_wrapped(name: str, wrapper: str, profile: SGLangProfile, has_sound: bool, lm_has_mtp: bool) -> Route:
    """``NemotronH_Nano_VL_V2.load_weights`` routing of one checkpoint name."""
    v3 = wrapper == "NemotronH_Omni_Reasoning_V3" and profile.omni_v3_class
    if v3:
        for old, new in _OMNI_V3_RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        else:
            if name.startswith("vision_model.") and not name.startswith("vision_model.radio_model."):
                name = "vision_model.radio_model.hf_model." + name[len("vision_model."):]
    if name.startswith("language_model"):
        return Route("lm", name.split(".", 1)[1] if "." in name else "")
    if name.startswith("mlp1"):
        return Route("projector", name)
    if name.startswith("vision_model.radio_model."):
        return Route("tower")
    if name.startswith("sound"):
        return Route("tower") if has_sound else Route("ignored")
    if v3:
        # ``_load_extra_weight`` (VL@0.5.23:461–472): only the final LayerNorm of the vision
        # projector, which exists only when the LM has MTP (``num_nextn_predict_layers > 0``),
        # and only its ``weight``/``bias``; each refusal has its own message.
        prefix = "vision_projector.vision_final_layernorm."
        if not name.startswith(prefix):
            return Route("raise", message=f"ValueError: Unexpected Nemotron-H Omni weight: {name}")
        if not lm_has_mtp or name[len(prefix):] not in ("weight", "bias"):
            return Route("raise", message=f"ValueError: Unexpected vision projector weight: {name}")
        return Route("tower")
    return Route("ignored")


def replay_projector(name: str, projector_params: frozenset[str] | set[str]) -> Outcome:
    """Names starting with ``mlp1`` (§11): ``adapter_dict[<name minus its first component>]``.

    The wrapper looks up ``".".join(name.split(".")[1:])`` among ``mlp1``'s own parameters,
    whatever the first component is (``mlp1_x.1.weight`` lands in ``mlp1.1.weight``); a miss
    is a KeyError naming that trimmed key.
    """
    rest = name.split(".", 1)[1] if "." in name else ""
    param = "mlp1." + rest
    if param in projector_params:
        return Outcome("load", param)
    return Outcome("raise", engine_name=name, message=f"KeyError: {rest!r}", reason="keyerror")


def mtp_preprocess(name: str, profile: SGLangProfile) -> str:
    """``NemotronHForCausalLMMTP.load_weights`` (0.5.23) strips one leading ``language_model.``."""
    if profile.mtp_strip_language_model and name.startswith("language_model."):
        return name[len("language_model."):]
    return name
