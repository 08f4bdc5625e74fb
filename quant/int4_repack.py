"""Lossless INT4 (compressed-tensors, group 32) → Q4_0 repack: no re-quantization.

Both formats are symmetric 4-bit with one scale per 32 consecutive inputs of a row, and both
store q + 8 as an unsigned nibble, so Q4_0's `d·(nibble − 8)` equals the source's `scale·q`
exactly whenever the bf16 scale is representable in float16. The only work is moving nibbles
(compressed-tensors packs 8 consecutive columns per int32, low nibble first; Q4_0 puts element j
and j+16 of a block in one byte) and narrowing the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from k2conv.convert.dtypes import bf16_bits_to_f32
from k2conv.quant.kquant_helpers import fp16_to_fp32, fp32_to_fp16

Q4_0_BLOCK = 32
Q4_0_BYTES = 18


@dataclass(frozen=True)
class ScaleReport:
    """Scales that float16 cannot hold exactly (overflow, or bits lost below 2**-14)."""

    inexact: int
    total: int
    worst_value: float
    worst_rel_error: float


def scales_to_f16(scales: np.ndarray) -> tuple[np.ndarray, ScaleReport]:
    """Scales (bf16 bits as uint16, or float) → float16, and how many did not survive exactly."""
    f32 = bf16_bits_to_f32(scales) if scales.dtype == np.uint16 else np.asarray(scales, dtype=np.float32)
    with np.errstate(over="ignore"):
        f16 = f32.astype(np.float16)
    back = f16.astype(np.float32)
    bad = back != f32
    inexact = int(np.count_nonzero(bad))
    worst_value, worst_rel = 0.0, 0.0
    if inexact:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(bad, np.abs(back - f32) / np.abs(f32), 0.0)
        idx = int(np.nanargmax(np.where(np.isfinite(rel), rel, np.inf)))
        worst_value = float(f32.reshape(-1)[idx])
        worst_rel = float(rel.reshape(-1)[idx])
    return f16, ScaleReport(inexact, f32.size, worst_value, worst_rel)


@njit(cache=True, nogil=True)
def _repack_kernel(src: np.ndarray, scales: np.ndarray, out: np.ndarray) -> tuple[int, int]:
    """src: [rows, nblk, 16] bytes of packed words; scales: float32 [rows, nblk]; out: [rows, nblk, 18]
    Q4_0 blocks. Returns (scales float16 cannot hold exactly, scales that become inf/NaN in float16).

    Source byte k of a block holds columns 2k (low nibble) and 2k+1 (high); Q4_0 byte j holds
    columns j (low) and j+16 (high). So Q4_0 byte 2m = low(src[m]) | low(src[m+8]) << 4 and
    byte 2m+1 = high(src[m]) | high(src[m+8]) << 4. The scale is narrowed here too (IEEE
    round-to-nearest-even, as numpy's astype(float16)): numpy's float32→float16→float32 round trip
    over every scale cost as much as the repack itself.
    """
    rows, nblk = src.shape[0], src.shape[1]
    inexact = 0
    nonfinite = 0
    for r in range(rows):
        for b in range(nblk):
            f = scales[r, b]
            h = fp32_to_fp16(f)
            inexact += fp16_to_fp32(h) != f
            nonfinite += (h & 0x7C00) == 0x7C00
            out[r, b, 0] = h & 0xFF
            out[r, b, 1] = h >> 8
            for m in range(8):
                a = src[r, b, m]
                c = src[r, b, m + 8]
                out[r, b, 2 + 2 * m] = (a & 0x0F) | ((c & 0x0F) << 4)
                out[r, b, 3 + 2 * m] = (a >> 4) | (c & 0xF0)
    return inexact, nonfinite


def repack_int4_to_q4_0(packed: np.ndarray, scales: np.ndarray, cols: int) -> tuple[np.ndarray, int, int]:
    """Q4_0 bytes [rows, cols/32·18] holding exactly the INT4 values of `packed` with its scales in float16,
    plus (how many scales float16 rounds, how many overflow it): the caller decides whether that is allowed
    (`scales_to_f16` then says which; the bytes are the rounded ones either way).

    `packed` is the int32 [rows, cols/8] tensor as stored; `scales` is [rows, cols/32], float32 or bf16 bits.
    """
    rows = packed.shape[0]
    if cols % Q4_0_BLOCK:
        raise ValueError(f"INT4→Q4_0 repack needs a multiple of 32 columns, got {cols}")
    nblk = cols // Q4_0_BLOCK
    f32 = bf16_bits_to_f32(scales) if scales.dtype == np.uint16 else np.asarray(scales, dtype=np.float32)
    src = np.ascontiguousarray(packed[:, : cols // 8]).view(np.uint8).reshape(rows, nblk, 16)
    out = np.empty((rows, nblk, Q4_0_BYTES), dtype=np.uint8)
    inexact, nonfinite = _repack_kernel(src, np.ascontiguousarray(f32).reshape(rows, nblk), out)
    return out.reshape(rows, nblk * Q4_0_BYTES), int(inexact), int(nonfinite)
