"""A one-element scale loaded into a per-partition scale vector: which slots it fills, and what is left.

One rule for ``audit`` (from the headers) and ``load`` (from the bytes it wrote), so the two reach the
same verdict. A module fused in the checkpoint (Mamba ``in_proj``: one scalar ``input_scale`` /
``weight_scale`` / ``weight_scale_2`` for five logical slots) is loaded with no shard id; whether that scalar
fills every slot or slot 0 only is the engine's loader semantics (``Engine.loader_semantics``: SGLang before
0.5.16, vLLM 0.11.0 – 0.15.x and 0.17.0 – 0.19.x write slot 0 only). What the unwritten slots then hold
depends on the quant method, alike in both engines: ModelOpt FP8 fills them with the ``finfo(float32).min``
sentinel that ``requantize_with_max_scale`` reads as "fused in the checkpoint" and that the max over the
vector never picks (by design), NVFP4 / W4A16 leave ``torch.empty`` memory that ``process_weights_after_loading``
takes the max over (an error). Goldens: SGLang's TP-1 rank maps (tests/golden/tp), vLLM's
``tests/golden/vllm_scalar_slots`` (oracle/vllm/scalar_slots.py) and TP-1 rank maps (tests/golden/tp).
"""

from __future__ import annotations

from typing import Literal

from nhcheck.manifest import Param
from nhcheck.quant import A16_LINEAR, FP4_LINEAR, FP8_LINEAR, NVFP4_LINEAR

#: Finding code for the NVFP4 / W4A16 case.
SLOT0 = "scale-slot0-only"
#: Linear methods whose scale vectors ``create_weights`` makes with ``torch.empty``: SGLang's NVFP4 and W4A16,
#: vLLM's NVFP4 (``ModelOptNvFp4LinearMethod``, up to 0.29.x).
_EMPTY_METHODS = frozenset({FP4_LINEAR, A16_LINEAR, NVFP4_LINEAR})
#: The first release of each engine whose ``MergedColumnParallelLinear.weight_loader_v2`` fills every slot.
EVERY_SLOT_FROM = {"sglang": "0.5.16", "vllm": "0.20.0"}


def is_scale(name: str) -> bool:
    return "scale" in name.rsplit(".", 1)[-1]


def scalar_into_vector(p: Param, shape: tuple[int, ...]) -> bool:
    """A one-element tensor into a multi-slot, default-loaded per-partition scale vector."""
    n = 1
    for d in shape:
        n *= d
    return (
        n == 1
        and p.loader == "default"
        and len(p.shape) == 1
        and p.shape[0] > 1
        and tuple(shape) != tuple(p.shape)
        and is_scale(p.name)
    )


def unwritten_kind(p: Param, written: int) -> Literal["sentinel", "empty"] | None:
    """What a per-partition scale vector with only ``written`` == 1 element (slot 0) holds elsewhere."""
    if written != 1 or p.loader != "default" or len(p.shape) != 1:
        return None
    suffix = p.name.rsplit(".", 1)[-1]
    if p.quant_method == FP8_LINEAR and suffix in ("weight_scale", "input_scale"):
        return "sentinel"
    if p.quant_method in _EMPTY_METHODS and suffix in ("weight_scale_2", "input_scale"):
        return "empty"
    return None


SENTINEL_MESSAGE = (
    "slot 0 holds the checkpoint's scalar; the other slots keep the engine's finfo(float32).min sentinel, "
    "which requantize_with_max_scale reads as fused in the checkpoint"
)


def empty_message(engine_label: str, p: Param, missing: str) -> str:
    """Why a slot-0-only NVFP4 / W4A16 scale is an error, and which release fills every slot.

    ``engine_label``: ``sglang 0.5.11`` / ``vllm 0.19.0`` (``EngineId.label``)."""
    engine = engine_label.split(" ", 1)[0]
    return (
        f"{engine_label} writes the checkpoint's one scalar into slot 0 only ({missing} keep torch.empty memory) "
        "and process_weights_after_loading takes the max over every slot, so leftover memory can become the "
        "scale; "
        + (
            "W4A16 takes MergedColumnParallelLinear's v1 weight_loader on every version"
            if p.quant_method == A16_LINEAR
            else f"{engine} {EVERY_SLOT_FROM[engine]} and later fill every slot "
            "(MergedColumnParallelLinear.weight_loader_v2)"
        )
    )


def missing_text(p: Param) -> str:
    """The slots a slot-0-only write leaves, in load's words (``elements 1..4``)."""
    return f"elements 1..{p.shape[0] - 1}"
