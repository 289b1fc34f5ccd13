"""100 % agreement with SGLang's own load_weights on the conformance checkpoints.

The expectations in tests/conformance/ were produced by running the released sglang
packages on stub parameters (see tests/conformance/README.md); nothing was written by hand.
Manifest names are compared for everything nhcheck builds: the language model and the
Omni projector. Vision/sound tower parameters are the towers' own business (their
checkpoint names are routed to the towers' loaders by design) and are not modelled.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nhcheck.audit import AuditOptions
from nhcheck.pipeline import audit_path

HERE = Path(__file__).parent / "conformance"
CASES = sorted(p.name for p in HERE.iterdir() if (p / "checkpoint").is_dir())
VERSIONS = ("0.5.11", "0.5.23")
TOWERS = ("vision_model.", "sound_encoder.")


def _load(case: str, version: str):
    expected = json.loads((HERE / case / f"expected-sglang-{version}.json").read_text())
    report = audit_path(str(HERE / case / "checkpoint"), f"sglang@{version}",
                        opts=AuditOptions(compare_versions=False))
    return expected, report


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_tensor_outcomes(case: str, version: str) -> None:
    expected, report = _load(case, version)
    got = {r.tensor.name: r for r in report.records}
    assert set(got) == set(expected["tensors"])
    for name, exp in expected["tensors"].items():
        r = got[name]
        o = r.outcome
        actual = {"outcome": o.outcome, "param": r.param, "shard_id": o.shard_id, "expert_id": o.expert_id}
        assert actual == {k: exp[k] for k in actual}, name
        if o.outcome == "warn":
            assert (o.engine_name, o.message) == (exp["engine_name"], exp["message"]), name
        if o.outcome == "raise":
            assert o.message == exp["message"], name


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_crash_point(case: str, version: str) -> None:
    expected, report = _load(case, version)
    if expected["crash"] is None:
        assert report.crash is None
    else:
        assert report.crash is not None
        assert (report.crash["tensor"], report.crash["error"]) == (expected["crash"]["tensor"], expected["crash"]["error"])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_params_coverage(case: str, version: str) -> None:
    expected, report = _load(case, version)
    without = sorted(s.name for s in report.params if s.status in ("unfilled", "unreachable"))
    partial = sorted(s.name for s in report.params if s.status == "partial")
    assert without == sorted(expected["params_without_tensor"])
    assert partial == sorted(expected["params_partially_filled"])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifest_names(case: str, version: str) -> None:
    expected, report = _load(case, version)
    want = {p["name"] for p in expected["manifest"]["params"] if not p["name"].startswith(TOWERS)}
    assert {p.name for p in report.manifest.params} == want
    assert report.manifest.moe_backend == expected["manifest"]["moe_runner_backend"]
    assert report.manifest.quantization == expected["manifest"]["quantization"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifest_dtypes_and_methods(case: str, version: str) -> None:
    """dtype and quant method per parameter; shapes too, except experts under trtllm padding."""
    expected, report = _load(case, version)
    exp = {p["name"]: p for p in expected["manifest"]["params"]}
    for p in report.manifest.params:
        e = exp[p.name]
        assert (p.dtype, p.quant_method) == (e["dtype"], e["quant_method"]), p.name
        padded = expected["manifest"]["moe_runner_backend"].startswith("flashinfer_trtllm") and ".experts." in p.name
        if not padded:
            assert list(p.shape) == e["shape"], p.name
