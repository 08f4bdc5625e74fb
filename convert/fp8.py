"""DeepSeek block FP8 (K2-Instruct): float8_e4m3fn weights times one float32 scale per 128x128 block.

Dequant (kimi-k2-checkpoints.md §6): w[r, c] = e4m3(W[r, c]) · scale_inv[r // br, c // bc]; despite
its name the scale is multiplied. Edge blocks (e.g. rows 512–575 of kv_a_proj_with_mqa) are partial
and use their block's scale. The decoder is numpy only; the encoder exists for synthetic checkpoints.
"""

from __future__ import annotations

import numpy as np

from k2conv.convert.dtypes import E4M3_TO_F32

E4M3_MAX = 448.0
_E4M3_MAX_CODE = 0x7E  # 448
_E4M3_NAN_CODE = 0x7F
_MIN_NORMAL = 2.0**-6  # smallest normal e4m3 value; below it the step is 2**-9


def _check_scale_shape(shape: tuple[int, ...], scale_inv: np.ndarray, block: tuple[int, int]) -> None:
    br, bc = block
    expected = (-(-shape[0] // br), -(-shape[1] // bc))
    if scale_inv.shape != expected:
        raise ValueError(f"FP8 scale_inv has shape {scale_inv.shape}, expected {expected} for {shape} / {block}")


def scale_blocks(out: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> None:
    """Multiply `out` [rows, cols] in place by its per-block scale (partial edge blocks included)."""
    br, bc = block
    rows, cols = out.shape
    if rows % br == 0 and cols % bc == 0:
        view = out.reshape(rows // br, br, cols // bc, bc)  # a view: no copy
        view *= scale[:, None, :, None]
        return
    for i in range(scale.shape[0]):  # one vector op per block row; handles ragged edges
        out[i * br : (i + 1) * br] *= np.repeat(scale[i], bc)[:cols]


def dequant_fp8_block(
    weight_bits: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """e4m3 bit patterns (uint8) [out, in] + float32 block scales → float32 [out, in]."""
    if weight_bits.ndim != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {weight_bits.shape}")
    bits = weight_bits.view(np.uint8) if weight_bits.dtype.itemsize == 1 else weight_bits
    if bits.dtype != np.uint8:
        raise ValueError(f"FP8 weight bits must be uint8, got {weight_bits.dtype}")
    _check_scale_shape(bits.shape, scale_inv, block)
    out = E4M3_TO_F32.take(bits)
    scale_blocks(out, np.asarray(scale_inv, dtype=np.float32), block)
    return out


def f32_to_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """float32 → float8_e4m3fn codes, round-to-nearest-even, saturating at ±448; NaN → 0x7F."""
    x = np.asarray(x, dtype=np.float32)
    mag = np.abs(x)
    u = mag.view(np.uint32)
    # Normal range: drop 20 of the 23 mantissa bits with round-half-even, then rebias 127 → 7.
    rounded = (u + (np.uint32(0x7FFFF) + ((u >> 20) & 1))) >> 20
    normal = rounded.astype(np.int32) - (120 << 3)
    # Subnormals (and values that round up into the first normal binade): multiples of 2**-9.
    sub = np.rint(np.fmin(mag, np.float32(_MIN_NORMAL)) * np.float32(512.0)).astype(np.int32)
    code = np.where(mag < _MIN_NORMAL, sub, normal)
    code = np.minimum(code, _E4M3_MAX_CODE).astype(np.uint8)
    code |= np.signbit(x).astype(np.uint8) << 7
    nan = np.isnan(x)
    if nan.any():
        code[nan] = _E4M3_NAN_CODE
    return code


def quantize_fp8_block(
    w: np.ndarray, block: tuple[int, int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [out, in] → (e4m3 bits uint8, float32 scale_inv [ceil(out/br), ceil(in/bc)]).

    Each block is scaled so its largest magnitude maps to 448 (scale = amax / 448, as DeepSeek's
    quantizer does); all-zero blocks get scale 1.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {w.shape}")
    br, bc = block
    rows, cols = w.shape
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = np.zeros((nr * br, nc * bc), dtype=np.float32)
    np.abs(w, out=padded[:rows, :cols])
    amax = padded.reshape(nr, br, nc, bc).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    inv = np.float32(1.0) / scale
    padded[:rows, :cols] = w
    scale_blocks(padded, inv, block)
    return f32_to_e4m3_bits(padded[:rows, :cols]), scale
