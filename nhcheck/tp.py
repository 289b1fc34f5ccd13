"""Tensor parallelism as SGLang 0.5.23 shards Nemotron-H: which TP sizes can load each parameter,
and which slice of it each rank holds.

Many load failures only appear at TP > 1, and some are silent (the engine starts, ranks ≥ 1
hold the wrong bytes). This module answers both questions from the manifest and config alone,
no torch: ``audit --tp`` turns the problems into findings, and ``load --tp`` takes each rank's
partition from the same ``Sharding``, so the static verdict and the real load cannot disagree.

Every rule below was read in the released sglang 0.5.23 source (file paths under
``python/sglang/srt/``; line numbers drift, the functions named do not):

``attn-heads``
    ``NemotronHAttention.__init__`` (models/nemotron_h.py) asserts ``num_attention_heads % tp == 0``;
    ``QKVParallelLinear.__init__`` (layers/linear.py) ``divide()``\\ s the q heads again.
``attn-kv-heads``
    Same constructor: with ``num_key_value_heads >= tp`` it asserts ``kv % tp == 0`` (KV heads are
    partitioned); below that it asserts ``tp % kv == 0`` and every KV head is replicated on
    ``tp / kv`` ranks (``num_kv_head_replicas``; rank r loads head ``r // replicas`` in
    ``QKVParallelLinear.weight_loader``).
``mamba-heads``
    ``MambaMixer2.__init__`` (layers/attention/mamba/mamba.py) asserts ``mamba_num_heads % tp == 0``
    (A, D, dt_bias and the head rows of ``in_proj`` are split by head).
``mamba-groups``
    Same constructor asserts ``n_groups % tp == 0 or n_groups == 1``. With ``n_groups == 1`` and
    ``tp`` not dividing it, ``extra_groups_for_head_shards`` replicates the single B/C group onto
    every rank (``mamba_v2_sharded_weight_loader`` with ``duplicate_groups``).
``mamba-groups-quant``
    Same constructor asserts ``n_groups % tp == 0`` when the model has a quant config and
    ``tp > 1`` (the group-replicating loader is not wired for quantized ``in_proj``). The quant
    config is the model's, so an excluded ``in_proj`` does not help.
``mamba-groups-bias``
    With ``n_groups == 1`` and ``tp > 1`` the same constructor builds ``in_proj`` as a plain
    ``ColumnParallelLinear`` sized with the replicated groups and swaps in
    ``mamba_v2_sharded_weight_loader`` for ``in_proj.weight`` and ``conv1d.weight``/``bias`` only:
    ``in_proj.bias`` (``use_bias``) keeps ``ColumnParallelLinear.weight_loader``, whose last rank
    narrows past the end of the checkpoint tensor (RuntimeError while loading).
``linear-divide``
    ``ColumnParallelLinear._initialize_partition``, ``MergedColumnParallelLinear.__init__`` and
    ``RowParallelLinear.__init__`` (layers/linear.py) divide the sharded size (each merged part for
    ``in_proj``/``conv1d``) by ``tp`` with an asserting ``divide()``; ``Mixer2RMSNormGated``
    asserts the same for the gated norm.
``nvfp4-linear-k``
    ``ModelOptFp4LinearMethod.create_weights`` and ``ModelOptNvFp4A16LinearMethod.create_weights``
    (layers/quantization/modelopt_quant.py) raise ``ValueError`` when a row-parallel layer's
    ``input_size_per_partition % 16 != 0``: each rank's K must hold whole 16-element NVFP4 blocks.
``nvfp4-awq-column``
    ``ModelOptFp4LinearMethod.create_weights`` (NVFP4_AWQ, 0.5.23 only) registers ``pre_quant_scale``
    as a ``ModelWeightParameter`` with ``output_dim=0`` and ``input_size_per_partition`` rows. On a
    ``ColumnParallelLinear`` (``up_proj``, ``shared_experts.up_proj``, ``eh_proj``) that is the whole
    input, and ``ColumnParallelLinear.weight_loader_v2`` → ``load_column_parallel_weight``
    (layers/parameter.py) narrows the checkpoint from ``tp_rank ×`` that size: ranks ≥ 1 read past
    its end. On a ``RowParallelLinear`` it is cut by ``input_dim=0`` like the weight's columns.
``moe-intermediate``
    ``FusedMoE.__init__`` (layers/moe/fused_moe_triton/layer.py) asserts
    ``moe_intermediate_size % moe_tp_size == 0``; with the default ``--ep-size 1`` ``moe_tp_size``
    is the TP size.
``nvfp4-moe-pair``
    (Not under ``flashinfer_trtllm``: there the size below is the padded one, see ``moe-padded-window``.)
    ``ModelOptNvFp4FusedMoEMethod.create_weights`` sizes ``w2_weight`` ``isp // 2`` bytes and
    ``FusedMoE._load_w2`` narrows the checkpoint by ``shape // tp``: with an odd per-rank
    intermediate size a byte's two FP4 values straddle two ranks (silently wrong weights).
``nvfp4-moe-block``
    Same method sizes ``w2_weight_scale`` ``isp // 16``: with ``isp % 16 != 0`` a 16-element
    block straddles two ranks and every rank ≥ 1 applies its neighbour's scales (silent).
``moe-padded-window`` (info, never a failure)
    Under ``flashinfer_trtllm``/``flashinfer_trtllm_routed`` the per-rank intermediate size is
    padded to P, a multiple of 128 (``FusedMoE.__init__``; NVFP4 in
    ``ModelOptNvFp4FusedMoEMethod.create_weights``). ``FusedMoE._load_w13``/``_load_w2`` take
    ``shard_size = expert_data.shape[dim]`` (the padded size) and start rank r at ``r × P``, and
    ``narrow_padded_param_and_loaded_weight`` reads ``min(P, I − r × P)`` rows and zeroes the rest —
    in every tensor of the expert alike (w13 rows and their block-scale rows, w2 columns, packed
    bytes and block-scale columns). So rank r holds intermediates ``[r·P, min((r+1)·P, I))``: an uneven
    but exact partition of [0, I), like the vocabulary's (run on gloo ranks: tests/golden/tp/).
``fp8-block-linear``
    ``Fp8LinearMethod.validate_block_quant_shapes`` (layers/quantization/fp8.py) raises when a
    row-parallel ``input_size_per_partition % block_k`` or a column/merged output partition
    ``% block_n`` is not 0 (block FP8 128×128, MXFP8 ``[1, 32]``: block_n 1, block_k 32). MXFP8 is
    told apart by its uint8 ``weight_scale_inv`` (float32 for 128×128 blocks).
``fp8-block-moe``
    ``Fp8MoEMethod.create_fp8_moe_weight_`` (layers/quantization/fp8.py) raises when
    ``isp % block_n`` or, at ``tp > 1``, ``isp % block_k`` is not 0 (MXFP8: 1 and 32). Under
    ``flashinfer_trtllm`` ``FusedMoE.__init__`` has already rounded ``isp`` up to 128, so the check
    sees the padded size (and never fails for 128×128 blocks).
``vocab-padding`` (info, never a failure)
    ``VocabParallelEmbedding.__init__`` (layers/vocab_parallel_embedding.py) pads the vocabulary
    to a multiple of 64, or of ``64 × tp`` when that is not divisible by ``tp``; each rank holds
    ``padded / tp`` rows, the checkpoint rows ``[r × padded/tp, …) ∩ [0, vocab)``, the rest zero.

Layers are matched to the pattern the engine builds: the MTP draft without an MTP pattern in its
config builds the class default ``["attention", "moe"]`` (configs/nemotron_h.py).

Replicated (every rank holds the whole tensor): norms, the router ``gate`` and its correction
bias, ``fc1``/``fc2_latent_proj`` (``ReplicatedLinear``; vLLM 0.13.0 cuts ``fc1``'s rows, ``TPRules``),
per-tensor and per-partition scales, row-parallel biases, KV-cache scales, the vision projector ``mlp1``.

vLLM shards Nemotron-H the same way (its ``MambaMixer2``, linear layers, ``VocabParallelEmbedding`` and
``FusedMoE`` loaders are the ones SGLang's were ported from; experts are TP-sharded unless
``--enable-expert-parallel``) except where ``TPRules`` says otherwise; every rule is cited in the
engine's own source (``Engine.tp_rules``) and proven on gloo ranks (``oracle/vllm_tp``,
``tests/golden/tp/vllm-*``). With ``--enable-expert-parallel`` (``plan(..., ep=True)``, vLLM only) the experts
are not cut but placed whole (``_Planner._expert_parallel``; maps ``*-tp2-ep``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from nhcheck import collapse
from nhcheck.errors import UsageError
from nhcheck.findings import Finding
from nhcheck.manifest import Manifest, Param
from nhcheck.model import NemotronHConfig
from nhcheck.quant import A16_LINEAR, BLOCK_FP8_LINEAR, BLOCK_FP8_MOE, FP4_LINEAR, FP4_MOE, FP8_LINEAR

CODE = "tp-indivisible"
PAD_CODE = "tp-padding"
ASSUMED_CODE = "tp-assumed"
VOCAB_PAD = 64  # DEFAULT_VOCAB_PADDING_SIZE
NVFP4_BLOCK = 16
TRTLLM_ALIGN = 128
PADDED_WINDOW_BACKENDS = frozenset({"flashinfer_trtllm", "flashinfer_trtllm_routed"})
MAX_TP = 1024


@dataclass(frozen=True)
class Rule:
    """One sharding requirement of the engine, where it lives, and what breaks when it is not met."""

    id: str
    where: str
    file: str
    effect: str


RULES = {
    r.id: r
    for r in (
        Rule("attn-heads", "NemotronHAttention.__init__", "models/nemotron_h.py", "AssertionError at start-up"),
        Rule("attn-kv-heads", "NemotronHAttention.__init__", "models/nemotron_h.py", "AssertionError at start-up"),
        Rule("mamba-heads", "MambaMixer2.__init__", "layers/attention/mamba/mamba.py", "AssertionError at start-up"),
        Rule("mamba-groups", "MambaMixer2.__init__", "layers/attention/mamba/mamba.py", "AssertionError at start-up"),
        Rule(
            "mamba-groups-quant",
            "MambaMixer2.__init__",
            "layers/attention/mamba/mamba.py",
            "AssertionError at start-up",
        ),
        Rule(
            "mamba-groups-bias",
            "MambaMixer2.__init__ (in_proj.bias keeps ColumnParallelLinear.weight_loader)",
            "layers/attention/mamba/mamba.py",
            "RuntimeError at load (narrow past the end)",
        ),
        Rule(
            "linear-divide",
            "ColumnParallelLinear/RowParallelLinear divide()",
            "layers/linear.py",
            "AssertionError at start-up",
        ),
        Rule(
            "nvfp4-linear-k",
            "ModelOptFp4LinearMethod.create_weights",
            "layers/quantization/modelopt_quant.py",
            "ValueError at start-up",
        ),
        Rule(
            "nvfp4-awq-column",
            "ModelOptFp4LinearMethod.create_weights + _ColumnvLLMParameter.load_column_parallel_weight",
            "layers/quantization/modelopt_quant.py",
            "RuntimeError at load on ranks ≥ 1 (narrow past the end)",
        ),
        Rule(
            "moe-intermediate",
            "FusedMoE.__init__",
            "layers/moe/fused_moe_triton/layer.py",
            "AssertionError at start-up",
        ),
        Rule(
            "nvfp4-moe-pair",
            "ModelOptNvFp4FusedMoEMethod.create_weights + FusedMoE._load_w2",
            "layers/quantization/modelopt_quant.py",
            "loads, but FP4 pairs straddle ranks: wrong weights",
        ),
        Rule(
            "nvfp4-moe-block",
            "ModelOptNvFp4FusedMoEMethod.create_weights + FusedMoE._load_w2",
            "layers/quantization/modelopt_quant.py",
            "loads, but block scales straddle ranks: wrong weights",
        ),
        Rule(
            "moe-padded-window",
            "FusedMoE._load_w13/_load_w2 (narrow_padded_param_and_loaded_weight)",
            "layers/moe/fused_moe_triton/layer.py",
            "zero rows pad each rank's partition",
        ),
        Rule(
            "fp8-block-linear",
            "Fp8LinearMethod.validate_block_quant_shapes",
            "layers/quantization/fp8.py",
            "ValueError at start-up",
        ),
        Rule("fp8-block-moe", "Fp8MoEMethod.create_weights", "layers/quantization/fp8.py", "ValueError at start-up"),
        Rule(
            "vocab-padding",
            "VocabParallelEmbedding.__init__",
            "layers/vocab_parallel_embedding.py",
            "zero rows pad the partition",
        ),
    )
}


@dataclass(frozen=True)
class TPRules:
    """One engine's tensor-parallel rules where they differ from SGLang 0.5.23's (``RULES`` and the module
    docstring), each backed by rank maps from that engine's own loaders (``tests/golden/tp/``).

    ``engine`` names the engine in findings; ``citations`` holds, per rule id, where the engine itself
    enforces the rule (default: ``RULES``). ``quantized_groups_at_load``: a single B/C group replicated
    onto the ranks of a quantized model is built, and ``in_proj``'s scales then fail to load (vLLM: which
    scale and how is the release's citation); False:
    the constructor refuses it whenever the model is quantized (SGLang, ``mamba-groups-quant``).
    ``methods_by_dtype``: the manifest's quant-method labels do not tell the formats apart (vLLM 0.30.0+
    labels every ModelOpt linear ``ModelOptLinearMethod``), so the NVFP4 / FP8 rules read the format from
    the parameters (packed ``uint8`` weights with a ``weight_scale_2``: NVFP4; float8 weights: FP8).
    ``in_proj_unmerged``: ``in_proj`` is one ``ColumnParallelLinear`` whatever ``n_groups`` (vLLM 0.16.0), and
    only its weight gets the part-wise loader: its other row-sharded parameters (bias, NVFP4 block scale) are
    cut contiguously, so at TP > 1 their rows no longer match the weight's (``mamba-in-proj-cut``).
    ``latent_fc1_column``: the latent MoE's ``fc1_latent_proj`` is a ``ColumnParallelLinear`` with
    ``gather_output`` (vLLM 0.13.0): its rows are cut by rank (``divide()`` on ``moe_latent_size``), instead of
    the ``ReplicatedLinear`` every rank holds whole.
    ``quantized_mamba_refused``: the Mamba mixer's constructor refuses every quantized model at TP > 1, whatever
    ``n_groups`` (vLLM 0.10.2: ``Tensor parallel currently not supported for quantized models.``; rule
    ``mamba-quant``, which takes the place of ``mamba-groups-quant``).
    ``expert_parallel``: the engine's expert parallelism is modelled (vLLM ``--enable-expert-parallel``: the EP
    group is the TP group, every expert whole on one rank, ``plan(..., ep=True)``); SGLang's ``--ep-size`` is not.
    ``ep_proven``: the engine's releases with that proof, named when ``--ep`` is refused for another.
    """

    engine: str = "sglang"
    quantized_groups_at_load: bool = False
    methods_by_dtype: bool = False
    in_proj_unmerged: bool = False
    latent_fc1_column: bool = False
    quantized_mamba_refused: bool = False
    expert_parallel: bool = False
    ep_proven: tuple[str, ...] = ()
    citations: Mapping[str, Rule] = field(default_factory=dict)

    def rule(self, rule_id: str) -> Rule:
        return self.citations.get(rule_id) or RULES[rule_id]


#: SGLang's rules (every release nhcheck answers: the rank maps of 0.5.11 and 0.5.23 agree).
SGLANG_RULES = TPRules()


@dataclass(frozen=True)
class Part:
    """One logical block of a parameter along its sharded dim (a q/k/v block, an ``in_proj`` part).

    ``size`` is its extent in the TP-1 (checkpoint) layout. ``pieces`` is how many distinct
    slices it is cut into: the TP size, fewer when heads or groups are replicated (rank r takes
    slice ``r × pieces // tp``), 1 when every rank holds it whole. ``padded`` is the extent the
    engine pads to before cutting (vocabulary); 0 when it does not pad. ``spread``: the slices differ by
    at most one, the first ``size % pieces`` one longer (vLLM's ``determine_expert_map``, experts under
    ``--enable-expert-parallel``), so the local extent depends on the rank.
    """

    size: int
    pieces: int
    padded: int = 0
    spread: bool = False

    @property
    def step(self) -> int:
        return (self.padded or self.size) // self.pieces

    def length(self, k: int) -> int:
        """The local extent of slice ``k``."""
        if self.spread:
            return self.size // self.pieces + (k < self.size % self.pieces)
        return self.step

    def start(self, k: int) -> int:
        """Where slice ``k`` starts in the TP-1 layout."""
        if self.spread:
            return k * (self.size // self.pieces) + min(k, self.size % self.pieces)
        return k * self.step


@dataclass(frozen=True)
class Sharding:
    """How one runtime parameter is cut for one TP size; ``dim`` None means replicated."""

    tp: int
    dim: int | None = None
    parts: tuple[Part, ...] = ()

    def local_shape(self, shape: tuple[int, ...], rank: int = 0) -> tuple[int, ...]:
        """Rank ``rank``'s partition (the same on every rank unless a part is ``spread``)."""
        if self.dim is None:
            return shape
        local = sum(p.length(rank * p.pieces // self.tp) for p in self.parts)
        return shape[: self.dim] + (local,) + shape[self.dim + 1 :]

    def windows(self, rank: int) -> tuple[tuple[int, int, int, int], ...]:
        """``(source start, length, local start, owner)`` along ``dim`` for ``rank``; empty windows left out.

        ``owner`` is the lowest rank holding the same slice (replicated KV heads and groups are
        held by several): counting only owned elements, the ranks' counts add up to the
        parameter's size exactly. Local positions outside every window are padding the engine
        zero-fills.
        """
        if self.dim is None:
            return ()
        out = []
        src = dst = 0
        for p in self.parts:
            k = rank * p.pieces // self.tp
            start = p.start(k)
            n = max(0, min(p.length(k), p.size - start))
            if n:
                out.append((src + start, n, dst, -(-k * self.tp // p.pieces)))
            src += p.size
            dst += p.length(k)
        return tuple(out)


@dataclass(frozen=True)
class Problem:
    rule: str
    detail: str


@dataclass(frozen=True)
class ParamShard:
    """One parameter at one TP size: its sharding, or the reasons the engine cannot (or wrongly) shard it.

    ``sharding`` is None with problems (the engine fails or loads it wrongly) and for the
    unreachable swizzled block scales (nothing in the checkpoint fills them; not allocated).
    """

    param: Param
    sharding: Sharding | None
    problems: tuple[Problem, ...] = ()
    module: str = ""


def parse_tp_sizes(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` → (2, 4, 8); anything else is a usage error."""
    sizes: list[int] = []
    for tok in str(text).split(","):
        tok = tok.strip()
        if not tok.isdigit() or not 1 <= int(tok) <= MAX_TP:
            raise UsageError(
                f"--tp takes TP sizes between 1 and {MAX_TP} separated by commas (e.g. 2,4,8), got {text!r}"
            )
        if int(tok) not in sizes:
            sizes.append(int(tok))
    return tuple(sizes)


# ---------------------------------------------------------------------------
# Module geometry


@dataclass(frozen=True)
class _Linear:
    """A linear module: ``style`` column (output parts split) or row (input split)."""

    style: str
    outs: tuple[tuple[int, int], ...]  # (rows, pieces) per merged part, for column style
    inp: int


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LINEAR_SUFFIX = re.compile(
    r"^(.*)\.(weight|weight_scale|weight_scale_inv|weight_scale_2|input_scale|bias|pre_quant_scale)$"
)


class _Planner:
    def __init__(self, manifest: Manifest, cfg: NemotronHConfig, tp: int, rules: TPRules, ep: bool = False) -> None:
        self.m = manifest
        self.cfg = cfg
        self.tp = tp
        self.rules = rules
        self.ep = ep and tp > 1
        self.pattern = cfg.draft_pattern if manifest.mode == "mtp" else cfg.pattern
        self.quantized = manifest.quantization is not None
        self.module_problems: dict[str, tuple[Problem, ...]] = {}

    # -- module-level rules (a failing constructor takes every parameter of the module with it)

    def _attn(self) -> list[Problem]:
        c, tp = self.cfg, self.tp
        out = []
        if c.num_attention_heads % tp:
            out.append(Problem("attn-heads", f"num_attention_heads {c.num_attention_heads} is not divisible by {tp}"))
        kv = c.num_key_value_heads
        if kv >= tp and kv % tp:
            out.append(Problem("attn-kv-heads", f"num_key_value_heads {kv} is not divisible by {tp}"))
        elif 0 < kv < tp and tp % kv:
            out.append(
                Problem(
                    "attn-kv-heads",
                    f"{tp} is not a multiple of num_key_value_heads {kv} "
                    "(KV heads can only be replicated a whole number of times)",
                )
            )
        return out

    def _mamba(self, module: str) -> list[Problem]:
        c, tp = self.cfg, self.tp
        out = []
        if c.mamba_num_heads % tp:
            out.append(Problem("mamba-heads", f"mamba_num_heads {c.mamba_num_heads} is not divisible by {tp}"))
        if c.n_groups % tp and c.n_groups != 1:
            out.append(Problem("mamba-groups", f"n_groups {c.n_groups} is neither divisible by {tp} nor 1"))
        elif tp > 1 and self.quantized and self.rules.quantized_mamba_refused:
            out.append(Problem("mamba-quant", f"the model is quantized ({self.m.quantization})"))
        elif c.n_groups % tp and self.rules.quantized_groups_at_load:
            if module + ".in_proj.input_scale" in self.m.by_name:
                out.append(
                    Problem(
                        "mamba-groups-quant",
                        f"n_groups 1 is replicated onto {tp} ranks and in_proj is quantized: its scales do not load "
                        "in the group-replicated layout",
                    )
                )
        elif c.n_groups % tp and self.quantized:
            out.append(
                Problem(
                    "mamba-groups-quant",
                    f"n_groups {c.n_groups} is not divisible by {tp} and the model is "
                    f"quantized ({self.m.quantization})",
                )
            )
        return out

    def _divide(self, size: int, what: str) -> list[Problem]:
        return [Problem("linear-divide", f"{what} {size} is not divisible by {self.tp}")] if size % self.tp else []

    def _moe(self) -> list[Problem]:
        mi = self.cfg.moe_intermediate_size
        if mi % self.tp:
            return [Problem("moe-intermediate", f"moe_intermediate_size {mi} is not divisible by {self.tp}")]
        return []

    # -- per-module quant rules

    def _method(self, p: Param, weight: str, fp4: str) -> str | None:
        """``p``'s quant method as ``nhcheck.quant`` names it; with ``TPRules.methods_by_dtype`` read from the
        module's ``weight`` parameter (its full name) instead: ``fp4`` for packed NVFP4, FP8 for float8."""
        if not self.rules.methods_by_dtype or p.quant_method is None:
            return p.quant_method
        w = self.m.by_name.get(weight)
        if w is not None and w.dtype == "uint8" and weight + "_scale_2" in self.m.by_name:
            return fp4
        if w is not None and w.dtype.startswith("float8") and fp4 == FP4_LINEAR:
            return FP8_LINEAR
        return p.quant_method

    def _linear_quant(self, lin: _Linear, method: str | None, algo_mx: bool, module: str = "") -> list[Problem]:
        tp = self.tp
        out = []
        if (
            tp > 1
            and lin.style == "column"
            and len(lin.outs) == 1
            and method == FP4_LINEAR
            and module + ".pre_quant_scale" in self.m.by_name
        ):
            # ModelOptFp4LinearMethod.create_weights (NVFP4_AWQ): pre_quant_scale is a ModelWeightParameter
            # (output_dim=0) of input_size_per_partition rows — the whole input on a ColumnParallelLinear —
            # and ColumnParallelLinear.weight_loader_v2 → load_column_parallel_weight (layers/parameter.py)
            # narrows the checkpoint from tp_rank × that size: ranks ≥ 1 read past its end.
            out.append(
                Problem(
                    "nvfp4-awq-column",
                    f"NVFP4_AWQ pre_quant_scale ({lin.inp} values) is cut like an "
                    f"output column: rank r ≥ 1 narrows from r × {lin.inp}",
                )
            )
        if lin.style == "row":
            k = lin.inp // tp
            if method in (FP4_LINEAR, A16_LINEAR) and k % NVFP4_BLOCK:
                out.append(
                    Problem(
                        "nvfp4-linear-k",
                        f"input_size_per_partition {lin.inp}/{tp} = {k} is not a multiple "
                        f"of the NVFP4 block ({NVFP4_BLOCK})",
                    )
                )
            if method == BLOCK_FP8_LINEAR and tp > 1:
                bk = 32 if algo_mx else 128
                if k % bk:
                    out.append(
                        Problem(
                            "fp8-block-linear",
                            f"input_size_per_partition {lin.inp}/{tp} = {k} is not divisible by block_k {bk}",
                        )
                    )
        elif method == BLOCK_FP8_LINEAR and not algo_mx and (tp > 1 or len(lin.outs) > 1):
            for rows, pieces in lin.outs:
                n = rows // pieces if pieces else rows
                if n % 128:
                    out.append(Problem("fp8-block-linear", f"output partition {n} is not divisible by block_n 128"))
                    break
        return out

    def _expert_quant(self, method: str | None, module: str = "") -> list[Problem]:
        tp, mi = self.tp, self.cfg.moe_intermediate_size
        isp = mi // tp
        padded = self.m.moe_backend in PADDED_WINDOW_BACKENDS
        # FusedMoE.__init__ (every method but NVFP4) and ModelOptNvFp4FusedMoEMethod.create_weights round the
        # per-rank size up to 128 under flashinfer_trtllm before the weights are sized: the quant checks below
        # see that size (the padded window is its own rule).
        sized = _round_up(isp, TRTLLM_ALIGN) if padded else isp
        out = []
        if method == FP4_MOE and tp > 1:
            if sized % 2:
                out.append(Problem("nvfp4-moe-pair", f"intermediate_size_per_partition {mi}/{tp} = {isp} is odd"))
            elif sized % NVFP4_BLOCK:
                out.append(
                    Problem(
                        "nvfp4-moe-block",
                        f"intermediate_size_per_partition {mi}/{tp} = {isp} is not a "
                        f"multiple of the NVFP4 block ({NVFP4_BLOCK})",
                    )
                )
        if method == BLOCK_FP8_MOE:
            # Fp8MoEMethod.create_fp8_moe_weight_: isp % block_n always, isp % block_k when moe_tp_size > 1;
            # MXFP8 (uint8 *_weight_scale_inv) has weight_block_size [1, 32], block FP8 [128, 128].
            scale = self.m.by_name.get(module + ".w13_weight_scale_inv")
            bn, bk = (1, 32) if scale is not None and scale.dtype == "uint8" else (128, 128)
            for b, what in ((bn, "block_n"), (bk if tp > 1 else 1, "block_k")):
                if sized % b:
                    out.append(
                        Problem(
                            "fp8-block-moe",
                            f"intermediate_size_per_partition {mi}/{tp} = {isp} is not divisible by {what} {b}",
                        )
                    )
                    break
        return out

    # -- geometry of each module

    def _linear_of(self, kind: str, mod: str, layer: int) -> _Linear | None:
        c, tp = self.cfg, self.tp
        if mod == "eh_proj":
            return _Linear("column", ((c.hidden_size, tp),), 2 * c.hidden_size)
        if kind == "M" and mod == "mixer.in_proj":
            g = 1 if (c.n_groups == 1 and c.n_groups % tp) else tp
            z, x, b, cc, dt = c.mamba_in_proj_parts
            return _Linear("column", ((z, tp), (x, tp), (b, g), (cc, g), (dt, tp)), c.hidden_size)
        if kind == "M" and mod == "mixer.out_proj":
            return _Linear("row", (), c.mamba_inner)
        if kind == "*" and mod == "mixer.qkv_proj":
            kvp = tp if c.num_key_value_heads >= tp else c.num_key_value_heads
            return _Linear("column", ((c.q_size, tp), (c.kv_size, kvp), (c.kv_size, kvp)), c.hidden_size)
        if kind == "*" and mod == "mixer.o_proj":
            return _Linear("row", (), c.q_size)
        if kind == "-" and mod == "mixer.up_proj":
            return _Linear("column", ((c.mlp_intermediate(layer), tp),), c.hidden_size)
        if kind == "-" and mod == "mixer.down_proj":
            return _Linear("row", (), c.mlp_intermediate(layer))
        if kind == "E" and mod == "mixer.shared_experts.up_proj":
            return _Linear("column", ((c.shared_intermediate, tp),), c.hidden_size)
        if kind == "E" and mod == "mixer.shared_experts.down_proj":
            return _Linear("row", (), c.shared_intermediate)
        if kind == "E" and mod == "mixer.fc1_latent_proj" and self.rules.latent_fc1_column and c.moe_latent_size:
            return _Linear("column", ((c.moe_latent_size, tp),), c.hidden_size)
        return None

    def _module_rules(self, kind: str, mod: str, lin: _Linear | None, mixer: str) -> list[Problem]:
        if kind == "M" and mod.startswith("mixer.") and mod != "mixer":
            return self._mamba(mixer)
        if kind == "*" and mod in ("mixer.qkv_proj", "mixer.o_proj"):
            return self._attn()
        if kind == "E" and mod == "mixer.experts":
            return self._moe()
        if lin is not None:
            size = lin.inp if lin.style == "row" else sum(r for r, _ in lin.outs)
            return self._divide(size, "output size" if lin.style == "column" else "input size")
        return []

    # -- one parameter

    def shard(self, p: Param) -> ParamShard:
        lp = self.m.lm_prefix
        if not p.name.startswith(lp):  # the wrapper's vision projector: plain replicated layers
            return ParamShard(p, Sharding(self.tp))
        inner = p.name[len(lp) :]
        if inner.startswith(("model.embed_tokens.", "lm_head.")):
            return self._vocab(p, inner)
        m = _LAYER.match(inner)
        if m and int(m.group(1)) < len(self.pattern):
            return self._layer_param(p, int(m.group(1)), self.pattern[int(m.group(1))], m.group(2))
        return ParamShard(p, Sharding(self.tp))

    def _vocab(self, p: Param, inner: str) -> ParamShard:
        """Rows of the weight (and of an NVFP4 block scale) are cut by vocabulary; scalar scales stay whole."""
        module = self.m.lm_prefix + ("lm_head" if inner.startswith("lm_head.") else "model.embed_tokens")
        if len(p.shape) < 2:
            return ParamShard(p, Sharding(self.tp), module=module)
        pad = VOCAB_PAD
        if _round_up(self.cfg.vocab_size, pad) % self.tp:
            pad *= self.tp
        padded = _round_up(p.shape[0], pad)
        return ParamShard(p, Sharding(self.tp, 0, (Part(p.shape[0], self.tp, padded),)), module=module)

    def _layer_param(self, p: Param, layer: int, kind: str, rest: str) -> ParamShard:
        c, tp = self.cfg, self.tp
        prefix = f"{self.m.lm_prefix}model.layers.{layer}."
        if rest.startswith("mixer.experts.") and self.ep:
            return self._expert_parallel(p, prefix + "mixer.experts")
        if rest.startswith("mixer.experts."):
            module = prefix + "mixer.experts"
            w13 = p.name.rsplit(".", 1)[0] + ".w13_weight"
            probs = self._cached(
                module, lambda: self._moe() + self._expert_quant(self._method(p, w13, FP4_MOE), module)
            )
            sh = None
            if len(p.shape) == 3 and p.reachable:
                # ``mixer.experts.w13_weight`` (FusedMoE) or ``mixer.experts.routed_experts.w13_weight`` (vLLM 0.24.0+)
                dim = 1 if rest.rsplit(".", 1)[-1].startswith("w13_") else 2
                sh = Sharding(tp, dim, (self._expert_part(p.shape[dim]),))
            elif p.reachable:
                sh = Sharding(tp)
            return self._result(p, sh, probs, module)
        if kind == "M" and rest in ("mixer.A", "mixer.D", "mixer.dt_bias", "mixer.norm.weight"):
            module = prefix + "mixer"
            probs = self._cached(module, lambda: self._mamba(module))
            return self._result(p, Sharding(tp, 0, (Part(p.shape[0], tp),)) if p.shape else Sharding(tp), probs, module)
        if kind == "M" and rest.startswith("mixer.conv1d."):
            module = prefix + "mixer"
            probs = self._cached(module, lambda: self._mamba(module))
            g = 1 if (c.n_groups == 1 and c.n_groups % tp) else tp
            gs = c.n_groups * c.ssm_state_size
            parts = _scaled(((c.mamba_inner, tp), (gs, g), (gs, g)), p.shape[0] if p.shape else 0)
            return self._result(p, Sharding(tp, 0, parts) if parts else None, probs, module)
        lm = _LINEAR_SUFFIX.match(rest)
        if lm is None:
            return ParamShard(p, Sharding(tp), module=prefix + rest)
        mod, suffix = lm.group(1), lm.group(2)
        lin = self._linear_of(kind, mod, layer)
        if lin is None:
            return ParamShard(p, Sharding(tp), module=prefix + mod)
        module = prefix + mod
        mamba_module = prefix + "mixer" if kind == "M" else module
        base = self._cached(mamba_module, lambda: self._module_rules(kind, mod, lin, mamba_module))
        quant = self._cached(
            module + "#quant",
            lambda: self._linear_quant(
                lin, self._method(p, module + ".weight", FP4_LINEAR), _is_mx(self.m, module), module
            ),
        )
        if (
            suffix == "bias"
            and kind == "M"
            and mod == "mixer.in_proj"
            and tp > 1
            and c.n_groups == 1
            and c.n_groups % tp
        ):
            # MambaMixer2.__init__ (n_groups == 1, tp > 1): in_proj is a plain ColumnParallelLinear sized with
            # the replicated groups, and only in_proj.weight / conv1d get mamba_v2_sharded_weight_loader; the
            # bias keeps ColumnParallelLinear.weight_loader, whose last rank narrows past the checkpoint's end.
            quant = quant + (
                Problem(
                    "mamba-groups-bias",
                    f"n_groups 1 is replicated onto {tp} ranks but in_proj.bias "
                    "is loaded without the group-replicating loader",
                ),
            )
        elif (
            self.rules.in_proj_unmerged
            and kind == "M"
            and mod == "mixer.in_proj"
            and tp > 1
            and c.n_groups % tp == 0
            and (suffix == "bias" or (suffix == "weight_scale" and len(p.shape) == 2))
        ):
            quant = quant + (
                Problem(
                    "mamba-in-proj-cut",
                    f"in_proj.{suffix} is cut into {tp} contiguous row blocks while in_proj.weight is cut part by "
                    "part: their rows do not match on any rank",
                ),
            )
        return self._result(
            p, _linear_sharding(lin, suffix, p, tp), base + quant, mamba_module if kind == "M" else module
        )

    def _expert_parallel(self, p: Param, module: str) -> ParamShard:
        """vLLM ``--enable-expert-parallel`` (``FusedMoEParallelConfig.make``: EP size = TP size, MoE TP size 1):
        every tensor of an expert lands whole on the rank that owns it, ``determine_expert_map``'s linear
        placement (rank r owns a run of ``E // tp`` experts, the first ``E % tp`` ranks one more). Every
        per-expert parameter (weights, block scales, per-expert scale vectors) is cut on its expert dim; the
        intermediate size is not cut, so no MoE divisibility or NVFP4 block rule applies."""
        experts = self.cfg.n_routed_experts
        if not p.reachable:
            return ParamShard(p, None, (), module)
        if p.shape and p.shape[0] == experts:
            return ParamShard(p, Sharding(self.tp, 0, (_expert_placement(experts, self.tp),)), (), module)
        return ParamShard(p, Sharding(self.tp), (), module)

    def _expert_part(self, extent: int) -> Part:
        """An expert tensor's intermediate dim (rows, packed bytes or scale blocks: ``extent`` per ``I``).

        Under a padding backend rank r's window starts at r × P (P = the per-rank size rounded up
        to 128, in the same units) and the partition holds P, zero-filled past I (``moe-padded-window``).
        """
        mi = self.cfg.moe_intermediate_size
        if self.tp == 1 or self.m.moe_backend not in PADDED_WINDOW_BACKENDS or not mi or extent * TRTLLM_ALIGN % mi:
            return Part(extent, self.tp)
        per_rank = _round_up(mi // self.tp, TRTLLM_ALIGN) * extent // mi
        return Part(extent, self.tp, per_rank * self.tp)

    def _cached(self, key: str, fn) -> tuple[Problem, ...]:
        got = self.module_problems.get(key)
        if got is None:
            got = self.module_problems[key] = tuple(fn())
        return got

    def _result(self, p: Param, sh: Sharding | None, probs: tuple[Problem, ...], module: str) -> ParamShard:
        if probs or sh is None:
            return ParamShard(p, None, probs, module)
        return ParamShard(p, sh, (), module)


def _expert_placement(experts: int, tp: int) -> Part:
    """``determine_expert_map``'s linear placement of ``experts`` over ``tp`` EP ranks (``Part.spread``)."""
    return Part(experts, tp, spread=True)


def ep_experts(experts: int, tp: int, rank: int) -> range:
    """The expert ids ``rank`` owns under vLLM's expert parallelism at TP ``tp`` (the placement ``plan(..., ep=True)``
    cuts every per-expert parameter by): a run of ``experts // tp``, one more on the first ``experts % tp`` ranks."""
    part = _expert_placement(experts, tp)
    return range(part.start(rank), part.start(rank) + part.length(rank))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _is_mx(m: Manifest, module: str) -> bool:
    """MXFP8 blocks (1×32) carry a uint8 (ue8m0) ``weight_scale_inv``, block FP8 (128×128) a float32 one
    (``Fp8LinearMethod.create_weights``: ``block_quant = use_mxfp8 or weight_block_size``); a foreign
    manifest may name the uint8 scale ``weight_scale``."""
    return any(
        p is not None and p.dtype == "uint8"
        for p in (m.by_name.get(module + ".weight_scale_inv"), m.by_name.get(module + ".weight_scale"))
    )


def _scaled(outs: tuple[tuple[int, int], ...], extent: int) -> tuple[Part, ...] | None:
    """Parts in the parameter's own units along the sharded dim (rows, packed bytes or scale blocks)."""
    total = sum(r for r, _ in outs)
    if not total or not extent:
        return None
    if extent == total:
        return tuple(Part(r, k) for r, k in outs)
    if any(r * extent % total for r, _ in outs):
        return None
    return tuple(Part(r * extent // total, k) for r, k in outs)


def _linear_sharding(lin: _Linear, suffix: str, p: Param, tp: int) -> Sharding | None:
    """``ColumnParallelLinear``/``MergedColumnParallelLinear``/``QKVParallelLinear`` cut dim 0 per part;
    ``RowParallelLinear`` cuts the input dim (dim 1) and keeps its bias whole; per-tensor and
    per-partition scales (``weight_scale_2``, ``input_scale``, 1-D FP8 ``weight_scale``) stay whole.
    """
    shape = p.shape
    if suffix in ("weight_scale_2", "input_scale") or (suffix == "weight_scale" and len(shape) < 2):
        return Sharding(tp)
    if lin.style == "row":
        if suffix == "bias":
            return Sharding(tp)
        if suffix == "pre_quant_scale":
            return Sharding(tp, 0, (Part(shape[0], tp),)) if shape else None
        return Sharding(tp, 1, (Part(shape[1], tp),)) if len(shape) >= 2 else None
    if suffix == "pre_quant_scale":
        return Sharding(tp)
    parts = _scaled(lin.outs, shape[0] if shape else 0)
    return Sharding(tp, 0, parts) if parts else None


def plan(
    manifest: Manifest, cfg: NemotronHConfig, tp: int, rules: TPRules = SGLANG_RULES, ep: bool = False
) -> tuple[ParamShard, ...]:
    """Every parameter of ``manifest`` at TP size ``tp`` under the engine's ``rules``, in manifest order; ``ep``:
    with the engine's expert parallelism over the TP ranks (``TPRules.expert_parallel``)."""
    if ep and not rules.expert_parallel:
        where = f"vllm {', '.join(rules.ep_proven)}" if rules.ep_proven else "the vLLM releases with rank maps of it"
        raise UsageError(
            f"--ep: nhcheck's expert-parallel placement is proven only for {where} "
            f"(oracle/vllm_tp --ep), not for this {rules.engine} release"
        )
    planner = _Planner(manifest, cfg, tp, rules, ep)
    return tuple(planner.shard(p) for p in manifest.params)


# ---------------------------------------------------------------------------
# Findings


def check(
    manifest: Manifest,
    cfg: NemotronHConfig,
    sizes: tuple[int, ...],
    rules: TPRules = SGLANG_RULES,
    ep: bool = False,
) -> list[Finding]:
    """``tp-indivisible`` findings (errors) for every TP size and rule that fails, grouped per module family;
    ``tp-padding`` notes (info) where the TP size changes the vocabulary padding.
    """
    out: list[Finding] = []
    for tp in sizes:
        shards = plan(manifest, cfg, tp, rules, ep)
        items = []
        for s in shards:
            for prob in s.problems:
                suffix = s.param.name[len(s.module) + 1 :] if s.param.name.startswith(s.module + ".") else s.param.name
                items.append(((prob.rule, prob.detail), s.module, (suffix, s.param.name)))
        for (rule_id, detail), modules, count, members in collapse.group(items):
            rule = rules.rule(rule_id)
            suffixes = list(dict.fromkeys(sfx for sfx, _ in members))
            shown = ", ".join(suffixes[:8]) + (", …" if len(suffixes) > 8 else "")
            where = f"{modules}: {shown}" + (f" ({count} parameters)" if count > 1 else "")
            out.append(
                Finding(
                    "error",
                    CODE,
                    f"--tp {tp}{' --ep' if ep else ''}: {where} — {detail}; {rule.effect} "
                    f"[{rules.engine} {rule.where}, {rule.file}]",
                    None,
                    modules,
                    tp=tp,
                )
            )
        out.extend(_padding_notes(manifest, cfg, tp, shards, rules))
        out.extend(_moe_padding_notes(manifest, cfg, tp, shards, rules))
        if ep and tp > 1:
            out.extend(_ep_scale_notes(manifest, tp))
    return out


def ep_global_scales(manifest: Manifest) -> tuple[str, ...]:
    """The NVFP4 experts' input scales, whose placement under expert parallelism depends on the NVFP4 MoE backend
    vLLM selects for the GPU: a FlashInfer backend (``is_global_sf_supported_for_nvfp4_backend``) sizes them for
    every expert on every rank (``ModelOptNvFp4FusedMoE.create_weights``: ``global_num_experts if
    use_global_sf``), the others one per local expert. ``plan`` assumes the latter."""
    by_name = manifest.by_name
    return tuple(
        p.name
        for p in manifest.params
        if p.name.endswith(
            (
                "mixer.experts.w13_input_scale",
                "mixer.experts.w2_input_scale",
                "routed_experts.w13_input_scale",
                "routed_experts.w2_input_scale",
            )
        )
        and (w := by_name.get(p.name.rsplit(".", 1)[0] + ".w13_weight")) is not None
        and w.dtype == "uint8"
        and p.name.rsplit(".", 1)[0] + ".w13_weight_scale_2" in by_name
    )


def _ep_scale_notes(manifest: Manifest, tp: int) -> list[Finding]:
    names = ep_global_scales(manifest)
    if not names:
        return []
    modules = collapse.group([(0, n.rsplit(".", 1)[0], None) for n in names])[0][1]
    msg = (
        f"--tp {tp} --ep: {modules} — the NVFP4 experts' input scales are held per local expert, as nhcheck "
        "assumes, unless vLLM picks a FlashInfer NVFP4 MoE backend for your GPU: then every rank holds all of "
        "them (ModelOptNvFp4FusedMoE.create_weights, use_global_sf; both load)"
    )
    return [Finding("info", ASSUMED_CODE, msg, None, names[0], tp=tp)]


def _moe_padding_notes(
    manifest: Manifest, cfg: NemotronHConfig, tp: int, shards: tuple[ParamShard, ...], rules: TPRules
) -> list[Finding]:
    """An info note where the padded MoE windows leave zero rows on some rank (``moe-padded-window``)."""
    inter = cfg.moe_intermediate_size
    if tp == 1 or manifest.moe_backend not in PADDED_WINDOW_BACKENDS or not inter or inter % tp:
        return []
    P = _round_up(inter // tp, TRTLLM_ALIGN)
    if P * tp == inter:
        return []
    modules = [
        s.module
        for s in shards
        if s.sharding is not None and s.sharding.parts and s.sharding.parts[0].padded and ".experts" in s.module
    ]
    if not modules:
        return []
    rule = rules.rule("moe-padded-window")
    holds = "; ".join(
        f"rank {r} [{min(r * P, inter)}, {min((r + 1) * P, inter)})"
        + (f" + {P - max(0, min(P, inter - r * P))} zero rows" if P * (r + 1) > inter else "")
        for r in range(tp)
    )
    msg = (
        f"--tp {tp}: {collapse.group([(0, m, None) for m in dict.fromkeys(modules)])[0][1]} — "
        f"intermediate_size {inter}/{tp} = {inter // tp} is padded to {P} per rank "
        f"(moe backend {manifest.moe_backend}): "
        f"{holds}; the windows tile [0, {inter}) exactly [{rules.engine} {rule.where}, {rule.file}]"
    )
    return [Finding("info", PAD_CODE, msg, None, modules[0], tp=tp)]


def _padding_notes(
    manifest: Manifest, cfg: NemotronHConfig, tp: int, shards: tuple[ParamShard, ...], rules: TPRules
) -> list[Finding]:
    V = cfg.vocab_size
    if tp == 1 or _round_up(V, VOCAB_PAD) % tp == 0:
        return []
    rule = rules.rule("vocab-padding")
    padded = _round_up(V, VOCAB_PAD * tp)
    names = [
        s.param.name
        for s in shards
        if s.sharding is not None and s.sharding.dim == 0 and s.sharding.parts and s.sharding.parts[0].padded
    ]
    if not names:
        return []
    per = padded // tp
    last = (V - 1) // per
    msg = (
        f"--tp {tp}: {', '.join(names)} — vocab_size {V} pads to {padded} (a multiple of {VOCAB_PAD}×{tp}, since "
        f"{_round_up(V, VOCAB_PAD)} is not divisible by {tp}); each rank holds {per} rows, rank {last} the last "
        f"real one, {padded - V} rows are zeros [{rules.engine} {rule.where}, {rule.file}]"
    )
    return [Finding("info", PAD_CODE, msg, None, names[0], tp=tp)]


def with_findings(report, sizes: tuple[int, ...], ep: bool = False):
    """The audit report with the TP findings appended (rendered by every format; the exit gate counts them);
    ``ep``: the engine's expert parallelism on (``plan``)."""
    from dataclasses import replace

    from nhcheck import engines

    engine = engines.get(report.engine)
    unproven = engine.tp_unproven()
    if unproven:
        return replace(report, findings=report.findings + (Finding("info", "tp-unproven", unproven),))
    found = check(report.manifest, report.config, sizes, engine.tp_rules(), ep)
    return replace(report, findings=report.findings + tuple(found), tp_sizes=tuple(sizes))
