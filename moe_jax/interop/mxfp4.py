"""MXFP4 weights as the released GPT-OSS checkpoints store their experts, dequantized on import
(pure NumPy).

MXFP4 (OCP Microscaling Formats (MX) Specification v1.0, 2023): blocks of 32 values share one
E8M0 scale (a uint8 biased exponent: 2 ** (scale - 127)); each value is an FP4 E2M1 code (1
sign, 2 exponent, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), two codes per
byte, the low nibble first. The GPT-OSS checkpoints (the model card, OpenAI 2025, Sec. 2: the
MoE weights, most of the parameters, are post-trained to MXFP4) store an expert tensor X of
layout [E, in, out] as
`X_blocks` [E, out, in / 32, 16] and `X_scales` [E, out, in / 32], both uint8: the transposed
weight, quantized along its input dimension.

    names = packed_names(checkpoint_names)       # {X: (X_blocks, X_scales)}
    weight = unpack_expert(blocks, scales)       # [E, in, out] float32

Dequantization is exact (every MXFP4 value is a float32 and a bfloat16); export writes the
float weights, unquantized.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# The FP4 E2M1 value of each 4-bit code (code 8 is -0).
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
SCALE_BIAS = 127  # E8M0: a scale byte s means 2 ** (s - 127)
BLOCK = 32  # values per scale
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., G, 16] uint8 blocks and [..., G] uint8 scales -> [..., G * 32] float32.

    Value j of block g is E2M1_VALUES[code] * 2 ** (scales[g] - 127), its code the low nibble
    of byte j // 2 for even j, the high nibble for odd j.
    """
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8; got {blocks.dtype} and "
                         f"{scales.dtype}: pass the checkpoint's *_blocks and *_scales tensors.")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks [..., G, {BLOCK // 2}] and scales [..., G] disagree: "
                         f"blocks {blocks.shape}, scales {scales.shape}; pass a tensor's "
                         "*_blocks with its own *_scales.")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [..., G, 16, 2]
    values = E2M1_VALUES[codes].reshape(*scales.shape, BLOCK)
    exponents = scales.astype(np.int32) - SCALE_BIAS
    out = np.ldexp(values, exponents[..., None]).astype(np.float32)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def unpack_expert(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An expert tensor [E, in, out] float32 from its `X_blocks` [E, out, in / 32, 16] and
    `X_scales` [E, out, in / 32] (the stored weight is the transpose)."""
    return np.ascontiguousarray(np.swapaxes(dequantize(blocks, scales), -1, -2))


def unpacked_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The [E, in, out] shape `unpack_expert` gives for blocks of shape [E, out, in / 32, 16]."""
    *lead, out, groups, _ = blocks_shape
    return (*lead, groups * BLOCK, out)


def packed_names(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{X: (X_blocks, X_scales)} for every tensor X stored as MXFP4 among `names`."""
    names = set(names)
    out = {}
    for name in names:
        if name.endswith(BLOCKS_SUFFIX):
            base = name[:-len(BLOCKS_SUFFIX)]
            if base + SCALES_SUFFIX in names:
                out[base] = (name, base + SCALES_SUFFIX)
    return out
