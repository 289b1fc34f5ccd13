"""Render an ``AuditReport`` as a table (rich), JSON (``nhcheck.audit/1``) or markdown.

Renders what audit concluded; decides nothing. Names come from strangers' files, so
every name is escaped (control characters as ``\\xNN``, rich markup neutralised).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from nhcheck import __version__, collapse
from nhcheck.engines.sglang import REASON_TEXT

if TYPE_CHECKING:
    from nhcheck.audit import AuditReport

SCHEMA = "nhcheck.audit/1"
_OUTCOME_ORDER = {"raise": 0, "warn": 1, "skip": 2, "routed": 3, "load": 4}


def safe(text: object) -> str:
    """Printable, markup-free text: control and non-printable characters become escapes."""
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else ("\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % ord(c)) for c in s)
    return s


# ---------------------------------------------------------------------------
# JSON


def _summary(report: "AuditReport") -> dict:
    c = report.counts()
    ck = report.checkpoint
    return {
        "shards": len(ck.shards), "tensors": len(report.records), "bytes": ck.data_bytes,
        "load": c["load"], "warn": c["warn"], "skip": c["skip"], "raise": c["raise"], "routed": c["routed"],
        "orphans": c["orphans"], "by_design": c["by_design"], "ignored": report.ignored,
        "params": len(report.params),
        "params_unfilled": sum(1 for s in report.params if s.status == "unfilled" and not s.param.informational),
        "params_partial": sum(1 for s in report.params if s.status == "partial"),
        "structure_errors": sum(1 for f in ck.findings if f.severity == "error"), "verdict": report.verdict,
        "bytes_transferred": ck.bytes_transferred,
        **({"tp_errors": {str(k): v for k, v in report.tp_errors().items()}} if report.tp_sizes else {}),
    }


def tp_text(report: "AuditReport") -> str | None:
    """``TP 2: ok · TP 8: 3 errors`` for the sizes ``--tp`` checked (the errors are findings); None without ``--tp``."""
    if not report.tp_sizes:
        return None
    return " · ".join(f"TP {tp}: " + (f"{n} error{'s' if n > 1 else ''}" if n else "ok")
                      for tp, n in report.tp_errors().items())


def _head(report: "AuditReport") -> dict:
    return {
        "schema": SCHEMA,
        "nhcheck_version": __version__,
        "source": report.source,
        "revision": report.revision,
        "engine": {"name": "sglang", "version": report.engine.split("@", 1)[1], "moe_backend": report.manifest.moe_backend,
                   "mode": "mtp" if report.mtp else "main"},
        "model": {"architecture": report.config.wrapper or report.config.architecture, "pattern": report.config.pattern,
                  "quant": report.quant},
        "summary": _summary(report),
        "crash": ({"tensor": report.crash["tensor"], "error": report.crash["error"]} if report.crash else None),
        "other_versions": {f"sglang@{v}": s for v, s in report.other_versions.items()},
    }


def _tensor_json(r) -> dict:
    t, o = r.tensor, r.outcome
    return {"name": t.name, "shard": t.shard, "dtype": t.dtype, "shape": list(t.shape), "outcome": o.outcome,
            "orphan": r.orphan, "param": r.param, "shard_id": o.shard_id, "expert_id": o.expert_id,
            "engine_name": o.engine_name or (o.param if o.outcome == "load" else None) or t.name,
            "message": o.message, "reason": o.reason, "ignored": r.ignored}


def to_json(report: "AuditReport") -> dict:
    """The ``nhcheck.audit/1`` document as Python objects (tests and library users)."""
    doc = _head(report)
    doc["tensors"] = [_tensor_json(r) for r in report.records]
    doc["params"] = [{"name": s.name, "dtype": s.param.dtype, "shape": list(s.param.shape), "status": s.status,
                      "missing": list(s.missing)} for s in report.params]
    doc["findings"] = [f.to_json() for f in report.findings]
    return doc


def render_json(report: "AuditReport") -> str:
    """Serialise ``to_json(report)`` without building 165k dicts first.

    Equal to ``json.dumps(to_json(report), separators=(",", ":"), ensure_ascii=False)``
    (a test checks it); the tensor list is formatted directly with memoised encodings of
    the strings that repeat (shards, dtypes, shapes, parameter names), because on a
    Super-size checkpoint generic encoding costs more than parsing every header.
    """
    enc = json.encoder.encode_basestring  # type: ignore[attr-defined]
    dumps = json.dumps
    memo: dict[object, str] = {}

    def m(v: object) -> str:
        r = memo.get(v)
        if r is None:
            r = memo[v] = "null" if v is None else enc(v) if isinstance(v, str) else dumps(v)
        return r

    # Prefill the strings every record repeats so the loop mostly does dict subscriptions.
    for v in {None, *(sh.name for sh in report.checkpoint.shards), *(s.name for s in report.params),
              *report.manifest.inner_names, "q", "k", "v", "w1", "w2", "w3", *REASON_TEXT, "keyerror", "not-found"}:
        m(v)
    for t in {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}:
        m(t)
    head = _head(report)
    parts = [dumps(head, separators=(",", ":"), ensure_ascii=False)[:-1], ',"tensors":[']
    fmt = ('{"name":%s,"shard":%s,"dtype":%s,"shape":[%s],"outcome":"%s","orphan":%s,"param":%s,'
           '"shard_id":%s,"expert_id":%s,"engine_name":%s,"message":%s,"reason":%s,"ignored":%s}')
    shapes: dict[tuple, str] = {}
    rows = []
    append = rows.append
    get = memo.get
    for t, o, orphan, param, ignored in report.records:
        sh = shapes.get(t.shape)
        if sh is None:
            sh = shapes[t.shape] = ",".join(map(str, t.shape))
        eng = o.engine_name or (o.param if o.outcome == "load" else None)
        append(fmt % (enc(t.name), get(t.shard) or m(t.shard), get(t.dtype) or m(t.dtype), sh, o.outcome,
                      "true" if orphan else "false", get(param) or m(param), get(o.shard_id) or m(o.shard_id),
                      "null" if o.expert_id is None else o.expert_id, (get(eng) or m(eng)) if eng else enc(t.name),
                      get(o.message) or m(o.message), get(o.reason) or m(o.reason), "true" if ignored else "false"))
    parts.append(",".join(rows))
    parts.append('],"params":')
    parts.append(dumps([{"name": s.name, "dtype": s.param.dtype, "shape": list(s.param.shape), "status": s.status,
                         "missing": list(s.missing)} for s in report.params], separators=(",", ":"), ensure_ascii=False))
    parts.append(',"findings":')
    parts.append(dumps([f.to_json() for f in report.findings], separators=(",", ":"), ensure_ascii=False))
    parts.append("}\n")
    return "".join(parts)


# ---------------------------------------------------------------------------
# Shared grouping for table and markdown


def _tensor_groups(report: "AuditReport", include_loads: bool):
    items = []
    by_design: dict[tuple, list] = {}
    for r in report.records:
        o = r.outcome
        if o.outcome == "load" and not include_loads:
            continue
        key = (_OUTCOME_ORDER[o.outcome], o.outcome, o.reason, r.orphan, r.ignored)
        if o.outcome != "load" and not r.orphan and not include_loads:
            by_design.setdefault(key, []).append(r)  # one row per reason: towers and MTP blocks are long
        else:
            items.append((key, r.tensor.name, r))
    groups = collapse.group(items)
    for key, recs in by_design.items():
        heads = sorted({r.tensor.name.split(".", 1)[0] + ".*" for r in recs})
        groups.append((key, ", ".join(heads[:4]) + (", …" if len(heads) > 4 else ""), len(recs), recs))
    groups.sort(key=lambda g: g[0][0])
    rows = []
    for key, name, count, recs in groups:
        _, outcome, reason, orphan, ignored = key
        first = recs[0]
        targets = collapse.group([(0, r.param or r.outcome.engine_name or "", None) for r in recs])
        target = "; ".join(t[1] for t in targets[:2]) + (" …" if len(targets) > 2 else "")
        why = ("ignored: " if ignored else "") + (
            "by design: main-model tensor, not part of the MTP draft" if reason == "mtp-filter" and report.mtp
            else REASON_TEXT.get(reason, reason))
        rows.append((outcome, name, count, target, why, first.tensor.shard))
    return rows


def _param_groups(report: "AuditReport"):
    items = [((s.status, s.param.informational, s.missing), s.name, s) for s in report.params
             if s.status in ("unfilled", "partial")]
    return collapse.group(items)


def verdict_text(report: "AuditReport") -> str:
    v = report.verdict
    ver = report.engine.split("@", 1)[1]
    c = report.counts()
    if v == "crash" and report.crash:
        where = f" at {report.crash['tensor']} (shard {report.crash['shard']})" if report.crash["tensor"] else ""
        return f"sglang {ver} raises {report.crash['error']}{where}: the server dies during start-up."
    if v == "broken":
        n = sum(1 for f in report.findings if f.code in ("quant-mismatch", "shape-mismatch"))
        s = sum(1 for f in report.checkpoint.findings if f.severity == "error")
        parts = []
        if n:
            parts.append(f"{n} tensor famil{'y' if n == 1 else 'ies'} would load with the wrong shape or quantization")
        if s:
            parts.append(f"{s} structural problem{'s' if s != 1 else ''} in the files")
        b = sum(1 for f in report.findings if f.code == "bad-scale")
        if b:
            parts.append(f"{b} module famil{'y' if b == 1 else 'ies'} with zero, negative or non-finite scales")
        return f"sglang {ver} would not load this correctly: " + "; ".join(parts) + "."
    if v == "incomplete":
        n = sum(1 for s in report.params if s.status in ("unfilled", "partial") and not s.param.informational)
        return f"sglang {ver} loads without error but leaves {n} runtime parameter(s) unfilled or partial: silent garbage."
    if v == "orphans":
        return f"sglang {ver} loads it, dropping {c['orphans']:,} checkpoint tensor(s) (warned or silent)."
    return f"sglang {ver} loads every tensor and fills every reachable parameter."


# ---------------------------------------------------------------------------
# Table (rich)


def render_table(report: "AuditReport", console, *, show_loaded: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    cfg = report.config
    c = report.counts()
    e = lambda s: escape(safe(s))  # noqa: E731
    arch = cfg.wrapper or cfg.architecture
    console.print(f"[bold]nhcheck audit[/] {e(report.source)}"
                  + (f" @ {e(report.revision)}" if report.revision else "")
                  + f" · {report.engine} · {e(arch)} ({e(report.quant or 'unquantized')})"
                  + f" · {len(report.records):,} tensors in {len(report.checkpoint.shards)} shard(s)")
    colour = {"clean": "green", "orphans": "yellow", "incomplete": "yellow", "broken": "red", "crash": "red"}[report.verdict]
    console.print(f"[bold {colour}]{report.verdict.upper()}[/] {e(verdict_text(report))}")
    for v, line in report.other_versions.items():
        console.print(f"  sglang@{v}: {e(line)}")
    if report.tp_sizes:
        console.print(f"  tensor parallel (static): {e(tp_text(report))}")

    rows = _tensor_groups(report, show_loaded)
    if rows:
        t = Table(title="Checkpoint tensors the engine does not load" if not show_loaded else "Checkpoint tensors",
                  show_lines=False, title_justify="left")
        for col in ("outcome", "checkpoint tensors", "count", "engine name", "why"):
            t.add_column(col, overflow="fold")
        for outcome, name, count, target, why, _shard in rows:
            style = {"raise": "red", "warn": "yellow", "skip": "dim" if why.startswith("by design") else "yellow"}.get(outcome, "")
            t.add_row(f"[{style}]{outcome}[/]" if style else outcome, e(name), f"×{count:,}", e(target), e(why))
        console.print(t)
    if not show_loaded:
        console.print(f"{c['load']:,} tensors load into runtime parameters (use --show-loaded to list them).")

    pg = _param_groups(report)
    if pg:
        console.print(param_table("Runtime parameters no checkpoint tensor fills", pg, lambda status, info, missing: (
            "SGLang keeps its default; informational" if info else
            "missing " + ", ".join(missing) if missing else "left uninitialised, silently")))

    shown = [f for f in report.findings if f.code not in ("orphan", "param-unfilled", "param-partial")]
    if shown:
        console.print(findings_table(shown))


# ---------------------------------------------------------------------------
# Markdown


def findings_table(findings):
    """The findings as a rich table: severity (coloured), code, message, where (tensor or shard)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="Findings", title_justify="left")
    for col in ("severity", "code", "message", "where"):
        t.add_column(col, overflow="fold")
    for f in findings:
        style = {"error": "red", "warning": "yellow", "info": "dim"}[f.severity]
        t.add_row(f"[{style}]{f.severity}[/]", f.code, escape(safe(f.message)), escape(safe(f.tensor or f.shard or "")))
    return t


def findings_markdown(findings) -> list[str]:
    """The findings as markdown table lines (a leading blank line), for the load reports."""
    out = ["", "| severity | code | message | where |", "|---|---|---|---|"]
    for f in findings:
        out.append(f"| {f.severity} | {f.code} | {_md(f.message)} | `{_md(f.tensor or f.shard or '')}` |")
    return out


def param_table(title: str, groups, note):
    """One row per collapsed group of runtime parameters: ``groups`` as ``_param_groups`` makes them,
    ``note(status, informational, missing)`` the last column (audit and load word it differently)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("status", "parameters", "count", "note"):
        t.add_column(col, overflow="fold")
    for (status, info, missing), name, count, _ in groups:
        t.add_row(status, escape(safe(name)), f"×{count:,}", escape(safe(note(status, info, missing))))
    return t


def _md(s: object) -> str:
    return safe(s).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown(report: "AuditReport", *, show_loaded: bool = False) -> str:
    cfg = report.config
    c = report.counts()
    out = [f"### nhcheck audit: `{_md(report.source)}` on {report.engine}", "",
           f"**{report.verdict.upper()}**: {_md(verdict_text(report))}", ""]
    for v, line in report.other_versions.items():
        out.append(f"- sglang@{v}: {_md(line)}")
    if report.tp_sizes:
        out.append(f"- tensor parallel (static): {_md(tp_text(report))}")
    if report.other_versions or report.tp_sizes:
        out.append("")
    out.append(f"{_md(cfg.wrapper or cfg.architecture)} · {_md(report.quant or 'unquantized')} · "
               f"{len(report.records):,} tensors in {len(report.checkpoint.shards)} shards · "
               f"load {c['load']:,} · warn {c['warn']:,} · skip {c['skip']:,} · raise {c['raise']:,} · "
               f"routed {c['routed']:,} · orphans {c['orphans']:,}")
    rows = _tensor_groups(report, show_loaded)
    if rows:
        out += ["", "| outcome | checkpoint tensors | count | engine name | why |", "|---|---|---|---|---|"]
        for outcome, name, count, target, why, _ in rows:
            out.append(f"| {outcome} | `{_md(name)}` | {count:,} | `{_md(target)}` | {_md(why)} |")
    pg = _param_groups(report)
    if pg:
        out += ["", "| parameter status | parameters | count | missing |", "|---|---|---|---|"]
        for (status, info, missing), name, count, _ in pg:
            out.append(f"| {status}{' (info)' if info else ''} | `{_md(name)}` | {count:,} | {_md(', '.join(missing))} |")
    shown = [f for f in report.findings if f.code not in ("orphan", "param-unfilled", "param-partial")]
    if shown:
        out += ["", "| severity | code | message |", "|---|---|---|"]
        for f in shown:
            out.append(f"| {f.severity} | {f.code} | {_md(f.message)} |")
    return "\n".join(out) + "\n"


def summary_line(report: "AuditReport", seconds: float) -> str:
    c = report.counts()
    unfilled = sum(1 for s in report.params if s.status == "unfilled" and not s.param.informational)
    partial = sum(1 for s in report.params if s.status == "partial")
    xfer = report.checkpoint.bytes_transferred
    extra = f", {xfer:,} bytes transferred" if xfer is not None else ""
    ign = f", {report.ignored} ignored" if report.ignored else ""
    return (f"Scanned {len(report.records):,} tensors in {len(report.checkpoint.shards)} shards ({seconds:.2f} s{extra}): "
            f"verdict {report.verdict}; {c['orphans']:,} orphans, {c['raise']:,} raise, "
            f"{unfilled} params unfilled, {partial} partial{ign}" + (f"; {tp_text(report)}." if report.tp_sizes else "."))
