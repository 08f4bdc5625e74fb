"""IQ4_NL and IQ4_XS quantizers, bit-exact with ggml's quantize_iq4_nl / quantize_iq4_xs.

Both types map each value to one of 16 non-uniform levels (``kvalues_iq4nl``) times a scale. ggml
tries 16 candidate scales per 32-value block (ntry = 7) with weights x² (no imatrix) or
qw·sqrtf(sigma2 + x²) (imatrix); ggml_quantize_chunk always takes this ntry = 7 path. IQ4_NL stores
the best block scale as fp16 and re-picks the levels with it. IQ4_XS stores one fp16 super-block
scale and a 6-bit signed scale per 32-block and re-picks every level with that stored scale.

The searches run in lanes (lanes.py): one lane per 32-block. The level pick is ggml's
best_index_int8 rewritten as comparisons against exact float32 thresholds, which vectorizes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kquant_helpers import (
    F1,
    F32,
    I1,
    JIT,
    ONE,
    OUT,
    ZERO,
    b1,
    f32,
    i64,
    nearest_int,
    store_fp16,
    void,
)
from .lanes import NL, S_ROWS, gather, iq4_index, iq4_scale_lanes


@njit(void(OUT, i64, i64, F1, i64, f32), **JIT)
def _pack_levels(out, b, off, x, xo, idv):
    """Pick the 32 levels of a block at inverse scale idv and pack: low nibbles 0..15, high 16..31."""
    for j in range(16):
        lo = iq4_index(idv * x[xo + j])
        hi = iq4_index(idv * x[xo + 16 + j])
        out[b, off + j] = lo | (hi << 4)


@njit(void(F1, F1, I1, b1, F1, F1), **JIT)
def _weights(X, qw, qoff, use_qw, sig, W):
    """W = qw·sqrtf(sigma2 + x²) (imatrix) or x², for the NL lanes of 32 values."""
    for i in range(32):
        for j in range(NL):
            x = X[i * NL + j]
            W[i * NL + j] = qw[qoff[j] + i] * np.sqrt(sig[j] + x * x) if use_qw else x * x


@njit(void(F1, F1, b1, OUT, i64, i64), **JIT)
def iq4nl_range(x, qw, use_qw, out, start, stop):
    """IQ4_NL 32-blocks [start, stop): d @0, qs[16] @2. One lane per block; sigma2 per block."""
    X = np.zeros(32 * NL, np.float32)
    W = np.zeros(32 * NL, np.float32)
    S = np.zeros(S_ROWS * NL, np.float32)
    d = np.zeros(NL, np.float32)
    sig = np.zeros(NL, np.float32)
    qoff = np.zeros(NL, np.int64)
    bpr = max(qw.shape[0] // 32, 1)
    for b0 in range(start, stop, NL):
        nb = min(NL, stop - b0)
        gather(x, b0 * 32, 32, nb, X)
        for j in range(NL):
            sig[j] = ZERO
            qoff[j] = ((b0 + j) % bpr) * 32 if j < nb else 0
        for i in range(32):
            for j in range(NL):
                sig[j] += X[i * NL + j] * X[i * NL + j]
        for j in range(NL):
            sig[j] = sig[j] * (F32(2.0) / F32(32.0))
        _weights(X, qw, qoff, use_qw, sig, W)
        iq4_scale_lanes(X, W, d, S)
        for bi in range(nb):
            b = b0 + bi
            store_fp16(out, b, 0, d[bi])
            _pack_levels(out, b, 2, x, b * 32, ONE / d[bi] if d[bi] != ZERO else ZERO)


@njit(void(F1, i64, OUT, i64, F1), **JIT)
def _xs_block(x, xo, out, b, scales):
    """IQ4_XS super-block after the searches: d = −max/32, 6-bit scales, levels re-picked, packed."""
    max_scale = ZERO
    amax_scale = ZERO
    for ib in range(8):
        a = abs(scales[ib])
        if a > amax_scale:
            amax_scale = a
            max_scale = scales[ib]
    d = -max_scale / F32(32.0)
    store_fp16(out, b, 0, d)
    idv = ONE / d if d != ZERO else ZERO
    scales_h = 0
    for k in range(4):
        out[b, 4 + k] = 0
    for ib in range(8):
        lv = min(max(nearest_int(idv * scales[ib]), -32), 31)
        dl = d * F32(lv)
        _pack_levels(out, b, 8 + 16 * ib, x, xo + 32 * ib, ONE / dl if dl != ZERO else ZERO)
        lv += 32
        out[b, 4 + ib // 2] |= (lv & 0xF) << (4 * (ib % 2))
        scales_h |= (lv >> 4) << (2 * ib)
    out[b, 2] = scales_h & 0xFF
    out[b, 3] = (scales_h >> 8) & 0xFF


@njit(void(F1, F1, b1, OUT, i64, i64), **JIT)
def iq4xs_range(x, qw, use_qw, out, start, stop):
    """IQ4_XS 256-blocks [start, stop): d @0, scales_h (u16) @2, scales_l[4] @4, qs[128] @8."""
    X = np.zeros(32 * NL, np.float32)
    W = np.zeros(32 * NL, np.float32)
    S = np.zeros(S_ROWS * NL, np.float32)
    d = np.zeros(NL, np.float32)
    sig = np.zeros(NL, np.float32)
    acc = np.zeros(NL // 8, np.float32)
    qoff = np.zeros(NL, np.int64)
    bpr = max(qw.shape[0] // 256, 1)
    for b0 in range(start, stop, NL // 8):
        nb = min(NL // 8, stop - b0)
        gather(x, b0 * 256, 32, nb * 8, X)
        for bi in range(NL // 8):
            acc[bi] = ZERO
        for k in range(256):  # per-block Σx², the blocks' chains advanced together
            for bi in range(nb):
                v = x[(b0 + bi) * 256 + k]
                acc[bi] += v * v
        for j in range(NL):
            bi = j // 8
            sig[j] = acc[bi] * (F32(2.0) / F32(256.0)) if bi < nb else ZERO
            qoff[j] = ((b0 + bi) % bpr) * 256 + (j % 8) * 32 if bi < nb else 0
        _weights(X, qw, qoff, use_qw, sig, W)
        iq4_scale_lanes(X, W, d, S)
        for bi in range(nb):
            b = b0 + bi
            _xs_block(x, b * 256, out, b, d[bi * 8 : bi * 8 + 8])
