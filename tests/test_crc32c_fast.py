"""The pclmulqdq-folding CRC-32C kernel (convert/crc32c.py, kind "pclmul") against outside code.

Oracles: `crc32c_reference` (bit at a time, the definition; slow, so small sizes) and the PyPI
`crc32c` package (C, written by others). Sizes cover every length up to a few blocks, both sides of
every fold-size boundary (128-byte blocks, 256-byte fold threshold), and a few MB; starts are
unaligned and the starting CRC is not zero. The fold constants are also checked on their own, in
pure Python, so a wrong derivation fails even where the CPU cannot run the kernel.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from k2conv.convert import crc32c as mod
from k2conv.convert.crc32c import crc32c, crc32c_reference, hardware_kind

pypi_crc32c = pytest.importorskip("crc32c")  # the `test` extra installs it

HAS_PCLMUL = hardware_kind() == "pclmul"
needs_pclmul = pytest.mark.skipif(not HAS_PCLMUL, reason="CPU without PCLMULQDQ + SSE4.2")


def outside(data: bytes, crc: int = 0) -> int:
    return pypi_crc32c.crc32c(data, crc)


def raw(data: bytes) -> int:
    """The CRC register after `data` from state 0, no final inversion (what the fold reasons about)."""
    return crc32c_reference(data, 0xFFFFFFFF) ^ 0xFFFFFFFF


def clmul(a: int, b: int) -> int:
    """Carry-less product of two integers (what pclmulqdq computes on 64-bit words)."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        b >>= 1
    return out


def buffer(rng: np.random.Generator, size: int, offset: int) -> memoryview:
    """`size` random bytes starting `offset` bytes into a fresh allocation (unaligned for offset % 16)."""
    return memoryview(rng.integers(0, 256, size + offset, dtype=np.uint8).tobytes())[offset:]


# ---- the constants, in pure Python -----------------------------------------------------------------


def test_xpow_agrees_with_the_polynomial_and_the_shift_operator() -> None:
    assert mod._xpow(0) == 1 << 31  # x⁰ in the reflected representation
    assert mod._xpow(1) == 1 << 30
    assert mod._xpow(32) == mod.POLY  # x³² ≡ P − x³², the low terms of P
    for a, b in [(5, 7), (31, 33), (1000, 24), (12345, 678)]:
        assert mod._xpow(a + b) == mod._multmodp(mod._xpow(a), mod._xpow(b))
    for n in (1, 3, 16, 128, 1 << 20):
        assert mod._shift_op(n) == mod._xpow(8 * n)


@pytest.mark.parametrize("nbytes", [16, 32, 48, 64, 80, 96, 112, 128, 5, 21, 1000])
def test_fold_constants_move_16_bytes_forward(nbytes: int) -> None:
    """clmul(lo, k1) ⊕ clmul(hi, k2), read as 16 bytes, has the raw CRC of the 16 bytes followed by
    `nbytes` zero bytes: the identity the kernel's loop and lane merge rely on."""
    k1, k2 = mod._fold_constants(nbytes)
    rnd = random.Random(nbytes)
    for _ in range(20):
        value = rnd.getrandbits(128)
        lo, hi = value & (2**64 - 1), value >> 64
        folded = clmul(lo, k1) ^ clmul(hi, k2)
        assert folded < 2**96  # never a reduction: 64 × 32 bits
        assert raw(folded.to_bytes(16, "little")) == raw(value.to_bytes(16, "little") + bytes(nbytes))


def test_initial_state_equals_xor_into_the_first_four_bytes() -> None:
    """Why the kernel may XOR the caller's state into bytes 0..3 and fold from zero."""
    rnd = random.Random(7)
    for n in (4, 5, 17, 200):
        data = bytes(rnd.getrandbits(8) for _ in range(n))
        state = rnd.getrandbits(32)
        mixed = (int.from_bytes(data[:4], "little") ^ state).to_bytes(4, "little") + data[4:]
        assert crc32c_reference(data, state ^ 0xFFFFFFFF) ^ 0xFFFFFFFF == raw(mixed)


# ---- the kernel against the definition and against outside code ------------------------------------


@needs_pclmul
def test_every_length_to_300_equals_the_definition() -> None:
    rng = np.random.default_rng(300)
    for size in range(301):
        offset = 1 + size % 15
        view = buffer(rng, size, offset)
        start = int(rng.integers(0, 2**32))
        assert crc32c(view, kind="pclmul") == crc32c_reference(bytes(view)), size
        assert crc32c(view, start, kind="pclmul") == crc32c_reference(bytes(view), start), size


@needs_pclmul
def test_every_length_to_1200_equals_pypi_crc32c() -> None:
    """Up to 9 blocks of 128 bytes: every count of whole blocks with every tail, at all 16 alignments."""
    rng = np.random.default_rng(1200)
    base = rng.integers(0, 256, 1200 + 16, dtype=np.uint8).tobytes()
    for size in range(1201):
        offset = size % 16
        view = memoryview(base)[offset : offset + size]
        start = (size * 0x9E3779B1) & 0xFFFFFFFF
        data = bytes(view)
        assert crc32c(view, kind="pclmul") == outside(data), size
        assert crc32c(view, start, kind="pclmul") == outside(data, start), size


def near_boundaries() -> list[int]:
    """Sizes on both sides of every multiple of 16 bytes up to 9 blocks, and of big power-of-two sizes."""
    sizes = {b + d for b in range(16, 16 * 8 * 9 + 1, 16) for d in (-1, 0, 1, 15)}
    sizes |= {(1 << k) + d for k in range(10, 24) for d in (-129, -128, -127, -1, 0, 1, 127, 128, 129)}
    return sorted(sizes)


@needs_pclmul
def test_sizes_around_every_fold_boundary_equal_pypi_crc32c() -> None:
    rng = np.random.default_rng(16)
    base = rng.integers(0, 256, (1 << 23) + 200, dtype=np.uint8)
    for size in near_boundaries():
        offset = 1 + size % 15
        view = base[offset : offset + size]
        data = view.tobytes()
        assert crc32c(view, kind="pclmul") == outside(data), size
        start = size & 0xFFFFFFFF
        assert crc32c(view, start ^ 0x5A5A5A5A, kind="pclmul") == outside(data, start ^ 0x5A5A5A5A), size


@needs_pclmul
@pytest.mark.parametrize("size", [3 << 20, (5 << 20) + 77])
@pytest.mark.parametrize("offset", [0, 1, 7, 15])
def test_megabytes_in_one_call_and_continued_equal_pypi_crc32c(size: int, offset: int) -> None:
    rng = np.random.default_rng(size + offset)
    view = rng.integers(0, 256, size + offset, dtype=np.uint8)[offset:]
    want = outside(view.tobytes())
    assert crc32c(view, kind="pclmul") == want
    for cut in (1, 255, 256, 4097, size // 2 + 3, size - 129):
        assert crc32c(view[cut:], crc32c(view[:cut], kind="pclmul"), kind="pclmul") == want, cut


@needs_pclmul
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint64, np.float16, np.bool_])
def test_numpy_arrays_of_other_dtypes_and_layouts(dtype: type) -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, (37, 129)).astype(dtype) if dtype is np.bool_ else rng.standard_normal((37, 129)).astype(dtype)
    for arr in (a, a[:, 1:], a.T, a[::2]):  # C-contiguous, then views copied in C order like tobytes()
        assert crc32c(arr, kind="pclmul") == outside(arr.tobytes())
        assert crc32c(arr, 0xFFFFFFFF, kind="pclmul") == outside(arr.tobytes(), 0xFFFFFFFF)
    writable = a.copy()
    crc32c(writable)
    assert writable.flags.writeable  # the read-only view taken inside does not leak to the caller


@needs_pclmul
def test_default_kind_is_pclmul_and_equals_every_other_kind() -> None:
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, 3 * 65536 + 23, dtype=np.uint8)
    want = outside(data.tobytes())
    assert crc32c(data) == want
    for kind in ("pclmul", "x86", "table"):  # "x86" (three crc32 streams) stays the fallback
        assert crc32c(data, kind=kind) == want
        assert crc32c(data[7:], crc32c(data[:7], kind=kind), kind=kind) == want
    assert crc32c(bytearray(data.tobytes())) == crc32c(memoryview(data.tobytes())) == want


@needs_pclmul
def test_every_input_type_shares_one_compiled_specialization() -> None:
    """bytes, bytearray, memoryview and numpy arrays all reach `_fold_x86` as read-only uint8 arrays:
    one cached kernel to load per process."""
    for data in (b"abc" * 100, bytearray(300), memoryview(bytes(300)), np.zeros(300, np.float32), np.zeros(7)):
        crc32c(data)
    assert len(mod._fold_x86.signatures) == 1
    assert mod._fold_x86.targetoptions["nogil"]  # threads checksum in parallel


@needs_pclmul
def test_fold_loop_is_pclmulqdq_without_calls_or_spills() -> None:
    """The hot loop keeps the lanes in xmm registers: 2 pclmulqdq per lane, no call, no GPR round trip."""
    from numba import njit

    fresh = njit(nogil=True, boundscheck=False)(mod._fold_x86.py_func)  # numba shows no asm of cached code
    fresh(np.frombuffer(bytes(1000), dtype=np.uint8), 0)
    asm = next(iter(fresh.inspect_asm().values()))
    lines = [line.strip() for line in asm.splitlines()]
    loops = []
    for i, line in enumerate(lines):
        label = re.fullmatch(r"(\.\w+):", line)
        if not label:
            continue
        for j in range(i + 1, len(lines)):
            if re.fullmatch(rf"j\w+\s+{re.escape(label.group(1))}", lines[j]):
                loops.append(lines[i + 1 : j + 1])
                break
    body = [loop for loop in loops if any("pclmulqdq" in line for line in loop)]
    assert len(body) == 1, loops
    text = "\n".join(body[0])
    assert text.count("pclmulqdq") == 2 * mod._LANES
    assert "call" not in text
    assert not re.search(r"pextrq|movq\s+%xmm|%rsp", text), text


def test_hardware_kind_needs_pclmul_and_sse42(monkeypatch: pytest.MonkeyPatch) -> None:
    import llvmlite.binding as llvm

    monkeypatch.setattr(mod.platform, "machine", lambda: "x86_64")
    for features, kind in [({"sse4.2": True, "pclmul": True}, "pclmul"), ({"sse4.2": True, "pclmul": False}, "x86"),
                           ({"sse4.2": False, "pclmul": True}, "table"), ({}, "table")]:  # fmt: skip
        monkeypatch.setattr(llvm, "get_host_cpu_features", lambda f=features: f)
        assert mod.hardware_kind() == kind, features
    monkeypatch.setattr(mod.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: {"crc": True, "pclmul": True})
    assert mod.hardware_kind() == "arm"
