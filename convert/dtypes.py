"""Bit-exact conversions numpy lacks: bfloat16 and float8 e4m3 (stored as raw integer bits).

numpy has no bfloat16 or float8, so those tensors are handled as uint16 / uint8 bit patterns and
widened to float32 here. Widening is exact; narrowing rounds to nearest-even like torch does.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _widen_bf16(bits: np.ndarray, out: np.ndarray) -> int:
    """Widen and count the non-finite values (exponent all ones) in the same pass."""
    bad = 0
    for i in range(bits.size):
        b = np.uint32(bits[i])
        out[i] = b << np.uint32(16)
        bad += (b & np.uint32(0x7F80)) == np.uint32(0x7F80)
    return bad


def bf16_bits_to_f32_checked(bits: np.ndarray) -> tuple[np.ndarray, bool]:
    """bfloat16 bit patterns (uint16) → (float32, whether every value is finite), exactly.

    One pass in numba: numpy's astype + shift makes two passes and a temporary, and a separate
    np.isfinite pass allocates a byte per weight; this widening of every BF16 weight was the largest
    single cost of converting a checkpoint.
    """
    flat = np.ascontiguousarray(bits).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint32)
    bad = _widen_bf16(flat, out)
    return out.view(np.float32).reshape(bits.shape), bad == 0


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32, exactly (bf16 is the top half of an f32)."""
    return bf16_bits_to_f32_checked(bits)[0]


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, round-to-nearest-even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn codes (bias 7, no inf, 0x7F/0xFF = NaN)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = (man / 8.0) * np.exp2(-6.0)
    value = sign * np.where(exp == 0, subnormal, normal)
    value[(codes & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


E4M3_TO_F32 = _e4m3_table()


def e4m3_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns (uint8) → float32 via a 256-entry table (exact)."""
    return E4M3_TO_F32[bits]
