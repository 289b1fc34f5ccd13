"""``nhcheck prune``: the plan (what is safe to drop, and why), the writer (lossless, atomic,
streaming), the refusals, and the failure modes (killed run, full disk, unwritable output,
a source that changes under us).

Every test works on a copy of an example under tmp_path, so "the input is untouched" is
measured on files nothing else shares.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import mmap
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nhcheck import prune
from nhcheck.cli import cli
from nhcheck.errors import NhcheckError
from nhcheck.pipeline import audit_path
from nhcheck.prune import stream
from nhcheck.safetensors_header import read_shard, serialize_header

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CASE = "nano3-24434-leftover-expert-scales"
LEFTOVER = re.compile(
    r"backbone\.layers\.(1|49)\.mixer\.experts\.\d+\.(up|down)_proj\."
    r"(input_scale|weight_scale|weight_scale_2)"
)


# ---------------------------------------------------------------------------
# helpers


def copy_example(name: str, dest: Path) -> Path:
    shutil.copytree(EXAMPLES / name, dest)
    return dest


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def hashes(d: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree(d).items()}


def digest_of(entry: dict, data: bytes) -> str:
    """The digest a receipt shard entry should carry for ``data``: sha256 for a copy, BLAKE3 for a rewrite."""
    import blake3

    want = {"copy": "sha256", "link": "sha256", "rewrite": "blake3"}[entry["action"]]
    assert entry["digest"] == want and entry[{"sha256": "blake3", "blake3": "sha256"}[want]] is None
    return blake3.blake3(data).hexdigest() if want == "blake3" else hashlib.sha256(data).hexdigest()


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "400"}).invoke(cli, [str(a) for a in args])


def tensor_bytes(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    h = read_shard(str(path))
    raw = path.read_bytes()
    return {t.name: (t.dtype, t.shape, raw[t.start : t.end]) for t in h.tensors}


def temp_files(d: Path) -> list[str]:
    return [str(p) for p in d.rglob(prune.TMP_PREFIX + "*")]


def run_nhcheck(args: list[str], *, wrapper: str = "", env: dict | None = None, preexec=None, prefix: list[str] = ()):
    """Run the CLI in a subprocess; ``wrapper`` is Python run first (fault injection)."""
    code = wrapper + "\nimport sys\nfrom nhcheck.cli import cli\nsys.argv[0] = 'nhcheck'\ncli()\n"
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 24434 example and its pruned output for sglang@0.5.11, written once."""
    base = tmp_path_factory.mktemp("ref")
    src = copy_example(CASE, base / "src")
    before = hashes(src)
    res = invoke("prune", src, "--out", base / "out", "--engine", "sglang@0.5.11")
    assert res.exit_code == 0, res.stderr
    assert hashes(src) == before, "prune modified its input"
    return src, base / "out", tree(base / "out")


def assert_no_partial(out: Path, ref: dict[str, bytes]) -> None:
    """Every final-named file in ``out`` is complete; the index and receipt only after what they describe."""
    got = tree(out) if out.exists() else {}
    final = {k: v for k, v in got.items() if not os.path.basename(k).startswith(prune.TMP_PREFIX)}
    for name, data in final.items():
        assert data == ref[name], f"{name} is final-named but not complete"
    if "model.safetensors.index.json" in final:
        assert {k for k in ref if k not in (prune.RECEIPT_NAME,)} <= set(final), "index written before its shards"
    if prune.RECEIPT_NAME in final:
        assert set(final) == set(ref)


# ---------------------------------------------------------------------------
# plan


@pytest.mark.parametrize(
    "engine,outcome", [("sglang@0.5.11", "raise"), ("sglang@0.5.12", "skip"), ("sglang@0.5.23", "skip")]
)
def test_plan_drops_only_the_leftover_expert_scales(engine, outcome):
    rep = audit_path(str(EXAMPLES / CASE), engine)
    plan = prune.plan_prune(rep)
    assert plan.refusal is None
    assert len(plan.drops) == 144 and all(LEFTOVER.fullmatch(d.tensor.name) for d in plan.drops)
    assert {d.outcome for d in plan.drops} == {outcome}
    assert [g.count for g in plan.groups] == [24] * 6
    for g in plan.groups:
        assert g.name.startswith("backbone.layers.{1,49}.mixer.experts.{0…11}.")
        assert "loads unquantized into model.layers.{1,49}.mixer.experts.w" in g.reason and "(bfloat16)" in g.reason
    loaded = {r.tensor.name for r in rep.records if r.outcome.outcome == "load"}
    assert not loaded & plan.dropped_names
    # built once: execute and the re-audit test every tensor against it (a set per call was tensors × drops)
    assert plan.dropped_names is plan.dropped_names
    assert [s.action for s in plan.shards] == ["rewrite", "copy", "copy", "rewrite"]
    assert plan.bytes_saved == sum(d.tensor.nbytes for d in plan.drops) == sum(g.nbytes for g in plan.groups)


def test_plan_never_drops_load_bearing_scales(tmp_path, generate):
    """An orphan scale of a module the runtime keeps quantized makes prune refuse, not drop."""
    c = generate.nano3_tiny_config(quantized=True)
    q = generate.nano3_tiny_quant()
    tensors = generate.nemotron_h_tensors(c, q)
    module = next(n[: -len(".weight")] for n, d, _ in tensors if d == "U8" and ".experts." not in n)
    generate.write_checkpoint(str(tmp_path / "ck"), tensors + [(module + ".pre_quant_scale", "BF16", [64])], c, q)
    plan = prune.plan_prune(audit_path(str(tmp_path / "ck"), "sglang@0.5.23"))
    assert not plan.drops
    assert isinstance(plan.refusal, prune.UnsafeOrphans) and [g.name for g in plan.refusal.groups] == [
        module + ".pre_quant_scale"
    ]
    assert "keeps the module quantized" in plan.refusal.text and module in plan.refusal.text


def test_plan_drops_tensors_of_modules_absent_at_runtime(tmp_path, generate):
    c = generate.nano3_tiny_config()
    extra = [
        ("backbone.layers.0.mixer.gate_proj.weight", "BF16", [8, 64]),
        ("backbone.layers.60.mixer.in_proj.weight", "BF16", [8, 64]),
    ]
    generate.write_checkpoint(str(tmp_path / "ck"), generate.nemotron_h_tensors(c, None) + extra, c, None)
    plan = prune.plan_prune(audit_path(str(tmp_path / "ck"), "sglang@0.5.23"))
    assert plan.refusal is None
    assert sorted(d.tensor.name for d in plan.drops) == sorted(n for n, _, _ in extra)
    res = invoke("prune", tmp_path / "ck", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert audit_path(str(tmp_path / "out"), "sglang@0.5.23").verdict == "clean"


def test_shard_left_empty_is_omitted_and_other_files_kept(tmp_path, generate):
    c = generate.nano3_tiny_config()
    base = generate.nemotron_h_tensors(c, None)
    total = sum(generate.tensor_nbytes(d, s) for _, d, s in base)
    ck, out = tmp_path / "ck", tmp_path / "out"
    generate.write_checkpoint(
        str(ck),
        base + [("backbone.layers.60.mixer.in_proj.weight", "BF16", [total // 128, 64])],
        c,
        None,
        shards=2,
        extra_files={"modeling_nemotron_h.py": "# code\n", "README.md": "hi\n"},
    )
    (ck / "modeling_nemotron_h.py").chmod(0o755)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    index["producer"] = {"name": "someone else's key"}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [s.action for s in prune.plan_prune(audit_path(str(ck), "sglang@0.5.23")).shards] == ["copy", "omit"]
    res = invoke("prune", ck, "--out", out)
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00002.safetensors"]
    new = json.loads((out / "model.safetensors.index.json").read_text())
    assert new["producer"] == index["producer"] and set(new["weight_map"].values()) == {
        "model-00001-of-00002.safetensors"
    }
    assert new["metadata"]["total_size"] == total
    for name in ("modeling_nemotron_h.py", "README.md", "config.json"):
        assert (out / name).read_bytes() == (ck / name).read_bytes()
    assert (out / "modeling_nemotron_h.py").stat().st_mode & 0o777 == 0o755
    shards = json.loads((out / prune.RECEIPT_NAME).read_text())["shards"]
    assert shards[1] == {
        "name": "model-00002-of-00002.safetensors",
        "action": "omit",
        "tensors": 0,
        "dropped": 1,
        "bytes": 0,
        "sha256": None,
        "blake3": None,
        "digest": None,
        "digest_from": None,
    }


def test_non_utf8_file_name_is_copied_and_named_in_the_receipt(tmp_path):
    """A sidecar whose name is not UTF-8 is copied under the same bytes; the receipt keeps them as \\xNN."""
    ck, out = copy_example(CASE, tmp_path / "ck"), tmp_path / "out"
    odd = os.fsdecode(b"notes-\xff.txt")
    (ck / odd).write_bytes(b"odd\n")
    res = invoke("prune", ck, "--out", out)
    assert res.exit_code == 0, res.stderr
    assert (out / odd).read_bytes() == b"odd\n"
    assert "notes-\\xff.txt" in json.loads((out / prune.RECEIPT_NAME).read_text(encoding="utf-8"))["files"]


def test_refuses_quant_mismatch_and_names_the_version_that_loads_it(tmp_path):
    src = copy_example("omni-nvfp4-24137", tmp_path / "omni")
    before = hashes(src)
    res = invoke("prune", src, "--out", tmp_path / "out", "--engine", "sglang@0.5.11")
    assert res.exit_code == 1
    assert "prune refused: quantization mismatch on sglang@0.5.11" in res.stderr
    assert "Loads as is (audit clean): sglang@0.5.13 … 0.5.23." in res.stderr
    assert not (tmp_path / "out").exists()
    assert hashes(src) == before


def test_refuses_u8_experts_built_unquantized(tmp_path):
    """The conformance-style experts-excluded case: U8 expert weights into bf16 parameters everywhere."""
    res = invoke("prune", EXAMPLES / "nano3-nvfp4-experts-excluded", "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert "quantized (U8) bytes into the unquantized bfloat16 parameter" in res.stderr
    assert "No sglang version in nhcheck's table loads it as is" in res.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# the written output


def test_pruned_output_is_clean_on_every_version_and_lossless(reference):
    src, out, _ = reference
    for v in ("0.5.11", "0.5.12", "0.5.16", "0.5.23"):
        rep = audit_path(str(out), f"sglang@{v}")
        assert rep.counts()["orphans"] == 0 and rep.crash is None, v
        # what no prune can fix: before 0.5.16 the fused in_proj scales land in slot 0 only (nhcheck.slots)
        slot0 = {f.code for f in rep.findings if f.severity != "info"} == {"scale-slot0-only"}
        assert (rep.verdict, slot0) == (("incomplete", True) if v < "0.5.16" else ("clean", False)), v
    src_idx = json.loads((src / "model.safetensors.index.json").read_text())
    out_idx = json.loads((out / "model.safetensors.index.json").read_text())
    dropped = {n for n in src_idx["weight_map"] if LEFTOVER.fullmatch(n)}
    assert len(dropped) == 144
    assert list(out_idx["weight_map"].items()) == [(k, v) for k, v in src_idx["weight_map"].items() if k not in dropped]
    kept = {}
    for shard in sorted(out.glob("*.safetensors")):
        h = read_shard(str(shard))
        assert h.header_len % 8 == 0 and h.metadata == {"format": "pt"}
        s = read_shard(str(src / shard.name))
        assert [t.name for t in h.tensors] == [t.name for t in s.tensors if t.name not in dropped]
        a, b = tensor_bytes(src / shard.name), tensor_bytes(shard)
        for name, value in b.items():
            assert value == a[name], name
        kept.update(b)
    assert out_idx["metadata"]["total_size"] == sum(len(v[2]) for v in kept.values())
    for name in (
        "config.json",
        "hf_quant_config.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
    ):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_output_opens_with_safetensors(reference):
    np = pytest.importorskip("numpy")
    from safetensors import safe_open

    src, out, _ = reference
    with safe_open(str(out / "model-00001-of-00004.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        name = "backbone.layers.1.mixer.experts.0.up_proj.weight"
        assert name in f.keys()
        got = f.get_tensor("backbone.layers.1.mixer.gate.e_score_correction_bias")
    with safe_open(str(src / "model-00001-of-00004.safetensors"), "np") as f:
        assert np.array_equal(got, f.get_tensor("backbone.layers.1.mixer.gate.e_score_correction_bias"))


def test_receipt_hashes(reference):
    src, out, _ = reference
    r = json.loads((out / prune.RECEIPT_NAME).read_text())
    assert r["schema"] == "nhcheck.prune/1" and r["engine"] == "sglang@0.5.11"
    assert r["verification"]["ok"] and r["verification"]["verdict"] == "incomplete"  # slot 0 only on 0.5.11
    assert len(r["dropped"]) == 144
    src_tensors = {}
    for shard in src.glob("*.safetensors"):
        src_tensors.update({k: (v, shard.name) for k, v in tensor_bytes(shard).items()})
    for d in r["dropped"]:
        (dtype, shape, data), shard = src_tensors[d["name"]]
        assert (d["shard"], d["dtype"], tuple(d["shape"])) == (shard, dtype, shape)
        assert d["sha256"] == hashlib.sha256(data).hexdigest()
        assert d["outcome"] == "raise" and "KeyError" in d["reason"] and "unquantized" in d["reason"]
    assert [s["name"] for s in r["shards"]] == sorted(p.name for p in out.glob("*.safetensors"))
    for s in r["shards"]:
        assert s[s["digest"]] == digest_of(s, (out / s["name"]).read_bytes()) and s["digest_from"] == "computed"
    assert [s["action"] for s in r["shards"]] == ["rewrite", "copy", "copy", "rewrite"]
    assert [s["digest"] for s in r["shards"]] == ["blake3", "sha256", "sha256", "blake3"]
    assert r["verification"]["bytes_compared"] == sum((out / s["name"]).stat().st_size for s in r["shards"])


def test_dry_run_writes_nothing(tmp_path):
    res = invoke("prune", EXAMPLES / CASE, "--out", tmp_path / "out", "--engine", "sglang@0.5.23", "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert not (tmp_path / "out").exists()
    assert "backbone.layers.{1,49}.mixer.experts.{0…11}.down_proj.input_scale" in res.stdout
    assert "×24" in res.stdout and "3,264" in res.stdout and "144 tensor(s) dropped, 6,528 bytes saved." in res.stdout
    assert "dry run: nothing written" in res.stderr


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_refuses_to_write_in_place(tmp_path, where):
    src = copy_example(CASE, tmp_path / "a" / "ckpt")
    before = hashes(tmp_path / "a")
    out = {"same": src, "inside": src / "fixed", "parent": tmp_path / "a"}[where]
    res = invoke("prune", src, "--out", out, "--overwrite")
    assert res.exit_code == 2
    assert res.stderr.startswith("nhcheck: error: --out") and res.stderr.count("\n") == 1
    assert hashes(tmp_path / "a") == before


def test_non_empty_output_needs_overwrite(tmp_path, reference):
    _, _, ref = reference
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / f"{prune.TMP_PREFIX}123-x{prune.TMP_SUFFIX}").write_bytes(b"leftover")
    res = invoke("prune", EXAMPLES / CASE, "--out", out, "--engine", "sglang@0.5.11")
    assert res.exit_code == 2 and "not empty; pass --overwrite" in res.stderr
    res = invoke("prune", EXAMPLES / CASE, "--out", out, "--engine", "sglang@0.5.11", "--overwrite")
    assert res.exit_code == 0, res.stderr
    got = tree(out)
    assert got.pop("notes.txt") == b"mine"
    assert {k: v for k, v in got.items() if k != prune.RECEIPT_NAME} == {
        k: v for k, v in ref.items() if k != prune.RECEIPT_NAME
    }


@pytest.mark.parametrize("name", ["model-00009-of-00009.safetensors", "model-00002-of-00004.safetensors"])
def test_overwrite_refuses_shards_nhcheck_did_not_write(tmp_path, name):
    """--overwrite never deletes or replaces a *.safetensors it did not write (issue 16 item 8)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"someone else's weights")
    res = invoke("prune", EXAMPLES / CASE, "--out", out, "--engine", "sglang@0.5.11", "--overwrite")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert "no earlier nhcheck prune wrote" in res.stderr and name in res.stderr
    assert tree(out) == {name: b"someone else's weights"}


def test_overwrite_replaces_what_an_earlier_prune_wrote(tmp_path, reference, generate):
    """Shards an earlier prune wrote (its receipt lists them) are replaced or removed; nothing else is."""
    _, _, ref = reference
    c = generate.nano3_tiny_config()
    ck = tmp_path / "ck"
    generate.write_checkpoint(
        str(ck),
        generate.nemotron_h_tensors(c, None) + [("backbone.layers.60.mixer.in_proj.weight", "BF16", [8, 64])],
        c,
        None,
        shards=5,
    )
    out = tmp_path / "out"
    assert invoke("prune", ck, "--out", out).exit_code == 0
    earlier = json.loads((out / prune.RECEIPT_NAME).read_text())["shards"]
    assert [s["name"] for s in earlier] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "other.safetensors").write_bytes(b"not at the top level, not replaced")
    res = invoke("prune", EXAMPLES / CASE, "--out", out, "--engine", "sglang@0.5.11", "--overwrite")
    assert res.exit_code == 0, res.stderr
    got = tree(out)
    assert got.pop("notes.txt") == b"mine"
    assert got.pop("sub/other.safetensors") == b"not at the top level, not replaced"
    assert "model-00005-of-00005.safetensors" not in got  # the earlier run's, not rewritten: removed
    assert {k: v for k, v in got.items() if k != prune.RECEIPT_NAME} == {
        k: v for k, v in ref.items() if k != prune.RECEIPT_NAME
    }


def test_clean_checkpoint_writes_nothing_unless_asked(tmp_path):
    """Nothing to drop: say so, write nothing (not even --out), exit 0 (issue 16 item 7)."""
    src = copy_example("nano3-nvfp4", tmp_path / "src")
    before = hashes(src)
    res = invoke("prune", src, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert "Nothing to drop" in res.stdout and "Wrote nothing" in res.stderr and "--copy-anyway" in res.stderr
    assert (res.stdout + res.stderr).count("Nothing to drop") == 1  # said once: the plan, not again as the outcome
    assert not (tmp_path / "out").exists()
    assert hashes(src) == before


def test_clean_checkpoint_is_copied_or_linked_when_asked(tmp_path):
    src = copy_example("nano3-nvfp4", tmp_path / "src")
    res = invoke("prune", src, "--out", tmp_path / "copy", "--copy-anyway")
    assert res.exit_code == 0, res.stderr
    got = tree(tmp_path / "copy")
    receipt = json.loads(got.pop(prune.RECEIPT_NAME))
    assert got == tree(src) and receipt["dropped"] == []
    res = invoke("prune", src, "--out", tmp_path / "link", "--link")
    assert res.exit_code == 0, res.stderr
    receipt = json.loads((tmp_path / "link" / prune.RECEIPT_NAME).read_text())
    assert {s["action"] for s in receipt["shards"]} == {"link"}
    for s in receipt["shards"]:
        assert os.path.samefile(tmp_path / "link" / s["name"], src / s["name"])
        assert s["sha256"] == digest_of(s, (src / s["name"]).read_bytes())
    assert not os.path.samefile(tmp_path / "link" / "config.json", src / "config.json")


def test_metadata_null_and_header_order_preserved(tmp_path):
    src = copy_example(CASE, tmp_path / "src")
    shard = src / "model-00001-of-00004.safetensors"
    h = read_shard(str(shard))
    data = shard.read_bytes()[h.data_start :]
    entries = [(t.name, t.dtype, t.shape, t.start - h.data_start, t.end - h.data_start) for t in reversed(h.tensors)]
    shard.write_bytes(serialize_header(entries, None, True) + data)
    res = invoke("prune", src, "--out", tmp_path / "out", "--engine", "sglang@0.5.23")
    assert res.exit_code == 0, res.stderr
    raw = (tmp_path / "out" / shard.name).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    keys = list(header)
    assert keys[0] == "__metadata__" and header["__metadata__"] is None
    assert keys[1:] == [t.name for t in reversed(h.tensors) if not LEFTOVER.fullmatch(t.name)]
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_symlinked_sidecars(tmp_path):
    src = copy_example(CASE, tmp_path / "src")
    (src / "extra").mkdir()
    os.replace(src / "tokenizer_config.json", src / "extra" / "tok.json")
    os.symlink("extra/tok.json", src / "tokenizer_config.json")
    res = invoke("prune", src, "--out", tmp_path / "out", "--engine", "sglang@0.5.23")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "out" / "tokenizer_config.json"
    assert not out.is_symlink() and out.read_bytes() == (src / "extra" / "tok.json").read_bytes()
    assert (tmp_path / "out" / "extra" / "tok.json").read_bytes() == out.read_bytes()
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", src / "README.md")
    res = invoke("prune", src, "--out", tmp_path / "out2", "--engine", "sglang@0.5.23")
    assert res.exit_code == 2 and "symlink leading outside the checkpoint" in res.stderr
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_no_verify_still_hashes(tmp_path):
    res = invoke("prune", EXAMPLES / CASE, "--out", tmp_path / "out", "--no-verify", "--engine", "sglang@0.5.23")
    assert res.exit_code == 0, res.stderr
    r = json.loads((tmp_path / "out" / prune.RECEIPT_NAME).read_text())
    assert r["verification"] is None
    for s in r["shards"]:
        assert s[s["digest"]] == digest_of(s, (tmp_path / "out" / s["name"]).read_bytes())
    assert "not verified" in res.stderr


def test_verification_catches_a_lost_parameter(tmp_path):
    rep = audit_path(str(EXAMPLES / CASE), "sglang@0.5.23")
    plan = prune.plan_prune(rep)
    victim = next(
        r.tensor
        for r in rep.records
        if r.outcome.outcome == "load" and r.tensor.shard == "model-00001-of-00004.safetensors"
    )
    bad = dataclasses.replace(plan, drops=plan.drops + (prune.Drop(victim, "load", "test"),))
    result = prune.execute(bad, str(tmp_path / "out"))
    assert not result.verification.ok
    assert any("unfilled after pruning (was filled)" in p for p in result.verification.problems)
    assert result.receipt["verification"]["ok"] is False


def test_progress_reports_bytes(tmp_path):
    seen: dict[str, list[int]] = {}

    def progress(phase, n, total):
        seen.setdefault(phase, [0, total])[0] += n

    plan = prune.plan_prune(audit_path(str(EXAMPLES / CASE), "sglang@0.5.23"))
    prune.execute(plan, str(tmp_path / "out"), progress=progress)
    written = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert seen == {"copy": [written, written], "verify": [written, written]}


@pytest.mark.parametrize("fallback", ["sendfile", "buffered"])
def test_copy_fallbacks(tmp_path, monkeypatch, reference, fallback):
    _, _, ref = reference

    def no_cfr(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def no_sendfile(*a, **k):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "copy_file_range", no_cfr)
    if fallback == "buffered":
        monkeypatch.setattr(os, "sendfile", no_sendfile)
    src = copy_example(CASE, tmp_path / "src")
    plan = prune.plan_prune(audit_path(str(src), "sglang@0.5.11"))
    result = prune.execute(plan, str(tmp_path / "out"))
    assert result.verification.ok
    got = tree(tmp_path / "out")
    assert {k: v for k, v in got.items() if k != prune.RECEIPT_NAME} == {
        k: v for k, v in ref.items() if k != prune.RECEIPT_NAME
    }


# ---------------------------------------------------------------------------
# failures: killed, disk full, unwritable, source changing


KILLER = r"""
import os, signal
budget = int(os.environ.get("KILL_AFTER_BYTES", "-1"))
at_rename = int(os.environ.get("KILL_AT_RENAME", "0"))
_cfr, _pwrite, _replace = os.copy_file_range, os.pwrite, os.replace
renames = 0
def spend(count, write_part):
    global budget
    if budget >= 0:
        if count >= budget:
            if budget:
                write_part(budget)
            os.kill(os.getpid(), signal.SIGKILL)
        budget -= count
def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
    spend(count, lambda k: _cfr(src, dst, k, offset_src, offset_dst))
    return _cfr(src, dst, count, offset_src, offset_dst)
def pwrite(fd, data, offset):
    n = len(memoryview(data))
    spend(n, lambda k: _pwrite(fd, memoryview(data)[: k - k % 4096], offset))  # O_DIRECT: whole blocks
    return _pwrite(fd, data, offset)
def replace(a, b, **kw):
    global renames
    renames += 1
    if renames == at_rename:
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(a, b, **kw)
os.copy_file_range, os.pwrite, os.replace = copy_file_range, pwrite, replace
"""


@pytest.mark.parametrize(
    "env",
    [
        {"KILL_AFTER_BYTES": "0"},
        {"KILL_AFTER_BYTES": "300000"},
        {"KILL_AFTER_BYTES": "1300000"},
        {"KILL_AFTER_BYTES": "2200000"},
        {"KILL_AT_RENAME": "1"},
        {"KILL_AT_RENAME": "2"},
        {"KILL_AT_RENAME": "5"},
        {"KILL_AT_RENAME": "10"},
        {"KILL_AT_RENAME": "11"},
    ],
    ids=lambda e: "-".join(next(iter(e.items()))),
)
def test_killed_run_leaves_no_partial_file_and_rerun_completes(tmp_path, reference, env):
    src, _, ref = reference
    out = tmp_path / "out"
    r = run_nhcheck(["prune", src, "--out", out, "--engine", "sglang@0.5.11"], wrapper=KILLER, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert_no_partial(out, ref)
    res = invoke("prune", src, "--out", out, "--engine", "sglang@0.5.11", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert tree(out) == ref


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_file_size_limit_is_one_clean_line(tmp_path, reference):
    src, _, ref = reference
    out = tmp_path / "out"
    r = run_nhcheck(["prune", src, "--out", out, "--engine", "sglang@0.5.11"], preexec=_limit_file_size)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "file too large" in r.stderr and "temporary files removed" in r.stderr
    assert not temp_files(out)
    assert_no_partial(out, ref)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tiny tmpfs (needs root with CAP_SYS_ADMIN; skipped elsewhere)."""
    mounted = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield mount
    for p in mounted:
        subprocess.run(["umount", str(p)], capture_output=True)


def test_disk_full_is_one_clean_line(tmp_path, reference, tmpfs):
    src, _, ref = reference
    disk = tmpfs(tmp_path / "disk", "size=1m")
    res = invoke("prune", src, "--out", disk / "out", "--engine", "sglang@0.5.11")
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "no space left on device" in res.stderr
    assert not temp_files(disk)
    assert_no_partial(disk / "out", ref)


def test_read_only_output_is_one_clean_line(tmp_path, tmpfs):
    ro = tmpfs(tmp_path / "ro", "ro,size=1m")
    res = invoke("prune", EXAMPLES / CASE, "--out", ro / "out", "--engine", "sglang@0.5.11")
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "read-only file system" in res.stderr


def test_permission_denied_is_one_clean_line(tmp_path):
    """chmod does not bind root; as root, drop CAP_DAC_OVERRIDE with capsh so it does."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.skip("running as root and capsh is not available to drop CAP_DAC_OVERRIDE")
        prefix = [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if prefix:
            code = "\nimport sys\nfrom nhcheck.cli import cli\nsys.argv[0] = 'nhcheck'\ncli()\n"
            r = subprocess.run(
                [
                    *prefix,
                    "-c",
                    " ".join(map(_sh, [sys.executable, "-c", code, "prune", EXAMPLES / CASE, "--out", locked / "out"])),
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=120,
            )
        else:
            r = run_nhcheck(["prune", EXAMPLES / CASE, "--out", locked / "out"])
    finally:
        locked.chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "permission denied" in r.stderr.lower()
    assert not any(locked.iterdir())


def _sh(arg: object) -> str:
    return "'" + str(arg).replace("'", "'\\''") + "'"


@pytest.mark.parametrize("change", ["grows", "shrinks"])
def test_source_changing_size_mid_run(tmp_path, monkeypatch, change):
    src = copy_example(CASE, tmp_path / "src")
    plan = prune.plan_prune(audit_path(str(src), "sglang@0.5.11"))
    last = src / "model-00004-of-00004.safetensors"
    real = os.preadv
    calls = []

    def preadv(fd, buffers, offset, *flags):
        if not calls:
            with open(last, "r+b") as f:
                if change == "grows":
                    f.seek(0, 2)
                    f.write(b"\0" * 64)
                else:
                    f.truncate(last.stat().st_size // 2)
        calls.append(offset)
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(NhcheckError, match="changed") as info:
        prune.execute(plan, str(tmp_path / "out"))
    assert "model-00004-of-00004.safetensors" in str(info.value)
    assert not temp_files(tmp_path / "out")
    assert not (tmp_path / "out" / last.name).exists()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------------------
# the package's seams: refusals pinned word for word, the rule asks the engine, the read-back proves


def _refusal_case(tmp_path: Path, kind: str, generate) -> Path:
    c = generate.nano3_tiny_config(quantized=True)
    q = generate.nano3_tiny_quant()
    t = generate.nemotron_h_tensors(c, q)
    if kind == "unsafe":
        module = next(n[: -len(".weight")] for n, dt, _ in t if dt == "U8" and ".experts." not in n)
        t = t + [(module + ".pre_quant_scale", "BF16", [64]), ("backbone.layers.0.mixer.foo.bar", "BF16", [4])]
    if kind == "shape":
        t = [(n, dt, [s[0] * 2, *s[1:]] if n == "backbone.embeddings.weight" else s) for n, dt, s in t]
    if kind == "crash":
        q = {"producer": {"name": "modelopt"}}
        q["quantization"] = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {}}
    d = tmp_path / kind
    generate.write_checkpoint(str(d), t, c, q, shards=2)
    if kind == "structure":
        p = d / "model.safetensors.index.json"
        idx = json.loads(p.read_text())
        idx["weight_map"]["backbone.embeddings.weight"] = "model-00002-of-00002.safetensors"
        p.write_text(json.dumps(idx))
    return d


#: The CLI's refusal lines as the single-module prune printed them (captured before the package split).
REFUSALS = {
    "unsafe": (
        "nhcheck: prune refused: 1 tensor(s) sglang 0.5.23 does not load cannot be proven safe to drop, so the "
        "output would not load cleanly either:\n  backbone.layers.0.mixer.in_proj.pre_quant_scale ×1: load-bearing: "
        "the runtime keeps the module quantized (model.layers.0.mixer.in_proj.weight is uint8), never dropped\n"
    ),
    "structure": (
        "nhcheck: prune refused: the checkpoint's files disagree (index-wrong-shard: backbone.embeddings.weight: "
        "index maps it to model-00002-of-00002.safetensors but it is in model-00001-of-00002.safetensors); fix the "
        "index or shards first\n"
    ),
    "shape": (
        "nhcheck: prune refused: shape mismatch on sglang@0.5.23: backbone.embeddings.weight: BF16 [512, 64] but "
        "model.embed_tokens.weight expects [256, 64] here; dropping tensors cannot fix it\n"
    ),
    "crash": (
        "nhcheck: prune refused: sglang 0.5.23 fails while building the model (AttributeError: 'NemotronHConfig' "
        "object has no attribute 'quantization_config'); dropping tensors cannot fix the quant config\n"
    ),
}
REFUSAL_TYPES = {
    "unsafe": prune.UnsafeOrphans,
    "structure": prune.FilesDisagree,
    "shape": prune.ShapeMismatch,
    "crash": prune.BuildFails,
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refusals_are_typed_and_word_for_word(tmp_path, kind, generate):
    ck = _refusal_case(tmp_path, kind, generate)
    plan = prune.plan_prune(audit_path(str(ck), "sglang@0.5.23"))
    assert isinstance(plan.refusal, REFUSAL_TYPES[kind])
    res = invoke("prune", ck, "--out", tmp_path / "out", "--engine", "sglang@0.5.23")
    assert res.exit_code == 1 and res.stderr == REFUSALS[kind]
    assert not (tmp_path / "out").exists()
    with pytest.raises(NhcheckError, match="prune refused: " + re.escape(plan.refusal.text.splitlines()[0])):
        prune.execute(plan, str(tmp_path / "out"))


@pytest.mark.parametrize("case", ["nano3-24434-leftover-expert-scales", "omni-nvfp4-24137", "nano3-nvfp4"])
def test_every_tensor_the_engine_raises_on_is_dropped_or_refused(case):
    """The safety rule's promise, on every behaviour epoch: a plan that writes leaves no tensor the engine raises on."""
    from nhcheck import engines

    for name, versions in engines.epochs():  # every epoch of every engine (SGLang and vLLM)
        rep = audit_path(str(EXAMPLES / case), f"{name}@{versions[0]}")
        plan = prune.plan_prune(rep)
        raising = {r.tensor.name for r in rep.records if r.outcome.outcome == "raise"}
        assert plan.refusal is not None or raising <= plan.dropped_names, (name, versions[0])


def test_vllm_loader_refusals_are_never_dropped():
    """vLLM's own answer: a tensor whose parameter exists but whose shape the weight loader refuses
    (``loader``) is load-bearing; a name with no parameter (``keyerror``) may go."""
    from nhcheck import engines

    vllm = engines.get("vllm@0.34.0")
    assert vllm.unloaded_kind("loader") == "elsewhere" and vllm.unloaded_kind("keyerror") == "by-name"
    assert engines.get("sglang@0.5.23").unloaded_kind("not-found") == "by-name"
    rep = audit_path(str(EXAMPLES / CASE), "vllm@0.34.0")
    plan = prune.plan_prune(rep)
    assert not {r.tensor.name for r in rep.records if r.outcome.reason == "loader"} & plan.dropped_names


def test_safety_rule_asks_the_engine(monkeypatch):
    """What a replay branch means comes from ``Engine.unloaded_kind``: an engine that calls every drop
    "elsewhere" gets a refusal where SGLang's answers give 144 drops."""
    from nhcheck.engines.sglang import SGLangEngine

    rep = audit_path(str(EXAMPLES / CASE), "sglang@0.5.23")
    assert len(prune.plan_prune(rep).drops) == 144
    monkeypatch.setattr(SGLangEngine, "unloaded_kind", lambda self, reason: "elsewhere")
    plan = prune.plan_prune(rep)
    assert isinstance(plan.refusal, prune.UnsafeOrphans) and plan.refusal.tensors == 144
    assert "outside the language-model loader (expert-orphan)" in plan.refusal.text


def test_grouped_findings_carry_their_family():
    """Prune names a finding's tensors from structured fields, not by parsing the audit's message."""
    rep = audit_path(str(EXAMPLES / "nano3-nvfp4-experts-excluded"), "sglang@0.5.23")
    f = next(f for f in rep.findings if f.code == "quant-mismatch")
    assert f.count == 24 and f.family == "backbone.layers.{1,49}.mixer.experts.{0…11}.down_proj.weight"
    assert f.message.startswith(f"{f.family} ×{f.count}: ")
    assert f.to_json().keys() == {"severity", "code", "message", "shard", "tensor"}  # JSON schema unchanged


def _no_o_direct(monkeypatch):
    real = os.open

    def open_(path, flags, *a, **k):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("window", [stream.WINDOW, 3 * 4096], ids=["window", "small-windows"])
@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_written_bytes_are_read_back_and_proven(tmp_path, monkeypatch, reference, direct, window):
    """Same output with and without O_DIRECT; every written byte is compared after it reached the file.
    Small windows: each window finds its kept ranges by bisection, with ranges cut across windows."""
    _, _, ref = reference
    if not direct:
        _no_o_direct(monkeypatch)
    monkeypatch.setattr(stream, "WINDOW", window)
    plan = prune.plan_prune(audit_path(str(EXAMPLES / CASE), "sglang@0.5.11"))
    result = prune.execute(plan, str(tmp_path / "out"))
    got = tree(tmp_path / "out")
    assert {k: v for k, v in got.items() if k != prune.RECEIPT_NAME} == {
        k: v for k, v in ref.items() if k != prune.RECEIPT_NAME
    }
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert result.verification.bytes_compared == sum(p.stat().st_size for p in shards)
    for s in result.receipt["shards"]:
        assert s[s["digest"]] == digest_of(s, (tmp_path / "out" / s["name"]).read_bytes())


@pytest.mark.parametrize("cpus", [1, 2, 4, 64])
def test_window_memory_is_bounded_whatever_the_core_count(tmp_path, monkeypatch, reference, cpus):
    """Every window the streaming holds (each file's ring and read-back window, for as many files as it streams at
    once) fits in ``BUFFER_BYTES`` on any core count, and the output is the same. Small windows and a budget of the
    same twelve windows: four files of five windows each, as before the budget, would hold twenty."""
    _, _, ref = reference
    monkeypatch.setattr(stream, "usable_cores", lambda: cpus)
    monkeypatch.setattr(stream, "WINDOW", 64 << 10)
    monkeypatch.setattr(stream, "BUFFER_BYTES", 12 * (64 << 10))
    held: list[int] = []

    class Counting:
        """``mmap`` for ``stream``: every anonymous map it makes, counted."""

        def __getattr__(self, name):
            return getattr(mmap, name)

        @staticmethod
        def mmap(fileno, length, *args, **kwargs):
            if fileno == -1:
                held.append(length)
            return mmap.mmap(fileno, length, *args, **kwargs)

    monkeypatch.setattr(stream, "mmap", Counting())
    plan = prune.plan_prune(audit_path(str(EXAMPLES / CASE), "sglang@0.5.11"))
    prune.execute(plan, str(tmp_path / "out"))
    files = min(stream.MAX_FILES, cpus)
    assert len(held) == files * (stream.ring_windows(files) + 1)
    assert sum(held) <= stream.BUFFER_BYTES
    got = tree(tmp_path / "out")
    assert {k: v for k, v in got.items() if k != prune.RECEIPT_NAME} == {
        k: v for k, v in ref.items() if k != prune.RECEIPT_NAME
    }


def test_ring_windows_keep_the_budget_at_the_default_sizes():
    """At the shipped sizes: as many windows as ``RING`` where the budget allows, never fewer than two, and every
    file count up to ``MAX_FILES`` within ``BUFFER_BYTES`` (each file's ring and its read-back window)."""
    for files in range(1, stream.MAX_FILES + 1):
        ring = stream.ring_windows(files)
        assert 2 <= ring <= stream.RING
        assert files * (ring + 1) * stream.WINDOW <= stream.BUFFER_BYTES
    assert stream.ring_windows(1) == stream.RING


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_bytes_that_differ_on_disk_are_caught(tmp_path, monkeypatch, direct):
    """A write that lands different bytes than it was given (a faulty disk or driver) fails the read-back,
    although the hash, computed from the buffer, never saw the difference."""
    if not direct:
        _no_o_direct(monkeypatch)
    real = os.pwrite
    state = {"hit": False}

    def pwrite(fd, data, offset):
        view = memoryview(data)
        if not state["hit"] and len(view) > 100_000:
            state["hit"] = True
            bad = mmap.mmap(-1, len(view))  # page-aligned, as O_DIRECT needs
            bad[:] = view
            bad[50_000] ^= 0xFF
            return real(fd, bad, offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    plan = prune.plan_prune(audit_path(str(EXAMPLES / CASE), "sglang@0.5.11"))
    with pytest.raises(NhcheckError, match="differ from the source"):
        prune.execute(plan, str(tmp_path / "out"))
    assert state["hit"]
    assert not any((tmp_path / "out").rglob("*.safetensors")) and not temp_files(tmp_path / "out")


@pytest.mark.parametrize("fault", ["lost", "changed-after"])
@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_a_write_the_file_does_not_keep_is_caught(tmp_path, monkeypatch, direct, fault):
    """The read-back reads the file, not the buffer: a write that reports success but never lands
    (``lost``), or a byte of the file changed after the write returned (``changed-after``, what a
    device that stores something else looks like), fails the run; nothing final-named is left."""
    if not direct:
        _no_o_direct(monkeypatch)
    monkeypatch.setattr(stream, "WINDOW", 64 << 10)  # ~10 windows per example shard: hit one in the middle
    real = os.pwrite
    state = {"hit": False}

    def pwrite(fd, data, offset):
        n = len(memoryview(data))
        if state["hit"] or offset < 2 * stream.WINDOW:
            return real(fd, data, offset)
        state["hit"] = True
        if fault == "lost":
            return n
        done = real(fd, data, offset)
        other = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)  # a plain descriptor of the same file
        try:
            real(other, bytes([memoryview(data)[1234] ^ 0x5A]), offset + 1234)
        finally:
            os.close(other)
        return done

    monkeypatch.setattr(os, "pwrite", pwrite)
    plan = prune.plan_prune(audit_path(str(EXAMPLES / CASE), "sglang@0.5.11"))
    with pytest.raises(NhcheckError, match="differ from the source|shorter than what was written"):
        prune.execute(plan, str(tmp_path / "out"))
    assert state["hit"]
    assert not any((tmp_path / "out").rglob("*.safetensors")) and not temp_files(tmp_path / "out")


# ---------------------------------------------------------------------------
# digests: sha256 for copies (the Hub's LFS digest, taken from the Hub's own records where they name it),
# BLAKE3 for rewrites; every written byte read back and compared whatever the digest's origin


def hub_cache(src: Path, base: Path) -> Path:
    """``src`` laid out as the Hugging Face cache does: blobs named by their sha256, snapshot files linking there."""
    repo = base / "models--org--name"
    snap = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        os.link(p, blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    return snap


def count_hashers(monkeypatch) -> list[str]:
    made: list[str] = []
    real = stream.new_hasher

    def new_hasher(algorithm):
        made.append(algorithm)
        return real(algorithm)

    monkeypatch.setattr(stream, "new_hasher", new_hasher)
    return made


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_hub_cache_copies_take_the_blob_name_as_their_sha256(tmp_path, monkeypatch, reference, link):
    """A shard kept whole from the Hub cache is not hashed (its blob's name is its LFS sha256), yet its
    copy is read back and compared like any other; a linked one is not even read. Rewrites get BLAKE3."""
    _, _, ref = reference
    snap = hub_cache(EXAMPLES / CASE, tmp_path)
    made = count_hashers(monkeypatch)
    plan = prune.plan_prune(audit_path(str(snap), "sglang@0.5.11"))
    result = prune.execute(plan, str(tmp_path / "out"), link=link)
    assert made == ["blake3", "blake3"]  # the two rewritten shards only
    out = tmp_path / "out"
    assert {k: v for k, v in tree(out).items() if k != prune.RECEIPT_NAME} == {
        k: v for k, v in ref.items() if k != prune.RECEIPT_NAME
    }
    for s in result.receipt["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s[s["digest"]] == digest_of(s, data)
        kept = s["action"] in ("copy", "link")
        assert s["digest_from"] == ("hub-cache-blob" if kept else "computed")
        if kept:
            assert os.path.basename(os.path.realpath(snap / s["name"])) == s["sha256"]
    written = sum(s["bytes"] for s in result.receipt["shards"] if s["action"] != "link")
    assert result.verification.bytes_compared == written
    kept = "link" if link else "copy"
    assert [s["action"] for s in result.receipt["shards"]] == ["rewrite", kept, kept, "rewrite"]


@pytest.mark.parametrize("fault", ["altered", "lost"])
def test_hub_cache_copy_that_does_not_land_is_caught(tmp_path, monkeypatch, fault):
    """No digest is computed for a Hub-cache copy: the read-back alone must catch a write gone wrong."""
    snap = hub_cache(EXAMPLES / CASE, tmp_path)
    monkeypatch.setattr(stream, "WINDOW", 64 << 10)
    real = os.pwrite
    state = {"hit": False}

    def pwrite(fd, data, offset):
        if state["hit"] or offset < 2 * stream.WINDOW or "model-00002" not in os.readlink(f"/proc/self/fd/{fd}"):
            return real(fd, data, offset)
        state["hit"] = True
        if fault == "lost":
            return len(memoryview(data))
        bad = mmap.mmap(-1, len(memoryview(data)))
        bad[:] = memoryview(data)
        bad[777] ^= 0x01
        return real(fd, bad, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    plan = prune.plan_prune(audit_path(str(snap), "sglang@0.5.11"))
    with pytest.raises(NhcheckError, match="differ from the source|shorter than what was written"):
        prune.execute(plan, str(tmp_path / "out"))
    assert state["hit"]
    assert not any((tmp_path / "out").rglob("*.safetensors")) and not temp_files(tmp_path / "out")


def test_local_dir_download_metadata_names_the_sha256(tmp_path, monkeypatch):
    """``hf download --local-dir`` records each file's LFS sha256 (its etag): trusted while the file is not
    newer than the record, as huggingface_hub trusts it; otherwise the copy is hashed."""
    src = copy_example(CASE, tmp_path / "src")
    records = src / ".cache" / "huggingface" / "download"
    records.mkdir(parents=True)
    shard2, shard3 = "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"
    stamp = (src / shard2).stat().st_mtime + 5
    for name in (shard2, shard3):
        etag = hashlib.sha256((src / name).read_bytes()).hexdigest()
        (records / f"{name}.metadata").write_text(f"{'cd' * 20}\n{etag}\n{stamp}\n")
    os.utime(src / shard3, (stamp + 10, stamp + 10))  # modified after the download: not trusted
    made = count_hashers(monkeypatch)
    plan = prune.plan_prune(audit_path(str(src), "sglang@0.5.11"))
    result = prune.execute(plan, str(tmp_path / "out"))
    origin = {s["name"]: s["digest_from"] for s in result.receipt["shards"]}
    assert origin[shard2] == "hub-download-metadata" and origin[shard3] == "computed"
    assert sorted(made) == ["blake3", "blake3", "sha256"]
    for s in result.receipt["shards"]:
        assert s[s["digest"]] == digest_of(s, (tmp_path / "out" / s["name"]).read_bytes())


def test_rewrites_fall_back_to_sha256_without_blake3(tmp_path, monkeypatch):
    """Where the blake3 package cannot be imported a rewritten shard gets sha256, and its entry says so."""
    from nhcheck.prune import digest

    monkeypatch.setattr(digest, "_blake3", lambda: None)
    plan = prune.plan_prune(audit_path(str(EXAMPLES / CASE), "sglang@0.5.11"))
    result = prune.execute(plan, str(tmp_path / "out"))
    for s in result.receipt["shards"]:
        assert s["digest"] == "sha256" and s["blake3"] is None
        assert s["sha256"] == hashlib.sha256((tmp_path / "out" / s["name"]).read_bytes()).hexdigest()


def test_pruned_output_on_vllm_keeps_only_what_prune_cannot_fix(reference):
    """As on SGLang before 0.5.16: vLLM 0.17.0 – 0.19.x write the fused in_proj scales into slot 0 only
    (``nhcheck.slots``), which no dropped tensor changes — the output has no orphan and no crash on any vLLM
    release, and that error alone where the release has it."""
    _, out, _ = reference
    for v in ("0.16.0", "0.17.0", "0.19.1", "0.20.0", "0.34.0"):
        rep = audit_path(str(out), f"vllm@{v}")
        assert rep.counts()["orphans"] == 0 and rep.crash is None, v
        slot0 = {f.code for f in rep.findings if f.severity != "info"} == {"scale-slot0-only"}
        assert (rep.verdict, slot0) == (("incomplete", True) if v in ("0.17.0", "0.19.1") else ("clean", False)), v
    # ... and the releases prune names as loading the unpruned NVFP4 checkpoint as is leave those out
    plan = prune.plan_prune(audit_path(str(EXAMPLES / "nano3-nvfp4"), "vllm@0.19.0"))
    assert plan.refusal is None and plan.loads_as_is == ("vllm@0.16.0", "vllm@0.20.0 … 0.34.0")
