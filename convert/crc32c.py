"""CRC-32C (Castagnoli) at hardware speed: the checksum of journal units and GGUF tensors.

x86-64 with PCLMULQDQ and SSE4.2 (every x86-64 CPU since ~2010) folds the buffer with carry-less
multiplies ("pclmul" kind, below); x86-64 with SSE4.2 only and AArch64 (ARMv8 CRC) run the CRC-32C
instruction through the LLVM intrinsic, three independent streams per buffer (the instruction's
latency is 3 cycles, so one stream leaves the unit idle on CPUs that pipeline it), the streams joined
with `crc32c_combine`. Elsewhere a slicing-by-8 table loop in numba computes the same values.

Why folding: Zen 1 (the project's 2-core AMD EPYC dev machine) issues one crc32 per 3 cycles however
many streams there are: 5.5–6 GB/s per core, 3.4–5.6 % of a conversion's CPU time. pclmulqdq
multiplies 64×64-bit polynomials over GF(2) and folding needs two per 16 bytes: on Zen 1 9–9.2 GB/s
per core on a 64 MiB buffer, ~10 GB/s in cache, 1.6–1.7× the three crc32 streams
(bench/bench_crc32c.py). crc32 streams beside the pclmul lanes in the same loop (other execution
units, in theory) were measured twice on Zen 1: 1–3 streams of 1–4 words per 128-byte block, grouped or
spread between the folds, 0.98–1.03x; table-lookup streams 0.82x. There crc32 and pclmulqdq share one
bottleneck (~10 GB/s together), so the loop is pclmul only; CPUs that issue both each cycle (Intel, Zen 3+)
might gain from such a hybrid, unmeasured here.
Cores that issue one crc32 and one pclmulqdq per cycle (Intel, Zen 3+) should run three streams and
this fold at about the same 8 bytes per cycle (not measured here).

How folding works (the reflected bit order of this CRC: bit i of a little-endian 64-bit word is the
coefficient of x^(63−i), byte 0 bit 0 the highest power). The raw CRC register after a message M
is M(x)·x³² mod P, and starting from state s instead of 0 is the same as XORing s into M's first 4
bytes. So keep 8 lanes of 128-bit values, each ≡ (mod P) the part of the message it has absorbed,
positioned at its last 16 bytes; each iteration moves every lane 128 bytes further (multiply by
x^1024 mod P) and XORs in the next 16 bytes. Moving a 16-byte value V = (lo, hi), which stands
for lo(x)·x⁶⁴ + hi(x), by n bytes: pclmulqdq of two reflected words returns x·a(x)·b(x) (the
reflected product is one bit short of 128), and a 32-bit reflected constant k in the low half of
a word stands for k(x)·x³², so

    clmul(lo, k1) ⊕ clmul(hi, k2) ≡ V(x)·x^(8n)  with  k1 = x^(8n+31) mod P,  k2 = x^(8n−33) mod P

since x·lo·k1·x³² ≡ lo·x⁶⁴·x^(8n) and x·hi·k2·x³² ≡ hi·x^(8n)
(a 96-bit result, never a reduction inside the loop). `_fold_constants` derives k1, k2 with the
`_multmodp`/`_X2N` helpers below at compile time: nothing is copied from a table. At the end the
lanes are moved to the last lane's position and XORed (constants for 16·j bytes), and the crc32
instruction over that 16-byte remainder, from state 0, gives the register state (its x³² mod P);
the < 128-byte tail continues with the crc32 instruction. The fold loop is written in LLVM IR inside
one numba intrinsic (`_fold_lanes`) so that the lanes stay in xmm registers as <2 x i64>: the loop
is loads, vpclmulqdq and vpxor, no calls (check with `_fold_x86.inspect_asm()`).

Importing this module imports numba (integrity.py imports it lazily); each kernel compiles on first
use, or loads from numba's on-disk cache (milliseconds) after the first run. The pclmul kind needs
one kernel for every size (`_fold_x86`; under 256 bytes it is the one-stream crc32 loop).
"""

from __future__ import annotations

import platform
from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

POLY = 0x82F63B78  # Castagnoli, reflected
_STREAMS_FROM = 3 * 64 * 1024  # below this one stream is as fast
_LANES = 8  # 128-bit fold lanes: 8 cover pclmulqdq's latency where it issues every cycle (4 do on Zen 1)
_BLOCK = 16 * _LANES  # bytes per fold iteration
_FOLD_FROM = 2 * _BLOCK  # below this the one-stream crc32 loop is as fast
_PREFETCH = 4096  # bytes ahead the fold loop asks for: +7 % on Zen 1 from memory (2–16 KiB all help)


def _multmodp(a: int, b: int) -> int:
    """a·b modulo the polynomial, reflected bit order (zlib crc32.c multmodp)."""
    m, p = 1 << 31, 0
    while m:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    """x^(2^k) mod p for k < 72 (lengths up to 2⁶⁸ bytes). zlib keeps 32 and wraps k at 32, which
    relies on x^(2^32) ≡ x, true for its irreducible polynomial but not for Castagnoli's, which has
    the factor (x + 1): wrapping gives wrong combines from 512 MiB on."""
    table, p = [], 1 << 30  # x¹
    for _ in range(72):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def _xpow(n: int) -> int:
    """x^n mod p, reflected (zlib x2nmodp): the product of x^(2^k) over the set bits k of n."""
    p, k = 1 << 31, 0  # p = x⁰
    while n:
        if n & 1:
            p = _multmodp(_X2N[k], p)
        n >>= 1
        k += 1
    return p


@lru_cache(maxsize=4096)
def _shift_op(nbytes: int) -> int:
    """x^(8·nbytes) mod p: multiplying a CRC by it appends nbytes zero bytes (zlib x2nmodp(len, 3))."""
    return _xpow(8 * nbytes)


def _fold_constants(nbytes: int) -> tuple[int, int]:
    """(k1, k2) = (x^(8n+31), x^(8n−33)) mod p for n = nbytes ≥ 5: clmul(lo, k1) ⊕ clmul(hi, k2) of a
    16-byte value (lo, hi) is ≡ that value followed by n zero bytes (module docstring)."""
    return _xpow(8 * nbytes + 31), _xpow(8 * nbytes - 33)


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of A+B from crc(A), crc(B) and len(B) (zlib's crc32_combine algorithm, this polynomial).

    Unit lengths repeat (every expert of a tensor has the same size), so the shift operator is
    cached and a combine is one 32-step GF(2) multiply (~15 µs in Python).
    """
    if len2 <= 0:
        return crc1
    return _multmodp(_shift_op(len2), crc1) ^ crc2


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bit-at-a-time definition (tests only: ~1 MB/s)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ POLY if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _tables() -> np.ndarray:
    t = np.zeros((8, 256), dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        t[0, i] = c
    for k in range(1, 8):
        for i in range(256):
            t[k, i] = (t[k - 1, i] >> 8) ^ t[0, t[k - 1, i] & 0xFF]
    return t


# ---- kernels: module level (numba caches them on disk by name), compiled on first call --------------
# Each maps a raw state (no pre/post inversion): `_one_*`(uint8 array, state) → state over the array;
# `_three_*`(array, n) → the states of three streams over consecutive n-word thirds from a fresh state.
_TABLES = _tables()
_JIT = {"cache": True, "nogil": True, "boundscheck": False}


def _crc_intrinsic(name: str, width: int, arg_bits: int, state_bits: int):  # type: ignore[no-untyped-def]
    """A numba intrinsic calling LLVM's CRC-32C instruction `name` on a uint32 state and a `width`-bit value."""
    arg_type = types.uint64 if width == 64 else types.uint8

    @intrinsic
    def step(typingctx, c, w):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            state_t, arg_t = ir.IntType(state_bits), ir.IntType(arg_bits)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(state_t, [state_t, arg_t]), name)
            c32, value = args
            state = builder.zext(c32, state_t) if state_bits > 32 else c32
            value = builder.zext(value, arg_t) if arg_bits > width else value
            out = builder.call(fn, [state, value])
            return builder.trunc(out, ir.IntType(32)) if state_bits > 32 else out

        return types.uint32(types.uint32, arg_type), codegen

    return step


_x86_word = _crc_intrinsic("llvm.x86.sse42.crc32.64.64", 64, 64, 64)
_x86_byte = _crc_intrinsic("llvm.x86.sse42.crc32.32.8", 8, 8, 32)
_arm_word = _crc_intrinsic("llvm.aarch64.crc32cx", 64, 64, 32)
_arm_byte = _crc_intrinsic("llvm.aarch64.crc32cb", 8, 32, 32)


@njit(**_JIT)
def _table_word(c: np.uint32, w: np.uint64) -> np.uint32:
    x = np.uint64(c) ^ w
    t = _TABLES
    return (t[7, x & 0xFF] ^ t[6, (x >> 8) & 0xFF] ^ t[5, (x >> 16) & 0xFF] ^ t[4, (x >> 24) & 0xFF]
            ^ t[3, (x >> 32) & 0xFF] ^ t[2, (x >> 40) & 0xFF] ^ t[1, (x >> 48) & 0xFF] ^ t[0, x >> 56])  # fmt: skip


@njit(**_JIT)
def _table_byte(c: np.uint32, b: np.uint8) -> np.uint32:
    return (c >> np.uint32(8)) ^ _TABLES[0, (c ^ np.uint32(b)) & 0xFF]


@njit(**_JIT)
def _one_x86(buf: np.ndarray, c: np.uint32) -> np.uint32:
    n = buf.size // 8
    words = buf[: n * 8].view(np.uint64)
    for i in range(n):
        c = _x86_word(c, words[i])
    for i in range(n * 8, buf.size):
        c = _x86_byte(c, buf[i])
    return c


@njit(**_JIT)
def _three_x86(buf: np.ndarray, n: int) -> tuple[np.uint32, np.uint32, np.uint32]:
    w0, w1, w2 = buf[: n * 8].view(np.uint64), buf[n * 8 : n * 16].view(np.uint64), buf[n * 16 : n * 24].view(np.uint64)
    a = b = c = np.uint32(0xFFFFFFFF)
    for i in range(n):
        a, b, c = _x86_word(a, w0[i]), _x86_word(b, w1[i]), _x86_word(c, w2[i])
    return a, b, c


def _fold_lanes_codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
    """LLVM IR of `_fold_lanes`: the lanes are <2 x i64> values, kept in registers through the loop."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    v2 = ir.VectorType(i64, 2)
    buf, state, nblocks = args
    base = context.make_array(signature.args[0])(context, builder, value=buf).data  # i8*
    clmul = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v2, [v2, v2, i8]), "llvm.x86.pclmulqdq")
    prefetch = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0"
    )
    zero = ir.Constant(v2, [ir.Constant(i64, 0)] * 2)

    def constants(nbytes: int) -> ir.Constant:
        return ir.Constant(v2, [ir.Constant(i64, k) for k in _fold_constants(nbytes)])

    def load(offset: ir.Value) -> ir.Value:  # 16 bytes at any alignment (movdqu)
        return builder.load(builder.bitcast(builder.gep(base, [offset]), v2.as_pointer()), align=1)

    def fold(value: ir.Value, k: ir.Constant, into: ir.Value) -> ir.Value:  # value moved by k's distance, ⊕ into
        lo = builder.call(clmul, [value, k, ir.Constant(i8, 0x00)])  # lo word × k1
        hi = builder.call(clmul, [value, k, ir.Constant(i8, 0x11)])  # hi word × k2
        return builder.xor(builder.xor(lo, hi), into)

    # first block: lane j holds bytes [16j, 16j + 16); the caller's state XORed into bytes 0..3
    first = builder.insert_element(zero, builder.zext(state, i64), ir.Constant(i32, 0))
    lanes = [cgutils.alloca_once_value(builder, load(ir.Constant(i64, 16 * j))) for j in range(_LANES)]
    builder.store(builder.xor(builder.load(lanes[0]), first), lanes[0])
    step = constants(_BLOCK)
    with cgutils.for_range_slice(builder, ir.Constant(i64, 1), nblocks, ir.Constant(i64, 1)) as (i, _):
        at = builder.mul(i, ir.Constant(i64, _BLOCK))
        for line in range(0, _BLOCK, 64):  # a hint, never a fault, also past the buffer's end
            ahead = builder.gep(base, [builder.add(at, ir.Constant(i64, _PREFETCH + line))])
            builder.call(prefetch, [ahead, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, L1, data
        for j, lane in enumerate(lanes):
            builder.store(fold(builder.load(lane), step, load(builder.add(at, ir.Constant(i64, 16 * j)))), lane)
    # every lane moved to the last lane's place (16·(L−1−j) bytes on), all independent, XORed together
    values = [builder.load(lane) for lane in lanes]
    acc = values[-1]
    for j, value in enumerate(values[:-1]):
        acc = fold(value, constants(16 * (_LANES - 1 - j)), acc)
    words = [builder.extract_element(acc, ir.Constant(i32, k)) for k in (0, 1)]
    return context.make_tuple(builder, signature.return_type, words)


@intrinsic
def _fold_lanes(typingctx, buf, state, nblocks):  # type: ignore[no-untyped-def]
    """(lo, hi): a 16-byte value ≡ (mod P) the first `nblocks`·128 bytes of the uint8 array `buf` with the
    raw `state` XORed into bytes 0..3, positioned at their last 16 bytes (module docstring). nblocks ≥ 1."""
    return types.UniTuple(types.uint64, 2)(buf, types.uint32, types.intp), _fold_lanes_codegen


@njit(**_JIT)
def _fold_x86(buf: np.ndarray, c: np.uint32) -> np.uint32:
    """Raw state after `buf` from raw state `c` (pclmulqdq folding, then the crc32 instruction)."""
    n = buf.size
    start = 0
    if n >= _FOLD_FROM:
        nblocks = n // _BLOCK
        lo, hi = _fold_lanes(buf, c, nblocks)
        c = _x86_word(_x86_word(np.uint32(0), lo), hi)
        start = nblocks * _BLOCK
    end = start + (n - start) // 8 * 8
    words = buf[start:end].view(np.uint64)
    for i in range(words.size):
        c = _x86_word(c, words[i])
    for i in range(end, n):
        c = _x86_byte(c, buf[i])
    return c


@njit(**_JIT)
def _one_arm(buf: np.ndarray, c: np.uint32) -> np.uint32:  # pragma: no cover - AArch64 only
    n = buf.size // 8
    words = buf[: n * 8].view(np.uint64)
    for i in range(n):
        c = _arm_word(c, words[i])
    for i in range(n * 8, buf.size):
        c = _arm_byte(c, buf[i])
    return c


@njit(**_JIT)
def _three_arm(buf: np.ndarray, n: int) -> tuple[np.uint32, np.uint32, np.uint32]:  # pragma: no cover
    w0, w1, w2 = buf[: n * 8].view(np.uint64), buf[n * 8 : n * 16].view(np.uint64), buf[n * 16 : n * 24].view(np.uint64)
    a = b = c = np.uint32(0xFFFFFFFF)
    for i in range(n):
        a, b, c = _arm_word(a, w0[i]), _arm_word(b, w1[i]), _arm_word(c, w2[i])
    return a, b, c


@njit(**_JIT)
def _one_table(buf: np.ndarray, c: np.uint32) -> np.uint32:
    n = buf.size // 8
    words = buf[: n * 8].view(np.uint64)
    for i in range(n):
        c = _table_word(c, words[i])
    for i in range(n * 8, buf.size):
        c = _table_byte(c, buf[i])
    return c


@njit(**_JIT)
def _three_table(buf: np.ndarray, n: int) -> tuple[np.uint32, np.uint32, np.uint32]:
    w0, w1, w2 = buf[: n * 8].view(np.uint64), buf[n * 8 : n * 16].view(np.uint64), buf[n * 16 : n * 24].view(np.uint64)
    a = b = c = np.uint32(0xFFFFFFFF)
    for i in range(n):
        a, b, c = _table_word(a, w0[i]), _table_word(b, w1[i]), _table_word(c, w2[i])
    return a, b, c


_KERNELS = {"x86": (_one_x86, _three_x86), "arm": (_one_arm, _three_arm), "table": (_one_table, _three_table)}


def hardware_kind() -> str:
    """ "pclmul" (x86 with PCLMULQDQ and SSE4.2), "x86" or "arm" (the CRC-32C instruction), else "table"."""
    import llvmlite.binding as llvm

    machine = platform.machine().lower()
    features = llvm.get_host_cpu_features()
    if machine in ("x86_64", "amd64") and features.get("sse4.2"):
        return "pclmul" if features.get("pclmul") else "x86"
    if machine in ("aarch64", "arm64") and features.get("crc"):
        return "arm"
    return "table"


_KIND: list[str] = []


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, crc: int = 0, kind: str | None = None) -> int:
    """CRC-32C of `data` (any contiguous buffer), continuing from `crc` like zlib.crc32(data, crc).

    Releases the GIL while it runs, so threads checksum in parallel.
    """
    if kind is None:
        if not _KIND:
            _KIND.append(hardware_kind())
        kind = _KIND[0]
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if buf.flags.writeable:  # bytes arrive read-only, so all arrive so: one specialization per kernel to load
        buf = buf.view()
        buf.flags.writeable = False
    if kind == "pclmul":
        return int(_fold_x86(buf, np.uint32(crc ^ 0xFFFFFFFF))) ^ 0xFFFFFFFF
    one, three = _KERNELS[kind]
    if buf.size < _STREAMS_FROM:
        return int(one(buf, np.uint32(crc ^ 0xFFFFFFFF))) ^ 0xFFFFFFFF
    n = buf.size // 24
    a, b, c = three(buf, n)
    third = 8 * n
    # stream a started from the fresh state; fold in the caller's `crc` as a prefix of zero length
    first = crc32c_combine(crc, int(a) ^ 0xFFFFFFFF, third) if crc else int(a) ^ 0xFFFFFFFF
    out = crc32c_combine(first, int(b) ^ 0xFFFFFFFF, third)
    out = crc32c_combine(out, int(c) ^ 0xFFFFFFFF, third)
    rest = buf[24 * n :]
    if rest.size:
        out = int(one(rest, np.uint32(out ^ 0xFFFFFFFF))) ^ 0xFFFFFFFF
    return out
