"""``audit --values``: garbage scales are found, collapsed per module, and only scale bytes are read."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from pathlib import Path

import make_corpus  # tests/corpus, on the path from conftest.py
import msgspec
import pytest
from click.testing import CliRunner

from nhcheck import values
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.errors import CheckpointError, UsageError
from nhcheck.pipeline import audit_path
from nhcheck.safetensors_header import TensorInfo

REPO = Path(__file__).resolve().parents[1]
EXPERT = "backbone.layers.1.mixer.experts.{e}.up_proj"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The corpus base: tiny NVFP4 Nemotron-H with real (positive, finite) scale values and KV scales."""
    out = tmp_path_factory.mktemp("values") / "base"
    make_corpus.write_base(out)
    return out


@pytest.fixture
def ckpt(base, tmp_path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(base, out)
    return out


def poke(ckpt: Path, name: str, data: bytes) -> TensorInfo:
    """Overwrite the first bytes of tensor ``name`` in place."""
    t = next(t for t in open_local(str(ckpt)).tensors() if t.name == name)
    with open(os.path.join(ckpt, t.shard), "r+b") as fh:
        fh.seek(t.start)
        fh.write(data)
    return t


def audit_json(path: Path, *extra: str) -> tuple[int, dict]:
    r = CliRunner().invoke(cli, ["audit", str(path), "-q", "--format", "json", *extra], catch_exceptions=False)
    return r.exit_code, json.loads(r.stdout)


def bad_scales(rep: dict) -> list[dict]:
    return [f for f in rep["findings"] if f["code"] == "bad-scale"]


# ---------------------------------------------------------------------------
# decoding and judging


@pytest.mark.parametrize("dtype,fmt", [("F32", "<3f"), ("F64", "<3d"), ("F16", "<3e")])
def test_decode_floats_matches_struct(dtype, fmt):
    vals = (1.5, -0.25, 448.0)
    assert list(values.decode_floats(dtype, struct.pack(fmt, *vals))) == list(vals)


def test_decode_bf16_is_the_top_half_of_f32():
    vals = (1.0, -2.5, 0.0078125)
    raw = b"".join(struct.pack("<f", v)[2:] for v in vals)
    assert list(values.decode_floats("BF16", raw)) == list(vals)


@pytest.mark.parametrize(
    "vals,problem",
    [
        ((1.0, 2.0), None),
        ((math.nan,), "nonfinite"),
        ((1.0, math.inf), "nonfinite"),
        ((0.0,), "zero"),
        ((-0.0, 1.0), "zero"),
        ((-1.0,), "negative"),
        ((math.nan, 0.0, -1.0), "nonfinite"),
        ((0.0, -1.0), "zero"),
    ],
)
def test_judge_floats_reports_the_worst_problem(vals, problem):
    assert values.judge_floats(vals) == problem


@pytest.mark.parametrize(
    "data,nan,zero",
    [
        (bytes([0x38, 0x30, 0x40]), False, False),
        (bytes([0x00, 0x38]), False, False),
        (bytes(5), False, True),
        (bytes([0x80, 0x00, 0x80]), False, True),
        (bytes([0x00, 0x7F]), True, False),
        (bytes([0xFF]), True, False),
        (bytes([0x7E, 0xFE]), False, False),
        (b"", False, False),
    ],
)
def test_e4m3_nan_and_all_zero_from_bytes_alone(data, nan, zero):
    assert values.e4m3_has_nan(data) is nan and values.e4m3_all_zero(data) is zero


@pytest.mark.parametrize(
    "name,dtype,kind",
    [
        ("m.weight_scale_2", "F32", "float"),
        ("m.input_scale", "BF16", "float"),
        ("m.k_scale", "F32", "float"),
        ("m.kv_scale", "F16", "float"),
        ("m.weight_scale", "F8_E4M3", "e4m3"),
        ("m.weight_scale", "F32", "float"),
        ("m.weight", "F8_E4M3", None),
        ("m.weight_scale", "U8", None),
        ("m.pre_quant_scale", "BF16", None),
        ("m.input_scale", "F8_E4M3", None),
    ],
)
def test_scale_kind_selects_only_scale_tensors(name, dtype, kind):
    assert values.scale_kind(TensorInfo(name, dtype, (), 0, 0, "s")) == kind


# ---------------------------------------------------------------------------
# through the CLI


def test_healthy_scales_are_clean_and_header_only_audit_never_reads_data(base, monkeypatch):
    preads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: preads.append((off, n)) or real(fd, n, off))
    code, rep = audit_json(base)
    assert code == 0 and not preads
    code, rep = audit_json(base, "--values")
    assert code == 0 and rep["summary"]["verdict"] == "clean" and not bad_scales(rep)
    assert preads


def test_real_data_example_is_clean():
    code, rep = audit_json(REPO / "examples" / "nano3-nvfp4", "--values")
    assert not bad_scales(rep) and rep["summary"]["verdict"] == "clean"


def test_garbage_scales_are_found_per_module(ckpt):
    poke(ckpt, "backbone.layers.0.mixer.in_proj.weight_scale_2", struct.pack("<f", 0.0))
    poke(ckpt, "backbone.layers.0.mixer.out_proj.input_scale", struct.pack("<f", math.nan))
    poke(ckpt, "backbone.layers.2.mixer.k_proj.k_scale", struct.pack("<f", -1.0))
    poke(ckpt, "backbone.layers.2.mixer.v_proj.v_scale", struct.pack("<f", math.inf))
    t = poke(ckpt, "backbone.layers.3.mixer.experts.2.down_proj.weight_scale", b"")
    poke(ckpt, t.name, bytes(t.nbytes))  # every block scale zero
    poke(ckpt, "backbone.layers.3.mixer.experts.1.up_proj.weight_scale", b"\x38\x7f")  # one NaN block

    assert audit_json(ckpt)[0] == 0  # header-only audit cannot see any of it
    code, rep = audit_json(ckpt, "--values")
    assert code == 1 and rep["summary"]["verdict"] == "broken"
    found = {f["tensor"]: f["message"] for f in bad_scales(rep)}
    assert set(found) == {
        "backbone.layers.0.mixer.in_proj.weight_scale_2",
        "backbone.layers.0.mixer.out_proj.input_scale",
        "backbone.layers.2.mixer.k_proj.k_scale",
        "backbone.layers.2.mixer.v_proj.v_scale",
        "backbone.layers.3.mixer.experts.2.down_proj.weight_scale",
        "backbone.layers.3.mixer.experts.1.up_proj.weight_scale",
    }
    assert found["backbone.layers.0.mixer.in_proj.weight_scale_2"].startswith(
        "backbone.layers.0.mixer.in_proj: weight_scale_2 is zero;"
    )
    assert "input_scale is NaN or infinite" in found["backbone.layers.0.mixer.out_proj.input_scale"]
    assert "k_scale is negative" in found["backbone.layers.2.mixer.k_proj.k_scale"]
    assert "v_scale is NaN or infinite" in found["backbone.layers.2.mixer.v_proj.v_scale"]
    assert "weight_scale FP8 blocks are all zero" in found["backbone.layers.3.mixer.experts.2.down_proj.weight_scale"]
    assert "weight_scale FP8 blocks include NaN" in found["backbone.layers.3.mixer.experts.1.up_proj.weight_scale"]
    assert all(f["severity"] == "error" for f in bad_scales(rep))


def test_a_family_of_modules_collapses_into_one_finding(ckpt):
    for e in range(4):
        poke(ckpt, EXPERT.format(e=e) + ".weight_scale_2", struct.pack("<f", 0.0))
        poke(ckpt, EXPERT.format(e=e) + ".input_scale", struct.pack("<f", 0.0))
    code, rep = audit_json(ckpt, "--values")
    (f,) = bad_scales(rep)
    assert f["message"].startswith(
        "backbone.layers.1.mixer.experts.{0…3}.up_proj ×4: input_scale is zero, weight_scale_2 is zero;"
    )
    r = CliRunner().invoke(cli, ["audit", str(ckpt), "-q", "--values"], env={"COLUMNS": "300"})
    assert "experts.{0…3}.up_proj ×4" in r.stdout and "BROKEN" in r.stdout


def test_ignored_tensors_are_not_read(ckpt):
    poke(ckpt, EXPERT.format(e=0) + ".weight_scale_2", struct.pack("<f", 0.0))
    code, rep = audit_json(ckpt, "--values", "--ignore", "*.experts.0.up_proj.*")
    assert not bad_scales(rep)


def test_only_scale_bytes_are_read(base, monkeypatch):
    rep = audit_path(str(base))
    scales = sorted((t.start, t.end) for t in (r.tensor for r in rep.records) if values.scale_kind(t))
    preads: list[tuple[int, int]] = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: preads.append((off, off + n)) or real(fd, n, off))
    scan = values.scan(rep)
    assert sorted(preads) == scales  # every read is exactly one scale tensor, each read once
    assert scan.tensors_read == len(scales) and scan.bytes_read == sum(e - s for s, e in scales)


def test_large_block_scales_are_read_in_chunks(ckpt, monkeypatch):
    t = poke(ckpt, "backbone.layers.0.mixer.in_proj.weight_scale", b"")
    poke(ckpt, t.name, bytes(t.nbytes - 1) + b"\xff")  # the NaN sits in the last chunk
    monkeypatch.setattr(values, "CHUNK", 64)
    (f,) = values.scan(audit_path(str(ckpt))).findings
    assert "FP8 blocks include NaN" in f.message


def test_a_tensor_too_large_to_be_a_scale_is_noted_not_read(base, monkeypatch):
    monkeypatch.setattr(values, "MAX_SCALE_BYTES", 100)
    scan = values.scan(audit_path(str(base)))
    assert scan.findings and {f.code for f in scan.findings} == {"scale-unchecked"}
    assert all(f.severity == "info" for f in scan.findings)


def test_a_shard_changed_after_its_header_was_read_is_a_clean_error(ckpt):
    rep = audit_path(str(ckpt))
    with open(ckpt / make_corpus.S1, "ab") as fh:
        fh.write(b"more")
    with pytest.raises(CheckpointError, match="size changed"):
        values.scan(rep)


def test_hub_headers_without_local_shards_need_a_download(base):
    rep = audit_path(str(base))
    ckpt = rep.checkpoint
    remote = tuple(msgspec.structs.replace(s, path=f"https://hub.example/{s.name}") for s in ckpt.shards)
    rep = dataclasses.replace(rep, checkpoint=msgspec.structs.replace(ckpt, shards=remote, bytes_transferred=1234))
    with pytest.raises(UsageError, match="download"):
        values.scan(rep)


def test_a_cached_hub_snapshot_is_read_like_a_directory(base):
    """A repo id served from the local cache has real shard files (bytes_transferred 0)."""
    rep = audit_path(str(base))
    rep = dataclasses.replace(rep, checkpoint=msgspec.structs.replace(rep.checkpoint, bytes_transferred=0))
    assert values.scan(rep).tensors_read > 0
