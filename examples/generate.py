#!/usr/bin/env python3
"""Generator of faithful synthetic Nemotron-H safetensors checkpoints.

Self-contained (standard library only): the safetensors files are written by hand
(8-byte little-endian header length, JSON header padded with spaces to a multiple of 8,
then the data section; tensors in name-sorted order, ``__metadata__`` = {"format": "pt"}).

Two kinds of output:

* tiny examples (``tiny_examples()``): real names, dtypes, quant configs and shard layout of a
  release, with dimensions scaled down (hidden 64, vocab 256, ...), real deterministic data;
* full-size layouts (``full_layouts()``): the exact tensor list of a real release (headers real),
  written as sparse files (the data section is a hole made with ``truncate``: no disk used).

Tensor names / dtypes / shapes follow the checkpoint-layout notes (§3 backbone, §4 per-quantization
tensor sets, §6 MTP block, §7 shards and index) and reproduce the real header totals.

CLI::

    python examples/generate.py tiny OUT_DIR [NAME ...]   # writes OUT_DIR/NAME/ (default: all)
    python examples/generate.py full NAME OUT_DIR         # writes a sparse full-size layout, prints totals
    python examples/generate.py list                      # example and layout names
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import random
import re
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "write_checkpoint",
    "nemotron_h_tensors",
    "tiny_examples",
    "full_layouts",
    "tensor_nbytes",
    "census",
    "layer_pattern",
    "omni_quant_config",
    "super_quant_config",
    "DTYPE_SIZE",
]

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"

Tensor = tuple  # (name: str, dtype: str, shape: list[int])

DTYPE_SIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_KIND_CHARS = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = DTYPE_SIZE[dtype]
    for d in shape:
        n *= int(d)
    return n


def census(tensors: Iterable[Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _name, dtype, _shape in tensors:
        out[dtype] = out.get(dtype, 0) + 1
    return out


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _bf16_table() -> bytes:
    # high byte of a BF16 value: keep the sign, force exponent 120..127 -> |x| in [2^-7, 2)
    return bytes((b & 0x80) | 0x3C | (b & 0x03) for b in range(256))


def _f16_table() -> bytes:
    # high byte of an F16 value: sign, exponent 14..15 -> |x| in [0.5, 2)
    return bytes((b & 0x80) | 0x38 | (b & 0x07) for b in range(256))


def _e4m3_weight_table() -> bytes:
    # float8_e4m3fn: 0x7F / 0xFF are NaN (no infinities); map them to +-1.0
    return bytes(0x38 if b == 0x7F else 0xB8 if b == 0xFF else b for b in range(256))


def _e4m3_scale_table() -> bytes:
    # block scales: positive finite values 0x30..0x40 (0.5 .. 2.0; 0x38 = 1.0)
    return bytes(0x30 + (b % 17) for b in range(256))


_BF16_T = _bf16_table()
_F16_T = _f16_table()
_E4M3_W_T = _e4m3_weight_table()
_E4M3_S_T = _e4m3_scale_table()
_BLOCK = 1024  # random bytes per tensor, tiled (keeps the committed examples compressible)


def _tile(block: bytes, n: int) -> bytes:
    if len(block) >= n:
        return block[:n]
    return (block * (n // len(block) + 1))[:n]


def _is_scale_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return "scale" in leaf


def tensor_bytes(name: str, dtype: str, shape: list[int], seed: int = 0) -> bytes:
    """Deterministic pseudo-random contents for one tensor.

    Every F32 ``*scale*`` tensor is a positive finite float in [0.5, 2.0]; other F32 tensors are
    finite in [-1, 1]; F8_E4M3 ``weight_scale`` (NVFP4 block scales) are bytes 0x30..0x40
    (positive finite); FP8 weights avoid the NaN codes; BF16/F16 are finite.
    """
    n = tensor_nbytes(dtype, shape)
    rng = random.Random(f"{seed}:{name}")
    if n == 0:
        return b""
    if dtype in ("F32", "F64"):
        count = n // DTYPE_SIZE[dtype]
        lo, hi = (0.5, 2.0) if _is_scale_name(name) else (-1.0, 1.0)
        k = min(count, _BLOCK // 4)
        vals = [rng.uniform(lo, hi) for _ in range(k)]
        fmt = "f" if dtype == "F32" else "d"
        return _tile(struct.pack(f"<{k}{fmt}", *vals), n)
    if dtype in ("I64", "I32", "I16", "I8", "U64", "U32", "U16"):
        size = DTYPE_SIZE[dtype]
        count = n // size
        k = min(count, _BLOCK // size)
        code = {"I64": "q", "I32": "i", "I16": "h", "I8": "b", "U64": "Q", "U32": "I", "U16": "H"}[dtype]
        return _tile(struct.pack(f"<{k}{code}", *[rng.randint(0, 100) for _ in range(k)]), n)
    if dtype == "BOOL":
        return _tile(bytes(rng.randint(0, 1) for _ in range(min(n, _BLOCK))), n)
    raw = bytearray(rng.randbytes(min(n, _BLOCK)))
    if dtype == "BF16":
        raw[1::2] = bytes(raw[1::2]).translate(_BF16_T)
    elif dtype == "F16":
        raw[1::2] = bytes(raw[1::2]).translate(_F16_T)
    elif dtype == "F8_E4M3":
        raw = bytearray(bytes(raw).translate(_E4M3_S_T if _is_scale_name(name) else _E4M3_W_T))
    elif dtype == "F8_E5M2":
        raw = bytearray(bytes(b & 0xBB for b in raw))  # exponent <= 0b01110: finite
    # U8 (packed E2M1 nibbles) / I8: every byte is a valid finite value
    return _tile(bytes(raw), n)


def _split_shards(sizes: list[int], n: int) -> list[int]:
    """Greedy split of tensors (state-dict order) into n contiguous shards of about equal bytes:
    a tensor starts the next shard once the bytes before it reach that shard's share
    (k * total / n); no shard is left empty. Returns the shard index of every tensor.
    (Same rule as the conformance checkpoints' writer: their weight_maps are reproduced exactly.)"""
    if n < 1:
        raise ValueError("shards must be >= 1")
    if n > len(sizes):
        raise ValueError(f"cannot split {len(sizes)} tensors into {n} shards")
    total = sum(sizes)
    out: list[int] = []
    k, cum, in_k = 0, 0, 0
    for idx, size in enumerate(sizes):
        remaining = len(sizes) - idx  # this tensor included
        if k < n - 1 and in_k > 0 and (cum >= (k + 1) * total / n or remaining == n - 1 - k):
            k += 1
            in_k = 0
        out.append(k)
        cum += size
        in_k += 1
    assert k == n - 1, (k, n)
    return out


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header_bytes(entries: list[tuple[str, str, list[int], int, int]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw


def write_checkpoint(
    out_dir: str,
    tensors: list[tuple[str, str, list[int]]],
    config: dict,
    quant: dict | None = None,
    *,
    shards: int = 1,
    sparse: bool = False,
    extra_files: dict[str, str] | None = None,
    seed: int = 0,
) -> None:
    """Write a sharded safetensors checkpoint.

    tensors: (name, dtype, shape) in state-dict order; split greedily (contiguously, in that order)
    into ``shards`` files ``model-0000i-of-0000n.safetensors`` of about equal byte size (a single
    shard is still named ``model-00001-of-00001.safetensors``). Inside a shard tensors are laid out
    in name-sorted order. Always writes ``model.safetensors.index.json`` ({"metadata":
    {"total_size"}, "weight_map"} in state-dict order), ``config.json``, ``hf_quant_config.json``
    (if ``quant``) and ``extra_files`` (file name -> text).

    sparse=True writes only the headers and extends each shard to its full size with truncate
    (a hole: no disk used) — for full-size layouts.
    Stale ``model-*-of-*.safetensors`` files and the index already in ``out_dir`` are removed first.
    """
    tensors = [(str(n), str(d), [int(x) for x in s]) for n, d, s in tensors]
    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dups = sorted({n for n in names if n in seen or seen.add(n)})
        raise ValueError(f"duplicate tensor names: {dups[:5]}")
    for n, d, _s in tensors:
        if d not in DTYPE_SIZE:
            raise ValueError(f"{n}: unknown dtype {d!r}")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors(\.index\.json)?", f):
            os.remove(os.path.join(out_dir, f))

    sizes = [tensor_nbytes(d, s) for _n, d, s in tensors]
    assign = _split_shards(sizes, shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(shards):
        fname = shard_name(k, shards)
        members = sorted((t for t, a in zip(tensors, assign, strict=True) if a == k), key=lambda t: t[0])
        entries = []
        off = 0
        for name, dtype, shape in members:
            nb = tensor_nbytes(dtype, shape)
            entries.append((name, dtype, shape, off, off + nb))
            off += nb
        header = _header_bytes(entries)
        path = os.path.join(out_dir, fname)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            if sparse:
                f.truncate(8 + len(header) + off)
            else:
                for name, dtype, shape, _b, _e in entries:
                    f.write(tensor_bytes(name, dtype, shape, seed))
        total += off
    for (name, _d, _s), a in zip(tensors, assign, strict=True):
        weight_map[name] = shard_name(a, shards)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_text(os.path.join(out_dir, "model.safetensors.index.json"), json.dumps(index, indent=2))
    _write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
    if quant is not None:
        _write_text(os.path.join(out_dir, "hf_quant_config.json"), json.dumps(quant, indent=4))
    for fname, text in (extra_files or {}).items():
        _write_text(os.path.join(out_dir, fname), text)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------
# Tensor lists
# --------------------------------------------------------------------------------------------


def layer_pattern(config: dict) -> str:
    """Layer kinds as a pattern string (M mamba, * attention, - mlp, E moe)."""
    pat = config.get("hybrid_override_pattern")
    if pat:
        return str(pat)
    kinds = config.get("layers_block_type")
    if kinds:
        try:
            return "".join(_KIND_CHARS[str(k).lower()] for k in kinds)
        except KeyError as e:
            raise ValueError(f"unknown layers_block_type entry {e.args[0]!r}") from None
    raise ValueError("config has neither hybrid_override_pattern nor layers_block_type")


class _QuantPlan:
    """Per-module format from a ModelOpt quant config.

    Accepts the nested hf_quant_config.json form {"producer", "quantization": {...}} or a flat
    quantization_config ({"quant_algo", "exclude_modules"|"ignore", "quantized_layers", ...}).
    Returns "BF16", "FP8", "NVFP4" or "W4A16_NVFP4" for a checkpoint module name.
    """

    FORMATS = ("FP8", "NVFP4", "W4A16_NVFP4")

    def __init__(self, quant: dict | None):
        q = quant or {}
        if isinstance(q.get("quantization"), dict):
            q = q["quantization"]
        algo = q.get("quant_algo")
        self.algo = str(algo).upper() if algo else None
        self.group_size = int(q.get("group_size") or 16)
        self.layers: dict = q.get("quantized_layers") or {}
        excl = list(q.get("exclude_modules") or []) + list(q.get("ignore") or [])
        self.exact = {e for e in excl if not any(c in e for c in "*?[")}
        self.patterns = [e for e in excl if any(c in e for c in "*?[")]
        if self.algo and not self.layers and self.algo not in self.FORMATS and self.algo != "MIXED_PRECISION":
            raise ValueError(f"unsupported quant_algo {algo!r}")

    def excluded(self, module: str) -> bool:
        if module in self.exact:
            return True
        parts = module.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in self.exact:
                return True
        return any(fnmatch.fnmatchcase(module, p) for p in self.patterns)

    def format_of(self, module: str) -> tuple[str, int]:
        if self.algo is None and not self.layers:
            return "BF16", self.group_size
        if self.layers:
            entry = self.layers.get(module)
            if not entry:
                return "BF16", self.group_size
            fmt = str(entry.get("quant_algo", "")).upper()
            if fmt not in self.FORMATS:
                raise ValueError(f"{module}: unsupported quant_algo {entry.get('quant_algo')!r}")
            return fmt, int(entry.get("group_size") or self.group_size)
        if self.excluded(module):
            return "BF16", self.group_size
        return self.algo, self.group_size


def _linear_tensors(module: str, fmt: str, n_out: int, n_in: int, group_size: int = 16) -> list[Tensor]:
    if fmt == "BF16":
        return [(f"{module}.weight", "BF16", [n_out, n_in])]
    if fmt == "FP8":
        return [
            (f"{module}.weight", "F8_E4M3", [n_out, n_in]),
            (f"{module}.weight_scale", "F32", []),
            (f"{module}.input_scale", "F32", []),
        ]
    if fmt in ("NVFP4", "W4A16_NVFP4"):
        if n_in % group_size or n_in % 2:
            raise ValueError(f"{module}: in features {n_in} not divisible by group size {group_size}")
        out = [
            (f"{module}.weight", "U8", [n_out, n_in // 2]),
            (f"{module}.weight_scale", "F8_E4M3", [n_out, n_in // group_size]),
            (f"{module}.weight_scale_2", "F32", []),
        ]
        if fmt == "NVFP4":  # W4A16: weight-only, no activation scale (INFERRED, spec §4.6)
            out.append((f"{module}.input_scale", "F32", []))
        return out
    raise ValueError(f"{module}: unknown format {fmt!r}")


class _Geometry:
    def __init__(self, c: dict):
        self.H = int(c["hidden_size"])
        self.V = int(c["vocab_size"])
        self.nh = int(c.get("mamba_num_heads") or 0)
        self.hd = int(c.get("mamba_head_dim") or 0)
        self.inner = self.nh * self.hd  # NOT expand * hidden_size
        self.ng = int(c.get("n_groups") or 1)
        self.ds = int(c.get("ssm_state_size") or 0)
        self.K = int(c.get("conv_kernel") or 4)
        self.conv = self.inner + 2 * self.ng * self.ds
        self.proj = 2 * self.inner + 2 * self.ng * self.ds + self.nh
        self.conv_bias = bool(c.get("use_conv_bias", True))
        self.A = int(c.get("num_attention_heads") or 0)
        self.KVH = int(c.get("num_key_value_heads") or self.A)
        self.hdim = int(c.get("head_dim") or c.get("attention_head_dim") or 128)
        self.I = int(c.get("intermediate_size") or 0)
        self.Em = int(c.get("n_routed_experts") or 0)
        self.mi = int(c.get("moe_intermediate_size") or 0)
        self.si = int(c.get("moe_shared_expert_intermediate_size") or 0) * int(c.get("n_shared_experts") or 0)
        self.L = int(c.get("moe_latent_size") or 0)
        self.X = self.L or self.H


def _mixer_tensors(
    kind: str, base: str, g: _Geometry, lin: Callable[[str, int, int], list], router_dtype: str, kv_scales: bool
) -> list[Tensor]:
    """Tensors of one layer's mixer; base = '<prefix>.layers.<i>.mixer'."""
    out: list[Tensor] = []
    if kind == "M":
        out += [
            (f"{base}.A_log", "BF16", [g.nh]),
            (f"{base}.D", "BF16", [g.nh]),
            (f"{base}.conv1d.weight", "BF16", [g.conv, 1, g.K]),
        ]
        if g.conv_bias:
            out.append((f"{base}.conv1d.bias", "BF16", [g.conv]))
        out.append((f"{base}.dt_bias", "BF16", [g.nh]))
        out += lin(f"{base}.in_proj", g.proj, g.H)
        out.append((f"{base}.norm.weight", "BF16", [g.inner]))
        out += lin(f"{base}.out_proj", g.H, g.inner)
    elif kind == "*":
        out += lin(f"{base}.q_proj", g.A * g.hdim, g.H)
        out += lin(f"{base}.k_proj", g.KVH * g.hdim, g.H)
        if kv_scales:
            out.append((f"{base}.k_proj.k_scale", "F32", []))
        out += lin(f"{base}.v_proj", g.KVH * g.hdim, g.H)
        if kv_scales:
            out.append((f"{base}.v_proj.v_scale", "F32", []))
        out += lin(f"{base}.o_proj", g.H, g.A * g.hdim)
    elif kind == "-":
        out += lin(f"{base}.up_proj", g.I, g.H)
        out += lin(f"{base}.down_proj", g.H, g.I)
    elif kind == "E":
        out += [
            (f"{base}.gate.weight", router_dtype, [g.Em, g.H]),
            (f"{base}.gate.e_score_correction_bias", "F32", [g.Em]),
        ]
        for e in range(g.Em):
            out += lin(f"{base}.experts.{e}.up_proj", g.mi, g.X)
            out += lin(f"{base}.experts.{e}.down_proj", g.X, g.mi)
        if g.si:
            out += lin(f"{base}.shared_experts.up_proj", g.si, g.H)
            out += lin(f"{base}.shared_experts.down_proj", g.H, g.si)
        if g.L:
            out += lin(f"{base}.fc1_latent_proj", g.L, g.H)
            out += lin(f"{base}.fc2_latent_proj", g.H, g.L)
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return out


def nemotron_h_tensors(
    config: dict,
    quant: dict | None,
    *,
    prefix: str = "backbone",
    lm_head: str | None = "lm_head.weight",
    kv_scales: bool = False,
    mtp: bool = False,
    router_dtype: str = "F32",
    mtp_prefix: str = "mtp",
    mtp_quantized: bool = False,
) -> list[tuple[str, str, list[int]]]:
    """Text-backbone tensor list (state-dict order) for any NemotronH config.

    Layer kinds from ``hybrid_override_pattern`` (or ``layers_block_type``). Per linear module the
    format comes from ``quant`` (hf_quant_config nested form or a flat quantization_config):
    NVFP4 -> weight U8 [out,in/2], weight_scale F8_E4M3 [out,in/16], weight_scale_2 F32 [],
    input_scale F32 []; FP8 -> weight F8_E4M3 [out,in], weight_scale F32 [], input_scale F32 [];
    excluded / not listed -> BF16 weight. Exclude entries are checkpoint module names (exact, a
    parent module, or an fnmatch wildcard). Router ``gate.weight`` is ``router_dtype`` (F32 for
    Nano-3, BF16 for Super); ``e_score_correction_bias`` always F32.

    kv_scales: add ``k_proj.k_scale`` / ``v_proj.v_scale`` F32 [] per backbone attention layer.
    mtp: add the MTP block (``{mtp_prefix}.layers.{j}.*``) following ``mtp_hybrid_override_pattern``
    (default "*E") repeated ``num_nextn_predict_layers`` times; BF16 (router as ``router_dtype``)
    unless ``mtp_quantized``. lm_head=None (or tie_word_embeddings) omits the head.
    """
    g = _Geometry(config)
    plan = _QuantPlan(quant)
    bf16 = _QuantPlan(None)
    pattern = layer_pattern(config)
    n_layers = config.get("num_hidden_layers")
    if n_layers is not None and int(n_layers) != len(pattern):
        raise ValueError(f"pattern length {len(pattern)} != num_hidden_layers {n_layers}")

    def make_lin(p: _QuantPlan):
        def lin(module: str, n_out: int, n_in: int) -> list[Tensor]:
            fmt, gs = p.format_of(module)
            return _linear_tensors(module, fmt, n_out, n_in, gs)

        return lin

    lin = make_lin(plan)
    out: list[Tensor] = [(f"{prefix}.embeddings.weight", "BF16", [g.V, g.H])]
    for i, kind in enumerate(pattern):
        out += _mixer_tensors(kind, f"{prefix}.layers.{i}.mixer", g, lin, router_dtype, kv_scales)
        out.append((f"{prefix}.layers.{i}.norm.weight", "BF16", [g.H]))
    out.append((f"{prefix}.norm_f.weight", "BF16", [g.H]))
    if lm_head and not config.get("tie_word_embeddings"):
        module = lm_head[: -len(".weight")] if lm_head.endswith(".weight") else lm_head
        out += make_lin(plan)(module, g.V, g.H)
    if mtp:
        mlin = make_lin(plan if mtp_quantized else bf16)
        mpat = str(config.get("mtp_hybrid_override_pattern") or "*E")
        steps = int(config.get("num_nextn_predict_layers") or 1)
        j = 0
        for _s in range(steps):
            for pos, kind in enumerate(mpat):
                base = f"{mtp_prefix}.layers.{j}"
                if pos == 0:
                    out += [(f"{base}.enorm.weight", "BF16", [g.H]), (f"{base}.hnorm.weight", "BF16", [g.H])]
                    out += mlin(f"{base}.eh_proj", g.H, 2 * g.H)
                out.append((f"{base}.norm.weight", "BF16", [g.H]))
                out += _mixer_tensors(kind, f"{base}.mixer", g, mlin, router_dtype, False)
                if pos == len(mpat) - 1:
                    out.append((f"{base}.final_layernorm.weight", "BF16", [g.H]))
                j += 1
    return out


def _linear_modules(tensors: Iterable[Tensor]) -> list[str]:
    """Module names (state-dict order) of the linears of a BF16 tensor list."""
    mods = []
    for name, _d, shape in tensors:
        if (
            name.endswith(".weight")
            and len(shape) == 2
            and not name.endswith((".embeddings.weight", ".gate.weight"))
            and ".norm" not in name
        ):
            mods.append(name[: -len(".weight")])
    return mods


# --------------------------------------------------------------------------------------------
# Quant configs
# --------------------------------------------------------------------------------------------


def omni_quant_config(
    llm_config: dict, *, prefix: str = "language_model.backbone", producer_version: str = "0.43.0"
) -> dict:
    """MIXED_PRECISION hf_quant_config of the Nemotron 3 Nano Omni NVFP4 (sglang #24137 shape):
    FP8 Mamba in_proj/out_proj except the Mamba layer right before each attention layer, NVFP4
    (group 16) for every routed and shared expert up/down; keys ``language_model.backbone...``."""
    pattern = layer_pattern(llm_config)
    g = _Geometry(llm_config)
    layers: dict[str, dict] = {}
    for i, kind in enumerate(pattern):
        base = f"{prefix}.layers.{i}.mixer"
        if kind == "M" and not (i + 1 < len(pattern) and pattern[i + 1] == "*"):
            layers[f"{base}.in_proj"] = {"quant_algo": "FP8"}
            layers[f"{base}.out_proj"] = {"quant_algo": "FP8"}
        elif kind == "E":
            for e in range(g.Em):
                for p in ("up_proj", "down_proj"):
                    layers[f"{base}.experts.{e}.{p}"] = {"quant_algo": "NVFP4", "group_size": 16}
            if g.si:
                for p in ("up_proj", "down_proj"):
                    layers[f"{base}.shared_experts.{p}"] = {"quant_algo": "NVFP4", "group_size": 16}
    return {
        "producer": {"name": "modelopt", "version": producer_version},
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": "FP8",
            "quantized_layers": layers,
            "exclude_modules": [
                "language_model.lm_head",
                "mtp*",
                "vision_model*",
                "mlp1*",
                "sound_encoder*",
                "sound_projection*",
            ],
        },
    }


def super_quant_config(config: dict, layer_lists: dict) -> dict:
    """hf_quant_config.json of Super NVFP4 regenerated from the per-class layer lists
    (fixtures/super-nvfp4/quantization.layer-lists.json): 41,100 quantized_layers."""
    moe = set(layer_lists["moe_layers"])
    nvfp4_extra = set(layer_lists.get("nvfp4_extra_modules", []))
    fp8 = {k: set(v) for k, v in layer_lists["fp8_layers_by_module"].items()}
    rx = re.compile(r"backbone\.layers\.(\d+)\.(mixer\.(.+))$")
    layers: dict[str, dict] = {}
    for module in _linear_modules(nemotron_h_tensors(config, None, router_dtype="BF16")):
        m = rx.match(module)
        if not m:
            continue
        i, sub, leaf = int(m.group(1)), m.group(2), m.group(3)
        if (i in moe and re.fullmatch(r"experts\.\d+\.(up|down)_proj", leaf)) or module in nvfp4_extra:
            layers[module] = {"quant_algo": "NVFP4", "group_size": 16}
        elif i in fp8.get(sub, ()):
            layers[module] = {"quant_algo": "FP8"}
    return {
        "producer": layer_lists["producer"],
        "quantization": {
            "quant_algo": layer_lists.get("quant_algo", "MIXED_PRECISION"),
            "kv_cache_quant_algo": layer_lists.get("kv_cache_quant_algo", "FP8"),
            "quantized_layers": layers,
        },
    }


# --------------------------------------------------------------------------------------------
# Tiny examples
# --------------------------------------------------------------------------------------------

TINY_DIMS = {
    "head_dim": 16,
    "hidden_size": 64,
    "intermediate_size": 32,
    "mamba_head_dim": 16,
    "mamba_num_heads": 8,
    "max_position_embeddings": 4096,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 64,
    "n_routed_experts": 12,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_key_value_heads": 2,
    "ssm_state_size": 16,
    "vocab_size": 256,
}

# Omni towers / projector (names, dtypes, shapes copied from the conformance checkpoint
# omni_nvfp4_mixed: tiny RADIO ViT (2 blocks, width 32), projector mlp1, Parakeet encoder
# (2 layers, width 32) and sound projection). State-dict order.
OMNI_TOWER_TENSORS: list[Tensor] = [
    ("vision_model.radio_model.input_conditioner.norm_mean", "F32", [3, 1, 1]),
    ("vision_model.radio_model.input_conditioner.norm_std", "F32", [3, 1, 1]),
    ("vision_model.radio_model.model.patch_generator.cls_token.token", "BF16", [10, 32]),
    ("vision_model.radio_model.model.patch_generator.embedder.weight", "BF16", [32, 768]),
    ("vision_model.radio_model.model.patch_generator.video_embedder.weight", "BF16", [32, 1536]),
    ("vision_model.radio_model.model.patch_generator.pos_embed", "BF16", [1, 64, 32]),
    ("vision_model.radio_model.model.blocks.0.norm1.weight", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.0.norm1.bias", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.0.attn.qkv.weight", "BF16", [96, 32]),
    ("vision_model.radio_model.model.blocks.0.attn.qkv.bias", "BF16", [96]),
    ("vision_model.radio_model.model.blocks.0.attn.proj.weight", "BF16", [32, 32]),
    ("vision_model.radio_model.model.blocks.0.attn.proj.bias", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.0.norm2.weight", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.0.norm2.bias", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.0.mlp.fc1.weight", "BF16", [128, 32]),
    ("vision_model.radio_model.model.blocks.0.mlp.fc1.bias", "BF16", [128]),
    ("vision_model.radio_model.model.blocks.0.mlp.fc2.weight", "BF16", [32, 128]),
    ("vision_model.radio_model.model.blocks.0.mlp.fc2.bias", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.1.norm1.weight", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.1.norm1.bias", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.1.attn.qkv.weight", "BF16", [96, 32]),
    ("vision_model.radio_model.model.blocks.1.attn.qkv.bias", "BF16", [96]),
    ("vision_model.radio_model.model.blocks.1.attn.proj.weight", "BF16", [32, 32]),
    ("vision_model.radio_model.model.blocks.1.attn.proj.bias", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.1.norm2.weight", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.1.norm2.bias", "BF16", [32]),
    ("vision_model.radio_model.model.blocks.1.mlp.fc1.weight", "BF16", [128, 32]),
    ("vision_model.radio_model.model.blocks.1.mlp.fc1.bias", "BF16", [128]),
    ("vision_model.radio_model.model.blocks.1.mlp.fc2.weight", "BF16", [32, 128]),
    ("vision_model.radio_model.model.blocks.1.mlp.fc2.bias", "BF16", [32]),
    ("mlp1.0.weight", "BF16", [128]),
    ("mlp1.1.weight", "BF16", [64, 128]),
    ("mlp1.3.weight", "BF16", [64, 64]),
    ("sound_encoder.encoder.subsampling.layers.0.weight", "BF16", [8, 1, 3, 3]),
    ("sound_encoder.encoder.subsampling.layers.0.bias", "BF16", [8]),
    ("sound_encoder.encoder.subsampling.layers.2.weight", "BF16", [8, 1, 3, 3]),
    ("sound_encoder.encoder.subsampling.layers.2.bias", "BF16", [8]),
    ("sound_encoder.encoder.subsampling.layers.3.weight", "BF16", [8, 8, 1, 1]),
    ("sound_encoder.encoder.subsampling.layers.3.bias", "BF16", [8]),
    ("sound_encoder.encoder.subsampling.layers.5.weight", "BF16", [8, 1, 3, 3]),
    ("sound_encoder.encoder.subsampling.layers.5.bias", "BF16", [8]),
    ("sound_encoder.encoder.subsampling.layers.6.weight", "BF16", [8, 8, 1, 1]),
    ("sound_encoder.encoder.subsampling.layers.6.bias", "BF16", [8]),
    ("sound_encoder.encoder.subsampling.linear.weight", "BF16", [32, 16]),
    ("sound_encoder.encoder.subsampling.linear.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.feed_forward1.linear1.weight", "BF16", [64, 32]),
    ("sound_encoder.encoder.layers.0.feed_forward1.linear1.bias", "BF16", [64]),
    ("sound_encoder.encoder.layers.0.feed_forward1.linear2.weight", "BF16", [32, 64]),
    ("sound_encoder.encoder.layers.0.feed_forward1.linear2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.self_attn.bias_u", "BF16", [2, 16]),
    ("sound_encoder.encoder.layers.0.self_attn.bias_v", "BF16", [2, 16]),
    ("sound_encoder.encoder.layers.0.self_attn.q_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.0.self_attn.q_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.self_attn.k_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.0.self_attn.k_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.self_attn.v_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.0.self_attn.v_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.self_attn.o_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.0.self_attn.o_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.self_attn.relative_k_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.0.conv.pointwise_conv1.weight", "BF16", [64, 32, 1]),
    ("sound_encoder.encoder.layers.0.conv.pointwise_conv1.bias", "BF16", [64]),
    ("sound_encoder.encoder.layers.0.conv.depthwise_conv.weight", "BF16", [32, 1, 9]),
    ("sound_encoder.encoder.layers.0.conv.depthwise_conv.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.conv.norm.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.conv.norm.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.conv.norm.running_mean", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.conv.norm.running_var", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.conv.norm.num_batches_tracked", "I64", []),
    ("sound_encoder.encoder.layers.0.conv.pointwise_conv2.weight", "BF16", [32, 32, 1]),
    ("sound_encoder.encoder.layers.0.conv.pointwise_conv2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.feed_forward2.linear1.weight", "BF16", [64, 32]),
    ("sound_encoder.encoder.layers.0.feed_forward2.linear1.bias", "BF16", [64]),
    ("sound_encoder.encoder.layers.0.feed_forward2.linear2.weight", "BF16", [32, 64]),
    ("sound_encoder.encoder.layers.0.feed_forward2.linear2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_feed_forward1.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_feed_forward1.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_self_att.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_self_att.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_conv.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_conv.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_feed_forward2.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_feed_forward2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_out.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.0.norm_out.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.feed_forward1.linear1.weight", "BF16", [64, 32]),
    ("sound_encoder.encoder.layers.1.feed_forward1.linear1.bias", "BF16", [64]),
    ("sound_encoder.encoder.layers.1.feed_forward1.linear2.weight", "BF16", [32, 64]),
    ("sound_encoder.encoder.layers.1.feed_forward1.linear2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.self_attn.bias_u", "BF16", [2, 16]),
    ("sound_encoder.encoder.layers.1.self_attn.bias_v", "BF16", [2, 16]),
    ("sound_encoder.encoder.layers.1.self_attn.q_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.1.self_attn.q_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.self_attn.k_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.1.self_attn.k_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.self_attn.v_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.1.self_attn.v_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.self_attn.o_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.1.self_attn.o_proj.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.self_attn.relative_k_proj.weight", "BF16", [32, 32]),
    ("sound_encoder.encoder.layers.1.conv.pointwise_conv1.weight", "BF16", [64, 32, 1]),
    ("sound_encoder.encoder.layers.1.conv.pointwise_conv1.bias", "BF16", [64]),
    ("sound_encoder.encoder.layers.1.conv.depthwise_conv.weight", "BF16", [32, 1, 9]),
    ("sound_encoder.encoder.layers.1.conv.depthwise_conv.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.conv.norm.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.conv.norm.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.conv.norm.running_mean", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.conv.norm.running_var", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.conv.norm.num_batches_tracked", "I64", []),
    ("sound_encoder.encoder.layers.1.conv.pointwise_conv2.weight", "BF16", [32, 32, 1]),
    ("sound_encoder.encoder.layers.1.conv.pointwise_conv2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.feed_forward2.linear1.weight", "BF16", [64, 32]),
    ("sound_encoder.encoder.layers.1.feed_forward2.linear1.bias", "BF16", [64]),
    ("sound_encoder.encoder.layers.1.feed_forward2.linear2.weight", "BF16", [32, 64]),
    ("sound_encoder.encoder.layers.1.feed_forward2.linear2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_feed_forward1.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_feed_forward1.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_self_att.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_self_att.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_conv.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_conv.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_feed_forward2.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_feed_forward2.bias", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_out.weight", "BF16", [32]),
    ("sound_encoder.encoder.layers.1.norm_out.bias", "BF16", [32]),
    ("sound_encoder.encoder.feature_extractor.featurizer.fb", "F32", [1, 16, 17]),
    ("sound_encoder.encoder.feature_extractor.featurizer.window", "F32", [32]),
    ("sound_projection.norm.weight", "BF16", [32]),
    ("sound_projection.linear1.weight", "BF16", [64, 32]),
    ("sound_projection.linear2.weight", "BF16", [64, 64]),
]


def _load_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tiny(config: dict) -> dict:
    c = copy.deepcopy(config)
    for k, v in TINY_DIMS.items():
        if k in c:
            c[k] = v
    return c


def nano3_tiny_config(quantized: bool = False) -> dict:
    """Tiny Nano-3 config: the real fixture config (BF16 or NVFP4 release) with tiny dims."""
    name = "nano3-nvfp4" if quantized else "nano3-bf16"
    return _tiny(_load_json(FIXTURES / name / "config.json"))


def h8b_tiny_config() -> dict:
    """Tiny Nemotron-H 8B config (v1 key set, spec §5.1) with the real 52-layer pattern."""
    return {
        "architectures": ["NemotronHForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_head_dim": 16,
        "head_dim": 16,
        "auto_map": {
            "AutoConfig": "configuration_nemotron_h.NemotronHConfig",
            "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM",
        },
        "bos_token_id": 1,
        "chunk_size": 128,
        "conv_kernel": 4,
        "eos_token_id": 2,
        "expand": 2,
        "hidden_dropout": 0.0,
        "hidden_size": 64,
        "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "layer_norm_epsilon": 1e-05,
        "mamba_head_dim": 16,
        "mamba_hidden_act": "silu",
        "mamba_num_heads": 8,
        "mamba_proj_bias": False,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "mlp_hidden_act": "relu2",
        "model_type": "nemotron_h",
        "n_groups": 8,
        "num_attention_heads": 4,
        "num_hidden_layers": 52,
        "num_key_value_heads": 2,
        "num_logits_to_keep": 1,
        "pad_token_id": 0,
        "rescale_prenorm_residual": True,
        "residual_in_fp32": False,
        "rms_norm_eps": 1e-05,
        "sliding_window": None,
        "ssm_state_size": 16,
        "tie_word_embeddings": False,
        "time_step_floor": 0.0001,
        "time_step_max": 0.1,
        "time_step_min": 0.001,
        "time_step_rank": 256,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.0.dev0",
        "use_bias": False,
        "use_cache": True,
        "use_conv_bias": True,
        "use_mamba_kernels": True,
        "vocab_size": 256,
    }


def omni_tiny_config() -> dict:
    """Tiny Nemotron 3 Nano Omni wrapper config (outer NemotronH_Nano_Omni_Reasoning_V3)."""
    llm = nano3_tiny_config()
    llm.pop("auto_map", None)
    llm["num_nextn_predict_layers"] = 1
    llm["mtp_hybrid_override_pattern"] = "*E"
    return {
        "architectures": ["NemotronH_Nano_Omni_Reasoning_V3"],
        "model_type": "NemotronH_Nano_Omni_Reasoning_V3",
        "auto_map": {
            "AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config",
            "AutoModel": "modeling.NemotronH_Nano_VL_V2",
            "AutoModelForCausalLM": "modeling.NemotronH_Nano_VL_V2",
        },
        "max_sequence_length": 131072,
        "force_image_size": 512,
        "downsample_ratio": 0.5,
        "patch_size": 16,
        "use_thumbnail": True,
        "img_context_token_id": 18,
        "img_context_token": "<image>",
        "img_start_token": "<img>",
        "img_end_token": "</img>",
        "sound_context_token_id": 27,
        "sound_context_token": "<so_embedding>",
        "vit_hidden_size": 32,
        "projector_hidden_size": 64,
        "norm_mean": [0.48145466, 0.4578275, 0.40821073],
        "norm_std": [0.26862954, 0.26130258, 0.27577711],
        "torch_dtype": "bfloat16",
        "vision_config": {
            "version": "radio_v2.5-h",
            "patch_size": 16,
            "max_resolution": 2048,
            "separate_video_embedder": True,
            "min_num_patches": 1024,
            "max_num_patches": 13312,
            "preferred_resolution": [512, 512],
            "args": {
                "model": "vit_small_patch16_224",
                "register_multiple": 8,
                "min_num_patches": 1024,
                "max_num_patches": 13312,
            },
        },
        "sound_config": {
            "model_type": "parakeet",
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "intermediate_size": 64,
            "conv_kernel_size": 9,
            "subsampling_conv_channels": 8,
            "subsampling_conv_kernel_size": 3,
            "subsampling_conv_stride": 2,
            "subsampling_factor": 8,
            "num_mel_bins": 16,
            "projection_hidden_size": 64,
            "projection_bias": False,
            "sampling_rate": 16000,
        },
        "llm_config": llm,
    }


def nano3_tiny_quant(experts_excluded_layers: Iterable[int] = ()) -> dict:
    """The real Nano-3 NVFP4 hf_quant_config.json (60 exclude entries; the tiny model keeps the
    real layer indices), optionally with ``backbone.layers.{i}.mixer.experts`` appended."""
    q = _load_json(FIXTURES / "nano3-nvfp4" / "hf_quant_config.json")
    q["quantization"]["exclude_modules"] += [f"backbone.layers.{i}.mixer.experts" for i in experts_excluded_layers]
    return q


# MoE layers whose experts the PR #24434 example excludes (as in the conformance case
# nano3_nvfp4_experts_excluded: the first and the last-but-one MoE layer, not all 23).
EXPERTS_EXCLUDED_LAYERS = (1, 49)


def _sidecars(config: dict, max_len: int) -> dict[str, str]:
    llm = config.get("llm_config", config)
    tok = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    gen = {
        "_from_model_config": True,
        "bos_token_id": llm.get("bos_token_id", 1),
        "eos_token_id": llm.get("eos_token_id", 2),
        "pad_token_id": llm.get("pad_token_id", 0),
        "transformers_version": llm.get("transformers_version", "4.55.4"),
    }
    return {
        "tokenizer_config.json": json.dumps(tok, indent=2) + "\n",
        "generation_config.json": json.dumps(gen, indent=2) + "\n",
    }


def _tiny_nano3_bf16(out_dir: str) -> None:
    c = nano3_tiny_config()
    write_checkpoint(out_dir, nemotron_h_tensors(c, None), c, None, shards=3, extra_files=_sidecars(c, 4096))


def _tiny_nano3_nvfp4(out_dir: str) -> None:
    c = nano3_tiny_config(quantized=True)
    q = nano3_tiny_quant()
    write_checkpoint(out_dir, nemotron_h_tensors(c, q), c, q, shards=4, extra_files=_sidecars(c, 4096))


def _tiny_nano3_nvfp4_experts_excluded(out_dir: str) -> None:
    c = nano3_tiny_config(quantized=True)
    # tensors as exported (NVFP4 experts with all four tensors) ...
    tensors = nemotron_h_tensors(c, nano3_tiny_quant())
    # ... but the quant config says the experts of some MoE layers are unquantized
    q = nano3_tiny_quant(EXPERTS_EXCLUDED_LAYERS)
    write_checkpoint(out_dir, tensors, c, q, shards=4, extra_files=_sidecars(c, 4096))


_LEFTOVER_EXPERT_WEIGHT = re.compile(r"backbone\.layers\.(\d+)\.mixer\.experts\.\d+\.(up|down)_proj\.weight")


def nano3_leftover_expert_scale_tensors(
    layers: Iterable[int] = EXPERTS_EXCLUDED_LAYERS, config: dict | None = None
) -> list[Tensor]:
    """PR #24434 case: the experts of ``layers`` exported unquantized (BF16 weights, excluded in the
    quant config) but still carrying their NVFP4 ``weight_scale`` / ``weight_scale_2`` / ``input_scale``.

    SGLang builds those experts unquantized, so the scales have no target: 0.5.11 raises KeyError
    at the first one, 0.5.12+ drops them silently. Everything else is the NVFP4 Nano-3 layout
    (of ``config``, default the tiny one; ``bench/prune.py`` passes larger dimensions).
    """
    layers = set(layers)
    c = config or nano3_tiny_config(quantized=True)
    out: list[Tensor] = []
    for t in nemotron_h_tensors(c, nano3_tiny_quant(layers)):
        out.append(t)
        m = _LEFTOVER_EXPERT_WEIGHT.fullmatch(t[0])
        if m and int(m.group(1)) in layers:
            n_out, n_in = t[2]
            out += _linear_tensors(t[0][: -len(".weight")], "NVFP4", n_out, n_in)[1:]
    return out


def _tiny_nano3_24434(out_dir: str) -> None:
    c = nano3_tiny_config(quantized=True)
    q = nano3_tiny_quant(EXPERTS_EXCLUDED_LAYERS)
    write_checkpoint(out_dir, nano3_leftover_expert_scale_tensors(), c, q, shards=4, extra_files=_sidecars(c, 4096))


def omni_tiny_tensors() -> list[Tensor]:
    c = omni_tiny_config()
    q = omni_quant_config(c["llm_config"])
    lm = nemotron_h_tensors(
        c["llm_config"],
        q,
        prefix="language_model.backbone",
        lm_head="language_model.lm_head.weight",
        mtp=True,
        mtp_prefix="mtp",
    )
    return lm + [(n, d, list(s)) for n, d, s in OMNI_TOWER_TENSORS]


def _tiny_omni(out_dir: str) -> None:
    c = omni_tiny_config()
    q = omni_quant_config(c["llm_config"])
    write_checkpoint(out_dir, omni_tiny_tensors(), c, q, shards=3, extra_files=_sidecars(c, 131072))


def _tiny_h8b(out_dir: str) -> None:
    c = h8b_tiny_config()
    write_checkpoint(out_dir, nemotron_h_tensors(c, None), c, None, shards=2, extra_files=_sidecars(c, 8192))


def tiny_examples() -> dict[str, Callable[[str], None]]:
    """name -> function(out_dir) writing that tiny example into out_dir."""
    return {
        "nano3-bf16": _tiny_nano3_bf16,
        "nano3-nvfp4": _tiny_nano3_nvfp4,
        "nano3-nvfp4-experts-excluded": _tiny_nano3_nvfp4_experts_excluded,
        "nano3-24434-leftover-expert-scales": _tiny_nano3_24434,
        "omni-nvfp4-24137": _tiny_omni,
        "h8b-dense": _tiny_h8b,
    }


# --------------------------------------------------------------------------------------------
# Full-size sparse layouts
# --------------------------------------------------------------------------------------------


def _totals(tensors: list[Tensor], shards: int) -> dict:
    return {
        "tensors": len(tensors),
        "bytes": sum(tensor_nbytes(d, s) for _n, d, s in tensors),
        "census": census(tensors),
        "shards": shards,
    }


def full_nano3_nvfp4_tensors() -> tuple[dict, dict, list[Tensor]]:
    c = _load_json(FIXTURES / "nano3-nvfp4" / "config.json")
    q = _load_json(FIXTURES / "nano3-nvfp4" / "hf_quant_config.json")
    return c, q, nemotron_h_tensors(c, q, router_dtype="F32")


def full_super_nvfp4_tensors() -> tuple[dict, dict, list[Tensor]]:
    c = _load_json(FIXTURES / "super-nvfp4" / "config.without-quantization_config.json")
    lists = _load_json(FIXTURES / "super-nvfp4" / "quantization.layer-lists.json")
    q = super_quant_config(c, lists)
    # The release's config.json carries the recipe too, as a flat ModelOpt quantization_config (5.7 MB):
    # engines that read only config.json (SGLang's Nemotron-H server-args override from 0.5.18) need it.
    layers = q["quantization"]["quantized_layers"]
    groups = {
        "group_0": {"targets": sorted(k for k, v in layers.items() if v["quant_algo"] == "FP8"), "num_bits": 8},
        "group_1": {"targets": sorted(k for k, v in layers.items() if v["quant_algo"] == "NVFP4"), "num_bits": 4},
    }
    c = dict(
        c,
        quantization_config={
            "config_groups": {
                name: {
                    "input_activations": {"dynamic": False, "num_bits": g["num_bits"], "type": "float"}
                    | ({"group_size": 16} if g["num_bits"] == 4 else {}),
                    "weights": {"dynamic": False, "num_bits": g["num_bits"], "type": "float"}
                    | ({"group_size": 16} if g["num_bits"] == 4 else {}),
                    "targets": g["targets"],
                }
                for name, g in groups.items()
            },
            "quantized_layers": layers,
            "ignore": [],
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
            "producer": q["producer"],
            "quant_method": "modelopt",
        },
    )
    return c, q, nemotron_h_tensors(c, q, router_dtype="BF16", kv_scales=True, mtp=True)


def full_nano3_bf16_tensors() -> tuple[dict, None, list[Tensor]]:
    c = _load_json(FIXTURES / "nano3-bf16" / "config.json")
    return c, None, nemotron_h_tensors(c, None, router_dtype="F32")


def _full(builder: Callable[[], tuple], shards: int) -> Callable[[str], dict]:
    def run(out_dir: str) -> dict:
        c, q, tensors = builder()
        write_checkpoint(out_dir, tensors, c, q, shards=shards, sparse=True)
        return _totals(tensors, shards)

    return run


def full_layouts() -> dict[str, Callable[[str], dict]]:
    """name -> function(out_dir) writing a FULL-size sparse layout; returns
    {"tensors", "bytes", "census": {dtype: count}, "shards"}."""
    return {
        "nano3-nvfp4": _full(full_nano3_nvfp4_tensors, 4),
        "super-nvfp4": _full(full_super_nvfp4_tensors, 17),
        "nano3-bf16": _full(full_nano3_bf16_tensors, 13),
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: generate.py tiny OUT_DIR [NAME ...]\n       generate.py full NAME OUT_DIR\n       generate.py list"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd = argv[0]
    if cmd == "list":
        print("tiny:", " ".join(tiny_examples()))
        print("full:", " ".join(full_layouts()))
        return 0
    if cmd == "tiny" and len(argv) >= 2:
        ex = tiny_examples()
        names = argv[2:] or list(ex)
        unknown = [n for n in names if n not in ex]
        if unknown:
            print(f"unknown example(s): {', '.join(unknown)}; known: {', '.join(ex)}", file=sys.stderr)
            return 2
        for n in names:
            d = os.path.join(argv[1], n)
            ex[n](d)
            print(d)
        return 0
    if cmd == "full" and len(argv) == 3:
        fl = full_layouts()
        if argv[1] not in fl:
            print(f"unknown layout {argv[1]!r}; known: {', '.join(fl)}", file=sys.stderr)
            return 2
        print(json.dumps(fl[argv[1]](argv[2]), indent=2))
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
