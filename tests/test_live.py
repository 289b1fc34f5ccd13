"""``audit --live`` / ``--cross-check``: the installed engine's own answers, and where they differ from the table.

Three layers:

- the disagreement logic (``live.disagreements``) on table reports of releases that really differ;
- the integration (typed worker answers → ``LiveEngine`` → the same audit report) on answers the
  live worker gave under real SGLang releases, recorded in ``tests/golden/live_worker/``
  (``make_fixtures.py`` there): no engine needed;
- tests marked ``sglang`` run the installed SGLang itself over every shipped example and conformance
  checkpoint; they skip where SGLang is not importable (run them in a release's environment, see
  README "Checking the installed engine").
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from importlib import util as import_util
from pathlib import Path

import pytest
from click.testing import CliRunner
from goldens import read_golden

from nhcheck import live
from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.engines import sglang
from nhcheck.engines.base import EngineId, installed_version
from nhcheck.pipeline import audit_path

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"
CONF = ROOT / "tests" / "conformance"
FIXTURES = Path(__file__).parent / "golden" / "live_worker"
HAVE_SGLANG = import_util.find_spec("sglang") is not None and import_util.find_spec("torch") is not None
TOWERS = ("vision_model.", "sound_encoder.")
#: A release other than the installed one (``--live`` refuses to be asked for it).
_OTHER = "0.5.23" if installed_version("sglang") == "0.5.3.post1" else "0.5.3.post1"


def _table(path: Path, version: str):
    return audit_path(str(path), f"sglang@{version}", opts=AuditOptions(compare_versions=False))


def _fixture(release: str, case: str) -> live.LiveRun:
    with gzip.open(FIXTURES / f"sglang-{release}-{case}.json.gz") as fh:
        return live.parse_result(json.load(fh))


# ---------------------------------------------------------------------------- disagreements


def test_a_report_agrees_with_itself():
    rep = _table(EX / "nano3-24434-leftover-expert-scales", "0.5.11")
    assert live.disagreements(rep, rep) == []


def test_pr_24434_is_a_crash_an_outcome_and_a_verdict_disagreement():
    """0.5.11 raises KeyError on the leftover expert scales, 0.5.12 skips them: every difference is an error."""
    old = _table(EX / "nano3-24434-leftover-expert-scales", "0.5.11")
    new = _table(EX / "nano3-24434-leftover-expert-scales", "0.5.12")
    found = live.disagreements(old, new)
    assert found and {(f.severity, f.code) for f in found} == {("error", "cross-check")}
    text = "\n".join(f.message for f in found)
    assert "crash: the crash is \"KeyError: 'model.layers.1.mixer.experts.w2_input_scale' at " in text
    assert "in the table, 'none' live" in text
    assert "verdict: the verdict is 'crash' in the table, 'incomplete' live" in text
    # the orphan expert scales, collapsed into one finding per family and field
    outcome = [f.message for f in found if "outcome is 'raise' in the table, 'skip' live" in f.message]
    assert outcome and all(" ×" in m for m in outcome)
    raised = sum(1 for r in old.records if r.outcome.outcome == "raise")
    counts = [int(m.split(" ×")[1].split(":")[0]) for m in outcome]
    assert sum(counts) == raised


def test_manifest_names_dtypes_and_quant_methods_are_compared():
    """Omni on 0.5.11 builds the MoE unquantized (no quant-name mapper), 0.5.13 builds it in NVFP4."""
    old = _table(EX / "omni-nvfp4-24137", "0.5.11")
    new = _table(EX / "omni-nvfp4-24137", "0.5.13")
    text = "\n".join(f.message for f in live.disagreements(old, new))
    assert "a runtime parameter the installed engine builds, not the table" in text
    assert "dtype is 'bfloat16' in the table, 'uint8' live" in text
    assert "quant method is 'UnquantizedFusedMoEMethod' in the table, 'ModelOptNvFp4FusedMoEMethod' live" in text


def test_a_startup_refusal_compares_only_the_crash():
    """0.5.18 refuses a text MIXED recipe found only in hf_quant_config.json; 0.5.17 starts and loads."""
    ck = CONF / "startup_mixed_hfq_only" / "checkpoint"
    refused, started = _table(ck, "0.5.18"), _table(ck, "0.5.17")
    assert refused.crash is not None and refused.crash.tensor is None
    found = live.disagreements(refused, started)
    assert [f.message.split(":")[0] for f in found] == ["crash", "verdict"]
    assert "'NemotronHConfig' object has no attribute 'quantization_config' (start-up)" in found[0].message


# ---------------------------------------------------------------------------- recorded live answers


@pytest.mark.parametrize(
    ("release", "case", "path"),
    [
        ("0.5.11", "omni-nvfp4-24137", EX / "omni-nvfp4-24137"),
        ("0.5.11", "nano3-24434-leftover-expert-scales", EX / "nano3-24434-leftover-expert-scales"),
        ("0.5.23", "nano3-nvfp4", EX / "nano3-nvfp4"),
        ("0.5.23", "startup_mixed_hfq_only", CONF / "startup_mixed_hfq_only" / "checkpoint"),
        ("0.5.3.post1", "h8b-dense", EX / "h8b-dense"),
        ("0.5.6", "nano3-nvfp4", EX / "nano3-nvfp4"),
        ("0.5.8", "sglang_probe_kv_scale_shape", CONF / "sglang_probe_kv_scale_shape" / "checkpoint"),
        ("0.5.9", "nano3-nvfp4-experts-excluded", EX / "nano3-nvfp4-experts-excluded"),
        ("0.5.9", "sglang_probe_kv_scale_shape", CONF / "sglang_probe_kv_scale_shape" / "checkpoint"),
        ("0.5.9", "sglang_probe_substring_mtp", CONF / "sglang_probe_substring_mtp" / "checkpoint"),
        ("0.5.10rc0", "omni-nvfp4-24137", EX / "omni-nvfp4-24137"),
    ],
)
def test_recorded_live_answers_make_the_table_report(release, case, path):
    """The live worker's answer under a real release, through LiveEngine, is the table's report for that release."""
    run = _fixture(release, case)
    assert run.version == release
    rep = live.audit(open_local(str(path)), EngineId("sglang", release, installed=True), cross_check=True, run=run)
    table = _table(path, release)
    assert [f.message for f in rep.findings if f.code == "cross-check"] == []
    assert rep.verdict == table.verdict
    assert (
        (rep.crash.tensor, rep.crash.error) == (table.crash.tensor, table.crash.error) if table.crash else not rep.crash
    )
    if run.refused:  # no model, no outcomes: the start-up error is the whole answer
        assert rep.crash.tensor is None and rep.crash.error == run.refused and not rep.manifest.params
        return
    facts = [(r.tensor.name, r.outcome[:4], r.param, r.orphan) for r in rep.records]
    assert facts == [(r.tensor.name, r.outcome[:4], r.param, r.orphan) for r in table.records]
    assert [(s.name, s.status) for s in rep.params] == [(s.name, s.status) for s in table.params]
    notes = [f for f in rep.findings if f.code == "live"]
    assert (
        len(notes) == 1 and notes[0].severity == "info" and f"installed sglang {release}'s own code" in notes[0].message
    )


def _assert_agrees_with_golden(run: live.LiveRun, expected: dict) -> None:
    """The worker's answer is the oracle's (a release's committed golden): refusal, outcomes, crash, manifest."""
    if expected["crash"] is not None and expected["crash"]["tensor"] is None:  # refused at start-up
        assert run.refused and expected["crash"]["error"].endswith(run.refused)
        return
    for name, exp in expected["tensors"].items():
        o = run.outcomes[name]
        assert {k: getattr(o, k) for k in exp} == exp, name
    assert run.crash == ((expected["crash"]["tensor"], expected["crash"]["error"]) if expected["crash"] else None)
    assert {p.name for p in run.manifest.params} == {
        p["name"] for p in expected["manifest"]["params"] if not p["name"].startswith(TOWERS)
    }
    assert run.manifest.moe_backend == expected["manifest"]["moe_runner_backend"]


@pytest.mark.parametrize(
    ("release", "case", "golden"),
    [
        ("0.5.11", "omni-nvfp4-24137", CONF / "examples" / "omni-nvfp4-24137"),
        ("0.5.23", "nano3-nvfp4", CONF / "examples" / "nano3-nvfp4"),
        ("0.5.6", "nano3-nvfp4", CONF / "examples" / "nano3-nvfp4"),
        ("0.5.8", "sglang_probe_kv_scale_shape", CONF / "sglang_probe_kv_scale_shape"),
        ("0.5.9", "nano3-nvfp4-experts-excluded", CONF / "examples" / "nano3-nvfp4-experts-excluded"),
        ("0.5.9", "sglang_probe_kv_scale_shape", CONF / "sglang_probe_kv_scale_shape"),
        ("0.5.9", "sglang_probe_substring_mtp", CONF / "sglang_probe_substring_mtp"),
        ("0.5.10rc0", "omni-nvfp4-24137", CONF / "examples" / "omni-nvfp4-24137"),
    ],
)
def test_recorded_answers_agree_with_the_engines_goldens(release, case, golden):
    """The worker's outcomes are the oracle's: the committed goldens of that release, tensor by tensor."""
    _assert_agrees_with_golden(_fixture(release, case), read_golden(golden / f"expected-sglang-{release}.json"))


def test_a_buffering_loader_ties_raises_and_warnings_to_their_tensors():
    """0.5.9's load_weights remaps the whole stream into a list before it loads: each raise and warning is still
    the tensor's own, and the crash point is the first tensor that raises in stream order (not the last taken)."""
    run = _fixture("0.5.9", "sglang_probe_kv_scale_shape")
    v_scale = "backbone.layers.12.mixer.v_proj.v_scale"
    error = "AssertionError: Attempted to load weight (torch.Size([2])) into parameter (torch.Size([]))"
    assert run.crash == (v_scale, error) and run.outcomes[v_scale].message == error
    assert list(run.outcomes).index(v_scale) < len(run.outcomes) - 1  # the crash point is not the last tensor
    run = _fixture("0.5.9", "sglang_probe_substring_mtp")
    warned = {n: o.engine_name for n, o in run.outcomes.items() if o.outcome == "warn"}
    assert len(warned) == 51 and all(e == n.replace("backbone.", "model.") for n, e in warned.items())
    # 0.5.8 drops each k/v scale with a warning printed once per message (lru-cached): each is still its tensor's
    run = _fixture("0.5.8", "sglang_probe_kv_scale_shape")
    kv = {n: o for n, o in run.outcomes.items() if n.endswith(("k_scale", "v_scale"))}
    assert kv and all(o.outcome == "warn" and f"layers.{n.split('.')[2]}." in o.message for n, o in kv.items())


def test_padded_expert_slots_are_checked_with_the_logical_shapes():
    """flashinfer_trtllm pads expert dimensions; the live manifest keeps the real shapes, the check the logical ones."""
    run = _fixture("0.5.23", "nano3-nvfp4")
    assert run.manifest.moe_backend == "flashinfer_trtllm" and run.padded
    w2 = run.manifest.by_name["model.layers.1.mixer.experts.w2_weight"]
    table = _table(EX / "nano3-nvfp4", "0.5.23").manifest
    assert w2.shape != table.by_name[w2.name].shape
    assert live.logical_shapes(run, table).by_name[w2.name].shape == table.by_name[w2.name].shape


def test_a_buffering_wrapper_is_seen_and_orders_the_crash():
    run = _fixture("0.5.11", "omni-nvfp4-24137")
    assert run.buffers and run.crash == (
        "language_model.backbone.layers.1.mixer.experts.0.down_proj.input_scale",
        "KeyError: 'model.layers.1.mixer.experts.w2_input_scale'",
    )


def test_a_newer_release_is_covered_by_live_and_the_report_says_so():
    eid = sglang.parse_engine_id("sglang@0.6.0")
    assert eid.assumption and "nhcheck audit --live" in eid.assumption
    run = _fixture("0.5.23", "nano3-nvfp4")
    run = live.LiveRun("0.6.0", run.manifest, run.outcomes, run.padded, crash=run.crash, buffers=run.buffers)
    rep = live.audit(open_local(str(EX / "nano3-nvfp4")), EngineId("sglang", "0.6.0", installed=True), run=run)
    note = next(f for f in rep.findings if f.code == "live")
    assert "newer than nhcheck's release table, so this live replay is what covers it" in note.message
    assert rep.engine.version == "0.6.0" and not [f for f in rep.findings if f.code == "engine-assumed"]


# ---------------------------------------------------------------------------- the CLI without the engine


@pytest.mark.skipif(HAVE_SGLANG, reason="SGLang is installed here")
@pytest.mark.parametrize("flag", ["--live", "--cross-check"])
def test_without_the_engine_live_is_one_line_and_exit_2(flag):
    result = CliRunner().invoke(cli, ["audit", str(EX / "nano3-bf16"), flag])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "install sglang" in lines[0] and "Traceback" not in result.output


_HOST_CHECK = """
import sys
from nhcheck.engines import live_sglang_host as host

assert host.missing_host_package(ModuleNotFoundError(name="sgl_kernel.kvcacheio"))
assert not host.missing_host_package(ModuleNotFoundError(name="sglang.srt.foo"))
shims = host.install()
import sglang.srt.layers.activation as act
import sglang.srt.layers.layernorm as ln

assert ln.RMSNorm.__module__ == ln.__name__ and act.SiluAndMul.__module__ == act.__name__
assert not [m for m in sys.modules if m.split(".")[0] == "vllm"]
from sgl_kernel.kvcacheio import transfer_kv_all_layer

try:
    transfer_kv_all_layer()
    raise SystemExit("a kernel ran")
except RuntimeError:
    pass
try:
    import sgl_kernel.scalar_type  # noqa: F401
    raise SystemExit("scalar_type imported")
except ImportError:
    pass
import cutlass.cute as cute

@cute.jit
def kernel():
    return 7

class Op(cute.Struct):
    pass

assert kernel() == 7 and Op.__mro__[-1] is object
print(len(shims))
"""


def test_host_stand_ins_answer_cuda_imports_as_a_gpu_host_does(tmp_path):
    """Without SGLang: a kernel imports and raises only if called, ``sgl_kernel.scalar_type`` stays missing, a DSL
    decorator returns its function, and a layer module's vLLM fallback gets that module's own classes (no ``vllm``
    module stays behind). A fake SGLang package holds the two fallbacks as releases before 0.5.8 write them."""
    layers = tmp_path / "sglang" / "srt" / "layers"
    layers.mkdir(parents=True)
    for pkg in (tmp_path / "sglang", tmp_path / "sglang" / "srt", layers):
        (pkg / "__init__.py").write_text("")
    for mod, cls in (("layernorm", "RMSNorm"), ("activation", "SiluAndMul")):
        (layers / f"{mod}.py").write_text(
            f"class {cls}:\n    pass\n\nfrom vllm.model_executor.layers.{mod} import {cls}\n"
        )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    out = subprocess.run([sys.executable, "-c", _HOST_CHECK], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 4  # kernels, DSL, and the two fallbacks


def test_live_module_does_not_import_torch():
    code = "import sys, nhcheck.live, nhcheck.cli; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------- the installed engine


def _cases() -> list[Path]:
    cases = sorted(p for p in EX.iterdir() if (p / "config.json").exists())
    return cases + sorted(p / "checkpoint" for p in CONF.iterdir() if (p / "checkpoint").is_dir())


@pytest.fixture(scope="module")
def installed_runs():
    eid = live.installed_engine(None)
    cases = _cases()
    runs = live.run_workers([open_local(str(c)) for c in cases], moe_backend=None)
    return eid, dict(zip(cases, runs, strict=True))


@pytest.mark.sglang
@pytest.mark.skipif(not HAVE_SGLANG, reason="needs SGLang installed")
@pytest.mark.parametrize("case", _cases(), ids=lambda p: str(p.relative_to(ROOT)))
def test_installed_engine_agrees_with_the_table(installed_runs, case):
    eid, runs = installed_runs
    rep = live.audit(open_local(str(case)), eid, cross_check=True, run=runs[case])
    assert [f.message for f in rep.findings if f.code in ("cross-check", "live-stream")] == []


@pytest.mark.sglang
@pytest.mark.skipif(not HAVE_SGLANG, reason="needs SGLang installed")
@pytest.mark.parametrize("case", _cases(), ids=lambda p: str(p.relative_to(ROOT)))
def test_installed_engine_agrees_with_its_goldens(installed_runs, case):
    """Where the repository holds the installed release's goldens (the oracle's answers), live gives the same."""
    eid, runs = installed_runs
    golden_dir = CONF / "examples" / case.name if case.parent == EX else case.parent
    path = golden_dir / f"expected-sglang-{eid.version}.json"
    if not (path.exists() or path.with_suffix(".json.gz").exists()):
        pytest.skip(f"no goldens of sglang {eid.version} for this case")
    _assert_agrees_with_golden(runs[case], read_golden(path))


@pytest.mark.sglang
@pytest.mark.skipif(not HAVE_SGLANG, reason="needs SGLang installed")
def test_cli_live_json_is_the_audit_document():
    result = CliRunner().invoke(cli, ["audit", str(EX / "nano3-bf16"), "--live", "-f", "json", "-q"])
    doc = json.loads(result.output)
    assert doc["schema"] == "nhcheck.audit/1" and doc["engine"]["version"] == installed_version("sglang")
    assert any(f["code"] == "live" for f in doc["findings"]) and result.exit_code in (0, 1)


@pytest.mark.sglang
@pytest.mark.skipif(not HAVE_SGLANG, reason="needs SGLang installed")
@pytest.mark.parametrize(
    "extra", [["--mtp"], ["--tp", "2"], ["--pp", "0/2"], ["--engine", f"sglang@{_OTHER}"], ["--engine", "vllm"]]
)
def test_cli_live_refuses_what_it_does_not_replay_in_one_line(extra):
    result = CliRunner().invoke(cli, ["audit", str(EX / "omni-nvfp4-24137"), "--live", *extra])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("nhcheck: error: "), result.output
