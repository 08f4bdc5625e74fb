"""infer.dequant reproduces gguf.quants.dequantize bit for bit, per type, on random and on real blocks.

Random bytes exercise every bit pattern of the packed quants and scales (the fp16 super-block scales
are replaced by finite values: NaN payloads are not what is being tested); blocks written by k2conv's
own quantizer check the layouts on data shaped like the runner's (3-D merged experts).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from k2conv.infer.dequant import TORCH_TYPES, T, dequantize
from k2conv.quant.quantize import quantize

# Byte offsets of the fp16 fields (d, dmin / m) inside one block of each type.
F16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.IQ4_NL: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,),
}  # fmt: skip
QUANTIZED = [t for t in TORCH_TYPES if t not in (T.F32, T.F16, T.BF16)]
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """uint8 (rows, row_bytes) of random blocks whose fp16 scale fields hold finite values."""
    rng = np.random.default_rng(seed)
    _, size = GGML_QUANT_SIZES[qtype]
    if qtype in (T.F32, T.F16):
        dtype = np.float32 if qtype == T.F32 else np.float16
        return (rng.standard_normal((rows, blocks_per_row)) * 3).astype(dtype).view(np.uint8)
    raw = rng.integers(0, 256, (rows, blocks_per_row * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for off in F16_FIELDS.get(qtype, ()):
        scale = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


def assert_bit_identical(raw: np.ndarray, qtype: T, device: str) -> None:
    want = gguf_dequantize(raw.copy(), qtype)
    got = dequantize(torch.from_numpy(raw.copy()).to(device), qtype).cpu().numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", TORCH_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_identical(qtype: T, device: str) -> None:
    assert_bit_identical(random_blocks(qtype, rows=33, blocks_per_row=3), qtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_k2conv_quantized_experts_bit_identical(qtype: T, device: str) -> None:
    """(experts, rows, cols) weights quantized by k2conv, dequantized whole and one expert at a time."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((3, 16, 512)) * 0.02).astype(np.float32)
    w[1, 3, :40] = 0.0  # all-zero block: d = 0 paths
    w[2, 5, 7] = 0.5  # an outlier
    raw = quantize(w, qtype).reshape(3, 16, -1)
    assert_bit_identical(raw, qtype, device)
    assert_bit_identical(np.ascontiguousarray(raw[2]), qtype, device)


def test_bf16_keeps_nan_and_inf_bits() -> None:
    bits = np.array([0x7FC0, 0xFF80, 0x7F80, 0x0001, 0x8000, 0x3F80], dtype=np.uint16)
    raw = bits.view(np.uint8).reshape(1, -1)
    got = dequantize(torch.from_numpy(raw.copy()), T.BF16).numpy()
    assert np.array_equal(got.view(np.uint32).ravel(), bits.astype(np.uint32) << 16)


def test_types_without_a_torch_kernel_fall_back_to_gguf() -> None:
    qtype = T.IQ3_XXS
    _, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (4, size * 2), dtype=np.uint8)
    raw.reshape(-1, size)[:, :2] = np.full((8, 1), 0.01, np.float16).view(np.uint8)
    assert_bit_identical(raw, qtype, "cpu")


def test_rejects_partial_blocks_and_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="whole number"):
        dequantize(torch.zeros(1, 35, dtype=torch.uint8), T.Q8_0)
    with pytest.raises(TypeError):
        dequantize(torch.zeros(1, 34, dtype=torch.int8), T.Q8_0)
