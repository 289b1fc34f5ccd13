"""Scale-value sanity (``audit --values``): read the scale tensors, and only them, and flag garbage.

A zero, negative or non-finite global scale, or an FP8 block-scale tensor that is all
zero or holds NaN, makes the engine compute garbage with no error anywhere: the load
succeeds, the server starts, the model babbles. Scales are a tiny fraction of a
checkpoint, so checking them is cheap next to loading it; the rest of the audit stays
header-only. Bytes come from ``os.pread`` on the byte ranges the headers give, decoded
with the standard library (no torch, no numpy). Only tensors the engine loads are read:
a garbage scale the engine drops cannot hurt the model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import sys
from array import array
from collections.abc import Iterable
from typing import NamedTuple

from nhcheck import collapse
from nhcheck.audit import AuditReport
from nhcheck.dtypes import FLOAT_CKPT
from nhcheck.errors import CheckpointError, UsageError
from nhcheck.fileio import read_exact
from nhcheck.findings import Finding
from nhcheck.safetensors_header import ShardHeader, TensorInfo, open_regular

#: Global (per-tensor or per-channel) scales: one float, or a short float vector.
SCALAR_LEAVES = frozenset({"weight_scale_2", "input_scale", "k_scale", "v_scale", "kv_scale"})
#: Float8 e4m3fn: no infinities; 0x7F/0xFF are NaN; 0x00/0x80 are +0/-0.
E4M3_NAN = (b"\x7f", b"\xff")
E4M3_ZEROS = b"\x00\x80"
#: Read in pieces so a large block-scale tensor never sits in memory whole.
CHUNK = 1 << 24
#: A "scale" bigger than this is not one (the largest real block-scale tensor, Super's
#: lm_head, is ~40 MB); a hostile header must not turn --values into a 100 GB read.
MAX_SCALE_BYTES = 1 << 30

_SILENT = "; the engine loads it as is, the module computes garbage and nothing reports an error"


class ScaleCheck(NamedTuple):
    """One scale tensor to read, and how to judge it (``float`` values or ``e4m3`` block bytes)."""

    tensor: TensorInfo
    kind: str


@dataclasses.dataclass(frozen=True)
class ValueScan:
    """What ``--values`` read and found; findings are already collapsed per module family."""

    findings: tuple[Finding, ...]
    tensors_read: int
    bytes_read: int


def scale_kind(t: TensorInfo) -> str | None:
    """``float`` for a global scale, ``e4m3`` for an FP8 block-scale tensor, None for anything else."""
    leaf = t.name.rpartition(".")[2]
    if leaf in SCALAR_LEAVES or leaf == "weight_scale":
        if t.dtype in FLOAT_CKPT:
            return "float"  # FP8 checkpoints keep per-tensor weight_scale as F32 too
        if leaf == "weight_scale" and t.dtype == "F8_E4M3":
            return "e4m3"
    return None


def checks_for(report: AuditReport) -> list[ScaleCheck]:
    """The scale tensors the engine loads (and the user did not --ignore), in file order."""
    out = []
    for r in report.records:
        if r.outcome.outcome == "load" and not r.ignored:
            kind = scale_kind(r.tensor)
            if kind is not None:
                out.append(ScaleCheck(r.tensor, kind))
    out.sort(key=lambda c: (c.tensor.shard, c.tensor.start))
    return out


# ---------------------------------------------------------------------------
# decoding and judging


def decode_floats(dtype: str, data: bytes) -> Iterable[float]:
    """Little-endian F32/F64/F16/BF16 bytes as Python floats."""
    if dtype == "F16":
        return struct.unpack(f"<{len(data) // 2}e", data)
    if dtype == "BF16":
        # BF16 is the top half of an F32: put each pair of bytes above two zero bytes.
        wide = bytearray(2 * len(data))
        wide[2::4] = data[0::2]
        wide[3::4] = data[1::2]
        data, dtype = bytes(wide), "F32"
    arr = array("f" if dtype == "F32" else "d", data)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def judge_floats(values: Iterable[float]) -> str | None:
    """The worst problem of a float scale: non-finite, then zero, then negative."""
    vals = values if isinstance(values, (array, tuple)) else tuple(values)
    if not all(map(math.isfinite, vals)):
        return "nonfinite"
    if 0.0 in vals:
        return "zero"
    if vals and min(vals) < 0:
        return "negative"
    return None


def e4m3_has_nan(data: bytes) -> bool:
    """Any NaN byte in float8_e4m3fn data (``in`` is a memchr: no decoding, no counting)."""
    return E4M3_NAN[0] in data or E4M3_NAN[1] in data


def e4m3_all_zero(data: bytes) -> bool:
    """Every byte of float8_e4m3fn data is +0 or -0.

    Real block scales fail the first test at their first byte; all-zero data (a sparse
    hole, a zeroed export) is confirmed by a memcmp against zeros, and only a mix of
    +0 and -0 takes the slower strip.
    """
    if not data or data[:1] not in (b"\x00", b"\x80"):
        return False
    return data == bytes(len(data)) or not data.lstrip(E4M3_ZEROS)


def describe(t: TensorInfo, kind: str, problem: str) -> str:
    """``weight_scale_2 is zero``: what is wrong with one tensor, in words that group well (no numbers)."""
    leaf = t.name.rpartition(".")[2]
    if kind == "e4m3":
        return f"{leaf} " + {"nonfinite": "FP8 blocks include NaN", "zero": "FP8 blocks are all zero"}[problem]
    if t.numel == 1:
        return f"{leaf} " + {"nonfinite": "is NaN or infinite", "zero": "is zero", "negative": "is negative"}[problem]
    return (
        f"{leaf} "
        + {"nonfinite": "has NaN or infinite values", "zero": "has zero values", "negative": "has negative values"}[
            problem
        ]
    )


def module_findings(bad: list[tuple[TensorInfo, str]]) -> list[Finding]:
    """One finding per family of modules with the same problems, e.g. ``….experts.{0…127}.up_proj ×2944``.

    ``bad`` holds (tensor, description) pairs; the finding names the first tensor.
    """
    per_module: dict[str, list[tuple[TensorInfo, str]]] = {}
    for t, what in bad:
        per_module.setdefault(t.name.rpartition(".")[0], []).append((t, what))
    items = []
    for module, entries in per_module.items():
        entries.sort(key=lambda e: e[1])
        items.append((", ".join(what for _, what in entries), module, entries[0][0]))
    out = []
    for problems, name, count, firsts in collapse.group(items):
        first = firsts[0]
        label = f"{name} ×{count:,}" if count > 1 else name
        out.append(Finding("error", "bad-scale", f"{label}: {problems}{_SILENT}", first.shard, first.name))
    return out


# ---------------------------------------------------------------------------
# reading


def _pread_exact(fd: int, path: str, start: int, n: int) -> bytes:
    short = f"file ended while reading bytes {start}..{start + n} (changed since its header was read?)"
    return read_exact(fd, path, start, n, short)


def _judge(fd: int, shard: ShardHeader, c: ScaleCheck) -> str | None:
    t = c.tensor
    if c.kind == "float":
        return judge_floats(decode_floats(t.dtype, _pread_exact(fd, shard.path, t.start, t.nbytes)))
    all_zero = t.nbytes > 0
    for pos in range(t.start, t.end, CHUNK):
        chunk = _pread_exact(fd, shard.path, pos, min(CHUNK, t.end - pos))
        if e4m3_has_nan(chunk):
            return "nonfinite"
        all_zero = all_zero and e4m3_all_zero(chunk)
    return "zero" if all_zero else None


def scan(report: AuditReport) -> ValueScan:
    """Read every loaded scale tensor of the audited checkpoint and judge its values."""
    ckpt = report.checkpoint
    checks = checks_for(report)
    shards = {s.name: s for s in ckpt.shards}
    if ckpt.bytes_transferred is not None and not all(os.path.isfile(s.path) for s in shards.values()):
        # headers fetched from the Hub by range request: the tensor bytes are not on this machine
        raise UsageError(
            "--values reads scale bytes from the shard files; download the checkpoint "
            f"(hf download {ckpt.source}) and audit it again"
        )
    bad: list[tuple[TensorInfo, str]] = []
    notes: list[Finding] = []
    n_bytes = 0
    i = 0
    while i < len(checks):
        shard = shards[checks[i].tensor.shard]
        j = i
        while j < len(checks) and checks[j].tensor.shard == shard.name:
            j += 1
        n_bytes += _scan_shard(shard, checks[i:j], bad, notes)
        i = j
    bad.sort(key=lambda b: b[0].name)
    return ValueScan(tuple(module_findings(bad) + notes), len(checks), n_bytes)


def _scan_shard(
    shard: ShardHeader, checks: list[ScaleCheck], bad: list[tuple[TensorInfo, str]], notes: list[Finding]
) -> int:
    try:
        fd = open_regular(shard.path)
    except FileNotFoundError:
        raise CheckpointError(shard.path, "file not found (removed since its header was read?)") from None
    except OSError as exc:
        raise CheckpointError(shard.path, f"cannot read: {exc.strerror or exc}") from None
    n_bytes = 0
    try:
        if os.fstat(fd).st_size != shard.file_size:
            raise CheckpointError(shard.path, "file size changed since its header was read")
        if hasattr(os, "posix_fadvise"):
            # Scales are scattered between the weights; announcing every range up front lets
            # the kernel read them ahead in parallel (a third off a cold read of Nano-3's 1.9 GB).
            for c in checks:
                if c.tensor.nbytes <= MAX_SCALE_BYTES:
                    os.posix_fadvise(fd, c.tensor.start, c.tensor.nbytes, os.POSIX_FADV_WILLNEED)
        for c in checks:
            t = c.tensor
            if t.nbytes > MAX_SCALE_BYTES:
                notes.append(
                    Finding(
                        "info",
                        "scale-unchecked",
                        f"{t.nbytes:,} bytes is too large for a scale tensor; not read",
                        t.shard,
                        t.name,
                    )
                )
                continue
            problem = _judge(fd, shard, c)
            n_bytes += t.nbytes
            if problem is not None:
                bad.append((t, describe(t, c.kind, problem)))
    except OSError as exc:
        raise CheckpointError(shard.path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return n_bytes


def with_values(report: AuditReport, values: ValueScan) -> AuditReport:
    """The report with the value findings merged in; a bad scale makes a loadable checkpoint ``broken``."""
    verdict = report.verdict
    if verdict in ("clean", "orphans", "incomplete") and any(f.severity == "error" for f in values.findings):
        verdict = "broken"
    return dataclasses.replace(report, findings=report.findings + values.findings, verdict=verdict)
