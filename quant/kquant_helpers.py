"""Bit-exact float32 primitives shared by the K-quant and IQ4 block quantizers.

ggml's quantizers are plain C compiled for x86-64 without FMA: every operator rounds to float32 once,
left to right, and sums run in index order. Numba follows the same IEEE rules as long as (a) every
literal and integer that meets a float is first made a float32 (numba would otherwise promote to
float64), (b) fastmath stays off (no reassociation, no FMA contraction) and (c) division uses
``error_model="numpy"`` so that x/0 gives inf/NaN as in C instead of raising.

The helpers here reproduce ggml's bit tricks literally (``nearest_int``, the fp32↔fp16 conversions)
so that even out-of-range and signed-zero cases produce the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


def _kernel_modules(here: Path) -> list[Path]:
    """This module and every sibling that imports it: the @njit kernels that call each other."""
    own = Path(__file__).resolve()
    found = [own]
    for path in sorted(here.glob("*.py")):
        if path != own and "kquant_helpers" in path.read_text(encoding="utf-8"):
            found.append(path)
    return found


def _drop_stale_numba_cache() -> None:
    """Delete every kernel's numba cache when any kernel source file changed.

    numba keys a cached function on its *own* file only, so editing a callee in another module
    would otherwise leave callers running stale machine code. Only the default cache location
    (``quant/__pycache__``) is handled; failures (read-only installs) are ignored.
    """
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    try:
        modules = _kernel_modules(here)
        for path in modules:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    except OSError:
        return
    cache = here / "__pycache__"
    stamp = cache / "k2conv-kernels.sha256"
    try:
        if stamp.read_text() == digest.hexdigest():
            return
    except OSError:
        pass
    try:
        for path in modules:
            for f in cache.glob(f"{path.stem}.*.nb[ic]"):
                f.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:
        pass


_drop_stale_numba_cache()

F32 = np.float32
#: ``nearest_int``'s magic number 1.5·2²³: adding it leaves round-half-even(f) in the low mantissa bits.
MAGIC = F32(12582912.0)
#: GROUP_MAX_EPS in ggml-quants.c: below this a group counts as all zero.
GROUP_MAX_EPS = F32(1e-15)
ZERO = F32(0.0)
ONE = F32(1.0)
HALF = F32(0.5)
_SCALE_TO_INF = F32(2.0**112)
_SCALE_TO_ZERO = F32(2.0**-110)
_FP16_EXP_SCALE = F32(2.0**-112)

# Argument types for the explicit signatures. Explicit signatures make numba compile each kernel once
# (literal arguments would otherwise create one specialization per constant) and document the types.
f32 = types.float32
i64 = types.int64
b1 = types.boolean
void = types.void
F1 = types.float32[::1]  # 1-D contiguous float32
F2 = types.float32[:, ::1]  # 2-D C-contiguous float32
I1 = types.int64[::1]
U2 = types.Array(types.uint16, 1, "C", readonly=True)  # bfloat16 bit patterns, e.g. a mapped checkpoint
OUT = types.uint8[:, ::1]  # quantized blocks, one row per block
UniTuple = types.UniTuple
Tuple = types.Tuple

#: Options shared by every compiled kernel: IEEE division, no fastmath, on-disk cache, GIL released.
JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as its int32 bit pattern (C's memcpy/union trick)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, i):
    """Reinterpret a uint32 bit pattern as a float32."""
    if i != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def nint(typingctx, f):
    """float32(nearest_int(f)) in pure 32-bit ops, so that loops using it vectorize.

    Same bits as ggml's trick: (bits(f + 1.5·2²³) & 0x7FFFFF) − 0x400000, converted to float (exact).
    """
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v = builder.fadd(args[0], ir.Constant(ir.FloatType(), 12582912.0))
        i = builder.and_(builder.bitcast(v, i32), ir.Constant(i32, 0x007FFFFF))
        return builder.sitofp(builder.sub(i, ir.Constant(i32, 0x00400000)), ir.FloatType())

    return types.float32(types.float32), codegen


@njit(i64(f32), **JIT)
def nearest_int(f):
    """ggml's nearest_int: round-half-even for |f| ≤ 4194303, and the same bits as C beyond that."""
    v = f + MAGIC
    return np.int64((f32_bits(v) & 0x007FFFFF) - 0x00400000)


@njit(i64(f32), **JIT)
def u32(f):
    """The float32's bits as a non-negative int64 (0 .. 2³²−1)."""
    return np.int64(f32_bits(f)) & 0xFFFFFFFF


@njit(i64(f32), **JIT)
def fp32_to_fp16(f):
    """ggml_compute_fp32_to_fp16, literally: IEEE round-to-nearest-even, NaN → 0x7E00 | sign.

    Returns the 16-bit pattern as int64.
    """
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = u32(f)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32(np.uint32((bias >> 1) + 0x07800000)) + base
    bits = u32(base)
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return ((sign >> 16) | nonsign) & 0xFFFF


@njit(f32(i64), **JIT)
def fp16_to_fp32(h):
    """ggml_compute_fp16_to_fp32, literally (exact; NaN payloads kept as ggml keeps them)."""
    w = (np.int64(h) & 0xFFFF) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    normalized = bits_f32(np.uint32((two_w >> 4) + (0xE0 << 23))) * _FP16_EXP_SCALE
    denormalized = bits_f32(np.uint32((two_w >> 17) | (126 << 23))) - HALF
    if two_w < (1 << 27):
        res = u32(denormalized)
    else:
        res = u32(normalized)
    return bits_f32(np.uint32(sign | res))


@njit(f32(OUT, i64, i64), **JIT)
def load_fp16(out, b, off):
    """Read back the fp16 stored at out[b, off:off+2] as float32 (C's GGML_FP16_TO_FP32(y.d))."""
    return fp16_to_fp32(np.int64(out[b, off]) | (np.int64(out[b, off + 1]) << 8))


@njit(f32(f32, f32, f32), **JIT)
def clampf(v, lo, hi):
    """min(max(v, lo), hi) as two selects (v is an integer-valued float32, never NaN)."""
    v = lo if v < lo else v
    return hi if v > hi else v


@njit(i64(OUT, i64, i64, f32), **JIT)
def store_fp16(out, b, off, f):
    """Write fp16(f) little-endian at out[b, off:off+2] and return the bits."""
    h = fp32_to_fp16(f)
    out[b, off] = h & 0xFF
    out[b, off + 1] = h >> 8
    return h


@njit(i64(f32), **JIT)
def trunc_i32(v):
    """C's (int) cast of a float32 as x86-64 cvttss2si does it: toward zero, NaN/overflow → INT_MIN."""
    if v > F32(-2147483648.0) and v < F32(2147483648.0):
        return np.int64(int(v))
    return np.int64(-2147483648)


@njit(i64(i64), **JIT)
def as_int8(v):
    """Truncate an integer to int8 the way C's implicit conversion does (two's complement wrap)."""
    v &= 0xFF
    return v - 256 if v >= 128 else v
