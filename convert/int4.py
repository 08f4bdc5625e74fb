"""compressed-tensors "pack-quantized" INT4: the routed-expert format of K2-Thinking and K2.5.

Layout (kimi-k2-checkpoints.md §5): signed q in [-8, 7] is stored as the offset-binary nibble
u = q + 8, eight nibbles per 32-bit word along the input axis, column 8k in the lowest nibble; the
word is kept as int32. Dequant is w = q · scale[r, c // group_size].

Because the words are little-endian, byte j of a row holds columns 2j (low nibble) and 2j+1 (high
nibble); every function here works on that byte view, which avoids 32-bit shifts and temporaries.
Everything is numpy only: this runs on every expert matrix of the model.
"""

from __future__ import annotations

import numpy as np

from k2conv.convert.dtypes import bf16_bits_to_f32

_LE_U32 = np.dtype("<u4")


def _nibble_table() -> np.ndarray:
    """For each byte value, the float32 pair (q of low nibble, q of high nibble) packed in one uint64.

    Indexing this 1-D table with the packed bytes decodes two columns per lookup, and the uint64
    result viewed as float32 is already in column order (little-endian pair = low nibble first).
    """
    b = np.arange(256)
    pairs = np.stack([(b & 0xF) - 8, (b >> 4) - 8], axis=1).astype("<f4")
    return pairs.view("<u8").ravel()


_BYTE_TO_Q_PAIR = _nibble_table()


def _packed_bytes(packed: np.ndarray) -> np.ndarray:
    """The packed words as little-endian bytes [rows, 4·words] (a view when already LE)."""
    if packed.ndim != 2:
        raise ValueError(f"packed INT4 must be 2-D, got shape {packed.shape}")
    if packed.dtype.kind not in "iu" or packed.dtype.itemsize != 4:
        raise ValueError(f"packed INT4 must be int32/uint32, got {packed.dtype}")
    words = np.ascontiguousarray(packed).astype(_LE_U32, copy=False)
    return words.view(np.uint8)


def _check_cols(packed: np.ndarray, cols: int) -> None:
    if cols <= 0 or -(-cols // 8) != packed.shape[1]:
        raise ValueError(f"packed INT4 with {packed.shape[1]} words per row cannot hold {cols} columns")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed int4 values [rows, cols] → int32 words [rows, ceil(cols/8)] (pad nibble 0, i.e. q = −8)."""
    if q.ndim != 2:
        raise ValueError(f"q must be 2-D, got shape {q.shape}")
    q = np.asarray(q)
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError("INT4 values must lie in [-8, 7]")
    rows, cols = q.shape
    words = -(-cols // 8)
    u = np.zeros((rows, words * 8), dtype=np.uint8)
    np.add(q, 8, out=u[:, :cols], casting="unsafe")
    u[:, 1::2] <<= 4
    byts = u[:, 0::2] | u[:, 1::2]
    return np.ascontiguousarray(byts).view(_LE_U32).astype(np.int32)


def unpack_int4(packed: np.ndarray, cols: int) -> np.ndarray:
    """int32 words [rows, ceil(cols/8)] → signed int8 values [rows, cols] (padding trimmed)."""
    _check_cols(packed, cols)
    byts = _packed_bytes(packed)
    rows = byts.shape[0]
    out = np.empty((rows, byts.shape[1] * 2), dtype=np.int8)
    np.bitwise_and(byts, 0xF, out=out[:, 0::2], casting="unsafe")
    np.right_shift(byts, 4, out=out[:, 1::2], casting="unsafe")
    out -= 8
    return out if out.shape[1] == cols else np.ascontiguousarray(out[:, :cols])


def scales_to_f32(scales: np.ndarray) -> np.ndarray:
    """Group scales as float32: uint16 arrays are bfloat16 bit patterns, floats are taken as they are."""
    if scales.dtype == np.uint16:
        return bf16_bits_to_f32(scales)
    if scales.dtype.kind == "f":
        return scales.astype(np.float32, copy=False)
    raise ValueError(f"INT4 scales must be bf16 bits (uint16) or float, got {scales.dtype}")


def dequant_int4(packed: np.ndarray, scales: np.ndarray, cols: int, group_size: int = 32) -> np.ndarray:
    """Packed INT4 + per-group scales → float32 [rows, cols], w = q · scale[r, c // group_size].

    The product is exact in float32 (4-bit q times an 8-bit-mantissa bf16 scale), so this is the
    true value; compressed-tensors rounds the same product to bf16.
    """
    _check_cols(packed, cols)
    rows = packed.shape[0]
    groups = -(-cols // group_size)
    if scales.shape != (rows, groups):
        raise ValueError(f"INT4 scales have shape {scales.shape}, expected {(rows, groups)}")
    s = scales_to_f32(scales)
    byts = _packed_bytes(packed)
    q = _BYTE_TO_Q_PAIR[byts].view("<f4").astype(np.float32, copy=False)  # [rows, 8·words]
    if q.shape[1] == cols and cols % group_size == 0:
        grouped = q.reshape(rows, groups, group_size)  # a view: scales multiply in place
        grouped *= s[:, :, None]
        return q
    out = np.ascontiguousarray(q[:, :cols])
    out *= np.repeat(s, group_size, axis=1)[:, :cols]
    return out
