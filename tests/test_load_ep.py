"""``load --tp N --ep``: vLLM's ``--enable-expert-parallel`` on real bytes, against vLLM's own rank maps.

For every EP rank map vLLM recorded (``tests/golden/tp/vllm-*/*-tp2-ep.json.gz``: the oracle's ``hybrid``,
``latentpad``, ``moe255``, ``moe272`` and the uneven 5-expert ``moe5e`` checkpoints, BF16 / FP8 / NVFP4, vLLM
0.11.2 – 0.15.1, 0.19.0, 0.24.0, 0.28.0, 0.33.0, 0.34.0), the same checkpoint is written with real random tensors
and each rank's partition is loaded with ``load --tp``'s own cutting and reader. Every element of every rank's
parameters must be what vLLM put there — the checkpoint element its map names (cast to the parameter's dtype,
``A = -exp(A_log)``) or its zero fill — so the experts a rank holds, whole, and the attention / Mamba /
shared-expert / vocabulary slices under EP are vLLM's. Then two gloo processes load with ``--ep`` (the coverage
all-reduce: every element written once), a missing expert is reported for the rank that owns it, and releases
without EP maps are refused in one line.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path

import msgspec
import pytest
import torch
from click.testing import CliRunner
from goldens import read_golden
from safetensors.torch import save_file
from tensors import distinct

from nhcheck import engines, pipeline, report
from nhcheck import tp as tensor_parallel
from nhcheck.audit import AuditOptions
from nhcheck.checkpoint import open_local
from nhcheck.cli import cli
from nhcheck.errors import UsageError
from nhcheck.load import Arenas, plan_load
from nhcheck.load import tp as load_tp

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tp"
sys.path.insert(0, str(ROOT / "oracle" / "sglang_tp"))
import ckpt  # noqa: E402  (the checkpoint descriptions the oracle ran: tensor names, shapes, dtypes)


def _built_and_loaded(path: Path) -> bool:
    """A map of a model the release built and loaded whole: 0.11.2 and 0.14.0 refuse NVFP4 experts at build, 0.12.0
    has no latent MoE (its experts' tensors fail at TP 1 already); tests/test_tp_golden.py checks nhcheck on those."""
    doc = read_golden(path.with_suffix(""))
    return "construct_error" not in doc and not doc.get("load_errors")


EP_CASES = sorted(
    (d.name, f.name.removesuffix(".json.gz"))
    for d in GOLDEN.glob("vllm-*")
    for f in d.glob("*-tp2-ep.json.gz")
    if _built_and_loaded(f)
)
_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn}


@cache
def _golden(release: str, name: str) -> tuple[dict, dict]:
    doc = read_golden(GOLDEN / release / f"{name}.json")
    return doc, read_golden(GOLDEN / release / f"{name.removesuffix('-tp2-ep')}-tp1.json")


def _write(root: Path, doc1: dict, quant: str, drop: str | None = None) -> dict[str, torch.Tensor]:
    """The oracle's checkpoint (its config as run, ``ckpt.tensors``) with random values that never look like poison;
    ``drop``: a tensor left out. Returns the tensors written."""
    c = dict(doc1["config"])
    hq = ckpt.hf_quant_config(c, quant)
    if hq is not None:  # as the oracle wrote it: the flat ModelOpt section in config.json too
        section = hq["quantization"]
        c["quantization_config"] = dict(quant_method="modelopt", **section, ignore=section.get("exclude_modules", []))
        (root / "hf_quant_config.json").write_text(json.dumps(hq))
    g = torch.Generator().manual_seed(11)
    data = {}
    for name, shape, dtype in ckpt.tensors(doc1["config"], quant):
        if name == drop:
            continue
        data[name] = distinct(shape, dtype, g)
    save_file(data, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(c))
    return data


def _source(name: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """A map's source: one checkpoint tensor, or ``…experts.*.…`` — every expert's, stacked on a leading dim."""
    if "*" not in name:
        return data[name]
    pat = re.compile(re.escape(name).replace(r"\*", r"(\d+)") + "$")
    found = sorted((int(m.group(1)), t) for n, t in data.items() if (m := pat.match(n)))
    assert [e for e, _ in found] == list(range(len(found))), name
    return torch.stack([t for _, t in found])


def _expected(entry: dict, rank: int, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What vLLM holds in one parameter on ``rank``: every box of its map filled from the checkpoint; and where it
    wrote (False: a slot no checkpoint tensor fills, left at whatever memory held — vLLM 0.19.0's FP8 ``in_proj``
    scale vector past slot 0, ``q_scale``; the single-device load reports those); and how many elements came from
    the checkpoint (not zero fill)."""
    shape = tuple(entry.get("shape_per_rank", {}).get(str(rank), entry["shape"]))
    dtype = getattr(torch, entry["dtype"])
    out = torch.zeros(shape, dtype=dtype)
    written = torch.ones(shape, dtype=torch.bool)
    flat_out, flat_written = (out, written) if shape else (out.reshape(1), written.reshape(1))  # a 0-d map has 1 dim
    sourced = 0
    for b in entry["ranks"][str(rank)]:
        box = tuple(slice(a, z) for a, z in b["dst"])
        lens = [z - a for a, z in b["dst"]]
        if "fill" in b:
            if b["fill"] == "untouched":
                flat_written[box] = False
            continue
        src = _source(b["src"], data)
        sourced += torch.Size(lens).numel()
        dims = b.get("map") or list(range(len(lens)))
        idx, shown = [], [1] * len(lens)
        for sd, start in enumerate(b["at"]):
            ix = torch.tensor(start)
            for di, m in enumerate(dims):
                if m == sd:
                    view = [1] * len(lens)
                    view[di] = shown[di] = lens[di]
                    ix = ix + torch.arange(lens[di]).reshape(view)
            idx.append(ix)
        vals = (src[tuple(idx)] if idx else src).reshape(shown).expand(lens)
        if b["src"].endswith("A_log"):
            vals = -torch.exp(vals.float())
        flat_out[box] = vals.to(dtype) if vals.dtype != dtype else vals
    return out, written, sourced


def _partitions(
    path: Path, release: str, untouched: frozenset[str] = frozenset()
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, int], object]:
    """Each rank's partition as ``load --tp 2 --ep`` cuts, reads and places it (in this process), with the
    elements each rank owns per parameter; read-backs checked against the file. Poison may stay only in an
    informational parameter or where vLLM's own TP-1 map leaves memory ``untouched`` (``untouched``: vLLM
    0.17.0 - 0.19.x write a scalar in_proj scale into slot 0 of its 5-slot vector only)."""
    inputs = pipeline.prepare(open_local(str(path)), f"vllm@{release}")
    plan = plan_load(pipeline.audit(inputs, AuditOptions(compare_versions=False)))
    rules = inputs.engine.tp_rules()
    shards = {s.param.name: s.sharding for s in tensor_parallel.plan(inputs.manifest, inputs.config, 2, rules, True)}
    informational = {p.name for p in plan.params if p.informational}
    out, owned = {}, {}
    for rank in range(2):
        copies = load_tp.rank_copies(plan, shards, rank)
        local = tuple(msgspec.structs.replace(p, shape=shards[p.name].local_shape(p.shape, rank)) for p in plan.params)
        arenas = Arenas(local, torch.device("cpu"), torch)
        for p in plan.params:
            for box in load_tp._padding(p, shards[p.name], rank):
                arenas.view(p.name, box).zero_()
        reader = load_tp._Reader(copies, arenas, torch.device("cpu"), 2, 4096)
        try:
            reader.run()
        finally:
            reader.close()
        checked, bad = load_tp._verify(copies, arenas)
        assert checked and not bad
        assert not [n for n in arenas.poisoned() if n not in informational | untouched]
        for c in copies:
            owned[c.param] = owned.get(c.param, 0) + c.owned
        out[rank] = arenas.tensors()
    return out, owned, inputs


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize(("release", "name"), EP_CASES)
def test_each_rank_holds_what_vllm_holds_under_expert_parallelism(tmp_path, release, name):
    doc, doc1 = _golden(release, name)
    assert doc["enable_expert_parallel"] and "construct_error" not in doc and not doc.get("load_errors")
    data = _write(tmp_path, doc1, doc["case"]["quant"])
    untouched = frozenset(
        n
        for params in doc1["families"].values()
        for n, e in params.items()
        if any(b.get("fill") == "untouched" for b in e["ranks"]["0"])
    )
    ranks, owned, inputs = _partitions(tmp_path, release.removeprefix("vllm-"), untouched)
    either = set(tensor_parallel.ep_global_scales(inputs.manifest))
    experts = inputs.config.n_routed_experts
    held = {0: tensor_parallel.ep_experts(experts, 2, 0), 1: tensor_parallel.ep_experts(experts, 2, 1)}
    seen = set()
    for params in doc["families"].values():
        for pname, entry in params.items():
            seen.add(pname)
            for r in (0, 1):
                (want, written, _), got = _expected(entry, r, data), ranks[r][pname]
                if pname in either and want.shape[0] == experts:
                    # vLLM picked a FlashInfer NVFP4 MoE backend here: every rank holds every expert's input
                    # scale. nhcheck places them per local expert (its tp-assumed note): the owner's rows.
                    want, written = want[held[r].start : held[r].stop], written[held[r].start : held[r].stop]
                assert got.shape == want.shape, (pname, r)
                got, want = got[written], want[written]
                if entry["dtype"] == "float32" and pname.endswith(".A"):
                    assert torch.allclose(got, want, rtol=1e-6, atol=0), (pname, r)
                else:
                    assert torch.equal(_bytes(got), _bytes(want)), f"{pname} rank {r}"
            if ".experts." in pname and pname not in either:
                # the experts vLLM gave each rank: the map's stacked source starts at the first expert it owns
                for r in (0, 1):
                    starts = {b["at"][0] for b in entry["ranks"][str(r)] if "*" in b.get("src", "")}
                    if starts:
                        assert starts == {held[r].start}, (pname, r, starts)
    # nhcheck allocates exactly the parameters vLLM has, and each element vLLM writes at TP 1 is owned by one rank
    assert seen == set(ranks[0])
    tp1 = {n: e for params in doc1["families"].values() for n, e in params.items()}
    for pname in seen - either:
        _, written, sourced = _expected(tp1[pname], 0, data)
        if not written.all() and sourced:
            # vLLM 0.17.0 - 0.19.0 write a scalar in_proj scale into slot 0 of its 5-slot vector only
            # (MergedColumnParallelLinear.weight_loader_v2: load_merged_column_weight(shard_id=0); nhcheck's
            # ``merged_scalar_every_slot``): the slot vLLM writes is compared above, the others stay poisoned.
            assert owned.get(pname, 0) >= sourced, pname
            continue
        assert owned.get(pname, 0) == sourced, pname


def test_the_uneven_split_gives_rank_0_one_expert_more():
    assert [list(tensor_parallel.ep_experts(5, 2, r)) for r in (0, 1)] == [[0, 1, 2], [3, 4]]
    assert [list(tensor_parallel.ep_experts(4, 2, r)) for r in (0, 1)] == [[0, 1], [2, 3]]
    assert [len(tensor_parallel.ep_experts(10, 4, r)) for r in range(4)] == [3, 3, 2, 2]


def test_two_gloo_ranks_with_ep_split_5_experts_3_to_2(tmp_path):
    _, doc1 = _golden("vllm-0.34.0", "moe5e-bf16-vllm-tp2-ep")
    _write(tmp_path, doc1, "bf16")
    job = load_tp.Job(str(tmp_path), "moe5e", 2, "cpu", engine=engines.parse("vllm@0.34.0"), threads=2, ep=True)
    rep = load_tp.run(job)
    assert rep.verdict == "clean", [f.message for f in rep.findings]
    assert rep.ep and [s.experts for s in rep.ranks] == [range(0, 3), range(3, 5)]
    assert all(p.covered == p.elements and not p.poisoned for p in rep.params if not p.informational)
    assert next(p for p in rep.params if p.name.endswith("w13_weight")).elements == 5 * 256 * 128
    # each rank reads exactly what it places: its own experts whole (3 and 2 of 5; w13 + w2 in bf16 an expert),
    # and its vocabulary rows (128 and 122 of 250, embedding and lm_head)
    assert all(s.bytes_read == s.bytes_loaded for s in rep.ranks)
    assert rep.ranks[0].bytes_loaded - rep.ranks[1].bytes_loaded == 2 * 256 * 128 * 2 + 2 * 6 * 128 * 2
    doc = report.tp_load_to_json(rep)
    assert doc["ep"] is True and [r["experts"] for r in doc["ranks"]] == [[0, 3], [3, 5]]
    lines = report.tp_rank_lines(rep)
    assert "experts 0–2" in lines[0] and "experts 3–4" in lines[1]
    assert report.tp_load_markdown(rep).startswith("### nhcheck load --tp 2 --ep:")


def test_a_missing_expert_is_reported_on_the_rank_that_owns_it(tmp_path):
    """NVFP4 on vLLM 0.19.0: expert 3's up_proj is gone; rank 1 owns experts 2-3, so its partition alone keeps
    poison. The input scales' placement is nhcheck's assumption about the GPU's MoE backend: an info note."""
    _, doc1 = _golden("vllm-0.19.0", "hybrid-nvfp4-vllm-tp2-ep")
    _write(tmp_path, doc1, "nvfp4", drop="backbone.layers.3.mixer.experts.3.up_proj.weight")
    job = load_tp.Job(str(tmp_path), "hybrid", 2, "cpu", engine=engines.parse("vllm@0.19.0"), threads=2, ep=True)
    rep = load_tp.run(job)
    assert rep.verdict == "incomplete" and [s.experts for s in rep.ranks] == [range(0, 2), range(2, 4)]
    w13 = next(p for p in rep.params if p.name.endswith("experts.w13_weight"))
    lost = 256 * 128 // 2  # one expert's packed NVFP4 up_proj
    assert (w13.elements - w13.covered, w13.poisoned, w13.poisoned_ranks) == (lost, lost, (1,))
    errors = [(f.code, f.message, f.tensor) for f in rep.findings if f.severity == "error"]
    # vLLM 0.19.0 writes the NVFP4 in_proj scalars into slot 0 only (nhcheck.slots), whatever the experts do
    slot0 = [e for e in errors if e[0] == "scale-slot0-only"]
    assert sorted(t.rsplit(".", 1)[-1] for _, _, t in slot0) == ["input_scale", "weight_scale_2"]
    assert all(".mixer.in_proj." in t and "vllm 0.20.0 and later fill every slot" in m for _, m, t in slot0)
    assert [e for e in errors if e not in slot0] == [
        (
            "param-partial",
            f"the ranks together leave {lost:,} of {4 * lost:,} elements unwritten, poison left in the partition of "
            "rank 1 only",
            "model.layers.3.mixer.experts.w13_weight",
        )
    ]
    assert [f.code for f in rep.findings if f.code == tensor_parallel.ASSUMED_CODE] == [tensor_parallel.ASSUMED_CODE]


@pytest.mark.parametrize(
    ("engine", "says"),
    [
        ("sglang@0.5.23", "--ep: nhcheck's expert-parallel placement is proven only for the vLLM releases with rank "
         "maps of it (oracle/vllm_tp --ep), not for this sglang release"),
        ("vllm@0.16.0", "--ep: nhcheck's expert-parallel placement is proven only for vllm 0.9.1, 0.9.2, 0.10.0, "
         "0.10.1, 0.10.1.1, 0.10.2, 0.11.0, 0.11.1, 0.11.2, 0.12.0, 0.13.0, 0.14.0, 0.14.1, 0.15.0, 0.15.1, 0.19.0, "
         "0.19.1, 0.24.0, 0.28.0, 0.33.0, 0.34.0 (oracle/vllm_tp --ep), not for this vllm release"),
        # a release newer than the table (answered with the newest row) has no rank maps of its own
        ("vllm@0.40.0", "load --tp: tensor parallelism on vllm 0.40.0 is not checked"),
        ("vllm@0.34.0", "--ep shards the experts over the TP ranks: give --tp too"),
    ],
)  # fmt: skip
def test_load_ep_refuses_releases_without_ep_rank_maps_in_one_line(tmp_path, engine, says):
    _, doc1 = _golden("vllm-0.34.0", "moe5e-bf16-vllm-tp2-ep")
    _write(tmp_path, doc1, "bf16")
    tp = [] if engine == "vllm@0.34.0" else ["--tp", "2"]
    r = CliRunner().invoke(cli, ["load", str(tmp_path), "--engine", engine, "--device", "cpu", *tp, "--ep"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and says in r.output, r.output
    # a patch release with a proven release's code is answered (vllm 0.19.1: TP_SAME_AS)
    inputs = pipeline.prepare(open_local(str(tmp_path)), "vllm@0.19.1")
    assert not [f for f in load_tp.static_findings(inputs, 2, True) if f.severity == "error"]
    with pytest.raises(UsageError, match="--ep"):
        load_tp.static_findings(pipeline.prepare(open_local(str(tmp_path)), "vllm@0.18.0"), 2, True)
