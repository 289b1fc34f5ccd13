"""Output that stays true and usable in pipes and files (issue 16, items 3, 9, 10 and the findings order).

- counts and tables agree: an informational parameter no tensor fills is ``default`` in the table, the
  markdown, the JSON ``params[]`` and the summary (``summary.params_default``), never an ``unfilled`` row
  under ``params_unfilled: 0``;
- the one-line summary on stderr is one line when stderr is not a terminal, in every verb;
- piped or written to a file, tables are plain rows: one per row, names whole, greppable;
- findings are listed most severe first in the table and the markdown.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from nhcheck import report
from nhcheck.cli import cli
from nhcheck.findings import Finding
from nhcheck.pipeline import audit_path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "tests" / "conformance"
OMNI = CONF / "omni_nvfp4_mixed" / "checkpoint"
NANO = CONF / "nano3_nvfp4" / "checkpoint"  # NVFP4 with FP8 KV cache and no k/v scales: 12 informational params
LEFTOVER = ROOT / "examples" / "nano3-24434-leftover-expert-scales"
BOX = set("│┃┏┓┗┛━─┡┩╇┳┻")


def run(*args: object, env: dict | None = None):
    """In-process, stdout and stderr are not terminals; no COLUMNS, so nothing widens the 80-column default."""
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": None, "NHCHECK_DEBUG": None, **(env or {})})


def run_process(*args: object) -> subprocess.CompletedProcess:
    """A real process whose stdout and stderr are pipes (as in CI logs or ``2>file``), without COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NHCHECK_DEBUG")}
    return subprocess.run(
        [sys.executable, "-m", "nhcheck", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


# ---------------------------------------------------------------------------
# 3. counts and tables agree


def test_json_counts_agree_with_params_statuses():
    doc = json.loads(run("audit", NANO, "--format", "json", "-q").stdout)
    s, statuses = doc["summary"], [p["status"] for p in doc["params"]]
    assert s["params_unfilled"] == statuses.count("unfilled") == 0
    assert s["params_partial"] == statuses.count("partial")
    assert s["params_default"] == statuses.count("default") == 12
    defaults = {p["name"].rsplit(".", 1)[-1] for p in doc["params"] if p["status"] == "default"}
    assert defaults == {"k_scale", "v_scale"}
    assert s["verdict"] == "clean"


def test_table_markdown_and_summary_say_default_not_unfilled():
    res = run("audit", NANO)
    rows = [line for line in res.stdout.splitlines() if "attn.k_scale" in line or "attn.v_scale" in line]
    assert len(rows) == 2 and all(line.split()[0] == "default" for line in rows), res.stdout
    assert "0 params unfilled" in res.stderr and "12 at the engine default (informational)" in res.stderr
    md = run("audit", NANO, "--format", "markdown", "-q").stdout
    assert "| default (info) | `model.layers.{5,12,…,42}.mixer.attn.k_scale` | 6 |" in md
    assert "| unfilled" not in md


# ---------------------------------------------------------------------------
# 9. the summary line stays one line when stderr is not a terminal


def test_audit_summary_is_one_line_on_a_pipe():
    p = run_process("audit", NANO, "--tp", "2,4,8")
    line = p.stderr.rstrip("\n")
    assert len(line) > 80 and "\n" not in line, p.stderr
    assert line.startswith("Scanned ") and line.endswith(".")


def test_load_and_prune_summaries_are_one_line_on_a_pipe(tmp_path):
    out = tmp_path / ("a-long-output-directory-name-" * 3)
    p = run_process("prune", LEFTOVER, "--out", out, "--engine", "sglang@0.5.11", "--no-verify")
    assert p.returncode == 0, p.stderr
    line = p.stderr.rstrip("\n")
    assert line.startswith("Wrote ") and len(line) > 80 and "\n" not in line, p.stderr
    p = run_process("load", LEFTOVER, "--engine", "sglang@0.5.23", "--device", "cpu", "--format", "json")
    line = p.stderr.rstrip("\n")
    assert line.startswith("Loaded ") and len(line) > 80 and "\n" not in line, p.stderr


# ---------------------------------------------------------------------------
# 10. piped tables are plain rows; names are never split


def _plain(text: str) -> None:
    assert not BOX & set(text), text[:2000]


def test_manifest_piped_is_one_row_per_parameter():
    res = run("manifest", NANO)
    _plain(res.stdout)
    names = [p["name"] for p in json.loads(run("manifest", NANO, "--format", "json").stdout)["params"]]
    rows = res.stdout.splitlines()
    first = {line.split()[0] for line in rows[2:]}
    assert set(names) <= first and len(rows) == len(names) + 2  # title, header, one row per parameter
    experts = [line for line in rows if "experts" in line]
    assert len(experts) == sum("experts" in n for n in names)


def test_audit_piped_rows_keep_collapsed_names_whole():
    res = run("audit", OMNI, "--engine", "sglang@0.5.11")
    _plain(res.stdout)
    rows = res.stdout.splitlines()
    assert any(
        line.startswith("raise ")
        and "language_model.backbone.layers.{1,3,…,51}.mixer.experts.{0…11}.down_proj.input_scale" in line
        for line in rows
    )
    assert any(line.startswith("error ") and " crash " in line for line in rows)


def test_audit_to_a_file_is_plain_rows(tmp_path):
    out = tmp_path / "audit.txt"
    assert run("audit", OMNI, "--engine", "sglang@0.5.11", "-o", out, "-q").exit_code == 1
    text = out.read_text()
    _plain(text)
    assert "language_model.backbone.layers.{1,3,…,51}.mixer.experts.{0…11}.up_proj.weight_scale_2" in text


def test_load_piped_rows_are_plain():
    res = run("load", NANO, "--engine", "sglang@0.5.11", "--device", "cpu")
    _plain(res.stdout)
    rows = res.stdout.splitlines()
    assert any(
        line.startswith("partial ") and "model.layers.{0,2,…,50}.mixer.in_proj.input_scale" in line for line in rows
    )
    assert any(line.startswith("error ") and "scale-slot0-only" in line for line in rows)


def test_terminal_keeps_rich_tables():
    from rich.console import Console

    buf = io.StringIO()
    report.render_table(audit_path(str(NANO)), Console(file=buf, force_terminal=True, width=120, no_color=True))
    assert "┃" in buf.getvalue()


# ---------------------------------------------------------------------------
# Findings: errors first


def test_findings_are_listed_errors_first():
    from rich.console import Console

    r = audit_path(str(NANO))
    r = replace(
        r,
        findings=(
            Finding("info", "note-one", "an info note"),
            Finding("warning", "warn-one", "a warning"),
            Finding("error", "err-one", "an error"),
            Finding("info", "note-two", "another note"),
        ),
    )
    buf = io.StringIO()
    report.render_table(r, Console(file=buf, width=200, no_color=True))
    order = [
        c for line in buf.getvalue().splitlines() for c in ("err-one", "warn-one", "note-one", "note-two") if c in line
    ]
    assert order == ["err-one", "warn-one", "note-one", "note-two"]
    md = report.render_markdown(r)
    assert md.index("err-one") < md.index("warn-one") < md.index("note-one") < md.index("note-two")


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_findings_order_in_the_cli(fmt):
    res = run("audit", LEFTOVER, "--tp", "2,4,8", "--format", fmt, "-q", "--fail-on", "none")
    sev = [
        w for line in res.stdout.splitlines() for w in line.strip("| ").split()[:1] if w in ("error", "warning", "info")
    ]
    assert sev == sorted(sev, key=["error", "warning", "info"].index)
