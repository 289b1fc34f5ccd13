"""``load --engine vllm@X`` writes what vLLM's real loader writes, narrowed expert slots included.

The golden files (``tests/golden/vllm_slot_writes/vllm-X.json.gz``, made by ``oracle/vllm/slot_writes.py``
with each release's own ``DefaultModelLoader.load_weights`` on NaN-filled parameters) record, for every
unquantized expert parameter and expert, which elements the loader wrote (as a box) and the sha256 of the
values written. The checkpoint is the ``nano3_nvfp4_experts_excluded`` case without the expert scales vLLM
raises on: its packed NVFP4 bytes then go into the bigger bf16 expert slots without an error (>= 0.19.0).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from goldens import read_golden
from safetensors import safe_open
from safetensors.torch import save_file

from nhcheck.load import LoadOptions, load_path
from nhcheck.load.plan import corner_runs, plan_load
from nhcheck.pipeline import audit_path

HERE = Path(__file__).parent
GOLDEN = HERE / "golden" / "vllm_slot_writes"
CASE = HERE / "conformance" / "nano3_nvfp4_experts_excluded" / "checkpoint"
RELEASES = sorted(p.name[len("vllm-") : -len(".json.gz")] for p in GOLDEN.glob("vllm-*.json.gz"))


def derive(golden: dict, dst: Path) -> Path:
    """The golden's checkpoint: the case without the tensors its ``drop`` pattern names (as the oracle wrote it)."""
    drop = re.compile(golden["derived"]["drop"])
    index = json.loads((CASE / "model.safetensors.index.json").read_text())
    dst.mkdir()
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(CASE / shard), "pt") as h:
            kept = {k: h.get_tensor(k) for k in h.keys() if not drop.match(k)}
        save_file(kept, str(dst / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not drop.match(k)}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "hf_quant_config.json"):
        (dst / name).write_text((CASE / name).read_text())
    return dst


def box_of(mask: torch.Tensor) -> list[list[int]] | None:
    """The box the True elements fill exactly (None: none, or not a box) — the oracle's rule."""
    if not bool(mask.any()):
        return None
    box = []
    for d in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != d)
        idx = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
        box.append([int(idx[0]), int(idx[-1]) + 1])
    inside = torch.zeros_like(mask)
    inside[tuple(slice(a, b) for a, b in box)] = True
    return box if bool((inside == mask).all()) else None


def sha256(t: torch.Tensor) -> str:
    """Of the tensor's bytes, row-major (the oracle's digest)."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def derived(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    out = {}
    for version in RELEASES:
        golden = read_golden(GOLDEN / f"vllm-{version}.json")
        out[version] = (golden, derive(golden, tmp_path_factory.mktemp(version) / "ck"))
    return out


def test_goldens_exist_for_both_expert_loaders():
    """0.19.0 (FusedMoE's own corner copy), 0.20.0+ (``_narrow_expert_data_for_padding``), 0.24.0+ (RoutedExperts)."""
    assert {"0.19.0", "0.20.0", "0.34.0"} <= set(RELEASES)


@pytest.mark.parametrize("version", RELEASES)
def test_narrowed_expert_slots_are_written_exactly_as_vllm_writes_them(derived, version):
    golden, ck = derived[version]
    for name, digest in golden["derived"]["tensors_sha256"].items():  # the oracle's input, rebuilt byte for byte
        shard = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"][name]
        with safe_open(str(ck / shard), "pt") as h:
            assert sha256(h.get_tensor(name)) == digest
    assert golden["stream"] == {"raised": False}

    result = load_path(str(ck), f"vllm@{version}", LoadOptions(device="cpu"))
    report, tensors = result.report, result.tensors
    assert report.crash is None
    assert golden["params"], "the golden records the excluded experts' bf16 parameters"
    for name, want in golden["params"].items():
        got = tensors[name]
        assert list(got.shape) == want["shape"] and str(got.dtype) == f"torch.{want['dtype']}"
        for e, w in want["experts"].items():
            slot = got[int(e)]
            written = ~torch.isnan(slot.float())  # nhcheck poisons with 0xFF bytes: NaN in bf16
            box = box_of(written)
            assert (int(written.sum()), box) == (w["written"], w["box"]), (name, e)
            values = slot[tuple(slice(a, b) for a, b in box)] if box else None
            assert (sha256(values) if values is not None else None) == w["sha256"], (name, e)
    narrowed = [f for f in report.findings if f.code == "slot-narrowed"]
    assert len(narrowed) == 2 and all(f.severity == "error" for f in narrowed)
    partial = {f.code for f in report.findings if "part of expert" in f.message}
    assert partial == {"param-partial"} and report.verdict == "broken"


def test_before_0_19_the_packed_tensor_is_refused_not_narrowed(derived):
    """0.18.x narrows the incoming tensor to the slot and raises (goldens ``nano3_nvfp4_experts_excluded``)."""
    _, ck = derived[RELEASES[0]]
    plan = plan_load(audit_path(str(ck), "vllm@0.18.1"))
    assert plan.crash is not None and ".experts." in (plan.crash.tensor or "")
    assert not any(op.kind == "corner" for op in plan.ops)


@pytest.mark.parametrize(
    ("corner", "within", "runs"),
    [
        ((64, 16), (64, 32), [(r * 32, r * 32 + 16) for r in range(64)]),
        ((32, 32), (32, 64), [(r * 64, r * 64 + 32) for r in range(32)]),
        ((2, 4), (4, 4), [(0, 8)]),
        ((4, 4), (4, 4), [(0, 16)]),
        ((1, 2, 3), (2, 2, 4), [(0, 3), (4, 7)]),
    ],
)
def test_corner_runs(corner, within, runs):
    assert corner_runs(corner, within) == runs
    flat = torch.zeros(within, dtype=torch.bool)
    flat[tuple(slice(0, c) for c in corner)] = True
    assert sum(b - a for a, b in runs) == int(flat.sum())
    assert all(bool(flat.flatten()[a:b].all()) for a, b in runs)
