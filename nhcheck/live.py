"""``audit --live`` and ``--cross-check``: the installed engine's own code answers, beside the table.

The release tables (``engines/sglang.py``, ``engines/vllm.py``) answer for every release they know
from the headers alone. A release newer than the table, or a patched build, is answered by its own
code instead: a worker process (``engines/live_sglang.py`` / ``engines/live_vllm.py``, same
interpreter) runs the installed engine's start-up on the meta device and its real ``load_weights``
on recorder parameters, and returns the parameters it built and what it did with every checkpoint
tensor. ``LiveEngine`` serves those answers through the
``Engine`` interface, so ``run_audit`` turns them into the same ``nhcheck.audit/1`` report (findings,
verdict, exit codes) as the table replay.

The engine says *what* it does with a tensor, not *why*: where the table replay reaches the same
outcome for a tensor, its reason names the branch (and decides, as always, whether a dropped tensor
is by design); where it does not, the reason is ``live`` and the tensor counts as an orphan.

``--cross-check`` runs both and reports every disagreement (``disagreements``, engine-free) as an
``error`` finding with code ``cross-check``.

This module never imports torch or the engine; the worker does, in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import util as import_util

import msgspec

from nhcheck import collapse, engines
from nhcheck.audit import AuditOptions, AuditReport, run_audit
from nhcheck.checkpoint import Checkpoint
from nhcheck.engines.base import (
    Engine,
    EngineId,
    LoaderSemantics,
    Outcome,
    PPWindow,
    Replayer,
    Route,
    UnloadedKind,
    installed_version,
)
from nhcheck.errors import UsageError
from nhcheck.findings import Finding, verdict_of
from nhcheck.manifest import Manifest, Param
from nhcheck.model import NemotronHConfig, parse_config
from nhcheck.quant import QuantConfig, parse_quant

#: Checkpoint names the worker could not feed are reported with this reason; the model was never built.
STARTUP = "startup"
#: A live outcome that no table rule reaches for the same tensor.
LIVE = "live"
#: Each engine's worker module (run as ``python -m``).
_WORKERS = {"sglang": "nhcheck.engines.live_sglang", "vllm": "nhcheck.engines.live_vllm"}


@dataclass(frozen=True)
class LiveRun:
    """What the installed engine did with one checkpoint (the worker's answer, typed).

    ``padded``: parameters of a MoE whose backend pads expert dimensions (its loader narrows each
    slot to the tensor it is given: ``FusedMoE.use_padded_loading``), so their shapes are the
    backend's, not the checkpoint's.
    ``refused``: the error the start-up raised before any weight loaded (no manifest then).
    ``crash``: the first error of the whole-checkpoint stream, and the tensor it was loading
    (None: raised after the loop). ``buffers``: the wrapper took every name before the language
    model loaded one (the crash order of a buffering wrapper). ``defers``: the wrapper loads its
    projector and towers only after the whole language-model stream. ``engine``: whose worker answered.
    ``load_errors``: (parameter, shard id, dtype, shape) → the error the parameter's own weight loader
    raised on such a tensor (the worker ran the real loaders, whose shape checks are the engine's).
    ``notes``: what the worker had to assume about the host beyond the stated platform (``info`` findings).
    """

    version: str
    manifest: Manifest
    outcomes: dict[str, Outcome]
    padded: frozenset[str] = frozenset()
    refused: str | None = None
    crash: tuple[str | None, str] | None = None
    buffers: bool = False
    engine: str = "sglang"
    defers: bool = False
    load_errors: dict[tuple[str, str | None, str, tuple[int, ...]], str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def installed_engine(requested: str | None) -> EngineId:
    """The installed engine ``--engine`` names (SGLang by default) as an ``EngineId``; a usage error when it is
    not installed here or another release was named."""
    name, _, wanted = (requested or "sglang").partition("@")
    if name not in _WORKERS:
        raise UsageError(f"--live answers for {' and '.join(_WORKERS)} (installed here); got --engine {requested}")
    if import_util.find_spec(name) is None or import_util.find_spec("torch") is None:
        raise UsageError(
            f"--live and --cross-check run the installed engine's own code: install {name} (and its torch) in "
            "this Python environment, or audit from the release table without them"
        )
    version = installed_version(name)
    if version is None:
        raise UsageError(f"{name} is importable but has no package metadata (no release to name)")
    if wanted and wanted not in ("latest", version):
        raise UsageError(f"--live replays the installed {name} {version}; --engine names {name}@{wanted}")
    return EngineId(name, version, installed=True)


def run_worker(ckpt: Checkpoint, *, moe_backend: str | None, engine: str = "sglang") -> LiveRun:
    """Run the installed engine on this checkpoint in a worker process and read its answer."""
    return run_workers([ckpt], moe_backend=moe_backend, engine=engine)[0]


def run_workers(ckpts: list[Checkpoint], *, moe_backend: str | None, engine: str = "sglang") -> list[LiveRun]:
    """One worker process (one engine import) for several checkpoints, each replayed in a fresh fork."""
    for ckpt in ckpts:
        if not os.path.isdir(ckpt.root) or ckpt.revision is not None:
            raise UsageError(f"--live needs a local checkpoint directory (the engine reads its files): {ckpt.source}")
    with tempfile.TemporaryDirectory(prefix="nhcheck-live-") as tmp:
        outs = [os.path.join(tmp, f"result-{i}.json") for i in range(len(ckpts))]
        request = {
            "jobs": [{"root": os.path.abspath(c.root), "out": out} for c, out in zip(ckpts, outs, strict=True)],
            "moe_backend": moe_backend or "auto",
        }
        req = os.path.join(tmp, "request.json")
        with open(req, "w") as fh:
            json.dump(request, fh)
        return [parse_result(r) for r in _run(req, outs, engine)]


def _run(request: str, outs: list[str], engine: str) -> list[dict]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", _WORKERS[engine], request],
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
    )
    results = []
    for out in outs:
        if not os.path.exists(out):
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            raise UsageError(f"the installed {engine} could not be run (exit {proc.returncode}): {last.strip()}")
        with open(out) as fh:
            results.append(json.load(fh))
    return results


def parse_result(result: dict) -> LiveRun:
    """The worker's JSON → ``LiveRun`` (manifest in nhcheck's records, outcomes per checkpoint name)."""
    engine = next(e for e in _WORKERS if e in result)
    version = str(result[engine])
    if result.get("startup"):
        empty = Manifest((), f"{engine}@{version}", "", None, "auto", "main", "live")
        return LiveRun(version, empty, {}, refused=str(result["startup"]["error"]), engine=engine)
    m = result["manifest"]
    manifest = Manifest(
        tuple(Param.from_json(p) for p in m["params"]),
        f"{engine}@{version}",
        m["lm_prefix"],
        m["quantization"],
        m["moe_backend"],
        "main",
        "live",
    )
    outcomes: dict[str, Outcome] = {}
    load_errors: dict[tuple[str, str | None, str, tuple[int, ...]], str] = {}
    for name, o in result["tensors"].items():
        if o["outcome"] == "raise" and o.get("loaded"):  # the parameter's own loader refused this tensor
            load_errors[(o["param"], o["shard_id"], o["dtype"], tuple(o["shape"]))] = o["message"]
            o = dict(o, outcome="load", message=None)
        outcomes[name] = Outcome(
            o["outcome"], o["param"], o["shard_id"], o["expert_id"], o["engine_name"], o["message"], LIVE
        )
    crash = (result["crash"]["tensor"], result["crash"]["error"]) if result.get("crash") else None
    padded = frozenset(p["name"] for p in m["params"] if p.get("padded"))
    return LiveRun(
        version,
        manifest,
        outcomes,
        padded,
        crash=crash,
        buffers=bool(result.get("buffers")),
        engine=engine,
        defers=bool(result.get("defers")),
        load_errors=load_errors,
        notes=tuple(result.get("notes") or ()),
    )


class LiveEngine:
    """The ``Engine`` interface over one ``LiveRun``; ``explain`` is the table row that names reasons."""

    def __init__(self, eid: EngineId, run: LiveRun, explain: Engine | None, table: dict[str, Outcome]) -> None:
        self.id = eid
        self.run = run
        self.explain = explain
        self.table = table

    def _outcome(self, name: str) -> Outcome:
        o = self.run.outcomes.get(name)
        if o is None:  # the start-up refused: nothing was loaded
            return Outcome("skip", reason=STARTUP)
        t = self.table.get(name)
        if t is not None and t.outcome == o.outcome:
            return o._replace(reason=t.reason)
        return o._replace(reason="routed" if o.outcome == "routed" else "load" if o.outcome == "load" else LIVE)

    def build_manifest(self, cfg, qc, *, moe_backend=None, mtp=False, pp=None) -> Manifest:
        return self.run.manifest

    def replayer(self, manifest: Manifest, cfg: NemotronHConfig, *, mtp: bool, pp: PPWindow | None) -> Replayer:
        prefix = manifest.lm_prefix if cfg.wrapper is not None else ""

        def replay(name: str) -> Outcome:
            o = self._outcome(name)
            if prefix and o.param and o.param.startswith(prefix):
                return o._replace(param=o.param[len(prefix) :])
            return o

        return replay

    def route(self, name: str, cfg: NemotronHConfig) -> Route:
        o = self._outcome(name)
        if o.outcome == "routed":
            return Route("tower")
        prefix = self.run.manifest.lm_prefix
        if (o.param and not o.param.startswith(prefix)) or (o.param is None and not name.startswith(prefix)):
            # the wrapper's own name (the projector's, or one it drops or raises on): its routing phase
            return Route("projector", name)
        return Route("lm", name)

    def replay_projector(self, name: str, manifest: Manifest) -> Outcome:
        return self._outcome(name)

    def routes_before_lm(self, cfg: NemotronHConfig, *, mtp: bool) -> bool:
        return self.run.buffers

    def routed_after_lm(self, cfg: NemotronHConfig, *, mtp: bool) -> bool:
        return self.run.defers

    def order_shards(self, names: list[str]) -> list[str]:
        return self.explain.order_shards(names) if self.explain else sorted(names)

    def shard_order_assumption(self) -> str | None:
        return self.explain.shard_order_assumption() if self.explain else None

    def environment_alternative(self, cfg: NemotronHConfig) -> None:
        """The worker ran with the dependencies installed here: nothing was assumed about them."""
        return None

    def load_error(self, param: Param, shard_id: str | None, dtype: str, shape: tuple[int, ...]) -> str | None:
        # what the real loaders raised in the live replay (SGLang's size-checking default_weight_loader
        # raises there too, as a raise of its own; vLLM's fused loaders are recorded in ``load_errors``)
        return self.run.load_errors.get((param.name, shard_id, dtype, shape))

    def slot_note(self, param: Param, dtype: str, shape: tuple[int, ...]) -> str | None:
        # a load that writes part of its slot succeeds in the live replay too: the table row says where
        # the engine's loader narrows (vLLM's FusedMoE); SGLang's rows name none
        if self.run.engine == "vllm" and self.explain is not None:
            return self.explain.slot_note(param, dtype, shape)
        return None

    def tp_unproven(self) -> str | None:
        return "--live replays TP 1 only"

    def tp_rules(self):
        from nhcheck.tp import SGLANG_RULES

        return self.explain.tp_rules() if self.explain else SGLANG_RULES

    def unloaded_kind(self, reason: str) -> UnloadedKind:
        # a reason the table row names is the row's; a live-only one ("live", "startup") is never safe to drop
        return self.explain.unloaded_kind(reason) if self.explain else "elsewhere"

    def reads_kv_scales(self, manifest: Manifest) -> bool:
        # without a table row, assume the runtime reads them: a KV-cache scale is then never dropped
        return self.explain.reads_kv_scales(manifest) if self.explain else True

    def loader_semantics(self, quant_method: str | None) -> LoaderSemantics:
        # the recorders do not run the fused loaders, so this loader semantics is the table's (without a
        # row: every slot, and SGLang's linear loaders take a one-element scale only as 0-d)
        if self.explain:
            return self.explain.loader_semantics(quant_method)
        from nhcheck.quant import LINEAR_METHODS

        return LoaderSemantics(scalar_every_slot=True, scale_0d_only=quant_method in LINEAR_METHODS)

    def startup_error(self, names: Iterable[str], manifest: Manifest, *, mtp: bool) -> str | None:
        if self.run.refused:
            return self.run.refused
        if self.run.crash and self.run.crash[0] is None:
            return self.run.crash[1]
        return None

    def pp_window(self, num_layers: int, rank: int, size: int) -> PPWindow:
        raise UsageError("--live replays one rank at TP 1 (no --pp)")

    def by_design(self, reason: str) -> bool:
        if reason in (STARTUP, "size-assert"):  # a size assertion's tensor has a home: no orphan, as in the table
            return True
        return self.explain is not None and reason != LIVE and self.explain.by_design(reason)

    def reason_text(self, reason: str) -> str:
        if reason == LIVE:
            return "the installed engine's load_weights drops it (no rule of nhcheck's table explains it)"
        return self.explain.reason_text(reason) if self.explain else reason

    def others(self, *, mtp: bool = False) -> tuple[Engine, ...]:
        return ()


def _table_engine(name: str, version: str) -> Engine | None:
    """The table row for a release (a newer one: the newest row); None for a release the table lacks."""
    try:
        return engines.get(engines.parse(f"{name}@{version}"))
    except UsageError:
        return None


def _table_report(
    ckpt: Checkpoint, cfg: NemotronHConfig, qc: QuantConfig | None, impl: Engine, moe_backend: str | None
) -> AuditReport | None:
    try:
        manifest = impl.build_manifest(cfg, qc, moe_backend=moe_backend)
    except UsageError:  # a recipe the table does not model: the live report stands alone
        return None
    return run_audit(ckpt, cfg, qc, manifest, impl, AuditOptions(compare_versions=False), moe_backend=moe_backend)


def audit(
    ckpt: Checkpoint,
    eid: EngineId,
    *,
    moe_backend: str | None = None,
    ignore: tuple[str, ...] = (),
    cross_check: bool = False,
    run: LiveRun | None = None,
) -> AuditReport:
    """The live report; with ``cross_check`` also the table's, and every disagreement as an error."""
    if eid.name == "vllm":  # before the worker runs: it has no MoE backend to take
        from nhcheck.engines.vllm import refuse_moe_backend

        refuse_moe_backend(eid.version, moe_backend)
    cfg = parse_config(ckpt.config, f"{ckpt.root}/config.json")
    qc = parse_quant(ckpt.config, ckpt.hf_quant_config)
    impl = _table_engine(eid.name, eid.version)
    if cross_check and impl is None:
        raise UsageError(
            f"--cross-check: nhcheck's release table has no row for {eid.name} {eid.version} to check against; "
            "run --live alone"
        )
    table = _table_report(ckpt, cfg, qc, impl, moe_backend) if impl else None
    if run is None:
        run = run_worker(ckpt, moe_backend=moe_backend, engine=eid.name)
    eid = replace(eid, version=run.version)
    if table is not None:
        run = replace(run, manifest=logical_shapes(run, table.manifest))
    outcomes = {r.tensor.name: r.outcome for r in table.records} if table else {}
    engine = LiveEngine(eid, run, impl, outcomes)
    opts = AuditOptions(ignore=ignore, compare_versions=False)
    rep = run_audit(ckpt, cfg, qc, run.manifest, engine, opts, moe_backend=moe_backend)
    notes = [_live_note(run, impl)] + [Finding("info", "live-assumption", n) for n in run.notes]
    if run.crash and rep.crash and run.crash[0] is not None and rep.crash.tensor != run.crash[0]:
        notes.append(
            Finding(
                "warning",
                "live-stream",
                f"the whole-checkpoint stream raised first at {run.crash[0]} ({run.crash[1]}); "
                f"tensor by tensor, {rep.crash.tensor} is the first that raises",
            )
        )
    if cross_check and table is not None:
        notes += disagreements(table, rep)
    findings = rep.findings + tuple(notes)
    return replace(rep, findings=findings, verdict=verdict_of(findings, rep.crash is not None))


def logical_shapes(run: LiveRun, table: Manifest) -> Manifest:
    """The live manifest with a padded MoE parameter's shape replaced by the table's unpadded one.

    A MoE backend that pads expert dimensions (flashinfer_trtllm) loads each checkpoint tensor into
    the top-left corner of its padded slot; nhcheck checks checkpoint shapes against the unpadded
    ("logical") layout, so where the table's shape fits inside the padded one it is the one checked.
    """
    out = []
    for p in run.manifest.params:
        t = table.by_name.get(p.name)
        if (
            p.name in run.padded
            and t is not None
            and len(t.shape) == len(p.shape)
            and all(a <= b for a, b in zip(t.shape, p.shape, strict=True))
        ):
            p = msgspec.structs.replace(p, shape=t.shape)
        out.append(p)
    return replace(run.manifest, params=tuple(out), by_name={})


def _live_note(run: LiveRun, impl: Engine | None) -> Finding:
    where = "its start-up and load_weights, run on meta-device recorder parameters as on a Blackwell GPU at TP 1" + (
        f" (MoE backend {run.manifest.moe_backend})" if not run.refused and run.manifest.moe_backend else ""
    )
    text = f"answered by the installed {run.engine} {run.version}'s own code: {where}"
    if impl is None:
        text += "; nhcheck's release table has no row for this release"
    elif impl.id.assumption:
        text += "; it is newer than nhcheck's release table, so this live replay is what covers it"
    return Finding("info", "live", text)


# ---------------------------------------------------------------------------- cross-check

_FIELDS = ("outcome", "param", "shard_id", "expert_id")


def _facts(rep: AuditReport) -> dict[str, dict[str, object]]:
    """Per checkpoint tensor, the fields the golden files hold (warn: the logged name; raise: the error)."""
    out: dict[str, dict[str, object]] = {}
    for r in rep.records:
        o = r.outcome
        d: dict[str, object] = {
            "outcome": o.outcome,
            "param": r.param,
            "shard_id": o.shard_id,
            "expert_id": o.expert_id,
        }
        if o.outcome == "warn":
            d["engine_name"] = o.engine_name
        if o.outcome == "raise":
            d["message"] = o.message
        out[r.tensor.name] = d
    return out


def _refused(rep: AuditReport) -> bool:
    return rep.crash is not None and rep.crash.tensor is None and not rep.manifest.params


def disagreements(table: AuditReport, live: AuditReport) -> list[Finding]:
    """Every difference between the table replay and the live replay of one checkpoint, as errors.

    Compared: the crash (tensor and error), the verdict (without the cross-check's own findings), and
    unless either start-up refused the checkpoint: the manifest's names, quantization and MoE
    backend, each parameter's dtype, quant method and shape
    (padded expert slots as ``logical_shapes`` reads them), each tensor's outcome, parameter, shard id,
    expert id (a warning's logged name, a raise's error), and the parameters no tensor fills or fills
    only partly. Families of names collapse into one finding each.
    """
    found: list[tuple[tuple[str, ...], str, str]] = []  # (group key, name, message)

    def differ(what: str, name: str, t: object, lv: object) -> None:
        key = (what, _family(t), _family(lv))
        found.append((key, name, f"{what} is {_show(t)} in the table, {_show(lv)} live"))

    tc = (table.crash.tensor, table.crash.error) if table.crash else None
    lc = (live.crash.tensor, live.crash.error) if live.crash else None
    if tc != lc:
        differ("the crash", "crash", _crash_text(tc), _crash_text(lc))
    if table.verdict != live.verdict:
        differ("the verdict", "verdict", table.verdict, live.verdict)
    if not (_refused(table) or _refused(live)):
        for what, t_val, l_val in (
            ("quantization", table.manifest.quantization, live.manifest.quantization),
            ("MoE backend", table.manifest.moe_backend, live.manifest.moe_backend),
        ):
            if t_val != l_val:
                differ(what, what, t_val, l_val)
        t_names = {p.name for p in table.manifest.params}
        l_names = {p.name for p in live.manifest.params}
        for n in sorted(t_names - l_names):
            found.append((("manifest-", "", ""), n, "a runtime parameter in the table's manifest only"))
        for n in sorted(l_names - t_names):
            found.append((("manifest+", "", ""), n, "a runtime parameter the installed engine builds, not the table"))
        for p in table.manifest.params:
            q = live.manifest.by_name.get(p.name)
            if q is not None:
                for field_name, t_fact, l_fact in (
                    ("dtype", p.dtype, q.dtype),
                    ("quant method", p.quant_method, q.quant_method),
                    ("shape", list(p.shape), list(q.shape)),
                ):
                    if t_fact != l_fact:
                        differ(field_name, p.name, t_fact, l_fact)
        tf, lf = _facts(table), _facts(live)
        for name in dict.fromkeys([*tf, *lf]):  # checkpoint order
            t, lv = tf.get(name), lf.get(name)
            if t is None or lv is None:
                found.append((("tensor", "", ""), name, "a tensor only one replay saw"))
                continue
            for f in dict.fromkeys([*_FIELDS, *t, *lv]):
                if t.get(f) != lv.get(f):
                    differ(f, name, t.get(f), lv.get(f))
        for state, label in (({"unfilled", "unreachable"}, "filled by no tensor"), ({"partial"}, "partly filled")):
            t_set = {s.name for s in table.params if s.status in state}
            l_set = {s.name for s in live.params if s.status in state}
            for n in sorted(t_set ^ l_set):
                found.append(
                    ((label, str(n in t_set), ""), n, f"{label} in the {'table' if n in t_set else 'live'} replay only")
                )
    out = []
    for _key, name, count, msgs in collapse.group(found):
        where = name if count == 1 else f"{name} ×{count}"
        out.append(Finding("error", "cross-check", f"{where}: {msgs[0]}"))
    return out


def _family(value: object) -> str:
    """What a differing value has in common with its family's (layer and expert numbers left out)."""
    return "<int>" if isinstance(value, int) else collapse.template(str(value))[0]


def _crash_text(c: tuple[str | None, str] | None) -> str:
    if c is None:
        return "none"
    return f"{c[1]} at {c[0]}" if c[0] else f"{c[1]} (start-up)"


def _show(v: object) -> str:
    return "none" if v is None else repr(v) if isinstance(v, str) else str(v)
