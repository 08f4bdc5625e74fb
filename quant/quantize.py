"""One entry point, float32 rows in → quantized bytes out, for every type k2conv writes.

Legacy block types and BF16 come from the `gguf` package (its Q8_0/Q4_0/… match ggml's reference
quantizers); K-quants and IQ4 come from k2conv.quant.kquants, written here because gguf has none.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from k2conv.quant.types import T, row_bytes

_GGUF_QUANTIZED = {T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
_KQUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS}


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `data` (any leading shape, last axis = one row) to uint8 [rows, row_bytes]."""
    ne0 = data.shape[-1]
    rows = data.reshape(-1, ne0)
    if qtype == T.F32:
        out = np.ascontiguousarray(rows, dtype="<f4").view(np.uint8)
    elif qtype == T.F16:
        out = rows.astype("<f2").view(np.uint8)
    elif qtype in _GGUF_QUANTIZED:
        out = np.asarray(quants.quantize(rows, qtype)).view(np.uint8)
    elif qtype in _KQUANTS:
        from k2conv.quant.kquants import quantize_rows

        out = quantize_rows(np.ascontiguousarray(rows, dtype=np.float32), qtype, imatrix)
    else:
        raise ValueError(f"no quantizer for {qtype.name}")
    out = out.reshape(rows.shape[0], -1)
    assert out.shape[1] == row_bytes(qtype, ne0), (qtype, out.shape)
    return out
