"""Checkpoint tensors whose elements differ from one another, so a misplaced slice or a lost write shows."""

from __future__ import annotations

import torch


def distinct(shape, dtype: str, g: torch.Generator) -> torch.Tensor:
    """A tensor of safetensors ``dtype`` (BF16, F32, U8, F8_E4M3) and ``shape`` drawn from ``g``: scales
    positive (F32 in [0.5, 1.5)), FP8 bytes finite."""
    if dtype == "BF16":
        return torch.randn(shape, generator=g).to(torch.bfloat16)
    if dtype == "F32":
        return torch.rand(shape, generator=g) + 0.5
    if dtype == "U8":
        return torch.randint(0, 255, shape, generator=g, dtype=torch.uint8)
    assert dtype == "F8_E4M3", dtype
    return torch.randint(0x30, 0x41, shape, generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
