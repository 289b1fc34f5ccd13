"""``nhcheck matrix``: one checkpoint, every release, headers read once, one row per range."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from nhcheck import engines
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.matrix import build
from nhcheck.pipeline import audit_path

EX = Path(__file__).parent.parent / "examples"


def test_rows_cover_every_release_once_in_order_and_agree_with_single_audits():
    m = build(open_local(str(EX / "omni-nvfp4-24137")))
    covered = [f"{r.engine}@{v}" for r in m.rows for v in r.releases]
    assert covered == [str(e) for e in engines.known()]
    for row in m.rows:
        for version in (row.releases[0], row.releases[-1]):
            single = audit_path(str(EX / "omni-nvfp4-24137"), f"{row.engine}@{version}")
            assert single.verdict == row.verdict and single.crash == row.crash, version
    assert [(r.span, r.verdict) for r in m.rows] == [
        ("sglang 0.5.11", "crash"),
        ("sglang 0.5.12 … 0.5.12.post1", "broken"),
        ("sglang 0.5.13 … 0.5.23", "clean"),
        ("vllm 0.16.0 … 0.19.1", "crash"),  # the Omni V3 architecture is not registered
        ("vllm 0.20.0 … 0.32.0", "crash"),  # Unknown ModelOpt quant algo: MIXED_PRECISION
        ("vllm 0.33.0 … 0.34.0", "clean"),
    ]
    assert m.headline().startswith("crash on sglang 0.5.11; broken on sglang 0.5.12")
    assert m.exit_code() == 0  # some release loads it clean


def test_cli_formats_and_exit_code():
    r = CliRunner().invoke(cli, ["matrix", str(EX / "nano3-24434-leftover-expert-scales"), "-f", "json"])
    assert r.exit_code == 1  # no release loads it clean: orphans everywhere from 0.5.12
    doc = json.loads(r.output)
    assert doc["schema"] == "nhcheck.matrix/1"
    assert [(row["releases"][0], row["verdict"], row["raise"]) for row in doc["rows"]] == [
        ("0.5.11", "crash", 144),
        ("0.5.12", "incomplete", 0),  # + the in_proj scales in slot 0 only, until 0.5.16
        ("0.5.16", "orphans", 0),
        ("0.16.0", "crash", 144),  # vLLM raises on the orphan expert scales in every release (wording changes)
        ("0.24.0", "crash", 144),
        ("0.26.0", "crash", 144),
        ("0.28.0", "crash", 144),
    ]
    assert doc["rows"][0]["crash"]["tensor"] == "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    md = CliRunner().invoke(cli, ["matrix", str(EX / "nano3-bf16"), "--format", "markdown"])
    assert md.exit_code == 0 and "| sglang 0.5.11 … 0.5.23 | clean |" in md.output
    assert "| vllm 0.16.0 … 0.34.0 | clean |" in md.output
    md = CliRunner().invoke(cli, ["matrix", str(EX / "nano3-nvfp4"), "--format", "markdown"])
    assert "| sglang 0.5.11 … 0.5.15.post1 | incomplete |" in md.output  # in_proj scales in slot 0 only
    assert "| sglang 0.5.16 … 0.5.23 | clean |" in md.output
