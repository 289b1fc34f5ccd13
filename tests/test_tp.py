"""Tensor parallelism: the static sharding rules (``audit --tp``) and the distributed load (``load --tp``).

(1) each SGLang sharding rule fires exactly where the engine's constructor or loader breaks, with
    the rule and source named, and not where it does not (real Nano-3 geometry included);
(2) every rank's cut of every load op, applied in-process, reassembles into exactly the
    single-device load (q/k/v with replicated KV heads, Mamba merged parts and replicated groups,
    row-parallel columns, experts, padded vocabulary), with read-back corners equal to the file;
(3) two gloo processes started by the real launcher agree on exact coverage; a non-divisible
    config is refused before any process starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from tensors import distinct

from nhcheck import engines, pipeline
from nhcheck import tp as tensor_parallel
from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.engines.sglang import get_profile
from nhcheck.errors import UsageError
from nhcheck.load import Arenas, LoadOptions, load_path, plan_load
from nhcheck.load import tp as load_tp
from nhcheck.manifest import build_manifest
from nhcheck.model import parse_config
from nhcheck.quant import parse_quant

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _manifest(config: dict, quant: dict | None = None, backend: str | None = "flashinfer_cutlass"):
    cfg = parse_config(config)
    qc = parse_quant(config, quant)
    return build_manifest(cfg, qc, get_profile("sglang@0.5.23"), moe_backend=backend), cfg


def _rules(config: dict, tp: int, quant: dict | None = None, backend: str | None = "flashinfer_cutlass") -> dict:
    """rule id -> sorted parameter names it takes down at ``tp``."""
    m, cfg = _manifest(config, quant, backend)
    out: dict[str, set] = {}
    for s in tensor_parallel.plan(m, cfg, tp):
        for prob in s.problems:
            out.setdefault(prob.rule, set()).add(s.param.name)
    return out


# ---------------------------------------------------------------------------
# (1) static rules


def test_parse_tp_sizes():
    assert tensor_parallel.parse_tp_sizes("2,4,8") == (2, 4, 8)
    assert tensor_parallel.parse_tp_sizes(" 4, 4 ,1") == (4, 1)
    for bad in ("", "0", "2,,4", "x", "-2", "2.5", "4096"):
        with pytest.raises(UsageError):
            tensor_parallel.parse_tp_sizes(bad)


def test_attention_heads_and_kv_heads(h8b_cfg):
    cfg = h8b_cfg(num_attention_heads=6, num_key_value_heads=3)
    got = _rules(cfg, 2)
    assert set(got) == {"attn-kv-heads"}  # 6 q heads split; 3 KV heads do not
    assert got["attn-kv-heads"] == {
        f"model.layers.{i}.mixer.{m}.weight" for i in (7, 18, 29, 40) for m in ("qkv_proj", "o_proj")
    }
    assert _rules(h8b_cfg(), 4) == {}  # 2 KV heads at TP 4: each replicated on 2 ranks
    assert set(_rules(h8b_cfg(num_key_value_heads=3, num_attention_heads=12), 4)) == {"attn-kv-heads"}  # 4 % 3
    assert set(_rules(h8b_cfg(), 8)) == {"attn-heads"}


def test_mamba_heads_and_groups(h8b_cfg, nano_cfg, nano_quant):
    assert set(_rules(h8b_cfg(mamba_num_heads=6), 4)) == {"mamba-heads"}
    got = _rules(h8b_cfg(n_groups=3, mamba_n_groups=3), 2)
    assert set(got) == {"mamba-groups"}
    assert (
        "model.layers.0.mixer.A" in got["mamba-groups"]
        and "model.layers.0.mixer.out_proj.weight" in got["mamba-groups"]
    )
    assert _rules(h8b_cfg(n_groups=1, mamba_n_groups=1), 4) == {}  # one group, unquantized: replicated onto every rank
    got = _rules(
        nano_cfg(True, n_groups=1, mamba_n_groups=1), 2, nano_quant
    )  # same with a quant config: asserted against
    assert set(got) == {"mamba-groups-quant"}
    assert "model.layers.0.mixer.conv1d.weight" in got["mamba-groups-quant"]


def test_linear_divide_and_nvfp4_row_blocks(h8b_cfg, nano_cfg, nano_quant):
    assert set(_rules(h8b_cfg(intermediate_size=100), 8)) == {"linear-divide", "attn-heads"}
    got = _rules(nano_cfg(True), 8, nano_quant)
    # shared-expert down_proj: 64 / 8 = 8 input columns, half an NVFP4 block
    assert got["nvfp4-linear-k"] == {
        f"model.layers.{i}.mixer.shared_experts.down_proj.{s}"
        for i, k in enumerate(nano_cfg()["hybrid_override_pattern"])
        if k == "E"
        for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")
    }
    assert "nvfp4-linear-k" not in _rules(nano_cfg(), 8)  # BF16: no block to keep whole


def test_moe_intermediate_blocks_pairs_and_padded_windows(nano_cfg, nano_quant):
    assert set(_rules(nano_cfg(), 3)) >= {"moe-intermediate"}
    assert set(_rules(nano_cfg(True), 4, nano_quant)) == {"nvfp4-moe-block"}  # 32 / 4 = 8
    assert set(_rules(nano_cfg(True, moe_intermediate_size=34), 2, nano_quant)) == {"nvfp4-moe-pair"}  # 17 per rank
    assert _rules(nano_cfg(True), 2, nano_quant) == {}
    # flashinfer_trtllm pads 16 to 128 per rank and starts rank 1 at row 128: an uneven but exact
    # partition (rank 0 holds all 32 rows, rank 1 only zeros), BF16 too — no failure (tests/golden/tp/)
    assert _rules(nano_cfg(), 2, backend="flashinfer_trtllm") == {}
    assert _rules(nano_cfg(moe_intermediate_size=256), 2, backend="flashinfer_trtllm") == {}


def test_real_nano3_nvfp4_geometry():
    """moe_intermediate_size 1856: 232 per rank at TP 8 straddles a 16-element block on any backend."""
    config = json.loads((EXAMPLES / "fixtures/nano3-nvfp4/config.json").read_text())
    quant = json.loads((EXAMPLES / "fixtures/nano3-nvfp4/hf_quant_config.json").read_text())
    assert _rules(config, 2, quant) == {} and _rules(config, 4, quant) == {}
    assert set(_rules(config, 8, quant)) == {"nvfp4-moe-block"}
    # 928 per rank pads to 1024: rank 0 [0, 1024), rank 1 [1024, 1856) + 192 zero rows — exact, an info note.
    assert _rules(config, 2, quant, backend="flashinfer_trtllm") == {}
    m, cfg = _manifest(config, quant, "flashinfer_trtllm")
    notes = [f for f in tensor_parallel.check(m, cfg, (2,)) if "intermediate_size" in f.message]
    assert [f.severity for f in notes] == ["info"]
    assert "rank 0 [0, 1024); rank 1 [1024, 1856) + 192 zero rows" in notes[0].message
    assert not [f for f in tensor_parallel.check(m, cfg, (2, 4, 8)) if f.severity == "error"]


def test_vocab_padding_is_a_note_and_a_sharding(h8b_cfg):
    m, cfg = _manifest(
        h8b_cfg(
            mamba_num_heads=6,
            n_groups=6,
            mamba_n_groups=6,
            num_attention_heads=6,
            num_key_value_heads=3,
            intermediate_size=99,
            vocab_size=250,
        ),
        backend=None,
    )
    shards = {s.param.name: s.sharding for s in tensor_parallel.plan(m, cfg, 3)}
    emb = shards["model.embed_tokens.weight"]
    assert emb.parts == (tensor_parallel.Part(250, 3, 384),)  # 256 % 3 != 0: pad to a multiple of 192
    assert emb.windows(2) == ()  # rank 2 holds padding only
    assert emb.windows(1) == ((128, 122, 0, 1),)
    notes = [f for f in tensor_parallel.check(m, cfg, (3,)) if f.code == "tp-padding"]
    assert len(notes) == 1 and notes[0].severity == "info" and "pads to 384" in notes[0].message


def test_audit_cli_reports_tp_findings_in_every_format(tmp_path, h8b_cfg, generate):
    """3 KV heads at TP 2: a real checkpoint, caught from its headers; the gate decides the exit code."""
    cfg = h8b_cfg(num_attention_heads=6, num_key_value_heads=3)
    generate.write_checkpoint(str(tmp_path), generate.nemotron_h_tensors(cfg, None), cfg)
    r = CliRunner().invoke(cli, ["audit", str(tmp_path), "--tp", "2,4", "--format", "json", "-q"])
    assert r.exit_code == 1, r.output
    found = [f for f in json.loads(r.output)["findings"] if f["code"] == "tp-indivisible"]
    kv = [f for f in found if "num_key_value_heads 3 is not divisible by 2" in f["message"]]
    assert len(kv) == 2  # qkv_proj and o_proj families
    assert all("NemotronHAttention.__init__" in f["message"] and "models/nemotron_h.py" in f["message"] for f in kv)
    assert {f["tensor"] for f in kv} == {
        "model.layers.{7,18,29,40}.mixer.qkv_proj",
        "model.layers.{7,18,29,40}.mixer.o_proj",
    }
    assert any(f["message"].startswith("--tp 4:") for f in found)
    doc = json.loads(r.output)
    per_size = {tp: sum(f["message"].startswith(f"--tp {tp}:") for f in found) for tp in (2, 4)}
    assert doc["summary"]["tp_errors"] == {"2": per_size[2], "4": per_size[4]} and per_size[2] >= 2
    for fmt in ("table", "markdown"):
        r = CliRunner().invoke(cli, ["audit", str(tmp_path), "--tp", "1,2", "--format", fmt, "-q"])
        assert r.exit_code == 1 and "tp-indivisible" in r.output
        assert f"tensor parallel (static): TP 1: ok · TP 2: {per_size[2]} errors" in r.output
    assert (
        "tp_errors"
        not in json.loads(CliRunner().invoke(cli, ["audit", str(tmp_path), "--format", "json", "-q"]).output)["summary"]
    )
    assert CliRunner().invoke(cli, ["audit", str(tmp_path), "--tp", "2", "--fail-on", "none", "-q"]).exit_code == 0
    assert CliRunner().invoke(cli, ["audit", str(tmp_path), "--tp", "3", "-q", "--format", "json"]).exit_code == 1
    r = CliRunner().invoke(cli, ["audit", str(tmp_path), "--tp", "2,x"])
    assert r.exit_code == 2 and "--tp takes TP sizes" in r.output


# ---------------------------------------------------------------------------
# (2) cutting the load plan, every rank in-process


def _write_unique(generate, out: Path, config: dict, quant: dict | None) -> Path:
    """A checkpoint whose every element differs (the examples tile 1 KiB), so a misplaced slice shows."""
    g = torch.Generator().manual_seed(7)
    data = {}
    for name, dtype, shape in generate.nemotron_h_tensors(config, quant):
        data[name] = distinct(shape, dtype, g)
    out.mkdir(parents=True, exist_ok=True)
    save_file(data, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    if quant is not None:
        (out / "hf_quant_config.json").write_text(json.dumps(quant))
    return out


def _read(copies, arenas, stage_bytes: int = 32 << 20) -> tuple[int, int]:
    reader = load_tp._Reader(copies, arenas, torch.device("cpu"), 2, stage_bytes)
    try:
        return reader.run()
    finally:
        reader.close()


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(torch.uint8)


def _simulate(path: Path, tp: int, backend: str | None = "flashinfer_cutlass", engine: str | None = None) -> None:
    inputs = pipeline.prepare(open_local(str(path)), engine, moe_backend=backend)
    rules = inputs.engine.tp_rules()
    assert not [f for f in tensor_parallel.check(inputs.manifest, inputs.config, (tp,), rules) if f.severity == "error"]
    plan = plan_load(pipeline.audit(inputs, AuditOptions(compare_versions=False)))
    single = load_path(str(path), engine, opts=LoadOptions(device="cpu"), moe_backend=backend)
    assert single.report.verdict == "clean"
    shards = {s.param.name: s.sharding for s in tensor_parallel.plan(inputs.manifest, inputs.config, tp, rules)}
    full = {p.name: p for p in plan.params}
    rebuilt = {n: torch.zeros_like(single.tensors[n]) for n in full}
    owned: dict[str, int] = {}
    for rank in range(tp):
        copies = load_tp.rank_copies(plan, shards, rank)
        local = tuple(msgspec.structs.replace(p, shape=shards[p.name].local_shape(p.shape)) for p in plan.params)
        arenas = Arenas(local, torch.device("cpu"), torch)
        for p in plan.params:
            for box in load_tp._padding(p, shards[p.name], rank):
                arenas.view(p.name, box).zero_()
        # slots of 256 bytes: large slices go in pieces, two slots alternate, two threads share the work
        _read(copies, arenas, stage_bytes=256)
        checked, bad = load_tp._verify(copies, arenas)
        assert checked and not bad
        assert not [n for n in arenas.poisoned() if not full[n].informational]
        for c in copies:
            owned[c.param] = owned.get(c.param, 0) + c.owned
        mine = arenas.tensors()
        for name, p in full.items():
            sh = shards[name]
            if sh.dim is None:
                if not p.informational:
                    assert torch.equal(_bytes(mine[name]), _bytes(single.tensors[name])), (rank, name)
                continue
            covered = 0
            for s, n, dst, _owner in sh.windows(rank):
                rebuilt[name].narrow(sh.dim, s, n).copy_(mine[name].narrow(sh.dim, dst, n))
                covered += n
            pad = mine[name].narrow(sh.dim, covered, mine[name].shape[sh.dim] - covered)
            assert not _bytes(pad).any(), (rank, name)  # vocabulary padding rows are zeros
    for name, p in full.items():
        if p.informational:
            continue
        assert owned.get(name) == torch.Size(p.shape).numel(), name  # each element owned by exactly one rank
        if shards[name].dim is not None:
            assert torch.equal(_bytes(rebuilt[name]), _bytes(single.tensors[name])), name


@pytest.mark.parametrize(
    "case,tp,backend",
    [
        ("nano3-bf16", 2, "flashinfer_cutlass"),
        ("nano3-bf16", 4, "flashinfer_cutlass"),
        ("nano3-nvfp4", 2, "flashinfer_cutlass"),
        ("h8b-groups1-vocab250", 2, "flashinfer_cutlass"),
        ("h8b-groups1-vocab250", 4, "flashinfer_cutlass"),
        # padded MoE windows (rank r from r × 128; the tiny experts fit rank 0, the other ranks hold zeros)
        ("nano3-bf16", 2, "flashinfer_trtllm"),
        ("nano3-nvfp4", 2, "flashinfer_trtllm"),
        ("nano3-nvfp4-i320", 2, "flashinfer_trtllm"),
    ],
)
def test_rank_cuts_reassemble_into_the_single_device_load(
    tmp_path, case, tp, backend, h8b_cfg, nano_cfg, nano_quant, generate
):
    if case == "nano3-bf16":
        path = _write_unique(generate, tmp_path, nano_cfg(), None)
    elif case == "nano3-nvfp4":
        path = _write_unique(generate, tmp_path, nano_cfg(True), nano_quant)
    elif case == "nano3-nvfp4-i320":  # 160 per rank pads to 256: rank 0 [0, 256), rank 1 [256, 320) + 192 zeros
        path = _write_unique(generate, tmp_path, nano_cfg(True, moe_intermediate_size=320), nano_quant)
    else:
        path = _write_unique(generate, tmp_path, h8b_cfg(n_groups=1, mamba_n_groups=1, vocab_size=250), None)
    _simulate(path, tp, backend)


@pytest.mark.parametrize("quantized", [False, True])
def test_vllm_rank_cuts_reassemble_into_the_single_device_load(tmp_path, quantized, nano_cfg, nano_quant, generate):
    """vLLM's windows (``tests/golden/tp/vllm-*``): ``routed_experts.w13`` on its rows, the rest as SGLang."""
    path = _write_unique(generate, tmp_path, nano_cfg(quantized), nano_quant if quantized else None)
    _simulate(path, 2, backend=None, engine="vllm@0.34.0")


def test_vllm_load_tp_on_two_gloo_ranks_and_the_narrowed_slot_refusal(tmp_path, nano_cfg, nano_quant, generate):
    path = _write_unique(generate, tmp_path / "nvfp4", nano_cfg(True), nano_quant)
    rep = load_tp.run(load_tp.Job(str(path), "nvfp4", 2, "cpu", engine=engines.parse("vllm@0.34.0"), threads=2))
    assert rep.verdict == "clean", [f.message for f in rep.findings]
    assert all(p.covered == p.elements for p in rep.params if not p.informational)
    # an expert slot vLLM narrows to a smaller tensor is not cut across ranks: a usage error, not a guess
    inputs = pipeline.prepare(open_local(str(path)), "vllm@0.34.0")
    plan = plan_load(pipeline.audit(inputs, AuditOptions(compare_versions=False)))
    op = next(o for o in plan.ops if o.param.endswith("w2_weight"))
    corner = replace(plan, ops=(op._replace(kind="corner", within=(1, 1)),))
    shards = {s.param.name: s.sharding for s in tensor_parallel.plan(inputs.manifest, inputs.config, 2)}
    with pytest.raises(UsageError, match="slot-narrowed"):
        load_tp.rank_copies(corner, shards, 0)


def test_omni_wrapper_partitions_reassemble():
    _simulate(EXAMPLES / "omni-nvfp4-24137", 2, backend="flashinfer_cutlass")


def test_readback_catches_a_wrong_window(tmp_path, nano_cfg, generate):
    path = _write_unique(generate, tmp_path, nano_cfg(), None)
    inputs = pipeline.prepare(open_local(str(path)), None, moe_backend="flashinfer_cutlass")
    plan = plan_load(pipeline.audit(inputs, AuditOptions(compare_versions=False)))
    shards = {s.param.name: s.sharding for s in tensor_parallel.plan(inputs.manifest, inputs.config, 2)}
    copies = load_tp.rank_copies(plan, shards, 1)
    # rank 1 reading rank 0's rows of the first row-split copy: the corners no longer match the file
    k = next(i for i, c in enumerate(copies) if c.src_box and c.src_box[0][0] > 0 and len(c.src_box) == 2)
    c = copies[k]
    n = c.src_box[0][1] - c.src_box[0][0]
    copies[k] = c._replace(src_box=((0, n),) + c.src_box[1:])
    local = tuple(msgspec.structs.replace(p, shape=shards[p.name].local_shape(p.shape)) for p in plan.params)
    arenas = Arenas(local, torch.device("cpu"), torch)
    _read(copies, arenas)
    copies[k] = c  # verify against where the bytes should have come from
    _, bad = load_tp._verify(copies, arenas)
    assert bad == {c.param: 2}


# ---------------------------------------------------------------------------
# (3) two real processes (gloo), and the refusal


@pytest.mark.parametrize("backend", ["flashinfer_cutlass", "flashinfer_trtllm"])
def test_two_gloo_ranks_agree_on_exact_coverage(tmp_path, backend, nano_cfg, nano_quant, generate):
    path = _write_unique(generate, tmp_path / "nvfp4", nano_cfg(True, moe_intermediate_size=320), nano_quant)
    rep = load_tp.run(load_tp.Job(str(path), "nvfp4", 2, "cpu", moe_backend=backend, threads=2))
    assert rep.verdict == "clean", [f.message for f in rep.findings]
    assert rep.backend == "gloo" and [s.rank for s in rep.ranks] == [0, 1]
    assert all(p.covered == p.elements for p in rep.params if not p.informational)
    single = load_path(str(path), opts=LoadOptions(device="cpu"), moe_backend=backend).report
    total = single.bytes_loaded
    # each rank places its slices plus the replicated tensors; together a little more than one copy
    # (the padded windows are uneven: rank 0 holds 256 of the 320 intermediates, rank 1 the other 64)
    assert all(0 < s.bytes_loaded < 0.9 * total for s in rep.ranks)
    if backend == "flashinfer_trtllm":
        assert rep.ranks[0].bytes_loaded > rep.ranks[1].bytes_loaded
    assert total <= rep.bytes_loaded < 1.25 * total
    # each rank reads exactly the bytes it places: column slices are gathered row window by row window
    assert all(s.bytes_read == s.bytes_loaded for s in rep.ranks)
    assert rep.samples_checked > 0 and rep.wall_seconds > 0


def test_load_cli_tp_json_and_refusal(tmp_path, h8b_cfg, generate):
    good = _write_unique(generate, tmp_path / "good", h8b_cfg(n_groups=1, mamba_n_groups=1, vocab_size=250), None)
    r = subprocess.run(
        [sys.executable, "-m", "nhcheck", "load", str(good), "--device", "cpu", "--tp", "2", "--format", "json", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["schema"] == "nhcheck.load-tp/1" and doc["summary"]["verdict"] == "clean" and len(doc["ranks"]) == 2
    emb = next(p for p in doc["params"] if p["name"] == "model.embed_tokens.weight")
    assert emb["covered"] == emb["elements"] == 250 * 64
    bad = tmp_path / "kv3"
    cfg = h8b_cfg(num_attention_heads=6, num_key_value_heads=3)
    generate.write_checkpoint(str(bad), generate.nemotron_h_tensors(cfg, None), cfg)
    r = CliRunner().invoke(cli, ["load", str(bad), "--device", "cpu", "--tp", "2", "--format", "json", "-q"])
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["summary"]["verdict"] == "refused" and not doc["ranks"]
    assert {f["code"] for f in doc["findings"]} == {"tp-indivisible"}
    r = CliRunner().invoke(cli, ["load", str(bad), "--device", "cuda:1", "--tp", "2"])
    assert r.exit_code == 2


# ---------------------------------------------------------------------------
# Checked against the released SGLang 0.5.23 (and 0.5.11) source: each test pins one discrepancy found
# by reading the engine (the function is named in the test), first failing, then fixed in nhcheck/tp.py.


def _as_released(config: dict, layers: dict) -> dict:
    """A MIXED recipe as NVIDIA ships one: in config.json too (SGLang >= 0.5.18's server-args override reads it
    there), and with an NVFP4 layer (here ``lm_head``, which no TP rule looks at), else SGLang >= 0.5.15
    resolves the recipe to w4afp8 (tests/conformance/startup_*)."""
    layers = dict(layers, lm_head={"quant_algo": "NVFP4", "group_size": 16})
    config["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "MIXED_PRECISION",
        "quantized_layers": layers,
    }
    return {
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers},
    }


def _mx_quant(config: dict) -> dict:
    """MIXED_PRECISION: MXFP8 (block [1, 32]) on the experts, the shared down_proj and every out_proj."""
    layers = {}
    for i, k in enumerate(config["hybrid_override_pattern"]):
        if k == "E":
            layers[f"backbone.layers.{i}.mixer.experts.0.up_proj"] = {"quant_algo": "MXFP8"}
            layers[f"backbone.layers.{i}.mixer.shared_experts.down_proj"] = {"quant_algo": "MXFP8"}
        elif k == "M":
            layers[f"backbone.layers.{i}.mixer.out_proj"] = {"quant_algo": "MXFP8"}
    return _as_released(config, layers)


def _block_quant(config: dict) -> dict:
    """MIXED_PRECISION: 128×128 block FP8 (FP8_PB_WO) on the experts only."""
    layers = {
        f"backbone.layers.{i}.mixer.experts.0.up_proj": {"quant_algo": "FP8_PB_WO"}
        for i, k in enumerate(config["hybrid_override_pattern"])
        if k == "E"
    }
    return _as_released(config, layers)


def test_mxfp8_linear_uses_block_k_32(nano_cfg):
    """Fp8LinearMethod.validate_block_quant_shapes with MXFP8's weight_block_size [1, 32]: a row-parallel
    input_size_per_partition must be a multiple of 32 (not 128); the manifest's MX scale is the uint8
    ``weight_scale_inv`` (Fp8LinearMethod.create_weights), so that is what tells MX from 128×128 blocks."""
    c = nano_cfg(True)
    q = _mx_quant(c)
    # out_proj: 128 / 2 = 64, shared down_proj: 64 / 2 = 32, both whole 32-blocks
    assert "fp8-block-linear" not in _rules(c, 2, q)
    got = _rules(c, 4, q)  # shared down_proj: 64 / 4 = 16 is not; out_proj 128 / 4 = 32 is
    assert {n.rsplit(".", 2)[0].split(".mixer.")[1] for n in got["fp8-block-linear"]} == {"shared_experts"}


def test_mxfp8_moe_uses_block_n_1_and_block_k_32_only_at_tp_gt_1(nano_cfg):
    """Fp8MoEMethod.create_fp8_moe_weight_ (layers/quantization/fp8.py): ``isp % block_n`` (1 for MXFP8)
    always, ``isp % block_k`` (32) only when moe_tp_size > 1."""
    c = nano_cfg(True, moe_intermediate_size=96)
    q = _mx_quant(c)
    assert "fp8-block-moe" not in _rules(c, 1, q)  # 96 % 128 != 0, but MXFP8's block_n is 1
    assert "fp8-block-moe" not in _rules(c, 3, q)  # 32 per rank
    assert "fp8-block-moe" in _rules(c, 2, q)  # 48 per rank: not a whole 32-block


def test_block_fp8_moe_checks_the_trtllm_padded_size(nano_cfg):
    """FusedMoE.__init__ rounds intermediate_size_per_partition up to 128 for flashinfer_trtllm before
    Fp8MoEMethod.create_weights runs (only NVFP4 pads later), so the 128-block check sees the padded size:
    no ValueError; at TP 1 rank 0's window starts at 0 and the load is right."""
    c = nano_cfg(True)  # moe_intermediate_size 32
    q = _block_quant(c)
    assert set(_rules(c, 1, q, backend="flashinfer_cutlass")) == {"fp8-block-moe"}  # 32 % 128
    assert _rules(c, 1, q, backend="flashinfer_trtllm") == {}
    assert _rules(c, 2, q, backend="flashinfer_trtllm") == {}  # padded windows: exact (tests/golden/tp/)


def test_nvfp4_moe_under_trtllm_is_a_padded_window_not_a_straddle(nano_cfg, nano_quant):
    """ModelOptNvFp4FusedMoEMethod.create_weights pads isp to 128 under flashinfer_trtllm before sizing
    w2 (isp // 2 bytes, isp // 16 scales): nothing straddles, and the padded windows partition the
    intermediates exactly (tests/golden/tp/)."""
    c = nano_cfg(True, moe_intermediate_size=34)  # 17 per rank at TP 2

    assert _rules(c, 2, nano_quant, backend="flashinfer_trtllm") == {}
    assert set(_rules(c, 2, nano_quant, backend="flashinfer_cutlass")) == {"nvfp4-moe-pair"}


def test_mamba_in_proj_bias_with_one_group_is_not_replicated(h8b_cfg):
    """MambaMixer2.__init__ (n_groups == 1, tp > 1) builds in_proj as a plain ColumnParallelLinear and swaps
    in mamba_v2_sharded_weight_loader for in_proj.weight and conv1d.weight/bias only: in_proj.bias keeps
    ColumnParallelLinear.weight_loader, whose last rank narrows past the end of the checkpoint tensor
    (the per-rank size counts the replicated groups) — a RuntimeError at load."""
    c = h8b_cfg(n_groups=1, mamba_n_groups=1, use_bias=True)
    got = _rules(c, 2)
    assert set(got) == {"mamba-groups-bias"}
    assert "model.layers.0.mixer.in_proj.bias" in got["mamba-groups-bias"]
    assert _rules(c, 1) == {}
    assert _rules(h8b_cfg(n_groups=2, mamba_n_groups=2, use_bias=True), 2) == {}  # merged loader: fine


def test_nvfp4_awq_pre_quant_scale_on_a_column_parallel_layer(nano_cfg):
    """ModelOptFp4LinearMethod.create_weights (NVFP4_AWQ) registers pre_quant_scale as a
    ModelWeightParameter with output_dim=0 and input_size_per_partition rows; on a ColumnParallelLinear
    that is the whole input, and load_column_parallel_weight (layers/parameter.py) narrows the checkpoint
    from tp_rank × that size: every rank ≥ 1 reads past the end (RuntimeError). Row-parallel layers cut
    it by input_dim=0, which is right."""
    c = nano_cfg(True)
    q = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4_AWQ", "group_size": 16}}
    m, cfg = _manifest(c, q)
    assert any(p.name.endswith("shared_experts.up_proj.pre_quant_scale") for p in m.params)
    got = _rules(c, 2, q)
    assert "nvfp4-awq-column" in got
    names = got["nvfp4-awq-column"]
    assert any(n.endswith("shared_experts.up_proj.pre_quant_scale") for n in names)
    assert not any("down_proj" in n or "out_proj" in n or "o_proj" in n for n in names)
    assert "nvfp4-awq-column" not in _rules(c, 1, q)
    shards = {s.param.name: s for s in tensor_parallel.plan(m, cfg, 2)}
    down = next(s for n, s in shards.items() if n.endswith("shared_experts.down_proj.pre_quant_scale"))
    assert down.sharding is not None and down.sharding.dim == 0  # input_dim=0: cut by rank


def test_mtp_draft_without_a_pattern_uses_the_default_attention_moe_layers(nano_cfg):
    """NemotronHConfig's mtp_layers_block_type defaults to ["attention", "moe"] (the manifest builds "*E");
    the TP planner must shard those layers too, not treat them as replicated."""
    c = nano_cfg(num_attention_heads=6, num_key_value_heads=3)
    cfg = parse_config(c)
    assert cfg.mtp_pattern == ""
    m = build_manifest(cfg, None, get_profile("sglang@0.5.23"), moe_backend="flashinfer_cutlass", mtp=True)
    rules = {pr.rule for s in tensor_parallel.plan(m, cfg, 2) for pr in s.problems}
    assert "attn-kv-heads" in rules
    shards = {s.param.name: s.sharding for s in tensor_parallel.plan(m, cfg, 4)}
    assert shards["model.layers.1.mixer.experts.w13_weight"].dim == 1


def test_one_group_rank_cuts_reassemble_at_tp_4_with_vocab_padding(tmp_path, h8b_cfg, generate):
    """mamba_v2_sharded_weight_loader with duplicate_groups (every rank takes group 0), QKV replication
    (one KV head held by all 4 ranks), vocab padded to 64 × tp: rebuilt exactly."""
    c = h8b_cfg(n_groups=1, mamba_n_groups=1, vocab_size=250, num_attention_heads=4, num_key_value_heads=1)
    _simulate(_write_unique(generate, tmp_path, c, None), 4)


def test_every_rule_is_documented_and_reported(h8b_cfg):
    doc = tensor_parallel.__doc__
    assert [r for r in tensor_parallel.RULES if f"``{r}``" not in doc] == []
    m, cfg = _manifest(h8b_cfg(n_groups=1, mamba_n_groups=1, use_bias=True), None)
    found = [f for f in tensor_parallel.check(m, cfg, (2,)) if f.code == "tp-indivisible"]
    assert len(found) == 1 and "in_proj.bias" in found[0].message and "MambaMixer2.__init__" in found[0].message


def test_default_lanes_share_the_hosts_cores_among_its_ranks(monkeypatch):
    """Each rank's reader lanes: at most 8, and no more than its share of the usable cores among the host's ranks
    (``LOCAL_WORLD_SIZE``): more threads than cores slowed the reads."""
    monkeypatch.setattr(load_tp, "usable_cores", lambda: 16)
    for ranks, lanes in ((None, 8), ("", 8), ("1", 8), ("2", 8), ("4", 4), ("8", 2), ("32", 1)):
        if ranks is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert load_tp.default_lanes() == lanes, ranks
    monkeypatch.setattr(load_tp, "usable_cores", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert load_tp.default_lanes() == 8
