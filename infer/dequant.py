"""GGML block dequantization with torch ops, on whatever device the raw bytes live on.

The runner keeps routed experts quantized (mapped file pages, later an expert cache of raw blocks) and
expands one expert at a time right where it is multiplied, so dequantization has to run on the GPU
when there is one. Every kernel here reproduces `gguf.quants.dequantize` bit for bit: the same
float32 operations in the same order (ggml's reference `dequantize_row_*`: `d·sc` and `dmin·m` are
rounded first, then `d1·q − m1`), each a separate elementwise torch op so nothing is fused into an FMA.
tests/test_infer_dequant.py holds the proof per type.

Input: a uint8 tensor of raw blocks, shaped (..., row_bytes) like `GGUFReader` hands out quantized
tensors (or flat). Output: float32 of shape (..., row_bytes / type_size · block_size).
Types without a torch kernel fall back to gguf's numpy dequantizer on the CPU (exact, slower).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
QK_K = 256

# IQ4_NL / IQ4_XS non-linear 4-bit levels (ggml-common.h kvalues_iq4nl).
_IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---- byte helpers -------------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes per row → float32 (exact widening), shape (n, 1)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _low_high(b: torch.Tensor) -> torch.Tensor:
    """Nibbles of a byte run: all low nibbles first, then all high nibbles (ggml's 4-bit layout)."""
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def _bits(b: torch.Tensor, width: int) -> torch.Tensor:
    """Split each byte of (n, groups, m) into 8/width planes of `width` bits: (n, groups·8/width, m).

    Plane k of byte j is (b[j] >> width·k) & mask; planes are ordered k-major, the layout of
    Q2_K/Q3_K/Q6_K quant bits and of the Q3_K/Q5_K high-bit masks.
    """
    mask = (1 << width) - 1
    planes = [(b >> (width * k)) & mask for k in range(8 // width)]
    n, groups, m = b.shape
    return torch.stack(planes, dim=2).reshape(n, groups * (8 // width), m)


def _as_i8(x: torch.Tensor) -> torch.Tensor:
    """uint8 → int8 by two's complement (the numpy `astype(np.int8)` the reference does)."""
    return x.view(torch.int8) if x.is_contiguous() else x.contiguous().view(torch.int8)


# ---- per type: the integer quants, the scale and the min of every group ----------------------------
# A type's values are `scale·q − min` per group of 16 or 32 elements (min absent for symmetric types).
# `dequantize` composes them; infer/qmatmul.py keeps them apart (int8 quants + float32 scales) for its
# CPU matrix-vector kernels. Shapes: q (n, groups, group) integer, scale/min (n, groups, 1) float32.


@dataclass(frozen=True)
class Groups:
    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None = None


def _legacy(d: torch.Tensor, q: torch.Tensor, m: torch.Tensor | None = None) -> Groups:
    """One 32-element group per block; `m` is added (Q4_1/Q5_1: d·q + m), i.e. −m subtracted, exactly."""
    return Groups(q.unsqueeze(1), d.unsqueeze(1), None if m is None else (-m).unsqueeze(1))


def _q8_0(b: torch.Tensor) -> Groups:
    return _legacy(_f16(b[:, :2]), _as_i8(b[:, 2:]))


def _q4_0(b: torch.Tensor) -> Groups:
    return _legacy(_f16(b[:, :2]), _low_high(b[:, 2:]).to(torch.int32) - 8)


def _q4_1(b: torch.Tensor) -> Groups:
    return _legacy(_f16(b[:, :2]), _low_high(b[:, 4:]), _f16(b[:, 2:4]))


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """32 high bits, LSB of byte 0 first → (n, 32) of 0/1 (the uint32 `qh` read little-endian)."""
    return _bits(qh.unsqueeze(-1), 1).reshape(-1, 32)


def _q5_0(b: torch.Tensor) -> Groups:
    q = (_low_high(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)).to(torch.int32) - 16
    return _legacy(_f16(b[:, :2]), q)


def _q5_1(b: torch.Tensor) -> Groups:
    return _legacy(_f16(b[:, :2]), _low_high(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4), _f16(b[:, 2:4]))


def _iq4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(_IQ4_LEVELS, dtype=torch.int32, device=device)


def _iq4_nl(b: torch.Tensor) -> Groups:
    return _legacy(_f16(b[:, :2]), _iq4_levels(b.device)[_low_high(b[:, 2:]).long()])


# ---- K-quants: 256-element super-blocks -----------------------------------------------------------


def _q2_k(b: torch.Tensor) -> Groups:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    return Groups(_bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16), dl, ml)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """12 bytes → 16 signed 6-bit scales: low 4 bits from bytes 0-7 (nibble-major), high 2 from 8-11."""
    n = s.shape[0]
    low = _bits(s[:, :8].reshape(n, 1, 8), 4).reshape(n, 16)
    high = _bits(s[:, 8:12].reshape(n, 1, 4), 2).reshape(n, 16)
    return (low | (high << 4)).to(torch.int32) - 32


def _q3_k(b: torch.Tensor) -> Groups:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    dl = (d * _q3_k_scales(scales).to(torch.float32)).reshape(n, 16, 1)
    low = _bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).to(torch.int32)
    high = _bits(hmask.reshape(n, 1, 32), 1).reshape(n, 16, 16).to(torch.int32)
    return Groups(low - ((high ^ 1) << 2), dl)  # a clear mask bit means "subtract 4"


def _k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes → 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    a, m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 0x3F, (hi & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (hi >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k45_d_dm(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k4_scale_min(b[:, 4:16])
    d1 = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    m1 = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    return d1, m1


def _q4_k(b: torch.Tensor) -> Groups:
    n = b.shape[0]
    d1, m1 = _k45_d_dm(b)
    return Groups(_low_high(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32), d1, m1)


def _q5_k(b: torch.Tensor) -> Groups:
    n = b.shape[0]
    d1, m1 = _k45_d_dm(b)
    low = _low_high(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _bits(b[:, 16:48].reshape(n, 1, 32), 1)
    return Groups(low | (high << 4), d1, m1)


def _q6_k(b: torch.Tensor) -> Groups:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210])
    dl = (d * _as_i8(scales).to(torch.float32)).reshape(n, 16, 1)
    low = _low_high(ql.reshape(n, 2, 64)).reshape(n, 8, 32)  # per 128-half: low nibbles of 64, then high
    high = _bits(qh.reshape(n, 2, 32), 2)
    q = (low | (high << 4)).to(torch.int32) - 32
    return Groups(q.reshape(n, 16, 16), dl)


def _iq4_xs(b: torch.Tensor) -> Groups:
    n = b.shape[0]
    d = _f16(b[:, :2])
    high_bits = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)  # uint16 scales_h
    shifts = torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)
    high = (high_bits.unsqueeze(-1) >> shifts) & 0x03
    low = torch.stack([b[:, 4:8] & 0x0F, b[:, 4:8] >> 4], dim=-1).reshape(n, 8).to(torch.int32)
    dl = (d * ((low | (high << 4)) - 32).to(torch.float32)).reshape(n, 8, 1)
    return Groups(_iq4_levels(b.device)[_low_high(b[:, 8:].reshape(n, 8, 16)).long()], dl)


GROUPS: dict[GGMLQuantizationType, Callable[[torch.Tensor], Groups]] = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.IQ4_NL: _iq4_nl,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.IQ4_XS: _iq4_xs,
}  # fmt: skip

TORCH_TYPES: tuple[GGMLQuantizationType, ...] = (T.F32, T.F16, T.BF16, *GROUPS)


def out_shape(byte_shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Element shape of a (..., row_bytes) block array."""
    block, size = GGML_QUANT_SIZES[qtype]
    if byte_shape[-1] % size:
        raise ValueError(f"{qtype.name}: row of {byte_shape[-1]} bytes is not a whole number of {size}-byte blocks")
    return (*byte_shape[:-1], byte_shape[-1] // size * block)


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType | int) -> torch.Tensor:
    """Raw GGML blocks (uint8, (..., row_bytes)) → float32 (..., row_elems) on raw's device."""
    qtype = T(qtype)
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize wants the raw bytes as uint8, got {raw.dtype}")
    if raw.dim() == 0:
        raise ValueError("dequantize needs at least one dimension")
    shape = out_shape(tuple(raw.shape), qtype)
    raw = raw.contiguous()
    if qtype == T.F32:
        return raw.view(torch.float32).reshape(shape).clone()
    if qtype == T.F16:
        return raw.view(torch.float16).to(torch.float32).reshape(shape)
    if qtype == T.BF16:  # the bits become the top half of a float32, NaN payloads included
        return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(shape)
    groups = GROUPS.get(qtype)
    _, size = GGML_QUANT_SIZES[qtype]
    if groups is None:
        from gguf.quants import dequantize as np_dequantize

        flat = np.ascontiguousarray(raw.cpu().numpy().reshape(-1, size))
        out = torch.from_numpy(np_dequantize(flat, qtype).astype(np.float32, copy=False))
        return out.reshape(shape).to(raw.device)
    g = groups(raw.reshape(-1, size))
    values = g.scale * g.q.to(torch.float32)  # separate ops: d·q rounded, then − m (no FMA)
    return (values if g.min is None else values - g.min).reshape(shape)
