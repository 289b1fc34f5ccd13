"""Parse and validate one safetensors shard header without reading tensor data.

We parse the header ourselves (8-byte little-endian length, then JSON) instead of
using ``safetensors.safe_open`` because prune needs absolute byte offsets, audit must
never map tensor data, and a hostile file must produce one clean error, not a Rust
panic or a multi-GB allocation. The checks mirror what the ``safetensors`` library
enforces at load time, so a header we accept is one the engine can open.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from functools import cached_property
from itertools import chain
from operator import itemgetter
from typing import NamedTuple, Protocol, cast

import msgspec

from nhcheck.errors import CheckpointError

#: Upper bound on the JSON header. The Hub client refuses headers above 25 MB;
#: a Super-120B shard header is ~1 MB. 100 MB leaves room and stops a length
#: field of 2**63 from becoming an allocation.
MAX_HEADER_BYTES = 100_000_000

#: Element size in bits of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
}

#: A ``\uD800``–``\uDFFF`` escape: the only way a lone surrogate (not Unicode; serde_json,
#: hence safetensors, refuses it) gets past UTF-8 decoding into a parsed string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class TensorInfo(NamedTuple):
    """One tensor as its shard header describes it; ``start``/``end`` are absolute file offsets.

    A NamedTuple rather than a dataclass: a Super-size checkpoint has 165k of these and
    audit must stay near the cost of parsing the headers, so construction cost matters.
    It is still an immutable fact.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    shard: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class ShardHeader(msgspec.Struct, frozen=True, dict=True):
    """A validated shard header: where the data starts and every tensor in header order."""

    path: str
    name: str
    header_len: int
    data_start: int
    file_size: int
    metadata: dict[str, str] | None
    has_metadata: bool
    tensors: tuple[TensorInfo, ...]

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start

    @cached_property
    def by_name(self) -> tuple[TensorInfo, ...]:
        """The tensors sorted by name, as ``safe_open().keys()`` lists them (the order a loader streams them)."""
        return tuple(sorted(self.tensors, key=_NAME))


_NAME = itemgetter(0)  # TensorInfo.name


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r} in header")
            seen.add(key)
    return out


def _no_constant(name: str) -> float:
    """``NaN``/``Infinity`` are Python extensions to JSON; safetensors refuses them."""
    raise ValueError(f"{name} is not a JSON value")


def _no_negative_zero(token: str) -> int:
    if token == "-0":
        raise ValueError("-0 is not an integer to safetensors (it reads a float)")
    return int(token)


def _colons_expected(n: int, has_metadata: bool, md: object) -> int:
    """Colons in the text of a duplicate-free header of ``n`` keys, three fields per entry, no colon in a name."""
    if not has_metadata:
        return 4 * n
    extra = 0
    if isinstance(md, dict):
        extra = len(md) + sum(str(k).count(":") + str(v).count(":") for k, v in md.items())
    return 4 * (n - 1) + 1 + extra


def _note_float(seen: list[str]):
    def hook(text: str) -> float:
        seen.append(text)
        return float(text)

    return hook


def _strict_entry(path: str, name: str, info: object, data_len: int) -> int:
    """Validate one header entry completely; returns its byte size or raises naming the problem."""
    if not isinstance(info, dict):
        raise CheckpointError(path, f"tensor {name!r}: entry is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise CheckpointError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise CheckpointError(path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or type(offsets[0]) is not int
        or type(offsets[1]) is not int
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}"
        )
    begin, end = offsets
    if end > data_len:
        raise CheckpointError(
            path,
            f"tensor {name!r}: data_offsets {offsets} run past the end of the file ({data_len} data bytes): "
            "truncated, incomplete download?",
        )
    numel = 1
    for d in shape:
        numel *= d
    nbits = numel * bits
    if nbits % 8 or nbits // 8 != end - begin:
        raise CheckpointError(
            path, f"tensor {name!r}: {dtype} {shape} needs {nbits / 8:g} bytes but data_offsets span {end - begin}"
        )
    return end - begin


class _Entry(msgspec.Struct, gc=False):
    """One header entry as msgspec decodes it; a field left at its default was absent (the strict path says so)."""

    dtype: str = ""
    shape: tuple[int, ...] | None = None
    data_offsets: tuple[int, int] | None = None


class _MetadataOnly(msgspec.Struct):
    """The ``__metadata__`` of a header, every tensor entry skipped unbuilt."""

    metadata: dict[str, str] | None = msgspec.field(default=None, name="__metadata__")


_DECODE_ENTRIES = msgspec.json.Decoder(dict[str, _Entry]).decode
_DECODE_METADATA = msgspec.json.Decoder(_MetadataOnly).decode
_DECODE_STR_MAP = msgspec.json.Decoder(dict[str, str]).decode
#: How safetensors writes a header that has metadata: that object first.
_METADATA_FIRST = b'{"__metadata__":{'


def _metadata(raw: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` of a header that has one (a string map, or None for ``null``).

    Where the header opens with it, as safetensors writes it, it is read up to its first ``}``: a string map has
    no nested object, and a ``}`` inside one of its strings cuts the slice inside that string, which then does
    not decode. Anywhere else, or if that slice does not decode, the whole header is decoded again, skipping
    every tensor entry.
    """
    if raw.startswith(_METADATA_FIRST):
        end = raw.find(b"}", len(_METADATA_FIRST))
        if end > 0:
            try:
                return _DECODE_STR_MAP(raw[len(_METADATA_FIRST) - 1 : end + 1])
            except msgspec.DecodeError:
                pass
    return _DECODE_METADATA(raw).metadata


def parse_header_bytes(raw: bytes, path: str, shard: str, file_size: int) -> ShardHeader:
    """Validate header JSON ``raw`` (without the 8-byte prefix) of a file of ``file_size`` bytes.

    A well-formed header takes ``parse_header_fast`` (msgspec decodes and type-checks every entry in C);
    anything it does not vouch for is parsed again by ``parse_header_strict``, which names the problem.
    """
    return parse_header_fast(raw, path, shard, file_size) or parse_header_strict(raw, path, shard, file_size)


def parse_header_fast(raw: bytes, path: str, shard: str, file_size: int) -> ShardHeader | None:
    """The header ``parse_header_strict`` would return, or None where it is not sure (then the strict path decides).

    Exact by construction: it accepts only a header that ``parse_header_strict`` accepts the same way. msgspec
    refuses what JSON refuses (bad UTF-8, NaN, trailing data, a BOM) and types what a legal header holds
    (a float or a bool is not an int); every check the strict path makes on a legal header is made here, and
    the cases the strict path re-parses for (a colon count other than the duplicate-free one, ``-0``, a
    surrogate escape) are handed to it. Only the tensor entries cost Python work, one short step each.
    """
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    # Each scan starts with one byte (``memchr``, ten times the speed of a two-byte search on 21 MB of headers):
    # a header without a minus sign or a backslash holds no ``-0`` and no escape at all.
    if data_len < 0 or (b"-" in raw and b"-0" in raw) or (b"\\" in raw and _SURROGATE_ESCAPE.search(raw)):
        return None
    try:
        entries = _DECODE_ENTRIES(raw)
        has_metadata = "__metadata__" in entries
        metadata = _metadata(raw) if has_metadata else None
    except (msgspec.DecodeError, RecursionError):
        return None
    if raw.count(b":") != _colons_expected(len(entries), has_metadata, metadata):
        return None
    if has_metadata:
        del entries["__metadata__"]
    # Each check over every entry at once, in C where it can be: the distinct (dtype, shape, span) triples (a few
    # dozen in 10k entries) against their byte sizes, then the spans' order (header order is file order in practice).
    entry_list = entries.values()
    given = [e.data_offsets for e in entry_list]
    if None in given:
        return None
    offsets = cast(list[tuple[int, int]], given)
    for dtype, shape, span in {(e.dtype, e.shape, o[1] - o[0]) for e, o in zip(entry_list, offsets, strict=True)}:
        if _entry_bytes(dtype, shape) != span:  # None for an unknown dtype, a bad shape or a part byte
            return None
    bounds = list(chain.from_iterable(offsets))  # begin, end, begin, end, ...
    if bounds[2::2] != bounds[1:-1:2] or bounds[:1] not in ([], [0]) or (bounds[-1] if bounds else 0) != data_len:
        pos = 0  # not back to back in header order: they must be in offset order (spans are not negative)
        for begin, end in sorted(offsets):
            if begin != pos:
                return None
            pos = end
        if pos != data_len:
            return None
    new = tuple.__new__  # no per-field __new__ call for 165k entries
    tensors = [
        new(TensorInfo, (name, e.dtype, e.shape, data_start + begin, data_start + end, shard))
        for (name, e), (begin, end) in zip(entries.items(), offsets, strict=True)
    ]
    return ShardHeader(path, shard, len(raw), data_start, file_size, metadata, has_metadata, tuple(tensors))


def _entry_bytes(dtype: str, shape: tuple[int, ...] | None) -> int | None:
    """Bytes a tensor of ``dtype``/``shape`` holds, or None for an unknown dtype, a bad shape or a part byte."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None or shape is None:
        return None
    numel = 1
    for d in shape:
        if d < 0:
            return None
        numel *= d
    nbits = numel * bits
    return None if nbits % 8 else nbits // 8


def parse_header_strict(raw: bytes, path: str, shard: str, file_size: int) -> ShardHeader:
    """Validate ``raw`` with the standard library, naming the first problem (each header the fast path declines)."""
    header_len = len(raw)
    data_start = 8 + header_len
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"header is not valid UTF-8 (byte {exc.start})") from None
    floats: list[str] = []
    try:
        # No legal header holds a float; the hook costs nothing when there are none and
        # lets the fast path below trust that every number it meets is an int.
        obj = json.loads(text, parse_float=_note_float(floats), parse_constant=_no_constant)
        # Duplicate keys: json keeps the last silently, so which bytes a name means would be
        # an accident (safetensors keeps one copy of a repeated name, refuses a repeated
        # field). Every key in the text has its own colon, and a header we accept has at
        # least 4 keys per entry (its name and three fields): so when the text holds exactly
        # that many colons nothing is shadowed. Any other count (an extra field, a colon in
        # a name, a duplicate) re-parses slowly to find the duplicate, if there is one.
        if isinstance(obj, dict) and raw.count(b":") != _colons_expected(
            len(obj), "__metadata__" in obj, obj.get("__metadata__")
        ):
            json.loads(text, object_pairs_hook=_no_duplicates)
        # ``-0`` is the int 0 to Python but the float -0.0 to serde_json, which safetensors
        # then refuses as an offset or a dimension; a name holding "-0" only costs a re-parse.
        if b"-0" in raw:
            json.loads(text, parse_int=_no_negative_zero)
    except RecursionError:
        raise CheckpointError(path, "header JSON is nested too deeply") from None
    except ValueError as exc:
        raise CheckpointError(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"header is a JSON {type(obj).__name__}, not an object")
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(
                path, "header holds a lone UTF-16 surrogate escape (not Unicode; safetensors refuses it)"
            ) from None

    has_metadata = "__metadata__" in obj
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(path, "__metadata__ must map strings to strings")

    data_len = file_size - data_start
    if data_len < 0:
        raise CheckpointError(path, "file is shorter than its header: truncated, incomplete download?")
    # Fast path: shapes repeat (every expert has the same ones), so each distinct
    # (dtype, shape) is validated once. It is exact only when no number can be a bool
    # or a float in disguise (True == 1, 1.0 == 1): no floats were parsed and the
    # text has no true/false token; otherwise every entry takes the strict check.
    fast = not floats and b"true" not in raw and b"false" not in raw
    sizes: dict[tuple[str, tuple], int] = {}
    tensors: list[TensorInfo] = []
    append, new = tensors.append, tuple.__new__  # no per-field __new__ call for 165k entries
    for name, info in obj.items():
        try:
            shape = info["shape"]
            key = (info["dtype"], tuple(shape))
            begin, end = info["data_offsets"]
            # A cached key vouches only for a list shape: tuple("") and tuple({}) are () too.
            # TypeError here: an unhashable dtype or shape element.
            nbytes = sizes.get(key) if fast and type(shape) is list else None
        except (TypeError, KeyError, ValueError) as err:
            _strict_entry(path, name, info, data_len)
            raise AssertionError("unreachable") from err  # pragma: no cover - _strict_entry raised
        if nbytes is None:
            nbytes = sizes[key] = _strict_entry(path, name, info, data_len)
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= data_len or end - begin != nbytes:
            _strict_entry(path, name, info, data_len)
        append(new(TensorInfo, (name, key[0], key[1], data_start + begin, data_start + end, shard)))

    # Contiguity: sorted by offset, every tensor must start where the previous ended
    # (no overlap, no gap) and the last must end at the end of the file (no trailing bytes).
    pos = data_start
    for t in tensors:  # header order is file order in practice: one pass, no sort
        if t[3] != pos:
            pos = _contiguous_end(path, tensors, data_start)
            break
        pos = t[4]
    if pos != file_size:
        raise CheckpointError(path, f"{file_size - pos} trailing bytes after the last tensor")
    return ShardHeader(path, shard, header_len, data_start, file_size, metadata, has_metadata, tuple(tensors))


def _contiguous_end(path: str, tensors: list[TensorInfo], data_start: int) -> int:
    """Sorted by offset, every tensor must start where the previous ended (no overlap, no gap); the end of the last."""
    pos = data_start
    for t in sorted(tensors, key=_span):
        if t.start < pos:
            raise CheckpointError(
                path, f"tensor {t.name!r} overlaps the previous tensor (offset {t.start - data_start})"
            )
        if t.start > pos:
            raise CheckpointError(path, f"gap of {t.start - pos} bytes before tensor {t.name!r}")
        pos = t.end
    return pos


def _span(t: TensorInfo) -> tuple[int, int]:
    return (t.start, t.end)


class Readable(Protocol):
    """What ``read_header`` needs of its source: sequential reads (an open binary file, or a remote range reader)."""

    def read(self, n: int, /) -> bytes: ...


def read_header(fh: Readable, path: str, shard: str, file_size: int) -> ShardHeader:
    """Read and validate the header of an open shard; reads at most 8 + header bytes."""
    if file_size < 8:
        raise CheckpointError(path, f"file is {file_size} bytes, too short for a safetensors header")
    prefix = fh.read(8)
    if len(prefix) != 8:
        raise CheckpointError(path, "file is truncated inside the header length: incomplete download?")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len == 0:
        raise CheckpointError(path, "header length is 0 (empty or zero-filled file)")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise CheckpointError(
            path,
            f"header length {header_len} is larger than the file ({file_size} bytes): truncated, incomplete download?",
        )
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise CheckpointError(path, "file is truncated inside the header: incomplete download?")
    return parse_header_bytes(raw, path, shard, file_size)


def open_regular(path: str) -> int:
    """Open ``path`` read-only as a file descriptor, refusing anything but a regular file.

    ``O_NONBLOCK`` because a FIFO named ``x.safetensors`` would otherwise block the open
    forever waiting for a writer; the type is checked on the open descriptor, so a file
    swapped after a ``stat`` cannot slip through.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointError(path, "is a directory, not a regular file")
        if not stat.S_ISREG(mode):
            raise CheckpointError(path, "is a device, FIFO or socket, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_shard(path: str, shard: str | None = None) -> ShardHeader:
    """Open ``path`` (a regular file) and parse its header."""
    shard = shard if shard is not None else os.path.basename(path)
    try:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            return read_header(fh, path, shard, os.fstat(fd).st_size)
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a safetensors file") from None
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except PermissionError:
        raise CheckpointError(path, "permission denied") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None


def serialize_header(
    tensors: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None, has_metadata: bool
) -> bytes:
    """Build a header (8-byte length + JSON padded with spaces to 8 bytes) as safetensors writes it.

    ``tensors`` holds (name, dtype, shape, begin, end) with offsets relative to the data section,
    in the order the keys should appear.
    """
    obj: dict[str, object] = {}
    if has_metadata:
        obj["__metadata__"] = metadata
    for name, dtype, shape, begin, end in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw
