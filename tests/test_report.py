"""Rendering: JSON equals the generic encoding, collapsing, escaping, markdown, verdict text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nhcheck import collapse, report
from nhcheck.pipeline import audit_path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "tests" / "conformance"


@pytest.mark.parametrize("case", ["omni_nvfp4_mixed", "nano3_nvfp4_experts_excluded", "h8b_dense"])
@pytest.mark.parametrize("engine", ["sglang@0.5.11", "sglang@0.5.23"])
def test_fast_json_equals_generic_encoding(case, engine):
    r = audit_path(str(CONF / case / "checkpoint"), engine)
    fast = report.render_json(r)
    assert fast == json.dumps(report.to_json(r), separators=(",", ":"), ensure_ascii=False) + "\n"
    doc = json.loads(fast)
    assert doc["schema"] == "nhcheck.audit/1"
    assert len(doc["tensors"]) == doc["summary"]["tensors"] == len(r.records)
    assert len(doc["params"]) == doc["summary"]["params"]


@pytest.mark.parametrize("rows", [1, 7, 4096])
def test_json_chunks_join_to_the_generic_encoding(monkeypatch, rows):
    """The tensor list is written a chunk at a time: chunks of 1 and 7 rows (a case with several chunks, one
    partly filled) and of 4096 (one chunk) join to the same document, piece by piece as a writer sees them."""
    monkeypatch.setattr(report, "JSON_CHUNK_ROWS", rows)
    r = audit_path(str(CONF / "h8b_dense" / "checkpoint"), "sglang@0.5.23")
    assert 7 < len(r.records) < 4096 and len(r.records) % 7
    want = json.dumps(report.to_json(r), separators=(",", ":"), ensure_ascii=False) + "\n"
    assert report.render_json(r) == want
    pieces = list(map(bytes, report.render_json_chunks(r)))  # bytes: what a writer sees, piece by piece
    assert b"".join(pieces).decode() == want
    assert len(pieces) == 2 + (len(r.records) + rows - 1) // rows * 2 - 1


def test_collapse_templates():
    names = [f"model.layers.{i}.mixer.experts.{e}.down_proj.input_scale" for i in (1, 3, 5, 7, 51) for e in range(128)]
    [(key, text, count, _)] = collapse.group((0, n, n) for n in names)
    assert text == "model.layers.{1,3,…,51}.mixer.experts.{0…127}.down_proj.input_scale"
    assert count == 640
    assert collapse.render_set([4]) == "4"
    assert collapse.render_set([1, 2, 3]) == "{1…3}"
    assert collapse.render_set([1, 5, 9]) == "{1,5,9}"
    # braces in real names survive and do not look like slots
    [(_, text, _, _)] = collapse.group([(0, "a.{x}.1.b", None)])
    assert text == "a.{x}.1.b"


def test_names_are_escaped():
    assert report.safe("a\x1b[31mb") == "a\\x1b[31mb"
    assert report.safe("ok.name") == "ok.name"
    assert "\\|" in report._md("a|b")


def test_markdown_and_verdict_text():
    r = audit_path(str(CONF / "omni_nvfp4_mixed" / "checkpoint"), "sglang@0.5.11")
    md = report.render_markdown(r)
    assert md.startswith("### nhcheck audit")
    assert (
        "| raise | `language_model.backbone.layers.{1,3,…,51}.mixer.experts.{0…11}.down_proj.input_scale` | 276 |" in md
    )
    assert "**CRASH**" in md and "- sglang@0.5.13 … 0.5.23: clean" in md
    assert "KeyError: 'model.layers.1.mixer.experts.w2_input_scale'" in report.verdict_text(r)


def test_table_renders_without_markup_injection(tmp_path):
    from rich.console import Console

    r = audit_path(str(CONF / "omni_nvfp4_mixed" / "checkpoint"), "sglang@0.5.12")
    out = tmp_path / "t.txt"
    with open(out, "w") as fh:
        report.render_table(r, Console(file=fh, width=200, no_color=True))
    text = out.read_text()
    assert "BROKEN" in text and "quant-mismatch" in text
    assert "dropped silently: no such expert parameter" in text


# ---------------------------------------------------------------------------
# One report layer (issue 12): one format object, one console factory, a CLI that only parses and calls


def test_the_cli_renders_nothing_itself():
    import ast

    tree = ast.parse((ROOT / "nhcheck" / "cli.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "rich"}, imported
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"Table", "Console", "open"}


def test_consoles_come_from_one_factory():
    """Only nhcheck/report/console.py builds a rich Console."""
    makers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "nhcheck").rglob("*.py") if "Console(" in p.read_text()]
    assert makers == ["nhcheck/report/console.py"]


@pytest.mark.parametrize("name", ["table", "json", "markdown"])
def test_format_object_writes_the_asked_format_only(name, tmp_path):
    from nhcheck.report import format as formats

    calls = []

    def table(rep, console):
        calls.append("table")
        assert not console.is_terminal
        console.print("r")

    renderer = report.Renderer(
        lambda rep: calls.append("json") or '{"r": 1}\n',
        lambda rep: calls.append("markdown") or "# r\n",
        table,
    )
    out = tmp_path / "r.out"
    formats.get(name, str(out)).write(renderer, object())
    assert calls == [name]
    assert out.read_text() == {"table": "r\n", "json": '{"r": 1}\n', "markdown": "# r\n"}[name]


def test_manifest_renders_in_every_format():
    from click.testing import CliRunner

    from nhcheck.cli import cli

    ckpt = ROOT / "tests" / "conformance" / "nano3_nvfp4" / "checkpoint"
    md = CliRunner().invoke(cli, ["manifest", str(ckpt), "-f", "markdown"]).stdout
    assert md.startswith("### nhcheck manifest: sglang@0.5.23\n")
    assert "| `model.layers.5.mixer.qkv_proj.weight` | [128, 64] | bfloat16 |" in md
