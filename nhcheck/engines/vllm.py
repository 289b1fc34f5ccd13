"""The vLLM NemotronH load path, replayed name by name (``oracle/vllm/EPOCHS.md``).

One algorithm; releases differ only in the flags of ``VLLMProfile``. Two loaders exist in the
releases nhcheck answers for: up to 0.25.x ``NemotronHModel.load_weights`` (the "own loop": stacked
q/k/v by substring, an expert mapping, then ``params_dict[name]`` — a ``KeyError`` for any name the
model lacks) behind ``AutoWeightsLoader``; from 0.26.0 ``AutoWeightsLoader`` alone walks the module
tree (unknown names raise ``ValueError``, stray ``.bias`` is ignored) and ``RoutedExperts.load_weights``
maps the experts. Every claim here is checked against the goldens made with each release's own code
(``tests/conformance/*/expected-vllm-*.json.gz``, ``tests/test_conformance_vllm.py``).

This module must not import torch.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from nhcheck.dtypes import numel
from nhcheck.engines.base import (
    EXPERT_INDEX,
    EngineId,
    EnvironmentAlternative,
    LoaderSemantics,
    Outcome,
    PPWindow,
    Route,
    UnloadedKind,
    default_loader_error,
    release_key,
    replay_signature,
    resolve_release,
)
from nhcheck.errors import UsageError
from nhcheck.quant import NVFP4_LINEAR

# ---------------------------------------------------------------------------
# Version table

ExpertMissing = Literal["keyerror", "attr-object", "attr-layer"]


class VLLMProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Behaviour flags of one vLLM behaviour epoch, built with keywords. Each flag cites one upstream change
    (``file:line`` of the release that introduced it, ``vllm/`` omitted; EPOCHS.md has the evidence).

    ``version`` is the release whose goldens prove the row; ``epoch`` its name in EPOCHS.md.
    """

    version: str
    epoch: str
    #: ``NemotronHModel.load_weights`` exists (own loop, ``models/nemotron_h.py``); deleted in 0.26.0, where
    #: ``AutoWeightsLoader`` walks the modules and ``hf_to_vllm_mapper`` gains ``orig_to_new_stacked`` (0.26.0 :717).
    own_loop: bool
    #: The experts module is ``RoutedExperts``: parameters ``experts.routed_experts.w13_*`` (0.24.0
    #: ``layers/fused_moe/routed_experts.py``); before, ``experts.w13_*`` on ``FusedMoE``.
    routed_experts: bool
    #: The base ``QuantizationConfig.get_cache_scale_mapper()`` maps k/v/q scale names for every quantized
    #: model before the loader, and ``AutoWeightsLoader`` ignores unexpected ``.bias`` / scale suffixes
    #: for the names it routes itself (0.25.0 ``models/utils.py:402``): ``lm_head.bias`` is skipped.
    cache_scale_mapper: bool
    #: How a quantized expert tensor without a parameter raises: ``KeyError`` from the own loop's
    #: ``params_dict``; ``AttributeError: 'RoutedExperts' object has no attribute …`` (0.26.0
    #: ``routed_experts.py:869``); ``AttributeError: Layer … has no parameter …`` (0.28.0 ``routed_experts.py:907``).
    expert_missing: ExpertMissing
    #: ``FusedMoE`` narrows an expert slot to the incoming tensor's size (0.19.0 ``FusedMoE._load_w13`` /
    #: ``_load_w2``; ``_narrow_expert_data_for_padding`` from 0.20.0): packed NVFP4 bytes go into a bigger bf16
    #: slot without an error. 0.16.0 – 0.18.x narrow the incoming tensor to the slot and raise when it is shorter
    #: (goldens ``nano3_nvfp4_experts_excluded``, ``expert_sizes/probe_expert_sizes_*``).
    expert_slot_narrows: bool
    #: ``_load_w13`` / ``_load_w2`` narrow the incoming tensor on its sharded dim to the slot's size first, so a
    #: longer tensor is cut to the slot without an error (to 0.22.x); from 0.23.0 the window is the checkpoint
    #: tensor's own extent over the TP size (``loaded_per_rank``), taken whole at TP 1, and the copy raises
    #: (goldens ``expert_sizes/probe_expert_sizes_*``).
    expert_trims_long: bool
    #: A per-tensor expert scale slot given a multi-element tensor: ``RoutedExperts._load_per_tensor_weight_scale``
    #: reshapes it to the slot (``shape '[]' is invalid …``, 0.24.0); before, ``FusedMoE`` expands it into the
    #: slot (``expand(…)``, goldens 0.20.0 – 0.23.0; 0.16.0 / 0.17.0 assumed the same: no golden has such a tensor).
    expert_scale_reshapes: bool
    #: The MoE router ``gate.weight`` is float32 (0.16.0); bfloat16 from 0.17.0 (goldens).
    router_fp32: bool
    #: A ModelOpt linear fused from several checkpoint tensors (Mamba ``in_proj``) holds one
    #: ``input_scale`` / ``weight_scale_2`` per shard (0.17.0 goldens; 0.16.0: one).
    fused_scale_per_shard: bool
    #: A one-element scale loaded with no shard id into the Mamba ``in_proj``'s per-part scale vector (the module
    #: fused in the checkpoint) fills every slot: ``MergedColumnParallelLinear.weight_loader_v2`` loops over the
    #: slots (0.20.0 ``layers/linear.py:930``). Before, it calls ``load_merged_column_weight(shard_id=0)`` (0.19.0
    #: :914, 0.11.1 :828): slot 0 only, the other slots keep what ``create_weights`` put there (goldens
    #: ``tests/golden/vllm_scalar_slots``: 0.17.0 – 0.19.0 slot 0, 0.20.0 / 0.34.0 every slot; the TP-1 rank maps of
    #: 0.11.2 – 0.15.1 and 0.17.0 – 0.19.0 leave slots 1 – 4 untouched). True where the
    #: ``in_proj`` has one slot: 0.16.0 (one ``ColumnParallelLinear``, 0.16.0 ``layers/mamba/mamba_mixer2.py:317``)
    #: and 0.10.x (unmerged).
    merged_scalar_every_slot: bool
    #: ``NemotronH_Nano_Omni_Reasoning_V3`` / VL V3 architectures are registered (0.20.0 ``models/registry.py:484``).
    omni_registered: bool
    #: The VL wrapper streams the language model first and loads ``mlp1`` and the towers after it
    #: (0.22.0 ``models/nano_nemotron_vl.py:1531``); before, ``mlp1`` loads at its place in the stream.
    vl_lm_first: bool
    #: The config normaliser accepts ModelOpt ``MIXED_PRECISION`` in ``hf_quant_config.json``'s export
    #: form (0.33.0 ``transformers_utils/model_arch_config_convertor.py:267``); before: ``Unknown ModelOpt
    #: quant algo: MIXED_PRECISION``. The flat config.json form builds ``modelopt_mixed`` throughout.
    nested_mixed_accepted: bool
    #: A ModelOpt ``MIXED_PRECISION`` recipe in config.json's flat form builds ``modelopt_mixed``
    #: (``ModelOptMixedPrecisionConfig``, 0.17.0 ``layers/quantization/modelopt.py:1707``); 0.16.0 refuses it
    #: (``ModelOpt currently only supports: [...]``, goldens ``startup_mixed_cfg_text``).
    flat_mixed_accepted: bool
    #: Manifest wording only: the ModelOpt linear method's class name (``ModelOptLinearMethod`` from 0.30.0).
    linear_method_name: str
    #: … the KV-cache method's (``ModelOptKVCacheMethod`` from 0.21.0).
    kv_method_name: str
    #: The attention's KV-cache scales are ``KVCacheScaleParameter`` (0.23.0 ``layers/quantization/kv_cache.py:18``),
    #: whose own ``weight_loader`` (:33) accepts one element and raises ``ValueError: KV-cache scale expects a
    #: scalar weight, got shape …`` for anything else; before, plain parameters that ``default_weight_loader``
    #: fills, whose size assertion raises instead (goldens ``sglang_probe_kv_scale_shape``: 0.22.0 / 0.23.0).
    kv_scale_scalar_loader: bool
    #: … an unexcluded-but-unquantized ``lm_head``'s method under a ModelOpt config
    #: (0.23.0: ``UnquantizedLinearMethod``).
    quantized_lm_head_method: str
    #: ModelOpt's configs give ``ParallelLMHead`` a quant method (0.23.0 ``layers/quantization/modelopt.py:186``,
    #: ``isinstance(layer, (LinearBase, ParallelLMHead))``); before, ``LinearBase`` layers only, so an lm_head the
    #: recipe does not exclude stays bf16 and a quantized one's scales have no parameter (goldens
    #: ``dense_probes/probe_lmhead_{fp8,nvfp4}[_bf16]``: 0.10.0 – 0.22.0 bf16, 0.23.0 – 0.34.0 quantized; rank
    #: maps ``tests/golden/tp/vllm-0.9.2/v1-fp8-nested-*``: 0.9.x's ``ModelOptFp8Config`` reads no exclude list).
    modelopt_lm_head: bool
    #: ``AutoWeightsLoader``'s "no module or parameter" error lists the module's parameters with a dot after
    #: the prefix (``maybe_prefix``, 0.17.0 ``models/utils.py:315``); 0.16.0 glued them (``lm_headweight``).
    param_keys_dotted: bool
    #: The strict "weights not initialized" check (unquantized models) exempts every parameter of a module
    #: whose quant method post-processes its weights — linears, embeddings (0.21.0
    #: ``model_loader/default_loader.py`` ``track_weights_loading``); before, every parameter must be reached.
    strict_exempts_postprocess: bool
    #: The VL wrapper builds ``vision_final_layernorm`` for MTP-trained checkpoints and loads
    #: ``vision_projector.vision_final_layernorm.*`` (0.32.0 ``models/nano_nemotron_vl.py:1005``); before,
    #: such names are routed nowhere.
    vision_final_norm: bool
    #: Shard files are read in natural-sort order (``_natural_sort_key``, 0.16.0 ``model_loader/weight_utils.py``);
    #: before, in ``glob`` order (0.14.0 ``model_loader/default_loader.py:152``, never sorted): the file system's
    #: order, which nhcheck cannot know — it assumes name order and says so where the first crash depends on it.
    natural_shard_order: bool
    #: Nemotron-H's MoE is non-gated (relu²); ModelOpt NVFP4 experts then need FlashInfer's CUTLASS MoE backend,
    #: which vLLM picks only with ``VLLM_USE_FLASHINFER_MOE_FP4=1`` on a Blackwell GPU (0.14.0
    #: ``layers/quantization/modelopt.py:1340`` ``ModelOptNvFp4FusedMoE.__init__``; the environment variable
    #: defaults to 0, ``envs.py:1234``): in the default environment the model build raises ``NotImplementedError``.
    nvfp4_moe_needs_flashinfer: bool
    #: ``FusedMoE.__init__`` accepts ModelOpt NVFP4 experts for a non-gated MoE such as Nemotron-H's (0.12.0
    #: ``layers/fused_moe/layer.py:608``); before, only unquantized or ModelOpt FP8 experts: an NVFP4 MoE raises
    #: ``NotImplementedError: is_act_and_mul=False is supported only for unquantized and ModelOpt FP8 moe for now``
    #: at model build (0.11.1 ``layers/fused_moe/layer.py:571``; goldens ``nano3_nvfp4``, 0.11.2).
    nvfp4_moe_non_gated: bool
    #: ``maybe_remap_kv_scale_name`` remaps ``.q_scale`` and ``.{q,k,v}_zero_point`` too, and the own loop sends
    #: ``zero_point`` names to it (0.15.0 ``model_loader/weight_utils.py:1177``, ``models/nemotron_h.py:666``);
    #: before, only ``.k_scale`` / ``.v_scale``: a ``q_proj.q_scale`` goes on to the stacked mapping and raises
    #: ``KeyError`` (probe ``probe_nano3_bf16``, 0.14.0).
    q_scale_remap: bool
    #: ``maybe_remap_kv_scale_name`` knows Nemotron-H's ``mixer.{k,v}_proj.{k,v}_scale`` (0.14.0
    #: ``model_loader/weight_utils.py:1158``): ModelOpt FP8 KV scales load into ``mixer.attn.{k,v}_scale``; before,
    #: the generic pattern makes ``mixer.k_proj.attn.k_scale``, no parameter: warned and dropped.
    mixer_kv_remap: bool
    #: ``NemotronHAttention`` hands the quant config to its ``Attention`` (0.14.1 ``models/nemotron_h.py:486``): under a
    #: ModelOpt config the attention has ``q_scale`` / ``k_scale`` / ``v_scale`` / ``prob_scale``; before, none (goldens
    #: ``nano3_nvfp4`` 0.13.0), so checkpoint KV scales have no target.
    attn_quant_scales: bool
    #: ``AutoWeightsLoader``'s "no module or parameter" error lists the module's parameters (0.16.0
    #: ``models/utils.py``); 0.14.0 ``models/utils.py:316`` names only the prefix and the outer class.
    lists_params: bool
    #: ``NemotronHForCausalLM.load_weights`` builds ``AutoWeightsLoader(self, skip_prefixes=["mtp"])`` (0.13.0
    #: ``models/nemotron_h.py:899``): top-level ``mtp.*`` tensors are dropped silently; before (0.12.0 :849), ``mtp``
    #: is no child of the model: ``ValueError: There is no module or parameter named 'mtp' in NemotronHForCausalLM``
    #: (goldens ``probes/probe_nano3_bf16``, 0.12.0).
    top_mtp_skipped: bool
    #: ``NemotronHMoE`` reads ``moe_latent_size`` (0.13.0 ``models/nemotron_h.py:139``): ``fc1_latent_proj`` /
    #: ``fc2_latent_proj`` and experts of the latent width; before, the config key is not read — experts of
    #: ``hidden_size`` and no latent projections (read from 0.12.0's code; no conformance checkpoint has a latent MoE).
    latent_moe: bool
    #: The layers read ``config.layer_norm_epsilon`` (0.11.1 ``models/nemotron_h.py:277``); before,
    #: ``config.rms_norm_eps`` (0.10.2 :130, :171, :179, :295), which Nemotron 3 configs do not carry: ``AttributeError:
    #: 'NemotronHConfig' object has no attribute 'rms_norm_eps'`` while the first layer is built (goldens 0.10.2 on
    #: every Nemotron 3 case).
    reads_layer_norm_epsilon: bool
    #: ``E`` layers build ``NemotronHMoE`` (0.11.1 ``models/nemotron_h.py``); before, ``ALL_DECODER_LAYER_TYPES`` knows
    #: ``M``, ``-`` and ``*`` only (0.10.2 :314, :347): ``KeyError: 'E'`` while that layer is built.
    moe_layers: bool
    #: The Mamba ``in_proj`` is a ``MergedColumnParallelLinear`` of its five parts (0.11.0
    #: ``layers/mamba/mamba_mixer2.py:302``): a quantized one holds one scale per part; before, one
    #: ``ColumnParallelLinear`` (0.10.2 :302) with one scale (read; every quantized golden checkpoint is Nemotron 3,
    #: which 0.10.2 refuses earlier).
    mamba_in_proj_merged: bool
    #: ``NemotronHForCausalLM`` has ``hf_to_vllm_mapper`` and ``NemotronHModel.load_weights`` sends scale names to
    #: ``maybe_remap_kv_scale_name`` and skips a stacked ``.bias`` without a parameter (0.10.2
    #: ``models/nemotron_h.py:440``, :452, :473); before, ``load_weights`` renames every ``backbone`` in a name
    #: (0.10.1.1 :629) and the own loop neither remaps scales nor skips biases: ``mixer.k_proj.k_scale`` or
    #: ``mixer.q_proj.bias`` raises ``KeyError`` (read from 0.10.1.1 :438 – :467).
    weights_mapper: bool
    #: ``NemotronH_Nano_VL_V2`` is a registered architecture (0.11.0 ``models/registry.py:235``); 0.10.2 registers
    #: ``NemotronH_Nano_VL`` instead (:228), so a VL V2 checkpoint is refused as an unsupported architecture.
    vl_v2_registered: bool
    #: The layers size themselves from ``hidden_size`` (0.10.0 ``models/nemotron_h.py``): attention ``head_dim =
    #: hidden_size // num_attention_heads`` (:207), Mamba width ``expand * hidden_size`` (:148), the MLP the whole
    #: ``config.intermediate_size`` (:73, a list fails ``ColumnParallelLinear``'s ``divide()``); and Mamba's
    #: ``conv1d`` / unquantized ``in_proj`` go through ``mamba_v2_sharded_weight_loader`` part by part (modelled
    #: here only). From 0.10.1: ``config.head_dim``, ``mamba_num_heads * mamba_head_dim``, one entry of a per-MLP
    #: list. Goldens ``dense_probes/probe_h8b_dense_geometry_{wide,narrow}``, ``probe_h8b_dense_mlp_list`` (0.10.0).
    sizes_from_hidden: bool
    #: The config normaliser reads ModelOpt's ``hf_quant_config.json`` (0.10.1 ``config/``); before, only
    #: config.json's ``quantization_config`` (0.10.0 ``config.py:992``, ``model_loader/weight_utils.py:159``): a
    #: checkpoint quantized in that file alone is built unquantized unless ``--quantization modelopt`` is passed
    #: (golden ``dense_probes/probe_h8b_dense_hfq_fp8``, 0.10.0; ``startup_mixed_hfq_only`` is not refused for
    #: MIXED_PRECISION there).
    reads_hf_quant_config: bool
    #: ModelOpt's config classes take config.json's flat ``quantization_config`` (``quant_algo`` at the top, 0.10.0
    #: ``layers/quantization/modelopt.py:125``); before, ``from_config`` reads
    #: ``get_from_keys(config, ["quantization"])`` first (0.9.2 :70, :213): ``ValueError: Cannot find any of
    #: ['quantization'] in the model's quantization config.`` at start-up (goldens ``startup_mixed_cfg_text``,
    #: ``startup_mixed_no_nvfp4``, 0.9.2).
    modelopt_flat_form: bool
    #: ``QUANT_ALGOS``, quoted by the refusal of a flat MIXED_PRECISION recipe (``MXFP8`` from 0.16.0).
    modelopt_algos: tuple[str, ...]
    #: The config is transformers' own ``NemotronHConfig`` (transformers 5, a strict dataclass), which refuses a
    #: list ``intermediate_size`` at start-up (``StrictDataclassFieldValidationError``; goldens
    #: ``dense_probes/probe_h8b_dense_mlp_list``, 0.19.1, 0.20.0 and 0.34.0 with transformers 5.22.2). True from
    #: 0.19.1, the first release whose requirement admits transformers 5 (``pip install vllm==0.19.1`` resolves
    #: 5.x; vLLM registers no ``nemotron_h`` config of its own, so transformers' class is the one used). Before,
    #: transformers 4.x has no ``nemotron_h`` class: the checkpoint's configuration code (``--trust-remote-code``;
    #: vLLM's copy of it in the goldens) takes the list (0.16.0, 0.19.0 goldens) — and so it does on 0.19.1 –
    #: 0.23.x installed with transformers 4.x (``transformers4_allowed``, goldens ``expected-transformers4-*``).
    transformers_config: bool
    #: vLLM's requirement admits transformers 4.x as well as 5.x: ``transformers!=5.0.*,…,!=5.5.0,>=4.56.0`` in the
    #: wheel's METADATA from 0.19.1 to 0.23.x (0.11.1 – 0.19.0: ``<5``; 0.24.0: ``>=5.5.3``). nhcheck answers for
    #: transformers 5 (what pip resolves); where the newest transformers 4.x the release allows (4.57.6) answers
    #: otherwise, the audit says so (``VLLMEngine.environment_alternative``; goldens
    #: ``expected-transformers4-vllm-0.20.0``: only the list ``intermediate_size`` differs).
    transformers4_allowed: bool
    #: The release is the newest nhcheck's table knows (``--engine vllm`` means it).
    newest: bool = False


#: V5: 0.16.0 (goldens on the conformance cases). Own loop; ModelOpt FP8 KV scales load
#: (``weight_utils.py:1158``, 0.14.0); shard files read in natural-sort order (0.16.0).
_V5 = VLLMProfile(
    version="0.16.0",
    epoch="V5",
    own_loop=True,
    routed_experts=False,
    cache_scale_mapper=False,
    expert_missing="keyerror",
    expert_slot_narrows=False,
    expert_trims_long=True,
    expert_scale_reshapes=False,
    router_fp32=True,
    fused_scale_per_shard=False,
    merged_scalar_every_slot=True,
    omni_registered=False,
    vl_lm_first=False,
    nested_mixed_accepted=False,
    linear_method_name=NVFP4_LINEAR,
    kv_method_name="ModelOptFp8KVCacheMethod",
    kv_scale_scalar_loader=False,
    quantized_lm_head_method="UnquantizedEmbeddingMethod",
    modelopt_lm_head=False,
    param_keys_dotted=False,
    flat_mixed_accepted=False,
    strict_exempts_postprocess=False,
    vision_final_norm=False,
    natural_shard_order=True,
    transformers_config=False,
    transformers4_allowed=False,
    nvfp4_moe_needs_flashinfer=False,
    q_scale_remap=True,
    lists_params=True,
    mixer_kv_remap=True,
    attn_quant_scales=True,
    top_mtp_skipped=True,
    latent_moe=True,
    nvfp4_moe_non_gated=True,
    reads_layer_norm_epsilon=True,
    moe_layers=True,
    vl_v2_registered=True,
    mamba_in_proj_merged=True,
    weights_mapper=True,
    sizes_from_hidden=False,
    reads_hf_quant_config=True,
    modelopt_flat_form=True,
    modelopt_algos=("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "MXFP8"),
)
#: V5a: 0.14.0 — as 0.16.0 on every bf16 case and probe, but shards in glob order, ModelOpt NVFP4 experts
#: refused without ``VLLM_USE_FLASHINFER_MOE_FP4=1``, no MXFP8 in ``QUANT_ALGOS``, one NVFP4 scale per fused
#: shard (``ModelOptNvFp4LinearMethod.create_weights``: ``len(output_partition_sizes)``, 0.13.0 – 0.15.1;
#: goldens 0.13.0, 0.15.1).
_V5a = msgspec.structs.replace(
    _V5,
    version="0.14.0",
    epoch="V5a",
    natural_shard_order=False,
    nvfp4_moe_needs_flashinfer=True,
    q_scale_remap=False,
    lists_params=False,
    modelopt_algos=("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4"),
    fused_scale_per_shard=True,
    merged_scalar_every_slot=False,
)
#: V4: 0.13.0 — as 0.14.0 without the NemotronH k/v-scale pattern (``mixer.k_proj.k_scale`` is warned and
#: dropped), without attention scale parameters, and NVFP4 experts build (the non-gated check came with 0.14.0);
#: ``QUANT_ALGOS`` is ``['FP8', 'NVFP4']``.
_V4 = msgspec.structs.replace(
    _V5a,
    version="0.13.0",
    epoch="V4",
    mixer_kv_remap=False,
    nvfp4_moe_needs_flashinfer=False,
    attn_quant_scales=False,
    modelopt_algos=("FP8", "NVFP4"),
)
#: V3: 0.12.0 — as 0.13.0 but ``AutoWeightsLoader(self)`` without ``skip_prefixes=["mtp"]`` (0.12.0
#: ``models/nemotron_h.py:849``): a top-level ``mtp.*`` tensor raises ``ValueError`` (probe ``probe_nano3_bf16``);
#: ``NemotronHMoE`` has no latent projections (``moe_latent_size`` is read from 0.13.0).
_V3 = msgspec.structs.replace(_V4, version="0.12.0", epoch="V3", top_mtp_skipped=False, latent_moe=False)
#: V3a: 0.11.1, 0.11.2 — as 0.12.0, but ``FusedMoE`` refuses ModelOpt NVFP4 experts for the non-gated MoE at model
#: build (``layers/fused_moe/layer.py:571``; 0.12.0 :608 adds ``ModelOptNvFp4FusedMoE``): every NVFP4-MoE checkpoint
#: is refused at start-up (goldens 0.11.2). 0.11.1's loading path is 0.11.2's (``oracle/vllm/compare_code.py``:
#: identical).
_V3a = msgspec.structs.replace(_V3, version="0.11.2", epoch="V3a", nvfp4_moe_non_gated=False)
#: V2: 0.10.2 — as 0.11.2 (same own loop without an expert mapping, ``WeightsMapper``), but the layers read
#: ``rms_norm_eps`` and there are no ``E`` layers: every Nemotron 3 checkpoint is refused while the model is built
#: (goldens 0.10.2); the VL wrapper registered is ``NemotronH_Nano_VL``, not ``…_V2``; the Mamba ``in_proj`` is one
#: linear (one scale when quantized).
_V2 = msgspec.structs.replace(
    _V3a,
    version="0.10.2",
    epoch="V2",
    reads_layer_norm_epsilon=False,
    moe_layers=False,
    vl_v2_registered=False,
    mamba_in_proj_merged=False,
    merged_scalar_every_slot=True,
)
#: V1: 0.10.1, 0.10.1.1 — as 0.10.2, but no ``hf_to_vllm_mapper``: ``load_weights`` replaces every ``backbone``
#: in a name (0.10.1.1 ``models/nemotron_h.py:629``) and the own loop neither remaps KV-cache scales nor skips a
#: stacked ``.bias`` (:438 – :467); no NemotronH VL wrapper. Goldens 0.10.1.1; 0.10.1 is identical
#: (``oracle/vllm/compare_code.py``).
_V1 = msgspec.structs.replace(_V2, version="0.10.1.1", epoch="V1", weights_mapper=False)
#: V1b: 0.10.0 — V1's loading loop, but the layers size themselves from ``hidden_size`` (``sizes_from_hidden``)
#: and hf_quant_config.json is not read (``reads_hf_quant_config``). Goldens 0.10.0 (every case, probe, start-up
#: variant and example, and the ``dense_probes`` that split it from V1).
_V1b = msgspec.structs.replace(_V1, version="0.10.0", epoch="V1b", sizes_from_hidden=True, reads_hf_quant_config=False)
#: V1a: 0.9.1, 0.9.2 — as 0.10.0, but ModelOpt reads only the nested ``quantization`` section: config.json's flat
#: ``quantization_config`` is refused at start-up (``modelopt_flat_form``). Goldens 0.9.2 and 0.9.1 (the same answers
#: on every case, probe, start-up variant and example).
_V1a = msgspec.structs.replace(_V1b, version="0.9.2", epoch="V1a", modelopt_flat_form=False)
#: V2b: 0.11.0 — as 0.10.2 on every golden case (Nemotron 3 refused for ``rms_norm_eps``; h8b_dense identical), with the
#: VL V2 wrapper registered (``models/registry.py:235``) and the Mamba ``in_proj`` merged (``mamba_mixer2.py:302``);
#: its unquantized linears take the v2 weight loaders (``layers/linear.py`` ``UnquantizedLinearMethod.create_weights``),
#: which change no outcome on these checkpoints.
_V2b = msgspec.structs.replace(
    _V2,
    version="0.11.0",
    epoch="V2b",
    vl_v2_registered=True,
    mamba_in_proj_merged=True,
    merged_scalar_every_slot=False,
)
#: V5b: 0.15.0 — ``q_scale`` / zero points remapped (``weight_utils.py:1177``); AutoWeightsLoader's error lists the
#: module's parameters; the NVFP4 MoE backend is chosen among every available one (``fused_moe/oracle/nvfp4.py``
#: ``select_nvfp4_moe_backend``, FlashInfer's included without the variable): the model builds; one scale per fused
#: shard as before (0.16.0 has one).
_V5b = msgspec.structs.replace(
    _V5a,
    version="0.15.1",
    epoch="V5b",
    nvfp4_moe_needs_flashinfer=False,
    q_scale_remap=True,
    lists_params=True,
)
#: V6: 0.17.0 — own loop skips ``mtp.`` names (``models/nemotron_h.py:711``); router in the model dtype;
#: one scale per fused shard.
_V6 = msgspec.structs.replace(
    _V5,
    version="0.17.0",
    epoch="V6",
    router_fp32=False,
    fused_scale_per_shard=True,
    merged_scalar_every_slot=False,
    param_keys_dotted=True,
    flat_mixed_accepted=True,
)
#: V6b: 0.19.0 — expert slots narrowed to the incoming size (silent garbage for packed bytes in an
#: unquantized expert).
_V6b = msgspec.structs.replace(_V6, version="0.19.0", expert_slot_narrows=True)
#: V6c: 0.19.1 — 0.19.0's loading code (``oracle/vllm/compare_code.py``: identical), but its requirement admits
#: transformers 5, whose strict ``NemotronHConfig`` is the config (goldens 0.19.1: a list ``intermediate_size`` is
#: refused at start-up, 0.19.0 takes it; every other case and probe as 0.19.0).
_V6c = msgspec.structs.replace(
    _V6b, version="0.19.1", epoch="V6c", transformers_config=True, transformers4_allowed=True
)
#: V7: 0.20.0 — Omni/VL V3 registered; the VL wrapper buffers the language model (``mlp1`` loads first).
_V7 = msgspec.structs.replace(_V6c, version="0.20.0", epoch="V7", omni_registered=True, merged_scalar_every_slot=True)
#: V7b: 0.21.0 — the strict check exempts post-processed modules' parameters; KV method renamed.
_V7b = msgspec.structs.replace(
    _V7, version="0.21.0", strict_exempts_postprocess=True, kv_method_name="ModelOptKVCacheMethod"
)
#: V8: 0.22.0 — the VL wrapper streams the LM first (``nano_nemotron_vl.py:1531``).
_V8 = msgspec.structs.replace(_V7b, version="0.22.0", epoch="V8", vl_lm_first=True)
#: V8 (0.23.0): KV-cache scales get their own scalar-only loader (``ValueError`` where the size assertion was);
#: an unexcluded-but-unquantized ``lm_head`` is reported with ``UnquantizedLinearMethod`` (wording); ModelOpt's configs
#: quantize an ``lm_head`` they do not exclude (``modelopt_lm_head``).
_V8b = msgspec.structs.replace(
    _V8,
    version="0.23.0",
    kv_scale_scalar_loader=True,
    quantized_lm_head_method="UnquantizedLinearMethod",
    modelopt_lm_head=True,
    expert_trims_long=False,
)
#: V9: 0.24.0 — ``RoutedExperts`` (``experts.routed_experts.*``), which reshapes per-tensor expert scales; requires
#: transformers >= 5.5.3 (no transformers 4.x beside it).
_V9 = msgspec.structs.replace(
    _V8b, version="0.24.0", epoch="V9", routed_experts=True, expert_scale_reshapes=True, transformers4_allowed=False
)
#: V9b: 0.25.0 — base cache-scale mapper and ignored unexpected suffixes in ``AutoWeightsLoader``.
_V9b = msgspec.structs.replace(_V9, version="0.25.1", epoch="V9b", cache_scale_mapper=True)
#: V10 (V10a): 0.26.0 — own loop deleted: ``AutoWeightsLoader`` + ``RoutedExperts.load_weights``.
_V10 = msgspec.structs.replace(_V9b, version="0.26.0", epoch="V10", own_loop=False, expert_missing="attr-object")
#: V10b: 0.28.0 — the missing-expert-parameter ``AttributeError`` names the layer and the checkpoint weight.
_V10b = msgspec.structs.replace(_V10, version="0.28.0", expert_missing="attr-layer")
#: V10c: 0.30.0 — ModelOpt linear methods unified (``ModelOptLinearMethod``; manifest wording).
_V10c = msgspec.structs.replace(_V10b, version="0.30.0", linear_method_name="ModelOptLinearMethod")
#: V11: 0.33.0 — the normaliser accepts nested ModelOpt MIXED_PRECISION: Omni NVFP4 checkpoints start.
#: V10d: 0.32.0 — the VL wrapper's ``vision_final_layernorm`` (MTP-trained checkpoints).
_V10d = msgspec.structs.replace(_V10c, version="0.32.0", vision_final_norm=True)
_V11 = msgspec.structs.replace(_V10d, version="0.33.0", epoch="V11", nested_mixed_accepted=True, newest=True)

#: Every release nhcheck answers for → its behaviour row; a row's ``version`` is the release its goldens
#: were made with, the other releases of the row have the same loading code (EPOCHS.md: hashes of every
#: loading-path function, release to release).
PROFILES: dict[str, VLLMProfile] = {
    "0.9.1": _V1a,
    "0.9.2": _V1a,
    "0.10.0": _V1b,
    "0.10.1": _V1,
    "0.10.1.1": _V1,
    "0.10.2": _V2,
    "0.11.0": _V2b,
    "0.11.1": _V3a,
    "0.11.2": _V3a,
    "0.12.0": _V3,
    "0.13.0": _V4,
    "0.14.0": _V5a,
    "0.14.1": _V5a,
    "0.15.0": _V5b,
    "0.15.1": _V5b,
    "0.16.0": _V5,
    "0.17.0": _V6,
    "0.17.1": _V6,
    "0.18.0": _V6,
    "0.18.1": _V6,
    "0.19.0": _V6b,
    "0.19.1": _V6c,
    "0.20.0": _V7,
    "0.20.1": _V7,
    "0.20.2": _V7,
    "0.21.0": _V7b,
    "0.22.0": _V8,
    "0.22.1": _V8,
    "0.23.0": _V8b,
    "0.24.0": _V9,
    "0.25.0": _V9b,
    "0.25.1": _V9b,
    "0.26.0": _V10,
    "0.27.0": _V10,
    "0.27.1": _V10,
    "0.28.0": _V10b,
    "0.29.0": _V10b,
    "0.30.0": _V10c,
    "0.31.0": _V10c,
    "0.32.0": _V10d,
    "0.33.0": _V11,
    "0.34.0": _V11,
}
NEWEST = "0.34.0"
#: The behaviour rows, oldest first.
EPOCHS: tuple[VLLMProfile, ...] = tuple(dict.fromkeys(PROFILES.values()))

#: Every release on the package index that ships ``vllm/model_executor/models/nemotron_h.py``, oldest first
#: (``oracle/vllm/EPOCHS.md``, read from each release's wheel).
RELEASES_WITH_NEMOTRON_H = (
    "0.9.1", "0.9.2", "0.10.0", "0.10.1", "0.10.1.1", "0.10.2", "0.11.0", "0.11.1", "0.11.2", "0.12.0",
    "0.13.0", "0.14.0", "0.14.1", "0.15.0", "0.15.1", "0.16.0", "0.17.0", "0.17.1", "0.18.0", "0.18.1",
    "0.19.0", "0.19.1", "0.20.0", "0.20.1", "0.20.2", "0.21.0", "0.22.0", "0.22.1", "0.23.0", "0.24.0",
    "0.25.0", "0.25.1", "0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0",
    "0.33.0", "0.34.0",
)  # fmt: skip


def get_profile(spec: str | EngineId | None) -> VLLMProfile:
    """The behaviour row of a vLLM release (a release newer than the table: the newest row)."""
    eid = spec if isinstance(spec, EngineId) else parse_engine_id(spec)
    return PROFILES.get(eid.version) or PROFILES[NEWEST]


def parse_engine_id(spec: str | None) -> EngineId:
    """Parse ``vllm@X`` (``engines.base.resolve_release``): every release with ``nemotron_h.py`` has a row (all are
    proven by goldens, EPOCHS.md); any other release is a usage error."""
    return resolve_release("vllm", spec, tuple(PROFILES), NEWEST, RELEASES_WITH_NEMOTRON_H)


# ---------------------------------------------------------------------------
# Name mapping: hf_to_vllm_mapper, the cache-scale mapper, the own loop, AutoWeightsLoader

#: What each replay branch does, in words (findings and report rows share them).
REASON_TEXT = {
    "keyerror": "KeyError: no such parameter (the own loop's params_dict)",
    "valueerror": "ValueError: no module or parameter of that name",
    "expert-missing": "AttributeError: the experts module has no such parameter",
    "fused-missing": "AttributeError: the fused linear has no such parameter",
    "expert-orphan": "dropped silently: expert id outside the experts module",
    "kv-drop": "KV-scale remap found no target: warned, dropped",
    "ignored": "dropped silently: an unexpected .bias / scale suffix AutoWeightsLoader ignores",
    "mapper-drop": "dropped silently by hf_to_vllm_mapper (rotary buffers)",
    "mtp-filter": "by design: MTP block (vLLM loads it only into the MTP draft)",
    "wrapper-mtp": "by design: MTP block (the VL wrapper does not forward it)",
    "wrapper-ignored": "dropped silently: the VL wrapper routes it nowhere",
    "wrapper-raise": "the VL wrapper raises on it",
    "routed": "by design: a tower or the projector loads it",
    "loader": "the parameter's weight loader raises on this tensor's shape",
    "not-built": "not read: start-up refused the checkpoint before load_weights",
    "mtp-no-param": "dropped silently: the MTP draft's load_weights has no parameter of that name",
    "rotary-skip": "dropped silently: a rotary buffer (computed, not loaded)",
    "load": "loaded",
}
BY_DESIGN_REASONS = frozenset({"mtp-filter", "wrapper-mtp", "routed", "pp-range", "pp-rank"})
#: Prune's reading of the replay branches (``Engine.unloaded_kind``): the loader has no parameter for the
#: name (dropped, warned or raised); a KV-scale remap miss; a layer past the model. ``loader`` (the
#: parameter exists, its weight loader refuses the shape) and every other branch are "elsewhere".
_UNLOADED_KIND: dict[str, UnloadedKind] = {
    "keyerror": "by-name",
    "valueerror": "by-name",
    "expert-missing": "by-name",
    "fused-missing": "by-name",
    "expert-orphan": "by-name",
    "ignored": "by-name",
    "mtp-no-param": "by-name",
    "kv-drop": "kv-scale",
    "pp-range": "past-model",
}

_CACHE_SCALE_RULES = (
    (re.compile(r"\.kv_scale$"), ".attn.k_scale"),
    (re.compile(r"\.mixer\.[kv]_proj\.([kv])_scale$"), r".mixer.attn.\1_scale"),
    (re.compile(r"(?<!\.attn)\.([qkv])_scale$"), r".attn.\1_scale"),
)
_ROTARY = ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_STACKED_SUBSTR = ((".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"))
_OWN_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))
# FusedMoE.make_expert_params_mapping(gate="up_proj", down="down_proj", up=""): per expert e the
# substrings "experts.{e}.up_proj." (w1 → w13_), "experts.{e}.down_proj." (w2 → w2_), "experts.{e}.." (w3).
EXPERT_RE = re.compile(r"experts\.(0|[1-9][0-9]*)\.(up_proj|down_proj|)\.")
EXPERT_SHARD = {"up_proj": ("w1", "w13_", 0), "down_proj": ("w2", "w2_", 1), "": ("w3", "w13_", 2)}


def map_name(name: str, profile: VLLMProfile, quantized: bool) -> tuple[str | None, str | None]:
    """``hf_to_vllm_mapper`` (| the cache-scale mapper | the rotary-buffer mapper): (mapped name or None, shard)."""
    key = name
    if quantized and profile.cache_scale_mapper:
        for rx, new in _CACHE_SCALE_RULES:
            if rx.search(key):
                key = rx.sub(new, key)
    for old, new in (("A_log", "A"), ("embeddings", "embed_tokens")):
        if old in key:
            key = key.replace(old, new, 1)
    for old in _ROTARY:
        if old in key:
            return None, None
    shard = None
    if not profile.own_loop:
        for old, new, sid in _STACKED_SUBSTR:
            if old in key:
                key = key.replace(old, new, 1)
                shard = sid
    if not profile.weights_mapper:  # 0.10.1.1 ``name.replace("backbone", "model")``
        key = key.replace("backbone", "model")
    elif key.startswith("backbone"):
        key = "model" + key[len("backbone") :]
    if key.startswith("mtp") and profile.top_mtp_skipped:
        return None, None
    return key, shard


def kv_remap(name: str, params: frozenset[str] | set[str], profile: VLLMProfile) -> tuple[str | None, str | None]:
    """``maybe_remap_kv_scale_name`` (``model_loader/weight_utils.py``): (name, None) or (None, warning)."""
    if name in params:
        return name, None
    if name.endswith(".kv_scale"):
        cand = name.replace(".kv_scale", ".attn.k_scale")
        if cand in params:
            return cand, None
        # Two warnings; the first, logged for every kv_scale, is the one a log shows next to the tensor.
        return None, (
            "DEPRECATED. Found kv_scale in the checkpoint. This format is deprecated in favor of separate k_scale "
            "and v_scale tensors and will be removed in a future release. Functionally, we will remap kv_scale to "
            "k_scale and duplicate k_scale to v_scale"
        )
    suffixes: tuple[str, ...] = (".k_scale", ".v_scale")
    if profile.q_scale_remap:
        suffixes += (".q_scale", ".k_zero_point", ".v_zero_point", ".q_zero_point")
    if not name.endswith(suffixes):
        return name, None
    rules = [(r"\.self_attn\.([kv])_proj\.([kv])_scale$", r".self_attn.attn.\2_scale")]
    if profile.mixer_kv_remap:
        rules.append((r"\.mixer\.[kv]_proj\.([kv])_scale$", r".mixer.attn.\1_scale"))
    rules += [(r"\.([qkv])_scale$", r".attn.\1_scale"), (r"\.([qkv])_zero_point$", r".attn.\1_zero_point")]
    for rx, new in rules:
        if re.search(rx, name):
            cand = re.sub(rx, new, name)
            if cand in params:
                return cand, None
            kind = name.rsplit(".", 1)[-1]
            return None, (
                f"Found {kind} in the checkpoint (e.g. {name}), but not found the expected name in the model "
                f"(e.g. {cand}). {kind} is not loaded."
            )
    return name, None


_LINEAR_CLASS = {
    "in_proj": "MergedColumnParallelLinear",
    "qkv_proj": "QKVParallelLinear",
    "out_proj": "RowParallelLinear",
    "o_proj": "RowParallelLinear",
    "down_proj": "RowParallelLinear",
    "up_proj": "ColumnParallelLinear",
    "fc1_latent_proj": "ReplicatedLinear",
    "fc2_latent_proj": "ReplicatedLinear",
    "gate": "ReplicatedLinear",
    "conv1d": "ColumnParallelLinear",
    "lm_head": "ParallelLMHead",
    "embed_tokens": "VocabParallelEmbedding",
    "eh_proj": "ColumnParallelLinear",
}
_FUSED = frozenset({"MergedColumnParallelLinear", "QKVParallelLinear"})


#: The mixer class of each Nemotron-H layer type, told apart by a parameter only that type has.
_MIXERS = (
    (".mixer.A", "MambaMixer2", "NemotronHMambaDecoderLayer"),
    (".mixer.qkv_proj.", "NemotronHAttention", "NemotronHAttentionDecoderLayer"),
    (".mixer.gate.", "NemotronHMoE", "NemotronHMoEDecoderLayer"),
    (".mixer.up_proj.", "NemotronHMLP", "NemotronHMLPDecoderLayer"),
)


def _module_class(prefix: str, params: frozenset[str] | set[str]) -> str:
    """``module._get_name()`` of the module at ``prefix``, as vLLM's errors quote it."""
    last = prefix.rsplit(".", 1)[-1]
    if last in _LINEAR_CLASS:
        return _LINEAR_CLASS[last]
    named = {"model": "NemotronHModel", "layers": "ModuleList", "shared_experts": "NemotronHMLP", "attn": "Attention"}
    if last in named:
        return named[last]
    if last == "mixer" or last.isdigit():
        layer = prefix.rsplit(".", 1)[0] if last == "mixer" else prefix
        for marker, mixer, decoder in _MIXERS:
            if any(p.startswith(layer + marker) for p in params):
                return mixer if last == "mixer" else decoder
    return "Module"


def _walk(
    n: str, params: frozenset[str] | set[str], outer: str, ignore: tuple[str, ...], dotted: bool, listed: bool = True
) -> Outcome:
    """``AutoWeightsLoader._load_module`` down the module tree for a name no parameter holds.

    At the first component no module or parameter has, the qualified name so far is ignored when it ends
    with an ignorable suffix (``_can_ignore_unexpected``), else ``ValueError``. A fused linear
    (``MergedColumnParallelLinear`` / ``QKVParallelLinear``) has its own ``load_weights``, which takes every
    name below it: ``bias`` of a bias-less layer is skipped (the attribute is ``None``), a dotted rest fails
    in ``get_submodule`` (torch's ``… has no attribute `x` ``), any other rest reaches the module's own
    ``weight_loader`` with the module as the parameter (``… object has no attribute 'data'``).
    """
    parts = n.split(".")
    base = ""
    for i, part in enumerate(parts):
        cls = _module_class(base, params) if base else outer
        if cls in _FUSED:
            rest = parts[i:]
            if len(rest) > 1:
                return Outcome(
                    "raise", engine_name=n, message=f"AttributeError: {cls} has no attribute `{rest[0]}`",
                    reason="fused-missing",
                )  # fmt: skip
            if rest == ["bias"]:
                return Outcome("skip", engine_name=n, reason="ignored")
            return Outcome(
                "raise", engine_name=n, message=f"AttributeError: '{cls}' object has no attribute 'data'",
                reason="fused-missing",
            )  # fmt: skip
        cand = f"{base}.{part}" if base else part
        if cand in params:
            if n.endswith(ignore):
                return Outcome("skip", engine_name=n, reason="ignored")
            message = f"ValueError: Attempted to load nested weight {n!r} into a single parameter {cand!r}"
            return Outcome("raise", engine_name=n, message=message, reason="valueerror")
        if not any(p.startswith(cand + ".") for p in params):
            if cand.endswith(ignore) or (cand + ".").endswith(ignore):
                return Outcome("skip", engine_name=n, reason="ignored")
            if not listed:
                message = f"ValueError: There is no module or parameter named {cand!r} in {outer}"
                return Outcome("raise", engine_name=n, message=message, reason="valueerror")
            under = sorted(p for p in params if not base or p.startswith(base + "."))
            if not dotted and base:
                under = [base + p[len(base) + 1 :] for p in under]
            message = (
                f"ValueError: There is no module or parameter named {cand!r} in {outer}. The available "
                f"parameters belonging to {base} ({cls}) are: {{{', '.join(repr(p) for p in under)}}}"
            )
            return Outcome("raise", engine_name=n, message=message, reason="valueerror")
        base = cand
    message = f"ValueError: There is no module or parameter named {n!r} in {outer}"
    return Outcome("raise", engine_name=n, message=message, reason="valueerror")


def _expert_missing(profile: VLLMProfile, module: str, param_suffix: str, mapped: str, original: str) -> str:
    if profile.expert_missing == "attr-object":
        return f"AttributeError: 'RoutedExperts' object has no attribute '{param_suffix}'"
    return f"AttributeError: Layer {module} has no parameter '{param_suffix}' for checkpoint weight '{original}'"


def _auto(
    n: str,
    shard: str | None,
    original: str,
    params: frozenset[str] | set[str],
    num_experts: int,
    profile: VLLMProfile,
    ignore_suffixes: tuple[str, ...],
    outer: str,
) -> Outcome:
    """``AutoWeightsLoader._load_module`` (and ``RoutedExperts.load_weights`` below an experts module)."""
    if n in params:
        return Outcome("load", n, shard, engine_name=n)
    m = EXPERT_RE.search(n) if not profile.own_loop else None
    if m is not None:
        module = n[: m.start()] + "experts"
        e = int(m.group(1))
        if e >= num_experts:
            return Outcome("skip", engine_name=n, reason="expert-orphan")
        sid, pfx, _ = EXPERT_SHARD[m.group(2)]
        rest = n[m.end() :]
        suffix = pfx + rest
        target = module + (".routed_experts." if profile.routed_experts else ".") + suffix
        if target in params:
            return Outcome("load", target, sid, e, engine_name=n)
        return Outcome(
            "raise", engine_name=n, message=_expert_missing(profile, module, suffix, target, n), reason="expert-missing"
        )
    if profile.own_loop:  # the unexpected-suffix rules came with the cache-scale mapper, .bias only here
        ignore_suffixes = (".bias",) if profile.cache_scale_mapper else ()
    return _walk(n, params, outer, ignore_suffixes, profile.param_keys_dotted, profile.lists_params)


def _own_loop(n: str, inner: frozenset[str], num_experts: int, profile: VLLMProfile) -> Outcome:
    """``NemotronHModel.load_weights`` on a name under ``model.``; ``inner`` is its ``params_dict`` (names
    without ``model.``: ``AutoWeightsLoader`` strips the prefix, and its KeyError quotes the inner name)."""
    name = n[len("model.") :]
    if profile.weights_mapper and ("scale" in name or ("zero_point" in name and profile.q_scale_remap)):
        remapped, warning = kv_remap(name, inner, profile)
        if remapped is None:
            return Outcome("warn", engine_name=n, message=warning, reason="kv-drop")
        name = remapped
    if name.startswith("mtp."):
        return Outcome("skip", reason="mtp-filter")
    for param_name, weight_name, sid in _OWN_STACKED:
        if weight_name not in name:
            continue
        name = name.replace(weight_name, param_name)
        if name.endswith(".bias") and name not in inner and profile.weights_mapper:
            continue
        if name in inner:
            return Outcome("load", "model." + name, sid, engine_name="model." + n[len("model.") :])
        return Outcome("raise", engine_name=name, message=f"KeyError: {name!r}", reason="keyerror")
    hits = sorted(
        (int(m.group(1)), EXPERT_SHARD[m.group(2)][2], m)
        for m in EXPERT_RE.finditer(name)
        if int(m.group(1)) < num_experts
    )
    if hits:
        e, _, m = hits[0]
        sid, pfx, _ = EXPERT_SHARD[m.group(2)]
        repl = "experts.routed_experts." + pfx if profile.routed_experts else "experts." + pfx
        mapped = name.replace(m.group(0), repl)
        if mapped in inner:
            return Outcome("load", "model." + mapped, sid, e, engine_name=n)
        return Outcome("raise", engine_name=mapped, message=f"KeyError: {mapped!r}", reason="keyerror")
    if name in inner:
        return Outcome("load", "model." + name, engine_name=n)
    return Outcome("raise", engine_name=name, message=f"KeyError: {name!r}", reason="keyerror")


def make_replayer(params: frozenset[str], num_experts: int, profile: VLLMProfile, *, quantized: bool, outer: str):
    """``replay_name`` bound to one manifest; the own loop's ``params_dict`` is computed once.

    Expert names (165k on Super) are replayed once per layer × projection × suffix: ``map_name`` never
    touches an ``experts.{e}.`` token (its rewrites are fixed substrings and suffixes), and against runtime
    names without expert indices (a built manifest never has any) the expert branch (``AutoWeightsLoader``'s
    or the own loop's) loads every e < E of a name alike, with only the expert id and the mapped name it
    quotes differing; every other branch fails to find a name that still holds the token.
    So a load found for one raw name with exactly one expert token holds for every other id, read off the
    raw name before any mapping; any other outcome is replayed per name.
    """
    inner = frozenset(p[len("model.") :] for p in params if p.startswith("model."))
    factored = not any(EXPERT_INDEX.search(p) for p in params if "experts." in p)
    #: (raw name before, after its expert token) → (the load, its mapped name before and after the token)
    cache: dict[tuple[str, str], tuple[Outcome, str, str]] = {}
    split = EXPERT_INDEX.split  # [before, e, after] when the name holds exactly one ``experts.{e}.``
    ignore = (".bias",) + ((".k_scale", ".v_scale", ".q_scale") if quantized else ())

    def replay_one(name: str) -> Outcome:
        mapped, shard = map_name(name, profile, quantized)
        if mapped is None:
            return Outcome("skip", reason="mtp-filter" if name.startswith("mtp") else "mapper-drop")
        if mapped.split(".", 1)[0] == "model" and profile.own_loop:
            return _own_loop(mapped, inner, num_experts, profile)
        return _auto(mapped, shard, name, params, num_experts, profile, ignore, outer)

    def replay(name: str) -> Outcome:
        if factored and "experts." in name:
            parts = split(name)
            if len(parts) == 3 and int(parts[1]) < num_experts:
                key = (parts[0], parts[2])
                hit = cache.get(key)
                if hit is None:
                    o = replay_one(name)
                    around = split(o.engine_name or "") if o.outcome == "load" and o.expert_id is not None else ()
                    cache[key] = (o, around[0] + "experts.", "." + around[2]) if len(around) == 3 else _PER_NAME
                    return o
                if hit is not _PER_NAME:
                    o, before, after = hit
                    return _new_outcome(
                        Outcome, (o[0], o[1], o[2], int(parts[1]), before + parts[1] + after, o[5], o[6])
                    )
        return replay_one(name)

    return replay


#: The cache's answer for a raw name whose outcome is not a factored load: replay each name.
_PER_NAME: tuple[Outcome, str, str] = (Outcome("uncached"), "", "")
_new_outcome = tuple.__new__


# ---------------------------------------------------------------------------
# The VL wrapper (NemotronH_Nano_VL_V2.load_weights)


def route_wrapped(name: str, has_sound: bool, vision_norm: bool, *, vision_norm_routed: bool = True) -> Route:
    """Where ``NemotronH_Nano_VL_V2.load_weights`` sends one checkpoint name (0.34.0 ``nano_nemotron_vl.py:1631``).

    ``vision_norm``: the wrapper built ``vision_final_layernorm``; ``vision_norm_routed``: the release routes
    ``vision_projector.vision_final_layernorm.*`` at all (0.32.0; before, such names go nowhere)."""
    if name.startswith("language_model"):
        return Route("lm", ".".join(name.split(".")[1:]))
    if name.startswith("mlp1"):
        return Route("projector", name)
    if name.startswith("vision_model."):
        return Route("tower")
    if name.startswith("sound"):
        return Route("tower") if has_sound else Route("raise", message="AssertionError: ")
    prefix = "vision_projector.vision_final_layernorm."
    if vision_norm_routed and name.startswith(prefix):
        if not vision_norm or name[len(prefix) :] not in ("weight", "bias"):
            return Route("raise", message=f"AssertionError: Unexpected vision LayerNorm weight: {name}")
        return Route("projector", "vision_final_layernorm." + name[len(prefix) :])
    return Route("ignored")


def replay_projector(name: str, projector_params: frozenset[str] | set[str]) -> Outcome:
    """``adapter_dict[trimmed]`` for ``mlp1*`` names (a miss is a KeyError), ``default_weight_loader`` for the norm."""
    if name.startswith("vision_final_layernorm."):
        return Outcome("load", name, engine_name=name)
    rest = name.split(".", 1)[1] if "." in name else ""
    param = "mlp1." + rest
    if param in projector_params:
        return Outcome("load", param, engine_name=param)
    return Outcome("raise", engine_name=name, message=f"KeyError: {rest!r}", reason="keyerror")


# ---------------------------------------------------------------------------
# Loader semantics: what a parameter's weight loader does with a tensor of this shape (TP 1)


def natural_key(name: str) -> list[object]:
    """``_natural_sort_key`` (``model_loader/weight_utils.py``, 0.16.0): digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


#: torch's type names in its error messages, by safetensors dtype.
_TORCH_TYPE = {
    "F8_E4M3": "Float8_e4m3fn",
    "F8_E5M2": "Float8_e5m2",
    "BF16": "BFloat16",
    "F16": "Half",
    "F32": "Float",
    "U8": "Byte",
    "I8": "Char",
}


def _narrow(dim_size: int, start: int, length: int) -> str | None:
    if start + length > dim_size:
        return f"RuntimeError: start ({start}) + length ({length}) exceeds dimension size ({dim_size})."
    return None


def _broadcast_copy(dst: tuple[int, ...], src: tuple[int, ...]) -> str | None:
    """``dst.copy_(src)``: ``src`` must broadcast to ``dst`` (torch's message names the first bad dimension)."""
    if len(src) > len(dst):
        return None if all(d == 1 for d in src[: len(src) - len(dst)]) else "RuntimeError: copy_ broadcast"
    for i in range(1, len(src) + 1):
        a, b = dst[-i], src[-i]
        if b not in (a, 1):
            return (
                f"RuntimeError: The size of tensor a ({a}) must match the size of tensor b ({b}) at non-singleton "
                f"dimension {len(dst) - i}"
            )
    return None


def expert_load_error(
    slot: tuple[int, ...], loaded: tuple[int, ...], shard_id: str | None, narrows: bool, trims_long: bool
) -> str | None:
    """``FusedMoE._load_w13`` / ``_load_w2`` on one expert's slot (``slot`` = the parameter's shape without E).

    ``w2`` shards on dim 1 (input), ``w13`` on dim 0 (output). First the incoming tensor is narrowed on the
    shard dim: to the slot's size (``trims_long``, to 0.22.x: a longer tensor is cut, a shorter one raises
    before 0.19.0) or, from 0.23.0, to its own extent (a longer tensor stays whole). From 0.19.0 the slot is
    then narrowed to a smaller tensor on both dims (``_narrow_expert_data_for_padding`` from 0.20.0): it lands
    in the slot's top-left corner without a word. The copy raises on any other size difference.
    """
    if len(slot) < 2 or not loaded:
        return None
    shard_dim = 1 if shard_id == "w2" else 0
    if shard_dim < len(loaded) and (trims_long or not narrows):
        if not narrows:
            err = _narrow(loaded[shard_dim], 0, slot[shard_dim])
            if err:
                return err
        loaded = loaded[:shard_dim] + (min(loaded[shard_dim], slot[shard_dim]),) + loaded[shard_dim + 1 :]
    if narrows:
        slot = tuple(min(s, n) for s, n in zip(slot, loaded, strict=False)) + slot[len(loaded) :]
    return _broadcast_copy(slot, loaded)


def expert_narrowed(slot: tuple[int, ...], loaded: tuple[int, ...]) -> bool:
    """Whether a 0.20.0+ expert load writes only part of the slot (the incoming tensor is smaller)."""
    return len(slot) >= 2 and len(loaded) == len(slot) and any(n < s for s, n in zip(slot, loaded, strict=True))


def linear_load_error(
    shape: tuple[int, ...],
    loaded: tuple[int, ...],
    loader: str,
    slots: tuple[tuple[str, int, int], ...],
    shard_id: str | None,
    parallel_dim: int | None,
) -> str | None:
    """The linear layers' weight loaders at TP 1: the incoming tensor is narrowed to the slot along the
    parallel dimension (``narrow(dim, 0, size)``), then the shapes must be equal (``assert``).

    ``in_proj`` fused on disk (no shard id) goes shard by shard (``MergedColumnParallelLinear.weight_loader``).
    """
    if len(shape) < 2 or len(loaded) != len(shape):
        return None
    if loader == "stacked" and slots and shard_id is not None:
        for sid, _off, size in slots:
            if sid == shard_id:
                err = _narrow(loaded[0], 0, size)
                if err:
                    return err
                return None if (size,) + shape[1:] == (size,) + loaded[1:] else "AssertionError: "
        return None
    if loader == "stacked" and slots:
        for _sid, off, size in slots:
            err = _narrow(loaded[0], off, size)
            if err:
                return err
            if shape[1:] != loaded[1:]:
                return "AssertionError: "
        return None
    if parallel_dim is not None:
        err = _narrow(loaded[parallel_dim], 0, shape[parallel_dim])
        if err:
            return err
        # the narrowed tensor is what the assertion compares: a longer one is cut to the slot (``slot_note``)
        loaded = loaded[:parallel_dim] + (shape[parallel_dim],) + loaded[parallel_dim + 1 :]
    return None if shape == loaded else "AssertionError: "


def vocab_load_error(shape: tuple[int, ...], loaded: tuple[int, ...]) -> str | None:
    """``VocabParallelEmbedding.weight_loader`` at TP 1 on the ``lm_head``'s weight, quantized (0.23.0 on, its
    quant method's parameters keep this loader) or not: the rows must be the vocabulary (``assert``), then
    ``param[:rows].copy_(loaded)`` broadcasts the rest (0.16.0 ``layers/vocab_parallel_embedding.py:457``, :461):
    an NVFP4 lm_head's packed bytes into a bf16 slot, or a bf16 one into an NVFP4 slot, raise torch's size error;
    equal shapes of another dtype are cast (goldens ``dense_probes/probe_lmhead_*``). The slot's rows are taken as
    the vocabulary (nhcheck does not pad it to vLLM's multiple of 64)."""
    if len(shape) < 2 or not loaded:
        return None
    if loaded[0] != shape[0]:
        return "AssertionError: "
    return _broadcast_copy(shape, loaded)


def _expand_error(target: tuple[int, ...], src: tuple[int, ...]) -> str | None:
    """``param.data[a:b] = src`` into a block of ``target``'s shape: torch expands ``src``, checking the dimensions
    from the last, and names the first one (from the end) that is neither equal nor 1."""
    for i in range(len(target) - 1, -1, -1):
        if src[i] not in (target[i], 1):
            return (
                f"RuntimeError: The expanded size of the tensor ({target[i]}) must match the existing size ({src[i]}) "
                f"at non-singleton dimension {i}.  Target sizes: {list(target)}.  Tensor sizes: {list(src)}"
            )
    return None


def mamba_parts_error(
    shape: tuple[int, ...], loaded: tuple[int, ...], parts: tuple[tuple[str, int, int], ...]
) -> str | None:
    """``mamba_v2_sharded_weight_loader`` (0.10.0 ``layers/mamba/mamba_mixer2.py:153``) at TP 1: each part's rows
    are copied from the same offsets of the checkpoint tensor (``param.data[b:b+n] = loaded[b:b+n]``); a tensor
    shorter than the parameter fails at the first part that runs past its end (golden
    ``dense_probes/probe_h8b_dense_geometry_narrow``), a longer one loads its leading rows (``slot_note``)."""
    if len(loaded) != len(shape):
        return None
    for _part, off, size in parts:
        avail = max(0, min(loaded[0], off + size) - off)
        err = _expand_error((size, *shape[1:]), (avail, *loaded[1:]))
        if err:
            return err
    return None


#: Releases whose rank maps under ``--enable-expert-parallel`` were recorded (``oracle/vllm_tp --ep``, files
#: ``tests/golden/tp/vllm-X/*-tp2-ep.json.gz``): ``audit --tp N --ep`` answers for these only.
EP_PROVEN = (
    "0.9.1", "0.9.2", "0.10.0", "0.10.1.1", "0.10.2", "0.11.0", "0.11.2", "0.12.0", "0.13.0", "0.14.0", "0.15.1",
    "0.19.0", "0.24.0", "0.28.0", "0.33.0", "0.34.0",
)  # fmt: skip

#: Releases whose tensor-parallel rank maps were recorded with their own loaders on gloo ranks
#: (``oracle/vllm_tp``, ``tests/golden/tp/vllm-X``): ``audit --tp`` / ``load --tp`` answer for these and for
#: ``TP_SAME_AS``.
TP_PROVEN = (
    "0.9.1", "0.9.2", "0.10.0", "0.10.1.1", "0.10.2", "0.11.0", "0.11.2", "0.12.0", "0.13.0", "0.14.0", "0.15.1",
    "0.16.0", "0.17.0", "0.18.0", "0.19.0", "0.20.0", "0.21.0", "0.22.0", "0.23.0", "0.24.0", "0.25.1", "0.26.0",
    "0.27.0", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0",
)  # fmt: skip
#: Patch releases whose TP-relevant code is the run release's: ``oracle/vllm/compare_code.py --tp`` (``ast.dump`` of
#: every function, method and class body in the 27 files of its ``TP_FILES``: linear layers, parameters, Mamba
#: mixer, the model, fused MoE, ModelOpt / FP8 / KV-cache quantization, embeddings, config, process groups, model
#: loader), each wheel against the run release's installed copy. Identical: 0.10.1, 0.11.1, 0.14.1, 0.17.1, 0.19.1,
#: 0.22.1, 0.27.1. Differing only where no parameter or loader is made: 0.15.0 (``FusedMoE.__init__`` registers
#: the layer for the forward context; ``get_layer_from_name``, FP8 MoE ``apply_monolithic``, the ROCm GEMM switch:
#: forward only), 0.18.1 (``Fp8Config`` / ``Fp8LinearMethod``: the DeepGEMM switch), 0.20.1 and 0.20.2 (an
#: ``mx_alignment`` field of the MoE kernel quant config, a minimax Mamba state-dtype check), 0.25.0 (the
#: ``FusedMoE`` docstring).
TP_SAME_AS = {
    "0.10.1": "0.10.1.1",
    "0.11.1": "0.11.2",
    "0.14.1": "0.14.0",
    "0.15.0": "0.15.1",
    "0.17.1": "0.17.0",
    "0.18.1": "0.18.0",
    "0.19.1": "0.19.0",
    "0.20.1": "0.20.0",
    "0.20.2": "0.20.0",
    "0.22.1": "0.22.0",
    "0.25.0": "0.25.1",
    "0.27.1": "0.27.0",
}


def tp_release(version: str) -> str:
    """The release whose rank maps answer for ``version`` (itself, or the run release of ``TP_SAME_AS``)."""
    return TP_SAME_AS.get(version, version)


def refuse_moe_backend(release: str, moe_backend: str | None) -> None:
    """``--moe-backend`` names SGLang's MoE runner backends. vLLM picks its MoE backend from the GPU and no
    choice changes a parameter name, so a named backend is refused rather than silently ignored: one rule for
    the release table and for ``--live`` (whose worker would otherwise record none)."""
    if moe_backend not in (None, "", "auto"):
        raise UsageError(
            f"--moe-backend names SGLang's MoE runner backends; vllm {release}'s backend changes no "
            "parameter (leave it out)"
        )


# ---------------------------------------------------------------------------
# The Engine interface for one vLLM release


class VLLMEngine(msgspec.Struct, frozen=True):
    """vLLM's answers for one release row (``nhcheck.engines.base.Engine``)."""

    id: EngineId
    profile: VLLMProfile

    def build_manifest(self, cfg, qc, *, moe_backend=None, mtp=False, pp=None):
        from nhcheck.engines.vllm_manifest import build_manifest

        refuse_moe_backend(self.id.version, moe_backend)
        return build_manifest(cfg, qc, self.profile, release=self.id.version, mtp=mtp, pp=pp)

    def replayer(self, manifest, cfg, *, mtp: bool, pp: PPWindow | None):
        outer = "NemotronHForCausalLM"
        if not manifest.params and manifest.problems:
            # Start-up refused the checkpoint: load_weights never runs, no tensor has an outcome of its own.
            return lambda name: Outcome("skip", reason="not-built")
        if mtp:
            from nhcheck.engines.vllm_mtp import make_mtp_replayer, mtp_profile

            names = frozenset(p.name for p in manifest.params)
            return make_mtp_replayer(names, cfg.n_routed_experts, self.profile, mtp_profile(self.id.version))
        return make_replayer(
            manifest.inner_names,
            cfg.n_routed_experts,
            self.profile,
            quantized=manifest.quantization is not None,
            outer=outer,
        )

    def replay_signature(self, manifest, cfg, classes, *, mtp: bool):
        """``SharesReplay`` (the factoring ``make_replayer`` relies on too); None for wrapped or MTP replays, a
        refused start-up, or a manifest that names experts one by one."""
        if mtp or cfg.wrapper is not None or not manifest.params:
            return None
        if any(EXPERT_INDEX.search(p) for p in manifest.inner_names if "experts." in p):
            return None
        replay = self.replayer(manifest, cfg, mtp=False, pp=None)
        return replay_signature(replay, classes, cfg.n_routed_experts)

    def route(self, name: str, cfg) -> Route:
        return route_wrapped(name, cfg.has_sound, cfg.has_mtp, vision_norm_routed=self.profile.vision_final_norm)

    def replay_projector(self, name: str, manifest) -> Outcome:
        return replay_projector(name, manifest.projector_names)

    def routes_before_lm(self, cfg, *, mtp: bool) -> bool:
        """0.20.0 – 0.21.0: the VL wrapper buffers the language model's tensors, loads ``mlp1`` (and asserts on
        ``sound*`` without an encoder) as it iterates, and hands the buffer to the LM afterwards (0.20.0
        ``models/nano_nemotron_vl.py`` ``load_weights``; golden ``probes/probe_omni_bf16_order``)."""
        return cfg.wrapper is not None and not mtp and not self.profile.vl_lm_first

    def routed_after_lm(self, cfg, *, mtp: bool) -> bool:
        """From 0.22.0 the VL wrapper loads ``mlp1`` and the towers after the whole LM stream."""
        return cfg.wrapper is not None and not mtp and self.profile.vl_lm_first

    def order_shards(self, names: list[str]) -> list[str]:
        """``safetensors_weights_iterator`` reads the shard files in natural-sort order (0.16.0); before, in
        ``glob`` order, assumed here to be name order (``shard_order_assumption``)."""
        return sorted(names, key=natural_key) if self.profile.natural_shard_order else sorted(names)

    def shard_order_assumption(self) -> str | None:
        if self.profile.natural_shard_order:
            return None
        return (
            f"vllm {self.id.version} reads the shard files in the file system's order (glob, unsorted): nhcheck "
            "assumes name order, so the first crash may be a raising tensor of another shard on your host"
        )

    def environment_alternative(self, cfg) -> EnvironmentAlternative | None:
        """0.19.1 – 0.23.x allow transformers 4.x as well as 5.x (``transformers4_allowed``). Under the newest 4.x
        (4.57.6) they answer every conformance case, example and probe as under 5.x except where transformers 5's
        strict ``NemotronHConfig`` refuses config.json (goldens ``expected-transformers4-vllm-0.20.0`` beside
        ``expected-vllm-0.20.0``): there, the release's row with the checkpoint's own configuration code (as before
        0.19.1) is the other answer."""
        from nhcheck.engines.vllm_manifest import strict_config_refusal

        p = self.profile
        refusal = strict_config_refusal(cfg) if p.transformers4_allowed and p.transformers_config else None
        if refusal is None:
            return None
        v = self.id.version
        return EnvironmentAlternative(
            f"vllm {v} allows transformers 4.x as well as 5.x (transformers>=4.56.0, 5.0 – 5.5.0 excluded): nhcheck "
            f"answered for transformers 5, which `pip install vllm=={v}` resolves; its strict NemotronHConfig refuses "
            f"this config.json ({refusal.partition(':')[0]})",
            "with transformers 4.x (4.57.6, the newest it allows) and --trust-remote-code the checkpoint's own "
            "configuration code reads it",
            VLLMEngine(self.id, msgspec.structs.replace(p, transformers_config=False)),
        )

    def tp_unproven(self) -> str | None:
        """None for the releases whose rank maps were recorded on gloo ranks (``oracle/vllm_tp``,
        ``tests/golden/tp/vllm-X``); for the others nhcheck says so instead of guessing."""
        if tp_release(self.id.version) in TP_PROVEN:
            return None
        return (
            f"tensor parallelism on vllm {self.id.version} is not checked: nhcheck's vLLM TP rules are proven on "
            f"vllm {', '.join(TP_PROVEN)} (rank maps from vLLM's own loaders) and {', '.join(TP_SAME_AS)} (the same "
            f"code) only, so no tp-indivisible verdict is given for {self.id.version}"
        )

    def tp_rules(self):
        """vLLM's citations (``models/nemotron_h.py``, ``layers/mamba/mamba_mixer2.py``, ``layers/linear.py``,
        ``layers/fused_moe/``, ``layers/quantization/modelopt.py``; 0.34.0 line numbers drift) and the rules
        that differ by release. From 0.16.0 a single B/C group replicated onto the ranks of a quantized model
        fails while loading, not at start-up (golden ``g1-nvfp4-vllm-tp2``): from 0.32.0 ``in_proj``'s scales
        get the group-replicating loader too (0.32.0 ``mamba_mixer2.py:458``), which cannot slice the scalar
        ``input_scale``; before, the NVFP4 block scale stays on ``ColumnParallelLinear``'s loader, which narrows
        past its end on the last rank. Before 0.16.0 the constructor refuses that model at start-up, as SGLang
        does (0.15.1 ``mamba_mixer2.py:282``, golden ``vllm-0.15.1/g1-nvfp4-vllm-tp2``)."""
        from nhcheck.tp import Rule, TPRules

        key = release_key(self.id.version, "vllm")
        regrouped = key >= release_key("0.32.0")
        # 0.16.0 alone: MambaMixer2.__init__ builds in_proj/conv1d as single ColumnParallelLinears for every
        # n_groups (MergedColumnParallelLinear when n_groups % tp == 0 before, 0.15.1 mamba_mixer2.py:323, and
        # again from 0.17.0; goldens bias-bf16-vllm-tp2), and drops the quantized-TP assertion.
        # 0.10.0 – 0.10.2 too: one ColumnParallelLinear whatever n_groups (0.10.2 mamba_mixer2.py:302; merged from
        # 0.11.0, 0.11.0 mamba_mixer2.py:302; goldens vllm-0.10.0 / 0.10.1.1 / 0.10.2 v1bias-bf16-vllm-tp2).
        unmerged = key < release_key("0.11.0") or release_key("0.16.0") <= key < release_key("0.17.0")
        # 0.10.2: MambaMixer2.__init__ asserts tp_size == 1 or quant_config is None (0.10.2 mamba_mixer2.py:267;
        # goldens vllm-0.10.0 / 0.10.1.1 / 0.10.2 v1-fp8-vllm-tp2); 0.11.0 asserts only when tp does not divide
        # n_groups (:263; golden vllm-0.11.0/v1-fp8-vllm-tp2 loads, v1g1-nvfp4-vllm-tp2 is refused).
        quantized_mamba_refused = key < release_key("0.11.0")
        groups_at_load = key >= release_key("0.16.0")
        # 0.13.0 (the first latent MoE): fc1_latent_proj is a ColumnParallelLinear(gather_output=True)
        # (0.13.0 models/nemotron_h.py:215); a ReplicatedLinear from 0.14.0 (golden latentpad-bf16-vllm-tp2).
        latent_column = key < release_key("0.14.0")
        groups_quant = (
            "IndexError at load (in_proj.input_scale: slice() cannot be applied to a 0-dim tensor)"
            if regrouped
            else "RuntimeError at load on the last rank (in_proj.weight_scale narrowed past its end)"
            if groups_at_load
            else "AssertionError at start-up"
        )

        start, load = "AssertionError at start-up", "RuntimeError at load (narrow past the end)"
        rules = (
            Rule("attn-heads", "ModelConfig.verify_with_parallel_config", "config/model.py", "ValueError at start-up"),
            Rule("attn-kv-heads", "NemotronHAttention.__init__", "models/nemotron_h.py", start),
            Rule("mamba-heads", "MambaMixer2.__init__", "layers/mamba/mamba_mixer2.py", start),
            Rule("mamba-groups", "MambaMixer2.__init__", "layers/mamba/mamba_mixer2.py", start),
            Rule(
                "mamba-groups-quant",
                "MambaMixer2.__init__ (mamba_v2_sharded_weight_loader for in_proj)"
                if groups_at_load
                else "MambaMixer2.__init__",
                "layers/mamba/mamba_mixer2.py",
                groups_quant,
            ),
            Rule("mamba-quant", "MambaMixer2.__init__", "layers/mamba/mamba_mixer2.py", start),
            Rule(
                "mamba-groups-bias",
                "MambaMixer2.__init__ (in_proj.bias keeps ColumnParallelLinear.weight_loader)",
                "layers/mamba/mamba_mixer2.py",
                load,
            ),
            Rule(
                "mamba-in-proj-cut",
                "MambaMixer2.__init__ (in_proj one ColumnParallelLinear; mamba_v2_sharded_weight_loader for its "
                "weight only)",
                "layers/mamba/mamba_mixer2.py",
                "loads, but in_proj's bias / block-scale rows do not match its weight's: wrong weights",
            ),
            Rule("linear-divide", "ColumnParallelLinear/RowParallelLinear divide()", "layers/linear.py", start),
            Rule(
                "nvfp4-linear-k",
                "ModelOptNvFp4LinearMethod.create_weights",
                "layers/quantization/modelopt.py",
                "ValueError at start-up",
            ),
            Rule("moe-intermediate", "FusedMoEConfig.__post_init__", "layers/fused_moe/config.py", start),
            Rule(
                "nvfp4-moe-pair",
                "ModelOptNvFp4FusedMoE.create_weights + FusedMoE/RoutedExperts._load_w2",
                "layers/fused_moe/ (layer.py, routed_experts.py from 0.24.0)",
                "loads, but FP4 pairs straddle ranks: wrong weights",
            ),
            Rule(
                "nvfp4-moe-block",
                "ModelOptNvFp4FusedMoE.create_weights + FusedMoE/RoutedExperts._load_w2",
                "layers/fused_moe/ (layer.py, routed_experts.py from 0.24.0)",
                "loads, but block scales straddle ranks: wrong weights",
            ),
            Rule(
                "vocab-padding",
                "VocabParallelEmbedding.__init__",
                "layers/vocab_parallel_embedding.py",
                "zero rows pad the partition",
            ),
        )
        return TPRules(
            engine="vllm",
            quantized_groups_at_load=groups_at_load,
            methods_by_dtype=True,
            in_proj_unmerged=unmerged,
            latent_fc1_column=latent_column,
            quantized_mamba_refused=quantized_mamba_refused,
            expert_parallel=tp_release(self.id.version) in EP_PROVEN,
            ep_proven=tuple(v for v in RELEASES_WITH_NEMOTRON_H if tp_release(v) in EP_PROVEN),
            citations={r.id: r for r in rules},
        )

    def loader_semantics(self, quant_method: str | None) -> LoaderSemantics:
        """A scalar scale into the Mamba ``in_proj``'s per-part scale vector (``PerTensorScaleParameter``, no
        shard id): every slot from 0.20.0, slot 0 only in the releases whose ``in_proj`` is a
        ``MergedColumnParallelLinear`` before it (``merged_scalar_every_slot``; golden
        ``tests/golden/vllm_scalar_slots``, vLLM's real loader on NaN-filled vectors). What the other slots then
        hold is the quant method's (``nhcheck.slots.unwritten_kind``). A scale of the wrong rank is not refused
        here: the loader's own error is ``load_error``'s, and the replay stops the stream there. From 0.19.0 an
        expert tensor smaller than its slot fills the slot's leading corner (``expert_slot_narrows``; golden
        ``tests/golden/vllm_slot_writes``, vLLM's real loader on poisoned parameters)."""
        return LoaderSemantics(
            scalar_every_slot=self.profile.merged_scalar_every_slot,
            scale_0d_only=False,
            expert_corner=self.profile.expert_slot_narrows,
        )

    def load_error(self, param, shard_id: str | None, dtype: str, shape: tuple[int, ...]) -> str | None:
        """The error the parameter's weight loader raises for a tensor of this shape (TP 1), or None."""
        if not param.shape and param.quant_method == self.profile.kv_method_name:
            if not self.profile.kv_scale_scalar_loader:
                return default_loader_error(param.shape, shape)
            if numel(shape) == 1:
                return None
            return f"ValueError: KV-cache scale expects a scalar weight, got shape {tuple(shape)}"
        if param.dtype == "unknown" or not param.shape:
            return None
        size = numel(shape)
        last = param.name.rsplit(".", 1)[-1]
        if param.loader == "expert":
            if param.shape[1:] in ((), (1,)):
                if size == 1:
                    return None
                if self.profile.expert_scale_reshapes:
                    return f"RuntimeError: shape '[]' is invalid for input of size {size}"
                torch_type = _TORCH_TYPE.get(dtype, dtype)
                return (
                    f"RuntimeError: expand(CPU{torch_type}Type{{{list(shape)}}}, size=[]): the number of sizes "
                    f"provided (0) must be greater or equal to the number of dimensions in the tensor ({len(shape)})"
                )
            return expert_load_error(
                param.shape[1:], shape, shard_id, self.profile.expert_slot_narrows, self.profile.expert_trims_long
            )
        if param.slots and param.loader == "default":  # Mamba conv1d / in_proj parts (``mamba_parts``)
            return mamba_parts_error(param.shape, shape, param.slots)
        if self.profile.sizes_from_hidden and param.name.endswith(".mixer.norm.weight"):
            # ``Mixer2RMSNormGated``'s ``sharded_weight_loader(0)``: narrowed to the slot, then copied
            # (golden ``dense_probes/probe_h8b_dense_geometry_narrow``).
            return _narrow(shape[0], 0, param.shape[0]) if len(shape) == 1 else default_loader_error(param.shape, shape)
        if len(param.shape) == 1 and "scale" in last and param.quant_method is not None:
            # PerTensorScaleParameter: a one-element tensor fills its slot; anything else fails the loader's
            # ``assert param_data.shape == loaded_weight.shape``.
            return None if size == 1 or tuple(shape) == param.shape else "AssertionError: "
        if last != "weight":
            return None
        module = param.name.rsplit(".", 2)[-2]
        cls = _LINEAR_CLASS.get(module)
        if cls is None or module in ("embed_tokens", "conv1d"):
            return None
        if cls == "ParallelLMHead":
            return vocab_load_error(param.shape, shape)
        parallel = 1 if cls == "RowParallelLinear" else None if cls == "ReplicatedLinear" else 0
        return linear_load_error(param.shape, shape, param.loader, param.slots, shard_id, parallel)

    def slot_note(self, param, dtype: str, shape: tuple[int, ...]) -> str | None:
        """A load that succeeds but fills only part of the slot (0.19.0+ expert narrowing), or drops the end of a
        tensor longer than its slot on the sharded dim (to 0.22.x): silent garbage either way. Asked only when
        ``load_error`` is None."""
        if param.loader != "expert":
            return self._linear_cut_note(param, dtype, shape)
        slot = param.shape[1:]
        if self.profile.expert_slot_narrows and expert_narrowed(slot, shape):
            return (
                f"{dtype} {list(shape)} is copied into the top-left corner of the {list(slot)} expert slot "
                f"of {param.name} without an error (FusedMoE narrows the slot to the incoming tensor): the rest "
                "keeps its initial values"
            )
        dim = 1 if param.name.rsplit(".", 1)[-1].startswith("w2_") else 0
        if self.profile.expert_trims_long and len(slot) == len(shape) > dim and shape[dim] > slot[dim]:
            return (
                f"{dtype} {list(shape)} is cut to the {list(slot)} expert slot of {param.name} without an error "
                f"(FusedMoE narrows the tensor to the slot on dim {dim}): its last {shape[dim] - slot[dim]} "
                f"{'columns' if dim else 'rows'} are dropped"
            )
        return None

    def _linear_cut_note(self, param, dtype: str, shape: tuple[int, ...]) -> str | None:
        """A tensor longer than its linear slot on the sharded dimension, which the loader narrows without a word
        (``narrow(dim, 0, size)`` then the shape assertion; golden ``dense_probes/probe_h8b_dense_geometry_wide``,
        0.10.0), or longer than a Mamba ``conv1d`` / ``in_proj`` whose parts are copied at the slot's offsets."""
        if len(shape) != len(param.shape) or not shape:
            return None
        if param.slots and param.loader == "default":
            if shape[0] > param.shape[0]:
                return (
                    f"{dtype} {list(shape)} loads into the {list(param.shape)} slot of {param.name} without an error: "
                    f"mamba_v2_sharded_weight_loader copies its first {param.shape[0]} rows part by part at the "
                    f"engine's own offsets ({', '.join(str(n) for _p, _o, n in param.slots)}); the checkpoint's blocks "
                    "are cut elsewhere: wrong weights"
                )
            return None
        module = param.name.rsplit(".", 2)[-2] if param.name.endswith(".weight") else ""
        cls = _LINEAR_CLASS.get(module)
        if self.profile.sizes_from_hidden and param.name.endswith(".mixer.norm.weight"):
            cls, dim = "Mixer2RMSNormGated", 0
        elif cls is None or cls == "ReplicatedLinear" or module in ("embed_tokens", "conv1d"):
            return None
        else:
            dim = 1 if cls == "RowParallelLinear" else 0
        size, slot = param.shape[dim], f"the {list(param.shape)} slot"
        if param.loader == "stacked" and param.slots and dim == 0:
            size = max(n for _s, _o, n in param.slots)  # longer than any shard's window (no shard id here)
            slot = f"its {size}-row shard window"
        if dim >= len(shape) or shape[dim] <= size:
            return None
        return (
            f"{dtype} {list(shape)} is cut to {slot} of {param.name} without an error "
            f"({cls}'s loader narrows it on dim {dim}): its last {shape[dim] - size} "
            f"{'columns' if dim else 'rows'} are dropped"
        )

    def startup_error(self, names, manifest, *, mtp: bool) -> str | None:
        """The strict check after the stream (``DefaultModelLoader.load_weights``, 0.34.0
        ``model_loader/default_loader.py:560–612``): it runs for models without a quant config, and exempts
        every parameter of a module whose quant method post-processes its weights (the linear layers, the
        embedding; from 0.21.0, before every parameter counts); what remains — norms, Mamba ``A`` / ``D`` /
        ``dt_bias``, the projector — must each have received a tensor, else ``ValueError: Following weights
        were not initialized from checkpoint`` (golden ``probes/probe_nano3_bf16_missing``).
        """
        if manifest.quantization is not None or not manifest.params or manifest.source != "built":
            return None
        experts = max((p.num_experts for p in manifest.params if p.loader == "expert"), default=0)
        reached = self._mtp_reached(list(names), manifest, experts) if mtp else self._reached(names, manifest, experts)
        exempt = self.profile.strict_exempts_postprocess
        missing = sorted(
            p.name for p in manifest.params if not (exempt and p.quant_method is not None) and p.name not in reached
        )
        if not missing:
            return None
        return (
            f"ValueError: Following weights were not initialized from checkpoint: {{{', '.join(map(repr, missing))}}}"
        )

    def _reached(self, names, manifest, experts: int) -> set[str]:
        """The parameters the main model's loaders reach (``AutoWeightsLoader`` / the VL wrapper's routing)."""
        replay = make_replayer(manifest.inner_names, experts, self.profile, quantized=False, outer="")
        n = len(manifest.lm_prefix)
        reached: set[str] = set()
        for name in names:
            route = (
                route_wrapped(name, False, True, vision_norm_routed=self.profile.vision_final_norm)
                if n
                else Route("lm", name)
            )
            if route.target == "lm":
                o = replay(route.inner or "")
                if o.param:
                    reached.add(manifest.lm_prefix + o.param)
            elif route.target == "projector":
                o = replay_projector(route.inner or name, manifest.projector_names)
                if o.param:
                    reached.add(o.param)
        return reached

    def _mtp_reached(self, names: list[str], manifest, experts: int) -> set[str]:
        """What ``NemotronHMTP.load_weights`` returns as loaded; from 0.30.0 a draft that met no ``lm_head.*``
        tensor adds its head (``MTPProfile.head_counted_without_tensor``)."""
        from nhcheck.engines.vllm_mtp import make_mtp_replayer, mtp_profile

        mp = mtp_profile(self.id.version)
        replay = make_mtp_replayer(frozenset(p.name for p in manifest.params), experts, self.profile, mp)
        reached = {o.param for o in map(replay, names) if o.param}
        if mp.head_counted_without_tensor and not any(
            x.removeprefix("language_model.").startswith("lm_head.") for x in names
        ):
            reached |= {p.name for p in manifest.params if p.name.startswith("lm_head.")}
        return reached

    def pp_window(self, num_layers: int, rank: int, size: int) -> PPWindow:
        from nhcheck.engines.sglang import pp_window

        return pp_window(num_layers, rank, size)

    def by_design(self, reason: str) -> bool:
        return reason in BY_DESIGN_REASONS

    def unloaded_kind(self, reason: str) -> UnloadedKind:
        # Not ``loader``: a tensor whose parameter exists but whose shape the loader refuses is load-bearing.
        return _UNLOADED_KIND.get(reason, "elsewhere")

    def reads_kv_scales(self, manifest) -> bool:
        # The attention's q/k/v scales are parameters whenever a ModelOpt quant config builds the attention.
        return any(p.name.endswith((".attn.k_scale", ".attn.v_scale")) for p in manifest.params)

    def reason_text(self, reason: str) -> str:
        return REASON_TEXT.get(reason, reason)

    def others(self, *, mtp: bool = False) -> tuple[VLLMEngine, ...]:
        """One engine per other behaviour row, named by the release its goldens were made with; for the MTP draft,
        one per other (main row, MTP row) pair of the releases whose draft nhcheck answers for (``mtp_rows``)."""
        if not mtp:
            return tuple(VLLMEngine(EngineId("vllm", p.version), p) for p in EPOCHS if p is not self.profile)
        rows = mtp_rows()
        mine = rows.get(self.id.version)
        firsts = {key: v for v, key in reversed(rows.items())}  # each row named by its first release
        return tuple(VLLMEngine(EngineId("vllm", v), PROFILES[v]) for key, v in reversed(firsts.items()) if key != mine)


def mtp_rows() -> dict[str, tuple[int, int]]:
    """Release → what its MTP draft's answers depend on (the main row and the MTP row), for every release whose
    draft nhcheck answers for (``vllm_mtp.MTP_PROFILES``), oldest first."""
    from nhcheck.engines.vllm_mtp import MTP_PROFILES

    return {v: (id(PROFILES[v]), id(row)) for v, row in MTP_PROFILES.items()}


def engine(eid: EngineId) -> VLLMEngine:
    """The engine for a release ``parse_engine_id`` accepted (newer than the table: the newest row)."""
    return VLLMEngine(eid, get_profile(eid))
