"""Q8_0 (d = amax/127, q = roundf(x/d)), bit-exact with ggml's quantize_row_q8_0_ref, from float32 or
straight from bfloat16 bits.

Its own module, apart from the other legacy types: Q8_0 is what every recipe uses for the BF16
non-expert matrices, and importing this alone loads a dozen cached kernels instead of the ~75 of all
block types (~12 ms each at start-up; a q4_0-native conversion needs no other block quantizer).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kquant_helpers import (
    F1,
    F32,
    HALF,
    JIT,
    ONE,
    OUT,
    U2,
    ZERO,
    f32,
    i64,
    store_fp16,
    trunc_i32,
    void,
)


@njit(f32(f32), **JIT)
def _roundf(v):
    """C roundf: nearest integer, halves away from zero (exact in float32)."""
    a = abs(v)
    t = np.floor(a)
    if a - t >= HALF:
        t += ONE
    return -t if v < ZERO else t


@njit(void(F1, OUT, i64, i64), **JIT)
def q80_range(x, out, start, stop):
    """quantize_row_q8_0_ref for blocks [start, stop): d = amax/127, q = roundf(x·id).

    When amax and 1/d are finite every x·id lies in [-127, 127], so rounding is written as selects
    into a scratch block and the int conversion needs no range check: LLVM vectorizes both loops (2x
    on this machine). Blocks with inf/NaN, or a subnormal amax whose 1/d overflows, take the exact
    scalar path (C's conversion of NaN/out-of-range floats).
    """
    q = np.empty(32, np.float32)
    for b in range(start, stop):
        xo = b * 32
        amax = ZERO
        for j in range(32):
            a = abs(x[xo + j])
            amax = amax if amax > a else a
        d = amax / F32(127.0)
        idv = ONE / d if d != ZERO else ZERO
        store_fp16(out, b, 0, d)
        if amax < F32(np.inf) and idv < F32(np.inf):
            for j in range(32):
                v = x[xo + j] * idv
                a = abs(v)
                t = np.floor(a)
                t = t + ONE if a - t >= HALF else t
                q[j] = -t if v < ZERO else t
            for j in range(32):
                out[b, 2 + j] = np.uint8(np.int32(q[j]) & 0xFF)
        else:
            for j in range(32):
                out[b, 2 + j] = trunc_i32(_roundf(x[xo + j] * idv)) & 0xFF


CHUNK_BLOCKS = 256  # q80_bf16_range widens this many blocks at a time (32 KiB of float32)


@njit(i64(U2, OUT, i64, i64), **JIT)
def q80_bf16_range(bits, out, start, stop):
    """Q8_0 blocks [start, stop) straight from bfloat16 bit patterns; returns how many inputs were
    inf/NaN (exponent all ones), so the caller can reject the tensor by name.

    Widening bf16 to float32 is exact (the top half of an f32), so the bytes are `q80_range`'s on the
    widened tensor. 256 blocks at a time are widened into a 32 KiB buffer that stays in L1/L2, in place
    of a float32 copy of the whole slab (4 bytes a weight written to memory and read back).
    """
    x32 = np.empty(CHUNK_BLOCKS * 32, np.uint32)
    x = x32.view(np.float32)
    bad = 0
    for c in range(start, stop, CHUNK_BLOCKS):
        n = min(CHUNK_BLOCKS, stop - c)
        base = c * 32
        for j in range(n * 32):
            u = np.uint32(bits[base + j])
            x32[j] = u << np.uint32(16)
            bad += ((u & np.uint32(0x7F80)) + np.uint32(0x80)) >> np.uint32(15)  # 1 iff exponent all ones
        q80_range(x, out[c : c + n], 0, n)
    return bad
