"""TQ1_0 / TQ2_0 come from the gguf package: its bytes must equal ggml's own quantizer."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from k2conv.quant.ggml_oracle import ggml_quantize_chunk
from k2conv.quant.quantize import quantize
from k2conv.quant.types import fit_to_row

pytestmark = pytest.mark.oracle


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0])
def test_ternary_bytes_equal_ggml(qtype: T) -> None:
    rng = np.random.default_rng(5)
    cases = [
        rng.standard_normal((16, 7168)).astype(np.float32),
        (rng.standard_t(2, (8, 2048)) * 0.02).astype(np.float32),
        np.zeros((2, 256), np.float32),
        np.full((2, 256), -0.5, np.float32),
        (rng.integers(-7, 8, (8, 512)) * 0.01).astype(np.float32),
    ]
    blocks = 0
    for x in cases:
        ours = quantize(x, qtype)
        theirs = np.asarray(ggml_quantize_chunk(qtype, x, None)).reshape(ours.shape)
        assert np.array_equal(ours, theirs)
        blocks += x.size // 256
    assert blocks > 500


def test_ternary_rows_fall_back_like_llama_quantize() -> None:
    assert fit_to_row(T.TQ1_0, 128) == T.Q4_0 and fit_to_row(T.TQ2_0, 7168) == T.TQ2_0
