"""ggml's scale searches run on NL independent groups at once ("lanes"), bit-exact and vectorizable.

ggml's searches are chains of sequential float32 sums over the 16 or 32 values of one group, so they
are latency-bound and cannot use SIMD (reordering the sums would change the bytes). Here the data of
NL groups (the sub-blocks of several super-blocks) is transposed so that ``X[i·NL + j]`` is value i of
group j. The loops then run over i outside and over lanes j inside: each lane still adds its terms in
C's order, but the lanes are independent, so LLVM vectorizes across them. Per-lane branches of the C
code become selects; a lane's work that C would skip (e.g. a zero group) is computed and discarded.

Instead of copying quant vectors when a candidate scale wins, the winning inverse scale (and min) is
remembered and the quants are recomputed from it once at the end — the same values C keeps.

Per-lane state lives in one float32 array ``S`` at constant offsets (``k·NL + j``), which lets LLVM
prove that the rows do not overlap and vectorize without runtime alias checks.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kquant_helpers import (
    F1,
    F32,
    GROUP_MAX_EPS,
    JIT,
    ONE,
    ZERO,
    b1,
    clampf,
    f32,
    i64,
    nint,
    void,
)

#: Lanes per call: a multiple of the vector width; padded lanes hold zeros and are ignored.
NL = 64
#: Rows of per-lane state each kernel may use in S (S has S_ROWS·NL floats).
S_ROWS = 16
_TENTH = F32(0.1)


def new_state() -> np.ndarray:
    """Scratch for the per-lane state of one kernel call."""
    return np.zeros(S_ROWS * NL, np.float32)


@njit(void(F1, i64, i64, i64, F1), **JIT)
def gather(x, base, n, nlanes, X):
    """X[i·NL + j] = x[base + j·n + i] for lanes j < nlanes (consecutive groups of n values); 0 after."""
    for j in range(NL):
        if j < nlanes:
            for i in range(n):
                X[i * NL + j] = x[base + j * n + i]
        else:
            for i in range(n):
                X[i * NL + j] = ZERO


@njit(void(i64, F1, F1, i64, i64), **JIT)
def _signed_absmax(n, X, S, r_mx, r_amax):
    """Per lane: the value with the largest |x| (strict >, first wins) into S[r_mx], |it| into S[r_amax]."""
    for j in range(NL):
        S[r_mx * NL + j] = ZERO
        S[r_amax * NL + j] = ZERO
    for i in range(n):
        for j in range(NL):
            v = X[i * NL + j]
            a = abs(v)
            c = a > S[r_amax * NL + j]
            S[r_amax * NL + j] = a if c else S[r_amax * NL + j]
            S[r_mx * NL + j] = v if c else S[r_mx * NL + j]


# ------------------------------------------------------------------------------- make_qx_quants
_QX_MX, _QX_AMAX, _QX_ISC, _QX_SX, _QX_S2, _QX_BEST, _QX_IBEST = range(7)


@njit(void(i64, i64, F1, F1, F1), **JIT)
def _qx_sums(n, nmax, X, W, S):
    """Σ w·x·l and Σ w·l·l per lane for l = clamp(nearest_int(iscale·x), −nmax, nmax−1)."""
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    for j in range(NL):
        S[_QX_SX * NL + j] = ZERO
        S[_QX_S2 * NL + j] = ZERO
    for i in range(n):
        for j in range(NL):
            x = X[i * NL + j]
            w = W[i * NL + j]
            lf = clampf(nint(S[_QX_ISC * NL + j] * x), lo, hi)
            S[_QX_SX * NL + j] += w * x * lf
            S[_QX_S2 * NL + j] += w * lf * lf


@njit(void(i64, i64, F1, F1, F1, F1, F1), **JIT)
def qx_lanes(n, nmax, X, W, L, scale, S):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=W) on NL lanes.

    L[i·NL + j] gets the quants (0..2·nmax−1, as float32) and scale[j] the scale.
    """
    fnmax = F32(nmax)
    _signed_absmax(n, X, S, _QX_MX, _QX_AMAX)
    for j in range(NL):
        S[_QX_ISC * NL + j] = F32(-nmax) / S[_QX_MX * NL + j]
        S[_QX_IBEST * NL + j] = S[_QX_ISC * NL + j]
    _qx_sums(n, nmax, X, W, S)
    for j in range(NL):
        sx = S[_QX_SX * NL + j]
        s2 = S[_QX_S2 * NL + j]
        sc = sx / s2 if s2 != ZERO else ZERO
        scale[j] = sc
        S[_QX_BEST * NL + j] = sc * sx
    for step in range(-9, 10):
        if step == 0:
            continue
        t = fnmax + _TENTH * F32(step)
        for j in range(NL):
            S[_QX_ISC * NL + j] = -t / S[_QX_MX * NL + j]
        _qx_sums(n, nmax, X, W, S)
        for j in range(NL):
            sx = S[_QX_SX * NL + j]
            s2 = S[_QX_S2 * NL + j]
            acc = (s2 > ZERO) & (sx * sx > S[_QX_BEST * NL + j] * s2)
            sc = sx / s2
            scale[j] = sc if acc else scale[j]
            S[_QX_BEST * NL + j] = sc * sx if acc else S[_QX_BEST * NL + j]
            S[_QX_IBEST * NL + j] = S[_QX_ISC * NL + j] if acc else S[_QX_IBEST * NL + j]
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    for i in range(n):
        for j in range(NL):
            lf = clampf(nint(S[_QX_IBEST * NL + j] * X[i * NL + j]), lo, hi) + fnmax
            L[i * NL + j] = ZERO if S[_QX_AMAX * NL + j] < GROUP_MAX_EPS else lf
    for j in range(NL):
        scale[j] = ZERO if S[_QX_AMAX * NL + j] < GROUP_MAX_EPS else scale[j]


# ------------------------------------------------------------------------------- make_q3_quants
_Q3_MX, _Q3_AMAX, _Q3_SX, _Q3_S2, _Q3_ISC, _Q3_CHG = range(6)


@njit(void(i64, f32, f32, F1, F1, F1), **JIT)
def _q3_first_pass(n, lo, hi, X, L, S):
    """make_q3_quants' first refinement pass on all lanes; S[_Q3_CHG] counts each lane's changes."""
    for j in range(NL):
        S[_Q3_CHG * NL + j] = ZERO
    for i in range(n):
        for j in range(NL):
            x = X[i * NL + j]
            w = x * x
            lc = L[i * NL + j]
            sumlx = S[_Q3_SX * NL + j]
            suml2 = S[_Q3_S2 * NL + j]
            slx = sumlx - w * x * lc
            sl2 = suml2 - w * lc * lc
            new = clampf(nint(x * sl2 / slx), lo, hi)
            slx2 = slx + w * x * new
            sl22 = sl2 + w * new * new
            acc = (slx > ZERO) & (new != lc) & (sl22 > ZERO) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i * NL + j] = new if acc else lc
            S[_Q3_SX * NL + j] = slx2 if acc else sumlx
            S[_Q3_S2 * NL + j] = sl22 if acc else suml2
            S[_Q3_CHG * NL + j] += ONE if acc else ZERO


@njit(i64(i64, f32, f32, F1, F1, F1, i64), **JIT)
def _q3_lane_pass(n, lo, hi, X, L, S, j):
    """One further refinement pass for lane j alone, written as ggml's scalar loop; returns changes."""
    changed = 0
    sumlx = S[_Q3_SX * NL + j]
    suml2 = S[_Q3_S2 * NL + j]
    for i in range(n):
        x = X[i * NL + j]
        w = x * x
        lc = L[i * NL + j]
        slx = sumlx - w * x * lc
        if slx > ZERO:
            sl2 = suml2 - w * lc * lc
            new = clampf(nint(x * sl2 / slx), lo, hi)
            if new != lc:
                slx += w * x * new
                sl2 += w * new * new
                if sl2 > ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                    L[i * NL + j] = new
                    sumlx = slx
                    suml2 = sl2
                    changed += 1
    S[_Q3_SX * NL + j] = sumlx
    S[_Q3_S2 * NL + j] = suml2
    return changed


@njit(void(i64, i64, F1, F1, F1, F1), **JIT)
def q3_lanes(n, nmax, X, L, scale, S):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on NL lanes (weights x²).

    Every group needs C's first refinement pass, so it runs vectorized on all lanes. Most groups are
    then done (C stops after a pass without change); the few that changed get their further passes
    (at most 4 more, as in C) one lane at a time.
    """
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    _signed_absmax(n, X, S, _Q3_MX, _Q3_AMAX)
    for j in range(NL):
        S[_Q3_SX * NL + j] = ZERO
        S[_Q3_S2 * NL + j] = ZERO
        S[_Q3_ISC * NL + j] = F32(-nmax) / S[_Q3_MX * NL + j]
    for i in range(n):
        for j in range(NL):
            x = X[i * NL + j]
            w = x * x
            lf = clampf(nint(S[_Q3_ISC * NL + j] * x), lo, hi)
            L[i * NL + j] = lf
            S[_Q3_SX * NL + j] += w * x * lf
            S[_Q3_S2 * NL + j] += w * lf * lf
    _q3_first_pass(n, lo, hi, X, L, S)
    for j in range(NL):
        if S[_Q3_CHG * NL + j] > ZERO:
            for _ in range(4):
                if _q3_lane_pass(n, lo, hi, X, L, S, j) == 0:
                    break
    fnmax = F32(nmax)
    for i in range(n):
        for j in range(NL):
            L[i * NL + j] = ZERO if S[_Q3_AMAX * NL + j] < GROUP_MAX_EPS else L[i * NL + j] + fnmax
    for j in range(NL):
        s2 = S[_Q3_S2 * NL + j]
        sc = S[_Q3_SX * NL + j] / s2 if s2 > ZERO else ZERO
        scale[j] = ZERO if S[_Q3_AMAX * NL + j] < GROUP_MAX_EPS else sc


# ------------------------------------------------------------------ make_qkx2_quants / qkx3
(
    _K_MN,
    _K_MX,
    _K_SW,
    _K_SX,
    _K_ISC,
    _K_BEST,
    _K_IBEST,
    _K_MNB,
    _K_SL,
    _K_SL2,
    _K_SXL,
    _K_TS,
    _K_TM,
    _K_CUR,
    _K_MN0,
    _K_OK,
) = range(16)


@njit(void(i64, F1, F1, F1), **JIT)
def _qkx_init(n, X, W, S):
    """Per lane: min, max, Σw and Σw·x, with min clamped to ≤ 0 (C's first loop)."""
    for j in range(NL):
        x0 = X[j]
        S[_K_MN * NL + j] = x0
        S[_K_MX * NL + j] = x0
        S[_K_SW * NL + j] = W[j]
        S[_K_SX * NL + j] = W[j] * x0
    for i in range(1, n):
        for j in range(NL):
            x = X[i * NL + j]
            w = W[i * NL + j]
            S[_K_MN * NL + j] = x if x < S[_K_MN * NL + j] else S[_K_MN * NL + j]
            S[_K_MX * NL + j] = x if x > S[_K_MX * NL + j] else S[_K_MX * NL + j]
            S[_K_SW * NL + j] += w
            S[_K_SX * NL + j] += w * x
    for j in range(NL):
        S[_K_MN * NL + j] = ZERO if S[_K_MN * NL + j] > ZERO else S[_K_MN * NL + j]
        S[_K_MN0 * NL + j] = S[_K_MN * NL + j]


@njit(void(i64, f32, F1, F1, F1, F1), **JIT)
def _qkx_quants_sums(n, fnmax, X, W, Laux, S):
    """Laux = clamp(nearest_int(iscale·(x − min)), 0, nmax) and the sums Σw·l, Σw·l², Σw·l·x."""
    for j in range(NL):
        S[_K_SL * NL + j] = ZERO
        S[_K_SL2 * NL + j] = ZERO
        S[_K_SXL * NL + j] = ZERO
    for i in range(n):
        for j in range(NL):
            x = X[i * NL + j]
            w = W[i * NL + j]
            lf = clampf(nint(S[_K_ISC * NL + j] * (x - S[_K_MN * NL + j])), ZERO, fnmax)
            Laux[i * NL + j] = lf
            wl = w * lf
            S[_K_SL * NL + j] += wl
            S[_K_SL2 * NL + j] += wl * lf
            S[_K_SXL * NL + j] += wl * x


@njit(void(i64, F1, F1, F1, F1, b1), **JIT)
def _qkx_error(n, X, W, Laux, S, use_mad):
    """Σ w·f(scale·l + min − x) per lane into S[_K_CUR], f = |·| or (·)², scale/min from S[_K_TS/_K_TM]."""
    for j in range(NL):
        S[_K_CUR * NL + j] = ZERO
    for i in range(n):
        for j in range(NL):
            diff = S[_K_TS * NL + j] * Laux[i * NL + j] + S[_K_TM * NL + j] - X[i * NL + j]
            diff = abs(diff) if use_mad else diff * diff
            S[_K_CUR * NL + j] += W[i * NL + j] * diff


@njit(void(i64, i64, F1, F1, F1, F1, F1, f32, f32, i64, b1, F1, F1), **JIT)
def qkx_lanes(n, nmax, X, W, L, scale, the_min, rmin, rdelta, nstep, use_mad, S, Laux):
    """make_qkx2_quants / make_qkx3_quants (explicit weights W) on NL lanes, nstep ≥ 1.

    L gets the quants (0..nmax, float32), scale[j] the scale and the_min[j] = −min ≥ 0.
    """
    fnmax = F32(nmax)
    _qkx_init(n, X, W, S)
    for j in range(NL):
        isc = fnmax / (S[_K_MX * NL + j] - S[_K_MN * NL + j])
        S[_K_ISC * NL + j] = isc
        S[_K_IBEST * NL + j] = isc
        S[_K_MNB * NL + j] = S[_K_MN * NL + j]
        S[_K_TS * NL + j] = ONE / isc
        S[_K_TM * NL + j] = S[_K_MN * NL + j]
        scale[j] = S[_K_TS * NL + j]
    _qkx_quants_sums(n, fnmax, X, W, Laux, S)
    _qkx_error(n, X, W, Laux, S, use_mad)
    for j in range(NL):
        S[_K_BEST * NL + j] = S[_K_CUR * NL + j]
    for step in range(nstep + 1):
        t = rmin + rdelta * F32(step) + fnmax
        for j in range(NL):
            S[_K_ISC * NL + j] = t / (S[_K_MX * NL + j] - S[_K_MN * NL + j])
        _qkx_quants_sums(n, fnmax, X, W, Laux, S)
        for j in range(NL):
            sum_w = S[_K_SW * NL + j]
            sum_x = S[_K_SX * NL + j]
            sl = S[_K_SL * NL + j]
            sl2 = S[_K_SL2 * NL + j]
            sxl = S[_K_SXL * NL + j]
            D = sum_w * sl2 - sl * sl
            ts = (sum_w * sxl - sum_x * sl) / D
            tm = (sl2 * sum_x - sl * sxl) / D
            pos = tm > ZERO
            S[_K_TS * NL + j] = sxl / sl2 if pos else ts
            S[_K_TM * NL + j] = ZERO if pos else tm
            S[_K_OK * NL + j] = ONE if D > ZERO else ZERO
        _qkx_error(n, X, W, Laux, S, use_mad)
        for j in range(NL):
            acc = (S[_K_OK * NL + j] == ONE) & (S[_K_CUR * NL + j] < S[_K_BEST * NL + j])
            S[_K_BEST * NL + j] = S[_K_CUR * NL + j] if acc else S[_K_BEST * NL + j]
            scale[j] = S[_K_TS * NL + j] if acc else scale[j]
            S[_K_IBEST * NL + j] = S[_K_ISC * NL + j] if acc else S[_K_IBEST * NL + j]
            S[_K_MNB * NL + j] = S[_K_MN * NL + j] if acc else S[_K_MNB * NL + j]
            S[_K_MN * NL + j] = S[_K_TM * NL + j] if acc else S[_K_MN * NL + j]
    for i in range(n):
        for j in range(NL):
            lf = clampf(nint(S[_K_IBEST * NL + j] * (X[i * NL + j] - S[_K_MNB * NL + j])), ZERO, fnmax)
            L[i * NL + j] = ZERO if S[_K_MX * NL + j] <= S[_K_MN0 * NL + j] else lf
    for j in range(NL):
        # max ≤ min (all values equal, or all ≥ 0 and equal): C returns 0 with L = 0, the_min = −min.
        degenerate = S[_K_MX * NL + j] <= S[_K_MN0 * NL + j]
        scale[j] = ZERO if degenerate else scale[j]
        the_min[j] = -(S[_K_MN0 * NL + j] if degenerate else S[_K_MN * NL + j])


# --------------------------------------------------------------------------------- IQ4 search
#: kvalues_iq4nl as float32, and the exact decision thresholds of best_index_int8 (see below).
KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _key(v: np.float32) -> int:
    """Rank of a float32 in numeric order (−0.0 and +0.0 share 0)."""
    bits = int(np.array([v], np.float32).view(np.uint32)[0])
    return bits if bits < 0x80000000 else -(bits & 0x7FFFFFFF)


def _from_key(k: int) -> np.float32:
    """Inverse of _key."""
    bits = k if k >= 0 else (-k) | 0x80000000
    return np.array([bits], np.uint32).view(np.float32)[0]


def _thresholds() -> np.ndarray:
    """t[k] = the smallest float32 x in (kv[k], kv[k+1]] for which best_index_int8 picks k+1.

    best_index_int8 picks k for x in [kv[k], kv[k+1]) when f32(x − kv[k]) < f32(kv[k+1] − x). The left
    side grows and the right side shrinks with x, so the choice flips once; bisecting over the float32
    values finds the flip exactly. Then index(x) = #{k : not (x < t[k])}, and NaN counts as above every
    threshold, which is where C's binary search sends it (index 15).
    """
    out = np.empty(15, np.float32)
    for k in range(15):
        a, b = KV[k], KV[k + 1]
        lo, hi = _key(a), _key(b)  # predicate false at lo, true at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            v = _from_key(mid)
            if np.float32(v - a) < np.float32(b - v):
                lo = mid
            else:
                hi = mid
        out[k] = _from_key(hi)
    return out


THRESHOLDS = _thresholds()
#: dq[k] = kv[k+1] − kv[k]: level(x) = kv[0] + Σ_k dq[k]·[x ≥ t[k]] (integer-valued, exact in float32).
DQ = np.diff(KV).astype(np.float32)


@njit(f32(f32), **JIT)
def iq4_level(al):
    """kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, al)] without branches."""
    q = KV[0]
    for k in range(15):
        q += ZERO if al < THRESHOLDS[k] else DQ[k]
    return q


@njit(i64(f32), **JIT)
def iq4_index(al):
    """best_index_int8(16, kvalues_iq4nl, al) without branches (as an int)."""
    idx = 0
    for k in range(15):
        idx += 0 if al < THRESHOLDS[k] else 1
    return idx


_I_MX, _I_AMAX, _I_ID, _I_QX, _I_Q2, _I_D, _I_BEST = range(7)


@njit(void(F1, F1, F1), **JIT)
def _iq4_sums(X, W, S):
    """Σ w·q·x and Σ w·q·q per lane, q = the level picked for id·x."""
    for j in range(NL):
        S[_I_QX * NL + j] = ZERO
        S[_I_Q2 * NL + j] = ZERO
    for i in range(32):
        for j in range(NL):
            x = X[i * NL + j]
            q = iq4_level(S[_I_ID * NL + j] * x)
            wq = W[i * NL + j] * q
            S[_I_QX * NL + j] += wq * x
            S[_I_Q2 * NL + j] += wq * q


@njit(void(F1, F1, F1, F1), **JIT)
def iq4_scale_lanes(X, W, d_out, S):
    """The scale search of quantize_row_iq4_nl_impl (ntry = 7) for NL 32-value blocks; 0 for zero blocks."""
    _signed_absmax(32, X, S, _I_MX, _I_AMAX)
    for j in range(NL):
        d = -S[_I_MX * NL + j] / KV[0]
        S[_I_ID * NL + j] = ONE / d
    _iq4_sums(X, W, S)
    for j in range(NL):
        sqx = S[_I_QX * NL + j]
        sq2 = S[_I_Q2 * NL + j]
        d = sqx / sq2 if sq2 > ZERO else ZERO
        S[_I_D * NL + j] = d
        S[_I_BEST * NL + j] = d * sqx
    for itry in range(-7, 8):
        num = F32(itry - 127)
        for j in range(NL):
            S[_I_ID * NL + j] = num / S[_I_MX * NL + j]
        _iq4_sums(X, W, S)
        for j in range(NL):
            sqx = S[_I_QX * NL + j]
            sq2 = S[_I_Q2 * NL + j]
            acc = (sq2 > ZERO) & (sqx * sqx > S[_I_BEST * NL + j] * sq2)
            d = sqx / sq2
            S[_I_D * NL + j] = d if acc else S[_I_D * NL + j]
            S[_I_BEST * NL + j] = d * sqx if acc else S[_I_BEST * NL + j]
    for j in range(NL):
        d_out[j] = ZERO if S[_I_AMAX * NL + j] < GROUP_MAX_EPS else S[_I_D * NL + j]
