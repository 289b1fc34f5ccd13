"""The SGLang NemotronH load path, replayed name by name (spec: sglang-loading.md §5, §10, §11, §14).

One algorithm; releases differ only in the flags of ``SGLangProfile``. The replay is
indexed: the expert mapping is a regex plus an integer bound, never a scan over
E × 3 tuples per name (a literal scan is 60–180× slower on a 165k-tensor checkpoint).
This module must not import torch.
"""

from __future__ import annotations

import re

import msgspec

from nhcheck.engines.base import (
    EXPERT_INDEX,
    EngineId,
    LoaderSemantics,
    Outcome,
    PPWindow,
    Route,
    UnloadedKind,
    replay_signature,
    resolve_release,
)
from nhcheck.errors import UsageError

# ---------------------------------------------------------------------------
# Version table


class SGLangProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Behaviour flags of one SGLang behaviour epoch, built with keywords. Each flag cites one upstream change.

    A release table row: ``RELEASES`` maps every known release to its row. Nothing compares
    version strings: what differs between releases is a flag here, so adding a release is one row.
    """

    version: str
    #: ≤0.5.11: orphan expert tensor → unguarded dict lookup → KeyError (fixed by PR #24434 in 0.5.12).
    expert_missing_is_keyerror: bool
    #: The expert mapping is sized by ``max_n_routed_experts`` (Puzzle-aware).
    expert_count_from_max: bool
    #: MTP draft keeps ``embed_tokens``/``lm_head`` (PR #30456, bug #21138).
    mtp_whitelist_embed_head: bool
    #: MTP wrapper strips a leading ``language_model.`` and maps ``language_model.mtp.`` quant names.
    mtp_strip_language_model: bool
    #: VL/Omni wrapper maps ``language_model.backbone.`` → ``language_model.model.`` on quant names (PR #25023).
    vl_quant_mapper: bool
    #: VL wrapper streams weights (before: buffers language-model names and loads them after routing).
    vl_streams: bool
    #: The ``NemotronH_Omni_Reasoning_V3`` class exists (name rewrites, strict extra-weight check).
    omni_v3_class: bool
    #: ModelOpt non-mixed ``quant_algo`` values the release accepts (+NVFP4_AWQ 0.5.17, +W4A16_NVFP4 0.5.19).
    modelopt_algos: frozenset[str]
    #: MIXED_PRECISION per-layer algorithms the release maps to a linear method.
    mixed_algos: frozenset[str]
    #: … and to a MoE method (0.5.18–0.5.20: FP8_PB_WO is linear-only; the MoE stays unquantised).
    mixed_moe_algos: frozenset[str]
    #: ``_resolve_quant_algo`` tries ``lm_head`` and ``language_model.model.``↔``model.language_model.`` (0.5.15).
    mixed_candidate_prefixes: bool
    #: … and ``model.language_model.X``↔``model.X`` (0.5.20, MQ:988).
    mixed_candidate_model_prefix: bool
    #: ``lm_head`` (ParallelLMHead) can receive a ModelOpt quant method.
    lm_head_quantizable: bool
    #: MoE backends under which the NVFP4 MoE does not register ``*_blockscale_swizzled``.
    swizzled_omitted_backends: frozenset[str]
    #: Router ``gate.weight`` is built in float32 (later releases: the model dtype).
    router_fp32: bool
    #: The MTP wrapper checks a standalone MTP checkpoint's ``lm_head`` for completeness (§10).
    mtp_standalone_head_check: bool
    #: A scalar per-tensor scale loaded with no shard id into a fused ``MergedColumnParallelLinear``
    #: (Mamba ``in_proj``, weight fused in the checkpoint) fills every logical slot
    #: (``MergedColumnParallelLinear.weight_loader_v2``); before, slot 0 only.
    merged_scalar_every_slot: bool
    #: ``_module_path_match`` strips trailing dots from exclude entries (before: compared as written).
    exclude_strips_dots: bool
    #: ``get_quant_config`` falls back from config.json to hf_quant_config.json for an incomplete
    #: ``modelopt_mixed``, and the FP8 / mixed flat forms read ``kv_cache_quant_algo`` (0.5.15, WU:267, MQ:458).
    quant_mixed_fallback: bool
    #: The mixed flat form reads ``ignore`` then ``exclude_modules``; the FP4 flat ``group_size`` defaults
    #: to 16 for NVFP4 algorithms (0.5.17, MQ:692, MQ:1337).
    quant_mixed_exclude_modules: bool
    #: The FP4 flat form reads ``ignore``, then ``modules_to_not_convert``, then ``exclude_modules`` (0.5.23, MQ:1655).
    quant_fp4_exclude_keys: bool
    #: MoE runner backend picked for a MoE that is neither NVFP4 nor mixed when the user names none (Blackwell, TP 1).
    moe_backend_default: str
    #: The Nemotron-H server-args override reads ``hf_config.quantization_config`` for a text model's
    #: MIXED_PRECISION recipe: one only in hf_quant_config.json dies with AttributeError (0.5.18, goldens).
    override_reads_quantization_config: bool
    #: ``_parse_modelopt_quant_config`` resolves a MIXED recipe with no NVFP4 / W4A16_NVFP4 layer to
    #: ``w4afp8`` (block-FP8 linears) instead of ``modelopt_mixed`` (MC:1155; goldens from 0.5.16).
    mixed_without_fp4_is_w4afp8: bool
    #: The server args accept ``quant_method: modelopt`` in config.json (0.5.4; 0.5.3.postN: "Unknown
    #: quantization method: modelopt", goldens 0.5.3.post3).
    modelopt_in_config_json: bool
    #: ``_init_model`` passes ``prefix=""`` and ``MambaMixer2`` gets no prefix (0.5.3.postN, NH@0.5.3.post1:442):
    #: quant prefixes are ``.layers.{i}.mixer.<m>`` and excludes never match. nhcheck does not replay a
    #: quantized checkpoint there (a usage error) rather than guess.
    legacy_quant_prefixes: bool
    #: ``load_weights`` replaces the first ``backbone`` only (``replace_prefix``, WU@0.5.4:141); before: every one.
    prefix_remap_first_only: bool
    #: ``NemotronHConfig`` reads ``layer_norm_epsilon`` (0.5.6, CFG); before, the model reads ``rms_norm_eps``
    #: and a config without it dies at model build (AttributeError; goldens 0.5.3.post3 / 0.5.5.post3).
    reads_layer_norm_epsilon: bool
    #: MoE (``E``) layers exist: ``NemotronHMoE``, the expert branch of ``load_weights`` (0.5.6, NH:713).
    moe_layers: bool
    #: Wrapper architectures whose config class and model the release registers; any other needs the
    #: checkpoint's own code (``trust_remote_code``): NemotronH_Nano_VL_V2 0.5.6, Nano-Omni 0.5.11 (goldens),
    #: NemotronH_Omni_Reasoning_V3 0.5.20.
    wrappers: frozenset[str]
    #: ``is_layer_skipped`` matching: ``exact`` membership (≤0.5.6), ``substring`` (0.5.6.post1, QU:80),
    #: ``path`` (``_module_path_match`` with ``_FALLBACK_FUSED_SHARDS``, 0.5.11, QU:46).
    skip_match: str
    #: The experts rule of ``is_layer_skipped`` is or-ed with the result (0.5.10rc0, QU:89); before it replaces it.
    experts_skip_ored: bool
    #: ``load_weights(is_mtp)``: the MTP keep filter, the main model's ``mtp`` skip, pipeline-parallel
    #: layer / rank skips, the ``NemotronHForCausalLMMTP`` draft and latent MoE (0.5.8, NH:775/788/194).
    mtp_pp_filters: bool
    #: The MTP draft's quant prefix: ``model`` (0.5.8–0.5.9, ``add_prefix("model", …)``), ``mtp`` (0.5.10rc0, MTPF:300).
    mtp_quant_prefix: str
    #: Checkpoint KV scales load (0.5.9): ``k_proj.k_scale``/``v_proj.v_scale`` → ``attn.*`` (NH:640), the KV
    #: remap only for names not in params (NH:792), ``maybe_remap_kv_scale_name``'s ``.mixer.`` rule (WU:1219).
    #: Before, every k/v scale is dropped with the remap warning (goldens sglang_probe_kv_scale_shape 0.5.8.post1).
    kv_remap_v2: bool
    #: ``hf_to_sglang_mapper`` (``backbone.`` → ``model.``) maps exclude lists from both sources, with
    #: ``language_model.``-stripped copies (0.5.9, MQ ``apply_weight_name_mapper``).
    quant_name_mapper: bool
    #: ``is_layer_excluded`` is glob ``fullmatch`` on the prefix or any dotted component, for FP8 and FP4,
    #: and FusedMoE can be excluded (0.5.9, MQ:301/330; goldens: experts-excluded exports raise from 0.5.9).
    #: Before: FP8 substring, FP4 whole-prefix glob, Linear only.
    exclusion_v1: bool
    #: ``_parse_modelopt_quant_config`` maps MIXED_PRECISION to ``modelopt_mixed`` (0.5.10rc0, MC:803). Before:
    #: a flat config.json recipe becomes ``modelopt_fp8`` and ModelOptFp8Config refuses it; one only in
    #: hf_quant_config.json becomes ``w4afp8`` (goldens 0.5.5.post3 – 0.5.9).
    mixed_precision: bool
    #: ``NemotronHConfig`` reads ``layers_block_type`` (0.5.10rc0, CFG:189); before, only the pattern string.
    layers_block_type: bool
    #: MoE runner backend the Nemotron-H server-args override picks on sm100 for a ModelOpt checkpoint:
    #: ``auto`` (≤0.5.5, no MoE), ``flashinfer_cutlass`` (0.5.6–0.5.10.post1), ``flashinfer_trtllm`` (0.5.11; goldens).
    modelopt_moe_backend: str
    #: The release is the newest nhcheck's table knows (``--engine sglang`` means it).
    newest: bool = False


_FP8_NVFP4 = frozenset({"FP8", "NVFP4"})

#: B1: 0.5.3.post1 – 0.5.3.post3, the first releases with ``nemotron_h.py``: dense layers only.
_B1 = SGLangProfile(
    version="0.5.3.post3",
    expert_missing_is_keyerror=True,
    expert_count_from_max=False,
    mtp_whitelist_embed_head=False,
    mtp_strip_language_model=False,
    vl_quant_mapper=False,
    vl_streams=False,
    omni_v3_class=False,
    modelopt_algos=_FP8_NVFP4,
    mixed_algos=frozenset(),
    mixed_moe_algos=frozenset(),
    mixed_candidate_prefixes=False,
    mixed_candidate_model_prefix=False,
    lm_head_quantizable=False,
    swizzled_omitted_backends=frozenset(),
    router_fp32=True,
    mtp_standalone_head_check=False,
    merged_scalar_every_slot=False,
    exclude_strips_dots=False,
    quant_mixed_fallback=False,
    quant_mixed_exclude_modules=False,
    quant_fp4_exclude_keys=False,
    moe_backend_default="auto",
    override_reads_quantization_config=False,
    mixed_without_fp4_is_w4afp8=False,
    modelopt_in_config_json=False,
    legacy_quant_prefixes=True,
    prefix_remap_first_only=False,
    reads_layer_norm_epsilon=False,
    moe_layers=False,
    wrappers=frozenset(),
    skip_match="exact",
    experts_skip_ored=False,
    mtp_pp_filters=False,
    mtp_quant_prefix="model",
    kv_remap_v2=False,
    quant_name_mapper=False,
    exclusion_v1=False,
    mixed_precision=False,
    layers_block_type=False,
    modelopt_moe_backend="auto",
)
#: B2: 0.5.4 – 0.5.5.post3 — ``modelopt`` in config.json accepted, quant prefixes ``model.layers.{i}.mixer.<m>``
#: (NH:442, NH:160), ``replace_prefix`` first occurrence only (WU:141).
_B2 = msgspec.structs.replace(
    _B1, version="0.5.5.post3", modelopt_in_config_json=True, legacy_quant_prefixes=False, prefix_remap_first_only=True
)
#: B3: 0.5.6 — MoE layers and the expert branch (NH:713, orphan → KeyError), ``layer_norm_epsilon`` (CFG),
#: the VL wrapper ``NemotronH_Nano_VL_V2``, ``flashinfer_cutlass`` for ModelOpt MoEs on sm100.
_B3 = msgspec.structs.replace(
    _B2,
    version="0.5.6",
    reads_layer_norm_epsilon=True,
    moe_layers=True,
    wrappers=frozenset({"NemotronH_Nano_VL_V2"}),
    modelopt_moe_backend="flashinfer_cutlass",
)
#: B4: 0.5.6.post1 – 0.5.7 — ``is_layer_skipped`` becomes a substring test (QU:80).
_B4 = msgspec.structs.replace(_B3, version="0.5.7", skip_match="substring")
#: B5: 0.5.8 – 0.5.8.post1 — MTP draft, MTP / PP filters, latent MoE (NH:775/788/194; quant prefix ``model``).
_B5 = msgspec.structs.replace(_B4, version="0.5.8.post1", mtp_pp_filters=True)
#: B6: 0.5.9 — checkpoint KV scales load (NH:640/792, WU:1219), the quant-name mapper, unified
#: ``is_layer_excluded`` with an excludable MoE (MQ:301/330).
_B6 = msgspec.structs.replace(_B5, version="0.5.9", kv_remap_v2=True, quant_name_mapper=True, exclusion_v1=True)
#: B7: 0.5.10rc0 – 0.5.10.post1 — MIXED_PRECISION → ``modelopt_mixed`` (MC:803) with {FP8, NVFP4}, the MTP
#: quant prefix ``mtp`` (MTPF:300), ``layers_block_type`` (CFG:189), the experts skip rule or-ed (QU:89).
_B7 = msgspec.structs.replace(
    _B6,
    version="0.5.10.post1",
    mixed_precision=True,
    mixed_algos=_FP8_NVFP4,
    mixed_moe_algos=_FP8_NVFP4,
    mtp_quant_prefix="mtp",
    layers_block_type=True,
    experts_skip_ored=True,
)
#: B8: 0.5.11, the last release before PR #24434 (an orphan expert tensor raises KeyError): path matching
#: of excludes (QU:46), the Nano-Omni class, ``flashinfer_trtllm`` for ModelOpt MoEs on sm100.
_B8 = msgspec.structs.replace(
    _B7,
    version="0.5.11",
    skip_match="path",
    wrappers=_B7.wrappers | {"NemotronH_Nano_Omni_Reasoning_V3"},
    modelopt_moe_backend="flashinfer_trtllm",
)
#: B9: 0.5.12 — PR #24434, ``if name_mapped not in params_dict: continue`` in the expert branch (NH:977).
_B9 = msgspec.structs.replace(_B8, version="0.5.12", expert_missing_is_keyerror=False)
#: B10: 0.5.13 — experts sized by ``max_n_routed_experts`` (NH:910), router ``gate`` in the model dtype,
#: the VL quant-name mapper (VL:56), trailing dots stripped from excludes (QU:53), no swizzled NVFP4 block
#: scales under the trtllm backends (MQ:1811), and flashinfer_trtllm for unquantized MoEs too.
_B10 = msgspec.structs.replace(
    _B9,
    version="0.5.13",
    expert_count_from_max=True,
    router_fp32=False,
    vl_quant_mapper=True,
    exclude_strips_dots=True,
    swizzled_omitted_backends=frozenset({"flashinfer_trtllm", "flashinfer_trtllm_routed"}),
    moe_backend_default="flashinfer_trtllm",
)
#: B11: 0.5.15 — ``lm_head`` quantisable (MQ:306), mixed W4A16_NVFP4 (MQ:815), the first candidate
#: prefixes (MQ:780), the mixed hf_quant_config.json fallback and flat ``kv_cache_quant_algo``.
_B11 = msgspec.structs.replace(
    _B10,
    version="0.5.15",
    lm_head_quantizable=True,
    mixed_algos=_B10.mixed_algos | {"W4A16_NVFP4"},
    mixed_moe_algos=_B10.mixed_moe_algos | {"W4A16_NVFP4"},
    mixed_candidate_prefixes=True,
    quant_mixed_fallback=True,
    mixed_without_fp4_is_w4afp8=True,
)
#: B12: 0.5.16 — the MTP draft keeps ``embed_tokens``/``lm_head`` (NH:1136, #21138); a shard-less scalar
#: scale fills every slot of a fused merged column (LIN:858).
_B12 = msgspec.structs.replace(_B11, version="0.5.16", mtp_whitelist_embed_head=True, merged_scalar_every_slot=True)
#: B13: 0.5.17 — non-mixed NVFP4_AWQ (MQ:1358), mixed MXFP8 (MQ:835/851), mixed flat ``exclude_modules``.
_B13 = msgspec.structs.replace(
    _B12,
    version="0.5.17",
    modelopt_algos=_B12.modelopt_algos | {"NVFP4_AWQ"},
    mixed_algos=_B12.mixed_algos | {"MXFP8"},
    mixed_moe_algos=_B12.mixed_moe_algos | {"MXFP8"},
    quant_mixed_exclude_modules=True,
)
#: B14: 0.5.18 — mixed FP8_PB_WO for linear layers only (MQ:949).
#: (The start-up goldens show the override reading ``quantization_config`` from 0.5.18 on: 0.5.17 starts.)
_B14 = msgspec.structs.replace(
    _B13, version="0.5.18", mixed_algos=_B13.mixed_algos | {"FP8_PB_WO"}, override_reads_quantization_config=True
)
#: B15: 0.5.19 — non-mixed W4A16_NVFP4 (MQ:1580).
_B15 = msgspec.structs.replace(_B14, version="0.5.19", modelopt_algos=_B14.modelopt_algos | {"W4A16_NVFP4"})
#: B16: 0.5.20 — the MTP wrapper strips ``language_model.`` and checks a standalone head (MTPF:397/426),
#: the VL wrapper streams (VL:380), ``NemotronH_Omni_Reasoning_V3``, mixed FP8_BLOCK_SCALES for linear and
#: MoE, the ``model.``↔``model.language_model.`` candidates (MQ:988), no swizzled scales under megamoe.
_B16 = msgspec.structs.replace(
    _B15,
    version="0.5.20",
    mtp_strip_language_model=True,
    mtp_standalone_head_check=True,
    vl_streams=True,
    omni_v3_class=True,
    wrappers=_B15.wrappers | {"NemotronH_Omni_Reasoning_V3"},
    mixed_algos=_B15.mixed_algos | {"FP8_BLOCK_SCALES"},
    mixed_moe_algos=_B15.mixed_moe_algos | {"FP8_BLOCK_SCALES"},
    mixed_candidate_model_prefix=True,
    swizzled_omitted_backends=_B15.swizzled_omitted_backends | {"flashinfer_megamoe"},
)
#: B17: 0.5.21 — mixed FP8_PB_WO for the MoE too (MQ:794).
_B17 = msgspec.structs.replace(_B16, version="0.5.21", mixed_moe_algos=_B16.mixed_moe_algos | {"FP8_PB_WO"})
#: B18: 0.5.23 — the FP4 flat form's ``modules_to_not_convert`` / ``exclude_modules`` keys (MQ:1655).
_B18 = msgspec.structs.replace(_B17, version="0.5.23", quant_fp4_exclude_keys=True, newest=True)

#: Every release on the package index that ships ``sglang/srt/models/nemotron_h.py`` (0.5.3.post1 – 0.5.23,
#: 0.5.10rc0 included), oldest first → its behaviour row (``oracle/sglang/EPOCHS.md``: release → epoch).
#: A row's ``version`` is the release its goldens were made with.
PROFILES: dict[str, SGLangProfile] = {
    "0.5.3.post1": _B1,
    "0.5.3.post2": _B1,
    "0.5.3.post3": _B1,
    "0.5.4": _B2,
    "0.5.4.post1": _B2,
    "0.5.4.post2": _B2,
    "0.5.4.post3": _B2,
    "0.5.5": _B2,
    "0.5.5.post1": _B2,
    "0.5.5.post2": _B2,
    "0.5.5.post3": _B2,
    "0.5.6": _B3,
    "0.5.6.post1": _B4,
    "0.5.6.post2": _B4,
    "0.5.7": _B4,
    "0.5.8": _B5,
    "0.5.8.post1": _B5,
    "0.5.9": _B6,
    "0.5.10rc0": _B7,
    "0.5.10": _B7,
    "0.5.10.post1": _B7,
    "0.5.11": _B8,
    "0.5.12": _B9,
    "0.5.12.post1": _B9,
    "0.5.13": _B10,
    "0.5.13.post1": _B10,
    "0.5.14": _B10,
    "0.5.15": _B11,
    "0.5.15.post1": _B11,
    "0.5.16": _B12,
    "0.5.17": _B13,
    "0.5.18": _B14,
    "0.5.19": _B15,
    "0.5.20": _B16,
    "0.5.21": _B17,
    "0.5.22": _B17,
    "0.5.23": _B18,
}
NEWEST = next(v for v, p in PROFILES.items() if p.newest)
#: The behaviour epochs, oldest first.
EPOCHS: tuple[SGLangProfile, ...] = tuple(dict.fromkeys(PROFILES.values()))
MOE_BACKENDS = (
    "auto",
    "triton",
    "flashinfer_trtllm",
    "flashinfer_trtllm_routed",
    "flashinfer_cutlass",
    "flashinfer_megamoe",
    "cutlass",
    "cutedsl",
    "marlin",
)


def get_profile(spec: str | EngineId | None) -> SGLangProfile:
    """The behaviour row of an SGLang release: an ``EngineId``, or ``sglang@0.5.11`` / ``sglang`` (newest)."""
    eid = spec if isinstance(spec, EngineId) else parse_engine_id(spec)
    return PROFILES.get(eid.version) or PROFILES[NEWEST]


def parse_engine_id(spec: str | None) -> EngineId:
    """Parse ``sglang@X`` (``engines.base.resolve_release``); the table holds every SGLang release with Nemotron-H."""
    return resolve_release("sglang", spec, tuple(PROFILES), NEWEST, tuple(PROFILES))


def default_moe_backend(profile: SGLangProfile, quantization: str | None, wrapped: bool = False) -> str:
    """The MoE runner backend SGLang picks on a Blackwell GPU at TP 1, as recorded in the conformance set.

    The Nemotron-H server-args override picks it by architecture: a text model's MIXED recipe gets
    flashinfer_trtllm, the Omni / VL architectures are not registered there and stay on auto. Only the
    NVFP4 MoE's swizzled block-scale parameters (and the TP windows) depend on it.
    """
    if quantization == "modelopt_mixed":
        return "auto" if wrapped else profile.modelopt_moe_backend
    # Up to 0.5.10.post1 the override forces flashinfer_cutlass for every ModelOpt checkpoint (goldens:
    # modelopt_fp8 too); from 0.5.11 the FP8 MoE takes the release's default.
    cutlass_era = profile.modelopt_moe_backend == "flashinfer_cutlass"
    if quantization == "modelopt_fp4" or (quantization == "modelopt_fp8" and cutlass_era):
        return profile.modelopt_moe_backend
    return profile.moe_backend_default


# ---------------------------------------------------------------------------
# Replay of NemotronHForCausalLM.load_weights (§14)


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
    "size-assert": "default_weight_loader asserts equal sizes: AssertionError",
    "load": "loaded",
}

#: Prune's reading of the replay branches (``Engine.unloaded_kind``): the language-model loader's
#: own drops by name; a KV-scale remap miss; a layer past the model (the range check drops it even
#: without pipeline parallelism). Every other branch (wrapper routing, the MTP filter) is "elsewhere".
_UNLOADED_KIND: dict[str, UnloadedKind] = {
    "not-found": "by-name",
    "expert-orphan": "by-name",
    "bias": "by-name",
    "keyerror": "by-name",
    "kv-drop": "kv-scale",
    "pp-range": "past-model",
}

_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))
_SUBSTR = (
    ("A_log", "A"),
    ("embeddings", "embed_tokens"),
    ("k_proj.k_scale", "attn.k_scale"),
    ("v_proj.v_scale", "attn.v_scale"),
)
#: Before ``kv_remap_v2`` (0.5.9, NH:640) only the first two.
_SUBSTR_V1 = _SUBSTR[:2]
# FusedMoE.make_expert_params_mapping(gate="up_proj", down="down_proj", up=""): for each e the
# tuples (w1, "experts.{e}.up_proj."), (w2, "experts.{e}.down_proj."), (w3, "experts.{e}..").
# The regex finds every such substring; the integer bound and the tuple order are applied after.
_EXPERT_RE = re.compile(r"experts\.(0|[1-9][0-9]*)\.(up_proj|down_proj|)\.")
_EXPERT_SHARD = {
    "up_proj": ("w1", "experts.w13_", 0),
    "down_proj": ("w2", "experts.w2_", 1),
    "": ("w3", "experts.w13_", 2),
}
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
_QUARK = (
    (".q_proj.output_scale", ".attn.q_scale"),
    (".k_proj.output_scale", ".attn.k_scale"),
    (".v_proj.output_scale", ".attn.v_scale"),
    ("self_attn.prob_output_scale", ".attn.prob_scale"),
)


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
    return PPWindow(start, end, rank == 0, rank == size - 1, rank, size)


def _kv_remap(name: str, params: frozenset[str] | set[str], mixer_rule: bool = True) -> tuple[str, str | None]:
    """``maybe_remap_kv_scale_name`` (§3): (new name, None), or (the candidate it looked for, warning) when dropped.

    ``mixer_rule``: the ``.mixer.{k,v}_proj`` rule (``kv_remap_v2``, WU@0.5.9:1219).
    """
    if name.endswith(".kv_scale"):
        cand = name.replace(".kv_scale", ".attn.k_scale")
        if cand in params:
            return cand, None
        return cand, (
            f"Found kv_scale in the checkpoint (e.g. {name}), but not found the expected name in "
            f"the model (e.g. {cand}). kv_scale is not loaded."
        )
    for suffix in (".k_scale", ".v_scale"):
        if name.endswith(suffix):
            proj = "k_proj" if suffix == ".k_scale" else "v_proj"
            if f".self_attn.{proj}{suffix}" in name:
                cand = name.replace(f".self_attn.{proj}{suffix}", f".self_attn.attn{suffix}")
            elif mixer_rule and f".mixer.{proj}{suffix}" in name:
                cand = name.replace(f".mixer.{proj}{suffix}", f".mixer.attn{suffix}")
            else:
                cand = name.replace(suffix, f".attn{suffix}")
            if cand in params:
                return cand, None
            return cand, (
                f"Found {suffix} in the checkpoint (e.g. {name}), but not found the expected name in "
                f"the model (e.g. {cand}). {suffix} is not loaded."
            )
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
    # 1. prefix remap: a leading "backbone" (no dot needed) becomes "model", first occurrence only
    #    (0.5.3.postN: ``name.replace``, every occurrence).
    if n.startswith("backbone"):
        n = "model" + n[len("backbone") :] if profile.prefix_remap_first_only else n.replace("backbone", "model")
    # 2. substring remaps, in order, every occurrence.
    for old, new in _SUBSTR if profile.kv_remap_v2 else _SUBSTR_V1:
        if old in n:
            n = n.replace(old, new)
    # 3. MTP filters (from 0.5.8; before, ``mtp`` names go through the mapping like any other).
    if profile.mtp_pp_filters:
        if is_mtp:
            keep = "mtp" in n or (profile.mtp_whitelist_embed_head and ("embed_tokens" in n or "lm_head" in n))
            if not keep:
                return Outcome("skip", reason="mtp-filter")
            n = n.replace("mtp.layers.", "model.layers.")
        elif "mtp" in n:
            return Outcome("skip", reason="mtp-filter")
    # 4. KV-scale remap, only for names with "scale" that are not parameters (before 0.5.9: every such name).
    if "scale" in n and (n not in params or not profile.kv_remap_v2):
        remapped, warning = _kv_remap(n, params, profile.kv_remap_v2)
        if warning is not None:
            return Outcome("warn", engine_name=remapped, message=warning, reason="kv-drop")
        n = remapped
    # 5. PP layer range (main model only: the MTP predictor has no start/end layer; from 0.5.8).
    if pp is not None and profile.mtp_pp_filters:
        m = None if is_mtp else _LAYER_RE.search(n)
        if m is not None and not pp.start <= int(m.group(1)) < pp.end:
            return Outcome("skip", reason="pp-range")
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
_ONE_EXPERT = EXPERT_INDEX
_ANY_EXPERT_INDEX = re.compile(r"experts\.[0-9]+\.")
_EXPERT_BRANCH = frozenset({"expert-orphan", "keyerror"})
_UNCACHED = Outcome("uncached")


def make_replayer(
    params: frozenset[str] | set[str],
    num_experts: int,
    profile: SGLangProfile,
    *,
    is_mtp: bool = False,
    pp: PPWindow | None = None,
):
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

    split = _ONE_EXPERT.split  # [before, e, after] when the name holds exactly one ``experts.{e}.``

    def replay(name: str) -> Outcome:
        if not direct and "experts." in name:
            parts = split(name)
            if len(parts) == 3 and (e := int(parts[1])) < num_experts:
                key = (parts[0], parts[2])
                o = cache.get(key)
                if o is None:
                    o = replay_name(name, params, num_experts, profile, is_mtp=is_mtp, pp=pp)
                    expert_branch = o.expert_id is not None or o.reason in _EXPERT_BRANCH
                    cache[key] = o if expert_branch else _UNCACHED
                    return o
                if o is not _UNCACHED:
                    # Positional (o[3]: expert_id) and tuple.__new__ directly: _replace goes through _make,
                    # twice the cost on 163k names (and each field named: no slice to unpack)
                    return (
                        o
                        if o[3] is None or o[3] == e
                        else _new_outcome(Outcome, (o[0], o[1], o[2], e, o[4], o[5], o[6]))
                    )
        return replay_name(name, params, num_experts, profile, is_mtp=is_mtp, pp=pp)

    return replay


# ---------------------------------------------------------------------------
# Omni / VL wrapper routing (§11) and the MTP wrapper's pre-processing (§10)

_OMNI_V3_RENAMES = (
    ("vision_projector.mlp1.norm.", "mlp1.0."),
    ("vision_projector.mlp1.linear1.", "mlp1.1."),
    ("vision_projector.mlp1.linear2.", "mlp1.3."),
)


def route_wrapped(name: str, wrapper: str, profile: SGLangProfile, has_sound: bool, lm_has_mtp: bool) -> Route:
    """``NemotronH_Nano_VL_V2.load_weights`` routing of one checkpoint name."""
    v3 = wrapper == "NemotronH_Omni_Reasoning_V3" and profile.omni_v3_class
    if v3:
        for old, new in _OMNI_V3_RENAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        else:
            if name.startswith("vision_model.") and not name.startswith("vision_model.radio_model."):
                name = "vision_model.radio_model.hf_model." + name[len("vision_model.") :]
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
        if not lm_has_mtp or name[len(prefix) :] not in ("weight", "bias"):
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
        return name[len("language_model.") :]
    return name


# ---------------------------------------------------------------------------
# The Engine interface for one SGLang release


class SGLangEngine(msgspec.Struct, frozen=True):
    """SGLang's answers for one release row (``nhcheck.engines.base.Engine``)."""

    id: EngineId
    profile: SGLangProfile

    def build_manifest(self, cfg, qc, *, moe_backend=None, mtp=False, pp=None):
        from nhcheck.manifest import build_manifest

        return build_manifest(cfg, qc, self.profile, moe_backend=moe_backend, mtp=mtp, pp=pp, release=self.id.version)

    def _num_experts(self, cfg) -> int:
        return cfg.max_n_routed_experts if self.profile.expert_count_from_max else cfg.n_routed_experts

    def replayer(self, manifest, cfg, *, mtp: bool, pp: PPWindow | None):
        # NemotronHModel always has start/end layers (PP=1: 0 and the layer count), so a layer
        # index past the model is dropped by the range check even without pipeline parallelism.
        window = pp or PPWindow(0, cfg.num_layers)
        replay = make_replayer(manifest.inner_names, self._num_experts(cfg), self.profile, is_mtp=mtp, pp=window)
        if not mtp:
            return replay
        profile = self.profile
        return lambda name: replay(mtp_preprocess(name, profile))

    def route(self, name: str, cfg) -> Route:
        # NemotronH_Omni_Reasoning_V3 builds its vision_final_layernorm when the LM has MTP
        # (``llm_config.num_nextn_predict_layers > 0``, VL@0.5.23), whatever the MTP pattern says.
        return route_wrapped(name, cfg.wrapper, self.profile, cfg.has_sound, cfg.has_mtp)

    def replay_projector(self, name: str, manifest) -> Outcome:
        return replay_projector(name, manifest.projector_names)

    def replay_signature(self, manifest, cfg, classes, *, mtp: bool):
        """``SharesReplay``: None where the replayed names are not the checkpoint's (a wrapper routes them, the
        MTP draft rewrites them) or the manifest names experts one by one (nothing is factored)."""
        if mtp or cfg.wrapper is not None:
            return None
        if any(_ANY_EXPERT_INDEX.search(p) for p in manifest.inner_names if "experts." in p):
            return None
        replay = self.replayer(manifest, cfg, mtp=False, pp=None)
        return replay_signature(replay, classes, self._num_experts(cfg))

    def routes_before_lm(self, cfg, *, mtp: bool) -> bool:
        """A buffering VL wrapper (before ``vl_streams``) routes every other name before the LM loads."""
        return cfg.wrapper is not None and not mtp and not self.profile.vl_streams

    def routed_after_lm(self, cfg, *, mtp: bool) -> bool:
        return False

    def order_shards(self, names: list[str]) -> list[str]:
        """Index-listed shard files sorted by name (the checkpoint's own order)."""
        return sorted(names)

    def shard_order_assumption(self) -> str | None:
        return None

    def environment_alternative(self, cfg) -> None:
        """SGLang's rows depend on no dependency release the engine leaves open."""
        return None

    def load_error(self, param, shard_id: str | None, dtype: str, shape: tuple[int, ...]) -> str | None:
        """SGLang's loaders do not refuse a tensor by its shape here; ``audit`` reports the mismatch as a finding."""
        return None

    def slot_note(self, param, dtype: str, shape: tuple[int, ...]) -> str | None:
        return None

    def tp_unproven(self) -> str | None:
        return None  # tests/golden/tp: rank maps from SGLang's own loaders (oracle/sglang_tp)

    def tp_rules(self):
        from nhcheck.tp import SGLANG_RULES

        return SGLANG_RULES

    def loader_semantics(self, quant_method: str | None) -> LoaderSemantics:
        """The linear loaders of ``LINEAR_METHODS`` take a one-element scale only as 0-d
        (``PerTensorScaleParameter._load_into_shard_id``; the default loader reshapes only 0-d and asserts
        shapes); a scalar into a fused scale vector: ``scalar_fills_every_slot``."""
        from nhcheck.quant import LINEAR_METHODS

        return LoaderSemantics(
            scalar_every_slot=self.scalar_fills_every_slot(quant_method), scale_0d_only=quant_method in LINEAR_METHODS
        )

    def scalar_fills_every_slot(self, quant_method: str | None) -> bool:
        """Whether a scalar scale loaded with no shard id fills every slot of a fused merged-column parameter.

        Only a ``MergedColumnParallelLinear`` fused in the checkpoint (Mamba ``in_proj``) gets here.
        ``merged_scalar_every_slot`` releases' ``MergedColumnParallelLinear.weight_loader_v2`` fill every
        logical slot; earlier ones call ``load_merged_column_weight(shard_id=0)``: slot 0 only.
        ``ModelOptNvFp4A16LinearMethod`` is not in ``WEIGHT_LOADER_V2_SUPPORTED``, so it takes the v1
        ``MergedColumnParallelLinear.weight_loader``, whose ``adjust_scalar_to_fused_array(param, w, 0)``
        also writes slot 0 only.
        """
        from nhcheck.quant import A16_LINEAR

        return self.profile.merged_scalar_every_slot and quant_method != A16_LINEAR

    def startup_error(self, names, manifest, *, mtp: bool) -> str | None:
        """``NemotronHForCausalLMMTP.load_weights`` (§10; MTPF@0.5.23:381–414), after the stream.

        On names with one leading ``language_model.`` removed: a checkpoint with ``mtp.layers.*``,
        no ``backbone.layers.*``/``model.layers.*`` and at least one ``lm_head.*`` is a standalone
        MTP checkpoint, and it must supply every ``lm_head`` parameter (plus ``lm_head.weight``);
        ``lm_head.input_scale`` is exempt under NVFP4-A16. Otherwise the load raises ValueError.
        """
        if not (mtp and self.profile.mtp_standalone_head_check):
            return None
        from nhcheck.quant import A16_LINEAR

        has_mtp = has_target = False
        head: set[str] = set()
        for name in names:
            n = mtp_preprocess(name, self.profile)
            has_mtp = has_mtp or n.startswith("mtp.layers.")
            has_target = has_target or n.startswith(("backbone.layers.", "model.layers."))
            if n.startswith("lm_head."):
                head.add(n)
        if not (has_mtp and not has_target and head):
            return None
        expected = {p.name for p in manifest.params if p.name.startswith("lm_head.")}
        if any(p.name == "lm_head.input_scale" and p.quant_method == A16_LINEAR for p in manifest.params):
            expected.discard("lm_head.input_scale")
        missing = (expected | {"lm_head.weight"}) - head
        if missing:
            return f"ValueError: Incomplete standalone MTP lm_head: missing {sorted(missing)}"
        return None

    def pp_window(self, num_layers: int, rank: int, size: int) -> PPWindow:
        if not self.profile.mtp_pp_filters:
            raise UsageError(f"sglang {self.id.version}'s Nemotron-H has no pipeline-parallel layer ranges (0.5.8 on)")
        return pp_window(num_layers, rank, size)

    def by_design(self, reason: str) -> bool:
        return reason in BY_DESIGN_REASONS

    def reason_text(self, reason: str) -> str:
        return REASON_TEXT.get(reason, reason)

    def unloaded_kind(self, reason: str) -> UnloadedKind:
        return _UNLOADED_KIND.get(reason, "elsewhere")

    def reads_kv_scales(self, manifest) -> bool:
        # The attention's KV-cache scales exist as parameters only when the quant config quantizes the KV cache.
        return any(p.name.endswith((".attn.k_scale", ".attn.v_scale")) for p in manifest.params)

    def others(self, *, mtp: bool = False) -> tuple[SGLangEngine, ...]:
        """One engine per other behaviour epoch, named by the epoch's first release."""
        return tuple(SGLangEngine(EngineId("sglang", p.version), p) for p in EPOCHS if p is not self.profile)


def mtp_rows() -> dict[str, int]:
    """Release → its row, for the MTP draft as for the main model (a release without the draft says so itself)."""
    return {v: id(row) for v, row in PROFILES.items()}


def engine(eid: EngineId) -> SGLangEngine:
    """The engine for a release ``parse_engine_id`` accepted (a release newer than the table: the newest row)."""
    return SGLangEngine(eid, get_profile(eid))
