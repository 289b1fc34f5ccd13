"""100 % agreement with SGLang's own load_weights on the conformance checkpoints.

The expectations in tests/conformance/ were produced by running the released sglang
packages on stub parameters (see tests/conformance/README.md); nothing was written by hand.
Manifest names are compared for everything nhcheck builds: the language model and the
Omni projector. Vision/sound tower parameters are the towers' own business (their
checkpoint names are routed to the towers' loaders by design) and are not modelled.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from goldens import read_golden

from nhcheck import engines
from nhcheck.audit import AuditOptions
from nhcheck.pipeline import audit_path

HERE = Path(__file__).parent / "conformance"

EXAMPLES = Path(__file__).parent.parent / "examples"
TOWERS = ("vision_model.", "sound_encoder.")
KNOWN = {(e.name, e.version) for e in engines.known()}


def _checkpoint(case_dir: Path) -> Path:
    """A case's own checkpoint, or (``examples/<name>/``) the shipped example it describes."""
    if case_dir.parent.name == "examples":
        return EXAMPLES / case_dir.name
    return case_dir / "checkpoint"


def _goldens(engine: str = "sglang") -> list[tuple[str, str]]:
    """(case, engine@version) for every committed expectation of a release nhcheck answers for (vLLM's:
    ``test_conformance_vllm.py``)."""
    out = []
    for f in sorted(HERE.glob(f"**/expected-{engine}-*.json*")):
        name, _, version = f.name.removeprefix("expected-").removesuffix(".gz").removesuffix(".json").partition("-")
        if (name, version) in KNOWN and _checkpoint(f.parent).is_dir():
            out.append((str(f.parent.relative_to(HERE)), f"{name}@{version}"))
    return out


GOLDENS = _goldens()


@functools.cache
def _load(case: str, engine: str):
    name, version = engine.split("@")
    expected = read_golden(HERE / case / f"expected-{name}-{version}.json")
    report = audit_path(str(_checkpoint(HERE / case)), engine, opts=AuditOptions(compare_versions=False))
    return expected, report


def test_every_epoch_is_backed_by_goldens_on_every_case() -> None:
    """Each behaviour epoch in the table has the engine's own answers for every conformance case and shipped
    example, from at least one of its releases (``oracle/sglang/make_goldens.py``)."""
    cases = {p.name for p in HERE.iterdir() if (p / "checkpoint").is_dir()}
    cases |= {f"examples/{p.name}" for p in (HERE / "examples").iterdir() if p.is_dir()}
    have: dict[str, set[str]] = {}
    for case, engine in GOLDENS:
        have.setdefault(engine, set()).add(case)
    for name, releases in engines.epochs():
        if name != "sglang":
            continue
        covered = [r for r in releases if have.get(f"{name}@{r}", set()) >= cases]
        assert covered, f"{name} {releases}: no release of this epoch has goldens for every case"


def _refused_at_startup(expected: dict, report) -> bool:
    """The engine refused before ``load_weights``: no tensor outcomes and no manifest to compare, only the
    error — which nhcheck must report as a start-up crash too (checked here and in ``test_crash_point``)."""
    crash = expected["crash"]
    if crash is None or crash["tensor"] is not None or expected["tensors"]:
        return False
    assert report.crash is not None and report.crash.tensor is None, report.crash
    return True


def _error(text: str) -> str:
    """The oracle labels a start-up error with where it came from (``start-up (model_build): ValueError…``)."""
    return re.sub(r"^start-up(?: \([a-z_]+\))?: ", "", text)


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_tensor_outcomes(case: str, version: str) -> None:
    expected, report = _load(case, version)
    if _refused_at_startup(expected, report):
        return
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


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_crash_point(case: str, version: str) -> None:
    expected, report = _load(case, version)
    if expected["crash"] is None:
        assert report.crash is None
    else:
        assert report.crash is not None
        assert (report.crash.tensor, report.crash.error) == (
            expected["crash"]["tensor"],
            _error(expected["crash"]["error"]),
        )


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_params_coverage(case: str, version: str) -> None:
    expected, report = _load(case, version)
    if _refused_at_startup(expected, report):
        return
    without = sorted(s.name for s in report.params if s.status in ("unfilled", "unreachable"))
    partial = sorted(s.name for s in report.params if s.status == "partial")
    assert without == sorted(expected["params_without_tensor"])
    assert partial == sorted(expected["params_partially_filled"])


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_manifest_names(case: str, version: str) -> None:
    expected, report = _load(case, version)
    if _refused_at_startup(expected, report):
        return
    want = {p["name"] for p in expected["manifest"]["params"] if not p["name"].startswith(TOWERS)}
    assert {p.name for p in report.manifest.params} == want
    assert report.manifest.moe_backend == expected["manifest"]["moe_runner_backend"]
    assert report.manifest.quantization == expected["manifest"]["quantization"]


@pytest.mark.parametrize(("case", "version"), GOLDENS)
def test_manifest_dtypes_and_methods(case: str, version: str) -> None:
    """dtype and quant method per parameter; shapes too, except experts under trtllm padding."""
    expected, report = _load(case, version)
    if _refused_at_startup(expected, report):
        return
    exp = {p["name"]: p for p in expected["manifest"]["params"]}
    for p in report.manifest.params:
        e = exp[p.name]
        assert (p.dtype, p.quant_method) == (e["dtype"], e["quant_method"]), p.name
        padded = expected["manifest"]["moe_runner_backend"].startswith("flashinfer_trtllm") and ".experts." in p.name
        if not padded:
            assert list(p.shape) == e["shape"], p.name
