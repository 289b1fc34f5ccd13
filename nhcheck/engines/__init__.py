"""Engines nhcheck answers for, behind one interface (``base.Engine``).

``parse`` turns what the user typed (``sglang@0.5.23``, ``sglang``) into an ``EngineId``
once, at the edge; ``get`` gives the implementation. Adding an engine is one module with a
release table and an ``Engine`` implementation, one entry in ``ENGINES``, and its golden data.
"""

from __future__ import annotations

from collections.abc import Hashable
from importlib import import_module
from types import ModuleType

from nhcheck.engines.base import Engine, EngineId
from nhcheck.errors import UsageError

#: The engines nhcheck answers for, in the order every listing shows them.
ENGINES = ("sglang", "vllm")
DEFAULT = "sglang"


def _module(name: str) -> ModuleType:
    """One of ``ENGINES``' modules, imported when first asked for: an audit of one engine never loads another's
    release tables (every module costs start-up time on each run)."""
    return import_module(f"nhcheck.engines.{name}")


def parse(spec: str | None) -> EngineId:
    """``NAME[@VERSION]`` → ``EngineId``; an unknown engine or release is a usage error naming the choices."""
    text = (spec or DEFAULT).strip()
    name = text.partition("@")[0]
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; nhcheck answers for " + ", ".join(sorted(ENGINES)))
    return _module(name).parse_engine_id(text)


def known() -> tuple[EngineId, ...]:
    """Every engine release nhcheck answers for, engine by engine, oldest first."""
    return tuple(EngineId(name, v) for name in ENGINES for v in _module(name).PROFILES)


def epochs(*, mtp: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """(engine, its releases) per behaviour epoch, engine by engine, oldest first; ``mtp``: of the MTP draft
    (each module's ``mtp_rows``: the releases whose draft it answers for, grouped by what the draft depends on)."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for name in ENGINES:
        module = _module(name)
        groups: dict[Hashable, list[str]] = {}
        rows: dict[str, Hashable] = (
            dict(module.mtp_rows()) if mtp else {v: id(row) for v, row in module.PROFILES.items()}
        )
        for version, key in rows.items():
            groups.setdefault(key, []).append(version)
        out += [(name, tuple(vs)) for vs in groups.values()]
    return out


def spans(ids: list[EngineId], *, mtp: bool = False) -> list[str]:
    """Epochs (named by a release of each) as ranges of consecutive known releases: ``sglang@0.5.13 … 0.5.23``
    (``mtp``: the MTP draft's epochs, ``epochs(mtp=True)``)."""
    order = {e: i for i, e in enumerate(known())}
    chosen = set(ids)
    rows = epochs(mtp=mtp)
    releases = [EngineId(name, v) for name, vs in rows if chosen & {EngineId(name, x) for x in vs} for v in vs]
    out: list[str] = []
    run: list[EngineId] = []
    for eid in sorted(releases, key=lambda e: order.get(e, -1)):
        if run and order.get(eid, -1) == order.get(run[-1], -2) + 1 and eid.name == run[-1].name:
            run.append(eid)
            continue
        if run:
            out.append(str(run[0]) + (f" … {run[-1].version}" if len(run) > 1 else ""))
        run = [eid]
    if run:
        out.append(str(run[0]) + (f" … {run[-1].version}" if len(run) > 1 else ""))
    return out


def get(spec: EngineId | str | None) -> Engine:
    """The implementation for an engine id (or a spec, parsed first)."""
    eid = spec if isinstance(spec, EngineId) else parse(spec)
    return _module(eid.name).engine(eid)
