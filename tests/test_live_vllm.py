"""``audit --live --engine vllm`` / ``--cross-check``: the installed vLLM's own answers, beside its release table.

Two layers, as ``test_live.py`` for SGLang:

- the integration (the worker's JSON → ``LiveRun`` → ``LiveEngine`` → the same audit report, and the
  cross-check against the table row) on answers the worker gave under real vLLM releases, recorded in
  ``tests/golden/live_worker/vllm-*.json.gz`` (``make_vllm_fixtures.py`` there): no engine needed;
- tests marked ``vllm`` run the installed vLLM itself over every shipped text example, conformance
  checkpoint and probe; they skip where vLLM is not importable (run them in a release's environment:
  README "Checking the installed engine").
"""

from __future__ import annotations

import gzip
import json
from importlib import util as import_util
from pathlib import Path

import pytest
from click.testing import CliRunner
from goldens import read_golden

from nhcheck import live
from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.engines import live_vllm
from nhcheck.engines.base import EngineId, installed_version
from nhcheck.pipeline import audit_path

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"
CONF = ROOT / "tests" / "conformance"
FIXTURES = Path(__file__).parent / "golden" / "live_worker"
HAVE_VLLM = import_util.find_spec("vllm") is not None and import_util.find_spec("torch") is not None
TOWERS = ("vision_model.", "sound_encoder.")
#: (release, case, checkpoint) of the recorded answers with goldens of their release (``make_vllm_fixtures.py``).
RECORDED = [
    ("0.34.0", "nano3-24434-leftover-expert-scales", EX / "nano3-24434-leftover-expert-scales"),
    ("0.34.0", "nano3-nvfp4-experts-excluded", EX / "nano3-nvfp4-experts-excluded"),
    ("0.34.0", "h8b_dense", CONF / "h8b_dense" / "checkpoint"),
    ("0.34.0", "probe_nano3_bf16_missing", CONF / "probes" / "probe_nano3_bf16_missing" / "checkpoint"),
    ("0.34.0", "probe_nano3_bf16", CONF / "probes" / "probe_nano3_bf16" / "checkpoint"),
    ("0.34.0", "omni-nvfp4-24137", EX / "omni-nvfp4-24137"),
    ("0.20.0", "probe_nano3_bf16", CONF / "probes" / "probe_nano3_bf16" / "checkpoint"),
    ("0.20.0", "startup_mixed_no_nvfp4", CONF / "startup_mixed_no_nvfp4" / "checkpoint"),
    ("0.20.0", "probe_omni_bf16_order", CONF / "probes" / "probe_omni_bf16_order" / "checkpoint"),
    ("0.16.0", "omni-nvfp4-24137", EX / "omni-nvfp4-24137"),
    ("0.16.0", "startup_mixed_hfq_only", CONF / "startup_mixed_hfq_only" / "checkpoint"),
    ("0.16.0", "nano3-nvfp4-experts-excluded", EX / "nano3-nvfp4-experts-excluded"),
]


def _table(path: Path, version: str):
    return audit_path(str(path), f"vllm@{version}", opts=AuditOptions(compare_versions=False))


def _fixture(release: str, case: str) -> live.LiveRun:
    with gzip.open(FIXTURES / f"vllm-{release}-{case}.json.gz") as fh:
        return live.parse_result(json.load(fh))


def _golden_dir(case: Path) -> Path:
    return CONF / "examples" / case.name if case.parent == EX else case.parent


def _live(path: Path, run: live.LiveRun):
    eid = EngineId("vllm", run.version, installed=True)
    return live.audit(open_local(str(path)), eid, cross_check=True, run=run)


def _same_error(got: str | None, want: str) -> bool:
    """Equal, once the engine's set of names is sorted as the worker writes it; an error the oracle cut short
    (500 characters of a tensor's, 1500 of the stream's) agrees up to its set."""
    if got in (want, live_vllm.sorted_sets(want)):
        return True
    return got is not None and len(want) >= 500 and got.startswith(want.split("{")[0])


def _same_as_golden(rep, expected: dict) -> None:
    """The live report says what the engine's goldens say: outcomes, raise messages, crash, coverage, manifest."""
    crash = expected["crash"]
    if crash is not None and crash["tensor"] is None and not expected["tensors"]:  # refused at start-up
        assert rep.crash.tensor is None and rep.crash.error.partition(": ")[2] in crash["error"], rep.crash
        return
    got = {r.tensor.name: r for r in rep.records}
    assert set(got) == set(expected["tensors"])
    for name, exp in expected["tensors"].items():
        r, o = got[name], got[name].outcome
        assert (o.outcome, r.param, o.shard_id, o.expert_id) == (
            exp["outcome"],
            exp["param"],
            exp["shard_id"],
            exp["expert_id"],
        ), name
        if o.outcome == "warn":
            assert (o.engine_name, o.message) == (exp["engine_name"], exp["message"]), name
        if o.outcome == "raise":
            assert _same_error(o.message, exp["message"]), (name, o.message, exp["message"])
    if crash is None:
        assert rep.crash is None
    else:
        assert rep.crash is not None and rep.crash.tensor == crash["tensor"]
        assert _same_error(rep.crash.error, crash["error"]), (rep.crash.error, crash["error"])
    without = sorted(s.name for s in rep.params if s.status in ("unfilled", "unreachable"))
    assert without == sorted(n for n in expected["params_without_tensor"] if not n.startswith(TOWERS))
    names = {p["name"] for p in expected["manifest"]["params"] if not p["name"].startswith(TOWERS)}
    assert {p.name for p in rep.manifest.params} == names
    assert rep.manifest.quantization == expected["manifest"]["quantization"]


# ---------------------------------------------------------------------------- recorded live answers


@pytest.mark.parametrize(("release", "case", "path"), RECORDED, ids=lambda x: str(x).rsplit("/", 2)[-1])
def test_recorded_live_answers_make_the_table_report(release, case, path):
    """The worker's answer under a real release, through LiveEngine, is the table's report for that release."""
    run = _fixture(release, case)
    assert run.version == release and run.engine == "vllm"
    rep, table = _live(path, run), _table(path, release)
    assert [f.message for f in rep.findings if f.code in ("cross-check", "live-stream")] == []
    assert rep.verdict == table.verdict
    if table.crash:
        assert (rep.crash.tensor, rep.crash.error) == (table.crash.tensor, table.crash.error)
    else:
        assert rep.crash is None
    notes = [f for f in rep.findings if f.code == "live"]
    assert len(notes) == 1 and f"installed vllm {release}'s own code" in notes[0].message
    if run.refused:  # no model, no outcomes: the start-up error is the whole answer
        assert rep.crash.tensor is None and rep.crash.error == run.refused and not rep.manifest.params
        return
    facts = [(r.tensor.name, r.outcome[:4], r.param, r.orphan) for r in rep.records]
    assert facts == [(r.tensor.name, r.outcome[:4], r.param, r.orphan) for r in table.records]
    assert sorted((s.name, s.status) for s in rep.params) == sorted((s.name, s.status) for s in table.params)
    # the same findings; their wording quotes the engine's name for a tensor, which the table words as the
    # loader's error does (the own loop's KeyError drops ``model.``) and the worker as the name mapper's output
    mine = sorted((f.severity, f.code, f.tensor, f.count) for f in rep.findings if not f.code.startswith("live"))
    assert mine == sorted((f.severity, f.code, f.tensor, f.count) for f in table.findings)


@pytest.mark.parametrize(("release", "case", "path"), RECORDED, ids=lambda x: str(x).rsplit("/", 2)[-1])
def test_recorded_answers_agree_with_the_engines_goldens(release, case, path):
    """The worker's answers are the oracle's: the committed goldens of that release, tensor by tensor."""
    run = _fixture(release, case)
    _same_as_golden(_live(path, run), read_golden(_golden_dir(path) / f"expected-vllm-{release}.json"))


def test_a_loaders_own_refusal_is_a_load_the_loader_refuses():
    """h8b_dense on 0.34.0: the q/k/v loader was called and raised (head_dim 128 against the checkpoint's 16).
    The worker says so (``loaded``); the report keeps the parameter, as the table's loader semantics do."""
    run = _fixture("0.34.0", "h8b_dense")
    name = "backbone.layers.18.mixer.k_proj.weight"
    o = run.outcomes[name]
    assert (o.outcome, o.param, o.shard_id) == ("load", "model.layers.18.mixer.qkv_proj.weight", "k")
    key = ("model.layers.18.mixer.qkv_proj.weight", "k", "BF16", (32, 64))
    assert run.load_errors[key] == "RuntimeError: start (0) + length (256) exceeds dimension size (32)."
    rec = next(r for r in _live(CONF / "h8b_dense" / "checkpoint", run).records if r.tensor.name == name)
    assert (rec.outcome.outcome, rec.outcome.reason, rec.param, rec.orphan) == (
        "raise",
        "loader",
        "model.layers.18.mixer.qkv_proj.weight",
        False,
    )


def test_packed_expert_bytes_narrowed_into_a_bf16_slot_are_reported():
    """0.34.0 loads NVFP4 expert bytes into the bf16 expert slots without an error; 0.16.0's loader refuses them."""
    new = _live(EX / "nano3-nvfp4-experts-excluded", _fixture("0.34.0", "nano3-nvfp4-experts-excluded"))
    assert {f.code for f in new.findings if f.severity == "error"} >= {"slot-narrowed", "crash"}
    old = _live(EX / "nano3-nvfp4-experts-excluded", _fixture("0.16.0", "nano3-nvfp4-experts-excluded"))
    assert "slot-narrowed" not in {f.code for f in old.findings}
    raised = [r for r in old.records if r.outcome.outcome == "raise" and r.outcome.reason == "loader"]
    assert raised and all(r.param and r.param.endswith(("w13_weight", "w2_weight")) for r in raised)


def test_a_wrapped_startup_refusal_is_the_validators_own_error():
    """0.16.0 refuses a MIXED_PRECISION recipe found only in hf_quant_config.json; pydantic's wrapper is shed."""
    run = _fixture("0.16.0", "startup_mixed_hfq_only")
    assert run.refused == "ValueError: Unknown ModelOpt quant algo: MIXED_PRECISION"


def test_the_live_replay_and_the_table_agree_on_a_kv_scale_of_the_wrong_size():
    """A [2]-shaped ``v_scale`` (the SGLang probe ``sglang_probe_kv_scale_shape``): vLLM 0.34.0's KV-cache scale
    loader raises ``KV-cache scale expects a scalar weight`` (its oracle, run on the real tensors, raises there
    too: ``expected-vllm-0.34.0.json.gz``). The live report has the crash, and the table says the same: the
    cross-check finds no difference."""
    path = CONF / "sglang_probe_kv_scale_shape" / "checkpoint"
    run = _fixture("0.34.0", "sglang_probe_kv_scale_shape")
    error = "ValueError: KV-cache scale expects a scalar weight, got shape (2,)"
    assert run.crash == ("backbone.layers.12.mixer.v_proj.v_scale", error)
    rep, table = _live(path, run), _table(path, "0.34.0")
    assert (rep.crash.tensor, rep.crash.error, rep.verdict) == (run.crash[0], error, "crash")
    assert table.crash is not None and (table.crash.tensor, table.crash.error, table.verdict) == (*run.crash, "crash")
    raised = sorted(r.tensor.name for r in rep.records if r.outcome.outcome == "raise")
    assert raised and all(n.endswith(".v_proj.v_scale") for n in raised)
    assert raised == sorted(r.tensor.name for r in table.records if r.outcome.outcome == "raise")
    assert [f.message for f in rep.findings if f.code == "cross-check"] == []


def test_two_releases_disagree_where_their_goldens_do():
    """The own loop (0.20.0) and AutoWeightsLoader (0.34.0) on the same probe: every difference is an error."""
    path = CONF / "probes" / "probe_nano3_bf16" / "checkpoint"
    old, new = _live(path, _fixture("0.20.0", "probe_nano3_bf16")), _live(path, _fixture("0.34.0", "probe_nano3_bf16"))
    found = live.disagreements(old, new)
    text = "\n".join(f.message for f in found)
    assert found and {(f.severity, f.code) for f in found} == {("error", "cross-check")}
    assert "crash: the crash is \"KeyError: 'layers.0.mixer.not_a_param.weight' at " in text
    assert "backbone.layers.5.mixer.kv_scale: outcome is 'warn' in the table, 'raise' live" in text


# ---------------------------------------------------------------------------- the worker's own rules


def test_parameter_sets_in_engine_errors_are_written_sorted():
    text = "ValueError: Following weights were not initialized from checkpoint: {'b.x', 'a.y', 'c'}"
    assert live_vllm.sorted_sets(text) == (
        "ValueError: Following weights were not initialized from checkpoint: {'a.y', 'b.x', 'c'}"
    )
    walk = (
        "ValueError: There is no module or parameter named 'm.q' in X. The available parameters belonging to m (M) "
        "are: {'m.z', 'm.a'}"
    )
    assert live_vllm.sorted_sets(walk).endswith("are: {'m.a', 'm.z'}")
    assert live_vllm.sorted_sets("KeyError: 'a'") == "KeyError: 'a'"


def test_a_validation_error_is_written_as_the_error_it_wraps():
    class ValidationError(Exception):
        def errors(self):
            return [{"type": "value_error", "ctx": {"error": ValueError("Unknown ModelOpt quant algo: X")}}]

    assert live_vllm.error_text(ValidationError("1 validation error")) == "ValueError: Unknown ModelOpt quant algo: X"
    assert live_vllm.error_text(KeyError("w")) == "KeyError: 'w'"


def test_a_warning_that_also_accompanies_loads_is_not_a_drop():
    """0.28.0 – 0.31.0 log ``Unexpected gate/up projection names`` once per expert load: not about one tensor."""
    once = "Unexpected gate/up projection names: ..."
    o = live_vllm._outcome([], [once], ["model.x"], None, {once})
    assert o["outcome"] == "skip"
    o = live_vllm._outcome([], ["Found q_scale in the checkpoint ..."], ["model.x"], None, {once})
    assert (o["outcome"], o["message"]) == ("warn", "Found q_scale in the checkpoint ...")


def test_the_omni_wrapper_routes_its_towers_and_loads_its_projector_after_the_stream():
    """0.34.0: the wrapper streams the language model and loads ``mlp1`` (and routes the towers) after it;
    the worker sees it (``defers``) and the report orders the crash as the table does."""
    run = _fixture("0.34.0", "omni-nvfp4-24137")
    assert run.defers and not run.buffers and run.manifest.lm_prefix == "language_model."
    outcomes = {n: o.outcome for n, o in run.outcomes.items()}
    assert {outcomes[n] for n in outcomes if n.startswith(TOWERS)} == {"routed"}
    assert {(outcomes[n], run.outcomes[n].param) for n in outcomes if n.startswith("mlp1.")} == {
        ("load", f"mlp1.{i}.weight") for i in (0, 1, 3)
    }


def test_a_buffering_wrapper_is_seen_and_orders_the_crash():
    """0.20.0 takes every name before its language model loads one: the projector's KeyError is the crash."""
    run = _fixture("0.20.0", "probe_omni_bf16_order")
    assert run.buffers and not run.defers
    assert run.crash == ("mlp1.9.weight", "KeyError: '9.weight'")
    rep = _live(CONF / "probes" / "probe_omni_bf16_order" / "checkpoint", run)
    assert (rep.crash.tensor, rep.crash.error) == run.crash


def test_an_unregistered_architecture_is_the_registrys_refusal_without_its_listing():
    run = _fixture("0.16.0", "omni-nvfp4-24137")
    assert run.refused == (
        "ValueError: Model architectures ['NemotronH_Nano_Omni_Reasoning_V3'] are not supported for now."
    )


# ---------------------------------------------------------------------------- the CLI without the engine


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize("flag", ["--live", "--cross-check"])
def test_without_vllm_live_is_one_line_and_exit_2(flag):
    result = CliRunner().invoke(cli, ["audit", str(EX / "nano3-bf16"), "--engine", "vllm", flag])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "install vllm" in lines[0], result.output


@pytest.mark.parametrize("flag", ["--live", "--cross-check", None])
def test_a_moe_backend_is_refused_alike_by_the_table_and_live(flag, monkeypatch):
    """vLLM takes no MoE runner backend: ``--moe-backend`` is a usage error for the table row and for the installed
    release alike (one message), before any worker runs. The installed release is stated, so no vLLM is needed."""
    monkeypatch.setattr(live, "installed_engine", lambda spec: EngineId("vllm", "0.20.0", installed=True))

    def no_worker(*args, **kwargs):
        raise AssertionError("the worker must not run")

    monkeypatch.setattr(live, "run_workers", no_worker)
    args = ["audit", str(EX / "nano3-nvfp4"), "--engine", "vllm@0.20.0", "--moe-backend", "triton"]
    result = CliRunner().invoke(cli, args + ([flag] if flag else []))
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].endswith(
        "--moe-backend names SGLang's MoE runner backends; vllm 0.20.0's backend changes no parameter (leave it out)"
    ), lines[0]


# ---------------------------------------------------------------------------- the installed engine


def _cases() -> list[Path]:
    """Every checkpoint of the repository: examples, conformance cases, vLLM probes."""
    cases = sorted(p for p in EX.iterdir() if (p / "config.json").exists())
    cases += sorted(p / "checkpoint" for p in CONF.iterdir() if (p / "checkpoint").is_dir())
    return cases + sorted(p / "checkpoint" for p in (CONF / "probes").iterdir() if (p / "checkpoint").is_dir())


@pytest.fixture(scope="module")
def installed_runs():
    eid = live.installed_engine("vllm")
    cases = _cases()
    runs = live.run_workers([open_local(str(c)) for c in cases], moe_backend=None, engine="vllm")
    return eid, dict(zip(cases, runs, strict=True))


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM installed")
@pytest.mark.parametrize("case", _cases(), ids=lambda p: str(p.relative_to(ROOT)))
def test_installed_vllm_agrees_with_the_table(installed_runs, case):
    eid, runs = installed_runs
    rep = live.audit(open_local(str(case)), eid, cross_check=True, run=runs[case])
    assert [f.message for f in rep.findings if f.code in ("cross-check", "live-stream")] == []


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM installed")
@pytest.mark.parametrize("case", _cases(), ids=lambda p: str(p.relative_to(ROOT)))
def test_installed_vllm_agrees_with_its_goldens(installed_runs, case):
    """Where the repository holds the installed release's goldens (the oracle's answers), live gives the same."""
    eid, runs = installed_runs
    path = _golden_dir(case) / f"expected-vllm-{eid.version}.json"
    if not (path.exists() or path.with_suffix(".json.gz").exists()):
        pytest.skip(f"no goldens of vllm {eid.version} for this case")
    rep = live.audit(open_local(str(case)), eid, run=runs[case])
    _same_as_golden(rep, read_golden(path))


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="needs vLLM installed")
def test_cli_live_vllm_json_is_the_audit_document():
    result = CliRunner().invoke(cli, ["audit", str(EX / "h8b-dense"), "--engine", "vllm", "--live", "-f", "json", "-q"])
    doc = json.loads(result.output)
    assert doc["schema"] == "nhcheck.audit/1" and doc["engine"]["version"] == installed_version("vllm")
    assert any(f["code"] == "live" for f in doc["findings"]) and result.exit_code in (0, 1)
