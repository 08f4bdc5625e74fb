"""One entry point, float32 rows in → quantized bytes out, for every type k2conv writes.

F32/F16 are numpy casts; BF16 and the ternary TQ1_0/TQ2_0 come from the `gguf` package (its
TQ quantizers equal ggml's: tests/test_ternary.py). Every block type (Q8_0, Q4_0…Q5_1,
Q2_K…Q6_K, IQ4_NL/XS) goes through k2conv.quant.kquants: byte-identical to ggml_quantize_chunk
(tests/test_kquants.py) and, for the types gguf also has, several times faster than gguf's numpy
versions (bench/bench_kquants.py), which matters because Q8_0 covers every non-expert matrix.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from k2conv.quant.types import T, row_bytes


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `data` (any leading shape, last axis = one row) to uint8 [rows, row_bytes].

    `imatrix` (length = row length) holds importance weights, as llama-quantize passes them.
    """
    ne0 = data.shape[-1]
    rows = data.reshape(-1, ne0)
    if qtype == T.F32:
        out = np.ascontiguousarray(rows, dtype="<f4").view(np.uint8)
    elif qtype == T.F16:
        out = rows.astype("<f2").view(np.uint8)
    elif qtype in (T.BF16, T.TQ1_0, T.TQ2_0):
        out = np.asarray(quants.quantize(rows, qtype)).view(np.uint8)
    else:
        from k2conv.quant.kquants import quantize_rows, supported_types

        if qtype not in supported_types():
            raise ValueError(f"no quantizer for {qtype.name}")
        out = quantize_rows(np.ascontiguousarray(rows, dtype=np.float32), qtype, imatrix)
    out = out.reshape(rows.shape[0], -1)
    assert out.shape[1] == row_bytes(qtype, ne0), (qtype, out.shape)
    return out


def quantize_q8_0_bf16(bits: np.ndarray, where: str) -> np.ndarray:
    """Q8_0 of a bfloat16 tensor given as its uint16 bit patterns (any leading shape, last axis = one
    row) → uint8 [rows, row_bytes], byte-identical to `quantize(widened, Q8_0)` in one pass without
    the float32 copy; inf/NaN raise K2ConvError naming `where` (the tensor), as reading it would."""
    from k2conv.errors import K2ConvError
    from k2conv.quant.q8_0 import q80_bf16_range

    ne0 = bits.shape[-1]
    if ne0 % 32:
        raise ValueError(f"{where}: row length {ne0} is not a multiple of Q8_0's 32-value block")
    flat = np.ascontiguousarray(bits, dtype=np.uint16).reshape(-1)
    out = np.empty((flat.size // 32, 34), dtype=np.uint8)
    if flat.size and q80_bf16_range(flat, out, 0, out.shape[0]):
        raise K2ConvError(f"{where}: contains NaN or Inf")
    return out.reshape(-1, row_bytes(T.Q8_0, ne0))
