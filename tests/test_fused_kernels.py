"""The one-pass kernels of the hot conversion paths against independent references.

- Q8_0 straight from bfloat16 bits (quant/q8_0.py) must give exactly ggml_quantize_chunk's bytes on
  the widened float32 tensor (bf16 → f32 is exact), and reject inf/NaN naming the tensor.
- The INT4 → Q4_0 repack narrows scales itself (quant/int4_repack.py): its float16 scale bits must
  be numpy's IEEE astype(float16) for every bf16 value that fits, and it must count what does not.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from k2conv.errors import K2ConvError
from k2conv.quant import ggml_oracle
from k2conv.quant.int4_repack import repack_int4_to_q4_0
from k2conv.quant.quantize import quantize, quantize_q8_0_bf16


def _bf16_bits(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Gaussian weights of mixed magnitude, plus zeros, bf16 subnormals and values near bf16's max."""
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, (shape[0], 1)))).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    flat = bits.reshape(-1)
    pick = rng.choice(flat.size, 64, replace=False)
    flat[pick[:16]] = 0
    flat[pick[16:32]] = 0x8000  # -0
    flat[pick[32:48]] = rng.integers(1, 0x7F, 16)  # subnormals
    flat[pick[48:]] = 0x7F7F  # largest finite bf16
    return bits


def test_q8_0_from_bf16_equals_ggml_on_the_widened_tensor() -> None:
    rng = np.random.default_rng(3)
    for shape in ((37, 7168), (5, 128), (300, 512)):
        bits = _bf16_bits(rng, shape)
        bits.flags.writeable = False  # as mapped from a checkpoint
        widened = (bits.astype(np.uint32) << 16).view(np.float32)
        got = quantize_q8_0_bf16(bits, "t")
        assert np.array_equal(got, quantize(widened, T.Q8_0))
        if ggml_oracle.available():
            assert np.array_equal(got.reshape(-1), ggml_oracle.ggml_quantize_chunk(T.Q8_0, widened, None).reshape(-1))


@pytest.mark.parametrize("bad", [0x7F80, 0xFF80, 0x7FC1])
def test_q8_0_from_bf16_rejects_inf_and_nan_by_name(bad: int) -> None:
    bits = _bf16_bits(np.random.default_rng(1), (4, 256))
    bits[2, 77] = bad
    with pytest.raises(K2ConvError, match=r"^shard-1: tensor w: contains NaN or Inf$"):
        quantize_q8_0_bf16(bits, "shard-1: tensor w")


def test_repack_narrows_scales_like_numpy_and_counts_what_float16_cannot_hold() -> None:
    rng = np.random.default_rng(7)
    rows, cols = 64, 1024
    packed = rng.integers(-(2**31), 2**31, (rows, cols // 8), dtype=np.int64).astype(np.int32)
    f = np.exp(rng.uniform(-12, 10, (rows, cols // 32))).astype(np.float32)
    f[0, :4] = [2.0**-31, 1e5, 65504.0, 65520.0]  # below float16's range, two overflows, the largest f16
    scale_bits = (f.view(np.uint32) >> 16).astype(np.uint16)
    widened = (scale_bits.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore"):
        want = widened.astype(np.float16)
    inexact_want = int(np.count_nonzero(want.astype(np.float32) != widened))
    got, inexact, nonfinite = repack_int4_to_q4_0(packed, scale_bits, cols)
    blocks = got.reshape(rows, cols // 32, 18)
    assert np.array_equal(blocks[:, :, :2].copy().view("<f2").reshape(rows, -1).view(np.uint16), want.view(np.uint16))
    assert inexact == inexact_want > 0 and nonfinite == int(np.count_nonzero(~np.isfinite(want))) == 1
    # the nibbles: Q4_0 byte j holds columns j (low) and j+16 (high) of a block
    nib = np.stack([(packed.view(np.uint32)[:, :, None] >> (4 * k)) & 0xF for k in range(8)], -1).reshape(rows, -1)
    q = np.concatenate([blocks[:, :, 2:] & 0xF, blocks[:, :, 2:] >> 4], -1).reshape(rows, -1)
    assert np.array_equal(q, nib)
