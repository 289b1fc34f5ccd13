"""Dtype facts, in one place: checkpoint (safetensors) and runtime (torch) dtype names, sizes, families.

The audit, prune, value checks and load all ask the same questions of a dtype (is it a float, is it
packed quantized storage, how many bytes an element takes, which torch dtype holds it); the answers
live here. Names only: this module must not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable

#: safetensors dtype → torch dtype name (F4/F6 have none: such a tensor cannot be copied).
TORCH_DTYPE = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
#: Bytes per element of a torch dtype name.
ITEMSIZE = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,
}
#: Unquantized float storage: runtime (torch) names and checkpoint (safetensors) names.
FLOAT_PARAM = frozenset({"bfloat16", "float16", "float32", "float64"})
FLOAT_CKPT = frozenset({"BF16", "F16", "F32", "F64"})
#: Quantized (packed or 8-bit) storage: checkpoint names and the runtime parameters that hold them.
PACKED_CKPT = frozenset({"U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})
PACKED_PARAM = frozenset({"uint8", "int8", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float4_e2m1fn_x2"})
#: Signed integer torch dtype of each element size (a float's bit pattern, compared as one word).
INT_OF_SIZE = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def numel(shape: Iterable[int]) -> int:
    """Elements of a shape (1 for a scalar's ``()``)."""
    n = 1
    for d in shape:
        n *= d
    return n
