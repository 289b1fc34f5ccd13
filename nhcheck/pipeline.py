"""Wire source → manifest → engine for one run; shared by every verb so they agree on the inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nhcheck.audit import AuditOptions, AuditReport, run_audit
from nhcheck.checkpoint import Checkpoint, open_local
from nhcheck.engines.sglang import PPWindow, SGLangProfile, get_profile, pp_window
from nhcheck.manifest import Manifest, build_manifest, load_manifest
from nhcheck.model import NemotronHConfig, parse_config
from nhcheck.quant import QuantConfig, parse_quant


@dataclass(frozen=True)
class Inputs:
    """Everything an audit needs, resolved once."""

    checkpoint: Checkpoint
    config: NemotronHConfig
    quant: QuantConfig | None
    profile: SGLangProfile
    manifest: Manifest
    moe_backend: str | None
    pp: PPWindow | None = None


def prepare(checkpoint: Checkpoint, engine: str | None = None, *, manifest_file: str | None = None,
            moe_backend: str | None = None, mtp: bool = False, pp: tuple[int, int] | None = None) -> Inputs:
    """Resolve engine, config, quant recipe and manifest; ``pp`` is (rank, size) of one pipeline rank."""
    profile = get_profile(engine)
    cfg = parse_config(checkpoint.config, f"{checkpoint.root}/config.json")
    qc = parse_quant(checkpoint.config, checkpoint.hf_quant_config)
    window = pp_window(cfg.num_layers, *pp) if pp else None
    if manifest_file:
        manifest = load_manifest(manifest_file, f"sglang@{profile.version}")
    else:
        manifest = build_manifest(cfg, qc, profile, moe_backend=moe_backend, mtp=mtp, pp=window)
    return Inputs(checkpoint, cfg, qc, profile, manifest, moe_backend, window)


def audit(inputs: Inputs, opts: AuditOptions = AuditOptions()) -> AuditReport:
    if inputs.pp is not None and opts.pp is None:
        opts = replace(opts, pp=inputs.pp)
    return run_audit(inputs.checkpoint, inputs.config, inputs.quant, inputs.manifest, inputs.profile, opts,
                     moe_backend=inputs.moe_backend)


def audit_path(path: str, engine: str | None = None, **kw) -> AuditReport:
    """Convenience for tests and scripts: open a local checkpoint and audit it."""
    opts = kw.pop("opts", AuditOptions())
    opts = replace(opts, mtp=kw.get("mtp", opts.mtp))
    return audit(prepare(open_local(path), engine, **kw), opts)
