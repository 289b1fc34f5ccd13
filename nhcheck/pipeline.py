"""Wire source → manifest → engine for one run; shared by every verb so they agree on the inputs."""

from __future__ import annotations

import msgspec

from nhcheck import collector, engines
from nhcheck.audit import AuditOptions, AuditReport, Gathered, run_audit
from nhcheck.checkpoint import Checkpoint, open_local
from nhcheck.engines.base import Engine, EngineId, PPWindow
from nhcheck.errors import NhcheckError
from nhcheck.manifest import Manifest, load_manifest
from nhcheck.model import NemotronHConfig, parse_config
from nhcheck.quant import QuantConfig, parse_quant


class Inputs(msgspec.Struct, frozen=True):
    """Everything a verb needs, resolved once: the checkpoint, its configs, the engine and its manifest.

    ``mtp`` and ``pp`` live here and only here: the manifest was built for them, so the audit
    must replay with the same ones.
    """

    checkpoint: Checkpoint
    config: NemotronHConfig
    quant: QuantConfig | None
    engine: Engine
    manifest: Manifest
    moe_backend: str | None
    mtp: bool = False
    pp: PPWindow | None = None


def prepare(
    checkpoint: Checkpoint,
    engine: EngineId | str | None = None,
    *,
    manifest_file: str | None = None,
    moe_backend: str | None = None,
    mtp: bool = False,
    pp: tuple[int, int] | None = None,
) -> Inputs:
    """Resolve engine, config, quant recipe and manifest; ``pp`` is (rank, size) of one pipeline rank."""
    impl = engines.get(engine)
    cfg = parse_config(checkpoint.config, f"{checkpoint.root}/config.json")
    qc = parse_quant(checkpoint.config, checkpoint.hf_quant_config)
    window = impl.pp_window(cfg.num_layers, *pp) if pp else None
    if manifest_file:

        def reference() -> Manifest | None:
            """The engine's own manifest, for what a dump's names and dtypes cannot say (W4A16 vs NVFP4)."""
            try:
                return impl.build_manifest(cfg, qc, moe_backend=moe_backend, mtp=mtp, pp=window)
            except NhcheckError:
                return None

        manifest = load_manifest(manifest_file, str(impl.id), cfg, reference)
    else:
        manifest = impl.build_manifest(cfg, qc, moe_backend=moe_backend, mtp=mtp, pp=window)
    return Inputs(checkpoint, cfg, qc, impl, manifest, moe_backend, mtp, window)


def audit(inputs: Inputs, opts: AuditOptions | None = None, replayed: Gathered | None = None) -> AuditReport:
    """Audit with the MTP mode and pipeline rank the inputs were prepared for (``replayed``: their replay, gathered,
    where the caller has it already)."""
    opts = msgspec.structs.replace(opts or AuditOptions(), mtp=inputs.mtp, pp=inputs.pp)
    return run_audit(
        inputs.checkpoint,
        inputs.config,
        inputs.quant,
        inputs.manifest,
        inputs.engine,
        opts,
        moe_backend=inputs.moe_backend,
        replayed=replayed,
    )


def audit_path(path: str, engine: str | None = None, **kw) -> AuditReport:
    """Convenience for tests and scripts: open a local checkpoint and audit it (the cyclic collector paused)."""
    opts = kw.pop("opts", AuditOptions())
    kw.setdefault("mtp", opts.mtp)
    with collector.paused():
        return audit(prepare(open_local(path), engine, **kw), opts)
