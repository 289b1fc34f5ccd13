"""nhcheck's TP rules against the rank maps SGLang's and vLLM's real loaders produced (tests/golden/tp/).

The maps were recorded by ``oracle/sglang_tp`` and ``oracle/vllm_tp`` (the engine's own
``init_distributed_environment`` and model-parallel groups on gloo ranks, the real modules and weight
loaders, tensors whose values encode their source coordinates): for every parameter and rank, which
checkpoint elements landed where and which positions were zero-filled. Here, for every TP size and release:

- where ``nhcheck.tp.plan`` gives a sharding, the local shape and every rank's contents it implies
  (its windows over the TP-1 layout, zero elsewhere) equal what SGLang put there, element by element;
- where nhcheck says a module cannot be sharded or loads wrong weights, the engine refused to build it,
  raised while loading it, or placed at least one of its parameters as something other than a partition
  of the checkpoint tensor; and every refusal or load error of the engine is a problem nhcheck names.
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from goldens import read_golden

from nhcheck import engines
from nhcheck import tp as tensor_parallel
from nhcheck.engines.sglang import PROFILES
from nhcheck.errors import UsageError
from nhcheck.manifest import build_manifest
from nhcheck.model import parse_config
from nhcheck.quant import parse_quant

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden" / "tp"
sys.path.insert(0, str(ROOT / "oracle" / "sglang_tp"))
import ckpt  # noqa: E402  (the checkpoint descriptions the oracle ran: configs, quant configs)

ZERO, UNTOUCHED, UNSET = -1, -2, -3
CASES = sorted(
    (d.name, f.name.removesuffix(".gz"))
    for d in GOLDEN.iterdir()
    if d.is_dir()
    for f in d.glob("*-tp*.json*")
    if not f.name.removesuffix(".gz").endswith("-tp1.json")
)


class _Keys:
    """One integer per checkpoint element: source tensor id << 40 | its flattened coordinates."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def expand(self, boxes: list[dict], shape: tuple[int, ...]) -> np.ndarray:
        arr = np.full(shape or (1,), UNSET, dtype=np.int64)
        for b in boxes:
            sl = tuple(slice(a, z) for a, z in b["dst"])
            if "fill" in b:
                arr[sl] = ZERO if b["fill"] == "zero" else UNTOUCHED
                continue
            nd, lens = len(b["dst"]), [z - a for a, z in b["dst"]]
            dims = b.get("map") or list(range(nd))
            flat = np.zeros([1] * nd, dtype=np.int64)
            for sd, start in enumerate(b["at"]):
                c = np.full([1] * nd, start, dtype=np.int64)
                for di, m in enumerate(dims):
                    if m == sd:
                        shp = [1] * nd
                        shp[di] = lens[di]
                        c = c + np.arange(lens[di]).reshape(shp)
                flat = flat * 4096 + c
            arr[sl] = (self.ids.setdefault(b["src"], len(self.ids)) << 40) + np.broadcast_to(flat, lens)
        return arr.reshape(shape) if shape else arr


def _source_rows(arr: np.ndarray) -> np.ndarray:
    """Per local row (dim 0), the checkpoint row its first element came from; -1 where nothing landed."""
    first = arr.reshape(arr.shape[0], -1)[:, 0] if arr.ndim else arr.reshape(1)
    flat = first & ((1 << 40) - 1)
    return np.where(first >= 0, flat // 4096 ** max(arr.ndim - 1, 0), -1)


def _claim(tp1: np.ndarray, sharding, local: tuple[int, ...], rank: int) -> np.ndarray:
    """What nhcheck says rank ``rank`` holds: its windows over the TP-1 layout, zero elsewhere."""
    if sharding.dim is None:
        return tp1.copy()
    out = np.full(local, ZERO, dtype=np.int64)
    d = sharding.dim
    for start, n, dst, _owner in sharding.windows(rank):
        src = [slice(None)] * tp1.ndim
        to = [slice(None)] * tp1.ndim
        src[d], to[d] = slice(start, start + n), slice(dst, dst + n)
        out[tuple(to)] = tp1[tuple(src)]
    return out


@cache
def _plan(release: str, name: str):
    doc = read_golden(GOLDEN / release / name)
    doc1 = read_golden(GOLDEN / release / re.sub(r"-tp\d+(-ep)?\.json$", "-tp1.json", name))
    case = doc["case"]
    c = doc1["config"]  # the variant the oracle ran (vLLM's goldens add variants of their own)
    if "hf_quant_config" in doc1:
        # the config files as the oracle wrote them (config.json with its quantization_config, flat or nested)
        hq = doc1["hf_quant_config"]
    elif (hq := ckpt.hf_quant_config(c, case["quant"])) is not None:
        # older maps record the model config only: the flat quantization_config ckpt.write added
        section = hq["quantization"]
        c = dict(
            c, quantization_config=dict(quant_method="modelopt", **section, ignore=section.get("exclude_modules", []))
        )
    cfg = parse_config(c)
    if "vllm_version" in doc:
        engine = engines.get(engines.parse(f"vllm@{doc['vllm_version']}"))
        manifest = engine.build_manifest(cfg, parse_quant(c, hq))
        rules = engine.tp_rules()
        ep = bool(doc.get("enable_expert_parallel"))
    else:
        manifest = build_manifest(
            cfg, parse_quant(c, hq), PROFILES[doc["sglang_version"]], moe_backend=doc1["moe_runner_backend"]
        )
        rules = engines.get(engines.parse(f"sglang@{doc['sglang_version']}")).tp_rules()
        ep = False
    shards = {s.param.name: s for s in tensor_parallel.plan(manifest, cfg, int(doc["tp"]), rules, ep)}
    # under EP, placed per local expert (nhcheck's assumption) or whole on every rank (a FlashInfer NVFP4 backend)
    either = set(tensor_parallel.ep_global_scales(manifest)) if ep else set()
    return doc, doc1, shards, either


def test_goldens_cover_both_releases_and_every_family() -> None:
    releases = {r for r, _ in CASES}
    assert {"sglang-0.5.11", "sglang-0.5.23", "vllm-0.19.0", "vllm-0.24.0", "vllm-0.34.0"} <= releases
    families = set()
    for release, name in CASES:
        families |= set(_plan(release, name)[0].get("families", {}))
    assert {"attn_qkv", "attn_o", "mamba_in_proj", "mamba_conv1d", "moe_experts", "moe_shared", "embed"} <= families


def _misaligned(doc: dict, doc1: dict, keys: _Keys, pname: str, ranks: dict[int, np.ndarray]) -> bool:
    """Whether a row-sharded companion of a linear weight (its bias, its block scale) holds, on some rank, other
    checkpoint rows than the weight does at the same local rows: a partition, but of the wrong rows."""
    weight = pname.rsplit(".", 1)[0] + ".weight"
    if weight == pname:
        return False
    w, w1 = ({n: e for fam in d["families"].values() for n, e in fam.items()}.get(weight) for d in (doc, doc1))
    if w is None or w1 is None:
        return False
    for r, got in ranks.items():
        mine = _source_rows(got)
        theirs = _source_rows(
            keys.expand(w["ranks"][str(r)], tuple(w.get("shape_per_rank", {}).get(str(r), w["shape"])))
        )
        if len(mine) == len(theirs) and not np.array_equal(mine, theirs):
            return True
    return False


@pytest.mark.parametrize(("release", "name"), CASES)
def test_rank_maps_match_the_engine(release: str, name: str) -> None:
    doc, doc1, shards, either = _plan(release, name)
    if "construct_error" in doc1:
        # Refused at TP 1 too (vLLM 0.16.0's ModelOpt MIXED_PRECISION): a start-up refusal, not a TP rule.
        assert "construct_error" in doc and not shards, doc1["construct_error"]
        return
    if "construct_error" in doc:
        # The engine refused to build the model at this TP size: nhcheck must say the size fails.
        assert any(s.problems for s in shards.values()), doc["construct_error"]
        return
    # a tensor that fails at TP 1 as well (vLLM 0.12.0 has no latent MoE: the latent experts' shapes never fit) is
    # the replay's per-tensor outcome, not a sharding rule
    at_tp1 = {n for errs in doc1.get("load_errors", {}).values() for n in errs}
    failing = {
        re.sub(r"^backbone\.", "model.", n)
        for errs in doc.get("load_errors", {}).values()
        for n in errs
        if n not in at_tp1
    }
    keys = _Keys()
    tp1_entries = {n: e for fam in doc1["families"].values() for n, e in fam.items()}
    lossy_modules: set[str] = set()
    flagged_modules: set[str] = set()
    for params in doc["families"].values():
        for pname, e in params.items():
            s = shards[pname]
            e1 = tp1_entries[pname]
            tp1 = keys.expand(e1["ranks"]["0"], tuple(e1["shape"]))
            ranks = {
                int(r): keys.expand(boxes, tuple(e.get("shape_per_rank", {}).get(r, e["shape"])))
                for r, boxes in e["ranks"].items()
            }
            if pname in either and all(np.array_equal(g, tp1) for g in ranks.values()):
                continue  # every rank holds all experts' input scales: the backend-dependent case nhcheck names
            if s.sharding is None:
                if s.problems:
                    flagged_modules.add(s.module)
                    placed = np.concatenate([g.reshape(-1) for g in ranks.values()])
                    real, want = placed[placed >= 0], tp1[tp1 >= 0].reshape(-1)
                    partition = np.isin(want, real).all() and np.isin(real, want).all()
                    if not partition or (placed == UNTOUCHED).any() or _misaligned(doc, doc1, keys, pname, ranks):
                        lossy_modules.add(s.module)
                continue
            for r, got in ranks.items():
                local = s.sharding.local_shape(tuple(e1["shape"]), r)
                held = tuple(e.get("shape_per_rank", {}).get(str(r), e["shape"]))
                assert tuple(local) == held, (pname, r, local, held)
                want = _claim(tp1, s.sharding, tuple(local), r)
                assert np.array_equal(got, want), f"{pname} rank {r}: {int((got != want).sum())} elements differ"
            # a sharding nhcheck calls fine loses nothing: every checkpoint element reaches some rank
            placed = np.concatenate([g.reshape(-1) for g in ranks.values()])
            assert np.isin(tp1[tp1 >= 0], placed).all(), f"{pname}: elements reach no rank, nhcheck says nothing"
    # Every module nhcheck calls wrong is placed wrongly by the engine too (never a false alarm) ...
    assert flagged_modules <= lossy_modules, sorted(flagged_modules - lossy_modules)
    # ... and every tensor the engine's loader raised on belongs to a module nhcheck calls wrong (no miss).
    assert all(any(n.startswith(m + ".") for m in flagged_modules) for n in failing), sorted(failing)


@pytest.mark.parametrize("version", sorted(r.removeprefix("vllm-") for r, n in CASES if n == "g1-nvfp4-vllm-tp2.json"))
def test_vllm_quantized_single_group_fails_where_the_release_says(version) -> None:
    """SGLang refuses n_groups 1 at TP > 1 for a quantized model in ``MambaMixer2.__init__``, as vLLM does before
    0.16.0; from 0.16.0 vLLM builds it and one of ``in_proj``'s scales raises while loading — which one, and how,
    is the release's (and its citation): the scalar ``input_scale`` (``IndexError``, from 0.32.0) or the NVFP4
    block scale (``RuntimeError``). 0.10.2 refuses every Nemotron 3 config (``rms_norm_eps``), so its v1-config twin
    answers: there the constructor refuses any quantized model at TP > 1 (``mamba-quant``), groups or not."""
    name = "g1-nvfp4-vllm-tp2.json"
    if "construct_error" in _plan(f"vllm-{version}", name)[1]:
        name = "v1g1-nvfp4-vllm-tp2.json"
    # 0.9.1 / 0.9.2 refuse config.json's flat ModelOpt form at start-up: their nested-form twins show the rule
    form = "-nested" if "construct_error" in _plan(f"vllm-{version}", name)[1] else ""
    name = name.replace("-vllm-", f"{form}-vllm-")
    doc, _, shards, _ = _plan(f"vllm-{version}", name)
    rules = engines.get(engines.parse(f"vllm@{version}")).tp_rules()
    if rules.quantized_mamba_refused:
        assert {p.rule for s in shards.values() for p in s.problems} == {"mamba-quant"}
        for quantized in ("v1-fp8", "v1-nvfp4", "v1g1-nvfp4"):
            messages = set(_plan(f"vllm-{version}", f"{quantized}{form}-vllm-tp2.json")[0]["construct_error"].values())
            assert messages == {"AssertionError: Tensor parallel currently not supported for quantized models."}
        assert rules.rule("mamba-quant").effect == "AssertionError at start-up"
        return
    effect = rules.rule("mamba-groups-quant").effect
    assert {p.rule for s in shards.values() for p in s.problems} == {"mamba-groups-quant"}
    assert tensor_parallel.SGLANG_RULES.rule("mamba-groups-quant").effect == "AssertionError at start-up"
    if "construct_error" in doc:
        messages = set(doc["construct_error"].values())
        assert all(m.startswith("AssertionError: Tensor parallel currently supported for quantized") for m in messages)
        assert effect == "AssertionError at start-up" and not rules.quantized_groups_at_load
        return
    errors = {n: e for per_rank in doc["load_errors"].values() for n, e in per_rank.items()}
    ((name, message),) = {n.removeprefix("backbone.layers.0.mixer."): e for n, e in errors.items()}.items()
    tensor, error = name, message.split(":")[0]
    assert (tensor, error) in {("in_proj.input_scale", "IndexError"), ("in_proj.weight_scale", "RuntimeError")}
    assert all(e.startswith(error) for e in errors.values())
    assert effect.startswith(f"{error} at load") and tensor in effect and rules.quantized_groups_at_load


#: The TP-1 maps of the releases whose maps record the config files the oracle wrote (``hf_quant_config``; from
#: vLLM 0.9.1 / 0.9.2 on, older maps record the model config only)
RECORDED_TP1 = sorted(
    (d.name, name)
    for d in GOLDEN.glob("vllm-*")
    for name in sorted({f.name.removesuffix(".gz") for f in d.glob("*-vllm-tp1.json*")})
    if "hf_quant_config" in read_golden(d / "hybrid-bf16-vllm-tp1.json")
)


@pytest.mark.parametrize(("release", "name"), RECORDED_TP1)
def test_vllm_manifest_is_what_the_engine_built(release: str, name: str) -> None:
    """At TP 1, nhcheck's manifest for the config files the oracle wrote (recorded in the map) holds the parameters
    the engine built — names, shapes, dtypes — or names the engine's own start-up error. For 0.9.1 / 0.9.2 this
    covers config.json's nested ModelOpt ``quantization_config`` (``*-nested-*``), the only form they read
    (``nested_only_recipe``: the config class by ``quant_method``, ``ModelOptFp8Config`` without an exclude list),
    and the flat form they refuse."""
    doc = read_golden(GOLDEN / release / name)
    c, hq = doc["config"], doc["hf_quant_config"]
    assert ("-nested-" in name) == ("quantization" in c.get("quantization_config", {}))
    engine = engines.get(engines.parse(f"vllm@{doc['vllm_version']}"))
    if doc["quant_config"] == "ModelOptFp8Config" and hq["quantization"]["quant_algo"] != "FP8":
        # quant_method "modelopt" on an NVFP4 recipe: ModelOptFp8Config takes it as an unserialized FP8 checkpoint
        # (bf16 linears without scales, the map's parameters); nhcheck says it does not model that build
        assert all(e["dtype"] != "uint8" for fam in doc["families"].values() for e in fam.values())
        with pytest.raises(UsageError, match="unserialized FP8 checkpoint .* not modelled"):
            engine.build_manifest(parse_config(c), parse_quant(c, hq))
        return
    manifest = engine.build_manifest(parse_config(c), parse_quant(c, hq))
    if "construct_error" in doc:
        (error,) = set(doc["construct_error"].values())
        # a refusal while VllmConfig is validated comes wrapped by pydantic: "Value error, <message> [type=..."
        wrapped = re.search(r"Value error, (.*) \[type=", error)
        assert not manifest.params
        assert manifest.problems[0] == (f"ValueError: {wrapped[1]}" if wrapped else error.split("\n")[0])
        return
    built = {n: (tuple(e["shape"]), e["dtype"]) for fam in doc["families"].values() for n, e in fam.items()}
    ours = {p.name: (p.shape, p.dtype) for p in manifest.params if not p.informational}
    assert ours.keys() == built.keys()
    for n, (shape, dtype) in ours.items():
        # the vocabulary rows are padded by the engine (``vocab-padding``), the manifest names the config's
        vocab = n in ("model.embed_tokens.weight", "lm_head.weight")
        assert (shape[vocab:], dtype) == (built[n][0][vocab:], built[n][1]), n
    names = {None: None, "ModelOptFp8Config": "modelopt", "ModelOptNvFp4Config": "modelopt_fp4"}
    assert manifest.quantization == names[doc["quant_config"]]


def test_every_proven_vllm_release_has_its_rank_maps() -> None:
    """``TP_PROVEN`` / ``EP_PROVEN`` are the releases with maps here; ``TP_SAME_AS`` points at one of them."""
    from nhcheck.engines import vllm

    have = {r for r, _ in CASES}
    ep = {r for r, n in CASES if n.endswith("-ep.json")}
    assert {f"vllm-{v}" for v in vllm.TP_PROVEN} == {r for r in have if r.startswith("vllm-")}
    assert {f"vllm-{v}" for v in vllm.EP_PROVEN} == ep
    assert set(vllm.TP_SAME_AS.values()) <= set(vllm.TP_PROVEN)
    assert set(vllm.TP_SAME_AS) <= set(vllm.RELEASES_WITH_NEMOTRON_H) - set(vllm.TP_PROVEN)


def test_vllm_tp_findings_only_for_proven_releases() -> None:
    """``audit --tp`` answers for vLLM releases with rank maps (their rules, their citations); others say so."""
    from nhcheck.pipeline import audit_path

    example = str(ROOT / "examples" / "nano3-nvfp4")
    proven = tensor_parallel.with_findings(audit_path(example, "vllm@0.34.0"), (3, 4))
    codes = {f.code for f in proven.findings if f.code.startswith("tp-")}
    assert "tp-unproven" not in codes and "tp-indivisible" in codes
    tp_errors = [f.message for f in proven.findings if f.code == "tp-indivisible"]
    assert all("[vllm " in m for m in tp_errors)
    # moe_intermediate_size 32 at TP 4: 8 per rank, not whole NVFP4 blocks of 16 (the moe272 / latentpad goldens)
    assert any(m.startswith("--tp 4") and "NVFP4 block" in m for m in tp_errors)
    from nhcheck.engines import vllm

    # every release that ships nemotron_h.py has rank maps, its own or a release's with the same code; a newer one,
    # answered with the newest row, has none
    assert all(vllm.tp_release(v) in vllm.TP_PROVEN for v in vllm.RELEASES_WITH_NEMOTRON_H)
    unmapped = "0.40.0"
    other = tensor_parallel.with_findings(audit_path(example, f"vllm@{unmapped}"), (3,))
    assert [f.code for f in other.findings if f.code.startswith("tp-")] == ["tp-unproven"]


def test_vllm_expert_parallel_lifts_the_expert_rules() -> None:
    """``--ep`` (vLLM ``--enable-expert-parallel``): experts are placed whole, so the MoE intermediate-size rules
    that fail at TP 4 without it are gone (the ``*-tp2-ep`` maps: moe255 builds, moe5e splits 3 + 2); the other
    rules stay. Only releases with EP rank maps answer; SGLang's ``--ep-size`` is not modelled."""
    from nhcheck.errors import UsageError
    from nhcheck.pipeline import audit_path

    example = str(ROOT / "examples" / "nano3-nvfp4")
    report = audit_path(example, "vllm@0.34.0")
    tp = [f.message for f in tensor_parallel.with_findings(report, (4,)).findings if f.code == "tp-indivisible"]
    ep = [
        f.message for f in tensor_parallel.with_findings(report, (4,), ep=True).findings if f.code == "tp-indivisible"
    ]
    assert any("experts" in m and "NVFP4 block" in m for m in tp)
    assert not any("experts:" in m for m in ep) and all(m.startswith("--tp 4 --ep: ") for m in ep)
    assert len(ep) == len([m for m in tp if "experts:" not in m])
    _, _, shards, _ = _plan("vllm-0.34.0", "moe5e-bf16-vllm-tp2-ep.json")
    w13 = shards["model.layers.0.mixer.experts.routed_experts.w13_weight"].sharding
    assert [w13.windows(r) for r in (0, 1)] == [((0, 3, 0, 0),), ((3, 2, 0, 1),)]
    for release in ("sglang@0.5.23", "vllm@0.29.0"):
        with pytest.raises(UsageError, match="--ep"):
            tensor_parallel.with_findings(audit_path(example, release), (2,), ep=True)
