"""A typed view of a Nemotron-H ``config.json`` (plain, MTP, or inside an Omni/VL wrapper).

Only the fields that decide which runtime parameters exist and their shapes. Every
width comes from the fields the engine reads (``mamba_num_heads * mamba_head_dim``,
never ``expand * hidden_size``; ``head_dim`` with SGLang's default of 128).
"""

from __future__ import annotations

import msgspec

from nhcheck.errors import CheckpointError

CAUSAL_LM = "NemotronHForCausalLM"
VL_WRAPPERS = ("NemotronH_Nano_VL_V2", "NemotronH_Nano_Omni_Reasoning_V3", "NemotronH_Omni_Reasoning_V3")
LAYER_CHARS = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
#: Sanity bounds for a stranger's config: far above any real model (Nemotron-H has at most
#: 88 layers and 512 experts) and low enough that per-layer and per-expert work stays cheap.
MAX_LAYERS = 4096
MAX_EXPERTS = 16384


class NemotronHConfig(msgspec.Struct, frozen=True):
    """The language model's geometry plus the wrapper around it (if any)."""

    architecture: str
    wrapper: str | None
    pattern: str
    hidden_size: int
    vocab_size: int
    dtype: str
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    use_conv_bias: bool
    use_bias: bool
    mlp_bias: bool
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: tuple[int, ...]
    n_routed_experts: int
    max_n_routed_experts: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    n_shared_experts: int
    moe_latent_size: int | None
    tie_word_embeddings: bool
    mtp_pattern: str
    num_nextn_predict_layers: int
    vit_hidden_size: int = 0
    projector_hidden_size: int = 0
    downsample_ratio: float = 0.5
    has_sound: bool = False
    #: What older SGLang releases read differently (``SGLangProfile.reads_layer_norm_epsilon``,
    #: ``layers_block_type``, ``wrappers``): whether the LM config names ``rms_norm_eps``, its raw
    #: ``hybrid_override_pattern`` ("" when absent), and whether the outer config has an ``auto_map``.
    has_rms_norm_eps: bool = True
    hybrid_pattern: str = ""
    has_auto_map: bool = False
    #: What vLLM 0.9.1 – 0.10.0 size their layers from (``VLLMProfile.sizes_from_hidden``): the Mamba width is
    #: ``expand * hidden_size`` (their ``NemotronHConfig`` takes ``mamba_expand``, default 2; a config.json
    #: ``expand`` key overrides it as a plain attribute), and ``intermediate_size`` must be one number (a list
    #: was written: ``intermediate_is_list``).
    mamba_expand: int = 2
    intermediate_is_list: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_parts(self) -> tuple[int, ...]:
        """Output partitions of ``in_proj``: z, x, B, C, dt (the quant scales have one slot each)."""
        gs = self.n_groups * self.ssm_state_size
        return (self.mamba_inner, self.mamba_inner, gs, gs, self.mamba_num_heads)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def draft_pattern(self) -> str:
        """The MTP draft's layers: the config's MTP pattern, else the class default ["attention", "moe"] (CFG)."""
        return self.mtp_pattern or "*E"

    @property
    def has_mtp(self) -> bool:
        """Whether the language model has an MTP block (``num_nextn_predict_layers > 0``, as the VL wrapper asks)."""
        return self.num_nextn_predict_layers > 0

    @property
    def expert_input(self) -> int:
        return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

    @property
    def shared_intermediate(self) -> int:
        return self.moe_shared_expert_intermediate_size * max(self.n_shared_experts, 1)

    def mlp_intermediate(self, layer: int) -> int:
        """``intermediate_size`` may be a list indexed by the ordinal of the MLP layer."""
        if len(self.intermediate_size) == 1:
            return self.intermediate_size[0]
        ordinal = self.pattern[:layer].count("-")
        return self.intermediate_size[ordinal]


def _kinds_to_pattern(kinds: object, path: str, key: str) -> str:
    if not isinstance(kinds, list):
        raise CheckpointError(path, f"{key} must be a list of layer kinds, got {kinds!r}")
    bad = [k for k in kinds if not isinstance(k, str) or k not in LAYER_CHARS]
    if bad:
        raise CheckpointError(path, f"{key} has unknown kind {bad[0]!r}")
    return "".join(LAYER_CHARS[k] for k in kinds)


def _pattern(cfg: dict, path: str, pattern_key: str = "hybrid_override_pattern") -> str:
    """The layer pattern as SGLang's ``NemotronHConfig`` resolves it (``CFG`` ``_resolve_*layers_block_type``).

    Main model: an explicit ``layers_block_type`` list wins over ``hybrid_override_pattern``.
    MTP: ``mtp_hybrid_override_pattern`` is used unless ``mtp_layers_block_type`` is given and differs
    from the class default ``["attention", "moe"]``; without either field the result is "" here (the
    caller supplies the class default ``*E`` where a draft model is built).
    """
    if pattern_key == "hybrid_override_pattern":
        kinds = cfg.get("layers_block_type")
        pat = _kinds_to_pattern(kinds, path, "layers_block_type") if kinds is not None else cfg.get(pattern_key)
    else:
        kinds = cfg.get("mtp_layers_block_type")
        if kinds is not None and kinds != ["attention", "moe"]:
            pat = _kinds_to_pattern(kinds, path, "mtp_layers_block_type")
        elif cfg.get(pattern_key) is not None:
            pat = cfg.get(pattern_key)
        else:
            pat = _kinds_to_pattern(kinds, path, "mtp_layers_block_type") if kinds is not None else None
    if pat is None:
        return ""
    if not isinstance(pat, str) or any(c not in "M*-E" for c in pat):
        raise CheckpointError(path, f"{pattern_key} must use only the characters M * - E, got {pat!r}")
    if len(pat) > MAX_LAYERS:
        raise CheckpointError(path, f"{pattern_key} has {len(pat)} layers; more than {MAX_LAYERS} is not a real model")
    return pat


def _int(cfg: dict, key: str, path: str, default: int | None = None) -> int:
    val = cfg.get(key, default)
    if val is None:
        val = default
    if type(val) is not int or val < 0:
        if default is not None and val is None:
            return default
        raise CheckpointError(path, f"config field {key!r} must be a non-negative integer, got {val!r}")
    return val


def parse_config(config: dict, path: str = "config.json") -> NemotronHConfig:
    """Build the view; wrong model types and inconsistent patterns are one-line errors."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    wrapper = None
    outer = config
    if arch in VL_WRAPPERS or isinstance(config.get("llm_config"), dict):
        wrapper = arch or VL_WRAPPERS[0]
        llm = config.get("llm_config")
        if not isinstance(llm, dict):
            raise CheckpointError(path, f"{wrapper} config has no llm_config object")
        config = llm
    mt = config.get("model_type")
    if mt == "nemotron_h_puzzle":
        raise CheckpointError(
            path,
            "model_type 'nemotron_h_puzzle' (per-layer block_configs) is not supported yet; "
            "nhcheck audits plain Nemotron-H checkpoints",
        )
    if mt != "nemotron_h":
        raise CheckpointError(
            path, f"model_type is {mt!r}, not 'nemotron_h'; nhcheck audits Nemotron-H checkpoints only"
        )
    pattern = _pattern(config, path)
    if not pattern:
        raise CheckpointError(path, "no hybrid_override_pattern or layers_block_type: cannot tell the layer kinds")
    n_layers = config.get("num_hidden_layers")
    if n_layers is not None and (type(n_layers) is not int or n_layers != len(pattern)):
        raise CheckpointError(
            path, f"hybrid_override_pattern has {len(pattern)} layers but num_hidden_layers is {n_layers!r}"
        )
    inter = config.get("intermediate_size", 0)
    inter_t = tuple(inter) if isinstance(inter, list) else (inter,)
    if not all(type(i) is int and i >= 0 for i in inter_t):
        raise CheckpointError(path, f"intermediate_size must be an integer or a list of integers, got {inter!r}")
    conv_bias = config.get("use_conv_bias", config.get("mamba_conv_bias", True))
    n_routed = _int(config, "n_routed_experts", path, 0) if "E" in pattern else (config.get("n_routed_experts") or 0)
    max_routed = _int(config, "max_n_routed_experts", path, 0) or n_routed
    if type(n_routed) is not int or max(n_routed, max_routed) > MAX_EXPERTS:
        raise CheckpointError(
            path,
            f"n_routed_experts {n_routed!r} / max_n_routed_experts {max_routed!r}: "
            f"must be integers up to {MAX_EXPERTS}",
        )
    latent = config.get("moe_latent_size")
    if latent is not None and (type(latent) is not int or latent < 0):
        raise CheckpointError(
            path, f"config field 'moe_latent_size' must be null or a non-negative integer, got {latent!r}"
        )
    ratio = outer.get("downsample_ratio", 0.5) if wrapper else 0.5
    if type(ratio) not in (int, float) or not 0 < ratio <= 1:
        raise CheckpointError(path, f"downsample_ratio must be a number in (0, 1], got {ratio!r}")
    dtype = config.get("torch_dtype") or config.get("dtype") or outer.get("torch_dtype") or "bfloat16"
    return NemotronHConfig(
        architecture=arch or CAUSAL_LM,
        wrapper=wrapper,
        pattern=pattern,
        hidden_size=_int(config, "hidden_size", path),
        vocab_size=_int(config, "vocab_size", path),
        dtype=str(dtype),
        mamba_num_heads=_int(config, "mamba_num_heads", path, 0),
        mamba_head_dim=_int(config, "mamba_head_dim", path, 0),
        # SGLang's NemotronHConfig has no n_groups field: the HF key becomes a stray attribute and
        # NemotronHMambaDecoderLayer builds MambaMixer2 with mamba_n_groups (default 8), so the runtime
        # in_proj/conv1d/norm shapes follow mamba_n_groups even when a config.json says n_groups.
        n_groups=_int(config, "mamba_n_groups", path, 8),
        ssm_state_size=_int(config, "ssm_state_size", path, 0),
        conv_kernel=_int(config, "conv_kernel", path, 4),
        use_conv_bias=bool(conv_bias),
        use_bias=bool(config.get("use_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        num_attention_heads=_int(config, "num_attention_heads", path, 0),
        num_key_value_heads=_int(config, "num_key_value_heads", path, 0),
        head_dim=_int(config, "head_dim", path, 128),
        intermediate_size=inter_t,
        n_routed_experts=n_routed,
        max_n_routed_experts=max_routed,
        moe_intermediate_size=_int(config, "moe_intermediate_size", path, 0),
        moe_shared_expert_intermediate_size=_int(config, "moe_shared_expert_intermediate_size", path, 0),
        # CFG: n_shared_experts defaults to 1 when the key is absent (an explicit null means none).
        n_shared_experts=(
            _int(config, "n_shared_experts", path, 1)
            if config.get("n_shared_experts") is not None
            else (0 if "n_shared_experts" in config else 1)
        ),
        # NH NemotronHMoE: use_latent_moe = moe_latent_size is not None (0 would still build the projections).
        moe_latent_size=latent,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        mtp_pattern=_pattern(config, path, "mtp_hybrid_override_pattern"),
        num_nextn_predict_layers=_int(config, "num_nextn_predict_layers", path, 0),
        vit_hidden_size=_int(outer, "vit_hidden_size", path, 0) if wrapper else 0,
        projector_hidden_size=_int(outer, "projector_hidden_size", path, 0) if wrapper else 0,
        downsample_ratio=float(ratio),
        has_sound=bool(wrapper and isinstance(outer.get("sound_config"), dict)),
        has_rms_norm_eps="rms_norm_eps" in config,
        hybrid_pattern=pat if isinstance(pat := config.get("hybrid_override_pattern"), str) else "",
        has_auto_map=isinstance(outer.get("auto_map"), dict),
        mamba_expand=expand if type(expand := config.get("expand", config.get("mamba_expand", 2))) is int else 2,
        intermediate_is_list=isinstance(inter, list),
    )
