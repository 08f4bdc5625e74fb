"""Scalar (one group at a time) scale searches of ggml-quants.c, bit-exact in float32.

Used where a search runs once per super-block on its 8 or 16 sub-block scales (make_qp_quants, and
make_qx_quants for Q3_K's block scale), too little work to be worth transposing into lanes (see
lanes.py for the per-sub-block searches). Integers are converted to float32 exactly where C converts
them, products and sums follow C's left-to-right order, and comparisons keep ggml's strictness.
"""

from __future__ import annotations

from numba import njit

from .kquant_helpers import (
    F1,
    F32,
    GROUP_MAX_EPS,
    I1,
    JIT,
    ONE,
    ZERO,
    f32,
    i64,
    nearest_int,
)

_TENTH = F32(0.1)


@njit(f32(i64, i64, F1, i64, F1, i64, I1, i64), **JIT)
def make_qx_quants(n, nmax, x, xo, w, wo, L, Lo):
    """make_qx_quants with rmse_type 1 and explicit weights w (x² when ggml passes NULL).

    Writes L[Lo:Lo+n] in 0..2·nmax−1 and returns the scale.
    """
    mx = ZERO
    amax = ZERO
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            mx = x[xo + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[Lo + i] = 0
        return ZERO
    fnmax = F32(nmax)
    iscale = F32(-nmax) / mx
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        q = min(max(nearest_int(iscale * x[xo + i]), -nmax), nmax - 1)
        L[Lo + i] = q + nmax
        fl = F32(q)
        wi = w[wo + i]
        sumlx += wi * x[xo + i] * fl
        suml2 += wi * fl * fl
    scale = sumlx / suml2 if suml2 != ZERO else ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + _TENTH * F32(step)) / mx
        sumlx = ZERO
        suml2 = ZERO
        for i in range(n):
            q = min(max(nearest_int(iscale * x[xo + i]), -nmax), nmax - 1)
            fl = F32(q)
            wi = w[wo + i]
            sumlx += wi * x[xo + i] * fl
            suml2 += wi * fl * fl
        if suml2 > ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[Lo + i] = nmax + min(max(nearest_int(iscale * x[xo + i]), -nmax), nmax - 1)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(f32(i64, i64, F1, I1, F1), **JIT)
def make_qp_quants(n, nmax, x, L, qw):
    """make_qp_quants: quantize n non-negative (sub-block scales or mins) to 0..nmax with weights qw.

    L mimics C's uint8 storage (values wrap mod 256) while the running sums use the unwrapped int,
    exactly as in ggml.
    """
    mx = ZERO
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return ZERO
    fnmax = F32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = ONE / iscale
    best_mse = ZERO
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_TENTH * F32(step) + fnmax) / mx
        scale_is = ONE / iscale_is
        mse = ZERO
        for i in range(n):
            q = min(nearest_int(iscale_is * x[i]), nmax)
            diff = x[i] - scale_is * F32(q)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        q = min(nearest_int(iscale * x[i]), nmax)
        L[i] = q & 0xFF
        fl = F32(q)
        sumlx += qw[i] * x[i] * fl
        suml2 += qw[i] * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            wi = qw[i]
            fL = F32(L[i])
            slx = sumlx - wi * x[i] * fL
            sl2 = suml2 - wi * fL * fL
            if slx > ZERO and sl2 > ZERO:
                new_l = min(nearest_int(x[i] * sl2 / slx), nmax)
                if new_l != L[i]:
                    fn = F32(new_l)
                    slx += wi * x[i] * fn
                    sl2 += wi * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > ZERO else ZERO
