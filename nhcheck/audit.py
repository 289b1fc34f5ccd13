"""Run checkpoint × manifest × engine replay into an ``AuditReport``: outcomes, coverage, findings, verdict.

Decides; never prints. The report module renders what this module concluded.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress, count
from operator import eq, itemgetter
from typing import NamedTuple, overload

import msgspec

from nhcheck import collapse, coverage, slots
from nhcheck.checkpoint import Checkpoint
from nhcheck.coverage import ParamState
from nhcheck.dtypes import FLOAT_PARAM, PACKED_CKPT, PACKED_PARAM
from nhcheck.engines.base import (
    EXPERT_INDEX,
    Crash,
    Engine,
    EngineId,
    EnvironmentAlternative,
    Outcome,
    PPWindow,
    default_loader_error,
)
from nhcheck.errors import UsageError
from nhcheck.findings import Finding, Severity, Verdict, grouped, severity_rank, verdict_of
from nhcheck.manifest import Manifest, Param
from nhcheck.model import NemotronHConfig
from nhcheck.quant import A16_LINEAR, FP4_LINEAR, FP8_LINEAR, LINEAR_METHODS, QuantConfig, component_runs
from nhcheck.safetensors_header import TensorInfo

#: A TensorRecord's tensor, outcome and parameter fields; an Outcome's kind and parameter (columns taken in C).
_TENSOR, _OUTCOME, _RECORD_PARAM = itemgetter(0), itemgetter(1), itemgetter(3)
_OUTCOME_KIND, _OUTCOME_PARAM = itemgetter(0), itemgetter(1)
_NAME = itemgetter(0)  # TensorInfo.name


class TensorRecord(NamedTuple):
    """One checkpoint tensor and what the engine does with it; ``param`` is the full runtime name."""

    tensor: TensorInfo
    outcome: Outcome
    orphan: bool
    param: str | None
    ignored: bool


_new = tuple.__new__


class TensorRecords(Sequence[TensorRecord]):
    """Every tensor's record, in checkpoint order, kept as columns: the tensors, their outcomes, and the records
    that say more than the replay did (``changed``: an orphan, a tensor that raises instead, an ignored one, a
    parameter named otherwise than its outcome names it, as a wrapper's language-model prefix). Every other
    record is ``(tensor, outcome, False, outcome.param, False)``, made only when it is asked for.

    Columns rather than a tuple of records: on Super (165,860 tensors) making and freeing a record per tensor
    cost as much as gathering them, and what a CLI audit reads (the counts, the JSON rows, the table's
    non-loads) is read straight from the columns. Callers that iterate (prune, load, values) get the records.
    """

    __slots__ = ("changed", "outcomes", "tensors")

    def __init__(self, tensors: list[TensorInfo], outcomes: list[Outcome], changed: dict[int, TensorRecord]) -> None:
        self.tensors = tensors
        self.outcomes = outcomes
        self.changed = changed

    @classmethod
    def of(cls, records: Iterable[TensorRecord]) -> TensorRecords:
        """The columns of any records (a report built by hand)."""
        recs = list(records)
        changed = {i: r for i, r in enumerate(recs) if r[2] or r[4] or r[3] != r[1][1]}
        return cls(list(map(_TENSOR, recs)), list(map(_OUTCOME, recs)), changed)

    def __len__(self) -> int:
        return len(self.tensors)

    @overload
    def __getitem__(self, i: int) -> TensorRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[TensorRecord]: ...
    def __getitem__(self, i: int | slice) -> TensorRecord | list[TensorRecord]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.tensors)))]
        if i < 0:
            i += len(self.tensors)
        r = self.changed.get(i)
        if r is None:
            t, o = self.tensors[i], self.outcomes[i]  # IndexError past the end, as a tuple's
            return _new(TensorRecord, (t, o, False, o[1], False))
        return r

    def __iter__(self) -> Iterator[TensorRecord]:
        changed = self.changed
        for i, t, o in zip(count(), self.tensors, self.outcomes, strict=False):
            r = changed.get(i) if changed else None
            yield _new(TensorRecord, (t, o, False, o[1], False)) if r is None else r

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(map(eq, self, other))

    __hash__ = None  # type: ignore[assignment]

    def not_loading(self) -> list[TensorRecord]:
        """The records whose outcome is not a load, in order (Super: 1,040 of 165,860), found in C."""
        outcomes, changed = self.outcomes, self.changed
        at = set(compress(range(len(outcomes)), map("load".__ne__, map(_OUTCOME_KIND, outcomes))))
        for i, r in changed.items():
            (at.discard if r[1][0] == "load" else at.add)(i)
        return [self[i] for i in sorted(at)]


class ParamStatus(msgspec.Struct, frozen=True):
    name: str
    param: Param
    status: ParamState
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditReport:
    source: str
    revision: str | None
    engine: EngineId
    config: NemotronHConfig
    quant: str | None
    manifest: Manifest
    checkpoint: Checkpoint
    records: TensorRecords
    params: tuple[ParamStatus, ...]
    findings: tuple[Finding, ...]
    crash: Crash | None
    verdict: Verdict
    ignored: int = 0
    other_versions: dict[EngineId, str] = field(default_factory=dict)
    mtp: bool = False
    pp: PPWindow | None = None  # the pipeline rank audited (``--pp``)
    tp_sizes: tuple[int, ...] = ()  # the TP sizes checked statically (``audit --tp``); their findings are in findings

    def __post_init__(self) -> None:
        if not isinstance(self.records, TensorRecords):  # records given as a sequence (a report built by hand)
            object.__setattr__(self, "records", TensorRecords.of(self.records))

    def tp_errors(self) -> dict[int, int]:
        """Per checked TP size, how many ``tp-indivisible`` finding groups stop it (0: it shards cleanly)."""
        out = {tp: 0 for tp in self.tp_sizes}
        for f in self.findings:
            if f.code == "tp-indivisible" and f.tp is not None:
                out[f.tp] = out.get(f.tp, 0) + 1
        return out

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @cached_property
    def _counts(self) -> dict[str, int]:
        """Tensors per outcome, orphans (not ignored) and by-design non-loads; counted once (165k records).

        The replay's outcomes are counted in C; only the changed records (few: every orphan is one) are visited.
        A non-load that is no orphan is by design.
        """
        c = {"load": 0, "warn": 0, "skip": 0, "raise": 0, "routed": 0, "orphans": 0, "by_design": 0}
        recs = self.records
        kinds = Counter(map(_OUTCOME_KIND, recs.outcomes))
        orphans_not_loading = 0
        for i, r in recs.changed.items():
            kinds[recs.outcomes[i][0]] -= 1
            kinds[r[1][0]] += 1
            if r[2]:  # an orphan
                if not r[4]:  # not ignored
                    c["orphans"] += 1
                if r[1][0] != "load":
                    orphans_not_loading += 1
        for outcome, n in kinds.items():
            c[outcome] += n
        c["by_design"] = len(recs) - kinds["load"] - orphans_not_loading
        return c

    def summary_line(self) -> str:
        """One line for comparing engine versions: verdict plus what drives it."""
        c = self.counts()
        mism = sum(1 for f in self.findings if f.code == "quant-mismatch")
        bits: list[str] = [self.verdict]
        if self.crash:
            bits.append(f"raises {self.crash.error}")
        if c["orphans"]:
            bits.append(f"{c['orphans']:,} orphan tensors")
        if mism:
            bits.append("quantized bytes into unquantized parameters")
        return ": ".join(bits[:1]) + (" (" + "; ".join(bits[1:]) + ")" if len(bits) > 1 else "")

    def exit_code(self, fail_on: str = "warning") -> int:
        if fail_on == "none":
            return 0
        gate = severity_rank(fail_on)
        return 1 if any(severity_rank(f.severity) >= gate for f in self.findings) else 0


class AuditOptions(msgspec.Struct, frozen=True):
    mtp: bool = False
    pp: PPWindow | None = None
    ignore: tuple[str, ...] = ()
    compare_versions: bool = True
    #: Check the quant recipe against the tensors (``recipe-mismatch``, ``kv-scales-absent``: findings only, nothing
    #: a load decides by). A load reports what memory holds, not these, and skips it: a quarter of the audit a
    #: release-size load waits on before its plan (Nano NVFP4, 24,147 tensors: 21 ms of 79 ms on the dev VM).
    recipe: bool = True


# ---------------------------------------------------------------------------


class Replayed(NamedTuple):
    """A whole replay: every tensor's record as the replay left it (no orphan, not ignored), in checkpoint order,
    and whether a wrapper routed it in its first phase."""

    records: TensorRecords
    #: Per tensor, routed in the wrapper's first phase; None without a wrapper (no tensor is).
    phases: list[bool] | None


def replay_tensors(
    ckpt: Checkpoint, cfg: NemotronHConfig, manifest: Manifest, engine: Engine, opts: AuditOptions
) -> Replayed:
    """Every tensor's record (outcome and full param name), in checkpoint order, and the wrapper's phases."""
    replay = engine.replayer(manifest, cfg, mtp=opts.mtp, pp=opts.pp)
    tensors = list(ckpt.tensors())
    if opts.mtp or cfg.wrapper is None:  # a comprehension: the loop of every audit, 165k names on Super
        return Replayed(TensorRecords(tensors, [replay(t[0]) for t in tensors], {}), None)
    outcomes: list[Outcome] = []
    changed: dict[int, TensorRecord] = {}
    phases: list[bool] = []
    prefix = manifest.lm_prefix
    for i, t in enumerate(tensors):
        r = engine.route(t.name, cfg)
        if r.target == "lm":
            o = replay(r.inner or "")
            outcomes.append(o)
            param = prefix + o.param if o.param else None
            if param != o.param:  # the full runtime name: the wrapper's prefix on the language model's own
                changed[i] = TensorRecord(t, o, False, param, False)
            phases.append(False)
            continue
        if r.target == "projector":
            o = engine.replay_projector(r.inner or t.name, manifest)
        elif r.target == "tower":
            o = Outcome("routed", reason="routed")
        elif r.target == "raise":
            o = Outcome("raise", message=r.message, reason="wrapper-raise")
        else:
            o = Outcome("skip", reason="wrapper-mtp" if t.name.startswith("mtp.") else "wrapper-ignored")
        outcomes.append(o)
        phases.append(True)
    return Replayed(TensorRecords(tensors, outcomes, changed), phases)


class Gathered(NamedTuple):
    """One replay gathered by load key: what every audit of it starts from (a matrix shares it between epochs).

    ``records`` holds each tensor as its replay left it, not ignored and no orphan; what the audit then
    decides (per load key, per tensor that does not load) changes only the few records it concerns.
    """

    records: TensorRecords
    #: Per tensor, routed in the wrapper's first phase (``Replayed.phases``).
    phases: list[bool] | None
    #: (parameter, shard id, dtype, shape) of every load → the positions of its tensors, ascending.
    keys: dict[tuple[str, str | None, str, tuple[int, ...]], list[int]]
    #: Parameter → (shard id, expert id) of every tensor that loads into it.
    loads: dict[str, set[tuple[str | None, int | None]]]
    #: Positions of the tensors that do not load.
    unloaded: list[int]


class Gatherer:
    """A replay gathered by load key as it comes, a stretch of tensors at a time, in checkpoint order: a load's
    plan a shard at a time gathers each shard beside the transfer, and only the audit is left after the last."""

    def __init__(self) -> None:
        self.keys: dict[tuple, list[int]] = {}
        self.loads: defaultdict[str, set] = defaultdict(set)
        self.unloaded: list[int] = []
        self.n = 0  # tensors gathered so far: the next one's position

    def add(self, tensors: Sequence[TensorInfo], outcomes: Sequence[Outcome], params: Iterable[str | None]) -> None:
        """The next tensors, their outcomes and each one's parameter (its outcome's, but where a record says
        otherwise: a wrapper's prefix), in one pass (165k tensors on Super)."""
        keys, loads, unloaded = self.keys, self.loads, self.unloaded
        for i, t, o, param in zip(count(self.n), tensors, outcomes, params, strict=False):  # positional
            if param is not None and o[0] == "load":  # a load always names its parameter
                key = (param, o[2], t[1], t[2])
                at = keys.get(key)
                if at is None:
                    keys[key] = [i]
                else:
                    at.append(i)
                loads[param].add((o[2], o[3]))
            else:
                unloaded.append(i)
        self.n += len(tensors)

    def gathered(self, records: TensorRecords, phases: list[bool] | None) -> Gathered:
        """What was gathered, as the ``Gathered`` of ``records`` (which must be the tensors added, in order)."""
        if self.n != len(records):
            raise RuntimeError(f"internal error: {self.n} tensors gathered for {len(records)} records")
        return Gathered(records, phases, self.keys, dict(self.loads), self.unloaded)


def gather(replayed: Replayed) -> Gathered:
    """Gather a whole replay by load key, in one pass."""
    records = replayed.records
    params = map(_RECORD_PARAM, records) if records.changed else map(_OUTCOME_PARAM, records.outcomes)
    g = Gatherer()
    g.add(records.tensors, records.outcomes, params)
    return g.gathered(records, replayed.phases)


def _slot_shape(p: Param, shard_id: str | None) -> tuple[int, ...] | None:
    """Shape a checkpoint tensor must have to land in this slot; None = a scalar slot (any 1-element tensor)."""
    shape = p.shape
    if p.loader == "expert":
        sub = shape[1:]
        return None if sub in ((), (1,)) else sub
    if p.loader == "stacked" and p.slots:
        for sid, _off, size in p.slots:
            if sid == shard_id:
                if size == 1 and len(shape) == 1 and shape[0] == len(p.slots):
                    return None
                return (size,) + shape[1:]
        return shape
    if len(shape) <= 1 and p.quant_method and ("scale" in p.name.rsplit(".", 1)[-1]):
        return None
    return shape


def param_view(p: Param) -> tuple[object, ...]:
    """What the audit itself asks of a parameter (engines answer their own questions): everything but the
    dtype and quant method names, which it only classifies — packed / float / unknown, and set at all, a
    quantized linear method, FP8, NVFP4 or W4A16 (``_slot_shape``, ``_slot_problem``, ``slots``). Two
    parameters with equal views are audited alike; a matrix keys its shared audits on it."""
    q = p.quant_method
    return (
        p.name,
        p.shape,
        p.loader,
        p.slots,
        p.num_experts,
        p.shard_ids,
        p.reachable,
        p.informational,
        (p.dtype in PACKED_PARAM, p.dtype in FLOAT_PARAM, p.dtype == "unknown"),
        (q is None, bool(q), q in LINEAR_METHODS, q == FP8_LINEAR, q in (FP4_LINEAR, A16_LINEAR), q == A16_LINEAR),
    )


def _slot_problem(dtype: str, shape: tuple[int, ...], shard_id: str | None, p: Param) -> tuple[str, str] | None:
    """(code, message) when a tensor of ``dtype``/``shape`` cannot land in this slot of ``p``."""
    if p.dtype in PACKED_PARAM or p.dtype in FLOAT_PARAM:
        packed_ckpt = dtype in PACKED_CKPT
        if packed_ckpt != (p.dtype in PACKED_PARAM):
            what = (
                f"quantized ({dtype}) bytes into the unquantized {p.dtype} parameter"
                if packed_ckpt
                else f"an unquantized {dtype} tensor into the quantized {p.dtype} parameter"
            )
            return "quant-mismatch", f"loads {what} {p.name}"
    if not p.shape and p.dtype == "unknown":
        return None
    want = _slot_shape(p, shard_id)
    if want is None:
        n = 1
        for d in shape:
            n *= d
        if n == 1 and len(shape) > 1 and p.loader != "expert" and p.quant_method in LINEAR_METHODS:
            return "shape-mismatch", (
                f"{list(shape)} into the one-element scale slot of {p.name}: the linear loader "
                "reshapes only a 0-d scale and asserts equal shapes"
            )
        return None if n == 1 else ("shape-mismatch", f"{list(shape)} into a one-element slot of {p.name}")
    if shape != tuple(want):
        return "shape-mismatch", f"{dtype} {list(shape)} but {p.name} expects {list(want)} here"
    return None


_SECOND = itemgetter(1)


def _coverage(manifest: Manifest, loads: dict[str, set]) -> list[ParamStatus]:
    out = []
    for p in manifest.params:
        got = loads.get(p.name)
        if not p.reachable:
            out.append(ParamStatus(p.name, p, "unreachable"))
            continue
        if not got:
            out.append(ParamStatus(p.name, p, "unfilled"))
            continue
        missing: list[str] = []
        if p.loader == "stacked":
            need = [s[0] for s in p.slots] or ["q", "k", "v"]
            have = {sid for sid, _ in got}
            missing = [f"shard {s}" for s in need if s not in have]
        elif p.loader == "expert" and p.num_experts:
            have = set(map(_SECOND, got))  # in C: an expert parameter has a slot per expert and shard
            absent = [] if have.issuperset(range(p.num_experts)) else [e for e in range(p.num_experts) if e not in have]
            if absent:
                missing = ["expert " + collapse.render_set(absent)]
        out.append(ParamStatus(p.name, p, "partial" if missing else "filled", tuple(missing)))
    return out


_QUANTISABLE = frozenset(
    {
        "in_proj",
        "out_proj",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj",
        "fc1_latent_proj",
        "fc2_latent_proj",
        "lm_head",
        "eh_proj",
    }
)
_FAMILY = {
    "NVFP4": "NVFP4",
    "NVFP4_AWQ": "NVFP4",
    "W4A16_NVFP4": "NVFP4",
    "FP8": "FP8",
    "FP8_PB_WO": "FP8",
    "FP8_BLOCK_SCALES": "FP8",
    "MXFP8": "FP8",
}


def _exporter_excluded(entries: tuple[str, ...]) -> Callable[[str], bool]:
    """Matcher for exclude entries as the exporter wrote them: whole dotted components, or globs.

    A plain entry matches a module it is a run of whole dotted components of (``quant.component_runs``; a
    Nano recipe has ~55, asked of 6k modules). The one regex it replaces, ``(?:^|.*\\.)(?:entries)(?:\\..*)?``,
    says the same of a name without a newline (``.`` does not match one), and still answers for a name with
    one: it is compiled only when such a name comes.
    """
    plain = [e.rstrip(".") for e in entries if "*" not in e]
    globs = [fnmatch.translate(e)[:-2] for e in entries if "*" in e]  # no trailing \Z: fullmatch anchors
    parts = (["(?:^|.*\\.)(?:" + "|".join(re.escape(e) for e in plain) + ")(?:\\..*)?"] if plain else []) + globs
    if not parts:
        return lambda _module: False
    dotted = component_runs(plain) if plain else None
    globbed = re.compile("|".join(f"(?:{p})" for p in globs)).fullmatch if globs else None

    def excluded(module: str) -> bool:
        if "\n" in module:
            return re.fullmatch("|".join(f"(?:{p})" for p in parts), module) is not None
        return (dotted is not None and dotted(module)) or (globbed is not None and globbed(module) is not None)

    if globs:
        return excluded
    # Expert modules (6k on Nano) answered once per name around the expert index: a plain entry can tell two
    # experts of one module apart only by naming the index as one of its own dotted components.
    components = {c for e in plain for c in e.split(".")}
    by_template: dict[tuple[str, str], bool] = {}
    split = EXPERT_INDEX.split

    def excluded_by_template(module: str) -> bool:
        if "experts." not in module or "\n" in module:
            return excluded(module)
        around = split(module + ".")  # the index is the last component of an expert's own module path too
        if len(around) != 3 or around[1] in components:
            return excluded(module)
        key = (around[0], around[2])
        hit = by_template.get(key)
        if hit is None:
            hit = by_template[key] = excluded(module)
        return hit

    return excluded_by_template


def _recipe_findings(ckpt: Checkpoint, qc: QuantConfig | None) -> list[Finding]:
    """The quant recipe against the tensors, in checkpoint names (independent of the engine: computed once per
    checkpoint and recipe, ``QuantConfig.derived``, however many releases a matrix audits)."""
    if qc is None or qc.quant_method != "modelopt" or not qc.quant_algo:
        return []
    cached = qc.derived.get(("recipe", id(ckpt)))
    if cached is None or cached[0] is not ckpt:
        cached = qc.derived[("recipe", id(ckpt))] = (ckpt, _recipe_check(ckpt, qc))
    return list(cached[1])


def _recipe_check(ckpt: Checkpoint, qc: QuantConfig) -> list[Finding]:
    # Comprehensions and hoisted lookups: on Super this walks 166k tensors and 41k weights.
    weights = {t[0][:-7]: t for s in ckpt.shards for t in s.tensors if t[0].endswith(".weight")}
    has_kv = not qc.kv_cache_quant_algo or any(
        t[0].endswith(("k_scale", "v_scale")) for s in ckpt.shards for t in s.tensors
    )
    excluded = _exporter_excluded(qc.exclude)
    declared_of = qc.quantized_layers.get if qc.is_mixed else None
    algo, family = qc.quant_algo, _FAMILY.get
    found: list[tuple[str, str, Finding]] = []
    for module, w in weights.items():
        if module.rpartition(".")[2] not in _QUANTISABLE:
            continue
        if declared_of is not None:
            declared = declared_of(module)
        else:
            declared = None if excluded(module) else algo
        dtype = w[1]
        actual = "NVFP4" if dtype == "U8" else "FP8" if dtype.startswith("F8") else None
        if family(declared or "", declared) != actual:
            msg = f"the quant config says {declared or 'unquantized'} but the weight is {dtype}" + (
                " (quantized)" if actual else ""
            )
            found.append(("recipe-mismatch", module, Finding("warning", "recipe-mismatch", msg, w.shard, w.name)))
    if qc.kv_cache_quant_algo and not has_kv:
        found.append(
            (
                "kv",
                "",
                Finding(
                    "info",
                    "kv-scales-absent",
                    f"kv_cache_quant_algo is {qc.kv_cache_quant_algo} but the checkpoint has no "
                    "k_scale/v_scale tensors; the engine keeps its default KV scales",
                ),
            )
        )
    return grouped(found)


def check_mtp_draft(ckpt: Checkpoint, cfg: NemotronHConfig) -> None:
    """``--mtp`` on a checkpoint without an MTP draft is a usage error (exit 2), not an incomplete draft.

    No draft means: the config declares no MTP layers (``num_nextn_predict_layers`` 0 and no MTP
    pattern) and no checkpoint tensor belongs to an MTP block (``mtp.*``, or ``*.mtp.*`` in a wrapper).
    A config that declares a draft whose tensors are absent is a real finding and is audited.
    """
    if cfg.has_mtp or cfg.mtp_pattern:
        return
    if any(t.name.startswith("mtp.") or ".mtp." in t.name for t in ckpt.tensors()):
        return
    raise UsageError(
        f"{ckpt.source} has no MTP draft (config.json declares no num_nextn_predict_layers and no "
        "checkpoint tensor is mtp.*): run without --mtp"
    )


class _LoadDecision(NamedTuple):
    """What the audit concludes about loads of one (parameter, shard id, dtype, shape): the same for every
    tensor with that key, so it is decided once per key (Super: 165k loads, a few thousand keys)."""

    #: ``default_weight_loader``'s size assertion (``default_loader_error``): the tensor raises instead of loading.
    plain_error: str | None
    #: The engine's weight loader raises on this shape (``Engine.load_error``).
    load_error: str | None
    #: The load succeeds but fills part of the slot (``Engine.slot_note``).
    note: str | None
    #: (code, message) of a slot the tensor does not fit (``_slot_problem``).
    problem: tuple[str, str] | None
    #: The parameter, when a scalar lands in slot 0 only of its scale vector (``nhcheck.slots``).
    slot0: Param | None


#: A load with nothing to report: the common case, told apart by identity.
_CLEAN = _LoadDecision(None, None, None, None, None)


def startup_refusal(manifest: Manifest) -> str | None:
    """The quant-config problem the engine refuses at start-up, before the first tensor (``_REFUSALS``), if any."""
    return next((p for p in manifest.problems if p.startswith(_REFUSALS)), None)


def as_raised(o: Outcome, decision: _LoadDecision) -> Outcome:
    """What a load becomes where the checks of its key say the engine raises on it (``plain_error`` or
    ``load_error`` set): the size assertion of ``default_weight_loader``, else the parameter's own weight loader."""
    if decision.plain_error is not None:
        return _new(Outcome, ("raise", None, None, None, None, decision.plain_error, "size-assert"))
    return o._replace(outcome="raise", message=decision.load_error, reason="loader")


def load_decider(manifest: Manifest, engine: Engine) -> Callable[[tuple], _LoadDecision]:
    """``decide((param, shard_id, dtype, shape))``: the audit's checks of one kind of load, ``_CLEAN`` when none fires.

    A parameter the manifest lacks (a supplied manifest that names fewer) is not checked at all.
    """
    by_name = manifest.by_name

    def decide(key: tuple) -> _LoadDecision:
        param, shard_id, dtype, shape = key
        p = by_name.get(param)
        if p is None:
            return _CLEAN
        if p.loader == "plain" and (error := default_loader_error(p.shape, shape)) is not None:
            return _LoadDecision(error, None, None, None, None)
        vector = slots.scalar_into_vector(p, shape) and not engine.loader_semantics(p.quant_method).scalar_every_slot
        d = _LoadDecision(
            None,
            engine.load_error(p, shard_id, dtype, shape),
            engine.slot_note(p, dtype, shape),
            _slot_problem(dtype, shape, shard_id, p),
            p if vector else None,
        )
        return _CLEAN if d == _CLEAN else d

    return decide


def run_audit(
    ckpt: Checkpoint,
    cfg: NemotronHConfig,
    qc: QuantConfig | None,
    manifest: Manifest,
    engine: Engine,
    opts: AuditOptions | None = None,
    *,
    moe_backend: str | None = None,
    replayed: Gathered | None = None,
) -> AuditReport:
    """Replay every tensor, cover every parameter, and turn the result into findings and a verdict.

    ``replayed``: ``gather(replay_tensors(...))`` for this manifest and engine, when the caller already has
    it (a matrix: releases that replay the checkpoint alike share one replay and its gathering).
    """
    opts = opts or AuditOptions()
    if opts.mtp:
        check_mtp_draft(ckpt, cfg)
    refusal = startup_refusal(manifest)
    # A start-up refusal builds no model and loads nothing (the engine's goldens list no tensor outcomes):
    # replaying its tensors against no parameters would only invent outcomes beside the crash.
    built = not (refusal and not manifest.params)
    if not built:
        replayed = gather(Replayed(TensorRecords([], [], {}), None))
    elif replayed is None:
        replayed = gather(replay_tensors(ckpt, cfg, manifest, engine, opts))
    g = replayed
    ignore = opts.ignore
    replayed_records = g.records
    # The records this audit changes, over the replay's (a matrix shares those: they are never changed).
    changed = dict(replayed_records.changed)
    matched: set[str] = set()  # --ignore patterns that matched a tensor or a parameter
    n_ignored = 0
    if ignore:
        match = fnmatch.fnmatchcase
        for i, name in enumerate(map(_NAME, replayed_records.tensors)):
            hit = [pat for pat in ignore if match(name, pat)]
            if hit:
                changed[i] = replayed_records[i]._replace(ignored=True)
                n_ignored += 1
                matched.update(hit)
    loads = g.loads  # copied before the first change, as the records
    unloaded_params: set[str] = set()  # parameters some of whose tensors raise at the size assertion instead
    slot_findings: list[tuple[str, str, Finding]] = []
    slot0: dict[str, Param] = {}  # per-partition scale vectors a scalar fills in slot 0 only (``nhcheck.slots``)
    notes: list[tuple[str, str, Finding]] = []
    raised = False  # whether any tensor raises (the crash point, below)
    # A load's checks depend only on its key (parameter, shard id, dtype, shape): decided once per key, and
    # only the tensors of a key with something to say (and those that do not load) are visited one by one.
    decide = load_decider(manifest, engine)
    special: dict[int, _LoadDecision | None] = dict.fromkeys(g.unloaded)
    for key, positions in g.keys.items():
        d = decide(key)
        if d is not _CLEAN:
            special.update(dict.fromkeys(positions, d))
    by_design = engine.by_design
    # Positional fields: TensorRecord (tensor, outcome, orphan, param, ignored), TensorInfo (name, dtype,
    # shape, start, end, shard), Outcome (outcome, param, shard_id, expert_id, engine_name, message, reason).
    for i in sorted(special):
        decision = special[i]
        t, o, _, param, ign = changed.get(i) or replayed_records[i]
        if decision is None:  # not a load
            orphan = built and (not by_design(o[6]) or (o[6] == "pp-range" and _beyond_model(t[0], cfg)))
            raised = raised or o[0] == "raise"
            if orphan:
                changed[i] = _new(TensorRecord, (t, o, True, param, ign))
            continue
        assert param is not None  # a load always names its parameter (``gather``)
        if decision.plain_error is not None:
            # default_weight_loader asserts the sizes: the tensor has a home, and the start-up dies there.
            unloaded_params.add(param)
            assertion = decision.plain_error
            o = as_raised(o, decision)
            changed[i] = _new(TensorRecord, (t, o, False, None, ign))
            raised = True
            if not ign:
                finding = Finding("error", "shape-mismatch", assertion, t[5], t[0])
                slot_findings.append(("shape-mismatch", t[0], finding))
            continue
        if decision.load_error is not None:  # the parameter's weight loader itself raises on this tensor
            o = as_raised(o, decision)
            changed[i] = _new(TensorRecord, (t, o, False, param, ign))
            raised = True
        elif decision.note is not None and not ign:
            notes.append(("narrowed", t.name, Finding("error", "slot-narrowed", decision.note, t.shard, t.name)))
        if not ign:
            if decision.slot0 is not None:
                slot0[param] = decision.slot0
            if decision.problem is not None:
                code, text = decision.problem
                slot_findings.append((code, t.name, Finding("error", code, text, t.shard, t.name)))
    if unloaded_params:  # what fills them without the tensors that raised instead
        loads = dict(loads)
        for param in unloaded_params:
            loads[param] = {
                (o[2], o[3])
                for key, positions in g.keys.items()
                if key[0] == param and (special.get(positions[0]) or _CLEAN).plain_error is None
                for o in map(replayed_records.outcomes.__getitem__, positions)
            }
    records = TensorRecords(replayed_records.tensors, replayed_records.outcomes, changed)

    # Crash point: the first raise in the order the engine meets tensors (a buffering wrapper
    # routes everything first and loads the language model afterwards).
    crash: Crash | None = None
    order_notes: list[Finding] = []
    if raised:  # the stream order matters only to find the first raise: 165k tuples otherwise saved
        phases = g.phases or [False] * len(records)
        order = [(r.tensor, r.outcome, None, phase) for r, phase in zip(records, phases, strict=True)]
        shards = [s.name for s in ckpt.shards]
        rank = {name: i for i, name in enumerate(engine.order_shards(shards))}
        if list(rank) != shards:
            order.sort(key=lambda r: rank.get(r[0].shard, -1))
        if engine.routes_before_lm(cfg, mtp=opts.mtp):
            order = [r for r in order if r[3]] + [r for r in order if not r[3]]
        elif engine.routed_after_lm(cfg, mtp=opts.mtp):
            order = [r for r in order if not r[3]] + [r for r in order if r[3]]
        for t, o, _, _ in order:
            if o.outcome == "raise":
                crash = Crash(o.message or "", t.name, t.shard)
                break
        unknown_order = engine.shard_order_assumption()
        if unknown_order and len({t.shard for t, o, _, _ in order if o.outcome == "raise"}) > 1:
            # The first raise depends on which shard the engine reads first, and that is the host's.
            order_notes.append(Finding("info", "shard-order-assumed", unknown_order))
    if crash is None:
        error = engine.startup_error(map(_NAME, replayed_records.tensors), manifest, mtp=opts.mtp)
        if error:
            crash = Crash(error)
    # A quant config the engine refuses (parse time) or a module it cannot build fails before
    # load_weights sees the first tensor: that error, not a tensor's, ends the start-up.
    if refusal:
        crash = Crash(refusal)

    statuses = _coverage(manifest, loads)
    findings: list[Finding] = list(ckpt.findings)
    if engine.id.assumption:
        findings.append(Finding("info", "engine-assumed", engine.id.assumption))
    findings += order_notes
    alternative = None if opts.mtp else engine.environment_alternative(cfg)
    if alternative is not None:
        findings.append(_environment_finding(ckpt, cfg, qc, alternative, opts, moe_backend))
    if (
        moe_backend is None
        and manifest.source == "built"
        and manifest.moe_backend
        and "E" in (cfg.draft_pattern if opts.mtp else cfg.pattern)
    ):
        findings.append(
            Finding(
                "info",
                "moe-backend-assumed",
                f"MoE runner backend {manifest.moe_backend}: what {engine.id.label} picks for this checkpoint on a "
                "Blackwell GPU at TP 1 (it depends on the GPU); it decides the NVFP4 swizzled block scales and the "
                "padded TP windows — pass --moe-backend to check another",
            )
        )
    for problem_text in manifest.problems:
        if problem_text == refusal:
            continue  # the crash finding below states it, with where it ends the start-up
        findings.append(
            Finding("error" if problem_text.startswith(_REFUSALS) else "warning", "quant-config", problem_text)
        )
    if crash is not None:
        findings.append(
            Finding(
                "error",
                "crash",
                f"{engine.id.label} raises {crash.error}{crash.where}; the server dies during start-up",
                crash.shard,
                crash.tensor,
            )
        )
    orphan_items = []
    for r in map(records.__getitem__, g.unloaded):  # a load is never an orphan
        if r[2] and not r[4]:  # orphan, not ignored
            o = r.outcome
            sev: Severity = "error" if o.outcome == "raise" else "warning"
            what = engine.reason_text(o.reason)
            eng = f" as {o.engine_name}" if o.engine_name and o.engine_name != r.tensor.name else ""
            orphan_items.append(
                (o.reason, r.tensor.name, Finding(sev, "orphan", f"{what}{eng}", r.tensor.shard, r.tensor.name))
            )
    findings += grouped(orphan_items)
    findings += grouped(slot_findings)
    findings += grouped(notes)
    checks = []
    for s in statuses:
        hit = [pat for pat in ignore if fnmatch.fnmatchcase(s.name, pat)]
        matched.update(hit)
        if s.status in ("unfilled", "partial") and not hit:
            checks.append(coverage.ParamCheck(s.param, s.status, s.missing))
    findings += coverage.param_findings(
        checks, "audit", {"sglang": "SGLang", "vllm": "vLLM"}.get(engine.id.name, engine.id.name)
    )
    findings += grouped(_slot0_findings(engine, slot0, statuses))
    if opts.recipe:
        findings += _recipe_findings(ckpt, qc)
    findings += [
        Finding("info", "ignore-unmatched", f"--ignore {pat!r} matches no checkpoint tensor and no runtime parameter")
        for pat in dict.fromkeys(ignore)
        if pat not in matched
    ]

    verdict = verdict_of(findings, crash is not None)
    others: dict[EngineId, str] = {}
    if opts.compare_versions and verdict != "clean" and manifest.source == "built":
        # The other epochs as the compatibility matrix audits them: once per distinct behaviour, not once
        # each (SGLang has 17 others). Imported here: the matrix is built on this module.
        from nhcheck.matrix import shared_audits

        peers = shared_audits(
            ckpt,
            cfg,
            qc,
            engine.others(mtp=opts.mtp),
            msgspec.structs.replace(opts, compare_versions=False),
            moe_backend=moe_backend,
        )
        others = {other.id: r2.summary_line() for other, r2 in peers}
    return AuditReport(
        source=ckpt.source,
        revision=ckpt.revision,
        engine=engine.id,
        config=cfg,
        quant=qc.quant_algo if qc else None,
        manifest=manifest,
        checkpoint=ckpt,
        records=records,
        params=tuple(statuses),
        findings=tuple(findings),
        crash=crash,
        verdict=verdict,
        ignored=n_ignored,
        other_versions=others,
        mtp=opts.mtp,
        pp=opts.pp,
    )


def _environment_finding(
    ckpt: Checkpoint,
    cfg: NemotronHConfig,
    qc: QuantConfig | None,
    alternative: EnvironmentAlternative,
    opts: AuditOptions,
    moe_backend: str | None,
) -> Finding:
    """``environment-assumed``: which environment the answer is for, and what the release gives in the other one
    (its row there, audited as this one; that row has no alternative of its own)."""
    other = alternative.engine
    manifest = other.build_manifest(cfg, qc, moe_backend=moe_backend, pp=opts.pp)
    rep = run_audit(
        ckpt, cfg, qc, manifest, other, msgspec.structs.replace(opts, compare_versions=False), moe_backend=moe_backend
    )
    gives = f"verdict {rep.verdict}" + (f", raises {rep.crash.error}{rep.crash.where}" if rep.crash else "")
    return Finding("info", "environment-assumed", f"{alternative.assumed}; {alternative.other}: {gives}")


#: Manifest problems that are errors the engine raises while starting (no weight loads).
_REFUSALS = (
    "ValueError",
    "AttributeError",
    "NotImplementedError",
    "KeyError",
    "TypeError",
    "StrictDataclassFieldValidationError",  # huggingface_hub's strict config dataclasses (transformers 5)
)


def _slot0_findings(engine: Engine, slot0: dict[str, Param], statuses: list[ParamStatus]) -> list:
    """The same findings ``load`` reports for a scalar written into slot 0 of a scale vector, from the headers."""
    filled = {s.name for s in statuses if s.status == "filled"}
    out = []
    for name, p in slot0.items():
        kind = slots.unwritten_kind(p, 1) if name in filled else None
        if kind == "empty":
            msg = slots.empty_message(engine.id.label, p, slots.missing_text(p))
            out.append(("slot0", name, Finding("error", slots.SLOT0, msg, None, name)))
        elif kind == "sentinel":
            out.append(("sentinel", name, Finding("info", "param-partial", slots.SENTINEL_MESSAGE, None, name)))
    return out


def _beyond_model(name: str, cfg: NemotronHConfig) -> bool:
    """A pp-range skip is by design for another rank's layers, an orphan for a layer the model lacks."""
    m = _LAYER.search(name)
    return m is not None and int(m.group(1)) >= cfg.num_layers


_LAYER = re.compile(r"layers\.(\d+)\.")
