"""What every engine answers, in engine-neutral types.

The audit, the report, prune and load speak only these types and the ``Engine`` interface;
an engine module (``nhcheck.engines.sglang``) is one implementation. The shape follows
pip-audit's ``VulnerabilityService``: a small interface, one module per service, picked once
at the edge from a parsed ``EngineId``.

This module must not import torch.
"""

from __future__ import annotations

import os
import re
import sys
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.machinery import PathFinder
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

import msgspec

from nhcheck.dtypes import numel
from nhcheck.errors import UsageError

if TYPE_CHECKING:
    from nhcheck.manifest import Manifest, Param
    from nhcheck.model import NemotronHConfig
    from nhcheck.quant import QuantConfig
    from nhcheck.tp import TPRules

#: What the engine does with one checkpoint tensor.
OutcomeKind = Literal["load", "warn", "skip", "raise", "routed"]
#: Where a wrapper (Omni / VL) sends a checkpoint name.
RouteTarget = Literal["lm", "projector", "tower", "ignored", "raise"]
#: What the replay branch that left a tensor unloaded tells prune's safety rule (``Engine.unloaded_kind``):
#: ``by-name``: the language-model loader found no parameter under the name it made (prune then asks
#: whether the module exists at runtime and whether it is quantized); ``kv-scale``: the KV-cache scale
#: remap found no target (safe only where the runtime reads no KV-cache scale); ``past-model``: a
#: layer index the model does not have (always safe); ``elsewhere``: a branch outside the
#: language-model loader, whose purpose nhcheck cannot judge (never safe).
UnloadedKind = Literal["by-name", "kv-scale", "past-model", "elsewhere"]


@dataclass(frozen=True, order=True)
class EngineId:
    """An engine and one of its releases, parsed once at the edge (``sglang@0.5.23``).

    ``installed``: the release was read from this environment's installed package. ``assumption``:
    the release is not in nhcheck's table and is answered with a known release's behaviour (said as
    an ``info`` finding in every report).
    """

    name: str
    version: str
    installed: bool = field(default=False, compare=False)
    assumption: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def described(self) -> str:
        """For headers: ``sglang@0.5.23``, with ``(installed)`` or the assumption it is answered under."""
        notes = (["installed"] if self.installed else []) + ([self.assumption.split(";")[0]] if self.assumption else [])
        return str(self) + (f" ({'; '.join(notes)})" if notes else "")

    @property
    def label(self) -> str:
        """For sentences: ``sglang 0.5.23``."""
        return f"{self.name} {self.version}"


class Outcome(NamedTuple):
    """What the engine does with one checkpoint tensor.

    ``outcome`` is an ``OutcomeKind``; ``param`` is the engine's name for the target (inner
    model for the language model); ``reason`` says which branch fired. A NamedTuple, not a
    dataclass: one is made per tensor on the hot path (165k on Super).
    """

    outcome: OutcomeKind | Literal["uncached"]
    param: str | None = None
    shard_id: str | None = None
    expert_id: int | None = None
    engine_name: str | None = None
    message: str | None = None
    reason: str = "load"


class Route(NamedTuple):
    """Where a wrapper sends a checkpoint name: to the LM replay (with the inner name) or elsewhere."""

    target: RouteTarget
    inner: str | None = None
    message: str | None = None


class PPWindow(msgspec.Struct, frozen=True):
    """Pipeline-parallel view of one rank: layers [start, end), and whether it holds embed / head.

    ``rank`` of ``size`` is the rank asked for (``--pp RANK/SIZE``); reports name it.
    """

    start: int
    end: int
    first_rank: bool = True
    last_rank: bool = True
    rank: int = 0
    size: int = 1

    @property
    def label(self) -> str:
        """``PP rank 1/4 (layers 13-25)`` for report headers."""
        layers = f"layer {self.start}" if self.end - self.start == 1 else f"layers {self.start}-{self.end - 1}"
        return f"PP rank {self.rank}/{self.size} ({layers if self.end > self.start else 'no layers'})"

    def to_json(self) -> dict[str, object]:
        return {"rank": self.rank, "size": self.size, "layers": [self.start, self.end]}


class Crash(msgspec.Struct, frozen=True):
    """The error that ends the engine's start-up: at a tensor, or while building the model (tensor None).

    ``index`` is the tensor's place in the engine's stream; a load adds how far it got before it.
    """

    error: str
    tensor: str | None = None
    shard: str | None = None
    index: int | None = None
    tensors_loaded: int | None = None
    bytes_loaded: int | None = None
    seconds: float | None = None

    @property
    def where(self) -> str:
        """`` at TENSOR (shard SHARD)``, or `` while building the model``."""
        return f" at {self.tensor} (shard {self.shard})" if self.tensor else " while building the model"

    def as_dict(self) -> dict[str, object]:
        """For JSON: the tensor, error and shard, then whichever of the other fields are known."""
        out: dict[str, object] = {"tensor": self.tensor, "error": self.error, "shard": self.shard}
        for key in ("index", "tensors_loaded", "bytes_loaded", "seconds"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class LoaderSemantics(msgspec.Struct, frozen=True):
    """How the engine's weight loaders write a tensor into a parameter of one quant method: what ``load`` applies.

    The slot itself (a q/k/v row block, one expert, the whole parameter) comes from the audit's
    outcome; these are the choices the loaders make beyond it.

    ``scalar_every_slot``: a one-element scale loaded with no shard id into a fused per-partition
    scale vector (Mamba ``in_proj``) is written over every slot; False: into slot 0 only.
    ``scale_0d_only``: the linear loader takes a one-element scale only as a 0-d (or ``[1]``)
    tensor and asserts equal shapes, so a ``[1, 1]`` scale is refused instead of broadcast.
    ``expert_corner``: an expert tensor smaller than its slot (same rank, no dimension larger) is
    written into the slot's leading corner — every dimension of the slot narrowed to the tensor's
    size, the values converted to the parameter's dtype by ``copy_``, so packed bytes become numbers —
    and the rest of the slot keeps what it held (``Engine.slot_note`` says so); False: such a tensor
    is refused as a shape mismatch.
    """

    scalar_every_slot: bool
    scale_0d_only: bool
    expert_corner: bool = False


class EnvironmentAlternative(NamedTuple):
    """A dependency release the engine release also allows, under which it answers a checkpoint otherwise.

    nhcheck answers for one environment (``assumed``: which, and what it does with the checkpoint); ``other``
    names the other environment and ``engine`` is the release's row in it, whose audit says what it gives.
    """

    assumed: str
    other: str
    engine: Engine


#: One checkpoint name → what the engine does with it (a replayer bound to one manifest).
Replayer = Callable[[str], Outcome]
#: One expert index in a checkpoint name (``experts.{e}.``), as the engines' expert mappings see it.
EXPERT_INDEX = re.compile(r"experts\.(0|[1-9][0-9]*)\.")


class Engine(Protocol):
    """What nhcheck needs to know of an inference engine release to answer for it.

    Every answer is backed by golden data made with the engine's own code (``oracle/``,
    committed under ``tests/conformance/``).
    """

    @property
    def id(self) -> EngineId:
        """The release answered for (read-only: the frozen engine rows satisfy this protocol)."""
        ...

    def build_manifest(
        self,
        cfg: NemotronHConfig,
        qc: QuantConfig | None,
        *,
        moe_backend: str | None = None,
        mtp: bool = False,
        pp: PPWindow | None = None,
    ) -> Manifest:
        """The runtime parameters the engine builds for this config and quant config."""
        ...

    def replayer(self, manifest: Manifest, cfg: NemotronHConfig, *, mtp: bool, pp: PPWindow | None) -> Replayer:
        """Replay one language-model checkpoint name through the engine's ``load_weights``."""
        ...

    def route(self, name: str, cfg: NemotronHConfig) -> Route:
        """Where the Omni / VL wrapper sends a checkpoint name (only for wrapped configs)."""
        ...

    def replay_projector(self, name: str, manifest: Manifest) -> Outcome:
        """A name the wrapper hands to its projector."""
        ...

    def routes_before_lm(self, cfg: NemotronHConfig, *, mtp: bool) -> bool:
        """Stream order: whether the wrapper routes every non-LM name before any LM tensor loads (buffering)."""
        ...

    def routed_after_lm(self, cfg: NemotronHConfig, *, mtp: bool) -> bool:
        """Stream order: whether the wrapper loads the projector and towers only after the whole LM stream."""
        ...

    def order_shards(self, names: list[str]) -> list[str]:
        """Stream order: the order in which the engine reads the shard files (names as in the checkpoint)."""
        ...

    def shard_order_assumption(self) -> str | None:
        """Why ``order_shards`` is nhcheck's assumption rather than the engine's rule (the engine reads the files
        in the file system's order), or None when the engine's order is known."""
        ...

    def environment_alternative(self, cfg: NemotronHConfig) -> EnvironmentAlternative | None:
        """Where the release allows another release of a dependency (transformers 4.x beside 5.x) that answers this
        config otherwise; the audit then says which it answered for and what the other gives. None: no such case."""
        ...

    def load_error(self, param: Param, shard_id: str | None, dtype: str, shape: tuple[int, ...]) -> str | None:
        """Loader semantics: the error the parameter's weight loader raises for a tensor of this dtype and
        shape in this slot (the engine then dies at that tensor), or None."""
        ...

    def slot_note(self, param: Param, dtype: str, shape: tuple[int, ...]) -> str | None:
        """Loader semantics: what goes wrong silently when such a tensor loads (written into part of the slot)."""
        ...

    def tp_unproven(self) -> str | None:
        """Why nhcheck cannot answer for this engine's tensor-parallel sharding (None: ``tp.py``'s rules are
        proven for it on gloo ranks)."""
        ...

    def tp_rules(self) -> TPRules:
        """The engine's tensor-parallel rules where they differ from SGLang's, with its own citations (``tp.py``)."""
        ...

    def loader_semantics(self, quant_method: str | None) -> LoaderSemantics:
        """How the loaders write tensors into a parameter built with ``quant_method`` (None: unquantized)."""
        ...

    def startup_error(self, names: Iterable[str], manifest: Manifest, *, mtp: bool) -> str | None:
        """An error the engine raises around ``load_weights`` (after the stream), from the names alone."""
        ...

    def pp_window(self, num_layers: int, rank: int, size: int) -> PPWindow:
        """The layers and embed / head ownership of one pipeline rank."""
        ...

    def by_design(self, reason: str) -> bool:
        """Whether a replay reason is intended behaviour (a draft's or another rank's tensor), not an orphan."""
        ...

    def reason_text(self, reason: str) -> str:
        """What a replay reason means, in words, for findings and report rows."""
        ...

    def unloaded_kind(self, reason: str) -> UnloadedKind:
        """Prune's safety rule: what the replay branch ``reason`` of an unloaded tensor says about dropping it."""
        ...

    def reads_kv_scales(self, manifest: Manifest) -> bool:
        """Prune's safety rule: whether the runtime reads KV-cache scales (a dropped one would then matter)."""
        ...

    def others(self, *, mtp: bool = False) -> tuple[Engine, ...]:
        """The engine's other known releases, for the report's cross-version summary (``mtp``: of the MTP draft,
        where the engine's rows for it differ)."""
        ...


def default_loader_error(param_shape: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
    """``default_weight_loader`` (SGLang's and vLLM's ``model_loader/weight_utils.py``): one element into one
    element fills, anything else must match the parameter's size or its assertion raises (goldens:
    ``sglang_probe_kv_scale_shape``, a [2] ``v_scale`` into the scalar ``attn.v_scale``)."""
    if shape == param_shape or (numel(shape) == 1 and numel(param_shape) == 1):
        return None
    return (
        f"AssertionError: Attempted to load weight (torch.Size({list(shape)})) "
        f"into parameter (torch.Size({list(param_shape)}))"
    )


def release_key(version: str, engine: str = "") -> tuple[int, ...]:
    """Order releases as the package index does: ``0.5.10rc0`` < ``0.5.10`` < ``0.5.10.post1`` < ``0.10.1.1``.

    One rule for every engine's release table (their versions are PEP 440 release strings); a string that
    is not one is a usage error naming the engine it was given for.
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)*)(?:(a|b|rc)(\d+))?(?:\.post(\d+))?", version)
    if m is None:
        raise UsageError(f"{engine} {version!r} is not a release version (digits and dots, e.g. 0.5.23)".lstrip())
    base = tuple(int(x) for x in m.group(1).split("."))
    base += (0,) * (4 - len(base))
    pre = {"a": -3, "b": -2, "rc": -1}.get(m.group(2) or "", 0)
    return base + (pre, int(m.group(3) or 0), int(m.group(4) or 0))


def installed_version(dist: str) -> str | None:
    """The version of distribution ``dist`` installed in this environment, from its metadata (not imported).

    ``importlib.metadata`` costs as much to import as click (it pulls in email and zipfile) and most runs
    have no engine installed; so ``sys.path`` is scanned first for anything its path finder could take
    for ``dist``'s metadata: an entry whose name, with runs of ``-_.`` as ``_`` and in lower case, begins
    with the normalised ``dist`` (a superset of its ``NAME-*.dist-info`` / ``.egg-info`` / ``.egg``
    matches). Only a hit, a zip on the path or another distribution finder asks importlib.metadata, so
    None is its answer too.
    """
    target = _normalise(dist)
    hit = any(f is not PathFinder and hasattr(f, "find_distributions") for f in sys.meta_path)
    for entry in sys.path:
        if hit:
            break
        try:
            children = os.listdir(entry or ".")
        except OSError:
            hit = os.path.isfile(entry)  # a zip archive: importlib.metadata reads its listing
            continue
        hit = _normalise(os.path.basename(entry)).startswith(target) or any(
            _normalise(child).startswith(target) for child in children
        )
    if not hit:
        return None
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def resolve_release(
    engine: str,
    spec: str | None,
    table: Sequence[str],
    newest: str,
    with_nemotron_h: Sequence[str],
    unproven: dict[str, str] | None = None,
) -> EngineId:
    """Parse ``ENGINE@X`` against one engine's release table: the same rules for every engine.

    Bare ``ENGINE`` is the installed release when there is one, else ``newest``; ``@latest`` is ``newest``.
    A release in ``table`` answers; a release newer than ``newest`` is answered with ``newest``'s behaviour
    and says so (``--live`` answers it with its own code); a known release in ``unproven`` (it ships
    Nemotron-H, no golden data proves it yet) and any other release (``with_nemotron_h`` is every release on
    the index that ships the model, oldest first) are usage errors naming the range nhcheck answers for.
    """
    spec = (spec or engine).strip()
    name, _, version = spec.partition("@")
    if name != engine:
        raise UsageError(f"unknown engine {name!r}; expected {engine} (e.g. --engine {engine}@{newest})")
    installed = False
    if not version:
        found = installed_version(engine)
        version, installed = (found, True) if found else (newest, False)
    elif version == "latest":
        version = newest
    if version in table:
        return EngineId(engine, version, installed)
    unproven = unproven or {}
    first = min(table, key=release_key)
    gaps = [v for v in unproven if release_key(v) > release_key(first)]
    modelled = f"nhcheck answers for {engine} {first} … {newest}" + (f" except {', '.join(gaps)}" if gaps else "")
    if version in unproven:
        raise UsageError(
            f"{engine} {version} ships Nemotron-H but is not yet proven by golden data ({unproven[version]}); "
            + modelled
        )
    if release_key(version, engine) > release_key(newest):
        return EngineId(
            engine,
            version,
            installed,
            f"{engine} {version} is newer than nhcheck's release table (newest {newest}): answered with "
            f"{newest}'s behaviour; with that release installed, `nhcheck audit --live` answers with its own "
            "code (--cross-check shows where it differs from this)",
        )
    raise UsageError(
        f"{engine} {version} is not a release with Nemotron-H (the first is {with_nemotron_h[0]}); {modelled}"
    )


@runtime_checkable
class SharesReplay(Protocol):
    """An optional capability: telling, cheaply, whether two releases replay a checkpoint alike.

    A compatibility matrix audits one checkpoint against every epoch; releases whose replays agree (and
    whose manifests and loader answers agree) give the same row, so one audit answers for them. The
    checkpoint's names are grouped once (``replay_classes``, the same for every engine: it is the
    checkpoint's naming); ``replay_signature`` replays one representative per group and is equal for two
    releases only if every name's outcome is; None when the engine cannot tell (each release is then
    audited on its own).
    """

    def replay_signature(
        self, manifest: Manifest, cfg: NemotronHConfig, classes: ReplayClasses, *, mtp: bool
    ) -> Hashable | None: ...


class ReplayClasses(msgspec.Struct, frozen=True):
    """A checkpoint's names as ``make_replayer`` factors them: those with exactly one ``experts.{e}.`` grouped by
    the name around it (each group: its expert ids ascending and the names in that order), every other
    name on its own."""

    templates: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]
    singles: tuple[str, ...]


def replay_classes(names: Sequence[str]) -> ReplayClasses:
    """Group ``names`` once per checkpoint (``SharesReplay``); the grouping holds for every release."""
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    singles: list[str] = []
    search = EXPERT_INDEX.search
    for name in names:
        i = name.find("experts.")
        if i < 0:
            singles.append(name)
            continue
        # The usual name has one "experts." followed by a plain index: split it by hand; anything else
        # goes through the regex (the same matches ``make_replayer`` sees).
        j = name.find(".", i + 8)
        index = name[i + 8 : j]
        if j > 0 and (index == "0" or (index.isascii() and index.isdigit() and index[0] != "0")):
            if name.find("experts.", j) < 0:
                start, end, e = i, j + 1, int(index)
            else:
                start = -1
        else:
            m = search(name)
            start = -1 if m is None or search(name, m.end()) is not None else m.start()
            if start >= 0 and m is not None:
                end, e = m.end(), int(m.group(1))
        if start < 0:
            singles.append(name)
            continue
        key = (name[:start], name[end:])
        group = groups.get(key)
        if group is None:
            group = groups[key] = []
        group.append((e, name))
    templates = []
    for group in groups.values():
        group.sort()
        templates.append((tuple(e for e, _ in group), tuple(n for _, n in group)))
    return ReplayClasses(tuple(templates), tuple(singles))


def replay_signature(replay: Replayer, classes: ReplayClasses, num_experts: int) -> tuple[object, ...]:
    """The outcomes of one representative per expert group (its lowest id below the bound, plus every id at or
    past it, which the replay meets one by one) and of every other name.

    What makes this exact is the engines' own factoring (each ``make_replayer``): below the bound, and
    against runtime names without expert indices, an expert index only ever counts as that token, so a
    group's outcome is its representative's with the expert id (and the names it quotes) substituted, and
    two releases with equal signatures (and equal bounds) replay every name alike.
    """
    out: list[object] = [num_experts]
    for ids, group in classes.templates:
        i = bisect_left(ids, num_experts)
        out.append(tuple(replay(n) for n in group[i:]))
        if i:
            out.append(replay(group[0]))
    out.extend(replay(n) for n in classes.singles)
    return tuple(out)
