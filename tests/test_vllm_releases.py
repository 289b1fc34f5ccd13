"""Which vLLM release the user means, and what nhcheck answers for it (``nhcheck.engines.vllm``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nhcheck import engines
from nhcheck.engines import vllm
from nhcheck.errors import UsageError
from nhcheck.pipeline import audit_path

EX = Path(__file__).parent.parent / "examples"


def test_release_list_is_in_index_order_and_the_table_is_a_subset():
    assert sorted(vllm.RELEASES_WITH_NEMOTRON_H, key=vllm.release_key) == list(vllm.RELEASES_WITH_NEMOTRON_H)
    assert len(vllm.RELEASES_WITH_NEMOTRON_H) == 42
    assert [p for p in vllm.EPOCHS if p.newest] == [vllm.PROFILES[vllm.NEWEST]]
    for version in vllm.PROFILES:
        assert engines.parse(f"vllm@{version}") == engines.EngineId("vllm", version)


def test_every_release_with_nemotron_h_is_answered_by_its_own_row():
    """0.9.1 – 0.10.0 were the last releases refused as unproven (sixth pass, EPOCHS.md): each now has a row, and the
    oldest answers with its own behaviour, not 0.10.1's."""
    assert set(vllm.PROFILES) == set(vllm.RELEASES_WITH_NEMOTRON_H)
    assert vllm.get_profile("vllm@0.9.1").epoch == "V1a" and vllm.get_profile("vllm@0.10.0").epoch == "V1b"
    assert engines.parse("vllm@0.9.1") == engines.EngineId("vllm", "0.9.1")


@pytest.mark.parametrize("version", ["0.8.5", "0.10.3", "0.33.1rc0"])
def test_releases_without_nemotron_h_are_a_usage_error(version):
    with pytest.raises(UsageError, match="is not a release with Nemotron-H"):
        engines.parse(f"vllm@{version}")


def test_a_newer_release_is_answered_as_the_newest_and_says_so():
    eid = engines.parse("vllm@0.40.0")
    assert eid.assumption and "answered with 0.34.0" in eid.assumption
    newer = audit_path(str(EX / "nano3-bf16"), "vllm@0.40.0")
    newest = audit_path(str(EX / "nano3-bf16"), "vllm@0.34.0")
    assert [r.outcome for r in newer.records] == [r.outcome for r in newest.records]
    assert any(f.code == "engine-assumed" and f.severity == "info" for f in newer.findings)


def test_24434_checkpoint_crashes_on_vllm_and_not_on_sglang():
    """The orphan expert scales SGLang >= 0.5.12 skips make every vLLM release raise at start-up."""
    ex = str(EX / "nano3-24434-leftover-expert-scales")
    assert audit_path(ex, "sglang@0.5.23").crash is None
    for version, error in (("0.13.0", "KeyError"), ("0.15.1", "KeyError"), ("0.24.0", "KeyError"),
                           ("0.26.0", "AttributeError: 'RoutedExperts'"),
                           ("0.34.0", "AttributeError: Layer model.layers.1.mixer.experts")):  # fmt: skip
        crash = audit_path(ex, f"vllm@{version}").crash
        assert crash is not None and crash.error.startswith(error) and ".experts." in (crash.tensor or "")


@pytest.mark.parametrize(
    ("version", "narrows"), [("0.17.0", False), ("0.18.1", False), ("0.19.0", True), ("0.20.0", True)]
)
def test_packed_expert_bytes_into_a_bf16_slot_load_silently_and_are_reported(version, narrows):
    """nano3_nvfp4_experts_excluded: up to 0.18.x FusedMoE raises on the packed tensor; from 0.19.0 it copies it
    into the slot's corner without a word — nhcheck says so (slot-narrowed). Goldens: 0.17.0, 0.18.0, 0.19.0."""
    case = str(Path(__file__).parent / "conformance" / "nano3_nvfp4_experts_excluded" / "checkpoint")
    report = audit_path(case, f"vllm@{version}")
    w = "backbone.layers.1.mixer.experts.0.down_proj.weight"
    assert {r.tensor.name: r.outcome.outcome for r in report.records}[w] == ("load" if narrows else "raise")
    narrowed = [f for f in report.findings if f.code == "slot-narrowed"]
    assert bool(narrowed) == narrows
    assert not narrowed or (narrowed[0].severity == "error" and "without an error" in narrowed[0].message)


@pytest.mark.parametrize(
    ("version", "trims"), [("0.18.1", True), ("0.22.1", True), ("0.23.0", False), ("0.34.0", False)]
)
def test_expert_tensor_longer_than_its_slot_is_cut_until_0_23(version, trims):
    """expert_sizes probes: an ``up_proj`` with more rows / a ``down_proj`` with more columns than the slot (the sharded
    dim) is narrowed to the slot and loads, its tail dropped, up to 0.22.x — reported; from 0.23.0 the loader takes
    the tensor's own extent and the copy raises. Goldens: 0.18.0, 0.19.0, 0.20.0, 0.22.0 / 0.23.0, 0.24.0, 0.34.0."""
    case = str(Path(__file__).parent / "conformance" / "expert_sizes" / "probe_expert_sizes_bf16" / "checkpoint")
    report = audit_path(case, f"vllm@{version}")
    outcome = {r.tensor.name: r.outcome.outcome for r in report.records}
    longer = ("backbone.layers.1.mixer.experts.0.up_proj.weight", "backbone.layers.1.mixer.experts.2.down_proj.weight")
    assert [outcome[n] for n in longer] == (["load", "load"] if trims else ["raise", "raise"])
    cut = {f.tensor for f in report.findings if f.code == "slot-narrowed" and "is cut to the" in f.message}
    assert cut == (set(longer) if trims else set())


def test_shards_are_read_in_natural_order(tmp_path):
    """vLLM sorts shard files naturally (model-2 before model-10); SGLang by name. The first raise follows."""
    src = Path(__file__).parent / "conformance" / "nano3_nvfp4_experts_excluded" / "checkpoint"
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    renames = {f: f"model-{n}.safetensors" for f, n in zip(files, (2, 10, 11, 12)[: len(files)], strict=False)}
    for old, new in renames.items():
        (dst / old).rename(dst / new)
    index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    first = next(r for r in audit_path(str(dst), "vllm@0.34.0").records if r.outcome.outcome == "raise")
    crash = audit_path(str(dst), "vllm@0.34.0").crash
    assert crash is not None and crash.shard == "model-2.safetensors"
    assert first.tensor.shard == "model-12.safetensors"  # first in name order: where SGLang's order would stop


def test_before_0_16_the_shard_order_is_the_hosts_and_nhcheck_says_so(tmp_path):
    """0.14.0 – 0.15.x read the shard files in glob order (the file system's): where raises lie in more than one
    shard, the first crash depends on the host; nhcheck answers in name order with an info naming the assumption.
    From 0.16.0 the order is vLLM's natural sort: no such note."""
    src = Path(__file__).parent / "conformance" / "nano3_bf16" / "checkpoint"
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for i, shard in enumerate(shards):  # one tensor per shard renamed to a name the model lacks
        name = next(k for k, v in index["weight_map"].items() if v == shard and k.endswith("norm.weight"))
        _rename_tensor(dst / shard, name, name.replace("norm.weight", f"bogus{i}.weight"))
        index["weight_map"][name.replace("norm.weight", f"bogus{i}.weight")] = index["weight_map"].pop(name)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    old = audit_path(str(dst), "vllm@0.14.0")
    assert old.crash is not None and old.crash.shard == shards[0]
    notes = [f for f in old.findings if f.code == "shard-order-assumed"]
    assert len(notes) == 1 and notes[0].severity == "info" and "file system's order" in notes[0].message
    new = audit_path(str(dst), "vllm@0.16.0")
    assert new.crash is not None and not [f for f in new.findings if f.code == "shard-order-assumed"]


def _rename_tensor(path: Path, old: str, new: str) -> None:
    """Rewrite one tensor name in a safetensors header (same data, header padded to 8 bytes)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[new] = header.pop(old)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def test_0_14_refuses_nvfp4_experts_in_the_default_environment():
    """0.14.0 – 0.15.x: Nemotron-H's non-gated MoE in ModelOpt NVFP4 needs FlashInfer's CUTLASS MoE, picked only with
    VLLM_USE_FLASHINFER_MOE_FP4=1 (goldens: every NVFP4 case refused at start-up on 0.14.0); 0.16.0 builds it."""
    report = audit_path(str(EX / "nano3-nvfp4"), "vllm@0.14.0")
    assert report.crash is not None and report.crash.tensor is None
    assert report.crash.error.startswith("NotImplementedError: Non-gated activations")
    env = [f for f in report.findings if f.code == "quant-config" and "VLLM_USE_FLASHINFER_MOE_FP4=1" in f.message]
    assert env and env[0].severity == "warning"
    assert audit_path(str(EX / "nano3-nvfp4"), "vllm@0.16.0").crash is None


def _tiny_cfg(pattern: str, **kw) -> dict:
    cfg = {
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hybrid_override_pattern": pattern,
        "num_hidden_layers": len(pattern), "hidden_size": 64, "vocab_size": 256, "mamba_num_heads": 8,
        "mamba_head_dim": 16, "n_groups": 8, "ssm_state_size": 16, "conv_kernel": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "n_routed_experts": 4,
        "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 64, "n_shared_experts": 1,
    }  # fmt: skip
    cfg.update(kw)
    return cfg


def test_before_0_11_1_the_model_build_refuses_nemotron_3_configs():
    """0.10.1 – 0.10.2's layers read ``rms_norm_eps`` (Nemotron 3 configs carry ``layer_norm_epsilon``) and have no
    ``E`` layers; 0.11.1 on builds both (goldens: every Nemotron 3 case on 0.10.1.1 and 0.10.2; h8b_dense loads)."""
    for version in ("0.10.1", "0.10.1.1", "0.10.2"):  # goldens 0.10.1.1 and 0.10.2
        crash = audit_path(str(EX / "nano3-bf16"), f"vllm@{version}").crash
        assert crash is not None and crash.tensor is None
        assert crash.error == "AttributeError: 'NemotronHConfig' object has no attribute 'rms_norm_eps'"
    assert audit_path(str(EX / "nano3-bf16"), "vllm@0.11.2").crash is None
    assert audit_path(str(EX / "h8b-dense"), "vllm@0.10.2").verdict == "clean"  # v1 configs carry rms_norm_eps
    from nhcheck.engines.vllm_manifest import build_manifest
    from nhcheck.model import parse_config
    from nhcheck.quant import parse_quant

    v2 = vllm.PROFILES["0.10.2"]
    moe = build_manifest(parse_config(_tiny_cfg("ME*-", rms_norm_eps=1e-5)), None, v2, release="0.10.2")
    assert moe.problems == ("KeyError: 'E'",) and not moe.params
    dense_cfg = build_manifest(parse_config(_tiny_cfg("M*-", rms_norm_eps=1e-5)), None, v2, release="0.10.2")
    assert dense_cfg.params and not dense_cfg.problems
    # the Mamba in_proj is one ColumnParallelLinear before 0.11.0: one FP8 scale, not one per fused part
    fp8 = {"quant_method": "modelopt", "quant_algo": "FP8"}
    cfg = parse_config(_tiny_cfg("M*-", rms_norm_eps=1e-5, quantization_config=fp8))
    qc = parse_quant(_tiny_cfg("M*-", quantization_config=fp8), None)
    shapes = {p.name: p.shape for p in build_manifest(cfg, qc, v2, release="0.10.2").params}
    assert shapes["model.layers.0.mixer.in_proj.input_scale"] == (1,)
    shapes = {p.name: p.shape for p in build_manifest(cfg, qc, vllm.PROFILES["0.11.2"], release="0.11.2").params}
    assert shapes["model.layers.0.mixer.in_proj.input_scale"] == (5,)


def test_a_refused_vllm_start_up_names_no_moe_backend():
    """vLLM's MoE backend changes no parameter (``--moe-backend`` is refused for vLLM), so no vLLM manifest, built
    or refused at start-up, names, asks or assumes one: no SGLang-worded ``moe-backend-assumed`` note."""
    for version, example in (("0.9.2", "nano3-bf16"), ("0.14.0", "nano3-nvfp4"), ("0.11.2", "nano3-nvfp4")):
        report = audit_path(str(EX / example), f"vllm@{version}")
        assert report.crash is not None and report.crash.tensor is None  # refused before load_weights
        assert (report.manifest.moe_backend, report.manifest.moe_backend_requested) == ("", "")
        assert not [f for f in report.findings if f.code == "moe-backend-assumed"]
    built = audit_path(str(EX / "nano3-nvfp4"), "vllm@0.34.0")
    assert built.crash is None and built.manifest.moe_backend == ""


def test_nvfp4_experts_of_the_non_gated_moe_are_refused_before_0_12_0():
    """0.11.x ``FusedMoE`` takes only unquantized or FP8 experts for a non-gated MoE (golden nano3_nvfp4, 0.11.2)."""
    for version in ("0.11.1", "0.11.2"):
        crash = audit_path(str(EX / "nano3-nvfp4"), f"vllm@{version}").crash
        assert crash is not None and crash.tensor is None and crash.error.startswith("NotImplementedError: is_act")
    assert audit_path(str(EX / "nano3-nvfp4"), "vllm@0.12.0").crash is None


def test_top_level_mtp_tensors_raise_before_0_13_0():
    """0.13.0 builds ``AutoWeightsLoader(skip_prefixes=["mtp"])``; 0.10.2 – 0.12.0 have no such child (goldens)."""
    from nhcheck.engines.vllm import map_name

    assert map_name("mtp.layers.0.eh_proj.weight", vllm.PROFILES["0.13.0"], False) == (None, None)
    for version in ("0.10.2", "0.11.2", "0.12.0"):
        assert (
            map_name("mtp.layers.0.eh_proj.weight", vllm.PROFILES[version], False)[0] == "mtp.layers.0.eh_proj.weight"
        )
    probe = Path(__file__).parent / "conformance" / "probes" / "probe_nano3_bf16" / "checkpoint"
    rows = {r.tensor.name: r.outcome for r in audit_path(str(probe), "vllm@0.12.0").records}
    o = rows["mtp.layers.0.eh_proj.weight"]
    assert (
        o.outcome == "raise"
        and o.message == "ValueError: There is no module or parameter named 'mtp' in NemotronHForCausalLM"
    )


def test_latent_moe_before_0_13_0_is_answered_from_the_code_and_says_so():
    from nhcheck.engines.vllm_manifest import build_manifest
    from nhcheck.model import parse_config

    cfg = parse_config(_tiny_cfg("ME*-", moe_latent_size=16))
    old = build_manifest(cfg, None, vllm.PROFILES["0.12.0"], release="0.12.0")
    new = build_manifest(cfg, None, vllm.PROFILES["0.13.0"], release="0.13.0")
    assert not any("latent" in p.name for p in old.params) and any("fc1_latent_proj" in p.name for p in new.params)
    w13 = {p.name: p.shape for p in old.params}["model.layers.1.mixer.experts.w13_weight"]
    assert w13[-1] == 64  # hidden_size, not the latent width
    assert any("does not read moe_latent_size" in p for p in old.problems) and not new.problems


DENSE = Path(__file__).parent / "conformance" / "dense_probes"


@pytest.mark.parametrize("probe", ["probe_nested_fp8", "probe_nested_nvfp4", "probe_nested_fp4method_nvfp4"])
def test_config_json_nested_modelopt_form_is_read_from_0_10_0_on(probe):
    """From 0.10.0 ModelOpt's ``from_config`` reads config.json's nested ``quantization_config`` (its
    ``quantization`` section, ``exclude_modules`` there): every release builds what the flat form of the same recipe
    builds (``ignore`` = the section's ``exclude_modules``); 0.9.x read that form with their own rules
    (``nested_only_recipe``). Goldens ``dense_probes/probe_nested_*`` (0.16.0 – 0.34.0)."""
    from nhcheck.model import parse_config
    from nhcheck.quant import parse_quant

    config = json.loads((DENSE / probe / "checkpoint" / "config.json").read_text())
    section = config["quantization_config"]["quantization"]
    flat = dict(config, quantization_config=dict(quant_method="modelopt", **section, ignore=section["exclude_modules"]))
    del flat["quantization_config"]["exclude_modules"]
    for profile in vllm.EPOCHS:
        if not profile.modelopt_flat_form:
            continue
        engine = engines.get(engines.parse(f"vllm@{profile.version}"))
        nested = engine.build_manifest(parse_config(config), parse_quant(config, None))
        assert not nested.problems, (profile.version, nested.problems)
        assert nested.params == engine.build_manifest(parse_config(flat), parse_quant(flat, None)).params
        assert nested.quantization == ("modelopt" if section["quant_algo"] == "FP8" else "modelopt_fp4")


def test_an_unexcluded_lm_head_is_quantized_from_0_23_0():
    """ModelOpt's configs give ``ParallelLMHead`` a quant method from 0.23.0 (``modelopt_lm_head``): an lm_head the
    recipe does not exclude is FP8 / NVFP4 there, bf16 before, and its scales have nowhere to go (goldens
    ``dense_probes/probe_lmhead_*``, 0.16.0 – 0.34.0). 0.9.x refuse the flat recipe."""
    for profile in vllm.EPOCHS:
        if not profile.modelopt_flat_form:
            continue
        report = audit_path(str(DENSE / "probe_lmhead_fp8" / "checkpoint"), f"vllm@{profile.version}")
        lm = {p.name: p for p in report.manifest.params if p.name.startswith("lm_head.")}
        quantized = vllm.release_key(profile.version) >= vllm.release_key("0.23.0")
        assert (lm["lm_head.weight"].dtype == "float8_e4m3fn") == quantized, profile.version
        assert ("lm_head.weight_scale" in lm) == quantized
        outcome = {r.tensor.name: r.outcome for r in report.records}["lm_head.weight_scale"]
        assert (outcome.outcome, outcome.param) == (("load", "lm_head.weight_scale") if quantized else ("raise", None))
