"""INT4 pack-quantized and FP8 block codecs against the implementations the real checkpoints came from.

Oracles: compressed-tensors (its own pack-quantized compressor, which wrote K2-Thinking / K2.5) and
torch's float8_e4m3fn (the dtype of K2-Instruct's weights). Neither is used by the converter itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from k2conv.convert.dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from k2conv.convert.fp8 import E4M3_MAX, dequant_fp8_block, f32_to_e4m3_bits, quantize_fp8_block
from k2conv.convert.int4 import dequant_int4, pack_int4, unpack_int4

torch = pytest.importorskip("torch")
ct_pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
ct_quant = pytest.importorskip("compressed_tensors.quantization")

pytestmark = pytest.mark.oracle


# ---- INT4 ------------------------------------------------------------------------------------------


def _scheme():
    """The K2 quantization_config's weights entry, as a compressed-tensors scheme."""
    args = ct_quant.QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    return ct_quant.QuantizationScheme(targets=["Linear"], weights=args)


def _random_int4(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """q in the full signed range [-8, 7] and bf16 scales (as bit patterns) per 32 columns."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, (rows, cols), dtype=np.int8)
    scale = rng.uniform(1e-3, 2e-2, (rows, -(-cols // 32))).astype(np.float32)
    return q, f32_to_bf16_bits(scale)


def _ct_compress(q: np.ndarray, scale_bits: np.ndarray) -> dict:
    """Let compressed-tensors quantize and pack W = q·scale itself (its full compressor path).

    W is formed exactly in float32 and the scale handed over as float32, so its x/scale is exact and
    round/clamp recovers q: the packed words it produces are its own encoding of our q.
    """
    scale = torch.from_numpy(bf16_bits_to_f32(scale_bits))
    w = torch.from_numpy(q).float() * scale.repeat_interleave(32, dim=1)[:, : q.shape[1]]
    return ct_pack.PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, _scheme())


def _ct_decompress(packed: np.ndarray, scale: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    state = {"weight_packed": torch.from_numpy(packed), "weight_scale": scale,
             "weight_shape": torch.tensor([rows, cols], dtype=torch.int32)}
    out = ct_pack.PackedQuantizationCompressor.decompress(state, _scheme())["weight"]
    return out.float().numpy()


def test_int4_bit_layout_matches_the_reference_rule():
    """§5: u = q + 8, column 8k in bits 0-3 … column 8k+7 in bits 28-31, stored as int32."""
    q = np.array([[-8, -7, -6, -5, -4, -3, -2, -1], [0, 1, 2, 3, 4, 5, 6, 7]], dtype=np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.int32
    assert packed[:, 0].view(np.uint32).tolist() == [0x76543210, 0xFEDCBA98]
    assert packed[1, 0] < 0  # top nibble ≥ 8: negative as int32, must be read as uint32
    assert np.array_equal(unpack_int4(packed, 8), q)
    assert np.array_equal(unpack_int4(packed.view(np.uint32), 8), q)


@pytest.mark.parametrize("shape", [(64, 2048), (48, 7168), (16, 64)])
def test_int4_pack_equals_compressed_tensors_compressor(shape):
    q, scale_bits = _random_int4(*shape)
    out = _ct_compress(q, scale_bits)
    assert out["weight_packed"].dtype == torch.int32
    assert np.array_equal(out["weight_packed"].numpy(), pack_int4(q))
    assert out["weight_shape"].tolist() == list(shape)
    assert np.array_equal(unpack_int4(out["weight_packed"].numpy(), shape[1]), q)


@pytest.mark.parametrize("cols", [13, 40, 8, 1, 100])
def test_int4_ragged_columns_pad_and_trim_like_compressed_tensors(cols):
    """cols % 8 != 0: compressed-tensors pads unsigned nibbles with 0; the reader trims."""
    q, _ = _random_int4(7, cols, seed=cols)
    theirs = ct_helpers.pack_to_int32(torch.from_numpy(q), 4).numpy()
    assert np.array_equal(pack_int4(q), theirs)
    assert np.array_equal(unpack_int4(theirs, cols), q)
    back = ct_helpers.unpack_from_int32(torch.from_numpy(pack_int4(q)), 4, torch.Size((7, cols)))
    assert np.array_equal(back.numpy(), q)


@pytest.mark.parametrize("shape", [(64, 2048), (32, 7168)])
def test_int4_dequant_matches_compressed_tensors_decompress(shape):
    """Our exact float32 product vs compressed-tensors' decompress, both ways round.

    compressed-tensors multiplies q·scale in the scale's dtype. With bf16 scales (as shipped) its
    result is the exact product rounded to bf16, so ours, rounded to bf16, must be bit-identical.
    With float32 scales it computes the same exact product we do (q has 4 bits and the scale 8
    significant bits, so q·scale fits a float32 mantissa), so ours must equal it exactly.
    """
    rows, cols = shape
    q, scale_bits = _random_int4(rows, cols)
    packed = _ct_compress(q, scale_bits)["weight_packed"].numpy()
    ours = dequant_int4(packed, scale_bits, cols)
    assert ours.dtype == np.float32 and ours.shape == shape

    scale_f32 = torch.from_numpy(bf16_bits_to_f32(scale_bits))
    theirs_bf16 = _ct_decompress(packed, scale_f32.to(torch.bfloat16), rows, cols)
    assert np.array_equal(f32_to_bf16_bits(ours), f32_to_bf16_bits(theirs_bf16))
    theirs_f32 = _ct_decompress(packed, scale_f32, rows, cols)
    assert np.array_equal(ours, theirs_f32)
    # Our packing decoded by their decompressor: the same values.
    assert np.array_equal(_ct_decompress(pack_int4(q), scale_f32, rows, cols), ours)


def test_int4_dequant_accepts_float_scales_and_partial_groups():
    q, scale_bits = _random_int4(5, 40)  # 40 columns: 2 groups, the second partial
    packed = pack_int4(q)
    scale = bf16_bits_to_f32(scale_bits)
    expected = q.astype(np.float32) * np.repeat(scale, 32, axis=1)[:, :40]
    assert np.array_equal(dequant_int4(packed, scale_bits, 40), expected)
    assert np.array_equal(dequant_int4(packed, scale, 40), expected)


def test_int4_rejects_inconsistent_shapes():
    q, scale_bits = _random_int4(4, 64)
    packed = pack_int4(q)
    with pytest.raises(ValueError):
        unpack_int4(packed, 72)
    with pytest.raises(ValueError):
        dequant_int4(packed, scale_bits[:, :1], 64)
    with pytest.raises(ValueError):
        pack_int4(np.full((1, 8), 8, dtype=np.int8))


# ---- FP8 -------------------------------------------------------------------------------------------


def _torch_e4m3_to_f32(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy()


def test_e4m3_all_256_codes_decode_like_torch():
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ones = np.ones((1, 1), dtype=np.float32)
    ours = dequant_fp8_block(codes, ones, (128, 128))
    assert np.array_equal(ours, _torch_e4m3_to_f32(codes), equal_nan=True)
    assert np.isnan(ours.ravel()[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(ours.ravel(), [0x7F, 0xFF])).all()


@pytest.mark.parametrize("shape", [(576, 300), (256, 384), (5, 7)])
def test_fp8_block_dequant_matches_torch(shape):
    """Aligned and ragged shapes (576 rows = kv_a_proj_with_mqa: the 5th row block is partial)."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 256, shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3C  # no NaN codes in real weights
    scale = rng.uniform(1e-5, 1e-2, (-(-shape[0] // 128), -(-shape[1] // 128))).astype(np.float32)
    s = torch.from_numpy(scale).repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    expected = (torch.from_numpy(bits).view(torch.float8_e4m3fn).float() * s).numpy()
    assert np.array_equal(dequant_fp8_block(bits, scale), expected)


def test_fp8_dequant_rejects_wrong_scale_shape():
    with pytest.raises(ValueError):
        dequant_fp8_block(np.zeros((576, 128), np.uint8), np.ones((4, 1), np.float32))


def test_e4m3_encoder_rounds_like_torch():
    """Every finite value, every midpoint (ties to even) and its neighbours, random values, subnormals."""
    table = _torch_e4m3_to_f32(np.arange(256, dtype=np.uint8))
    values = np.unique(table[np.isfinite(table)]).astype(np.float64)
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(2)
    x = np.concatenate([
        values.astype(np.float32), mids,
        np.nextafter(mids, np.float32(-np.inf)), np.nextafter(mids, np.float32(np.inf)),
        rng.uniform(-E4M3_MAX, E4M3_MAX, 20000).astype(np.float32),
        (rng.standard_normal(20000) * 0.01).astype(np.float32),
    ])
    x = x[np.abs(x) <= E4M3_MAX]
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(f32_to_e4m3_bits(x), theirs)


def test_e4m3_encoder_saturates_and_keeps_nan():
    x = np.array([500.0, -1e9, np.inf, np.nan], dtype=np.float32)
    assert f32_to_e4m3_bits(x).tolist() == [0x7E, 0xFE, 0x7E, 0x7F]


def test_fp8_block_quantize_round_trip():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((320, 300)) * 0.02).astype(np.float32)
    w[128:256, 128:256] = 0.0  # an all-zero block gets scale 1
    bits, scale = quantize_fp8_block(w)
    assert bits.dtype == np.uint8 and bits.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (3, 3)
    assert scale[1, 1] == 1.0
    back = dequant_fp8_block(bits, scale)
    err = np.abs(back - w)
    # e4m3 has 3 mantissa bits: error ≤ 2^-4 relative, plus the subnormal step near zero.
    block_max = np.repeat(np.repeat(scale * E4M3_MAX, 128, 0), 128, 1)[:320, :300]
    assert np.all(err <= np.abs(w) * 2.0**-4 + block_max * 2.0**-10)
    assert ((bits & 0x7F) == 0x7E).sum() >= 8  # each non-zero block's largest value maps to ±448


def test_bf16_widening_reports_non_finite_in_the_same_pass() -> None:
    """The checked widening equals numpy's shift and flags exactly the Inf/NaN patterns (exponent all ones)."""
    from k2conv.convert.dtypes import bf16_bits_to_f32_checked

    bits = np.arange(1 << 16, dtype=np.uint16)
    out, finite = bf16_bits_to_f32_checked(bits)
    assert np.array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16) and not finite
    ok = bits[(bits & 0x7F80) != 0x7F80]
    assert bf16_bits_to_f32_checked(ok)[1]
    for bad in (0x7F80, 0xFF80, 0x7FC0, 0x7F81):  # +Inf, -Inf, NaN, signalling NaN
        assert not bf16_bits_to_f32_checked(np.array([1, bad, 2], dtype=np.uint16))[1]
