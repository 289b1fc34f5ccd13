"""The audit's output, byte for byte, as it was before the speed work (issue 17): JSON, table and markdown.

``tests/golden/audit-outputs.json.gz`` holds the SHA-256 of every output (and the exit code) of
``nhcheck audit`` on each shipped example and conformance checkpoint, for the oldest and newest release
of each engine, each format, with and without ``--show-loaded`` / ``--ignore``, produced by the code
before the change; and of the two full-size layouts ``bench/audit.py`` times (``examples/generate.py``: Nano-3
NVFP4, 24,147 tensors, and Super NVFP4, 165,860), JSON and table, with the newest release of each engine. A faster
path that changes one byte fails here.

An intended change of output regenerates the file (and says so in its commit):
``python tests/test_output_snapshot.py`` writes it from the nhcheck it imports.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).parent / "golden" / "audit-outputs.json.gz"
ENGINES = ("sglang@0.5.11", "sglang@0.5.23", "vllm@0.16.0", "vllm@0.34.0")
VARIANTS: dict[str, tuple[str, ...]] = {"plain": (), "loaded": ("--show-loaded",), "ignore": ("--ignore", "*experts*")}


def cases() -> list[str]:
    """Every checkpoint the repository ships, relative to its root."""
    examples = sorted(ROOT.glob("examples/*/config.json"))
    found = examples + sorted(ROOT.glob("tests/conformance/*/checkpoint/config.json"))
    return [str(p.parent.relative_to(ROOT)) for p in found]


def run(case: str, engine: str, fmt: str, variant: str, out: Path, source: Path | None = None) -> str:
    """``sha256 exit-code`` of one ``nhcheck audit`` report, run in-process through the click command.

    ``source``: the checkpoint's directory when it is not ``ROOT / case`` (a generated full-size layout); the
    report names it as given, so its path is replaced by ``case`` before hashing.
    """
    from click.testing import CliRunner

    from nhcheck import cli

    where = source if source is not None else ROOT / case
    args = ["audit", str(where), "--engine", engine, "-f", fmt, "-o", str(out), "-q", *VARIANTS[variant]]
    result = CliRunner().invoke(cli.cli, args)
    data = out.read_bytes() if out.exists() else b""
    out.unlink(missing_ok=True)
    # The report names the source as given: make it the relative path, so the digest holds on any checkout.
    if source is not None:
        data = data.replace(str(source).encode(), case.encode())
    data = data.replace(str(ROOT).encode() + b"/", b"")
    return f"{hashlib.sha256(data).hexdigest()} {result.exit_code}"


#: What each format is run with (``--show-loaded`` does not change the JSON document).
FORMATS = {"json": ("plain", "ignore"), "table": ("plain", "loaded", "ignore"), "markdown": ("plain", "loaded")}


def keys() -> list[tuple[str, str, str, str]]:
    return [(c, e, f, v) for c in cases() for e in ENGINES for f, vs in FORMATS.items() for v in vs]


#: The full-size layouts ``bench/audit.py`` times, audited as it audits them (JSON to a file, the table piped).
FULL_LAYOUTS = ("nano3-nvfp4", "super-nvfp4")
FULL_ENGINES = ("sglang@0.5.23", "vllm@0.34.0")


def full_keys(name: str) -> list[tuple[str, str, str, str]]:
    return [(f"full:{name}", e, f, "plain") for e in FULL_ENGINES for f in ("json", "table")]


def full_layout(name: str, out: Path) -> Path:
    """Write the full-size layout ``name`` (sparse shards: no disk used for the data) under ``out``."""
    import generate  # examples/generate.py

    generate.full_layouts()[name](str(out / name))
    return out / name


@pytest.fixture(scope="module")
def snapshot() -> dict[str, str]:
    return json.loads(gzip.decompress(SNAPSHOT.read_bytes()))


@pytest.mark.parametrize("case", cases())
def test_output_is_byte_identical_to_the_snapshot(case, snapshot, tmp_path):
    got = {
        "|".join(k): run(*k, tmp_path / "report")
        for k in keys()
        if k[0] == case  # one test per checkpoint: a failure names it
    }
    want = {k: v for k, v in snapshot.items() if k.startswith(case + "|")}
    assert want, f"{case} is not in the snapshot: regenerate it (python tests/test_output_snapshot.py)"
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_LAYOUTS)
def test_full_layout_output_is_byte_identical_to_the_snapshot(name, snapshot, tmp_path):
    layout = full_layout(name, tmp_path)
    got = {"|".join(k): run(*k, tmp_path / "report", layout) for k in full_keys(name)}
    want = {k: v for k, v in snapshot.items() if k.startswith(f"full:{name}|")}
    assert len(want) == len(got), f"{name} is not in the snapshot: regenerate it (python tests/test_output_snapshot.py)"
    assert got == want


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(ROOT / "examples"))  # generate.py (under pytest, conftest.py puts it there)

    with tempfile.TemporaryDirectory() as tmp:
        digests = {"|".join(k): run(*k, Path(tmp) / "report") for k in keys()}
        for name in FULL_LAYOUTS:
            layout = full_layout(name, Path(tmp))
            digests.update({"|".join(k): run(*k, Path(tmp) / "report", layout) for k in full_keys(name)})
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_bytes(gzip.compress(json.dumps(digests, indent=0, sort_keys=True).encode(), 9, mtime=0))
    print(f"{len(digests)} digests written to {os.path.relpath(SNAPSHOT)}")
