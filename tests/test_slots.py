"""A scalar scale into a per-partition scale vector: audit and load share one rule (``nhcheck.slots``).

The rule's engine side (slot 0 only before 0.5.16, every slot after) is what SGLang's own loaders did
on the fused Mamba ``in_proj`` scales in the TP-1 rank maps of tests/golden/tp/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nhcheck import engines
from nhcheck.load import LoadOptions, load_path
from nhcheck.pipeline import audit_path

EX = Path(__file__).parent.parent / "examples"
GOLDEN = Path(__file__).parent / "golden" / "tp"


@pytest.mark.parametrize("release", ["0.5.11", "0.5.23"])
def test_engine_semantics_match_sglangs_own_loader(release):
    doc = json.loads((GOLDEN / f"sglang-{release}" / "hybrid-nvfp4-flashinfer_cutlass-tp1.json").read_text())
    params = {n: e for fam in doc["families"].values() for n, e in fam.items()}
    boxes = params["model.layers.0.mixer.in_proj.input_scale"]["ranks"]["0"]
    written = sum(b["dst"][0][1] - b["dst"][0][0] for b in boxes if "src" in b)
    every = engines.get(f"sglang@{release}").loader_semantics("ModelOptFp4LinearMethod").scalar_every_slot
    assert written == (5 if every else 1)


@pytest.mark.parametrize("release", ["0.5.11", "0.5.12", "0.5.15", "0.5.16", "0.5.23"])
def test_audit_reaches_the_loads_verdict(release):
    engine = f"sglang@{release}"
    audit = audit_path(str(EX / "nano3-nvfp4"), engine)
    load = load_path(str(EX / "nano3-nvfp4"), engine, opts=LoadOptions(device="cpu")).report
    assert audit.verdict == load.verdict == ("clean" if release in ("0.5.16", "0.5.23") else "incomplete")
    a = sorted((f.code, f.message) for f in audit.findings if f.code == "scale-slot0-only")
    b = sorted((f.code, f.message) for f in load.findings if f.code == "scale-slot0-only")
    assert a == b and len(a) == (0 if release in ("0.5.16", "0.5.23") else 2)
