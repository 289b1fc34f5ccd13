"""100 % agreement with vLLM's own load_weights on the conformance checkpoints, shipped examples and probes.

The expectations (``tests/conformance/**/expected-vllm-<X>.json.gz``) were made by running each vLLM
release's real code (``oracle/vllm/make_goldens.py``): the model built on the CPU with the real
shapes, its real ``load_weights`` per tensor and as one stream. Compared for every release in
nhcheck's table: outcome, parameter, shard id, expert id of every tensor, the raise messages, the
crash tensor and error, the parameters no tensor reached, partly filled parameters, manifest names.

Two normalisations, both of the oracle's environment rather than of vLLM's loading code:
- a start-up refusal is recorded as the oracle saw it (wrapped in pydantic's ``ValidationError`` by the
  engine-args layer, or followed by the list of every registered architecture); nhcheck reports the
  refusal's own error, which must occur in the recorded text;
- ``AutoWeightsLoader``'s ``ValueError`` (and the strict "not initialized" check's) lists parameters as a
  Python ``set`` (its order is the process's string hashing); nhcheck lists them sorted, and the sets are
  compared. The oracle keeps the first 500 characters of a per-tensor error (1500 of the stream's): a cut
  set must be a subset of nhcheck's, whose message must be as long.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from goldens import read_golden

from nhcheck import engines
from nhcheck.audit import AuditOptions, run_audit
from nhcheck.checkpoint import open_local
from nhcheck.engines import vllm, vllm_mtp
from nhcheck.errors import UsageError
from nhcheck.pipeline import audit_path
from nhcheck.quant import parse_quant

HERE = Path(__file__).parent / "conformance"
EXAMPLES = Path(__file__).parent.parent / "examples"
TOWERS = ("vision_model.", "sound_encoder.")


def _checkpoint(case_dir: Path) -> Path:
    return EXAMPLES / case_dir.name if case_dir.parent.name == "examples" else case_dir / "checkpoint"


def _goldens() -> list[tuple[str, str]]:
    out = []
    for f in sorted(HERE.glob("**/expected-vllm-*.json*")):
        version = f.name.removeprefix("expected-vllm-").removesuffix(".gz").removesuffix(".json")
        if version in vllm.PROFILES and _checkpoint(f.parent).is_dir():
            out.append((str(f.parent.relative_to(HERE)), version))
    return out


GOLDENS = _goldens()


@functools.cache
def _load(case: str, version: str):
    expected = read_golden(HERE / case / f"expected-vllm-{version}.json")
    report = audit_path(str(_checkpoint(HERE / case)), f"vllm@{version}", opts=AuditOptions(compare_versions=False))
    return expected, report


_SET = re.compile(
    r"^(ValueError: There is no module or parameter named .* are: |ValueError: Following weights were not "
    r"initialized from checkpoint: )\{(.*?)(\}?)$",
    re.S,
)


def _same_error(got: str | None, want: str) -> bool:
    """Equal, or the same ValueError listing the same set of parameters in another order (a set the oracle cut
    short: the items it kept) — ``AutoWeightsLoader``'s, or the strict "not initialized" check's."""
    if got == want:
        return True
    a, b = _SET.match(got or ""), _SET.match(want)
    if a is None or b is None or a.group(1) != b.group(1) or not a.group(3):
        return False
    mine = set(a.group(2).split(", "))
    if b.group(3):
        return mine == set(b.group(2).split(", "))
    kept = b.group(2).split(", ")[:-1]  # the last item may be cut
    return len(got or "") >= len(want) and set(kept) <= mine


def _refused_at_startup(expected: dict, report) -> bool:
    crash = expected["crash"]
    if crash is None or crash["tensor"] is not None or expected["tensors"]:
        return False
    assert report.crash is not None and report.crash.tensor is None, report.crash
    cls, _, msg = report.crash.error.partition(": ")
    assert msg and msg in crash["error"], (report.crash.error, crash["error"][:300])
    return True


def test_the_table_covers_the_golden_releases():
    """Every release with committed goldens is in the table, and every row is proven by one of them."""
    have = {v for _, v in GOLDENS}
    on_disk = {f.name.split("-")[2].removesuffix(".json.gz") for f in HERE.glob("**/expected-vllm-*.json.gz")}
    assert on_disk <= set(vllm.PROFILES)
    assert {p.version for p in vllm.EPOCHS} <= have


def test_every_epoch_is_backed_by_goldens_on_every_case():
    """Each vLLM row has the release's own answers for every conformance case and probe, and for every shipped
    example and start-up variant (0.19.0 ran on the conformance cases and probes only). SGLang's epoch probes
    (``sglang_probe_*``, cases that split SGLang epochs) are SGLang's alone."""
    cases = {
        p.name
        for p in HERE.iterdir()
        if (p / "checkpoint").is_dir() and not p.name.startswith(("startup_", "sglang_probe_"))
    }
    cases |= {f"probes/{p.name}" for p in (HERE / "probes").iterdir() if (p / "checkpoint").is_dir()}
    every = cases | {p.name for p in HERE.iterdir() if p.name.startswith("startup_")}
    every |= {f"examples/{p.name}" for p in (HERE / "examples").iterdir() if p.is_dir()}
    have: dict[str, set[str]] = {}
    for case, version in GOLDENS:
        have.setdefault(version, set()).add(case)
    for row in vllm.EPOCHS:
        # the row's own release; a probe made later may come from another release of the same row
        need = cases if row.version == "0.19.0" else every
        own = have.get(row.version, set())
        assert own >= {c for c in need if not c.startswith("probes/")}, (row.version, sorted(need - own))
        same_row = set().union(*(have.get(v, set()) for v, p in vllm.PROFILES.items() if p is row))
        assert same_row >= need, (row.version, sorted(need - same_row))
    for name, releases in engines.epochs():
        if name == "vllm":
            assert any(r in have for r in releases), releases


def _assert_tensor_outcomes(expected: dict, report, *, warn_names_engine: bool) -> None:
    """Every checkpoint tensor's outcome, parameter, shard and expert id as the golden recorded them; a warning's
    message (and, for the main model's goldens, the engine-side name it warns about) and a raise's error."""
    got = {r.tensor.name: r for r in report.records}
    assert set(got) == set(expected["tensors"])
    for name, exp in expected["tensors"].items():
        r = got[name]
        o = r.outcome
        actual = {"outcome": o.outcome, "param": r.param, "shard_id": o.shard_id, "expert_id": o.expert_id}
        assert actual == {k: exp[k] for k in actual}, name
        if o.outcome == "warn" and warn_names_engine:
            assert (o.engine_name, o.message) == (exp["engine_name"], exp["message"]), name
        elif o.outcome == "warn":
            assert o.message == exp["message"], name
        if o.outcome == "raise":
            assert _same_error(o.message, exp["message"]), (name, o.message, exp["message"])


def _assert_crash(expected: dict, report, natural_order: bool) -> None:
    if expected["crash"] is None:
        assert report.crash is None
    elif expected["crash"]["tensor"] is None:
        if not _refused_at_startup(expected, report):  # the strict check after the stream
            assert report.crash is not None and report.crash.tensor is None
            assert _same_error(report.crash.error, expected["crash"]["error"]), report.crash.error
    elif not natural_order:
        # Before 0.16.0 vLLM reads the shard files in glob (file-system) order: the oracle's host decided which
        # shard came first. Order-independent: the recorded crash is the first raise of one shard in nhcheck's
        # replay, with its error; nhcheck's crash is one of those too, and says it assumed the order when they differ.
        firsts: dict[str, object] = {}
        for r in report.records:
            if r.outcome.outcome == "raise":
                firsts.setdefault(r.tensor.shard, r)
        by_tensor = {r.tensor.name: r for r in firsts.values()}  # type: ignore[attr-defined]
        assert expected["crash"]["tensor"] in by_tensor, expected["crash"]
        want = by_tensor[expected["crash"]["tensor"]]
        assert _same_error(want.outcome.message, expected["crash"]["error"]), want.outcome.message
        assert report.crash is not None and report.crash.tensor in by_tensor
        noted = any(f.code == "shard-order-assumed" and f.severity == "info" for f in report.findings)
        assert noted == (len(firsts) > 1)
    else:
        assert report.crash is not None
        assert report.crash.tensor == expected["crash"]["tensor"]
        assert _same_error(report.crash.error, expected["crash"]["error"]), report.crash.error


def _assert_params_coverage(expected: dict, report) -> None:
    if _refused_at_startup(expected, report):
        return
    without = sorted(s.name for s in report.params if s.status in ("unfilled", "unreachable"))
    partial = sorted(s.name for s in report.params if s.status == "partial")
    assert without == sorted(n for n in expected["params_without_tensor"] if not n.startswith(TOWERS))
    assert partial == sorted(p["param"] for p in expected["params_partially_filled"])


def _assert_manifest(expected: dict, report) -> None:
    """Names exactly; dtype, quant method and shape of every parameter."""
    if _refused_at_startup(expected, report):
        return
    exp = {p["name"]: p for p in expected["manifest"]["params"] if not p["name"].startswith(TOWERS)}
    assert {p.name for p in report.manifest.params} == set(exp)
    assert report.manifest.quantization == expected["manifest"]["quantization"]
    for p in report.manifest.params:
        e = exp[p.name]
        assert (list(p.shape), p.dtype, p.quant_method) == (e["shape"], e["dtype"], e["quant_method"]), p.name


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_tensor_outcomes(case: str, version: str) -> None:
    expected, report = _load(case, version)
    if _refused_at_startup(expected, report):
        return
    _assert_tensor_outcomes(expected, report, warn_names_engine=True)


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_crash_point(case: str, version: str) -> None:
    expected, report = _load(case, version)
    _assert_crash(expected, report, vllm.PROFILES[version].natural_shard_order)


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_params_coverage(case: str, version: str) -> None:
    _assert_params_coverage(*_load(case, version))


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_manifest(case: str, version: str) -> None:
    _assert_manifest(*_load(case, version))


# ---------------------------------------------------------------------------------------------------------------------
# transformers 4.x beside 5.x: vLLM 0.19.1 – 0.23.x allow both (``VLLMProfile.transformers4_allowed``) and nhcheck
# answers for 5.x, what pip resolves. ``expected-transformers4-vllm-X.json.gz``: the same release run with the newest
# transformers 4.x it allows (4.57.6; ``make_goldens.py X --variant transformers4``). 0.19.1 under 4.57.6 is 0.19.0
# (identical loading code, ``oracle/vllm/compare_code.py``; 0.19.0's goldens were made with transformers 4.57.6).

#: The release whose transformers-4 answers another release's goldens are (same loading code).
TRANSFORMERS4_SAME_AS = {"0.19.1": "0.19.0"}


def _transformers4_goldens() -> list[tuple[str, str, str]]:
    """(case, release, golden file name) of every transformers-4 answer beside a transformers-5 golden."""
    out = []
    for f in sorted(HERE.glob("**/expected-transformers4-vllm-*.json*")):
        version = f.name.removeprefix("expected-transformers4-vllm-").removesuffix(".gz").removesuffix(".json")
        out.append((str(f.parent.relative_to(HERE)), version, f"expected-transformers4-vllm-{version}.json"))
    for case, version in GOLDENS:
        if version in TRANSFORMERS4_SAME_AS and (case, TRANSFORMERS4_SAME_AS[version]) in GOLDENS:
            out.append((case, version, f"expected-vllm-{TRANSFORMERS4_SAME_AS[version]}.json"))
    return out


TRANSFORMERS4 = _transformers4_goldens()


def _answers(golden: dict) -> dict:
    return {k: v for k, v in golden.items() if k not in ("engine", "made_by")}


def test_transformers4_answers_cover_the_releases_run():
    """0.20.0 ran with transformers 4.57.6 on every case of its own goldens, 0.21.0 – 0.23.0 on the dense probes;
    0.19.1's transformers-4 answers are 0.19.0's, the list ``intermediate_size`` probe included (EPOCHS.md)."""
    four = {(c, v) for c, v, _ in TRANSFORMERS4}
    assert {(c, v) for c, v in GOLDENS if v == "0.20.0"} <= four
    dense = {c for c, _ in GOLDENS if c.startswith("dense_probes/")}
    assert {(c, v) for c in dense for v in ("0.21.0", "0.22.0", "0.23.0")} <= four
    assert ("dense_probes/probe_h8b_dense_mlp_list", "0.19.1") in four
    assert all(
        p.transformers4_allowed == (p.version in ("0.19.1", "0.20.0", "0.21.0", "0.22.0", "0.23.0"))
        for p in vllm.EPOCHS
    )


@pytest.mark.parametrize("golden", sorted(HERE.glob("mtp/*/expected-transformers4-mtp-vllm-*.json*")), ids=str)
def test_the_mtp_draft_answers_alike_under_transformers4(golden: Path) -> None:
    """The MTP draft's config is the same class: under transformers 4.57.6 the draft answers as under 5.x."""
    version = golden.name.removeprefix("expected-transformers4-mtp-vllm-").removesuffix(".gz").removesuffix(".json")
    five = read_golden(golden.parent / f"expected-mtp-vllm-{version}.json")
    assert _answers(read_golden(golden.with_name(golden.name.removesuffix(".gz")))) == _answers(five)


@pytest.mark.parametrize(("case", "version", "golden"), TRANSFORMERS4)
def test_transformers4_answers_are_nhchecks_or_the_alternative_it_states(case: str, version: str, golden: str) -> None:
    """Where transformers 4.x answers as 5.x, nhcheck's one answer holds and no alternative is named; where it does
    not, the audit says so in an ``info`` finding, and the release's row under transformers 4.x (the alternative
    ``environment_alternative`` names) reproduces the transformers-4 golden exactly."""
    assert vllm.PROFILES[version].transformers4_allowed
    four = read_golden(HERE / case / golden)
    five, report = _load(case, version)
    stated = [f for f in report.findings if f.code == "environment-assumed"]
    if _answers(four) == _answers(five):
        assert not stated
        return
    assert len(stated) == 1 and stated[0].severity == "info", stated
    assert "answered for transformers 5" in stated[0].message and "transformers 4.x" in stated[0].message
    alternative = engines.get(f"vllm@{version}").environment_alternative(report.config)
    assert alternative is not None
    ckpt, cfg = open_local(str(_checkpoint(HERE / case))), report.config
    qc = parse_quant(ckpt.config, ckpt.hf_quant_config)
    manifest = alternative.engine.build_manifest(cfg, qc)
    other = run_audit(ckpt, cfg, qc, manifest, alternative.engine, AuditOptions(compare_versions=False))
    assert not [f for f in other.findings if f.code == "environment-assumed"]
    if not _refused_at_startup(four, other):
        _assert_tensor_outcomes(four, other, warn_names_engine=True)
    _assert_crash(four, other, natural_order=True)
    _assert_params_coverage(four, other)
    _assert_manifest(four, other)
    if four["crash"] and four["crash"]["tensor"]:
        assert four["crash"]["tensor"] in stated[0].message, stated[0].message


# ---------------------------------------------------------------------------------------------------------------------
# The MTP draft (``--mtp``): ``tests/conformance/mtp/<case>/expected-mtp-vllm-X.json.gz``, made by
# ``oracle/vllm/make_goldens.py X --mtp`` (vLLM's ``NemotronHMTP`` built as the speculative proposer builds it, its
# real ``load_weights`` per tensor and as one stream through ``DefaultModelLoader``).

MTP = HERE / "mtp"


def _mtp_goldens() -> list[tuple[str, str]]:
    out = []
    for f in sorted(MTP.glob("*/expected-mtp-vllm-*.json*")):
        version = f.name.removeprefix("expected-mtp-vllm-").removesuffix(".gz").removesuffix(".json")
        out.append((f.parent.name, version))
    return out


MTP_GOLDENS = _mtp_goldens()
MTP_ANSWERED = [(c, v) for c, v in MTP_GOLDENS if v in vllm_mtp.MTP_PROFILES]


@functools.cache
def _load_mtp(case: str, version: str):
    expected = read_golden(MTP / case / f"expected-mtp-vllm-{version}.json")
    opts = AuditOptions(mtp=True, compare_versions=False)
    return expected, audit_path(str(MTP / case / "checkpoint"), f"vllm@{version}", opts=opts)


def test_every_mtp_row_is_backed_by_goldens_on_every_mtp_case():
    cases = {p.name for p in MTP.iterdir() if (p / "checkpoint").is_dir()}
    have: dict[str, set[str]] = {}
    for case, version in MTP_GOLDENS:
        have.setdefault(version, set()).add(case)
    for row in dict.fromkeys(vllm_mtp.MTP_PROFILES.values()):
        assert have.get(row.version) == cases, row.version
    # every golden is of a release nhcheck answers --mtp for, or of one before the draft (below)
    assert {v for _, v in MTP_GOLDENS} - set(vllm_mtp.MTP_PROFILES) == {"0.16.0"}


def test_mtp_before_the_draft_is_refused_and_a_usage_error():
    """0.16.0 has no ``nemotron_h_mtp.py``: its start-up refuses the speculative config (golden), and nhcheck says
    the release has no draft (a usage error, as SGLang's path says for releases before 0.5.8)."""
    for case in {c for c, v in MTP_GOLDENS if v == "0.16.0"}:
        expected = read_golden(MTP / case / "expected-mtp-vllm-0.16.0.json")
        assert expected["crash"]["tensor"] is None and not expected["tensors"], expected["crash"]
        assert "Unsupported speculative method: 'mtp'" in expected["crash"]["error"]
        with pytest.raises(UsageError, match="has no Nemotron-H MTP draft"):
            audit_path(str(MTP / case / "checkpoint"), "vllm@0.16.0", opts=AuditOptions(mtp=True))


@pytest.mark.parametrize(("case", "version"), MTP_ANSWERED)
def test_mtp_tensor_outcomes(case: str, version: str) -> None:
    expected, report = _load_mtp(case, version)
    assert report.mtp and report.manifest.mode == "mtp"
    if _refused_at_startup(expected, report):
        return
    _assert_tensor_outcomes(expected, report, warn_names_engine=False)


@pytest.mark.parametrize(("case", "version"), MTP_ANSWERED)
def test_mtp_crash_point(case: str, version: str) -> None:
    expected, report = _load_mtp(case, version)
    if expected["crash"] is None:
        assert report.crash is None
    elif expected["crash"]["tensor"] is None:
        if not _refused_at_startup(expected, report):  # the strict check after the stream
            assert report.crash is not None and report.crash.tensor is None
            assert _same_error(report.crash.error, expected["crash"]["error"]), report.crash.error
    else:
        assert report.crash is not None
        assert report.crash.tensor == expected["crash"]["tensor"]
        assert _same_error(report.crash.error, expected["crash"]["error"]), report.crash.error


@pytest.mark.parametrize(("case", "version"), MTP_ANSWERED)
def test_mtp_params_coverage_and_manifest(case: str, version: str) -> None:
    expected, report = _load_mtp(case, version)
    if _refused_at_startup(expected, report):
        return
    without = sorted(s.name for s in report.params if s.status in ("unfilled", "unreachable"))
    partial = sorted(s.name for s in report.params if s.status == "partial")
    assert without == sorted(expected["params_without_tensor"])
    assert partial == sorted(p["param"] for p in expected["params_partially_filled"])
    exp = {p["name"]: p for p in expected["manifest"]["params"]}
    assert {p.name for p in report.manifest.params} == set(exp)
    assert report.manifest.quantization == expected["manifest"]["quantization"]
    for p in report.manifest.params:
        e = exp[p.name]
        assert (list(p.shape), p.dtype, p.quant_method) == (e["shape"], e["dtype"], e["quant_method"]), p.name
