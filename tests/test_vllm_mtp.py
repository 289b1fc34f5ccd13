"""``--mtp`` with ``--engine vllm@X``: the releases it answers for, what it refuses, and the verbs around it.

The draft's tensor outcomes, crash point, coverage and manifest are compared with vLLM's own code in
``tests/test_conformance_vllm.py`` (``expected-mtp-vllm-X`` goldens); these tests hold the edges.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nhcheck import engines
from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.engines import vllm, vllm_mtp
from nhcheck.engines.base import release_key
from nhcheck.errors import UsageError
from nhcheck.matrix import build
from nhcheck.pipeline import audit_path

CONF = Path(__file__).parent / "conformance"
BF16 = CONF / "mtp" / "probe_nano3_bf16_mtp" / "checkpoint"
NVFP4 = CONF / "mtp" / "probe_nano3_nvfp4_mtp" / "checkpoint"
OMNI = Path(__file__).parent.parent / "examples" / "omni-nvfp4-24137"
MTP = AuditOptions(mtp=True, compare_versions=False)


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200", "NHCHECK_DEBUG": None})


@pytest.mark.parametrize("release", ["0.13.0", "0.16.0"])
def test_releases_before_the_draft_say_so(release):
    with pytest.raises(UsageError, match=rf"vllm {release} has no Nemotron-H MTP draft .*first ships in 0\.17\.0"):
        audit_path(str(BF16), f"vllm@{release}", opts=MTP)
    r = run("audit", BF16, "--engine", f"vllm@{release}", "--mtp")
    assert r.exit_code == 2 and "has no Nemotron-H MTP draft" in r.output and "Traceback" not in r.output


def test_every_release_with_the_draft_has_a_proven_row():
    """0.28.0 and 0.33.0 were run late (goldens like 0.27.0's and 0.34.0's): no known release is left unanswered."""
    with_draft = [v for v in vllm.PROFILES if release_key(v) >= release_key(vllm_mtp.FIRST_MTP)]
    assert list(vllm_mtp.MTP_PROFILES) == with_draft
    assert vllm_mtp.mtp_profile("0.28.0") is vllm_mtp.mtp_profile("0.27.0")
    assert vllm_mtp.mtp_profile("0.33.0") is vllm_mtp.mtp_profile("0.34.0")


def test_a_release_no_oracle_ran_is_not_guessed(monkeypatch):
    """A release added to the main table before its MTP goldens exist is refused, not answered with a neighbour."""
    monkeypatch.setattr(vllm_mtp, "MTP_PROFILES", {v: r for v, r in vllm_mtp.MTP_PROFILES.items() if v != "0.28.0"})
    with pytest.raises(UsageError, match="not yet proven by golden data"):
        audit_path(str(BF16), "vllm@0.28.0", opts=MTP)


def test_a_release_newer_than_the_table_is_answered_with_the_newest_row():
    report = audit_path(str(BF16), "vllm@0.99.0", opts=MTP)
    newest = audit_path(str(BF16), "vllm@0.34.0", opts=MTP)
    assert report.engine.assumption and report.mtp
    assert [(r.tensor.name, r.outcome) for r in report.records] == [(r.tensor.name, r.outcome) for r in newest.records]


def test_wrapped_checkpoints_and_configs_without_a_draft_are_usage_errors():
    with pytest.raises(UsageError, match="MTP draft of a NemotronH_Nano_Omni_Reasoning_V3 checkpoint is not modelled"):
        audit_path(str(OMNI), "vllm@0.34.0", opts=MTP)
    # one mtp.* tensor, no num_nextn_predict_layers: vLLM's speculative config derives no NemotronHMTPModel
    with pytest.raises(UsageError, match="num_nextn_predict_layers > 0"):
        audit_path(str(CONF / "sglang_probe_substring_mtp" / "checkpoint"), "vllm@0.34.0", opts=MTP)


def test_the_draft_drops_its_unknown_tensors_silently_and_the_audit_names_them():
    report = audit_path(str(BF16), "vllm@0.34.0", opts=AuditOptions(mtp=True))
    dropped = {r.tensor.name for r in report.records if r.orphan and r.outcome.reason == "mtp-no-param"}
    assert dropped == {
        "mtp.layers.0.mixer.qkv_proj.weight",  # pre-fused: "v_proj" is a substring, qkqkv_proj is no parameter
        "mtp.layers.1.mixer.experts.12.up_proj.weight",  # expert id = E
        "mtp.layers.0.mixer.not_a_param.weight",
        "mtp.layers.0.mixer.q_proj.bias",
        "mtp.layers.2.norm.weight",  # a layer past the draft's pattern
    }
    assert all(f.severity == "warning" for f in report.findings if f.code == "orphan")
    main = [r for r in report.records if r.tensor.name.startswith("backbone.")]
    assert main and all(not r.orphan and r.outcome.reason == "mtp-filter" for r in main)
    assert report.crash is None and report.verdict == "orphans"
    # the cross-version summary names MTP rows only: no release without a draft, none unproven
    shown = {v for v in report.other_versions}
    assert all(v.version in vllm_mtp.MTP_PROFILES for v in shown) and shown


def test_the_shared_embedding_and_head_are_informational():
    """0.26.0 – 0.29.0 never load the draft's head (the filter drops ``lm_head``): the proposer shares the target's
    after loading, so the audit does not call the draft incomplete."""
    report = audit_path(str(BF16), "vllm@0.26.0", opts=MTP)
    head = next(s for s in report.params if s.name == "lm_head.weight")
    assert head.status == "unfilled" and head.param.informational
    assert report.verdict == "orphans"
    # 0.34.0 builds neither: the draft runs with the target's from the start
    newest = audit_path(str(BF16), "vllm@0.34.0", opts=MTP).manifest.params
    assert newest and not any(p.name.startswith(("lm_head.", "model.embed_tokens.")) for p in newest)


def test_matrix_mtp_has_a_row_for_every_release_with_a_draft():
    m = build(open_local(str(BF16)), mtp=True)
    covered = [v for r in m.rows if r.engine == "vllm" for v in r.releases]
    assert covered == list(vllm_mtp.MTP_PROFILES)
    for row in (r for r in m.rows if r.engine == "vllm"):
        single = audit_path(str(BF16), f"vllm@{row.releases[-1]}", opts=MTP)
        assert (single.verdict, single.crash) == (row.verdict, row.crash), row.span
    # a row never spans a release without an answer: its releases are consecutive on the table
    table = list(vllm.PROFILES)
    for row in (r for r in m.rows if r.engine == "vllm"):
        first = table.index(row.releases[0])
        assert list(row.releases) == table[first : first + len(row.releases)], row.span
    # each row is a run of whole MTP epochs
    epochs = [vs for name, vs in engines.epochs(mtp=True) if name == "vllm"]
    for row in (r for r in m.rows if r.engine == "vllm"):
        assert any(vs[0] == row.releases[0] for vs in epochs) and any(vs[-1] == row.releases[-1] for vs in epochs)


def test_manifest_and_load_verbs_take_mtp(tmp_path):
    r = run("manifest", BF16, "--engine", "vllm@0.17.0", "--mtp", "--format", "json", "-o", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "m.json").read_text())
    names = {p["name"] for p in data["params"]}
    assert {"model.layers.0.eh_proj.weight", "model.layers.1.final_layernorm.weight", "lm_head.weight"} <= names
    assert data["mode"] == "mtp"


def test_load_mtp_writes_the_draft_on_cpu():
    """``load --mtp``: the draft's parameters allocated, poisoned and filled as ``NemotronHMTP.load_weights`` does
    (0.26.0: its head is never loaded — informational, the target's is shared after loading)."""
    from nhcheck.load import LoadOptions, load_path

    result = load_path(str(BF16), "vllm@0.26.0", LoadOptions(device="cpu"), mtp=True)
    report = result.report
    assert report.crash is None and report.audit.mtp and report.audit.manifest.mode == "mtp"
    assert "model.layers.1.mixer.experts.routed_experts.w13_weight" in result.tensors
    written = {p.param.name for p in report.params if p.written == p.numel}
    assert written == {p.name for p in report.audit.manifest.params} - {"lm_head.weight"}
    head = next(p for p in report.params if p.param.name == "lm_head.weight")
    assert head.written == 0 and head.param.informational
    assert not any(f.severity == "error" for f in report.findings)
