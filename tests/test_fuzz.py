"""Fuzz the shard header parser: whatever the bytes, only a clean ``CheckpointError`` comes out.

Three generators: structured headers (valid tensors, then one perturbation of a field,
an offset, a key or the JSON text), raw header bytes, and whole files through
``read_header``. Each accepted header is also checked against the safetensors
library itself: a header nhcheck accepts must be one the engine can open.

CI runs a bounded number of examples (``NHCHECK_FUZZ_EXAMPLES`` per test, default 150,
so ~450 in all); ``fuzz/fuzz_header.py`` runs the same properties for longer.
"""

from __future__ import annotations

import io
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nhcheck.errors import CheckpointError
from nhcheck.safetensors_header import (
    DTYPE_BITS,
    ShardHeader,
    parse_header_bytes,
    parse_header_fast,
    parse_header_strict,
    read_header,
)

try:
    from safetensors import deserialize as _st_deserialize
except ImportError:  # pragma: no cover - safetensors is a dependency, but keep the fuzz usable without it
    _st_deserialize = None

EXAMPLES = int(os.environ.get("NHCHECK_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("NHCHECK_FUZZ_RANDOM") is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

#: Dtypes whose element size makes any shape byte-aligned (sub-byte ones need care the fuzz does not model).
WHOLE_BYTE = sorted(d for d, b in DTYPE_BITS.items() if b % 8 == 0)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24).filter(lambda s: s != "__metadata__")


@st.composite
def valid_tensors(draw):
    """(name, dtype, shape) list whose contiguous layout is a valid shard."""
    n = draw(st.integers(0, 6))
    out = []
    for name in draw(st.lists(names, min_size=n, max_size=n, unique=True)):
        dtype = draw(st.sampled_from(WHOLE_BYTE))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        out.append((name, dtype, shape))
    return out


def layout(tensors) -> tuple[dict, int]:
    header, off = {}, 0
    for name, dtype, shape in tensors:
        n = DTYPE_BITS[dtype] // 8
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    return header, off


PERTURB = (
    "none",
    "field",
    "offset",
    "shape",
    "dtype",
    "metadata",
    "dup-key",
    "shadow-key",
    "text",
    "size",
    "drop-field",
)


@st.composite
def headers(draw):
    """(header JSON bytes, data length): a valid layout with at most one perturbation."""
    tensors = draw(valid_tensors())
    header, size = layout(tensors)
    if draw(st.booleans()):
        header = {"__metadata__": {"format": "pt"}, **header}
    kind = draw(st.sampled_from(PERTURB))
    keys = [k for k in header if k != "__metadata__"]
    victim = header[draw(st.sampled_from(keys))] if keys else None
    if kind == "field" and victim is not None:
        victim[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_value)
    elif kind == "offset" and victim is not None:
        i = draw(st.integers(0, 1))
        victim["data_offsets"][i] += draw(st.integers(-16, 16))
    elif kind == "shape" and victim is not None:
        victim["shape"] = draw(
            st.lists(st.one_of(st.integers(-3, 2**64), st.floats(0, 4), st.booleans()), max_size=3)
            | st.sampled_from([{}, "", None, {"0": 1}, "12"])
        )
    elif kind == "dtype" and victim is not None:
        victim["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.text(max_size=6)))
    elif kind == "metadata":
        header["__metadata__"] = draw(json_value)
    elif kind == "drop-field" and victim is not None:
        victim.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=draw(st.booleans())).encode()
    if kind == "dup-key" and keys:
        k = draw(st.sampled_from(keys))
        raw = raw[:-1] + b"," + json.dumps({k: header[k]})[1:-1].encode() + b"}"
    elif kind == "shadow-key" and keys:
        # an earlier, different value under the same name: json keeps the later one silently
        k = draw(st.sampled_from(keys))
        raw = b"{" + json.dumps({k: draw(json_value)})[1:-1].encode() + b"," + raw[1:]
    elif kind == "text" and raw:
        pos = draw(st.integers(0, len(raw)))
        junk = draw(
            st.sampled_from(
                [
                    b"",
                    b"NaN",
                    b"Infinity",
                    b"\\ud800",
                    b'"',
                    b"{",
                    b"]",
                    b"\xff",
                    b"\x00",
                    b"true",
                    b"1e999",
                    b"-0",
                    b"-",
                    b"[" * 3000,
                ]
            )
        )
        cut = draw(st.integers(0, 4))
        raw = raw[:pos] + junk + raw[pos + cut :]
    elif kind == "size":
        size += draw(st.integers(-8, 8))
    raw += b" " * draw(st.integers(0, 7))
    return raw, max(size, 0)


def engine_accepts(raw: bytes, data_len: int) -> bool:
    blob = struct.pack("<Q", len(raw)) + raw + b"\0" * data_len
    try:
        _st_deserialize(blob)
    except Exception:  # noqa: BLE001 - any refusal by the engine's parser counts
        return False
    return True


def check_parse(raw: bytes, data_len: int) -> ShardHeader | CheckpointError:
    """The property: a ShardHeader, or a one-line CheckpointError naming the file; nothing else."""
    try:
        h = parse_header_bytes(raw, "/ckpt/x.safetensors", "x.safetensors", 8 + len(raw) + data_len)
    except CheckpointError as exc:
        assert str(exc).startswith("/ckpt/x.safetensors: ")
        return exc
    assert all(t.name.encode("utf-8") for t in h.tensors)  # every name is real Unicode
    return h


@FUZZ
@given(headers())
def test_structured_headers_agree_with_the_engine(case):
    """Only CheckpointError comes out, and nhcheck accepts exactly what safetensors accepts.

    The one deliberate difference: a key repeated in one header (safetensors silently keeps
    one copy; nhcheck refuses, since which bytes load would be an accident).
    """
    raw, data_len = case
    result = check_parse(raw, data_len)
    if _st_deserialize is None:
        return
    accepted = engine_accepts(raw, data_len)
    if isinstance(result, ShardHeader):
        assert accepted, raw[:300]
    elif accepted:
        assert "duplicate key" in result.problem, (result.problem, raw[:300])


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 64))
def test_raw_header_bytes_only_raise_checkpoint_error(raw, data_len):
    check_parse(raw, data_len)


@FUZZ
@given(st.binary(max_size=300) | headers().map(lambda c: struct.pack("<Q", len(c[0])) + c[0] + b"\0" * c[1]))
def test_whole_files_only_raise_checkpoint_error(blob):
    try:
        read_header(io.BytesIO(blob), "/ckpt/x.safetensors", "x.safetensors", len(blob))
    except CheckpointError:
        pass


#: Inputs the fuzzers found (or that sit next to them).
FOUND_BY_FUZZING = [
    b'{"a":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":{"x":1},"shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}',
    b'{"a\\udcff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"k":"\\ud800"}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4]}}',
    b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[false,4]}}',
    b'{"a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":"04"}}',
    b'{"a":{"dtype":"F32","shape":{"0":1},"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":{"0":0,"1":4}}}',
    b'{"a":{},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":5,"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"doffsets":[0,0]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"__metadata__":{},"__metadata__":{"f":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1,-0],"data_offsets":[0,0]}}',
]


@pytest.mark.parametrize("raw", FOUND_BY_FUZZING)
def test_found_by_fuzzing(raw):
    """Inputs the fuzzers found (or that sit next to them): each is a clean refusal."""
    with pytest.raises(CheckpointError):
        parse_header_bytes(raw, "/ckpt/x.safetensors", "x.safetensors", 8 + len(raw) + 4)


@pytest.mark.parametrize("shape", [b"{}", b'""', b"null", b'{"0":1}'])
def test_a_shape_that_is_not_a_list_is_refused_even_after_a_valid_scalar(shape):
    """The per-(dtype, shape) cache once accepted ``tuple({}) == ()`` as a scalar (found by a long hypothesis run)."""
    raw = (
        b'{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},'
        b'"b":{"dtype":"F32","shape":' + shape + b',"data_offsets":[4,8]}}'
    )
    with pytest.raises(CheckpointError, match="'b': shape must be a list"):
        parse_header_bytes(raw, "/x", "x", 8 + len(raw) + 8)


def test_paired_surrogate_escape_is_a_valid_name():
    raw = b'{"\\ud83d\\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    h = parse_header_bytes(raw, "/x", "x", 8 + len(raw) + 4)
    assert h.tensors[0].name == "\U0001f600"


def check_fast_path(raw: bytes, data_len: int) -> None:
    """The msgspec fast path returns exactly the strict parser's header, or declines (None) and lets it decide."""
    args = ("/ckpt/x.safetensors", "x.safetensors", 8 + len(raw) + data_len)
    fast = parse_header_fast(raw, *args)
    if fast is None:
        return
    assert parse_header_strict(raw, *args) == fast, raw[:300]


@FUZZ
@given(headers())
def test_fast_path_agrees_with_the_strict_parser_on_structured_headers(case):
    check_fast_path(*case)


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 64))
def test_fast_path_agrees_with_the_strict_parser_on_raw_bytes(raw, data_len):
    check_fast_path(raw, data_len)


@FUZZ
@given(valid_tensors(), st.booleans(), st.booleans())
@example([("0", "BF16", []), ("00", "BF16", [])], False, True)  # out of header order: names must keep their spans
def test_fast_path_takes_every_well_formed_header(tensors, metadata, shuffled):
    """Not a decline in disguise: a header as safetensors writes it (any key order) is parsed by the fast path."""
    header, size = layout(tensors)
    entries = list(header.items())[:: -1 if shuffled else 1]
    raw = json.dumps(({"__metadata__": {"format": "pt"}} if metadata else {}) | dict(entries)).encode()
    if b"-0" in raw or b":" in b"".join(name.encode() for name, _ in entries) or b"\\ud" in raw.lower():
        return  # handed to the strict parser on purpose: a "-0" token, a colon in a name, a surrogate escape
    args = ("/x", "x", 8 + len(raw) + size)
    fast = parse_header_fast(raw, *args)
    assert fast is not None, raw[:300]
    assert fast == parse_header_strict(raw, *args)


@pytest.mark.parametrize("raw", FOUND_BY_FUZZING)
def test_fast_path_declines_what_fuzzing_found(raw):
    assert parse_header_fast(raw, "/x", "x", 8 + len(raw) + 4) is None


@pytest.mark.parametrize(
    "entry",
    [
        b'"shape":[-1,-4],"data_offsets":[0,16]',  # the element count of two negative dimensions is positive
        b'"shape":[4],"data_offsets":[16,0]',  # a negative span
    ],
)
def test_fast_path_declines_negative_numbers_whose_sizes_multiply_out(entry):
    """A size check by products (bits = 8 × bytes) would pass two negative dimensions, and a size by offsets a
    backwards span: the fast path declines both, and the strict parser names the problem."""
    raw = b'{"a":{"dtype":"F32",' + entry + b"}}"
    assert parse_header_fast(raw, "/x", "x", 8 + len(raw) + 16) is None
    with pytest.raises(CheckpointError):
        parse_header_bytes(raw, "/x", "x", 8 + len(raw) + 16)


@pytest.mark.parametrize(
    "metadata",
    [
        b'"__metadata__":{"format":"pt"}',
        b'"__metadata__":{"a}":"b}\\"}","c":"d"}',  # braces inside its strings: the short read declines
        b'"__metadata__":{}',
        b'"__metadata__":null',
        b'"__metadata__":{"a":{"b":"c"}}',  # not a string map: refused by both paths
        b'"__metadata__":{"a":1}',  # nor this, though its short read is valid JSON
    ],
)
@pytest.mark.parametrize("first", [True, False])
def test_metadata_read_short_or_whole_agrees_with_the_strict_parser(metadata, first):
    """The fast path reads a leading ``__metadata__`` up to its first ``}``; anywhere else, or where that slice
    is not the whole object, it decodes the header again. Either way it returns the strict parser's header."""
    entry = b'"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = b"{" + (metadata + b"," + entry if first else entry + b"," + metadata) + b"}"
    args = ("/x", "x", 8 + len(raw) + 4)
    try:
        want = parse_header_strict(raw, *args)
    except CheckpointError:
        assert parse_header_fast(raw, *args) is None
        return
    fast = parse_header_fast(raw, *args)
    assert fast is None or fast == want
    assert fast is not None or b"null" in metadata  # a string map is read by the fast path, short or whole
