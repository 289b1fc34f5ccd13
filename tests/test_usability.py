"""What a new user hit (issue 16, items 4, 5, 12, 14 and the polish), each fixed and held here.

- ``audit --tp`` that cannot shard says so in the verdict line and in ``summary.tp_verdict``; the exit
  code follows it, never a bare ``CLEAN`` with exit 1;
- ``--mtp`` on a checkpoint with no MTP draft is one line, exit 2 (a usage answer, not ``INCOMPLETE``);
- a ``-o`` path that cannot be written is a usage error before any work (exit 2, one line);
- ``manifest`` works from a directory holding only the configs;
- ``-f`` for ``--format``, ``-V`` for ``--version``, help for ``manifest -o/-q``, full command
  descriptions in the top-level help.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from nhcheck import __version__
from nhcheck.cli import cli

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "tests" / "conformance"
OMNI = CONF / "omni_nvfp4_mixed" / "checkpoint"
NANO = CONF / "nano3_nvfp4" / "checkpoint"  # shards at TP 2 and 4, not at TP 8
H8B = ROOT / "examples" / "h8b-dense"  # no MTP layers in the config, no mtp.* tensors


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200", "NHCHECK_DEBUG": None})


def _one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("nhcheck: error: "), (
        res.exit_code,
        res.stderr,
    )
    assert "Traceback" not in res.stderr + res.stdout and "internal error" not in res.stderr
    return lines[0]


# ---------------------------------------------------------------------------
# 4. the TP result is in the verdict line and in a JSON field the exit code follows


def test_tp_failure_is_in_the_headline_json_and_summary():
    res = run("audit", NANO, "--tp", "2,4,8", "--format", "json", "-q")
    s = json.loads(res.stdout)["summary"]
    assert res.exit_code == 1
    assert s["verdict"] == "clean" and s["tp_verdict"] == "cannot-shard" and s["tp_errors"]["8"] > 0
    table = run("audit", NANO, "--tp", "2,4,8")
    assert table.exit_code == 1
    assert table.stdout.splitlines()[1].startswith("CLEAN at TP 1; TP 2, 4: ok; TP 8: cannot shard — ")
    assert "verdict clean at TP 1; TP 2, 4: ok; TP 8: cannot shard;" in table.stderr
    md = run("audit", NANO, "--tp", "2,4,8", "--format", "markdown", "-q").stdout
    assert "**CLEAN at TP 1; TP 2, 4: ok; TP 8: cannot shard**: " in md


def test_tp_that_shards_is_ok_and_exit_0():
    res = run("audit", NANO, "--tp", "2,4", "--format", "json", "-q")
    s = json.loads(res.stdout)["summary"]
    assert res.exit_code == 0 and s["verdict"] == "clean" and s["tp_verdict"] == "ok"
    assert "tp_verdict" not in json.loads(run("audit", NANO, "--format", "json", "-q").stdout)["summary"]
    assert run("audit", NANO, "--tp", "2,4").stdout.splitlines()[1].startswith("CLEAN at TP 1; TP 2, 4: ok — ")


def test_tp_of_a_model_the_release_does_not_build_is_not_checked():
    """vLLM 0.11.1 refuses the non-gated NVFP4 MoE while building the model: no weight is sharded, so no
    TP size is "ok" (it was, before: the static check found nothing to object to in an unbuilt model)."""
    nvfp4 = str(NANO)
    res = run("audit", nvfp4, "--engine", "vllm@0.11.1", "--tp", "2,4", "--format", "json", "-q")
    s = json.loads(res.stdout)["summary"]
    assert res.exit_code == 1 and s["verdict"] == "crash" and s["tp_verdict"] == "not-checked"
    assert s["tp_errors"] == {"2": 0, "4": 0}
    table = run("audit", nvfp4, "--engine", "vllm@0.11.1", "--tp", "2,4")
    assert table.stdout.splitlines()[1].startswith("CRASH at TP 1; TP 2, 4: not checked (the model is not built) — ")
    assert "tensor parallel (static): TP 2: not checked · TP 4: not checked" in table.stdout
    built = run("audit", nvfp4, "--engine", "vllm@0.12.0", "--tp", "2", "--format", "json", "-q")
    assert json.loads(built.stdout)["summary"]["tp_verdict"] == "ok"


# ---------------------------------------------------------------------------
# 5. --mtp without an MTP draft


@pytest.mark.parametrize("verb", ["audit", "manifest", "load"])
def test_mtp_on_a_checkpoint_without_a_draft_says_so(verb):
    extra = ["--device", "cpu"] if verb == "load" else []
    line = _one_error_line(run(verb, H8B, "--mtp", *extra))
    assert "has no MTP draft" in line and "run without --mtp" in line
    assert "INCOMPLETE" not in line


def test_mtp_with_a_draft_still_audits():
    res = run("audit", OMNI, "--mtp", "--format", "json", "-q")
    assert res.exit_code == 0 and json.loads(res.stdout)["engine"]["mode"] == "mtp"


# ---------------------------------------------------------------------------
# 12. -o is checked first


@pytest.mark.parametrize("verb", ["audit", "manifest", "load"])
def test_output_in_a_missing_directory_is_a_usage_error(verb, tmp_path):
    extra = ["--device", "cpu"] if verb == "load" else []
    target = tmp_path / "no-such-dir" / "x.json"
    line = _one_error_line(run(verb, NANO, "-o", target, *extra))
    assert f"-o {target}" in line and "does not exist" in line
    assert not target.parent.exists()


# ---------------------------------------------------------------------------
# 14. manifest from the configs alone


def test_manifest_from_a_directory_with_only_the_configs(tmp_path):
    for name in ("config.json", "hf_quant_config.json"):
        shutil.copy(NANO / name, tmp_path / name)
    res = run("manifest", tmp_path, "--format", "json")
    assert res.exit_code == 0, res.output
    full = json.loads(run("manifest", NANO, "--format", "json").stdout)
    assert json.loads(res.stdout)["params"] == full["params"] and full["params"]
    assert run("manifest", tmp_path).exit_code == 0
    # audit still needs shards; an empty directory is still refused by manifest
    assert "no *.safetensors" in _one_error_line(run("audit", tmp_path))
    (tmp_path / "empty").mkdir()
    _one_error_line(run("manifest", tmp_path / "empty"))


# ---------------------------------------------------------------------------
# Polish


def test_short_options_for_format_and_version():
    assert run("-V").stdout.strip() == f"nhcheck, version {__version__}"
    doc = json.loads(run("audit", NANO, "-f", "json", "-q").stdout)
    assert doc["schema"] == "nhcheck.audit/1"
    assert json.loads(run("manifest", NANO, "-f", "json").stdout)["params"]
    assert run("audit", NANO, "-f", "markdown", "-q").stdout.startswith("### nhcheck audit")


def test_manifest_output_and_quiet_have_help():
    text = run("manifest", "--help").stdout
    assert "Write the manifest here instead of stdout." in text and "No progress on stderr." in text


def test_top_level_help_does_not_truncate_descriptions():
    text = run("--help").stdout
    commands = text.split("Commands:", 1)[1]
    assert "..." not in commands
    flat = " ".join(commands.split())
    assert "Replay the engine's loader over SOURCE's shard headers and report both directions." in flat
    assert "Write a copy of SOURCE without the tensors the engine would not load anyway" in flat


# ---------------------------------------------------------------------------
# 6. a single shard given alone while its index lists more: the headline leads with the cause


def test_single_shard_given_alone_leads_with_the_missing_shards():
    res = run("audit", NANO / "model-00001-of-00004.safetensors")
    head = res.stdout.splitlines()[1]
    assert head.startswith("INCOMPLETE only 1 of 4 shards audited — model-00002-of-00004.safetensors, "), head
    assert "not given (the index beside model-00001-of-00004.safetensors lists 4)" in head
    assert "silent garbage" not in res.stdout
    assert "verdict incomplete (1 of 4 shards)" in res.stderr
    doc = json.loads(run("audit", NANO / "model-00001-of-00004.safetensors", "-f", "json", "-q").stdout)
    [f] = [f for f in doc["findings"] if f["code"] == "shards-not-given"]
    assert f["severity"] == "warning" and "3 more shard(s)" in f["message"]


def test_a_single_file_without_an_index_beside_it_is_just_that_file(tmp_path):
    shutil.copy(NANO / "model-00001-of-00004.safetensors", tmp_path / "model.safetensors")
    shutil.copy(NANO / "config.json", tmp_path / "config.json")
    doc = json.loads(run("audit", tmp_path / "model.safetensors", "-f", "json", "-q").stdout)
    assert not [f for f in doc["findings"] if f["code"] == "shards-not-given"]


# ---------------------------------------------------------------------------
# 13. the PP rank in every header and JSON ``engine``; the MoE backend requested and resolved, everywhere


def test_pp_rank_is_named_in_headers_and_json():
    table = run("audit", NANO, "--pp", "1/4", "-q").stdout.splitlines()[0]
    assert " · sglang@0.5.23 · PP rank 1/4 (layers 13-25) · " in table
    md = run("audit", NANO, "--pp", "1/4", "-q", "-f", "markdown").stdout.splitlines()[0]
    assert "on sglang@0.5.23 · PP rank 1/4 (layers 13-25)" in md
    eng = json.loads(run("audit", NANO, "--pp", "1/4", "-q", "-f", "json").stdout)["engine"]
    assert eng["pp"] == {"rank": 1, "size": 4, "layers": [13, 26]}
    assert json.loads(run("audit", NANO, "-q", "-f", "json").stdout)["engine"]["pp"] is None
    man = json.loads(run("manifest", NANO, "--pp", "3/4", "-f", "json").stdout)
    assert man["pp"] == {"rank": 3, "size": 4, "layers": [39, 52]}
    assert run("manifest", NANO, "--pp", "3/4").stdout.startswith("sglang@0.5.23 · PP rank 3/4 (layers 39-51) ")


def test_load_names_the_pp_rank():
    pytest.importorskip("torch")
    res = run("load", NANO, "--pp", "0/2", "--device", "cpu", "-q", "-f", "json")
    assert json.loads(res.stdout)["engine"]["pp"] == {"rank": 0, "size": 2, "layers": [0, 26]}


@pytest.mark.parametrize(
    ("asked", "resolved"), [(None, "flashinfer_trtllm"), ("flashinfer_cutlass", "flashinfer_cutlass")]
)
def test_moe_backend_requested_and_resolved_the_same_way_everywhere(asked, resolved, tmp_path):
    extra = ["--moe-backend", asked] if asked else []
    requested = asked or "auto"
    eng = json.loads(run("audit", NANO, "-q", "-f", "json", *extra).stdout)["engine"]
    assert (eng["moe_backend"], eng["moe_backend_requested"]) == (resolved, requested)
    man = json.loads(run("manifest", NANO, "-f", "json", *extra).stdout)
    assert (man["moe_backend"], man["moe_backend_requested"]) == (resolved, requested)
    assert f"moe backend {resolved}, requested {requested})" in run("manifest", NANO, *extra).stdout.splitlines()[0]


def test_prune_receipt_names_both_backends(tmp_path):
    out = tmp_path / "out"
    res = run(
        "prune",
        ROOT / "examples" / "nano3-24434-leftover-expert-scales",
        "--out",
        out,
        "--engine",
        "sglang@0.5.11",
        "-q",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "nhcheck-prune.json").read_text())
    assert (doc["moe_backend"], doc["moe_backend_requested"]) == ("flashinfer_trtllm", "auto")


# ---------------------------------------------------------------------------
# Issue 12: the TP size is a field of the finding, never parsed from its message


def test_tp_errors_count_the_structured_tp_size():
    from dataclasses import replace

    from nhcheck.findings import Finding
    from nhcheck.pipeline import audit_path

    rep = replace(audit_path(str(NANO)), tp_sizes=(2, 8))
    worded = Finding("error", "tp-indivisible", "TP eight: experts cannot shard", tp=8)
    rep = replace(rep, findings=rep.findings + (worded,))
    assert rep.tp_errors() == {2: 0, 8: 1}


# ---------------------------------------------------------------------------
# Polish: --ignore, separators, help texts, the --fail-on info decision, NHCHECK_DEBUG, truncated shards


def test_ignore_that_matches_nothing_says_so():
    doc = json.loads(run("audit", NANO, "--ignore", "no.such.*", "--ignore", "*.A", "-f", "json", "-q").stdout)
    unmatched = [f for f in doc["findings"] if f["code"] == "ignore-unmatched"]
    assert [f["message"] for f in unmatched] == [
        "--ignore 'no.such.*' matches no checkpoint tensor and no runtime parameter"
    ]
    assert unmatched[0]["severity"] == "info"


def test_ignored_count_has_separators():
    res = run("audit", NANO, "--ignore", "*")
    assert ", 2,803 ignored" in res.stderr


@pytest.mark.parametrize("verb", ["manifest", "load"])
def test_pp_help_does_not_say_audit_under_other_verbs(verb):
    text = " ".join(run(verb, "--help").stdout.split())
    assert "--pp RANK/SIZE One pipeline-parallel rank, e.g. 0/4" in text and "Audit one pipeline" not in text


def test_fail_on_info_is_documented_as_a_review_gate():
    text = " ".join(run("audit", "--help").stdout.split()).replace("- ", "-")  # click wraps after hyphens
    assert "kv-scales-absent" in text and "use info to review, warning to gate" in text
    # the decision, held: kv-scales-absent stays a note that fails only the info gate
    assert run("audit", NANO, "-q").exit_code == 0
    assert run("audit", NANO, "-q", "--fail-on", "info").exit_code == 1


def test_nhcheck_debug_is_documented():
    assert "NHCHECK_DEBUG=1" in (ROOT / "README.md").read_text()


def test_truncated_shard_says_incomplete_download(tmp_path):
    for f in NANO.iterdir():
        shutil.copy(f, tmp_path / f.name)
    shard = tmp_path / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    line = _one_error_line(run("audit", tmp_path))
    assert "model-00002-of-00004.safetensors" in line and "incomplete download?" in line


def test_readme_example_output_is_what_the_tool_prints(monkeypatch):
    import re

    monkeypatch.chdir(ROOT)  # the header names the source as given
    readme = (ROOT / "README.md").read_text()
    cmd = "nhcheck audit examples/omni-nvfp4-24137 --engine sglang@0.5.11"
    block = readme.split(f"`{cmd}`, piped", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    res = CliRunner().invoke(cli, cmd.split()[1:], env={"COLUMNS": "80", "NHCHECK_DEBUG": None})
    assert res.exit_code == 1
    seconds = re.compile(r"\(\d+\.\d+ s\)")
    assert seconds.sub("(s)", block) == seconds.sub("(s)", res.stdout + res.stderr)


def test_an_engine_without_moe_backends_reports_neither():
    eng = json.loads(run("audit", NANO, "--engine", "vllm@0.34.0", "-q", "-f", "json").stdout)["engine"]
    assert (eng["moe_backend"], eng["moe_backend_requested"]) == ("", "")
    assert "moe backend" not in run("manifest", NANO, "--engine", "vllm@0.34.0").stdout.splitlines()[0]
