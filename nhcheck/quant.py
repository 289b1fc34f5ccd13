"""ModelOpt quantization as SGLang resolves it: which method each module prefix gets (spec §9).

Parses both config layouts (flat ``quantization_config`` in config.json, nested
``hf_quant_config.json``), normalises names with the outermost model class's rules,
and applies BOTH exclusion matchers (``is_layer_skipped`` at dotted-component
boundaries, ``is_layer_excluded`` with globs) and MIXED_PRECISION resolution.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import msgspec

from nhcheck.engines.sglang import SGLangProfile
from nhcheck.model import CAUSAL_LM

# Linear methods and the MoE methods they pair with (§8.4, §8.5).
UNQUANT = "UnquantizedLinearMethod"
FP8_LINEAR = "ModelOptFp8LinearMethod"
FP4_LINEAR = "ModelOptFp4LinearMethod"
A16_LINEAR = "ModelOptNvFp4A16LinearMethod"
BLOCK_FP8_LINEAR = "Fp8LinearMethod"
#: vLLM's ModelOpt NVFP4 linear method's class name up to 0.29.x (``ModelOptLinearMethod`` from 0.30.0). Kept
#: here, beside SGLang's names, so that ``slots`` (on every audit's path) need not import vLLM's release tables.
NVFP4_LINEAR = "ModelOptNvFp4LinearMethod"
#: Quantized linear methods: their scales go through the linear layers' loaders, which accept a one-element
#: scale only as 0-d or (1,) (Replicated/Column/RowParallelLinear.weight_loader reshape a 0-d tensor and
#: assert equal shapes; the v2 path's BasevLLMParameter._assert_and_load and
#: PerTensorScaleParameter._load_into_shard_id do the same). FusedMoE's expert scales broadcast instead.
LINEAR_METHODS = frozenset({FP8_LINEAR, FP4_LINEAR, A16_LINEAR, BLOCK_FP8_LINEAR})
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
    #: The raw sections as the engine sees them (None when absent), so that ``build_resolver`` can
    #: re-read them the way each SGLang release does (key names, KV derivation and the mixed-precision
    #: fallback differ between releases): config.json ``quantization_config`` and the whole
    #: hf_quant_config.json object. Left None by hand-built configs, which are then taken as given.
    flat: dict | None = field(default=None, compare=False, repr=False)
    hf_file: dict | None = field(default=None, compare=False, repr=False)
    #: What releases derive from the raw sections alike (the layer map as read, then as mapped by a rule
    #: set, with its prefix index), computed once per recipe: a matrix builds one manifest per epoch, and
    #: Super's 41,100 quantized_layers cost more to index than the manifest itself.
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_mixed(self) -> bool:
        return self.quant_algo == "MIXED_PRECISION"


def _layers_key(source: str, nested: bool) -> tuple[str, str, bool]:
    """``QuantConfig.derived``'s key for the layer map read from one section (``_engine_view``); the parser seeds it
    with the map it read from that same section object (Super's 41,100 layers: read once, not once more per
    manifest)."""
    return ("layers", source, nested)


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
    raw_file = hf_quant if isinstance(hf_quant, dict) else None
    if isinstance(qc, dict) and qc:
        # ``ModelConfig._parse_quant_hf_config``: a quantization_config *without* ``quant_method`` is
        # treated as ModelOpt, like ``quant_method: modelopt`` (0.5.11, 0.5.12 and 0.5.23).
        method = str(qc.get("quant_method", "modelopt")).lower()
        if not method.startswith(
            "modelopt"
        ):  # modelopt_fp8/_fp4/_mixed are ModelOpt too (override_quantization_method)
            return QuantConfig(
                "config.json",
                method or "unknown",
                qc.get("quant_algo"),
                None,
                None,
                (),
                problems=(
                    f"quantization_config.quant_method {method!r} is not ModelOpt; "
                    "nhcheck replays ModelOpt checkpoints only and treats this one as unquantised",
                ),
            )
        nested = (hf_quant or {}).get("quantization") if isinstance(hf_quant, dict) else None
        nested = nested if isinstance(nested, dict) else {}
        algo = qc.get("quant_algo")
        flat_layers = layers = _layers_map(qc.get("quantized_layers"))
        kv_algo = qc.get("kv_cache_quant_algo")
        kv_scheme = qc.get("kv_cache_scheme") if isinstance(qc.get("kv_cache_scheme"), dict) else None
        if str(algo).upper() == "MIXED_PRECISION":
            # SGLang falls back to hf_quant_config.json for what the config.json copy lacks.
            if not layers:
                layers = _layers_map(nested.get("quantized_layers"))
            if kv_algo is None and kv_scheme is None:
                kv_algo = nested.get("kv_cache_quant_algo")
        exclude = qc.get("ignore", qc.get("exclude_modules", [])) or []
        return QuantConfig(
            "config.json",
            "modelopt",
            str(algo).upper() if algo else None,
            kv_algo,
            kv_scheme,
            tuple(e for e in exclude if isinstance(e, str)) if isinstance(exclude, list) else (),
            layers,
            qc.get("group_size"),
            flat=qc,
            hf_file=raw_file,
            derived={_layers_key("config.json", False): flat_layers},
        )
    if isinstance(hf_quant, dict):
        q = hf_quant.get("quantization")
        if not isinstance(q, dict):
            return QuantConfig(
                "hf_quant_config.json",
                "modelopt",
                None,
                None,
                None,
                (),
                problems=("hf_quant_config.json has no 'quantization' object",),
            )
        return nested_recipe(q, "hf_quant_config.json", hf_file=raw_file)
    return None


def nested_recipe(section: dict, source: str, *, flat: dict | None = None, hf_file: dict | None = None) -> QuantConfig:
    """The recipe of ModelOpt's nested ``quantization`` section (hf_quant_config.json's, or the one config.json's
    ``quantization_config`` carries in that form): ``quant_algo``, ``exclude_modules``, the layer map."""
    algo = section.get("quant_algo")
    exclude = section.get("exclude_modules", section.get("ignore", [])) or []
    layers = _layers_map(section.get("quantized_layers"))
    seen = hf_file is not None and hf_file.get("quantization") is section  # what the engines' view reads (nested)
    return QuantConfig(
        source,
        "modelopt",
        str(algo).upper() if algo else None,
        section.get("kv_cache_quant_algo"),
        section.get("kv_cache_scheme") if isinstance(section.get("kv_cache_scheme"), dict) else None,
        tuple(e for e in exclude if isinstance(e, str)) if isinstance(exclude, list) else (),
        layers,
        section.get("group_size"),
        flat=flat,
        hf_file=hf_file,
        derived={_layers_key("hf_quant_config.json", True): layers} if seen else {},
    )


def component_runs(entries: Iterable[str]) -> Callable[[str], bool]:
    """Whether some entry is a contiguous run of whole dotted components of a name: ``.entry.`` within ``.name.``.

    Every dot of ``.name.`` separates two components, so ``.entry.`` occurs there exactly when the entry's
    components (``entry.split(".")``) are a contiguous run of the name's. Entries are indexed by their first
    component and their length: a name is a few set lookups, one per (component that starts an entry, length
    of such an entry), with nothing to compile (a regex alternation of a Nano recipe's 60 exclude entries
    costs more to compile than the manifest asks of it; its 60 entries all start with ``backbone``).
    """
    by_head: dict[str, dict[int, set[tuple[str, ...]]]] = {}
    for e in entries:
        parts = tuple(e.split("."))
        by_head.setdefault(parts[0], {}).setdefault(len(parts), set()).add(parts)

    def matches(name: str) -> bool:
        parts = name.split(".")
        for i, c in enumerate(parts):
            runs = by_head.get(c)
            if runs is not None:
                for n, group in runs.items():
                    if tuple(parts[i : i + n]) in group:
                        return True
        return False

    return matches


def _module_path_matcher(entries: tuple[str, ...], strip_dots: bool) -> Callable[[str], bool]:
    """``_module_path_match`` against every entry at once: whether some entry is a contiguous run of whole
    dotted components of the prefix (``component_runs``).

    SGLang tests ``prefix == entry or prefix.startswith(entry + ".") or ("." + entry + ".") in ("." + prefix
    + ".")``; the third test holds whenever one of the others does, so it alone decides.
    Trailing dots are stripped only from 0.5.23 on (``QU@0.5.23:48–59``); the 0.5.11/0.5.12 function
    compares the entry as written, so ``model.layers.4.`` matches nothing there.
    """
    return component_runs(e.rstrip(".") if strip_dots else e for e in entries)


def _glob_regex(pattern: str) -> str:
    """``is_layer_excluded``'s conversion (``MQ@0.5.23:308–313``, ``MQ@0.5.11:369``): ``.`` → ``\\.``, then
    ``*`` → ``.*``; every other character is left as regex syntax (``?``, ``[0-9]``, ``+``…), not escaped."""
    return pattern.replace(".", r"\.").replace("*", ".*")


#: An exclude glob whose converted regex holds no syntax but ``\.`` and ``.*`` (always compiles).
_PLAIN_GLOB = re.compile(r"[A-Za-z0-9_.*/:-]*").fullmatch


def _globs_to_matcher(patterns: list[str]) -> Callable[[str], bool] | None:
    """All exclude globs as one ``fullmatch`` test: whether some glob matches the whole name.

    A glob of plain name characters without ``*`` matches only itself (its regex is the name with ``.``
    escaped), so those are one set lookup; the rest are one regex alternation. Compiling a Nano recipe's
    60 module paths as a regex costs more than the manifest that asks them.
    """
    if not patterns:
        return None
    names = frozenset(p for p in patterns if "*" not in p and _PLAIN_GLOB(p))
    rx = _globs_to_regex([p for p in patterns if p not in names])
    if rx is None:
        return names.__contains__
    fullmatch = rx.fullmatch
    return lambda name: name in names or fullmatch(name) is not None


def _globs_to_regex(patterns: list[str]) -> re.Pattern[str] | None:
    """Exclude globs as one alternation, for ``fullmatch``."""
    if not patterns:
        return None
    parts = []
    for p in patterns:
        rx = _glob_regex(p)
        # A pattern of plain name characters converts to a valid regex: only one that holds other regex
        # syntax is compiled alone to find out.
        if not _PLAIN_GLOB(p):
            try:
                re.compile(rx)
            except re.error:
                rx = re.escape(p).replace(r"\*", ".*")  # SGLang itself would fail on it; match it literally
        parts.append("(?:" + rx + ")")
    try:
        return re.compile("|".join(parts))
    except re.error:  # e.g. back-references, whose numbers shift inside one alternation
        return re.compile("|".join("(?:" + re.escape(p).replace(r"\*", ".*") + ")" for p in patterns))


def first_under(layers: dict[str, str]) -> dict[str, str]:
    """Every dotted prefix of a key → the algorithm of the first key (in map order) below it.

    Each key's prefixes are walked from the longest: the first one already present was set by an
    earlier key, which set every shorter one too, so the walk stops there (Super: 41k keys × ~7 dots).
    """
    out: dict[str, str] = {}
    for key, algo in layers.items():
        i = key.rfind(".")
        while i != -1:
            prefix = key[:i]
            if prefix in out:
                break
            out[prefix] = algo
            i = key.rfind(".", 0, i)
    return out


class QuantResolver(msgspec.Struct, frozen=True, dict=True):
    """The quant config after the engine's normalisation, answering per-module questions.

    ``kind`` is the config class SGLang instantiates: ``fp8``, ``fp4``, ``mixed`` or None
    (no quantization, or an algorithm this release refuses — see ``refusal``).
    """

    kind: str | None
    algo: str | None
    exclude: tuple[str, ...]
    #: ``fullmatch`` of any exclude glob (``_globs_to_matcher``); None without excludes.
    exclude_glob: Callable[[str], bool] | None
    layers: dict[str, str]
    #: dotted prefix → algorithm of the first key (in map order) below it; replaces a scan of
    #: 41,100 keys per module on Super-size recipes.
    first_under: dict[str, str]
    packed: Mapping[str, tuple[str, ...]]
    kv_on: bool
    profile: SGLangProfile
    refusal: str | None = None

    @property
    def quantization(self) -> str | None:
        return {"fp8": "modelopt_fp8", "fp4": "modelopt_fp4", "mixed": "modelopt_mixed"}.get(self.kind or "")

    # -- exclusion --------------------------------------------------------------

    @cached_property
    def _path_match(self):
        return _module_path_matcher(self.exclude, self.profile.exclude_strips_dots)

    def _skipped(self, prefix: str) -> bool:
        """Whether an exclude entry names ``prefix`` as the release's ``is_layer_skipped`` compares them: exact
        membership (≤0.5.6), a substring (0.5.6.post1), dotted-path matching (0.5.11, one regex)."""
        mode = self.profile.skip_match
        if mode == "path":
            return self._path_match(prefix)
        if mode == "substring":
            return any(e in prefix for e in self.exclude)
        return prefix in self.exclude

    def is_layer_skipped(self, prefix: str) -> bool:
        last = prefix.rsplit(".", 1)[-1]
        shards = self.packed.get(last) or (_FUSED_FALLBACK.get(last) if self.profile.skip_match == "path" else None)
        if shards:
            votes = {self._skipped(prefix.replace(last, s)) for s in shards}
            if len(votes) > 1:
                raise QuantResolveError(
                    f"Detected some but not all shards of {prefix} are quantized. "
                    "All shards of fused layers to have the same precision."
                )
            skipped = votes.pop()
        else:
            skipped = self._skipped(prefix)
            if "gate_up_proj" in prefix:
                base = prefix.replace("gate_up_proj", "")
                if base + "gate_proj" in self.exclude and base + "up_proj" in self.exclude:
                    skipped = True
        if "experts" in prefix and not (skipped and self.profile.experts_skip_ored):
            skipped = any(prefix in e for e in self.exclude if "experts" in e)
        return skipped

    def is_layer_excluded(self, prefix: str) -> bool:
        cands = [prefix]
        if prefix.startswith("language_model."):
            cands.append(prefix[len("language_model.") :])
        if not self.profile.exclusion_v1 and self.kind == "fp8":
            # ≤0.5.8.post1 ModelOptFp8Config.is_layer_excluded: a substring test (MQ@0.5.8.post1:235).
            return any(e in c for e in self.exclude for c in cands)
        matches = self.exclude_glob
        if matches is None:
            return False
        if not self.profile.exclusion_v1:
            # ≤0.5.8.post1 ModelOptFp4Config: the glob must match the whole prefix.
            return matches(prefix)
        return any(matches(c) or any(matches(part) for part in c.split(".")) for c in cands)

    # -- mixed precision --------------------------------------------------------

    def _candidates(self, prefix: str) -> list[str]:
        out = [prefix]
        if not self.profile.mixed_candidate_prefixes:
            return out
        if prefix.endswith(".lm_head"):
            out.append("lm_head")
        if prefix.startswith("language_model.model."):
            out.append("model.language_model." + prefix[len("language_model.model.") :])
        elif prefix.startswith("model.language_model."):
            rest = prefix[len("model.language_model.") :]
            out.append("language_model.model." + rest)
            if self.profile.mixed_candidate_model_prefix:
                out.append("model." + rest)
        elif prefix.startswith("model.") and self.profile.mixed_candidate_model_prefix:
            out.append("model.language_model." + prefix[len("model.") :])
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
        return self._method(prefix, 0, UNQUANT)

    def moe_method(self, prefix: str) -> str:
        # FusedMoE can be excluded from exclusion_v1 on (MQ@0.5.9:301); before, it is always quantized.
        if self.kind is None or (self.profile.exclusion_v1 and self.is_layer_excluded(prefix)):
            return UNQUANT_MOE
        return self._method(prefix, 1, UNQUANT_MOE)

    def _method(self, prefix: str, which: int, unquantised: str) -> str:
        """The release's method for the module's algorithm (``which``: 0 linear, 1 MoE) once exclusion is passed."""
        if self.kind == "mixed":
            algo = self.resolve_algo(prefix)
            if algo is None or algo not in (self.profile.mixed_moe_algos if which else self.profile.mixed_algos):
                return unquantised
            return _ALGO_METHODS[algo][which]
        return _ALGO_METHODS[self.algo or ""][which]

    def linear_algo(self, prefix: str, *, lm_head: bool = False) -> str | None:
        """The algorithm behind ``linear_method`` (None when unquantised); needed for NVFP4_AWQ extras."""
        return self._algo(prefix, self.linear_method(prefix, lm_head=lm_head) == UNQUANT)

    def moe_algo(self, prefix: str) -> str | None:
        """The algorithm behind ``moe_method`` (None when unquantised)."""
        return self._algo(prefix, self.moe_method(prefix) == UNQUANT_MOE)

    def _algo(self, prefix: str, unquantised: bool) -> str | None:
        if unquantised:
            return None
        return self.resolve_algo(prefix) if self.kind == "mixed" else self.algo


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


def _group_size_found(cfg: dict) -> bool:
    """``ModelOptFp4Config.common_group_size``: top level, ``quantization`` block, or ``config_groups``."""
    sizes = [cfg.get("group_size")]
    q = cfg.get("quantization")
    if isinstance(q, dict):
        sizes.append(q.get("group_size"))
    groups = cfg.get("config_groups")
    for g in groups.values() if isinstance(groups, dict) else ():
        if isinstance(g, dict):
            sizes.append(g.get("group_size"))
            sizes += [sub.get("group_size") for sub in g.values() if isinstance(sub, dict)]
    return any(type(v) is int for v in sizes)


class _EngineView(msgspec.Struct, frozen=True):
    """The quant recipe as one release's config classes read it: which file, exclude list, layer map, KV scales,
    or the ValueError with which it refuses the config."""

    source: str
    exclude: tuple[str, ...]
    layers: dict[str, str]
    kv_on: bool
    refusal: str | None = None


def _str_list(v: object) -> tuple[str, ...]:
    return tuple(e for e in v if isinstance(e, str)) if isinstance(v, list) else ()


def _engine_view(qc: QuantConfig, kind: str, profile: SGLangProfile) -> _EngineView | None:
    """Re-read the raw sections the way this release's ``get_quant_config`` and ``from_config`` do.

    None for hand-built configs (no raw sections): their fields are taken as given.
    - Which dict: config.json ``quantization_config`` when present. With ``quant_mixed_fallback``: a
      ``modelopt_mixed`` copy lacking ``quantized_layers``, or lacking both ``kv_cache_quant_algo`` and
      ``kv_cache_scheme``, is replaced by the whole hf_quant_config.json (``WU@0.5.23`` get_quant_config);
      before, no such fallback (``WU@0.5.11:193–205``).
    - Exclude key (flat form): ModelOptFp8Config reads ``ignore`` only; ModelOptFp4Config ``ignore``
      (``quant_fp4_exclude_keys``: then ``modules_to_not_convert``, ``exclude_modules``); mixed ``ignore``
      (``quant_mixed_exclude_modules``: then ``exclude_modules``). Nested form: ``exclude_modules`` only.
    - KV (§9.6): FP4 always truthy ("auto"). FP8 flat: a ``kv_cache_scheme`` dict decides (float/8 →
      FP8, else none); without one, ``quant_mixed_fallback`` releases read ``kv_cache_quant_algo``, earlier
      ones nothing. Mixed flat: any ``kv_cache_scheme`` dict is truthy (FP8/NVFP4/"auto"); without one, as
      FP8. Nested: ``kv_cache_quant_algo``.
    """
    if qc.flat is None and qc.hf_file is None:
        return None
    flat = qc.flat if isinstance(qc.flat, dict) and qc.flat else None
    if (
        flat is not None
        and kind == "mixed"
        and profile.quant_mixed_fallback
        and ("quantized_layers" not in flat or ("kv_cache_quant_algo" not in flat and "kv_cache_scheme" not in flat))
    ):
        if qc.hf_file is None:
            return _EngineView(
                "hf_quant_config.json", (), {}, False, "ValueError: Cannot find the config file for modelopt_mixed"
            )
        flat = None
    if flat is not None:
        section, nested, source = flat, False, "config.json"
    else:
        f = qc.hf_file or {}
        nested = isinstance(f.get("quantization"), dict)
        section, source = (f["quantization"] if nested else f), "hf_quant_config.json"
    refusal = None
    if nested:
        exclude_raw = section.get("exclude_modules", [] if kind == "fp4" else None)
        kv_on = kind == "fp4" or bool(section.get("kv_cache_quant_algo"))
    else:
        if kind == "fp8":
            exclude_raw = section.get("ignore")
        elif kind == "fp4":
            exclude_raw = (
                section.get("ignore", section.get("modules_to_not_convert", section.get("exclude_modules", [])))
                if profile.quant_fp4_exclude_keys
                else section.get("ignore", [])
            )
        else:
            exclude_raw = (
                section.get("ignore", section.get("exclude_modules"))
                if profile.quant_mixed_exclude_modules
                else section.get("ignore")
            )
        scheme = section.get("kv_cache_scheme")
        if kind == "fp4":
            kv_on = True
        elif isinstance(scheme, dict):
            kv_on = kind == "mixed" or (scheme.get("type") == "float" and scheme.get("num_bits") == 8)
        else:
            kv_on = profile.quant_mixed_fallback and bool(section.get("kv_cache_quant_algo"))
    if kind == "fp4":
        # ModelOptFp4Config.from_config: "NVFP4 quantization requires group_size and exclude_modules".
        # From quant_mixed_exclude_modules on (0.5.17) the flat group_size defaults to 16 for NVFP4 algorithms.
        if nested:
            group_ok = _group_size_found(qc.hf_file or {})
        else:
            groups = section.get("config_groups")
            first: object = next(iter(groups.values()), {}) if isinstance(groups, dict) and groups else {}
            weights = first.get("weights", {}) if isinstance(first, dict) else {}
            group_ok = (
                section.get("group_size") is not None
                or (isinstance(weights, dict) and weights.get("group_size") is not None)
                or profile.quant_mixed_exclude_modules
            )
        if not group_ok or exclude_raw is None:
            refusal = (
                "ValueError: NVFP4 quantization requires group_size and exclude_modules specified in the "
                "quantization config"
            )
    layers: dict[str, str] = {}
    if kind == "mixed":
        key = _layers_key(source, nested)
        layers = qc.derived.get(key) or qc.derived.setdefault(key, _layers_map(section.get("quantized_layers")))
    return _EngineView(source, _str_list(exclude_raw), layers, kv_on, refusal)


def _map_prefix(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        if name.startswith(old):
            name = new + name[len(old) :]
    return name


def _map_prefixes(names: Iterable[str], rules: tuple[tuple[str, str], ...]) -> list[str]:
    """``_map_prefix`` of every name, rule by rule over the whole list (Super's 41k layer names: no call per name)."""
    out = list(names)
    for old, new in rules:
        cut = len(old)
        out = [new + n[cut:] if n.startswith(old) else n for n in out]
    return out


def build_resolver(
    qc: QuantConfig | None, outer_class: str, profile: SGLangProfile, *, mtp: bool = False
) -> QuantResolver:
    """Normalise the recipe with the outermost class's ``remap_prefix``, mapper and packed mapping (§9.2)."""
    if qc is None or qc.quant_method != "modelopt" or qc.quant_algo is None:
        return QuantResolver(None, None, (), None, {}, {}, {}, False, profile)
    algo = qc.quant_algo
    refusal = None
    if algo == "MIXED_PRECISION":
        kind = "mixed"
        if not qc.quantized_layers and qc.flat is None and qc.hf_file is None:
            refusal = "ValueError: MIXED_PRECISION quantization requires a non-empty quantized_layers map"
    elif algo == "FP8" and "FP8" in profile.modelopt_algos:
        kind = "fp8"
    elif algo in profile.modelopt_algos:
        kind = "fp4"
    else:
        kind = None
        refusal = (
            "ValueError: ModelOpt currently only supports: "
            + ", ".join(sorted(profile.modelopt_algos | {"MIXED_PRECISION"}))
            + f" (got {algo})"
        )
    if kind is None or refusal:
        return QuantResolver(None, algo, (), None, {}, {}, {}, False, profile, refusal)
    view = _engine_view(qc, kind, profile)
    if view is not None:
        if view.refusal:
            return QuantResolver(None, algo, (), None, {}, {}, {}, False, profile, view.refusal)
        if kind == "mixed" and not view.layers:
            return QuantResolver(
                None,
                algo,
                (),
                None,
                {},
                {},
                {},
                False,
                profile,
                "ValueError: MIXED_PRECISION quantization requires a non-empty quantized_layers map",
            )
        source, exclude, base_layers, kv_on = view.source, list(view.exclude), view.layers, view.kv_on
    else:
        source, exclude, base_layers, kv_on = qc.source, list(qc.exclude), dict(qc.quantized_layers), _kv_on(kind, qc)

    is_causal = outer_class not in (
        "NemotronH_Nano_VL_V2",
        "NemotronH_Nano_Omni_Reasoning_V3",
        "NemotronH_Omni_Reasoning_V3",
    )
    if source == "hf_quant_config.json" and is_causal:
        # get_quant_config: replace_prefix(entry, remap_prefix) on the file's exclude list (no dot needed).
        exclude = ["model" + e[len("backbone") :] if e.startswith("backbone") else e for e in exclude]
    rules: tuple[tuple[str, str], ...] | None
    if is_causal and profile.quant_name_mapper:
        rules = (("backbone.", "model."),)
        if mtp and profile.mtp_strip_language_model:
            rules += (("language_model.mtp.", "mtp."),)
    elif profile.vl_quant_mapper:
        rules = (("language_model.backbone.", "language_model.model."),)
    else:
        rules = None
    layers = base_layers
    if rules is not None:
        mapped: dict[str, None] = {}
        for e in exclude:
            m = _map_prefix(e, rules)
            mapped[m] = None
            if m.startswith("language_model."):
                mapped[m[len("language_model.") :]] = None
        exclude = list(mapped)
    under: dict[str, str] = {}
    if kind == "mixed":
        # The mapped layer map and its index depend on the recipe and the rules only (``QuantConfig.derived``).
        key = ("mapped", id(base_layers), rules)
        cached = qc.derived.get(key)
        if cached is None or cached[0] is not base_layers:
            mapped_layers = (
                dict(layers) if rules is None else dict(zip(_map_prefixes(layers, rules), layers.values(), strict=True))
            )
            cached = qc.derived[key] = (base_layers, mapped_layers, first_under(mapped_layers))
        layers, under = cached[1], cached[2]
    else:
        layers = dict(layers)
    packed = (
        {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
        if outer_class
        in (CAUSAL_LM, "NemotronHPuzzleForCausalLM", "NemotronH_Omni_Reasoning_V3", "NemotronHForCausalLMMTP")
        else {}
    )
    return QuantResolver(
        kind=kind,
        algo=algo,
        exclude=tuple(exclude),
        exclude_glob=_globs_to_matcher(exclude),
        layers=layers,
        first_under=under,
        packed=packed,
        kv_on=kv_on,
        profile=profile,
    )
