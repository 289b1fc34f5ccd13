#!/usr/bin/env python3
"""Hostile and broken checkpoints, generated on demand (nothing binary is committed).

Every case starts from one small valid NVFP4 Nemotron-H checkpoint (4 layers ``ME*E``,
4 experts, KV scales, 2 shards; written by ``examples/generate.py``) and breaks one
thing. A case directory holds ``ckpt/`` (what the verbs are pointed at) and, for the
path-escape cases, ``outside/`` with a perfectly valid shard that must never be opened.

Each case carries its expected outcome, so tests and this script agree on one list:

* ``error``: nhcheck cannot run: exit 2, one line on stderr naming ``names`` and saying ``says``.
* ``findings``: the files parse, the problems are findings: exit 1 with these finding ``codes``.
* ``clean``: unusual but legitimate (a symlink inside the checkpoint, a Hugging Face cache snapshot).

Usage::

    python tests/corpus/make_corpus.py OUT_DIR [CASE ...]   # writes OUT_DIR/<case>/ckpt
    python tests/corpus/make_corpus.py --list
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

import generate  # noqa: E402

S1 = "model-00001-of-00002.safetensors"
S2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
#: A tensor of shard 1 in the base checkpoint (NVFP4 packed weight, U8 [256, 32]).
VICTIM = "backbone.layers.0.mixer.in_proj.weight"


@dataclass(frozen=True)
class Case:
    """One corpus entry: how to break the base checkpoint, and what nhcheck must say."""

    name: str
    build: Callable[[Path], None]
    outcome: str  # "error" | "findings" | "clean"
    names: str = ""  # the file an error line must name
    says: str = ""  # part of the error text
    codes: tuple[str, ...] = ()  # finding codes expected on top of the base's


# ---------------------------------------------------------------------------
# the base checkpoint


def base_tensors() -> tuple[dict, dict, list]:
    config = generate.nano3_tiny_config(quantized=True)
    config["hybrid_override_pattern"] = "ME*E"
    config["num_hidden_layers"] = 4
    config["n_routed_experts"] = 4
    quant = generate.nano3_tiny_quant()
    return config, quant, generate.nemotron_h_tensors(config, quant, kv_scales=True)


def write_base(out: Path) -> None:
    config, quant, tensors = base_tensors()
    generate.write_checkpoint(str(out), tensors, config, quant, shards=2)


# ---------------------------------------------------------------------------
# raw safetensors editing


def read_shard_raw(path: Path) -> tuple[dict, bytes]:
    """(header dict in file order, data section) of a valid shard."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def header_blob(header: dict | bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    path.write_bytes(header_blob(header) + data)


def edit_header(ckpt: Path, shard: str, fn: Callable[[dict], dict | bytes | None], data_fn=None) -> None:
    """Rewrite one shard's header with ``fn`` (mutate in place, or return a replacement)."""
    header, data = read_shard_raw(ckpt / shard)
    new = fn(header)
    write_shard_raw(ckpt / shard, header if new is None else new, data if data_fn is None else data_fn(data))


def edit_json(path: Path, fn: Callable[[dict], dict | None]) -> None:
    obj = json.loads(path.read_text())
    new = fn(obj)
    path.write_text(json.dumps(obj if new is None else new, indent=1))


def entry(header: dict, name: str = VICTIM) -> dict:
    return header[name]


def rename_tensor(ckpt: Path, old: str, new: str) -> None:
    """Rename a tensor in its shard header and in the index (the files stay consistent)."""

    def ren(h: dict) -> dict:
        return {(new if k == old else k): v for k, v in h.items()}

    edit_header(ckpt, S1, ren)
    edit_json(ckpt / INDEX, lambda ix: ix.update(weight_map=ren(ix["weight_map"])))


def first_data_entry(header: dict) -> tuple[str, dict]:
    """The tensor whose bytes start the data section."""
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return name, header[name]


def last_data_entry(header: dict) -> tuple[str, dict]:
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    return name, header[name]


def make_sentinel(case_dir: Path) -> Path:
    """A valid shard outside the checkpoint: opening it would parse, so refusal is observable."""
    outside = case_dir / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copyfile(case_dir / "ckpt" / S2, outside / "sentinel.safetensors")
    return outside / "sentinel.safetensors"


# ---------------------------------------------------------------------------
# shard cases


def _truncated(c: Path) -> None:
    p = c / S1
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size // 2)


def _truncated_in_header(c: Path) -> None:
    p = c / S1
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    with open(p, "r+b") as fh:
        fh.truncate(8 + n // 2)


def _truncated_in_length(c: Path) -> None:
    (c / S1).write_bytes(b"\x10\x00\x00")


def _header_len(value: int) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        blob = bytearray((c / S1).read_bytes())
        blob[:8] = struct.pack("<Q", value)
        (c / S1).write_bytes(bytes(blob))

    return build


def _raw_header(raw: bytes) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        write_shard_raw(c / S1, raw, b"")

    return build


def _victim(**changes) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        edit_header(c, S1, lambda h: entry(h).update(changes))

    return build


def _bad_name_utf8(c: Path) -> None:
    header, data = read_shard_raw(c / S1)
    raw = (
        json.dumps(header, separators=(",", ":")).encode().replace(VICTIM.encode(), VICTIM.encode()[:-6] + b"\xff\xfe")
    )
    write_shard_raw(c / S1, raw, data)


def _lone_surrogate_name(c: Path) -> None:
    header, data = read_shard_raw(c / S1)
    raw = json.dumps(header, separators=(",", ":")).encode().replace(VICTIM.encode(), VICTIM.encode() + b"\\udcff")
    write_shard_raw(c / S1, raw, data)


def _nan_in_entry(c: Path) -> None:
    header, data = read_shard_raw(c / S1)
    raw = json.dumps(header, separators=(",", ":")).encode().replace(b'"dtype"', b'"x":NaN,"dtype"', 1)
    write_shard_raw(c / S1, raw, data)


def _offsets_past_end(c: Path) -> None:
    def fn(h: dict) -> None:
        _, e = last_data_entry(h)
        e["data_offsets"] = [e["data_offsets"][0] + 8, e["data_offsets"][1] + 8]

    edit_header(c, S1, fn)


def _overlap(c: Path) -> None:
    """The second tensor in the data section starts 4 bytes early, inside the first."""

    def fn(h: dict) -> None:
        _, first = first_data_entry(h)
        end = first["data_offsets"][1]
        second = next(v for k, v in h.items() if k != "__metadata__" and v["data_offsets"][0] == end)
        second["data_offsets"] = [end - 4, second["data_offsets"][1] - 4]

    edit_header(c, S1, fn)


def _gap(c: Path) -> None:
    """Eight unused bytes before the first tensor."""

    def fn(h: dict) -> None:
        for k, v in h.items():
            if k != "__metadata__":
                v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]

    edit_header(c, S1, fn, data_fn=lambda d: b"\0" * 8 + d)


def _trailing(c: Path) -> None:
    with open(c / S1, "ab") as fh:
        fh.write(b"GARBAGE!")


def _duplicate_key(c: Path) -> None:
    header, data = read_shard_raw(c / S1)
    name, e = first_data_entry(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    dup = json.dumps({name: e}, separators=(",", ":")).encode()[1:-1]
    write_shard_raw(c / S1, raw[:-1] + b"," + dup + b"}", data)


def _metadata_not_strings(c: Path) -> None:
    edit_header(c, S1, lambda h: h.update({"__metadata__": {"format": 1}}))


def _entry_not_object(c: Path) -> None:
    edit_header(c, S1, lambda h: h.update({VICTIM: [1, 2, 3]}))


def _empty_file(c: Path) -> None:
    (c / S1).write_bytes(b"")


def _zero_file(c: Path) -> None:
    p = c / S1
    size = p.stat().st_size
    p.unlink()
    with open(p, "wb") as fh:
        fh.truncate(size)  # a sparse hole: reads as zeros


def _dir_as_shard(c: Path) -> None:
    (c / S1).unlink()
    (c / S1).mkdir()
    (c / S1 / "inner.txt").write_text("not a shard")


def _symlink_loop(c: Path) -> None:
    (c / S1).unlink()
    os.symlink(S1, c / S1)


def _dup_across_shards(c: Path) -> None:
    h1, d1 = read_shard_raw(c / S1)
    name, e = first_data_entry(h1)
    b, end = e["data_offsets"]
    h2, d2 = read_shard_raw(c / S2)
    h2[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [len(d2), len(d2) + end - b]}
    write_shard_raw(c / S2, h2, d2 + d1[b:end])


def _control_name(c: Path) -> None:
    rename_tensor(c, VICTIM, "backbone.layers.0.mixer.in\x1b[31m_proj\n.weight\x07")


def _markup_name(c: Path) -> None:
    rename_tensor(c, VICTIM, "backbone.layers.0.mixer.[bold]in_proj[/bold].weight")


def _control_char_in_error(c: Path) -> None:
    header, data = read_shard_raw(c / S1)
    header["evil\x1b[2J\nname[/]"] = header.pop(VICTIM)
    header["evil\x1b[2J\nname[/]"]["dtype"] = "Q9"
    write_shard_raw(c / S1, header, data)


def _hostile_filename(c: Path) -> None:
    (c / INDEX).unlink()
    os.rename(c / S1, c / "bad\x1b[31m\n[bold].safetensors")
    with open(c / "bad\x1b[31m\n[bold].safetensors", "r+b") as fh:
        fh.truncate(100)


def _non_utf8_stray(c: Path) -> None:
    shutil.copyfile(c / S2, os.fsencode(c) + b"/model-\xff\xfe.safetensors")


def _non_utf8_shard(c: Path) -> None:
    (c / INDEX).unlink()
    os.rename(c / S2, os.fsencode(c) + b"/model-\xff\xfe.safetensors")


def _lone_surrogate_in_index(c: Path) -> None:
    text = (c / INDEX).read_text().replace(VICTIM, VICTIM + "\\udcff", 1)
    (c / INDEX).write_text(text)


# ---------------------------------------------------------------------------
# index cases


def _missing_shard(c: Path) -> None:
    (c / S2).unlink()


def _wrong_shard(c: Path) -> None:
    edit_json(c / INDEX, lambda ix: ix["weight_map"].update({VICTIM: S2}))


def _weight_map(value: str) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        make_sentinel(c.parent)
        edit_json(c / INDEX, lambda ix: ix["weight_map"].update({VICTIM: value}))

    return build


def _index(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit the index in place with ``fn`` (whatever it returns is ignored)."""

    def build(c: Path) -> None:
        index = json.loads((c / INDEX).read_text())
        fn(index)
        (c / INDEX).write_text(json.dumps(index, indent=1))

    return build


def _symlink_escape(c: Path) -> None:
    sentinel = make_sentinel(c.parent)
    (c / S2).unlink()
    os.symlink(os.path.relpath(sentinel, c), c / S2)


def _member_symlink_escape(name: str) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        outside = c.parent / "outside"
        outside.mkdir(exist_ok=True)
        os.rename(c / name, outside / name)
        os.symlink(os.path.relpath(outside / name, c), c / name)

    return build


def _fifo(name: str) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        (c / name).unlink()
        os.mkfifo(c / name)

    return build


def _hf_cache(c: Path) -> None:
    """The layout ``snapshot_download`` leaves: every snapshot file links to ``../../blobs/<hash>``.

    ``ckpt`` becomes a link to the snapshot, so the checkpoint's real root is the snapshot.
    """
    repo = c.parent / "models--nvidia--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(c))):
        blob = repo / "blobs" / f"{i:040x}"
        os.rename(c / f, blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / f)
    c.rmdir()
    os.symlink(os.path.relpath(snap, c.parent), c)


def _symlink_inside(c: Path) -> None:
    os.rename(c / S2, c / "real-shard.bin")
    os.symlink("real-shard.bin", c / S2)


def _stray_shard(c: Path) -> None:
    shutil.copyfile(c / S2, c / "model-extra.safetensors")


def _text(name: str, text: str) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        (c / name).write_text(text)

    return build


def _no_index_no_shards(c: Path) -> None:
    for p in (S1, S2, INDEX):
        (c / p).unlink()


# ---------------------------------------------------------------------------
# config cases


def _config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        edit_json(c / "config.json", fn)

    return build


def _quant(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        edit_json(c / "hf_quant_config.json", fn)

    return build


def _remove(name: str) -> Callable[[Path], None]:
    def build(c: Path) -> None:
        (c / name).unlink()

    return build


BOMB = b"[" * 200_000 + b"]" * 200_000

CASES: tuple[Case, ...] = (
    # one shard, structurally broken -> exit 2 naming the shard
    Case("truncated-shard", _truncated, "error", S1, "past the end of the file"),
    Case("truncated-in-header", _truncated_in_header, "error", S1, "larger than the file"),
    Case("truncated-in-length", _truncated_in_length, "error", S1, "too short"),
    Case("header-len-past-file", _header_len(50_000_000), "error", S1, "larger than the file"),
    Case("header-len-insane", _header_len(2**63 + 5), "error", S1, "exceeds the 100000000-byte limit"),
    Case("header-not-json", _raw_header(b"{this is not json"), "error", S1, "not valid JSON"),
    Case("header-not-object", _raw_header(b'["a", "b"]'), "error", S1, "not an object"),
    Case("header-nesting-bomb", _raw_header(BOMB), "error", S1, "nested too deeply"),
    Case("header-not-utf8", _bad_name_utf8, "error", S1, "not valid UTF-8"),
    Case("name-lone-surrogate", _lone_surrogate_name, "error", S1, "surrogate"),
    Case("header-nan-literal", _nan_in_entry, "error", S1, "NaN"),
    Case("unknown-dtype", _victim(dtype="F7_E3M3"), "error", S1, "unknown dtype"),
    Case("negative-shape", _victim(shape=[-256, 32]), "error", S1, "non-negative integers"),
    Case("float-shape", _victim(shape=[256.0, 32]), "error", S1, "non-negative integers"),
    Case("string-shape", _victim(shape="256x32"), "error", S1, "non-negative integers"),
    Case("huge-shape", _victim(shape=[2**62, 2**62]), "error", S1, "needs"),
    Case("shape-bytes-disagree", _victim(shape=[256, 16]), "error", S1, "needs"),
    Case("offsets-reversed", _victim(data_offsets=[100, 50]), "error", S1, "data_offsets must be"),
    Case("offsets-negative", _victim(data_offsets=[-8, 8184]), "error", S1, "data_offsets must be"),
    Case("offsets-not-pair", _victim(data_offsets=[0]), "error", S1, "data_offsets must be"),
    Case("offsets-past-end", _offsets_past_end, "error", S1, "past the end"),
    Case("overlapping-tensors", _overlap, "error", S1, "overlaps"),
    Case("gapped-tensors", _gap, "error", S1, "gap of 8 bytes"),
    Case("trailing-bytes", _trailing, "error", S1, "8 trailing bytes"),
    Case("duplicate-key", _duplicate_key, "error", S1, "duplicate key"),
    Case("metadata-not-strings", _metadata_not_strings, "error", S1, "__metadata__"),
    Case("entry-not-object", _entry_not_object, "error", S1, "not an object"),
    Case("empty-file", _empty_file, "error", S1, "too short"),
    Case("all-zero-file", _zero_file, "error", S1, "header length is 0"),
    Case("directory-as-shard", _dir_as_shard, "error", S1, "directory"),
    Case("fifo-as-shard", _fifo(S1), "error", S1, "FIFO"),
    Case("symlink-loop", _symlink_loop, "error", S1, "symbolic links"),
    Case("control-chars-in-error", _control_char_in_error, "error", S1, "unknown dtype"),
    Case("hostile-filename", _hostile_filename, "error", "bad\\x1b[31m", "header length"),
    Case("non-utf8-shard-name", _non_utf8_shard, "error", "model-\\xff\\xfe.safetensors", "not valid UTF-8"),
    # names that parse: findings, rendered escaped
    Case("control-chars-in-name", _control_name, "findings", codes=("orphan", "param-unfilled")),
    Case("markup-in-name", _markup_name, "findings", codes=("orphan", "param-unfilled")),
    Case("non-utf8-stray-file", _non_utf8_stray, "findings", codes=("shard-stray",)),
    # index <-> header disagreements in files that parse: findings
    Case("shard-missing", _missing_shard, "findings", codes=("shard-missing", "param-unfilled")),
    Case("tensor-in-wrong-shard", _wrong_shard, "findings", codes=("index-wrong-shard",)),
    Case("same-name-two-shards", _dup_across_shards, "findings", codes=("tensor-duplicate",)),
    Case(
        "index-lists-ghost",
        _index(lambda ix: ix["weight_map"].update({"backbone.ghost.weight": S1})),
        "findings",
        codes=("index-tensor-missing",),
    ),
    Case(
        "index-omits-tensor",
        _index(lambda ix: ix["weight_map"].pop(VICTIM)),
        "findings",
        codes=("index-tensor-unlisted",),
    ),
    Case(
        "index-total-size",
        _index(lambda ix: ix["metadata"].update(total_size=1)),
        "findings",
        codes=("index-total-size",),
    ),
    Case("stray-shard", _stray_shard, "findings", codes=("shard-stray",)),
    Case("symlink-inside", _symlink_inside, "clean"),
    Case("hf-cache-snapshot", _hf_cache, "clean"),
    # path escapes: refused before anything is opened
    Case("weight-map-dotdot", _weight_map("../../etc/passwd"), "error", INDEX, "escapes the checkpoint"),
    Case("weight-map-dotdot-sentinel", _weight_map("../outside/sentinel.safetensors"), "error", INDEX, "escapes"),
    Case("weight-map-absolute", _weight_map("/etc/passwd"), "error", INDEX, "absolute"),
    Case("weight-map-nul", _weight_map("model\x00.safetensors"), "error", INDEX, "absolute or empty"),
    Case("shard-symlink-escape", _symlink_escape, "error", S2, "symlink leading outside"),
    Case("index-symlink-escape", _member_symlink_escape(INDEX), "error", INDEX, "symlink leading outside"),
    Case(
        "config-symlink-escape",
        _member_symlink_escape("config.json"),
        "error",
        "config.json",
        "symlink leading outside",
    ),
    Case(
        "quant-symlink-escape",
        _member_symlink_escape("hf_quant_config.json"),
        "error",
        "hf_quant_config.json",
        "symlink leading outside",
    ),
    Case("index-lone-surrogate", _lone_surrogate_in_index, "error", INDEX, "surrogate"),
    Case("index-not-json", _text(INDEX, '{"weight_map": '), "error", INDEX, "not valid JSON"),
    Case("index-not-object", _text(INDEX, "[]"), "error", INDEX, "not a JSON object"),
    Case("index-no-weight-map", _text(INDEX, '{"metadata": {}}'), "error", INDEX, "weight_map"),
    Case("index-weight-map-values", _text(INDEX, '{"weight_map": {"a": 1}}'), "error", INDEX, "weight_map"),
    Case("index-nesting-bomb", _text(INDEX, BOMB.decode()), "error", INDEX, "nested too deeply"),
    Case("no-shards", _no_index_no_shards, "error", "ckpt", "no model.safetensors.index.json"),
    # config problems
    Case("config-missing", _remove("config.json"), "error", "config.json", "not found"),
    Case("config-not-json", _text("config.json", "{,}"), "error", "config.json", "not valid JSON"),
    Case("config-fifo", _fifo("config.json"), "error", "config.json", "FIFO"),
    Case("config-not-object", _text("config.json", "42"), "error", "config.json", "not a JSON object"),
    Case(
        "config-wrong-model-type",
        _config(lambda c: c.update(model_type="llama")),
        "error",
        "config.json",
        "model_type is 'llama'",
    ),
    Case(
        "config-pattern-length",
        _config(lambda c: c.update(num_hidden_layers=52)),
        "error",
        "config.json",
        "num_hidden_layers is 52",
    ),
    Case(
        "config-pattern-chars",
        _config(lambda c: c.update(hybrid_override_pattern="MX*E")),
        "error",
        "config.json",
        "hybrid_override_pattern must use",
    ),
    Case("config-bad-field", _config(lambda c: c.update(hidden_size="64")), "error", "config.json", "hidden_size"),
    Case(
        "config-bad-intermediate",
        _config(lambda c: c.update(intermediate_size=[1.5])),
        "error",
        "config.json",
        "intermediate_size",
    ),
    Case(
        "config-bad-experts",
        _config(lambda c: c.update(max_n_routed_experts="many")),
        "error",
        "config.json",
        "max_n_routed_experts",
    ),
    Case(
        "config-bad-latent",
        _config(lambda c: c.update(moe_latent_size=True)),
        "error",
        "config.json",
        "moe_latent_size",
    ),
    Case(
        "config-experts-huge",
        _config(lambda c: c.update(n_routed_experts=10**9)),
        "error",
        "config.json",
        "up to 16384",
    ),
    Case(
        "config-layers-str",
        _config(lambda c: c.update(num_hidden_layers="4")),
        "error",
        "config.json",
        "num_hidden_layers is '4'",
    ),
    Case(
        "config-block-type-list",
        _config(lambda c: c.update(hybrid_override_pattern=None, layers_block_type=[["mamba"], "moe"])),
        "error",
        "config.json",
        "layers_block_type has unknown kind",
    ),
    Case(
        "config-wrapper-ratio",
        _config(lambda c: {"architectures": ["NemotronH_Nano_VL_V2"], "llm_config": c, "downsample_ratio": "half"}),
        "error",
        "config.json",
        "downsample_ratio",
    ),
    Case(
        "quant-config-not-json",
        _text("hf_quant_config.json", "NVFP4"),
        "error",
        "hf_quant_config.json",
        "not valid JSON",
    ),
    Case(
        "quant-unknown-algo",
        _quant(lambda q: q["quantization"].update(quant_algo="NVFP7")),
        "findings",
        codes=("crash",),  # the refusal is the crash, stated once
    ),
    Case(
        "quant-not-modelopt",
        _config(lambda c: c.update(quantization_config={"quant_method": "gptq"})),
        "findings",
        codes=("quant-config",),
    ),
    Case("quant-no-quantization", _quant(lambda q: q.pop("quantization")), "findings", codes=("quant-config",)),
)

BY_NAME = {c.name: c for c in CASES}


def build_case(name: str, dest: Path, base: Path | None = None) -> Path:
    """Write case ``name`` under ``dest`` (``dest/ckpt``, maybe ``dest/outside``); returns the ckpt dir.

    ``base`` is a prebuilt base checkpoint to copy (tests build it once per session).
    """
    case = BY_NAME[name]
    ckpt = dest / "ckpt"
    if base is None:
        write_base(ckpt)
    else:
        shutil.copytree(base, ckpt, symlinks=True)
    case.build(ckpt)
    return ckpt


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list"]:
        for c in CASES:
            print(f"{c.name:28} {c.outcome:9} {c.says or ','.join(c.codes)}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("Usage::")[1].strip(), file=sys.stderr)
        return 0 if argv else 2
    if argv[0].startswith("-"):
        print(f"unknown option {argv[0]} (see --help)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    names = argv[1:] or [c.name for c in CASES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    base = out / "_base"
    if not base.exists():
        write_base(base)
    for n in names:
        build_case(n, out / n, base)
        print(out / n / "ckpt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
