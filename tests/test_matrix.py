"""``nhcheck matrix``: one checkpoint, every release, headers read once, one row per range."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from nhcheck import engines
from nhcheck.audit import AuditOptions, run_audit
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.engines.base import EngineId, replay_classes
from nhcheck.matrix import build
from nhcheck.model import parse_config
from nhcheck.pipeline import audit_path
from nhcheck.quant import parse_quant

EX = Path(__file__).parent.parent / "examples"
CONF = Path(__file__).parent / "conformance"


def test_rows_cover_every_release_once_in_order_and_agree_with_single_audits():
    m = build(open_local(str(EX / "omni-nvfp4-24137")))
    covered = [f"{r.engine}@{v}" for r in m.rows for v in r.releases]
    assert covered == [str(e) for e in engines.known()]
    for row in m.rows:
        for version in (row.releases[0], row.releases[-1]):
            single = audit_path(str(EX / "omni-nvfp4-24137"), f"{row.engine}@{version}")
            assert single.verdict == row.verdict and single.crash == row.crash, version
    assert [(r.span, r.verdict) for r in m.rows] == [
        ("sglang 0.5.3.post1 … 0.5.10.post1", "crash"),  # Nano-Omni needs its own code before 0.5.11
        ("sglang 0.5.11", "crash"),
        ("sglang 0.5.12 … 0.5.12.post1", "broken"),
        ("sglang 0.5.13 … 0.5.23", "clean"),
        ("vllm 0.9.1 … 0.19.1", "crash"),  # the Omni V3 architecture is not registered
        ("vllm 0.20.0 … 0.32.0", "crash"),  # Unknown ModelOpt quant algo: MIXED_PRECISION
        ("vllm 0.33.0 … 0.34.0", "clean"),
    ]
    assert m.headline().startswith("crash on sglang 0.5.3.post1 … 0.5.10.post1; crash on sglang 0.5.11; broken")
    assert m.exit_code() == 0  # some release loads it clean


def test_cli_formats_and_exit_code():
    r = CliRunner().invoke(cli, ["matrix", str(EX / "nano3-24434-leftover-expert-scales"), "-f", "json"])
    assert r.exit_code == 1  # no release loads it clean: orphans everywhere from 0.5.12
    doc = json.loads(r.output)
    assert doc["schema"] == "nhcheck.matrix/1"
    assert [(row["releases"][0], row["verdict"], row["raise"]) for row in doc["rows"]] == [
        ("0.5.3.post1", "crash", 0),  # rms_norm_eps: no Nano config builds before 0.5.6
        ("0.5.6", "broken", 0),  # the MoE cannot be excluded before 0.5.9: BF16 experts into NVFP4 ones
        ("0.5.9", "crash", 144),
        ("0.5.12", "incomplete", 0),  # + the in_proj scales in slot 0 only, until 0.5.16
        ("0.5.16", "orphans", 0),
        ("0.9.1", "crash", 0),  # rms_norm_eps: no Nano config builds before 0.11.1
        ("0.11.1", "crash", 0),  # NVFP4 experts of the non-gated MoE refused before 0.12.0
        ("0.12.0", "crash", 144),  # vLLM raises on the orphan expert scales in every release (wording changes)
        ("0.14.0", "crash", 0),  # … except 0.14.x, which refuses NVFP4 experts without VLLM_USE_FLASHINFER_MOE_FP4=1
        ("0.15.0", "crash", 144),
        ("0.24.0", "crash", 144),
        ("0.26.0", "crash", 144),
        ("0.28.0", "crash", 144),
    ]
    assert doc["rows"][2]["crash"]["tensor"] == "backbone.layers.1.mixer.experts.0.down_proj.input_scale"
    md = CliRunner().invoke(cli, ["matrix", str(EX / "nano3-bf16"), "--format", "markdown"])
    assert md.exit_code == 0 and "| sglang 0.5.6 … 0.5.23 | clean |" in md.output
    assert "| vllm 0.11.1 … 0.34.0 | clean |" in md.output  # 0.9.1 – 0.11.0: rms_norm_eps
    md = CliRunner().invoke(cli, ["matrix", str(EX / "nano3-nvfp4"), "--format", "markdown"])
    assert "| sglang 0.5.6 … 0.5.15.post1 | incomplete |" in md.output  # in_proj scales in slot 0 only
    assert "| sglang 0.5.16 … 0.5.23 | clean |" in md.output


def _every_epoch_on_its_own(path: Path) -> list[tuple[object, ...]]:
    """Per epoch, what a matrix row says, from a full audit of its own (no sharing)."""
    ckpt = open_local(str(path))
    cfg, qc = parse_config(ckpt.config), parse_quant(ckpt.config, ckpt.hf_quant_config)
    out = []
    for name, releases in engines.epochs():
        engine = engines.get(EngineId(name, releases[0]))
        manifest = engine.build_manifest(cfg, qc)
        rep = run_audit(ckpt, cfg, qc, manifest, engine, AuditOptions(compare_versions=False))
        statuses = [p.status for p in rep.params if not p.param.informational]
        c = rep.counts()
        answer = (rep.verdict, c["orphans"], c["raise"], statuses.count("unfilled"), statuses.count("partial"))
        out += [(*answer, rep.crash)] * len(releases)
    return out


@pytest.mark.parametrize(
    "path",
    [
        EX / "nano3-24434-leftover-expert-scales",
        EX / "nano3-nvfp4",
        EX / "nano3-nvfp4-experts-excluded",  # vLLM releases that differ only in their loaders' shape checks
        EX / "nano3-bf16",  # vLLM's strict check after the stream (unquantized)
        EX / "omni-nvfp4-24137",
        CONF / "sglang_probe_kv_scale_shape" / "checkpoint",
        CONF / "startup_mixed_cfg_text" / "checkpoint",
    ],
    ids=lambda p: p.parent.name if p.name == "checkpoint" else p.name,
)
def test_shared_audits_answer_what_each_epoch_audited_alone_answers(path):
    """The matrix audits once per distinct behaviour; every release's answer equals its own full audit's."""
    m = build(open_local(str(path)))
    shared = [(r.verdict, r.orphans, r.raises, r.unfilled, r.partial, r.crash) for r in m.rows for _ in r.releases]
    assert shared == _every_epoch_on_its_own(path)


def test_matrix_audits_once_per_distinct_behaviour(monkeypatch):
    """18 SGLang epochs, but the epochs that build and replay nano3-bf16 alike share one audit."""
    from nhcheck import matrix as compat

    runs: list[str] = []
    real = compat.run_audit
    monkeypatch.setattr(compat, "run_audit", lambda *a, **k: runs.append(str(a[4].id)) or real(*a, **k))
    m = build(open_local(str(EX / "nano3-bf16")))
    sglang = [r for r in runs if r.startswith("sglang@")]
    assert len([e for e in engines.epochs() if e[0] == "sglang"]) == 18 and len(sglang) < 10, runs
    assert [(r.span, r.verdict) for r in m.rows if r.engine == "sglang"] == [
        ("sglang 0.5.3.post1 … 0.5.5.post3", "crash"),
        ("sglang 0.5.6 … 0.5.23", "clean"),
    ]


def test_replay_classes_group_names_as_the_replay_factors_them():
    """One ``experts.{e}.`` → grouped by the name around it; anything else (two indices, a leading zero, no
    index) on its own, as ``make_replayer`` treats it."""
    names = [
        "backbone.layers.1.mixer.experts.0.up_proj.weight",
        "backbone.layers.1.mixer.experts.12.up_proj.weight",
        "backbone.layers.1.mixer.experts.3.up_proj.weight",
        "backbone.layers.1.mixer.experts.01.up_proj.weight",
        "a.experts.w13.experts.5.y",
        "a.experts.5.b.experts.6.c",
        "x.experts..y",
        "experts.7",
        "backbone.norm_f.weight",
    ]
    c = replay_classes(names)
    groups = {tuple(g) for _, g in c.templates}
    assert (
        "backbone.layers.1.mixer.experts.0.up_proj.weight",
        "backbone.layers.1.mixer.experts.3.up_proj.weight",
        "backbone.layers.1.mixer.experts.12.up_proj.weight",
    ) in groups
    assert ("a.experts.w13.experts.5.y",) in groups
    grouped = {n for g in groups for n in g}
    for n in names:  # grouped ⇔ exactly one regex match
        assert (n in grouped) == (len(re.findall(r"experts\.(?:0|[1-9][0-9]*)\.", n)) == 1), n
    assert set(c.singles) == set(names) - grouped


def test_readme_shows_each_examples_matrix_as_the_tool_prints_it():
    """README's matrix block is ``nhcheck matrix examples/NAME --format markdown`` for every shipped example."""
    import msgspec

    from nhcheck import report

    readme = (EX.parent / "README.md").read_text()
    block = readme.split("<!-- matrix:begin -->\n", 1)[1].split("<!-- matrix:end -->", 1)[0]
    want = "\n".join(
        report.matrix_markdown(msgspec.structs.replace(build(open_local(str(ex))), source=f"examples/{ex.name}"))
        for ex in sorted(EX.iterdir())
        if (ex / "config.json").is_file()
    )
    assert block == want


def test_a_release_nhcheck_does_not_model_for_the_checkpoint_has_no_row_and_stops_nothing(tmp_path):
    """Latent MoE first ships in SGLang 0.5.8: asked alone, 0.5.6 is a usage error; in the matrix and in another
    release's cross-version summary it has no answer (it used to stop both with that usage error)."""
    import shutil

    root = tmp_path / "latent"
    shutil.copytree(EX / "nano3-bf16", root)
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "moe_latent_size": 16}))
    alone = CliRunner().invoke(cli, ["audit", str(root), "--engine", "sglang@0.5.6"])
    assert alone.exit_code == 2 and "has no latent MoE" in alone.output
    r = CliRunner().invoke(cli, ["audit", str(root), "--engine", "sglang@0.5.23", "--format", "json"])
    assert r.exit_code == 1, r.output  # not clean: the experts have no latent projections
    m = build(open_local(str(root)))
    covered = {(row.engine, v) for row in m.rows for v in row.releases}
    assert ("sglang", "0.5.23") in covered and ("sglang", "0.5.8") in covered
    assert not {("sglang", v) for v in ("0.5.6", "0.5.7", "0.5.6.post1")} & covered
