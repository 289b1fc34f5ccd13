"""One checkpoint against every behaviour epoch of every engine: a compatibility matrix.

The headers are read once, and so is the config and the quant recipe (with what every release derives
from it alike: ``QuantConfig.derived``). Each epoch builds its own manifest; epochs whose manifests
agree and whose replays agree (``SharesReplay``: one representative name per expert group, not every
tensor) give the same audit, which runs once per distinct behaviour (``shared_audits``; a non-clean
audit's cross-version summary takes its other epochs from it too). Consecutive epochs that reach the
same answer (verdict, counts, crash) are one row, so the matrix reads as "crashes on sglang ≤ 0.5.11,
clean from 0.5.13".
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

import msgspec

from nhcheck import engines, slots
from nhcheck.audit import AuditOptions, AuditReport, Gathered, Replayed, gather, param_view, replay_tensors, run_audit
from nhcheck.checkpoint import Checkpoint
from nhcheck.dtypes import numel
from nhcheck.engines.base import Crash, Engine, EngineId, Outcome, SharesReplay, replay_classes
from nhcheck.errors import UsageError
from nhcheck.findings import Verdict
from nhcheck.manifest import Manifest
from nhcheck.model import NemotronHConfig, parse_config
from nhcheck.quant import QuantConfig, parse_quant


class MatrixRow(msgspec.Struct, frozen=True):
    """A run of consecutive releases of one engine that treat the checkpoint alike."""

    engine: str
    releases: tuple[str, ...]
    verdict: Verdict
    orphans: int
    raises: int
    unfilled: int
    partial: int
    crash: Crash | None

    @property
    def span(self) -> str:
        """``sglang 0.5.11`` or ``sglang 0.5.13 … 0.5.22``."""
        first, last = self.releases[0], self.releases[-1]
        return f"{self.engine} {first}" + (f" … {last}" if last != first else "")

    def _answer(self) -> tuple[object, ...]:
        return (self.verdict, self.orphans, self.raises, self.unfilled, self.partial, self.crash)


class Matrix(msgspec.Struct, frozen=True):
    source: str
    rows: tuple[MatrixRow, ...]

    def headline(self) -> str:
        """One sentence: where it crashes or breaks, and from where it is clean."""
        bits = [f"{r.verdict} on {r.span}" for r in self.rows]
        return "; ".join(bits) + "."

    def exit_code(self) -> int:
        """0 when some release of every engine loads it clean, else 1."""
        by_engine: dict[str, bool] = {}
        for r in self.rows:
            by_engine[r.engine] = by_engine.get(r.engine, False) or r.verdict == "clean"
        return 0 if all(by_engine.values()) else 1


class _SharedReplay(msgspec.Struct, frozen=True):
    """One gathered ``replay_tensors`` and what the behaviour key needs from it, shared by the epochs that replay
    alike."""

    gathered: Gathered
    #: Parameters a one-element tensor loads into (where the scalar-fill semantics matter).
    scalar_targets: frozenset[str]
    #: Distinct (parameter, shard, dtype, shape) of every load: what the engine's loader checks are asked.
    loads: tuple[tuple[str, str | None, str, tuple[int, ...]], ...]
    #: Replay reasons of the tensors that did not load.
    reasons: tuple[str, ...]


def _share(replayed: Replayed) -> _SharedReplay:
    g = gather(replayed)
    loads = g.keys  # per distinct load, not per tensor
    targets = frozenset(p for p, _, _, shape in loads if numel(shape) == 1)
    reasons = {g.records.outcomes[i][6] for i in g.unloaded}  # an Outcome's reason
    return _SharedReplay(g, targets, tuple(sorted(loads, key=str)), tuple(sorted(reasons)))


def _row_view(signature: object) -> object:
    """A replay signature as a matrix row can see it: each outcome's kind, target, shard, expert, reason, and a
    raise's message (the crash text); the names an outcome quotes reach only finding texts, never a row."""
    if isinstance(signature, Outcome):
        o = signature
        return (o.outcome, o.param, o.shard_id, o.expert_id, o.reason, o.message if o.outcome == "raise" else None)
    if isinstance(signature, tuple):
        return tuple(_row_view(x) for x in signature)
    return signature


def _behaviour_key(
    engine: Engine,
    manifest: Manifest,
    cfg: NemotronHConfig,
    shared: _SharedReplay,
    names: list[str],
    shards: list[str],
    mtp: bool,
) -> Hashable:
    """Everything ``run_audit`` reads from the engine and the manifest for this checkpoint, given its replay.

    Equal keys (with replay signatures equal as ``_row_view`` sees them) mean equal rows. The manifest
    enters as what the audit asks of each parameter (``audit.param_view``), less the engine label and the
    MoE backend's name, which only an info finding quotes (the shapes it decides are in the parameters);
    the engine as its answers to every question the audit puts to it here: the loader checks per distinct
    load, the scalar-fill semantics of every scale vector a one-element tensor lands in, which replay
    reasons are by design, the shard order, the stream order around a wrapper, and the error after the
    stream.
    """
    m = manifest
    by_name = m.by_name
    # A parameter no checkpoint name can reach (swizzled block scales) only ever has the status "unreachable",
    # which no row counts: it enters the key only if a tensor loads into it after all.
    loaded = {load[0] for load in shared.loads}
    params = tuple(param_view(p) for p in m.params if p.reachable or p.name in loaded)
    loader = tuple(
        (engine.load_error(by_name[p], sid, dt, sh), engine.slot_note(by_name[p], dt, sh))
        for p, sid, dt, sh in shared.loads
        if p in by_name
    )
    fills = tuple(
        (p.name, engine.loader_semantics(p.quant_method).scalar_every_slot)
        for p in m.params
        if p.name in shared.scalar_targets and slots.scalar_into_vector(p, ())
    )
    return (
        engine.id.name,
        params,
        m.lm_prefix,
        m.quantization,
        m.mode,
        m.source,
        m.problems,
        loader,
        fills,
        tuple(engine.by_design(r) for r in shared.reasons),
        tuple(engine.order_shards(shards)),
        engine.shard_order_assumption(),
        (engine.routes_before_lm(cfg, mtp=mtp), engine.routed_after_lm(cfg, mtp=mtp)),
        engine.startup_error(iter(names), m, mtp=mtp),
    )


def _answer(name: str, releases: tuple[str, ...], rep: AuditReport) -> MatrixRow:
    counts = rep.counts()
    statuses = [p.status for p in rep.params if not p.param.informational]
    return MatrixRow(
        name,
        releases,
        rep.verdict,
        counts["orphans"],
        counts["raise"],
        statuses.count("unfilled"),
        statuses.count("partial"),
        rep.crash,
    )


def shared_audits(
    ckpt: Checkpoint,
    cfg: NemotronHConfig,
    qc: QuantConfig | None,
    epochs: Iterable[Engine],
    opts: AuditOptions,
    *,
    moe_backend: str | None = None,
) -> Iterator[tuple[Engine, AuditReport]]:
    """Each engine's audit of ``ckpt``, run once per distinct behaviour: (engine, report) in ``epochs``' order.

    Two epochs give the same answer when their replays agree as a row sees them (``SharesReplay``,
    ``_row_view``: they then share one ``replay_tensors``) and so does everything else the audit reads
    (``_behaviour_key``); the first of them is audited and the others are handed its report, whose verdict,
    counts, crash and summary line are theirs too (its engine label and the texts quoting its names are the
    first epoch's). The replay signatures are taken at TP 1 without a pipeline rank and the key does not see
    ``--ignore``: with either, every epoch is audited on its own.
    """
    names = [t.name for t in ckpt.tensors()]
    classes = replay_classes(names) if opts.pp is None and not opts.ignore else None
    replays: dict[Hashable, _SharedReplay] = {}
    shards = [sh.name for sh in ckpt.shards]
    reports: dict[Hashable, AuditReport] = {}
    for engine in epochs:
        try:
            manifest = engine.build_manifest(cfg, qc, moe_backend=moe_backend, mtp=opts.mtp, pp=opts.pp)
        except UsageError:
            # a release nhcheck does not replay for this checkpoint (no MTP draft, a build it does not model,
            # e.g. latent MoE before SGLang 0.5.8): asked alone it is a usage error; here it has no answer
            continue
        m = manifest
        key: Hashable | None = None
        replayed: Gathered | None = None
        if classes is not None and not manifest.params:  # a start-up refusal: nothing replays, only its problems
            key = (engine.id.name, m.params, m.lm_prefix, m.quantization, m.mode, m.source, m.problems)
        elif classes is not None and isinstance(engine, SharesReplay):
            signature = engine.replay_signature(manifest, cfg, classes, mtp=opts.mtp)
            if signature is not None:
                view = _row_view(signature)
                shared = replays.get((engine.id.name, m.lm_prefix, view))
                if shared is None:
                    done = replay_tensors(ckpt, cfg, manifest, engine, opts)
                    shared = replays[(engine.id.name, m.lm_prefix, view)] = _share(done)
                replayed = shared.gathered
                key = (view, _behaviour_key(engine, manifest, cfg, shared, names, shards, opts.mtp))
        known = reports.get(key) if key is not None else None
        if known is None:
            known = run_audit(ckpt, cfg, qc, manifest, engine, opts, moe_backend=moe_backend, replayed=replayed)
            if key is not None:
                reports[key] = known
        yield engine, known


def build(ckpt: Checkpoint, *, moe_backend: str | None = None, mtp: bool = False) -> Matrix:
    """Audit ``ckpt`` once per distinct behaviour among the epochs of every engine nhcheck answers for
    (``shared_audits``); consecutive releases of one engine with the same answer are one row."""
    cfg = parse_config(ckpt.config, f"{ckpt.root}/config.json")
    qc = parse_quant(ckpt.config, ckpt.hf_quant_config)
    opts = AuditOptions(mtp=mtp, compare_versions=False)
    spans = {EngineId(name, releases[0]): (name, releases) for name, releases in engines.epochs(mtp=mtp)}
    epochs = (engines.get(eid) for eid in spans)
    rows: list[MatrixRow] = []
    # A row is a run of consecutive known releases: with --mtp, releases without a draft nhcheck answers for
    # have no row, and rows on either side of them stay apart.
    order = {eid: i for i, eid in enumerate(engines.known())}
    for engine, rep in shared_audits(ckpt, cfg, qc, epochs, opts, moe_backend=moe_backend):
        name, releases = spans[engine.id]
        row = _answer(name, releases, rep)
        last = rows[-1] if rows else None
        follows = (
            last is not None
            and last.engine == name
            and order[EngineId(name, releases[0])] == order[EngineId(name, last.releases[-1])] + 1
        )
        if last is not None and follows and last._answer() == row._answer():
            rows[-1] = msgspec.structs.replace(last, releases=last.releases + releases)
        else:
            rows.append(row)
    return Matrix(ckpt.source, tuple(rows))
