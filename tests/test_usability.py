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
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("nhcheck: error: "), (res.exit_code, res.stderr)
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
