"""The runtime parameter manifest: what ``named_parameters()`` holds when SGLang starts loading.

Built from the config and quant recipe for one engine version (spec §8, §15), or read
from a file: our JSON, or a dump of a live engine's ``named_parameters()`` (a plain list
of names or ``{name: {shape, dtype}}``). Each entry carries the loader semantics the
``load`` verb needs: plain copy, a q/k/v row block of ``qkv_proj``, one expert's slice of
a fused MoE tensor, or ``A = -exp(A_log)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import msgspec

from nhcheck.engines.base import PPWindow
from nhcheck.engines.sglang import SGLangProfile, default_moe_backend
from nhcheck.errors import CheckpointError, UsageError
from nhcheck.model import NemotronHConfig
from nhcheck.quant import (
    A16_LINEAR,
    BLOCK_FP8_LINEAR,
    BLOCK_FP8_MOE,
    FP4_LINEAR,
    FP4_MOE,
    FP8_LINEAR,
    FP8_MOE,
    KV_METHOD,
    UNQUANT,
    UNQUANT_MOE,
    QuantConfig,
    QuantResolveError,
    QuantResolver,
    build_resolver,
)

SCHEMA = "nhcheck.manifest/1"
_DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


class Param(msgspec.Struct, frozen=True):
    """One runtime parameter.

    ``loader``: ``default`` (copy; a scalar checkpoint scale broadcasts into a per-partition
    slot), ``plain`` (no weight_loader of its own: ``default_weight_loader`` asserts equal sizes),
    ``stacked`` (``slots`` give each shard's row block or scale index), ``expert``
    (dim 0 is the expert; ``shard_ids`` the shards each expert needs), ``mamba_A``.
    ``reachable`` is false for entries no checkpoint name can map to (swizzled block
    scales); ``informational`` marks entries SGLang tolerates unfilled (KV scales,
    A16 input-scale placeholders).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    quant_method: str | None = None
    loader: str = "default"
    slots: tuple[tuple[str, int, int], ...] = ()
    num_experts: int = 0
    shard_ids: tuple[str, ...] = ()
    reachable: bool = True
    informational: bool = False

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quant_method": self.quant_method,
            "loader": self.loader,
        }
        if self.slots:
            d["slots"] = [list(s) for s in self.slots]
        if self.loader == "expert":
            d["num_experts"] = self.num_experts
            d["shard_ids"] = list(self.shard_ids)
        if not self.reachable:
            d["reachable"] = False
        if self.informational:
            d["informational"] = True
        return d

    @classmethod
    def from_json(cls, d: dict) -> Param:
        return cls(
            name=d["name"],
            shape=tuple(d.get("shape") or ()),
            dtype=str(d.get("dtype") or "bfloat16"),
            quant_method=d.get("quant_method"),
            loader=d.get("loader", "default"),
            slots=tuple(tuple(s) for s in d.get("slots", ())),
            num_experts=int(d.get("num_experts", 0)),
            shard_ids=tuple(d.get("shard_ids", ())),
            reachable=bool(d.get("reachable", True)),
            informational=bool(d.get("informational", False)),
        )


@dataclass(frozen=True)
class Manifest:
    """The parameters one engine version builds for one config, with the context the replay needs.

    ``lm_prefix`` is ``language_model.`` under an Omni/VL wrapper: parameter names carry it,
    while the inner ``load_weights`` sees names without it (``inner_names``).
    """

    params: tuple[Param, ...]
    engine: str
    lm_prefix: str = ""
    quantization: str | None = None
    moe_backend: str = "auto"
    mode: str = "main"
    source: str = "built"
    problems: tuple[str, ...] = ()
    #: ``moe_backend`` is the backend the parameters were built for (SGLang's pick when ``auto`` was
    #: asked); this is what was asked. Every report shows both, under these two names.
    moe_backend_requested: str = "auto"
    #: The pipeline rank the parameters were built for (``--pp``); None: the whole model.
    pp: PPWindow | None = None
    by_name: dict[str, Param] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name.update((p.name, p) for p in self.params)

    @property
    def inner_names(self) -> frozenset[str]:
        n = len(self.lm_prefix)
        return frozenset(p.name[n:] for p in self.params if p.name.startswith(self.lm_prefix))

    @property
    def projector_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params if p.name.startswith("mlp1."))

    def to_json(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "engine": self.engine,
            "mode": self.mode,
            "lm_prefix": self.lm_prefix,
            "quantization": self.quantization,
            "moe_backend": self.moe_backend,
            "moe_backend_requested": self.moe_backend_requested,
            "pp": self.pp.to_json() if self.pp else None,
            "params": [p.to_json() for p in self.params],
        }


# ---------------------------------------------------------------------------
# Builder


class _LinearAttrs(TypedDict):
    """The ``Param`` fields shared by a linear module's weight-shaped (or scale-shaped) entries."""

    quant_method: str | None
    loader: str
    slots: tuple[tuple[str, int, int], ...]


class _ExpertAttrs(TypedDict):
    """The ``Param`` fields shared by the entries of one fused expert weight (w13 or w2)."""

    quant_method: str | None
    loader: str
    num_experts: int
    shard_ids: tuple[str, ...]


class _Builder:
    def __init__(
        self,
        cfg: NemotronHConfig,
        resolver: QuantResolver,
        profile: SGLangProfile,
        moe_backend: str,
        name_prefix: str,
        quant_prefix: str,
    ) -> None:
        self.cfg = cfg
        self.q = resolver
        self.profile = profile
        self.moe_backend = moe_backend
        self.np = name_prefix  # runtime parameter names
        self.qp = quant_prefix  # module prefixes handed to the quant config
        self.dtype = _DTYPE_NAMES.get(cfg.dtype, "bfloat16")
        self.out: list[Param] = []

    def add(
        self,
        name: str,
        shape: tuple[int, ...] | list[int],
        dtype: str | None = None,
        *,
        quant_method: str | None = None,
        loader: str = "default",
        slots: tuple[tuple[str, int, int], ...] = (),
        num_experts: int = 0,
        shard_ids: tuple[str, ...] = (),
        reachable: bool = True,
        informational: bool = False,
    ) -> None:
        """Append one parameter (``name`` under the runtime prefix; ``dtype`` None: the model dtype)."""
        self.out.append(
            Param(
                self.np + name,
                tuple(shape),
                dtype or self.dtype,
                quant_method=quant_method,
                loader=loader,
                slots=slots,
                num_experts=num_experts,
                shard_ids=shard_ids,
                reachable=reachable,
                informational=informational,
            )
        )

    def linear(
        self,
        name: str,
        qprefix: str,
        outs: tuple[int, ...],
        inp: int,
        *,
        bias: bool = False,
        lm_head: bool = False,
        stacked: tuple[str, ...] = (),
    ) -> None:
        """LIN(x): the parameters of one linear module under the method its prefix resolves to."""
        method = self.q.linear_method(qprefix, lm_head=lm_head)
        if lm_head and method == UNQUANT and (self.q.kind is None or not self.profile.lm_head_quantizable):
            method = "UnquantizedEmbeddingMethod"
        rows = sum(outs)
        nparts = len(outs)
        row_slots: tuple[tuple[str, int, int], ...] = ()
        idx_slots: tuple[tuple[str, int, int], ...] = ()
        if stacked:
            offs = [sum(outs[:i]) for i in range(nparts)]
            row_slots = tuple((s, o, n) for s, o, n in zip(stacked, offs, outs, strict=True))
            idx_slots = tuple((s, i, 1) for i, s in enumerate(stacked))
        loader = "stacked" if stacked else "default"
        w = _LinearAttrs(quant_method=method, loader=loader, slots=row_slots)
        s = _LinearAttrs(quant_method=method, loader=loader, slots=idx_slots)
        if method in (UNQUANT, "UnquantizedEmbeddingMethod"):
            self.add(f"{name}.weight", (rows, inp), **w)
        elif method == FP8_LINEAR:
            self.add(f"{name}.weight", (rows, inp), "float8_e4m3fn", **w)
            self.add(f"{name}.weight_scale", (nparts,), "float32", **s)
            self.add(f"{name}.input_scale", (nparts,), "float32", **s)
        elif method in (FP4_LINEAR, A16_LINEAR):
            self.add(f"{name}.weight", (rows, inp // 2), "uint8", **w)
            if method == FP4_LINEAR:
                self.add(f"{name}.input_scale", (nparts,), "float32", **s)
                self.add(f"{name}.weight_scale_2", (nparts,), "float32", **s)
                self.add(f"{name}.weight_scale", (rows, inp // 16), "float8_e4m3fn", **w)
                if self.q.linear_algo(qprefix, lm_head=lm_head) == "NVFP4_AWQ":
                    self.add(f"{name}.pre_quant_scale", (inp,), quant_method=method)
            else:
                self.add(f"{name}.weight_scale_2", (nparts,), "float32", **s)
                self.add(f"{name}.weight_scale", (rows, inp // 16), "float8_e4m3fn", **w)
                self.add(f"{name}.input_scale", (nparts,), "float32", informational=True, **s)
        elif method == BLOCK_FP8_LINEAR:
            self.add(f"{name}.weight", (rows, inp), "float8_e4m3fn", **w)
            if self.q.linear_algo(qprefix, lm_head=lm_head) == "MXFP8":
                # Fp8LinearMethod: block_quant = use_mxfp8 or weight_block_size, so MXFP8 (block [1, 32])
                # registers the block scale ``weight_scale_inv`` (uint8 ue8m0), not ``weight_scale``
                # (F8@0.5.23 create_weights, 667–689).
                self.add(f"{name}.weight_scale_inv", (rows, -(-inp // 32)), "uint8", **w)
            else:
                self.add(f"{name}.weight_scale_inv", (-(-rows // 128), -(-inp // 128)), "float32", quant_method=method)
        if bias:
            self.add(f"{name}.bias", (rows,), **w)

    def experts(self, layer: int, qprefix: str) -> None:
        c = self.cfg
        pre = f"model.layers.{layer}.mixer.experts"
        method = self.q.moe_method(qprefix)
        E, mi, X = c.n_routed_experts, c.moe_intermediate_size, c.expert_input
        e13 = _ExpertAttrs(quant_method=method, loader="expert", num_experts=E, shard_ids=("w1",))
        e2 = _ExpertAttrs(quant_method=method, loader="expert", num_experts=E, shard_ids=("w2",))
        if method == UNQUANT_MOE:
            self.add(f"{pre}.w13_weight", (E, mi, X), **e13)
            self.add(f"{pre}.w2_weight", (E, X, mi), **e2)
        elif method == FP8_MOE:
            self.add(f"{pre}.w13_weight", (E, mi, X), "float8_e4m3fn", **e13)
            self.add(f"{pre}.w2_weight", (E, X, mi), "float8_e4m3fn", **e2)
            self.add(f"{pre}.w13_weight_scale", (E, 1), "float32", **e13)
            self.add(f"{pre}.w2_weight_scale", (E,), "float32", **e2)
            self.add(f"{pre}.w13_input_scale", (E,), "float32", **e13)
            self.add(f"{pre}.w2_input_scale", (E,), "float32", **e2)
        elif method == FP4_MOE:
            swizzle = self.moe_backend not in self.profile.swizzled_omitted_backends
            self.add(f"{pre}.w13_weight", (E, mi, X // 2), "uint8", **e13)
            self.add(f"{pre}.w2_weight", (E, X, mi // 2), "uint8", **e2)
            self.add(f"{pre}.w13_weight_scale", (E, mi, X // 16), "float8_e4m3fn", **e13)
            if swizzle:
                self.add(
                    f"{pre}.w13_blockscale_swizzled",
                    (E, _up(mi, 128), _up(X // 16, 4)),
                    "float8_e4m3fn",
                    quant_method=method,
                    reachable=False,
                )
            self.add(f"{pre}.w2_weight_scale", (E, X, mi // 16), "float8_e4m3fn", **e2)
            if swizzle:
                self.add(
                    f"{pre}.w2_blockscale_swizzled",
                    (E, _up(X, 128), _up(mi // 16, 4)),
                    "float8_e4m3fn",
                    quant_method=method,
                    reachable=False,
                )
            self.add(f"{pre}.w13_weight_scale_2", (E,), "float32", **e13)
            self.add(f"{pre}.w2_weight_scale_2", (E,), "float32", **e2)
            self.add(f"{pre}.w13_input_scale", (E, 1), "float32", **e13)
            self.add(f"{pre}.w2_input_scale", (E,), "float32", **e2)
        elif method == BLOCK_FP8_MOE:
            self.add(f"{pre}.w13_weight", (E, mi, X), "float8_e4m3fn", **e13)
            self.add(f"{pre}.w2_weight", (E, X, mi), "float8_e4m3fn", **e2)
            if self.q.moe_algo(qprefix) == "MXFP8":
                # Fp8MoEMethod with use_mxfp8: block [1, 32], uint8 ``*_weight_scale_inv`` (F8@0.5.23:1720–1746).
                self.add(f"{pre}.w13_weight_scale_inv", (E, mi, -(-X // 32)), "uint8", **e13)
                self.add(f"{pre}.w2_weight_scale_inv", (E, X, -(-mi // 32)), "uint8", **e2)
            else:
                self.add(f"{pre}.w13_weight_scale_inv", (E, _up(mi, 128) // 128, _up(X, 128) // 128), "float32", **e13)
                self.add(f"{pre}.w2_weight_scale_inv", (E, _up(X, 128) // 128, _up(mi, 128) // 128), "float32", **e2)

    def layer(self, i: int, kind: str, *, mtp_first: bool = False, mtp_last: bool = False, mtp: bool = False) -> None:
        c = self.cfg
        P = f"model.layers.{i}.mixer"
        # The draft's modules sit under ``mtp`` (0.5.10rc0) or ``model`` (0.5.8–0.5.9): ``mtp_quant_prefix``.
        M = f"{self.profile.mtp_quant_prefix}.layers.{i}"
        Q = f"{M}.mixer" if mtp else self.qp + P
        H = c.hidden_size
        if mtp_first:
            self.add(f"model.layers.{i}.enorm.weight", (H,))
            self.add(f"model.layers.{i}.hnorm.weight", (H,))
            self.linear(f"model.layers.{i}.eh_proj", f"{M}.eh_proj", (H,), 2 * H)
        if kind == "M":
            nh = c.mamba_num_heads
            self.add(f"{P}.A", (nh,), "float32", loader="mamba_A")
            self.add(f"{P}.D", (nh,))
            self.add(f"{P}.dt_bias", (nh,))
            self.add(f"{P}.conv1d.weight", (c.mamba_conv_dim, 1, c.conv_kernel), quant_method=UNQUANT)
            if c.use_conv_bias:
                self.add(f"{P}.conv1d.bias", (c.mamba_conv_dim,), quant_method=UNQUANT)
            self.linear(f"{P}.in_proj", f"{Q}.in_proj", c.mamba_in_proj_parts, H, bias=c.use_bias)
            self.linear(f"{P}.out_proj", f"{Q}.out_proj", (H,), c.mamba_inner, bias=c.use_bias)
            self.add(f"{P}.norm.weight", (c.mamba_inner,))
        elif kind == "*":
            self.linear(f"{P}.qkv_proj", f"{Q}.qkv_proj", (c.q_size, c.kv_size, c.kv_size), H, stacked=("q", "k", "v"))
            self.linear(f"{P}.o_proj", f"{Q}.o_proj", (H,), c.q_size)
            if self.q.kv_on:
                # BaseKVCacheMethod.create_weights: plain scalar Parameters, no weight_loader.
                self.add(f"{P}.attn.k_scale", (), "float32", quant_method=KV_METHOD, loader="plain", informational=True)
                self.add(f"{P}.attn.v_scale", (), "float32", quant_method=KV_METHOD, loader="plain", informational=True)
        elif kind == "-":
            inter = c.mlp_intermediate(i)
            self.linear(f"{P}.up_proj", f"{Q}.up_proj", (inter,), H, bias=c.mlp_bias)
            self.linear(f"{P}.down_proj", f"{Q}.down_proj", (H,), inter, bias=c.mlp_bias)
        elif kind == "E":
            E = c.n_routed_experts
            self.add(f"{P}.gate.weight", (E, H), "float32" if self.profile.router_fp32 else None, quant_method=UNQUANT)
            self.add(f"{P}.gate.e_score_correction_bias", (E,), "float32", quant_method=UNQUANT)
            self.experts(i, f"{Q}.experts")
            if c.n_shared_experts:
                si = c.shared_intermediate
                self.linear(f"{P}.shared_experts.up_proj", f"{Q}.shared_experts.up_proj", (si,), H)
                self.linear(f"{P}.shared_experts.down_proj", f"{Q}.shared_experts.down_proj", (H,), si)
            if c.moe_latent_size is not None:
                L = c.moe_latent_size
                self.linear(f"{P}.fc1_latent_proj", f"{Q}.fc1_latent_proj", (L,), H, bias=c.mlp_bias)
                self.linear(f"{P}.fc2_latent_proj", f"{Q}.fc2_latent_proj", (H,), L, bias=c.mlp_bias)
        self.add(f"model.layers.{i}.norm.weight", (H,))
        if mtp_last:
            self.add(f"model.layers.{i}.final_layernorm.weight", (H,))


def _up(x: int, m: int) -> int:
    return -(-x // m) * m


def build_manifest(
    cfg: NemotronHConfig,
    qc: QuantConfig | None,
    profile: SGLangProfile,
    *,
    moe_backend: str | None = None,
    mtp: bool = False,
    pp: PPWindow | None = None,
    release: str | None = None,
) -> Manifest:
    """The manifest SGLang builds for ``cfg`` (main model, or the MTP draft with ``mtp``).

    ``release`` names the SGLang release in the manifest (default: the row's own).

    ``pp`` is one pipeline rank: layers outside its window are ``PPMissingLayer`` (no
    parameters), ``embed_tokens`` lives on the first rank, ``norm_f``/``lm_head`` on the last.
    """
    asked_pp, pp = pp, pp or PPWindow(0, cfg.num_layers)
    outer = "NemotronHForCausalLMMTP" if mtp else (cfg.wrapper or cfg.architecture)
    startup = _startup_refusal(cfg, qc, profile, mtp, release or profile.version)
    if startup is not None:
        return Manifest((), f"sglang@{release or profile.version}", problems=(startup,))
    resolver = build_resolver(qc, outer, profile, mtp=mtp)
    problems = list(qc.problems) if qc else []
    if resolver.refusal:
        problems.append(resolver.refusal)
    wrapped = cfg.wrapper is not None and not mtp
    backend = moe_backend or default_moe_backend(profile, resolver.quantization, wrapped)
    prefix = "language_model." if wrapped else ""
    b = _Builder(cfg, resolver, profile, backend, prefix, prefix)
    H, V = cfg.hidden_size, cfg.vocab_size
    single_rank = pp.first_rank and pp.last_rank
    try:
        if mtp or pp.first_rank:
            b.add("model.embed_tokens.weight", (V, H), quant_method="UnquantizedEmbeddingMethod")
        if mtp:
            pat = cfg.draft_pattern
            for j, kind in enumerate(pat):
                b.layer(j, kind, mtp_first=j == 0, mtp_last=j == len(pat) - 1, mtp=True)
        else:
            for i, kind in enumerate(cfg.pattern):
                if pp.start <= i < pp.end:
                    b.layer(i, kind)
            if pp.last_rank:
                b.add("model.norm_f.weight", (H,))
        # Tied with PP=1, lm_head *is* embed_tokens and named_parameters() de-duplicates it. The MTP
        # draft always builds its own ParallelLMHead (MTPF __init__); tying happens after loading.
        if mtp or (pp.last_rank and not (cfg.tie_word_embeddings and single_rank)):
            b.linear("lm_head", prefix + "lm_head", (V,), H, lm_head=True)
    except QuantResolveError as exc:
        problems.append(f"ValueError: {exc}")
    if wrapped and cfg.vit_hidden_size:
        vit = cfg.vit_hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
        b.out.append(Param("mlp1.0.weight", (vit,), b.dtype))
        b.out.append(Param("mlp1.1.weight", (cfg.projector_hidden_size, vit), b.dtype))
        b.out.append(Param("mlp1.3.weight", (H, cfg.projector_hidden_size), b.dtype))
    return Manifest(
        tuple(b.out),
        f"sglang@{release or profile.version}",
        prefix,
        resolver.quantization,
        backend,
        "mtp" if mtp else "main",
        "built",
        tuple(problems),
        moe_backend or "auto",
        asked_pp,
    )


# ---------------------------------------------------------------------------
# Reading manifests from files

_EXPERT_PARAM = re.compile(r"\.experts\.(w13|w2)_[A-Za-z0-9_]+$")
_FLOAT8 = frozenset({"float8_e4m3fn", "float8_e5m2"})


def _linear_method(members: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """The quant method of one linear module of a dump, from its parameters' names and dtypes.

    ModelOpt NVFP4 registers ``weight_scale_2``; block FP8 (and MXFP8) ``weight_scale_inv``; ModelOpt FP8
    an FP8 weight with ``weight_scale``. A module with a float weight and no scale is unquantized.
    """
    weight = members.get("weight")
    if "weight_scale_2" in members:
        return FP4_LINEAR
    if "weight_scale_inv" in members:
        return BLOCK_FP8_LINEAR
    if weight is not None and weight[1] in _FLOAT8 and "weight_scale" in members:
        return FP8_LINEAR
    if weight is not None and len(weight[0]) == 2 and weight[1] in _DTYPE_NAMES:
        return UNQUANT
    return None


def _moe_method(members: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """The quant method of one fused-experts module of a dump (the same markers, ``w13_`` prefixed)."""
    if "w13_weight_scale_2" in members:
        return FP4_MOE
    if "w13_weight_scale_inv" in members:
        return BLOCK_FP8_MOE
    if members.get("w13_weight", ((), ""))[1] in _FLOAT8:
        return FP8_MOE
    return UNQUANT_MOE


def _fits_inside(inner: tuple[int, ...], outer: tuple[int, ...]) -> bool:
    return len(inner) == len(outer) and all(a <= b for a, b in zip(inner, outer, strict=True))


def _infer_params(
    entries: list[tuple[str, tuple[int, ...], str]],
    cfg: NemotronHConfig | None,
    reference: Callable[[], Manifest | None] | None,
) -> tuple[Param, ...]:
    """Loader semantics of a live engine's ``named_parameters()`` dump, rebuilt from names, shapes and dtypes.

    A dump has no slot layout, yet the engine loads ``q_proj``/``k_proj``/``v_proj`` into row blocks
    of ``qkv_proj`` and a scalar scale into one element of a per-partition scale vector. The layout
    is rebuilt as the engine builds it: the quant method of each module from its parameters' names
    and dtypes (``_linear_method``), the row blocks of ``qkv_proj`` from the config's head sizes when
    they add up to the dumped rows, per-partition scale vectors as index slots. What names and dtypes
    cannot tell is taken from ``reference`` (the engine's own manifest for the config) for that
    parameter name: W4A16 and NVFP4 register the same parameters, and a fused expert tensor padded
    by the MoE backend is filled in its unpadded leading region.
    """
    modules: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for name, shape, dtype in entries:
        mod, _, leaf = name.rpartition(".")
        modules.setdefault(mod, {})[leaf] = (shape, dtype)
    ref_manifest: list[Manifest | None] = []

    def reference_param(name: str) -> Param | None:
        if reference is None:
            return None
        if not ref_manifest:
            ref_manifest.append(reference())
        ref = ref_manifest[0]
        return ref.by_name.get(name) if ref is not None else None

    out: list[Param] = []
    for name, shape, dtype in entries:
        mod, _, leaf = name.rpartition(".")
        members = modules[mod]
        if _EXPERT_PARAM.search(name):
            method = _moe_method(members)
            if "blockscale_swizzled" in leaf:
                out.append(Param(name, shape, dtype, quant_method=method, reachable=False))
                continue
            ref = reference_param(name)
            if ref is not None and _fits_inside(ref.shape, shape):
                # FusedMoE pads the intermediate size to a multiple of 128 under flashinfer_trtllm and
                # loads each expert's tensor into the leading rows (narrow_padded_param_and_loaded_weight):
                # the region the checkpoint fills is the unpadded shape of the engine's own layout.
                shape = ref.shape
            out.append(
                Param(
                    name,
                    shape,
                    dtype,
                    quant_method=method,
                    loader="expert",
                    num_experts=shape[0] if shape else 0,
                    shard_ids=("w1",) if leaf.startswith("w13") else ("w2",),
                )
            )
            continue
        if name.endswith(".mixer.A"):
            out.append(Param(name, shape, dtype, loader="mamba_A"))
            continue
        if mod.endswith(".attn") and leaf in ("k_scale", "v_scale"):
            # BaseKVCacheMethod: plain scalar Parameters, loaded by default_weight_loader (it asserts sizes).
            out.append(Param(name, shape, dtype, quant_method=KV_METHOD, loader="plain", informational=True))
            continue
        lin = _linear_method(members) if "weight" in members else None
        ref = reference_param(name) if lin == FP4_LINEAR else None
        if ref is not None and ref.quant_method == A16_LINEAR:
            lin = A16_LINEAR
        informational = lin == A16_LINEAR and leaf == "input_scale"
        weight_rows = members["weight"][0][0] if members.get("weight", ((),))[0] else None
        loader = "stacked" if mod.endswith(".qkv_proj") else "default"
        slots: tuple[tuple[str, int, int], ...] = ()
        if cfg is not None and loader == "stacked":
            # q, k, v row blocks as QKVParallelLinear stacks them; Mamba's in_proj is loaded whole (one
            # checkpoint tensor), only its per-partition scale vectors have slots, which the default
            # loader's scalar rule covers.
            ids, rows = ("q", "k", "v"), (cfg.q_size, cfg.kv_size, cfg.kv_size)
            if len(shape) == 1 and shape[0] == len(ids) and leaf != "bias":
                slots = tuple((s, i, 1) for i, s in enumerate(ids))  # per-partition scale vector
            elif shape and shape[0] == sum(rows) == weight_rows and not (dtype == "float32" and len(shape) == 2):
                offsets = [sum(rows[:i]) for i in range(len(rows))]
                slots = tuple(zip(ids, offsets, rows, strict=True))
        out.append(Param(name, shape, dtype, quant_method=lin, loader=loader, slots=slots, informational=informational))
    return tuple(out)


#: ``QUANTIZATION_METHODS`` of 0.5.3.postN, as its server args list them when refusing ``modelopt``.
_B1_QUANT_METHODS = (
    "fp8", "blockwise_int8", "modelopt_fp8", "modelopt_fp4", "w8a8_int8", "w8a8_fp8", "awq", "awq_marlin", "gptq",
    "gptq_marlin", "moe_wna16", "compressed-tensors", "qoq", "w4afp8", "petit_nvfp4", "fbgemm_fp8", "aqlm",
    "deepspeedfp", "tpu_int8", "marlin", "gguf", "gptq_marlin_24", "bitsandbytes", "qqq", "experts_int8",
)  # fmt: skip
#: transformers' refusal of a config class the release does not register (``<checkpoint>``: the model path).
_REMOTE_CODE = (
    "ValueError: The repository <checkpoint> contains custom code which must be executed to correctly load the "
    "model. You can inspect the repository content at <checkpoint> .\n You can inspect the repository content at "
    "https://hf.co/<checkpoint>.\nPlease pass the argument `trust_remote_code=True` to allow custom code to be run."
)


def _startup_refusal(
    cfg: NemotronHConfig, qc: QuantConfig | None, profile: SGLangProfile, mtp: bool, release: str
) -> str | None:
    """The error SGLang's start-up raises before any weight loads, for what the loader-level model cannot see.

    In start-up order (server args, quant config class, then the model's layers):

    - ``wrappers``: a wrapper architecture the release does not register is read with transformers'
      AutoConfig, which refuses a checkpoint's own code without ``trust_remote_code``.
    - ``modelopt_in_config_json``: 0.5.3.postN's server args do not know ``quant_method: modelopt``.
    - ``override_reads_quantization_config``: the Nemotron-H server-args override reads
      ``hf_config.quantization_config`` for a text model's MIXED_PRECISION recipe; a recipe only in
      hf_quant_config.json has none there (AttributeError).
    - before ``mixed_precision``: the Nemotron-H server hook turns a flat MIXED recipe into
      ``modelopt_fp8``, and ModelOptFp8Config refuses it.
    - before ``reads_layer_norm_epsilon``: the layers read ``config.rms_norm_eps`` (AttributeError without it).
    - a MIXED recipe that resolves to ``w4afp8`` (before ``mixed_precision``: one only in
      hf_quant_config.json; with ``mixed_without_fp4_is_w4afp8``: one with no NVFP4 / W4A16_NVFP4 layer):
      its block-FP8 linears (128×128) check every merged layer's output partitions at build time
      (``Fp8LinearMethod.validate_block_quant_shapes``): the first that is not a multiple of 128, in build
      order, raises. nhcheck does not model the w4afp8 manifest itself, so a recipe that would pass that
      check is a usage error rather than a guess.

    What nhcheck cannot replay on an old release is a usage error naming the release: quantized checkpoints
    on 0.5.3.postN (``legacy_quant_prefixes``), MoE layers before 0.5.6, the MTP draft and latent MoE before
    0.5.8, and a ``layers_block_type`` that disagrees with the pattern string before 0.5.10rc0.
    """
    if cfg.wrapper is not None and cfg.wrapper not in profile.wrappers:
        if not cfg.has_auto_map:
            raise UsageError(f"sglang {release} does not register {cfg.wrapper}, and the config has no auto_map")
        return _REMOTE_CODE
    flat_modelopt = qc is not None and qc.flat is not None and qc.flat.get("quant_method") == "modelopt"
    if flat_modelopt and not profile.modelopt_in_config_json:
        return f"ValueError: Unknown quantization method: modelopt. Must be one of {list(_B1_QUANT_METHODS)}."
    mixed = qc if qc is not None and qc.quant_algo == "MIXED_PRECISION" else None
    # The override is keyed on the checkpoint's architecture, which the MTP draft shares.
    if mixed and profile.override_reads_quantization_config and cfg.wrapper is None and mixed.flat is None:
        return "AttributeError: 'NemotronHConfig' object has no attribute 'quantization_config'"
    if mixed and not profile.mixed_precision and mixed.flat is not None:
        return (
            "ValueError: ModelOptFp8Config only supports static FP8 quantization in SGLang. For FP4 quantization, "
            "use ModelOptFp4Config. Check the quantization config for your model's configuration."
        )
    if not profile.reads_layer_norm_epsilon and not cfg.has_rms_norm_eps:
        return "AttributeError: 'NemotronHConfig' object has no attribute 'rms_norm_eps'"
    pattern = cfg.draft_pattern if mtp else cfg.pattern
    if not profile.moe_layers and "E" in pattern:
        raise UsageError(f"sglang {release} has no MoE layers (E): nhcheck does not model what it builds here")
    if not profile.mtp_pp_filters and (mtp or cfg.moe_latent_size is not None):
        what = "the MTP draft" if mtp else "latent MoE (moe_latent_size)"
        raise UsageError(f"sglang {release} has no {what}; it first ships in 0.5.8")
    if not profile.layers_block_type and cfg.hybrid_pattern != cfg.pattern:
        raise UsageError(
            f"sglang {release} reads hybrid_override_pattern only, and this config's layers_block_type "
            "says otherwise: nhcheck does not model that build"
        )
    fp4_layers = mixed is not None and bool({"NVFP4", "W4A16_NVFP4"} & set(mixed.quantized_layers.values()))
    if mixed and (not profile.mixed_precision or (profile.mixed_without_fp4_is_w4afp8 and not fp4_layers)):
        for kind in pattern:
            parts = cfg.mamba_in_proj_parts if kind == "M" else (cfg.q_size, cfg.kv_size, cfg.kv_size)
            if kind not in "M*":
                continue
            bad = next((n for n in parts if n % 128), None)
            if bad is not None:
                return (
                    f"ValueError: Weight output_partition_size = {bad} is not divisible by weight quantization "
                    "block_n = 128."
                )
        raise UsageError(
            f"sglang {release} resolves this MIXED_PRECISION recipe to w4afp8, whose manifest nhcheck does not "
            "model yet"
        )
    if profile.legacy_quant_prefixes and qc is not None and qc.quant_method == "modelopt":
        raise UsageError(
            f"sglang {release} builds quantized Nemotron-H modules without their model prefix (0.5.3.postN): "
            "nhcheck does not replay quantized checkpoints on it"
        )
    return None


def load_manifest(
    path: str,
    engine: str,
    cfg: NemotronHConfig | None = None,
    reference: Callable[[], Manifest | None] | None = None,
) -> Manifest:
    """Read our JSON, or a live engine's ``named_parameters()`` dump (list of names or name → {shape, dtype}).

    A dump's slot layout is rebuilt from its names and shapes and ``cfg`` (``_infer_params``).
    """
    from nhcheck.checkpoint import load_json

    obj = load_json(path, "manifest")
    if isinstance(obj, dict) and obj.get("schema") == SCHEMA:
        try:
            params = tuple(Param.from_json(p) for p in obj["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(path, f"manifest entry is malformed: {exc}") from None
        return Manifest(
            params,
            obj.get("engine") or engine,
            obj.get("lm_prefix", ""),
            obj.get("quantization"),
            obj.get("moe_backend", "auto"),
            obj.get("mode", "main"),
            path,
            moe_backend_requested=obj.get("moe_backend_requested", "auto"),
        )
    entries: list[tuple[str, tuple[int, ...], str]] = []
    if isinstance(obj, list) and all(isinstance(n, str) for n in obj):
        entries = [(n, (), "unknown") for n in obj]
    elif isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        for k, v in obj.items():
            v = v if isinstance(v, dict) else {}
            shape = v.get("shape") or []
            if not isinstance(shape, list) or not all(type(d) is int for d in shape):
                raise CheckpointError(path, f"shape of {k!r} is not a list of integers")
            entries.append((k, tuple(shape), str(v.get("dtype", "unknown")).replace("torch.", "")))
    else:
        raise CheckpointError(
            path, "manifest must be nhcheck JSON, a list of parameter names, or {name: {shape, dtype}}"
        )
    prefix = "language_model." if any(n.startswith("language_model.model.") for n, _, _ in entries) else ""
    if prefix:
        # A wrapper's vision and sound towers load through their own loaders, which nhcheck does not
        # replay (their checkpoint tensors are ``routed``); the built manifest leaves them out too.
        entries = [e for e in entries if e[0].startswith((prefix, "mlp1."))]
    params = _infer_params(entries, cfg, reference)
    return Manifest(params, engine, prefix, None, "unknown", "main", path)
