"""The report layer: every report as a table (rich), JSON or markdown.

Renders what the pipeline concluded; decides nothing. Names come from strangers' files, so
every name is escaped (control characters as ``\\xNN``, rich markup neutralised).

Here: the audit (``nhcheck.audit/1``), the matrix (``nhcheck.matrix/1``) and the manifest
(``nhcheck.manifest/1``), each with a renderer object (``audit_renderer``, ``MATRIX``, ``MANIFEST``)
that ``report.format`` writes in the format asked for; ``report.console`` is the one console factory.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from nhcheck import __version__, collapse, engines
from nhcheck.report.console import Plain, as_written, renders

if TYPE_CHECKING:
    from nhcheck.audit import AuditReport, TensorRecords
    from nhcheck.load.run import LoadReport
    from nhcheck.load.tp import TPLoadReport
    from nhcheck.manifest import Manifest
    from nhcheck.prune import PrunePlan, PruneResult

SCHEMA = "nhcheck.audit/1"
LOAD_SCHEMA = "nhcheck.load/1"
TP_LOAD_SCHEMA = "nhcheck.load-tp/1"
_OUTCOME_ORDER = {"raise": 0, "warn": 1, "skip": 2, "routed": 3, "load": 4}
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
#: The reported status of an informational parameter no tensor fills: the engine keeps its default, by design.
DEFAULT_STATUS = "default"


def safe(text: object) -> str:
    """Printable, markup-free text: control and non-printable characters become escapes."""
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in s)
    return s


#: A piece of a report line or a table cell: (text, rich style or ""), the text already ``safe`` (names come from
#: strangers' files); rich gets it escaped (``markup``), a plain destination as it is where rich would print it so.
Span = tuple[str, str]


class Grid(NamedTuple):
    """A report table as data: rich draws it in a terminal; elsewhere ``print_table`` writes plain rows."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Span, ...]]


def markup(spans: Iterable[Span]) -> str:
    """Rich markup of ``spans``: each text escaped on its own, wrapped in its style."""
    from rich.markup import escape

    return "".join(f"[{style}]{escape(text)}[/]" if style else escape(text) for text, style in spans)


def print_line(console, spans: list[Span]) -> None:
    """One report line: straight to a plain destination (``console.Plain``) when rich would print its text as it
    is (no markup, escape or emoji code to render, no trailing space to trim), through rich otherwise."""
    text = "".join(t for t, _ in spans)
    if isinstance(console, Plain) and as_written(text):
        console.line(text)
    else:
        console.print(markup(spans))


def print_table(console, table) -> None:
    """A ``Grid`` (or a rich table) in a terminal; elsewhere (pipes, files) plain rows, one per line, space-aligned.

    Plain rows never split a tensor or parameter name across lines, so ``| grep`` sees whole
    rows whatever the width; empty cells are ``-`` so every row has every column.
    """
    if console.is_terminal:
        console.print(_rich_table(table) if isinstance(table, Grid) else table)
        return
    if isinstance(table, Grid):
        title = table.title
        rows = [list(table.columns)] + [[_plain_cell(cell) for cell in row] for row in table.rows]
    else:
        from rich.text import Text

        def plain(cell: object) -> str:
            if isinstance(cell, Text):
                text = cell.plain
            elif isinstance(cell, str):
                text = Text.from_markup(cell, emoji=False).plain
            else:
                text = str(cell)
            return text.replace("\n", " ") or "-"

        cols = table.columns
        body = zip(*(c.cells for c in cols), strict=True)
        title = plain(table.title) if table.title else ""
        rows = [[plain(c.header) for c in cols]] + [[plain(cell) for cell in row] for row in body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    write = console.line if isinstance(console, Plain) else partial(console.out, highlight=False)
    if title:
        write(title)
    for r in rows:
        write("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _plain_cell(cell: Span) -> str:
    """A cell's text as rich's plain rendering of its markup would read (only text with markup in it needs rich)."""
    text = cell[0]
    if renders(text):
        from rich.text import Text

        text = Text.from_markup(markup([cell]), emoji=False).plain
    return text.replace("\n", " ") or "-"


def _rich_table(grid: Grid):
    from rich.table import Table

    t = Table(title=grid.title, title_justify="left")
    for col in grid.columns:
        t.add_column(col, overflow="fold")
    for row in grid.rows:
        t.add_row(*(markup([cell]) for cell in row))
    return t


def by_severity(findings) -> list:
    """Findings most severe first (errors, warnings, info), otherwise in the order they were found."""
    return sorted(findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 3))


def param_status(s) -> str:
    """The status a report shows for a ``ParamStatus``: ``default`` for an informational parameter no
    tensor fills (the engine keeps its default), so ``params_unfilled`` counts exactly the ``unfilled`` rows."""
    return DEFAULT_STATUS if s.status == "unfilled" and s.param.informational else s.status


def param_counts(report: AuditReport) -> dict[str, int]:
    """Runtime parameters per reported status (``param_status``)."""
    out = {"filled": 0, "partial": 0, "unfilled": 0, DEFAULT_STATUS: 0, "unreachable": 0}
    for s in report.params:
        st = param_status(s)
        out[st] = out.get(st, 0) + 1
    return out


def backend_and_rank_json(report: AuditReport) -> dict[str, object]:
    """The ``engine`` keys every report shares: the MoE backend resolved and requested, mode, PP rank."""
    m = report.manifest
    return {
        "moe_backend": m.moe_backend,
        "moe_backend_requested": m.moe_backend_requested,
        "mode": "mtp" if report.mtp else "main",
        "pp": report.pp.to_json() if report.pp else None,
    }


def engine_header(report: AuditReport) -> str:
    """``sglang@0.5.23 · PP rank 1/4 (layers 13-25)`` for report headers (plain text, not escaped)."""
    return report.engine.described + (f" · {report.pp.label}" if report.pp else "")


def _tp_unchecked(report: AuditReport) -> bool:
    """The release refuses the model while building it at TP 1: no sharding of its weights was replayed,
    so a size without a sharding error is "not checked", never "ok"."""
    return report.crash is not None and report.crash.tensor is None


def tp_verdict(report: AuditReport) -> str | None:
    """``ok`` when every ``--tp`` size shards cleanly, ``cannot-shard`` when one does not, ``not-checked`` when
    none does not but the model is not built at TP 1; None without ``--tp``."""
    if not report.tp_sizes:
        return None
    if any(report.tp_errors().values()):
        return "cannot-shard"
    return "not-checked" if _tp_unchecked(report) else "ok"


def tp_headline(report: AuditReport) -> str:
    """What follows the verdict word with ``--tp``: `` at TP 1; TP 4, 8: cannot shard`` (empty without it)."""
    if not report.tp_sizes:
        return ""
    errors = report.tp_errors()
    bad = [str(tp) for tp, n in errors.items() if n]
    ok = [str(tp) for tp, n in errors.items() if not n and tp != 1]
    parts = []
    if ok:
        clean = "not checked (the model is not built)" if _tp_unchecked(report) else "ok"
        parts.append(f"TP {', '.join(ok)}: {clean}")
    if bad:
        parts.append(f"TP {', '.join(bad)}: cannot shard")
    return " at TP 1" + "".join("; " + p for p in parts)


# ---------------------------------------------------------------------------
# JSON


def _summary(report: AuditReport) -> dict:
    c = report.counts()
    pc = param_counts(report)
    ck = report.checkpoint
    return {
        "shards": len(ck.shards),
        "tensors": len(report.records),
        "bytes": ck.data_bytes,
        "load": c["load"],
        "warn": c["warn"],
        "skip": c["skip"],
        "raise": c["raise"],
        "routed": c["routed"],
        "orphans": c["orphans"],
        "by_design": c["by_design"],
        "ignored": report.ignored,
        "params": len(report.params),
        "params_unfilled": pc["unfilled"],
        "params_partial": pc["partial"],
        "params_default": pc[DEFAULT_STATUS],
        "structure_errors": sum(1 for f in ck.findings if f.severity == "error"),
        "verdict": report.verdict,
        "bytes_transferred": ck.bytes_transferred,
        **(
            {"tp_errors": {str(k): v for k, v in report.tp_errors().items()}, "tp_verdict": tp_verdict(report)}
            if report.tp_sizes
            else {}
        ),
    }


def tp_text(report: AuditReport) -> str | None:
    """``TP 2: ok · TP 8: 3 errors`` for the sizes ``--tp`` checked (the errors are findings; ``not checked`` where
    the model is not built); None without ``--tp``."""
    if not report.tp_sizes:
        return None
    clean = "not checked" if _tp_unchecked(report) else "ok"
    return " · ".join(
        f"TP {tp}: " + (f"{n} error{'s' if n > 1 else ''}" if n else clean) for tp, n in report.tp_errors().items()
    )


def _head(report: AuditReport) -> dict:
    return {
        "schema": SCHEMA,
        "nhcheck_version": __version__,
        "source": report.source,
        "revision": report.revision,
        "engine": {
            "name": report.engine.name,
            "version": report.engine.version,
            "installed": report.engine.installed,
            **backend_and_rank_json(report),
        },
        "model": {
            "architecture": report.config.wrapper or report.config.architecture,
            "pattern": report.config.pattern,
            "quant": report.quant,
        },
        "summary": _summary(report),
        "crash": ({"tensor": report.crash.tensor, "error": report.crash.error} if report.crash else None),
        "other_versions": {str(v): s for v, s in report.other_versions.items()},
    }


def _tensor_json(r) -> dict:
    t, o = r.tensor, r.outcome
    return {
        "name": t.name,
        "shard": t.shard,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "outcome": o.outcome,
        "orphan": r.orphan,
        "param": r.param,
        "shard_id": o.shard_id,
        "expert_id": o.expert_id,
        "engine_name": o.engine_name or (o.param if o.outcome == "load" else None) or t.name,
        "message": o.message,
        "reason": o.reason,
        "ignored": r.ignored,
    }


def _params_json(report: AuditReport) -> list[dict]:
    return [
        {
            "name": s.name,
            "dtype": s.param.dtype,
            "shape": list(s.param.shape),
            "status": param_status(s),
            "missing": list(s.missing),
        }
        for s in report.params
    ]


def to_json(report: AuditReport) -> dict:
    """The ``nhcheck.audit/1`` document as Python objects (tests and library users)."""
    doc = _head(report)
    doc["tensors"] = [_tensor_json(r) for r in report.records]
    doc["params"] = _params_json(report)
    doc["findings"] = [f.to_json() for f in report.findings]
    return doc


class _TensorRow(msgspec.Struct, gc=False):
    """One ``tensors`` entry of the document; msgspec writes the fields in this order, as ``_tensor_json`` does."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    outcome: str
    orphan: bool
    param: str | None
    shard_id: str | None
    expert_id: int | None
    engine_name: str
    message: str | None
    reason: str
    ignored: bool


_ENCODER = msgspec.json.Encoder()


def render_json(report: AuditReport) -> str:
    """``render_json_bytes`` as text (library users)."""
    return render_json_bytes(report).decode("utf-8")


def render_json_bytes(report: AuditReport) -> bytes:
    """``to_json(report)`` serialised as UTF-8: ``render_json_chunks`` joined (library users and tests)."""
    return b"".join(render_json_chunks(report))


#: Tensor rows encoded per chunk: a few MB of JSON, so the document is never held whole (Super's is 61 MB:
#: building and holding it cost more in page faults than encoding it).
JSON_CHUNK_ROWS = 4096


def render_json_chunks(report: AuditReport) -> Iterator[bytes | memoryview]:
    """Serialise ``to_json(report)`` as UTF-8 pieces, the tensor list in C, without building 165k dicts first.

    Joined, equal to ``json.dumps(to_json(report), separators=(",", ":"), ensure_ascii=False)`` (a test checks
    it): msgspec escapes strings exactly as ``json`` does without ``ensure_ascii`` and the rows hold no float,
    the one type the two write differently. The rest of the document (small, may hold floats) is ``json``'s,
    rendered here, before the first piece is asked for: a report that cannot be rendered writes nothing.
    """
    dumps = json.dumps
    head = dumps(_head(report), separators=(",", ":"), ensure_ascii=False)[:-1] + ',"tensors":['
    tail = (
        '],"params":'
        + dumps(_params_json(report), separators=(",", ":"), ensure_ascii=False)
        + ',"findings":'
        + dumps([f.to_json() for f in report.findings], separators=(",", ":"), ensure_ascii=False)
        + "}\n"
    )
    return _json_pieces(head.encode("utf-8"), report.records, tail.encode("utf-8"))


def _row(t, o, orphan: bool, param: str | None, ignored: bool) -> _TensorRow:
    """The row of one record (``_tensor_json``'s fields). Positional: TensorInfo (name, dtype, shape, start, end,
    shard), Outcome (outcome, param, shard_id, expert_id, engine_name, message, reason)."""
    engine_name = o[4] or (o[1] if o[0] == "load" else None) or t[0]
    return _TensorRow(t[0], t[5], t[1], t[2], o[0], orphan, param, o[2], o[3], engine_name, o[5], o[6], ignored)


def _json_pieces(head: bytes, records: TensorRecords, tail: bytes) -> Iterator[bytes | memoryview]:
    """``head``, the rows of ``records`` comma-separated, a chunk at a time, ``tail``.

    Rows straight from the columns (no record per tensor), then the changed records' rows put in their places.
    """
    yield head
    row = _TensorRow
    encode = _ENCODER.encode
    tensors, outcomes, changed = records.tensors, records.outcomes, records.changed
    moved = sorted(changed)
    for at in range(0, len(tensors), JSON_CHUNK_ROWS):
        end = at + JSON_CHUNK_ROWS
        # ``_row(t, o, False, o[1], False)`` inline (165k calls saved on Super)
        rows = [
            row(
                t[0],
                t[5],
                t[1],
                t[2],
                o[0],
                False,
                o[1],
                o[2],
                o[3],
                o[4] or (o[1] if o[0] == "load" else None) or t[0],
                o[5],
                o[6],
                False,
            )  # fmt: skip
            for t, o in zip(tensors[at:end], outcomes[at:end], strict=True)
        ]
        for i in moved[bisect_left(moved, at) : bisect_left(moved, end)]:
            rows[i - at] = _row(*changed[i])
        if at:
            yield b","  # between chunks; each chunk's own brackets are dropped
        yield memoryview(encode(rows))[1:-1]
    yield tail


# ---------------------------------------------------------------------------
# Shared grouping for table and markdown


def _tensor_groups(report: AuditReport, include_loads: bool):
    items = []
    by_design: dict[tuple, list] = {}
    # Without --show-loaded the loads (164,820 of Super's 165,860 tensors) are dropped by one comprehension.
    records = report.records if include_loads else report.records.not_loading()
    for r in records:
        o = r.outcome
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
    engine = engines.get(report.engine)
    rows = []
    for key, name, count, recs in groups:
        _, outcome, reason, orphan, ignored = key
        first = recs[0]
        targets = collapse.group([(0, r.param or r.outcome.engine_name or "", None) for r in recs])
        target = "; ".join(t[1] for t in targets[:2]) + (" …" if len(targets) > 2 else "")
        why = ("ignored: " if ignored else "") + (
            "by design: main-model tensor, not part of the MTP draft"
            if reason == "mtp-filter" and report.mtp
            else engine.reason_text(reason)
        )
        rows.append((outcome, name, count, target, why, first.tensor.shard))
    return rows


def _param_groups(report: AuditReport):
    items = [
        ((param_status(s), s.param.informational, s.missing), s.name, s)
        for s in report.params
        if s.status in ("unfilled", "partial")
    ]
    return collapse.group(items)


def version_ranges(report: AuditReport) -> list[tuple[str, str]]:
    """The other releases' summaries, consecutive releases with the same summary as one range."""
    out: list[tuple[str, str]] = []
    keys = list(report.other_versions)
    i = 0
    while i < len(keys):
        j = i
        line = report.other_versions[keys[i]]
        while j + 1 < len(keys) and report.other_versions[keys[j + 1]] == line:
            j += 1
        out += [(span, line) for span in engines.spans(keys[i : j + 1], mtp=report.mtp)]
        i = j + 1
    return out


def partial_input(report: AuditReport) -> str | None:
    """``only 1 of 4 shards audited (…)``: the cause that comes first when shards were not read."""
    ck = report.checkpoint
    if not ck.missing_shards:
        return None
    names = ck.missing_shards
    shown = ", ".join(names[:3]) + (f", … ({len(names)} in all)" if len(names) > 3 else "")
    total = len(ck.shards) + len(names)
    return f"only {len(ck.shards)} of {total} shards audited — {shown} {ck.missing_why}"


def verdict_text(report: AuditReport) -> str:
    v = report.verdict
    ver = report.engine.label
    c = report.counts()
    if v == "crash" and report.crash:
        crash = report.crash
        where = f" at {crash.tensor} (shard {crash.shard})" if crash.tensor else ""
        return f"{ver} raises {crash.error}{where}: the server dies during start-up."
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
        return f"{ver} would not load this correctly: " + "; ".join(parts) + "."
    if v == "incomplete":
        n = sum(1 for s in report.params if s.status in ("unfilled", "partial") and not s.param.informational)
        partial = partial_input(report)
        if partial:
            return (
                f"{partial}; {ver} would leave {n:,} runtime parameter(s) unfilled or partial from the shards "
                "audited, those the missing shards fill among them."
            )
        return f"{ver} loads without error but leaves {n:,} runtime parameter(s) unfilled or partial: silent garbage."
    if v == "orphans":
        return f"{ver} loads it, dropping {c['orphans']:,} checkpoint tensor(s) (warned or silent)."
    return f"{ver} loads every tensor and fills every reachable parameter."


# ---------------------------------------------------------------------------
# Table (rich)


def render_table(report: AuditReport, console, *, show_loaded: bool = False) -> None:
    cfg = report.config
    c = report.counts()
    arch = cfg.wrapper or cfg.architecture
    print_line(
        console,
        [("nhcheck audit", "bold"), (" ", ""), (safe(report.source), "")]
        + ([(" @ ", ""), (safe(report.revision), "")] if report.revision else [])
        + [(" · ", ""), (safe(engine_header(report)), ""), (" · ", ""), (safe(arch), ""), (" (", "")]
        + [(safe(report.quant or "unquantized"), ""), (")", "")]
        + [(f" · {len(report.records):,} tensors in {len(report.checkpoint.shards):,} shard(s)", "")],
    )
    colour = {"clean": "green", "orphans": "yellow", "incomplete": "yellow", "broken": "red", "crash": "red"}[
        report.verdict
    ]
    tp_bad = tp_verdict(report) == "cannot-shard"
    print_line(
        console,
        [
            (report.verdict.upper(), f"bold {colour}"),
            (safe(tp_headline(report)), "bold red" if tp_bad else ""),
            (" — " if report.tp_sizes else " ", ""),
            (safe(verdict_text(report)), ""),
        ],
    )
    for label, line in version_ranges(report):
        print_line(console, [(f"  {label}: ", ""), (safe(line), "")])
    if report.tp_sizes:
        print_line(console, [("  tensor parallel (static): ", ""), (safe(tp_text(report)), "")])

    rows = _tensor_groups(report, show_loaded)
    if rows:
        title = "Checkpoint tensors the engine does not load" if not show_loaded else "Checkpoint tensors"
        cells: list[tuple[Span, ...]] = []
        for outcome, name, count, target, why, _shard in rows:
            style = {"raise": "red", "warn": "yellow", "skip": "dim" if why.startswith("by design") else "yellow"}.get(
                outcome, ""
            )
            cells.append(((outcome, style), (safe(name), ""), (f"×{count:,}", ""), (safe(target), ""), (safe(why), "")))
        print_table(console, Grid(title, ("outcome", "checkpoint tensors", "count", "engine name", "why"), cells))
    if not show_loaded:
        print_line(
            console, [(f"{c['load']:,} tensors load into runtime parameters (use --show-loaded to list them).", "")]
        )

    pg = _param_groups(report)
    if pg:
        print_table(
            console,
            param_table(
                "Runtime parameters no checkpoint tensor fills",
                pg,
                lambda status, info, missing: (
                    f"{report.engine.name} keeps its default; informational"
                    if info
                    else "missing " + ", ".join(missing)
                    if missing
                    else "left uninitialised, silently"
                ),
            ),
        )

    shown = [f for f in report.findings if f.code not in ("orphan", "param-unfilled", "param-partial")]
    if shown:
        print_table(console, findings_table(shown))


# ---------------------------------------------------------------------------
# Markdown


def findings_table(findings) -> Grid:
    """The findings as a table: severity (coloured), code, message, where (tensor or shard)."""
    rows: list[tuple[Span, ...]] = []
    for f in by_severity(findings):
        style = {"error": "red", "warning": "yellow", "info": "dim"}[f.severity]
        rows.append(((f.severity, style), (f.code, ""), (safe(f.message), ""), (safe(f.tensor or f.shard or ""), "")))
    return Grid("Findings", ("severity", "code", "message", "where"), rows)


def findings_markdown(findings) -> list[str]:
    """The findings as markdown table lines (a leading blank line), for the load reports."""
    out = ["", "| severity | code | message | where |", "|---|---|---|---|"]
    for f in by_severity(findings):
        out.append(f"| {f.severity} | {f.code} | {_md(f.message)} | `{_md(f.tensor or f.shard or '')}` |")
    return out


def param_table(title: str, groups, note) -> Grid:
    """One row per collapsed group of runtime parameters: ``groups`` as ``_param_groups`` makes them,
    ``note(status, informational, missing)`` the last column (audit and load word it differently)."""
    rows: list[tuple[Span, ...]] = [
        ((status, ""), (safe(name), ""), (f"×{count:,}", ""), (safe(note(status, info, missing)), ""))
        for (status, info, missing), name, count, _ in groups
    ]
    return Grid(title, ("status", "parameters", "count", "note"), rows)


def _md(s: object) -> str:
    return safe(s).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown(report: AuditReport, *, show_loaded: bool = False) -> str:
    cfg = report.config
    c = report.counts()
    out = [
        f"### nhcheck audit: `{_md(report.source)}` on {_md(engine_header(report))}",
        "",
        f"**{report.verdict.upper()}{_md(tp_headline(report))}**: {_md(verdict_text(report))}",
        "",
    ]
    for label, line in version_ranges(report):
        out.append(f"- {label}: {_md(line)}")
    if report.tp_sizes:
        out.append(f"- tensor parallel (static): {_md(tp_text(report))}")
    if report.other_versions or report.tp_sizes:
        out.append("")
    out.append(
        f"{_md(cfg.wrapper or cfg.architecture)} · {_md(report.quant or 'unquantized')} · "
        f"{len(report.records):,} tensors in {len(report.checkpoint.shards):,} shards · "
        f"load {c['load']:,} · warn {c['warn']:,} · skip {c['skip']:,} · raise {c['raise']:,} · "
        f"routed {c['routed']:,} · orphans {c['orphans']:,}"
    )
    rows = _tensor_groups(report, show_loaded)
    if rows:
        out += ["", "| outcome | checkpoint tensors | count | engine name | why |", "|---|---|---|---|---|"]
        for outcome, name, count, target, why, _ in rows:
            out.append(f"| {outcome} | `{_md(name)}` | {count:,} | `{_md(target)}` | {_md(why)} |")
    pg = _param_groups(report)
    if pg:
        out += ["", "| parameter status | parameters | count | missing |", "|---|---|---|---|"]
        for (status, info, missing), name, count, _ in pg:
            out.append(
                f"| {status}{' (info)' if info else ''} | `{_md(name)}` | {count:,} | {_md(', '.join(missing))} |"
            )
    shown = [f for f in report.findings if f.code not in ("orphan", "param-unfilled", "param-partial")]
    if shown:
        out += ["", "| severity | code | message |", "|---|---|---|"]
        for f in by_severity(shown):
            out.append(f"| {f.severity} | {f.code} | {_md(f.message)} |")
    return "\n".join(out) + "\n"


def summary_line(report: AuditReport, seconds: float) -> str:
    c = report.counts()
    pc = param_counts(report)
    unfilled, partial, default = pc["unfilled"], pc["partial"], pc[DEFAULT_STATUS]
    xfer = report.checkpoint.bytes_transferred
    extra = f", {xfer:,} bytes transferred" if xfer is not None else ""
    ign = f", {report.ignored:,} ignored" if report.ignored else ""
    ck = report.checkpoint
    shards_note = (
        f" ({len(ck.shards):,} of {len(ck.shards) + len(ck.missing_shards):,} shards)" if ck.missing_shards else ""
    )
    return (
        f"Scanned {len(report.records):,} tensors in {len(ck.shards):,} shards ({seconds:.2f} s{extra}): "
        f"verdict {report.verdict}{tp_headline(report)}{shards_note}; {c['orphans']:,} orphans, {c['raise']:,} raise, "
        f"{unfilled:,} params unfilled, {partial:,} partial"
        + (f", {default:,} at the engine default (informational)" if default else "")
        + ign
        + (f"; {tp_text(report)}." if report.tp_sizes else ".")
    )


# ---------------------------------------------------------------------------
# The compatibility matrix (``nhcheck matrix``)

MATRIX_SCHEMA = "nhcheck.matrix/1"
_MATRIX_COLUMNS = ("releases", "verdict", "orphans", "raise", "unfilled", "partial", "first crash")


def _matrix_cells(row) -> tuple[str, ...]:
    crash = f"{row.crash.error}{row.crash.where}" if row.crash else ""
    return (
        row.span,
        row.verdict,
        f"{row.orphans:,}",
        f"{row.raises:,}",
        f"{row.unfilled:,}",
        f"{row.partial:,}",
        crash,
    )


def matrix_json(m) -> str:
    rows = [
        {
            "engine": r.engine,
            "releases": list(r.releases),
            "verdict": r.verdict,
            "orphans": r.orphans,
            "raise": r.raises,
            "unfilled": r.unfilled,
            "partial": r.partial,
            "crash": r.crash.as_dict() if r.crash else None,
        }
        for r in m.rows
    ]
    doc = {"schema": MATRIX_SCHEMA, "nhcheck_version": __version__, "source": m.source, "headline": m.headline()}
    return json.dumps(doc | {"rows": rows}, indent=1, ensure_ascii=False) + "\n"


def matrix_markdown(m) -> str:
    out = [f"### nhcheck matrix: `{_md(m.source)}`", "", _md(m.headline()), ""]
    out.append("| " + " | ".join(_MATRIX_COLUMNS) + " |")
    out.append("|" + "---|" * len(_MATRIX_COLUMNS))
    out += ["| " + " | ".join(_md(c) for c in _matrix_cells(r)) + " |" for r in m.rows]
    return "\n".join(out) + "\n"


def matrix_table(m, console) -> None:
    from rich.table import Table

    console.print(f"[bold]nhcheck matrix[/] {safe(m.source)}")
    console.print(safe(m.headline()), markup=False)
    t = Table(*_MATRIX_COLUMNS)
    for r in m.rows:
        t.add_row(*(safe(c) for c in _matrix_cells(r)))
    print_table(console, t)


# ---------------------------------------------------------------------------
# The runtime manifest (``nhcheck manifest``)


def manifest_json(m: Manifest) -> str:
    return json.dumps(m.to_json(), indent=1) + "\n"


def _backends(m: Manifest) -> str:
    """``; moe backend X, requested Y`` where the engine has MoE runner backends (empty otherwise)."""
    return f"; moe backend {m.moe_backend}, requested {m.moe_backend_requested}" if m.moe_backend else ""


def manifest_markdown(m: Manifest) -> str:
    rank = f" · {m.pp.label}" if m.pp else ""
    out = [
        f"### nhcheck manifest: {_md(m.engine)}{_md(rank)}",
        "",
        f"{m.mode}; quantization {_md(m.quantization or 'none')}{_md(_backends(m))}; {len(m.params):,} parameters",
        "",
        "| name | shape | dtype | quant method | loader |",
        "|---|---|---|---|---|",
    ]
    for p in m.params:
        loader = p.loader + ("" if p.reachable else " (unreachable)")
        out.append(f"| `{_md(p.name)}` | {list(p.shape)} | {p.dtype} | {_md(p.quant_method or '')} | {loader} |")
    return "\n".join(out) + "\n"


def manifest_table(m: Manifest, console) -> None:
    """One row per runtime parameter; the title names the engine, PP rank, quantization and MoE backend."""
    from rich.table import Table

    rank = f" · {m.pp.label}" if m.pp else ""
    t = Table(
        title=f"{m.engine}{rank} runtime parameters ({m.mode}; quantization {m.quantization or 'none'}{_backends(m)})",
        title_justify="left",
    )
    for col in ("name", "shape", "dtype", "quant method", "loader"):
        t.add_column(col, overflow="fold")
    for p in m.params:
        loader = p.loader + ("" if p.reachable else " (unreachable)")
        t.add_row(safe(p.name), str(list(p.shape)), p.dtype, p.quant_method or "", loader)
    print_table(console, t)


# ---------------------------------------------------------------------------
# Prune (``nhcheck prune``): the plan, and the one-line outcome


def render_prune_plan(plan: PrunePlan, console) -> None:
    """The plan as the audit table shows tensors: collapsed groups, then bytes saved per shard."""
    from rich.markup import escape
    from rich.table import Table

    e = lambda s: escape(safe(s))  # noqa: E731
    rep = plan.report
    console.print(
        f"[bold]nhcheck prune[/] {e(rep.source)} · {rep.engine} · audit verdict {rep.verdict} · "
        f"{len(rep.records):,} tensors in {len(plan.shards)} shard(s)"
    )
    if plan.groups:
        t = Table(title="Tensors to drop", title_justify="left")
        for col in ("outcome", "checkpoint tensors", "count", "bytes", "why it is safe"):
            t.add_column(col, overflow="fold")
        for g in plan.groups:
            t.add_row(g.outcome, e(g.name), f"×{g.count:,}", f"{g.nbytes:,}", e(g.reason))
        print_table(console, t)
    elif plan.refusal is None:
        console.print(
            f"Nothing to drop: {rep.engine.label} leaves no tensor unloaded, so pruning cannot change this checkpoint."
        )
    if plan.refusal is None and plan.drops:
        t = Table(title="Shards", title_justify="left")
        for col in ("shard", "tensors", "dropped", "bytes saved", "action"):
            t.add_column(col, overflow="fold")
        for s in plan.shards:
            t.add_row(e(s.name), f"{s.tensors:,}", f"{s.dropped:,}", f"{s.bytes_saved:,}", s.action)
        print_table(console, t)
        console.print(f"{len(plan.drops):,} tensor(s) dropped, {plan.bytes_saved:,} bytes saved.")


def prune_nothing_written(plan: PrunePlan) -> str:
    """The outcome line when there is nothing to drop and no copy was asked for; the plan above it
    already said "Nothing to drop" and why, so this line says only what was (not) written."""
    return f"Wrote nothing for {plan.engine} (--copy-anyway writes a verified copy, --link hard-links the shards)."


def prune_summary(plan: PrunePlan, result: PruneResult, seconds: float) -> str:
    """The outcome line of a written prune, with what its verification proved."""
    v = result.verification
    check = (
        "not verified (--no-verify)"
        if v is None
        else f"re-audit on {plan.engine}: {v.verdict}; {v.bytes_compared:,} bytes read back from disk "
        "and compared with the source"
    )
    return (
        f"Wrote {result.out_dir}: dropped {len(plan.drops):,} tensor(s), {plan.bytes_saved:,} bytes, in "
        f"{seconds:.1f} s; {check}."
    )


# ---------------------------------------------------------------------------
# Renderers: what ``report.format`` writes


class Renderer(NamedTuple):
    """One report kind in every output format: JSON text, markdown text, a rich table, and the one-line
    summary where the kind has one (``report.format`` picks the one asked for)."""

    json: Callable[[Any], str | bytes | bytearray | Iterator[bytes | memoryview]]
    markdown: Callable[[Any], str]
    table: Callable[[Any, Any], None]
    summary: Callable[[Any], str] | None = None


def audit_renderer(*, show_loaded: bool = False) -> Renderer:
    """The audit report; ``show_loaded`` lists the tensors that load too (table and markdown). Its summary
    line needs the run time, so the CLI calls ``summary_line`` itself."""
    return Renderer(
        render_json_chunks,
        partial(render_markdown, show_loaded=show_loaded),
        partial(render_table, show_loaded=show_loaded),
    )


MATRIX = Renderer(matrix_json, matrix_markdown, matrix_table)
MANIFEST = Renderer(manifest_json, manifest_markdown, manifest_table)


# ---------------------------------------------------------------------------
# load (one device) and load --tp


def load_to_json(r: LoadReport) -> dict:
    a = r.audit
    count = {s: sum(1 for p in r.params if p.status == s) for s in ("filled", "partial", "unfilled")}
    return {
        "schema": LOAD_SCHEMA,
        "nhcheck_version": __version__,
        "source": a.source,
        "revision": a.revision,
        "engine": {
            "name": a.engine.name,
            "version": a.engine.version,
            **backend_and_rank_json(a),
        },
        "model": {
            "architecture": a.config.wrapper or a.config.architecture,
            "pattern": a.config.pattern,
            "quant": a.quant,
        },
        "device": {"name": r.device, "description": r.device_name, "reader": r.reader},
        "summary": {
            "verdict": r.verdict,
            "tensors": len(a.records),
            "tensors_loaded": r.tensors_loaded,
            "bytes_loaded": r.bytes_loaded,
            "bytes_read": r.bytes_read,
            "seconds": round(r.seconds, 6),
            "gb_per_s": round(r.gb_per_s, 3),
            "peak_device_bytes": r.peak_device_bytes,
            "timings": {k: round(v, 6) for k, v in r.timings.items()},
            "params": len(r.params) + len(_unreachable(r)),
            "params_filled": count["filled"],
            "params_partial": count["partial"],
            "params_unfilled": count["unfilled"],
            "params_unreachable": len(_unreachable(r)),
            "double_writes": sum(p.double_writes for p in r.params),
            "poisoned_elements": sum(p.poisoned for p in r.params),
            "samples_checked": r.samples_checked,
            "sample_mismatches": sum(p.mismatches for p in r.params),
            "orphans": a.counts()["orphans"],
        },
        "crash": r.crash.as_dict() if r.crash else None,
        "params": [
            {
                "name": p.param.name,
                "dtype": p.param.dtype,
                "shape": list(p.param.shape),
                "status": p.status,
                "elements": p.numel,
                "written": p.written,
                "missing": list(p.missing),
                "double_writes": p.double_writes,
                "poisoned": p.poisoned,
                "mismatches": p.mismatches,
                "informational": p.param.informational,
            }
            for p in r.params
        ],
        "findings": [f.to_json() for f in r.findings],
    }


def _unreachable(r: LoadReport) -> list[str]:
    return [p.name for p in r.audit.manifest.params if not p.reachable]


def load_json(r: LoadReport) -> str:
    return json.dumps(load_to_json(r), separators=(",", ":"), ensure_ascii=False) + "\n"


def _gb(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _rate(gb_per_s: float) -> str:
    """A throughput in the unit that shows it: a tiny example loads at MB/s, not "0.00 GB/s"."""
    return f"{gb_per_s:.2f} GB/s" if gb_per_s >= 1 else f"{gb_per_s * 1e3:.2f} MB/s"


def load_headline(r: LoadReport) -> str:
    a = r.audit
    if r.crash is not None:
        c = r.crash
        return (
            f"{a.engine} raises {c.error}{c.where}, after {c.tensors_loaded or 0:,} tensors, "
            f"{_gb(c.bytes_loaded or 0)} in {c.seconds or 0:.2f} s: the server dies here."
        )
    bad = [f for f in r.findings if f.severity == "error"]
    if r.verdict == "clean":
        return f"{a.engine} fills every reachable parameter; every element written once, read back equal to the file."
    return f"{a.engine}: {len(bad)} problem famil{'y' if len(bad) == 1 else 'ies'} in the loaded parameters."


def load_stats_line(r: LoadReport) -> str:
    peak = f", peak device memory {_gb(r.peak_device_bytes)}" if r.peak_device_bytes is not None else ""
    return (
        f"{r.tensors_loaded:,} tensors, {_gb(r.bytes_loaded)} loaded ({_gb(r.bytes_read)} read) into "
        f"{len(r.params):,} parameters on {r.device} ({r.device_name}) with the {r.reader} reader in "
        f"{r.seconds:.3f} s ({_rate(r.gb_per_s)}){peak}; {r.samples_checked:,} elements read back."
    )


def _load_problem_groups(r: LoadReport):
    items = [
        ((p.status, p.param.informational, p.missing), p.param.name, p)
        for p in r.params
        if p.status != "filled" and r.crash is None
    ]
    return collapse.group(items)


def load_table(r: LoadReport, console) -> None:
    from rich.markup import escape

    e = lambda s: escape(safe(s))  # noqa: E731
    a = r.audit
    console.print(
        f"[bold]nhcheck load[/] {e(a.source)} · {e(engine_header(a))} · {e(a.config.wrapper or a.config.architecture)} "
        f"({e(a.quant or 'unquantized')}) · {len(a.records):,} tensors in {len(a.checkpoint.shards)} shard(s)"
    )
    colour = {"clean": "green", "incomplete": "yellow"}.get(r.verdict, "red")
    console.print(f"[bold {colour}]{r.verdict.upper()}[/] {e(load_headline(r))}")
    console.print(e(load_stats_line(r)))
    groups = _load_problem_groups(r)
    if groups:
        print_table(
            console,
            param_table(
                "Runtime parameters not fully written",
                groups,
                lambda status, info, missing: (
                    "engine keeps its default; informational"
                    if info
                    else "missing " + ", ".join(missing)
                    if status == "partial"
                    else "left poisoned"
                ),
            ),
        )
    shown = [f for f in r.findings if f.code not in ("param-unfilled", "param-partial")]
    if shown:
        print_table(console, findings_table(shown))


def load_markdown(r: LoadReport) -> str:
    a = r.audit
    out = [
        f"### nhcheck load: `{_md(a.source)}` on {_md(engine_header(a))}, {_md(r.device)} ({_md(r.device_name)})",
        "",
        f"**{r.verdict.upper()}**: {_md(load_headline(r))}",
        "",
        _md(load_stats_line(r)),
    ]
    groups = _load_problem_groups(r)
    if groups:
        out += ["", "| status | parameters | count | missing |", "|---|---|---|---|"]
        for (status, info, missing), name, n, _ in groups:
            out.append(f"| {status}{' (info)' if info else ''} | `{_md(name)}` | {n:,} | {_md(', '.join(missing))} |")
    shown = [f for f in r.findings if f.code not in ("param-unfilled", "param-partial")]
    if shown:
        out += findings_markdown(shown)
    return "\n".join(out) + "\n"


def load_summary(r: LoadReport) -> str:
    bad = sum(1 for f in r.findings if f.severity == "error")
    return (
        f"Loaded {r.tensors_loaded:,} tensors ({_gb(r.bytes_loaded)}) on {r.device} in {r.seconds:.2f} s "
        f"({_rate(r.gb_per_s)}): verdict {r.verdict}; {bad} error finding(s)."
    )


def tp_load_to_json(r: TPLoadReport) -> dict:
    return {
        "schema": TP_LOAD_SCHEMA,
        "nhcheck_version": __version__,
        "source": r.source,
        "engine": r.engine,
        "tp": r.tp,
        "ep": r.ep,
        "backend": r.backend,
        "device": r.device_name,
        "summary": {
            "verdict": r.verdict,
            "bytes_loaded": r.bytes_loaded,
            "bytes_read": r.bytes_read,
            "wall_seconds": round(r.wall_seconds, 6),
            "gb_per_s": round(r.gb_per_s, 3),
            "params": len(r.params),
            "params_filled": sum(1 for p in r.params if p.status == "filled"),
            "samples_checked": r.samples_checked,
        },
        "ranks": [
            {
                "rank": s.rank,
                "device": s.device,
                "copies": s.copies,
                "bytes_loaded": s.bytes_loaded,
                "bytes_read": s.bytes_read,
                "bytes_allocated": s.bytes_allocated,
                "seconds": round(s.seconds, 6),
                "gb_per_s": round(s.gb_per_s, 3),
                "experts": None if s.experts is None else [s.experts.start, s.experts.stop],
            }
            for s in r.ranks
        ],
        "crash": r.crash.as_dict() if r.crash else None,
        "params": [
            {
                "name": p.name,
                "elements": p.elements,
                "covered": p.covered,
                "status": p.status,
                "poisoned": p.poisoned,
                "mismatches": p.mismatches,
                "informational": p.informational,
            }
            for p in r.params
        ],
        "findings": [f.to_json() for f in r.findings],
    }


def tp_load_json(r: TPLoadReport) -> str:
    return json.dumps(tp_load_to_json(r), separators=(",", ":"), ensure_ascii=False) + "\n"


def _tp_size(r: TPLoadReport) -> str:
    return f"TP {r.tp}" + (" with expert parallelism" if r.ep else "")


def tp_load_headline(r: TPLoadReport) -> str:
    if r.verdict == "refused":
        return (
            f"{r.engine} cannot shard this checkpoint at {_tp_size(r)} (see the tp-indivisible findings); "
            "nothing was loaded."
        )
    if r.verdict == "clean":
        return (
            f"{r.tp} rank(s) together fill every reachable parameter exactly once; no poison left, "
            "read-backs equal the file."
        )
    return f"{r.engine} at {_tp_size(r)}: {sum(1 for f in r.findings if f.severity == 'error')} problem famil(ies)."


def tp_rank_lines(r: TPLoadReport) -> list[str]:
    lines = [
        f"rank {s.rank} ({s.device}): "
        + ("" if s.experts is None else f"{_experts(s.experts)}, ")
        + f"{s.copies:,} slices, {_gb(s.bytes_loaded)} placed into "
        f"{_gb(s.bytes_allocated)} of partitions ({_gb(s.bytes_read)} read) in {s.seconds:.3f} s "
        f"({_rate(s.gb_per_s)})"
        for s in r.ranks
    ]
    if r.ranks:
        lines.append(
            f"aggregate: {_gb(r.bytes_loaded)} in {r.wall_seconds:.3f} s wall ({_rate(r.gb_per_s)}) over "
            f"{r.tp} rank(s), {r.backend} on {r.device_name}; {r.samples_checked:,} slice corners read back"
        )
    return lines


def _experts(ids: range) -> str:
    """The experts a rank owns under expert parallelism, in every MoE layer."""
    if not ids:
        return "no experts"
    return f"expert {ids.start}" if len(ids) == 1 else f"experts {ids.start}–{ids.stop - 1}"


def tp_load_table(r: TPLoadReport, console) -> None:
    from rich.markup import escape

    e = lambda s: escape(safe(s))  # noqa: E731
    console.print(f"[bold]nhcheck load --tp {r.tp}{' --ep' if r.ep else ''}[/] {e(r.source)} · {r.engine}")
    colour = {"clean": "green", "incomplete": "yellow"}.get(r.verdict, "red")
    console.print(f"[bold {colour}]{r.verdict.upper()}[/] {e(tp_load_headline(r))}")
    for line in tp_rank_lines(r):
        console.print(e(line))
    if r.findings:
        print_table(console, findings_table(r.findings))


def tp_load_markdown(r: TPLoadReport) -> str:
    out = [
        f"### nhcheck load --tp {r.tp}{' --ep' if r.ep else ''}: `{_md(r.source)}` on {r.engine}",
        "",
        f"**{r.verdict.upper()}**: {_md(tp_load_headline(r))}",
        "",
    ]
    out += [f"- {_md(line)}" for line in tp_rank_lines(r)]
    if r.findings:
        out += findings_markdown(r.findings)
    return "\n".join(out) + "\n"


def tp_load_summary(r: TPLoadReport) -> str:
    bad = sum(1 for f in r.findings if f.severity == "error")
    return (
        f"Loaded {_gb(r.bytes_loaded)} on {r.tp} rank(s){' (expert parallel)' if r.ep else ''} in "
        f"{r.wall_seconds:.2f} s ({_rate(r.gb_per_s)} aggregate): "
        f"verdict {r.verdict}; {bad} error finding(s)."
    )


LOAD = Renderer(load_json, load_markdown, load_table, load_summary)
TP_LOAD = Renderer(tp_load_json, tp_load_markdown, tp_load_table, tp_load_summary)
