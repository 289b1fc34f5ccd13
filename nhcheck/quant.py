"""ModelOpt quantization as SGLang resolves it: which method each module prefix gets (spec §9).

Parses both config layouts (flat ``quantization_config`` in config.json, nested
``hf_quant_config.json``), normalises names with the outermost model class's rules,
and applies BOTH exclusion matchers (``is_layer_skipped`` at dotted-component
boundaries, ``is_layer_excluded`` with globs) and MIXED_PRECISION resolution.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nhcheck.engines.sglang import SGLangProfile
from nhcheck.model import CAUSAL_LM

# Linear methods and the MoE methods they pair with (§8.4, §8.5).
UNQUANT = "UnquantizedLinearMethod"
FP8_LINEAR = "ModelOptFp8LinearMethod"
FP4_LINEAR = "ModelOptFp4LinearMethod"
A16_LINEAR = "ModelOptNvFp4A16LinearMethod"
BLOCK_FP8_LINEAR = "Fp8LinearMethod"
UNQUANT_MOE = "UnquantizedFusedMoEMethod"
FP8_MOE = "ModelOptFp8MoEMethod"
FP4_MOE = "ModelOptNvFp4FusedMoEMethod"
BLOCK_FP8_MOE = "Fp8MoEMethod"
KV_METHOD = "ModelOptFp8KVCacheMethod"

_ALGO_METHODS = {
    "FP8": (FP8_LINEAR, FP8_MOE),
    "NVFP4": (FP4_LINEAR, FP4_MOE),
    "NVFP4_AWQ": (FP4_LINEAR, FP4_MOE),
    "W4A16_NVFP4": (A16_LINEAR, FP4_MOE),
    "FP8_PB_WO": (BLOCK_FP8_LINEAR, BLOCK_FP8_MOE),
    "FP8_BLOCK_SCALES": (BLOCK_FP8_LINEAR, BLOCK_FP8_MOE),
    "MXFP8": (BLOCK_FP8_LINEAR, BLOCK_FP8_MOE),
}
_FUSED_FALLBACK = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class QuantResolveError(Exception):
    """SGLang itself raises while building the model (mixed shards of a fused layer)."""


@dataclass(frozen=True)
class QuantConfig:
    """The raw ModelOpt recipe as written by the exporter (before any engine normalisation)."""

    source: str  # "config.json" | "hf_quant_config.json"
    quant_method: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    kv_cache_scheme: dict | None
    exclude: tuple[str, ...]
    quantized_layers: dict[str, str] = field(default_factory=dict)
    group_size: int | None = None
    problems: tuple[str, ...] = ()

    @property
    def is_mixed(self) -> bool:
        return self.quant_algo == "MIXED_PRECISION"


def _layers_map(raw: object) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            algo = v.get("quant_algo") if isinstance(v, dict) else v
            if isinstance(k, str) and isinstance(algo, str):
                out[k] = algo.upper()
    return out


def parse_quant(config: dict, hf_quant: dict | None) -> QuantConfig | None:
    """Pick the recipe the way SGLang does (§9.1); None for an unquantised checkpoint."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc:
        method = str(qc.get("quant_method", "")).lower()
        if method != "modelopt":
            return QuantConfig("config.json", method or "unknown", qc.get("quant_algo"), None, None, (),
                               problems=(f"quantization_config.quant_method {method!r} is not ModelOpt; "
                                         "nhcheck replays ModelOpt checkpoints only and treats this one as unquantised",))
        nested = (hf_quant or {}).get("quantization") if isinstance(hf_quant, dict) else None
        nested = nested if isinstance(nested, dict) else {}
        algo = qc.get("quant_algo")
        layers = _layers_map(qc.get("quantized_layers"))
        kv_algo = qc.get("kv_cache_quant_algo")
        kv_scheme = qc.get("kv_cache_scheme") if isinstance(qc.get("kv_cache_scheme"), dict) else None
        if str(algo).upper() == "MIXED_PRECISION":
            # SGLang falls back to hf_quant_config.json for what the config.json copy lacks.
            if not layers:
                layers = _layers_map(nested.get("quantized_layers"))
            if kv_algo is None and kv_scheme is None:
                kv_algo = nested.get("kv_cache_quant_algo")
        exclude = qc.get("ignore", qc.get("exclude_modules", [])) or []
        return QuantConfig("config.json", "modelopt", str(algo).upper() if algo else None, kv_algo, kv_scheme,
                           tuple(e for e in exclude if isinstance(e, str)), layers, qc.get("group_size"))
    if isinstance(hf_quant, dict):
        q = hf_quant.get("quantization")
        if not isinstance(q, dict):
            return QuantConfig("hf_quant_config.json", "modelopt", None, None, None, (),
                               problems=("hf_quant_config.json has no 'quantization' object",))
        algo = q.get("quant_algo")
        exclude = q.get("exclude_modules", q.get("ignore", [])) or []
        return QuantConfig("hf_quant_config.json", "modelopt", str(algo).upper() if algo else None,
                           q.get("kv_cache_quant_algo"), q.get("kv_cache_scheme") if isinstance(q.get("kv_cache_scheme"), dict) else None,
                           tuple(e for e in exclude if isinstance(e, str)), _layers_map(q.get("quantized_layers")),
                           q.get("group_size"))
    return None


def _module_path_match(entry: str, prefix: str) -> bool:
    """``_module_path_match``: the entry is a contiguous run of whole dotted components of prefix."""
    entry = entry.rstrip(".")
    return prefix == entry or prefix.startswith(entry + ".") or ("." + entry + ".") in ("." + prefix + ".")


def _globs_to_regex(patterns: list[str]) -> re.Pattern[str] | None:
    """All exclude globs as one alternation (``.`` literal, ``*`` any run), for ``fullmatch``."""
    if not patterns:
        return None
    return re.compile("|".join("(?:" + "".join(".*" if c == "*" else re.escape(c) for c in p) + ")" for p in patterns))


def _first_under(layers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, algo in layers.items():
        i = key.find(".")
        while i != -1:
            out.setdefault(key[:i], algo)
            i = key.find(".", i + 1)
    return out


@dataclass(frozen=True)
class QuantResolver:
    """The quant config after the engine's normalisation, answering per-module questions.

    ``kind`` is the config class SGLang instantiates: ``fp8``, ``fp4``, ``mixed`` or None
    (no quantization, or an algorithm this release refuses — see ``refusal``).
    """

    kind: str | None
    algo: str | None
    exclude: tuple[str, ...]
    exclude_glob: re.Pattern[str] | None
    layers: dict[str, str]
    #: dotted prefix → algorithm of the first key (in map order) below it; replaces a scan of
    #: 41,100 keys per module on Super-size recipes.
    first_under: dict[str, str]
    packed: dict[str, tuple[str, ...]]
    kv_on: bool
    profile: SGLangProfile
    refusal: str | None = None

    @property
    def quantization(self) -> str | None:
        return {"fp8": "modelopt_fp8", "fp4": "modelopt_fp4", "mixed": "modelopt_mixed"}.get(self.kind or "")

    # -- exclusion --------------------------------------------------------------

    def is_layer_skipped(self, prefix: str) -> bool:
        last = prefix.rsplit(".", 1)[-1]
        shards = self.packed.get(last) or _FUSED_FALLBACK.get(last)
        if shards:
            votes = {any(_module_path_match(e, prefix.replace(last, s)) for e in self.exclude) for s in shards}
            if len(votes) > 1:
                raise QuantResolveError(f"Detected some but not all shards of {prefix} are quantized. "
                                        "All shards of fused layers to have the same precision.")
            skipped = votes.pop()
        else:
            skipped = any(_module_path_match(e, prefix) for e in self.exclude)
            if "gate_up_proj" in prefix:
                base = prefix.replace("gate_up_proj", "")
                if base + "gate_proj" in self.exclude and base + "up_proj" in self.exclude:
                    skipped = True
        if "experts" in prefix and not skipped:
            skipped = any(prefix in e for e in self.exclude if "experts" in e)
        return skipped

    def is_layer_excluded(self, prefix: str) -> bool:
        cands = [prefix]
        if prefix.startswith("language_model."):
            cands.append(prefix[len("language_model."):])
        rx = self.exclude_glob
        if rx is None:
            return False
        return any(rx.fullmatch(c) or any(rx.fullmatch(part) for part in c.split(".")) for c in cands)

    # -- mixed precision --------------------------------------------------------

    def _candidates(self, prefix: str) -> list[str]:
        out = [prefix]
        if not self.profile.mixed_candidate_prefixes:
            return out
        if prefix.endswith(".lm_head"):
            out.append("lm_head")
        if prefix.startswith("language_model.model."):
            out.append("model.language_model." + prefix[len("language_model.model."):])
        elif prefix.startswith("model.language_model."):
            rest = prefix[len("model.language_model."):]
            out += ["language_model.model." + rest, "model." + rest]
        elif prefix.startswith("model."):
            out.append("model.language_model." + prefix[len("model."):])
        return out

    def resolve_algo(self, prefix: str) -> str | None:
        """``_resolve_quant_algo``: exact key, then packed shards, then the first key under the prefix."""
        cands = self._candidates(prefix)
        for c in cands:
            if c in self.layers:
                return self.layers[c]
        last = prefix.rsplit(".", 1)[-1]
        if last in self.packed and self.packed:
            found = set()
            for c in cands:
                base = c[: -len(last)]
                for s in self.packed[last]:
                    if base + s in self.layers:
                        found.add(self.layers[base + s])
            if len(found) > 1:
                raise QuantResolveError(f"Mixed quant_algo within fused layer {prefix}: {sorted(found)}")
            if found:
                return found.pop()
        for c in cands:
            if c in self.first_under:
                return self.first_under[c]
        return None

    # -- methods ----------------------------------------------------------------

    def linear_method(self, prefix: str, *, lm_head: bool = False) -> str:
        if self.kind is None or (lm_head and not self.profile.lm_head_quantizable):
            return UNQUANT
        if self.is_layer_skipped(prefix) or self.is_layer_excluded(prefix):
            return UNQUANT
        if self.kind == "mixed":
            algo = self.resolve_algo(prefix)
            if algo is None or algo not in self.profile.mixed_algos:
                return UNQUANT
            return _ALGO_METHODS[algo][0]
        return _ALGO_METHODS[self.algo or ""][0]

    def linear_algo(self, prefix: str, *, lm_head: bool = False) -> str | None:
        """The algorithm behind ``linear_method`` (None when unquantised); needed for NVFP4_AWQ extras."""
        method = self.linear_method(prefix, lm_head=lm_head)
        if method == UNQUANT:
            return None
        return self.resolve_algo(prefix) if self.kind == "mixed" else self.algo

    def moe_method(self, prefix: str) -> str:
        if self.kind is None or self.is_layer_excluded(prefix):
            return UNQUANT_MOE
        if self.kind == "mixed":
            algo = self.resolve_algo(prefix)
            if algo is None or algo not in self.profile.mixed_algos:
                return UNQUANT_MOE
            return _ALGO_METHODS[algo][1]
        return _ALGO_METHODS[self.algo or ""][1]


def _kv_on(kind: str | None, qc: QuantConfig) -> bool:
    """§9.6: FP4 defaults the KV algo to "auto"; FP8 needs it set; mixed derives it from the scheme."""
    scheme = qc.kv_cache_scheme or {}
    scheme_fp8 = scheme.get("type") == "float" and scheme.get("num_bits") == 8
    if kind == "fp4":
        return True
    if kind == "fp8":
        return bool(qc.kv_cache_quant_algo) or scheme_fp8
    if kind == "mixed":
        if scheme_fp8 or (scheme.get("type") == "float" and scheme.get("num_bits") == 4):
            return True
        return bool(qc.kv_cache_quant_algo)
    return False


def _map_prefix(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def build_resolver(qc: QuantConfig | None, outer_class: str, profile: SGLangProfile, *, mtp: bool = False) -> QuantResolver:
    """Normalise the recipe with the outermost class's ``remap_prefix``, mapper and packed mapping (§9.2)."""
    if qc is None or qc.quant_method != "modelopt" or qc.quant_algo is None:
        return QuantResolver(None, None, (), None, {}, {}, {}, False, profile)
    algo = qc.quant_algo
    refusal = None
    if algo == "MIXED_PRECISION":
        kind = "mixed"
        if not qc.quantized_layers:
            refusal = "ValueError: MIXED_PRECISION quantization requires a non-empty quantized_layers map"
    elif algo == "FP8" and "FP8" in profile.modelopt_algos:
        kind = "fp8"
    elif algo in profile.modelopt_algos:
        kind = "fp4"
    else:
        kind = None
        refusal = ("ValueError: ModelOpt currently only supports: "
                   + ", ".join(sorted(profile.modelopt_algos | {"MIXED_PRECISION"})) + f" (got {algo})")
    if kind is None or refusal:
        return QuantResolver(None, algo, (), None, {}, {}, {}, False, profile, refusal)

    is_causal = outer_class not in ("NemotronH_Nano_VL_V2", "NemotronH_Nano_Omni_Reasoning_V3", "NemotronH_Omni_Reasoning_V3")
    exclude = list(qc.exclude)
    if qc.source == "hf_quant_config.json" and is_causal:
        exclude = ["model" + e[len("backbone"):] if e.startswith("backbone") else e for e in exclude]
    rules: tuple[tuple[str, str], ...] | None
    if is_causal:
        rules = (("backbone.", "model."),)
        if mtp and profile.mtp_strip_language_model:
            rules += (("language_model.mtp.", "mtp."),)
    elif profile.vl_quant_mapper:
        rules = (("language_model.backbone.", "language_model.model."),)
    else:
        rules = None
    layers = dict(qc.quantized_layers)
    if rules is not None:
        mapped: dict[str, None] = {}
        for e in exclude:
            m = _map_prefix(e, rules)
            mapped[m] = None
            if m.startswith("language_model."):
                mapped[m[len("language_model."):]] = None
        exclude = list(mapped)
        if kind == "mixed":
            layers = {_map_prefix(k, rules): v for k, v in layers.items()}
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj")} if outer_class in (CAUSAL_LM, "NemotronHPuzzleForCausalLM", "NemotronH_Omni_Reasoning_V3", "NemotronHForCausalLMMTP") else {}
    return QuantResolver(
        kind=kind, algo=algo, exclude=tuple(exclude), exclude_glob=_globs_to_regex(exclude),
        layers=layers, first_under=_first_under(layers) if kind == "mixed" else {}, packed=packed, kv_on=_kv_on(kind, qc), profile=profile,
    )
