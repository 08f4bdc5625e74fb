"""Q4_0, Q4_1, Q5_0, Q5_1 (reference and imatrix) and Q8_0, bit-exact with ggml_quantize_chunk.

The gguf package only has the reference (no-imatrix) versions of these 32-value block types; the
imatrix versions (``quantize_row_q4_0_impl`` …) are what llama-quantize uses for the fallback types
(e.g. ``attn_k_b`` with ne0 = 128) when an imatrix is given, so they are here too. Their weights use
sigma2 = Σx²/n_per_row over the *whole row*, so the kernels take the row length.

The imatrix searches run in lanes (lanes.py), one lane per 32-block. The reference versions
convert floats to small ints with C casts, not rounding: ``(int8_t)(v)`` truncates toward zero
(x86-64 cvttss2si, NaN → 0), and Q8_0 uses roundf (half away from zero).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kquant_helpers import (
    F1,
    F32,
    HALF,
    I1,
    JIT,
    ONE,
    OUT,
    ZERO,
    UniTuple,
    as_int8,
    b1,
    f32,
    i64,
    store_fp16,
    trunc_i32,
    void,
)
from .lanes import NL, S_ROWS, gather, qkx_lanes, qx_lanes
from .q8_0 import q80_range

_FLT_MAX = F32(np.finfo(np.float32).max)


@njit(void(I1, OUT, i64, i64), **JIT)
def _pack_nibbles(L, out, b, off):
    """qs[j] = L[j] | L[j+16] << 4 for a 32-block (L as C's uint8, unmasked like ggml)."""
    for j in range(16):
        out[b, off + j] = ((L[j] & 0xFF) | ((L[j + 16] & 0xFF) << 4)) & 0xFF


@njit(void(I1, OUT, i64, i64, i64), **JIT)
def _pack_q5(L, out, b, qh_off, qs_off):
    """Q5_0/Q5_1: low nibbles as Q4_0, bit 4 of element j into bit j of the little-endian u32 qh."""
    qh = 0
    for j in range(16):
        x0 = L[j] & 0xFF
        x1 = L[j + 16] & 0xFF
        out[b, qs_off + j] = ((x0 & 0x0F) | ((x1 & 0x0F) << 4)) & 0xFF
        qh |= ((x0 & 0x10) >> 4) << j
        qh |= ((x1 & 0x10) >> 4) << (j + 16)
    for k in range(4):
        out[b, qh_off + k] = (qh >> (8 * k)) & 0xFF


@njit(f32(F1, i64), **JIT)
def _signed_absmax(x, xo):
    """The value with the largest |x| (first one wins): `if (amax < fabsf(v))`."""
    amax = ZERO
    mx = ZERO
    for j in range(32):
        v = x[xo + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return mx


@njit(UniTuple(f32, 2)(F1, i64), **JIT)
def _min_max(x, xo):
    """min and max of a 32-block starting from ±FLT_MAX, as quantize_row_q4_1_ref does."""
    mn = _FLT_MAX
    mx = -_FLT_MAX
    for j in range(32):
        v = x[xo + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@njit(void(F1, i64, OUT, i64, I1), **JIT)
def _q40_ref(x, xo, out, b, L):
    """quantize_row_q4_0_ref: d = max/−8, q = min(15, (int8)(x·id + 8.5))."""
    d = _signed_absmax(x, xo) / F32(-8.0)
    idv = ONE / d if d != ZERO else ZERO
    store_fp16(out, b, 0, d)
    for j in range(32):
        L[j] = min(15, as_int8(trunc_i32(x[xo + j] * idv + F32(8.5))))
    _pack_nibbles(L, out, b, 2)


@njit(void(F1, i64, OUT, i64, I1), **JIT)
def _q50_ref(x, xo, out, b, L):
    """quantize_row_q5_0_ref: d = max/−16, q = min(31, (int8)(x·id + 16.5))."""
    d = _signed_absmax(x, xo) / F32(-16.0)
    idv = ONE / d if d != ZERO else ZERO
    store_fp16(out, b, 0, d)
    for j in range(32):
        L[j] = min(31, as_int8(trunc_i32(x[xo + j] * idv + F32(16.5))))
    _pack_q5(L, out, b, 2, 6)


@njit(void(F1, i64, OUT, i64, I1), **JIT)
def _q41_ref(x, xo, out, b, L):
    """quantize_row_q4_1_ref: d = (max−min)/15, m = min, q = min(15, (int8)((x−min)·id + 0.5))."""
    mn, mx = _min_max(x, xo)
    d = (mx - mn) / F32(15.0)
    idv = ONE / d if d != ZERO else ZERO
    store_fp16(out, b, 0, d)
    store_fp16(out, b, 2, mn)
    for j in range(32):
        L[j] = min(15, as_int8(trunc_i32((x[xo + j] - mn) * idv + F32(0.5))))
    _pack_nibbles(L, out, b, 4)


@njit(void(F1, i64, OUT, i64, I1), **JIT)
def _q51_ref(x, xo, out, b, L):
    """quantize_row_q5_1_ref: d = (max−min)/31, q = (uint8)((x−min)·id + 0.5), no clamp."""
    mn, mx = _min_max(x, xo)
    d = (mx - mn) / F32(31.0)
    idv = ONE / d if d != ZERO else ZERO
    store_fp16(out, b, 0, d)
    store_fp16(out, b, 2, mn)
    for j in range(32):
        L[j] = trunc_i32((x[xo + j] - mn) * idv + HALF) & 0xFF
    _pack_q5(L, out, b, 4, 8)


@njit(void(F1, i64, i64, i64, F1), **JIT)
def _rows_sigma2(x, r0, r1, n_per_row, out):
    """out[r − r0] = Σx²/n_per_row over row r (sequential), for rows r0..r1−1.

    Rows are independent chains, so eight advance together (instruction-level parallelism).
    """
    for g0 in range(r0, r1, 8):
        g1 = min(g0 + 8, r1)
        acc = np.zeros(8, np.float32)
        for k in range(n_per_row):
            for r in range(g0, g1):
                v = x[r * n_per_row + k]
                acc[r - g0] += v * v
        for r in range(g0, g1):
            out[r - r0] = acc[r - g0] / F32(n_per_row)


@njit(void(F1, OUT, i64, i64, i64), **JIT)
def _ref_range(x, out, start, stop, kind):
    """The reference (no imatrix) quantizers, one 32-block at a time."""
    if kind == 4:
        q80_range(x, out, start, stop)
        return
    L = np.zeros(32, np.int64)
    for b in range(start, stop):
        xo = b * 32
        if kind == 0:
            _q40_ref(x, xo, out, b, L)
        elif kind == 1:
            _q41_ref(x, xo, out, b, L)
        elif kind == 2:
            _q50_ref(x, xo, out, b, L)
        else:
            _q51_ref(x, xo, out, b, L)


@njit(void(F1, F1, OUT, i64, i64, i64, i64), **JIT)
def _impl_range(x, qw, out, start, stop, kind, n_per_row):
    """quantize_row_q{4_0,4_1,5_0,5_1}_impl for blocks [start, stop), one lane per 32-block."""
    bpr = n_per_row // 32
    r0 = start // bpr
    sig_rows = np.zeros((stop - 1) // bpr + 1 - r0, np.float32)
    _rows_sigma2(x, r0, (stop - 1) // bpr + 1, n_per_row, sig_rows)
    X = np.zeros(32 * NL, np.float32)
    W = np.zeros(32 * NL, np.float32)
    L = np.zeros(32 * NL, np.float32)
    Laux = np.zeros(32 * NL, np.float32)
    S = np.zeros(S_ROWS * NL, np.float32)
    d = np.zeros(NL, np.float32)
    the_min = np.zeros(NL, np.float32)
    sig = np.zeros(NL, np.float32)
    qoff = np.zeros(NL, np.int64)
    Lb = np.zeros(32, np.int64)
    for b0 in range(start, stop, NL):
        nb = min(NL, stop - b0)
        gather(x, b0 * 32, 32, nb, X)
        for j in range(NL):
            sig[j] = sig_rows[(b0 + j) // bpr - r0] if j < nb else ZERO
            qoff[j] = ((b0 + j) % bpr) * 32 if j < nb else 0
        for i in range(32):
            for j in range(NL):
                xv = X[i * NL + j]
                W[i * NL + j] = qw[qoff[j] + i] * np.sqrt(sig[j] + xv * xv)
        if kind == 0 or kind == 2:
            qx_lanes(32, 8 if kind == 0 else 16, X, W, L, d, S)
        else:
            qkx_lanes(
                32, 15 if kind == 1 else 31, X, W, L, d, the_min, F32(-0.9), F32(0.05), 36, False, S, Laux
            )
        for bi in range(nb):
            b = b0 + bi
            for i in range(32):
                Lb[i] = np.int64(L[i * NL + bi])
            store_fp16(out, b, 0, d[bi])
            if kind == 0:
                _pack_nibbles(Lb, out, b, 2)
            elif kind == 2:
                _pack_q5(Lb, out, b, 2, 6)
            else:
                store_fp16(out, b, 2, -the_min[bi])
                if kind == 1:
                    _pack_nibbles(Lb, out, b, 4)
                else:
                    _pack_q5(Lb, out, b, 4, 8)


@njit(void(F1, F1, b1, OUT, i64, i64, i64, i64), **JIT)
def legacy_range(x, qw, use_qw, out, start, stop, kind, n_per_row):
    """Blocks [start, stop) of Q4_0 (kind 0), Q4_1 (1), Q5_0 (2), Q5_1 (3) or Q8_0 (4)."""
    if kind == 4 or not use_qw:
        _ref_range(x, out, start, stop, kind)
    else:
        _impl_range(x, qw, out, start, stop, kind, n_per_row)
