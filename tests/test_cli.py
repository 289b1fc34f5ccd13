"""The CLI finishing touches: version, help with examples, completion, --ignore, --fail-on gates,
markdown, the JSON schema, --quiet, NO_COLOR, and one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from nhcheck import __version__
from nhcheck.cli import cli
from nhcheck.findings import VERDICTS

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "tests" / "conformance"
OMNI = CONF / "omni_nvfp4_mixed" / "checkpoint"
NANO = CONF / "nano3_nvfp4" / "checkpoint"
LEFTOVER = ROOT / "examples" / "nano3-24434-leftover-expert-scales"

# The stable keys of `audit --format json` (schema nhcheck.audit/1), as the design fixes them.
TOP_KEYS = {
    "schema",
    "nhcheck_version",
    "source",
    "revision",
    "engine",
    "model",
    "summary",
    "crash",
    "tensors",
    "params",
    "findings",
}
ENGINE_KEYS = {"name", "version"}
MODEL_KEYS = {"architecture", "pattern", "quant"}
SUMMARY_KEYS = {
    "shards",
    "tensors",
    "bytes",
    "load",
    "warn",
    "skip",
    "raise",
    "routed",
    "orphans",
    "by_design",
    "params",
    "params_unfilled",
    "params_partial",
    "structure_errors",
    "verdict",
}
TENSOR_KEYS = {
    "name",
    "shard",
    "dtype",
    "shape",
    "outcome",
    "orphan",
    "param",
    "shard_id",
    "expert_id",
    "engine_name",
    "message",
}
PARAM_KEYS = {"name", "dtype", "shape", "status", "missing"}
FINDING_KEYS = {"severity", "code", "message", "shard", "tensor"}
OUTCOMES = {"load", "warn", "skip", "raise", "routed"}
STATUSES = {"filled", "partial", "unfilled", "default", "unreachable"}  # default: issue 16, item 3
SEVERITIES = {"error", "warning", "info"}


def run(*args: object, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200", "NHCHECK_DEBUG": None, **(env or {})})


def run_process(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed entry point in a subprocess: for behaviour that depends on the real process (TTY, env)."""
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "NHCHECK_DEBUG")}
    exe = shutil.which("nhcheck")
    if exe is None:
        pytest.skip("the nhcheck console script is not installed (pip install -e .)")
    return subprocess.run(
        [exe, *map(str, args)], env={**base, **(env or {})}, capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_version():
    res = run("--version")
    assert res.exit_code == 0
    assert res.stdout.strip() == f"nhcheck, version {__version__}"


@pytest.mark.parametrize("verb", sorted(cli.commands))
def test_every_verb_has_help_with_examples(verb):
    res = run(verb, "--help")
    assert res.exit_code == 0
    block = res.stdout.split("Examples:", 1)
    assert len(block) == 2, res.stdout
    assert re.search(rf"^\s+nhcheck {verb} \S", block[1], re.M), block[1]


def test_completion_is_documented_and_works():
    assert "_NHCHECK_COMPLETE=bash_source nhcheck" in run("--help").stdout
    p = run_process(env={"_NHCHECK_COMPLETE": "bash_source"})
    assert p.returncode == 0 and "_nhcheck_completion()" in p.stdout
    p = run_process(env={"_NHCHECK_COMPLETE": "bash_complete", "COMP_WORDS": "nhcheck au", "COMP_CWORD": "1"})
    assert p.returncode == 0 and "plain,audit" in p.stdout


@pytest.mark.parametrize("verb", ["audit", "manifest", "matrix", "prune", "load"])
def test_completion_keeps_paths_for_source(verb):
    """Issue 16 item 11: with nhcheck's completion script on, SOURCE still completes as a path."""
    from click.shell_completion import BashComplete

    items = BashComplete(cli, {}, "nhcheck", "_NHCHECK_COMPLETE").get_completions([verb], "exa")
    assert [(i.type, i.value) for i in items] == [("file", "exa")]


def test_completion_of_engine_and_device():
    from click.shell_completion import BashComplete

    comp = BashComplete(cli, {}, "nhcheck", "_NHCHECK_COMPLETE")
    engines = [i.value for i in comp.get_completions(["audit", "x", "--engine"], "sglang@0.5.2")]
    assert engines == ["sglang@0.5.20", "sglang@0.5.21", "sglang@0.5.22", "sglang@0.5.23"]
    assert "sglang" in [i.value for i in comp.get_completions(["prune", "x", "--engine"], "")]
    devices = [i.value for i in comp.get_completions(["load", "x", "--device"], "c")]
    assert devices[:3] == ["cpu", "cuda", "cuda:0"]


def test_ignore_is_repeatable_and_counted():
    """The #24434 example on 0.5.23: 144 leftover expert scales in layers 1 and 49, all orphans."""
    base = run("audit", LEFTOVER, "--format", "json", "-q")
    assert base.exit_code == 1 and json.loads(base.stdout)["summary"]["orphans"] == 144
    args = [
        "--ignore",
        "backbone.layers.1.mixer.experts.*_scale*",
        "--ignore",
        "backbone.layers.49.mixer.experts.*_scale*",
    ]
    res = run("audit", LEFTOVER, "--format", "json", "-q", *args)
    summary = json.loads(res.stdout)["summary"]
    assert (res.exit_code, summary["ignored"], summary["orphans"]) == (0, 144, 0)
    res = run("audit", LEFTOVER, *args)
    assert res.stderr.strip().endswith("144 ignored.")


@pytest.mark.parametrize(
    "path, engine, codes",
    [
        (OMNI, "sglang@0.5.11", {"error": 1, "warning": 1, "info": 1, "none": 0}),  # crash: errors
        (LEFTOVER, "sglang@0.5.23", {"error": 0, "warning": 1, "info": 1, "none": 0}),  # orphans: warnings
        (NANO, "sglang@0.5.23", {"error": 0, "warning": 0, "info": 1, "none": 0}),  # clean: info notes only
    ],
    ids=["omni-crash", "leftover-orphans", "nano3-clean"],
)
def test_fail_on_gates(path, engine, codes):
    for gate, code in codes.items():
        res = run("audit", path, "--engine", engine, "--fail-on", gate, "-q", "--format", "json")
        assert res.exit_code == code, (gate, res.stderr)
    assert run("audit", path, "--engine", engine, "-q", "--format", "json").exit_code == codes["warning"]  # the default


def test_markdown_is_a_pr_comment_with_tables():
    res = run("audit", OMNI, "--engine", "sglang@0.5.11", "--format", "markdown", "-q")
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines[0].startswith("### nhcheck audit:")
    for i, line in enumerate(lines):
        if re.fullmatch(r"\|(---\|)+", line):
            header = lines[i - 1]
            assert header.startswith("| ") and header.count("|") == line.count("|")
            assert lines[i + 1].startswith("| ") and lines[i + 1].count("|") >= line.count("|")
            break
    else:
        pytest.fail("no markdown table")
    assert "\x1b[" not in res.stdout


@pytest.mark.parametrize("path, engine", [(OMNI, "sglang@0.5.11"), (NANO, "sglang@0.5.23")])
def test_json_matches_the_audit_schema(path, engine):
    doc = json.loads(run("audit", path, "--engine", engine, "--format", "json", "-q").stdout)
    assert TOP_KEYS <= doc.keys()
    assert doc["schema"] == "nhcheck.audit/1" and doc["nhcheck_version"] == __version__
    assert doc["source"] == str(path) and doc["revision"] is None
    assert ENGINE_KEYS <= doc["engine"].keys() and doc["engine"]["name"] == "sglang"
    assert f"sglang@{doc['engine']['version']}" == engine
    assert MODEL_KEYS <= doc["model"].keys()
    s = doc["summary"]
    assert SUMMARY_KEYS <= s.keys() and s["verdict"] in VERDICTS
    assert all(type(s[k]) is int for k in SUMMARY_KEYS - {"verdict"})
    assert s["tensors"] == len(doc["tensors"]) and s["params"] == len(doc["params"])
    for outcome in OUTCOMES:
        assert s[outcome] == sum(t["outcome"] == outcome for t in doc["tensors"])
    for t in doc["tensors"]:
        assert TENSOR_KEYS <= t.keys() and t["outcome"] in OUTCOMES and isinstance(t["shape"], list)
    for p in doc["params"]:
        assert PARAM_KEYS <= p.keys() and p["status"] in STATUSES and isinstance(p["missing"], list)
    for f in doc["findings"]:
        assert FINDING_KEYS <= f.keys() and f["severity"] in SEVERITIES
    if s["verdict"] == "crash":
        assert doc["crash"].keys() >= {"tensor", "error"} and doc["crash"]["error"].startswith("KeyError: ")
        assert next(t for t in doc["tensors"] if t["outcome"] == "raise")["name"] == doc["crash"]["tensor"]
    else:
        assert doc["crash"] is None


def test_quiet_leaves_stderr_empty():
    assert run("audit", OMNI, "--engine", "sglang@0.5.11").stderr.startswith("Scanned ")
    res = run("audit", OMNI, "--engine", "sglang@0.5.11", "-q")
    assert res.exit_code == 1 and res.stderr == "" and res.stdout


_COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|9[0-7]|38;)")


def test_no_colour_when_piped_or_with_no_color():
    piped = run_process("audit", LEFTOVER)
    assert piped.returncode == 1 and "\x1b[" not in piped.stdout + piped.stderr
    forced = run_process("audit", LEFTOVER, env={"FORCE_COLOR": "1"})
    assert _COLOUR.search(forced.stdout)  # the check below can see colour when there is some
    no_color = run_process("audit", LEFTOVER, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert no_color.returncode == 1 and not _COLOUR.search(no_color.stdout + no_color.stderr)


@pytest.fixture
def broken(tmp_path) -> dict[str, Path]:
    """Bad inputs, each one that nhcheck must refuse in one line."""
    shard = tmp_path / "bad-shard"
    shutil.copytree(NANO, shard)
    with open(shard / "model-00002-of-00004.safetensors", "r+b") as fh:
        fh.seek(8)
        fh.write(b"[not json")
    no_config = tmp_path / "no-config"
    shutil.copytree(NANO, no_config)
    (no_config / "config.json").unlink()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    return {"bad-shard": shard, "no-config": no_config, "not-safetensors": text, "missing": tmp_path / "does-not-exist"}


@pytest.mark.parametrize("verb", ["audit", "manifest", "prune", "load"])
@pytest.mark.parametrize("case", ["bad-shard", "no-config", "not-safetensors", "missing"])
def test_bad_input_is_one_line_exit_2(broken, tmp_path, verb, case):
    if verb == "manifest" and case == "bad-shard":
        pytest.skip("manifest builds from config.json and the quant config; it reads no shard")
    extra = {"prune": ["--out", tmp_path / "out"], "load": ["--device", "cpu"]}.get(verb, [])
    res = run(verb, broken[case], *extra)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("nhcheck: error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["audit", NANO, "--engine", "sglang@0.4.0"],
        ["audit", NANO, "--revision", "main"],
        ["audit", "no-such-dir/../x"],
    ],
)
def test_bad_options_are_one_line_exit_2(args):
    res = run(*args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("nhcheck: error: "), res.stderr


@pytest.mark.parametrize(
    "args", [["audit", NANO, "--fail-on", "sometimes"], ["audit", NANO, "--pp", "4/2"], ["audit"], ["frobnicate"]]
)
def test_usage_errors_exit_2_without_traceback(args):
    res = run(*args)
    assert res.exit_code == 2
    assert "Error:" in res.stderr and "Traceback" not in res.stderr


def test_moe_backend_is_checked_and_auto_is_sglangs_default():
    bad = run("audit", NANO, "--moe-backend", "bogus", "-q")
    assert bad.exit_code == 2 and "'bogus' is not one of" in bad.output
    auto = json.loads(run("audit", NANO, "--moe-backend", "auto", "-q", "--format", "json").stdout)["engine"]
    default = json.loads(run("audit", NANO, "-q", "--format", "json").stdout)["engine"]
    assert auto == default and auto["moe_backend"] == "flashinfer_trtllm"
    assert (
        json.loads(run("audit", NANO, "--moe-backend", "marlin", "-q", "--format", "json").stdout)["engine"][
            "moe_backend"
        ]
        == "marlin"
    )


def test_puzzle_configs_are_refused_in_one_line(tmp_path):
    shutil.copytree(NANO, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model_type"] = "nemotron_h_puzzle"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    res = run("audit", tmp_path / "ck")
    assert res.exit_code == 2 and "nemotron_h_puzzle" in res.stderr and res.stderr.count("\n") == 1


def test_ep_needs_tp_and_a_proven_vllm_release():
    """``--ep`` is vLLM's expert parallelism over the TP ranks: without ``--tp``, or for an engine release without
    EP rank maps, one line and exit 2; with both it checks (``tests/test_tp_golden.py``)."""
    example = ROOT / "examples" / "nano3-nvfp4"
    for args in (("--ep",), ("--tp", "2", "--ep"), ("--engine", "vllm@0.29.0", "--tp", "2", "--ep")):
        res = run("audit", example, "-q", *args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and "--ep" in lines[0], res.stderr
    # nano3-nvfp4 at TP 4: 8 expert intermediates per rank are no whole NVFP4 block; placed whole under EP
    tp = run("audit", example, "-q", "--engine", "vllm@0.34.0", "--tp", "4", "-f", "json")
    ep = run("audit", example, "-q", "--engine", "vllm@0.34.0", "--tp", "4", "--ep", "-f", "json")
    assert tp.exit_code == 1 and json.loads(tp.stdout)["summary"]["tp_verdict"] == "cannot-shard"
    assert ep.exit_code == 0 and json.loads(ep.stdout)["summary"]["tp_verdict"] == "ok", ep.stdout[-500:]
