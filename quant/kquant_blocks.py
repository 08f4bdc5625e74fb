"""K-quant super-block quantizers (Q2_K … Q6_K), reference and imatrix variants, bit-exact with ggml.

Every ``*_range`` kernel quantizes blocks [start, stop) of a flat float32 array ``x`` (256 values
per block) into ``out[b, :]``. With ``use_qw`` the imatrix path (ggml's ``quantize_row_*_impl``)
runs and block b reads importance weights ``qw[(b mod blocks_per_row)·256 …]``, exactly as
ggml_quantize_chunk gives the same row of weights to every row; otherwise the ``*_ref`` path runs.

Blocks are processed in batches whose sub-blocks fill the NL lanes of the search kernels in
lanes.py (sub-block g of batch block bi is lane bi·G + g). What remains per block — choosing the
super-block scales, fp16 rounding, requantizing with the stored scales and bit packing — follows
ggml-quants.c line by line. Kernels release the GIL; callers run disjoint ranges on threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kquant_helpers import (
    F1,
    F2,
    F32,
    GROUP_MAX_EPS,
    I1,
    JIT,
    ONE,
    OUT,
    ZERO,
    Tuple,
    UniTuple,
    as_int8,
    b1,
    clampf,
    f32,
    i64,
    load_fp16,
    nearest_int,
    nint,
    store_fp16,
    void,
)
from .kquant_search import make_qp_quants, make_qx_quants
from .lanes import NL, S_ROWS, gather, q3_lanes, qkx_lanes, qx_lanes

QK_K = 256
_F256 = F32(256.0)
_TWO = F32(2.0)


@njit(Tuple((F1, F1, F1, F1, F1, F2, I1, F1))(i64), **JIT)
def _alloc(n):
    """Scratch for one range call: lane data X, W, L, Laux (n·NL), per-lane vectors, block quants."""
    X = np.zeros(n * NL, np.float32)
    W = np.zeros(n * NL, np.float32)
    L = np.zeros(n * NL, np.float32)
    Laux = np.zeros(n * NL, np.float32)
    S = np.zeros(S_ROWS * NL, np.float32)
    vec = np.zeros((4, NL), np.float32)  # scale, min, sw, sigma2 per lane
    qoff = np.zeros(NL, np.int64)
    Lq = np.zeros(QK_K, np.float32)
    return X, W, L, Laux, S, vec, qoff, Lq


# ------------------------------------------------------------------------------ shared helpers


@njit(void(F1, i64, i64, i64, b1, F1), **JIT)
def _block_sigma2(x, b0, nb, G, two, sig):
    """sigma2 of each batch block, spread over its G lanes: Σx²/256 or 2·Σx²/256 (sequential sums).

    The blocks' sums are independent chains, so they are advanced together (instruction-level
    parallelism) while each keeps C's element order.
    """
    acc = np.zeros(NL // G, np.float32)
    for k in range(QK_K):
        for bi in range(nb):
            v = x[(b0 + bi) * QK_K + k]
            acc[bi] += v * v
    for j in range(NL):
        bi = j // G
        s = acc[bi] if bi < nb else ZERO
        sig[j] = (_TWO * s) / _F256 if two else s / _F256


@njit(void(i64, i64, i64, i64, i64, I1), **JIT)
def _qw_offsets(b0, nb, G, n, bpr, qoff):
    """Offset into qw of lane j's first weight (padded lanes point at 0 and are ignored)."""
    for j in range(NL):
        bi = j // G
        qoff[j] = (((b0 + bi) % bpr) * QK_K + (j % G) * n) if bi < nb else 0


@njit(void(i64, F1, F1, I1, F1, F1, F1), **JIT)
def _imatrix_weights(n, X, qw, qoff, sig, W, sw):
    """W = qw·sqrtf(sigma2 + x²) per value, and sw = Σ W per lane (in order)."""
    for j in range(NL):
        sw[j] = ZERO
    for i in range(n):
        for j in range(NL):
            x = X[i * NL + j]
            w = qw[qoff[j] + i] * np.sqrt(sig[j] + x * x)
            W[i * NL + j] = w
            sw[j] += w


@njit(void(F1, i64, i64, i64, F1), **JIT)
def _block_quants(L, bi, G, n, Lq):
    """Lq[g·n + i] = L[i·NL + bi·G + g]: a block's search quants back in element order."""
    for g in range(G):
        j = bi * G + g
        for i in range(n):
            Lq[g * n + i] = L[i * NL + j]


@njit(void(F1, OUT, i64, i64), **JIT)
def _pack_2bit(Lq, out, b, off):
    """Q2_K/Q3_K qs: byte 32h+l holds L[128h+l+32k] in bits 2k..2k+1."""
    for h in range(2):
        j = 128 * h
        for k in range(32):
            q0 = np.int64(Lq[j + k])
            q1 = np.int64(Lq[j + k + 32])
            q2 = np.int64(Lq[j + k + 64])
            q3 = np.int64(Lq[j + k + 96])
            out[b, off + 32 * h + k] = (q0 | (q1 << 2) | (q2 << 4) | (q3 << 6)) & 0xFF


@njit(void(F1, i64, i64, i64, f32, f32, f32, F1), **JIT)
def _requant_min(x, xo, n, j, d, dm, qmax, Lq):
    """Lq of sub-block j = clamp(nearest_int((x + dm)/d), 0, qmax): ggml's final pass (scale + min)."""
    for ii in range(n):
        Lq[n * j + ii] = clampf(nint((x[xo + n * j + ii] + dm) / d), ZERO, qmax)


@njit(void(F1, i64, i64, i64, f32, f32, f32, F1), **JIT)
def _requant_sym(x, xo, n, j, d, lo, hi, Lq):
    """Lq of sub-block j = clamp(nearest_int(x/d), lo, hi) − lo: ggml's final pass (signed scale)."""
    for ii in range(n):
        Lq[n * j + ii] = clampf(nint(x[xo + n * j + ii] / d), lo, hi) - lo


# ----------------------------------------------------------------------------------------- Q2_K
# layout: scales[16] @0, qs[64] @16, d @80, dmin @82


@njit(void(F1, i64, OUT, i64, f32, f32, F1), **JIT)
def _q2k_finish(x, xo, out, b, d, dmin, Lq):
    """Requantize each sub-block with its stored scale/min (skipping zero scales), then pack qs."""
    for j in range(16):
        sc = np.int64(out[b, j])
        dd = d * F32(sc & 0xF)
        if dd == ZERO:
            continue
        _requant_min(x, xo, 16, j, dd, dmin * F32(sc >> 4), F32(3.0), Lq)
    _pack_2bit(Lq, out, b, 16)


@njit(void(F1, i64, OUT, i64, F1, F1, F1), **JIT)
def _q2k_ref_block(x, xo, out, b, scales, mins, Lq):
    """quantize_row_q2_K_ref after the sub-block searches: 4-bit scales/mins, d, dmin, requant."""
    max_scale = ZERO
    max_min = ZERO
    for j in range(16):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if max_scale > ZERO:
        iscale = F32(15.0) / max_scale
        for j in range(16):
            out[b, j] = nearest_int(iscale * scales[j]) & 0xFF
        store_fp16(out, b, 80, max_scale / F32(15.0))
    else:
        for j in range(16):
            out[b, j] = 0
        store_fp16(out, b, 80, ZERO)
    if max_min > ZERO:
        iscale = F32(15.0) / max_min
        for j in range(16):
            out[b, j] = (np.int64(out[b, j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
        store_fp16(out, b, 82, max_min / F32(15.0))
    else:
        store_fp16(out, b, 82, ZERO)
    _q2k_finish(x, xo, out, b, load_fp16(out, b, 80), load_fp16(out, b, 82), Lq)


@njit(void(F1, i64, OUT, i64, F1, F1, F1, I1, I1, F1), **JIT)
def _q2k_impl_block(x, xo, out, b, scales, mins, sw, Ls, Lm, Lq):
    """quantize_row_q2_K_impl after the searches: make_qp_quants on scales and mins, then requant."""
    dm = make_qp_quants(16, 15, scales, Ls, sw)
    mm = make_qp_quants(16, 15, mins, Lm, sw)
    store_fp16(out, b, 80, dm)
    store_fp16(out, b, 82, mm)
    for j in range(16):
        out[b, j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
    _q2k_finish(x, xo, out, b, load_fp16(out, b, 80), load_fp16(out, b, 82), Lq)


@njit(void(F1, F1, b1, OUT, i64, i64), **JIT)
def q2k_range(x, qw, use_qw, out, start, stop):
    """Q2_K blocks [start, stop): 16 lanes (sub-blocks of 16) per block."""
    X, W, L, Laux, S, vec, qoff, Lq = _alloc(16)
    Ls = np.zeros(16, np.int64)
    Lm = np.zeros(16, np.int64)
    bpr = max(qw.shape[0] // QK_K, 1)
    for b0 in range(start, stop, NL // 16):
        nb = min(NL // 16, stop - b0)
        gather(x, b0 * QK_K, 16, nb * 16, X)
        if use_qw:
            _block_sigma2(x, b0, nb, 16, False, vec[3])
            _qw_offsets(b0, nb, 16, 16, bpr, qoff)
            _imatrix_weights(16, X, qw, qoff, vec[3], W, vec[2])
            qkx_lanes(16, 3, X, W, L, vec[0], vec[1], F32(-0.9), F32(0.05), 36, False, S, Laux)
        else:
            for k in range(16 * NL):
                W[k] = abs(X[k])
            qkx_lanes(16, 3, X, W, L, vec[0], vec[1], F32(-0.5), F32(0.1), 15, True, S, Laux)
        for bi in range(nb):
            b = b0 + bi
            _block_quants(L, bi, 16, 16, Lq)
            sl = slice(bi * 16, bi * 16 + 16)
            if use_qw:
                _q2k_impl_block(x, b * QK_K, out, b, vec[0][sl], vec[1][sl], vec[2][sl], Ls, Lm, Lq)
            else:
                _q2k_ref_block(x, b * QK_K, out, b, vec[0][sl], vec[1][sl], Lq)


# ----------------------------------------------------------------------------------------- Q3_K
# layout: hmask[32] @0, qs[64] @32, scales[12] @96, d @108


@njit(void(OUT, i64, i64, i64), **JIT)
def _q3k_put_scale(out, b, j, lv):
    """Pack the biased 6-bit scale lv (0..63) of sub-block j into scales[12] (ggml's bit layout)."""
    if j < 8:
        out[b, 96 + j] = lv & 0xF
    else:
        out[b, 96 + j - 8] = (np.int64(out[b, 96 + j - 8]) | ((lv & 0xF) << 4)) & 0xFF
    k = 104 + j % 4
    out[b, k] = (np.int64(out[b, k]) | ((lv >> 4) << (2 * (j // 4)))) & 0xFF


@njit(void(F1, i64, OUT, i64, F1), **JIT)
def _q3k_finish(x, xo, out, b, Lq):
    """Shared tail of Q3_K ref/impl: requantize with the stored scales, build hmask, pack qs."""
    d_all = load_fp16(out, b, 108)
    for j in range(16):
        if j < 8:
            sc = np.int64(out[b, 96 + j]) & 0xF
        else:
            sc = np.int64(out[b, 96 + j - 8]) >> 4
        sc = (sc | (((np.int64(out[b, 104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        dd = d_all * F32(sc)
        if dd == ZERO:
            continue
        _requant_sym(x, xo, 16, j, dd, F32(-4.0), F32(3.0), Lq)
    # hmask bit k of byte m = high bit of element 32k + m (branch-free: the bits are random)
    for m in range(32):
        h = 0
        for k in range(8):
            hi = Lq[32 * k + m] > F32(3.0)
            h |= np.int64(hi) << k
            Lq[32 * k + m] -= F32(4.0) if hi else ZERO
        out[b, m] = h
    _pack_2bit(Lq, out, b, 32)


@njit(void(F1, i64, OUT, i64, F1, F1), **JIT)
def _q3k_ref_block(x, xo, out, b, scales, Lq):
    """quantize_row_q3_K_ref after the searches: 6-bit signed scales relative to the largest."""
    max_scale = ZERO
    amax = ZERO
    for j in range(16):
        a = abs(scales[j])
        if a > amax:
            amax = a
            max_scale = scales[j]
    for k in range(12):
        out[b, 96 + k] = 0
    if max_scale != ZERO:
        iscale = F32(-32.0) / max_scale
        for j in range(16):
            lv = as_int8(nearest_int(iscale * scales[j]))
            _q3k_put_scale(out, b, j, min(max(lv, -32), 31) + 32)
        store_fp16(out, b, 108, ONE / iscale)
    else:
        store_fp16(out, b, 108, ZERO)
    _q3k_finish(x, xo, out, b, Lq)


@njit(void(F1, i64, OUT, i64, F1, F1, I1, F1), **JIT)
def _q3k_impl_block(x, xo, out, b, scales, sw, Ls, Lq):
    """quantize_row_q3_K_impl after the searches: the 16 scales quantized by make_qx_quants(…, sw)."""
    for k in range(12):
        out[b, 96 + k] = 0
    d_block = make_qx_quants(16, 32, scales, 0, sw, 0, Ls, 0)
    for j in range(16):
        _q3k_put_scale(out, b, j, Ls[j])
    store_fp16(out, b, 108, d_block)
    _q3k_finish(x, xo, out, b, Lq)


@njit(void(F1, F1, b1, OUT, i64, i64), **JIT)
def q3k_range(x, qw, use_qw, out, start, stop):
    """Q3_K blocks [start, stop): 16 lanes (sub-blocks of 16) per block."""
    X, W, L, _, S, vec, qoff, Lq = _alloc(16)
    Ls = np.zeros(16, np.int64)
    bpr = max(qw.shape[0] // QK_K, 1)
    for b0 in range(start, stop, NL // 16):
        nb = min(NL // 16, stop - b0)
        gather(x, b0 * QK_K, 16, nb * 16, X)
        if use_qw:
            _block_sigma2(x, b0, nb, 16, True, vec[3])
            _qw_offsets(b0, nb, 16, 16, bpr, qoff)
            _imatrix_weights(16, X, qw, qoff, vec[3], W, vec[2])
            qx_lanes(16, 4, X, W, L, vec[0], S)
        else:
            q3_lanes(16, 4, X, L, vec[0], S)
        for bi in range(nb):
            b = b0 + bi
            _block_quants(L, bi, 16, 16, Lq)
            sl = slice(bi * 16, bi * 16 + 16)
            if use_qw:
                _q3k_impl_block(x, b * QK_K, out, b, vec[0][sl], vec[2][sl], Ls, Lq)
            else:
                _q3k_ref_block(x, b * QK_K, out, b, vec[0][sl], Lq)


# ---------------------------------------------------------------------------------- Q4_K / Q5_K
# Q4_K layout: d @0, dmin @2, scales[12] @4, qs[128] @16
# Q5_K layout: d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48


@njit(void(OUT, i64, i64, i64, i64), **JIT)
def _k4_put_scale_min(out, b, j, ls, lm):
    """Pack 6-bit scale ls and min lm of sub-block j into scales[12] at out[b, 4:16]."""
    if j < 4:
        out[b, 4 + j] = ls & 0xFF
        out[b, 8 + j] = lm & 0xFF
    else:
        out[b, 8 + j] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        out[b, j] = (np.int64(out[b, j]) | ((ls >> 4) << 6)) & 0xFF
        out[b, 4 + j] = (np.int64(out[b, 4 + j]) | ((lm >> 4) << 6)) & 0xFF


@njit(UniTuple(i64, 2)(OUT, i64, i64), **JIT)
def _k4_get_scale_min(out, b, j):
    """get_scale_min_k4 on the scales stored at out[b, 4:16]."""
    if j < 4:
        return np.int64(out[b, 4 + j]) & 63, np.int64(out[b, 8 + j]) & 63
    q_hi = np.int64(out[b, 8 + j])
    sc = (q_hi & 0xF) | ((np.int64(out[b, j]) >> 6) << 4)
    m = (q_hi >> 4) | ((np.int64(out[b, 4 + j]) >> 6) << 4)
    return sc, m


@njit(void(F1, i64, OUT, i64, i64, F1), **JIT)
def _k45_finish(x, xo, out, b, nmax, Lq):
    """Requantize each 32-sub-block with its stored scale/min, then pack (Q4_K qs, or Q5_K qh + qs)."""
    d = load_fp16(out, b, 0)
    dmin = load_fp16(out, b, 2)
    for j in range(8):
        sc, m = _k4_get_scale_min(out, b, j)
        dd = d * F32(sc)
        if dd == ZERO:
            continue
        _requant_min(x, xo, 32, j, dd, dmin * F32(m), F32(nmax), Lq)
    if nmax == 15:
        for c in range(4):
            for k in range(32):
                lo = np.int64(Lq[64 * c + k])
                hi = np.int64(Lq[64 * c + 32 + k])
                out[b, 16 + 32 * c + k] = (lo | (hi << 4)) & 0xFF
        return
    for k in range(32):
        qh = 0
        for c in range(4):
            lo = np.int64(Lq[64 * c + k])
            hi = np.int64(Lq[64 * c + 32 + k])
            qh |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1))
            out[b, 48 + 32 * c + k] = ((lo & 0xF) | ((hi & 0xF) << 4)) & 0xFF
        out[b, 16 + k] = qh


@njit(void(F1, i64, OUT, i64, i64, F1, F1, F1), **JIT)
def _k45_ref_block(x, xo, out, b, nmax, scales, mins, Lq):
    """quantize_row_q4_K_ref / q5_K_ref after the searches: 6-bit scales and mins, d, dmin, requant."""
    max_scale = ZERO
    max_min = ZERO
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(63.0) / max_scale if max_scale > ZERO else ZERO
    inv_min = F32(63.0) / max_min if max_min > ZERO else ZERO
    for j in range(8):
        ls = min(nearest_int(inv_scale * scales[j]) & 0xFF, 63)
        lm = min(nearest_int(inv_min * mins[j]) & 0xFF, 63)
        _k4_put_scale_min(out, b, j, ls, lm)
    store_fp16(out, b, 0, max_scale / F32(63.0))
    store_fp16(out, b, 2, max_min / F32(63.0))
    _k45_finish(x, xo, out, b, nmax, Lq)


@njit(void(F1, i64, OUT, i64, i64, F1, F1, F1, I1, I1, F1), **JIT)
def _k45_impl_block(x, xo, out, b, nmax, scales, mins, sw, Ls, Lm, Lq):
    """quantize_row_q4_K_impl / q5_K_impl after the searches: make_qp_quants on scales and mins."""
    d_block = make_qp_quants(8, 63, scales, Ls, sw)
    m_block = make_qp_quants(8, 63, mins, Lm, sw)
    for j in range(8):
        ls = Ls[j]
        lm = Lm[j]
        if nmax == 31:  # only Q5_K_impl clamps (to 63) before packing
            ls = min(ls, 63)
            lm = min(lm, 63)
        _k4_put_scale_min(out, b, j, ls, lm)
    store_fp16(out, b, 0, d_block)
    store_fp16(out, b, 2, m_block)
    _k45_finish(x, xo, out, b, nmax, Lq)


@njit(void(F1, F1), **JIT)
def _k45_ref_weights(X, W):
    """ggml's ref weights per 32-sub-block: av_x + |x| with av_x = sqrtf(Σx²/32) (in order)."""
    av = np.zeros(NL, np.float32)
    for i in range(32):
        for j in range(NL):
            av[j] += X[i * NL + j] * X[i * NL + j]
    for j in range(NL):
        av[j] = np.sqrt(av[j] / F32(32.0))
    for i in range(32):
        for j in range(NL):
            W[i * NL + j] = av[j] + abs(X[i * NL + j])


@njit(void(F1, F1, b1, OUT, i64, i64, i64), **JIT)
def k45_range(x, qw, use_qw, out, start, stop, nmax):
    """Q4_K (nmax 15) or Q5_K (nmax 31) blocks [start, stop): 8 lanes (sub-blocks of 32) per block."""
    X, W, L, Laux, S, vec, qoff, Lq = _alloc(32)
    Ls = np.zeros(8, np.int64)
    Lm = np.zeros(8, np.int64)
    bpr = max(qw.shape[0] // QK_K, 1)
    rmin = F32(-1.0) if nmax == 15 else F32(-0.5)
    nstep = 20 if nmax == 15 else 15
    for b0 in range(start, stop, NL // 8):
        nb = min(NL // 8, stop - b0)
        gather(x, b0 * QK_K, 32, nb * 8, X)
        if use_qw:
            _block_sigma2(x, b0, nb, 8, True, vec[3])
            _qw_offsets(b0, nb, 8, 32, bpr, qoff)
            _imatrix_weights(32, X, qw, qoff, vec[3], W, vec[2])
            qkx_lanes(32, nmax, X, W, L, vec[0], vec[1], F32(-0.9), F32(0.05), 36, False, S, Laux)
        else:
            _k45_ref_weights(X, W)
            qkx_lanes(32, nmax, X, W, L, vec[0], vec[1], rmin, F32(0.1), nstep, False, S, Laux)
        for bi in range(nb):
            b = b0 + bi
            _block_quants(L, bi, 8, 32, Lq)
            sl = slice(bi * 8, bi * 8 + 8)
            if use_qw:
                _k45_impl_block(x, b * QK_K, out, b, nmax, vec[0][sl], vec[1][sl], vec[2][sl], Ls, Lm, Lq)
            else:
                _k45_ref_block(x, b * QK_K, out, b, nmax, vec[0][sl], vec[1][sl], Lq)


# ----------------------------------------------------------------------------------------- Q6_K
# layout: ql[128] @0, qh[64] @128, scales[16] (int8) @192, d @208


@njit(void(F1, i64, OUT, i64, F1, F1), **JIT)
def _q6k_block(x, xo, out, b, scales, Lq):
    """quantize_row_q6_K_ref / _impl after the searches: int8 scales, d, requant, pack."""
    max_scale = ZERO
    max_abs_scale = ZERO
    for ib in range(16):
        a = abs(scales[ib])
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(210):
            out[b, k] = 0
        return
    iscale = F32(-128.0) / max_scale
    store_fp16(out, b, 208, ONE / iscale)
    d = load_fp16(out, b, 208)
    for ib in range(16):
        out[b, 192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        dd = d * F32(as_int8(np.int64(out[b, 192 + j])))
        if dd == ZERO:
            continue
        _requant_sym(x, xo, 16, j, dd, F32(-32.0), F32(31.0), Lq)
    for h in range(2):
        j0 = 128 * h
        for k in range(32):
            q1 = np.int64(Lq[j0 + k])
            q2 = np.int64(Lq[j0 + k + 32])
            q3 = np.int64(Lq[j0 + k + 64])
            q4 = np.int64(Lq[j0 + k + 96])
            out[b, 64 * h + k] = ((q1 & 0xF) | ((q3 & 0xF) << 4)) & 0xFF
            out[b, 64 * h + 32 + k] = ((q2 & 0xF) | ((q4 & 0xF) << 4)) & 0xFF
            out[b, 128 + 32 * h + k] = (
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
            ) & 0xFF


@njit(void(F1, F1, b1, OUT, i64, i64), **JIT)
def q6k_range(x, qw, use_qw, out, start, stop):
    """Q6_K blocks [start, stop): 16 lanes (sub-blocks of 16) per block; weights x² or the raw imatrix."""
    X, W, L, _, S, vec, qoff, Lq = _alloc(16)
    bpr = max(qw.shape[0] // QK_K, 1)
    for b0 in range(start, stop, NL // 16):
        nb = min(NL // 16, stop - b0)
        gather(x, b0 * QK_K, 16, nb * 16, X)
        if use_qw:
            _qw_offsets(b0, nb, 16, 16, bpr, qoff)
            for i in range(16):
                for j in range(NL):
                    W[i * NL + j] = qw[qoff[j] + i]
        else:
            for k in range(16 * NL):
                W[k] = X[k] * X[k]
        qx_lanes(16, 32, X, W, L, vec[0], S)
        for bi in range(nb):
            b = b0 + bi
            _block_quants(L, bi, 16, 16, Lq)
            _q6k_block(x, b * QK_K, out, b, vec[0][bi * 16 : bi * 16 + 16], Lq)
