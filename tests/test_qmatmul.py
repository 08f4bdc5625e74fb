"""infer.qmatmul: products with packed quantized weights equal the float32 products of gguf's dequantization.

The packed form must hold exactly the dequantized values (its expansion is compared bit for bit with
gguf.quants.dequantize), and its matrix-vector kernel may differ from a float32 matmul only by
summation order: ~1e-6 of the output's scale, far below one quantization step. Random blocks cover
every bit pattern of every type; the activation rows cover the one-row kernel and the expand path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from test_infer_dequant import QUANTIZED, random_blocks

from k2conv.infer.dequant import T
from k2conv.infer.qmatmul import GEMV_MAX_ROWS, linear, pack, packable


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_packed_product_equals_dequantized_matmul(qtype: T) -> None:
    rows, blocks = 37, 3  # K-quants: 768 columns; legacy: 96 — odd row count, several groups per row
    raw = random_blocks(qtype, rows, blocks, seed=int(qtype))
    want_w = torch.from_numpy(gguf_dequantize(raw.copy(), qtype).astype(np.float32))
    w = pack(raw, qtype, tuple(want_w.shape))
    assert packable(qtype) and w.shape == tuple(want_w.shape)
    assert torch.equal(w.expand().view(torch.int32), want_w.view(torch.int32))  # the values themselves
    assert torch.equal(w.expand(5, 9), want_w[5:9])
    gen = torch.Generator().manual_seed(0)
    for n in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 5):
        x = torch.randn(n, want_w.shape[1], generator=gen)
        got, want = linear(x, w), x @ want_w.T
        scale = (x.abs() @ want_w.abs().T).max()  # the sum of |terms|: the float32 error's yardstick
        assert got.shape == want.shape and float((got - want).abs().max()) <= 2e-6 * float(scale)
    with pytest.raises(ValueError, match="do not hold"):
        pack(raw, qtype, (rows + 1, want_w.shape[1]))


def test_gemv_kernel_is_not_a_float_matmul_in_disguise() -> None:
    """One changed quant changes exactly its row's output, by exactly scale·Δq·x: the kernel reads the quants."""
    raw = random_blocks(T.Q8_0, 4, 2, seed=3)
    w = pack(raw, T.Q8_0, (4, 64))
    x = torch.zeros(1, 64)
    x[0, 40] = 1.0
    before = linear(x, w)[0]
    w.q[2, 40] += 1 if w.q[2, 40] < 127 else -1
    after = linear(x, w)[0]
    delta = (after - before).abs()
    assert float(delta[2]) == pytest.approx(abs(float(w.scales[2, 1])), rel=1e-6) and delta[[0, 1, 3]].eq(0).all()


def test_unpackable_types_are_reported() -> None:
    assert not packable(T.F32) and not packable(T.BF16)
