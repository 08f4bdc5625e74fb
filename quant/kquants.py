"""K-quant, IQ4 and legacy block quantizers, byte-identical to ggml's ggml_quantize_chunk (x86-64).

The gguf package ships no K-quant quantizers, so k2conv carries its own. They follow ggml-quants.c
operation by operation in float32 (kquant_helpers: the exactness rules; lanes: the scale searches,
vectorized across sub-blocks without reordering any sum; kquant_blocks, iq4, legacy_quants: the
per-type block logic) and are compiled with numba (explicit signatures, cached on disk). Blocks are
independent, so large tensors are split into block ranges that run on threads without the GIL.

Semantics match ``ggml_quantize_chunk(type, data, …, nrows, n_per_row, imatrix)``:

* without an imatrix the reference quantizer runs (``quantize_row_<type>_ref``; for IQ4 the ntry = 7
  search with weights x², as ggml does);
* with an imatrix (length n_per_row) the ``_impl`` variant runs and every row uses the same weights;
  Q8_0 ignores the imatrix, exactly like ggml.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from .iq4 import iq4nl_range, iq4xs_range
from .kquant_blocks import k45_range, q2k_range, q3k_range, q6k_range
from .legacy_quants import legacy_range

T = GGMLQuantizationType

_LEGACY_KIND = {T.Q4_0: 0, T.Q4_1: 1, T.Q5_0: 2, T.Q5_1: 3, T.Q8_0: 4}
_SUPPORTED = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, *_LEGACY_KIND)
#: Below this many blocks per thread, threading costs more than it saves.
_MIN_BLOCKS_PER_TASK = 64


def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """The ggml types quantize_rows can produce."""
    return _SUPPORTED


def _kernel(qtype: GGMLQuantizationType, n_per_row: int) -> Callable[..., None]:
    """A callable (x, qw, use_qw, out, start, stop) for qtype's block kernel."""
    if qtype == T.Q2_K:
        return q2k_range
    if qtype == T.Q3_K:
        return q3k_range
    if qtype in (T.Q4_K, T.Q5_K):
        nmax = 15 if qtype == T.Q4_K else 31
        return lambda x, qw, use_qw, out, a, b: k45_range(x, qw, use_qw, out, a, b, nmax)
    if qtype == T.Q6_K:
        return q6k_range
    if qtype == T.IQ4_NL:
        return iq4nl_range
    if qtype == T.IQ4_XS:
        return iq4xs_range
    kind = _LEGACY_KIND[qtype]
    return lambda x, qw, use_qw, out, a, b: legacy_range(x, qw, use_qw, out, a, b, kind, n_per_row)


def _check_inputs(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None) -> np.ndarray:
    """Validate shapes and return the imatrix as a contiguous float32 vector (empty when absent)."""
    if qtype not in _SUPPORTED:
        raise ValueError(f"quantize_rows: unsupported type {GGMLQuantizationType(qtype).name}")
    if data.ndim != 2 or data.dtype != np.float32:
        raise ValueError(
            f"quantize_rows: data must be float32 [nrows, n_per_row], got {data.dtype} {data.shape}"
        )
    block = GGML_QUANT_SIZES[qtype][0]
    n_per_row = data.shape[1]
    if n_per_row % block:
        raise ValueError(f"{qtype.name}: n_per_row {n_per_row} is not a multiple of the block size {block}")
    if imatrix is None or qtype == T.Q8_0:
        return np.zeros(0, np.float32)
    qw = np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw.shape != (n_per_row,):
        raise ValueError(f"imatrix must have shape ({n_per_row},), got {qw.shape}")
    return qw


def _ranges(nblocks: int, threads: int) -> list[tuple[int, int]]:
    """Split [0, nblocks) into about 4 contiguous ranges per thread (load balance, little overhead)."""
    ntasks = max(1, min(threads * 4, nblocks // _MIN_BLOCKS_PER_TASK))
    if threads <= 1:
        ntasks = 1
    edges = np.linspace(0, nblocks, ntasks + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def quantize_rows(
    data: np.ndarray,
    qtype: GGMLQuantizationType,
    imatrix: np.ndarray | None = None,
    *,
    threads: int = 1,
) -> np.ndarray:
    """Quantize float32 rows [nrows, n_per_row] → uint8 [nrows, row_bytes], as ggml_quantize_chunk.

    ``imatrix`` (length n_per_row) selects ggml's importance-weighted path and is shared by all rows.
    ``threads`` > 1 quantizes disjoint block ranges concurrently; the bytes do not depend on it.
    """
    qtype = GGMLQuantizationType(qtype)
    if threads < 1:
        raise ValueError(f"threads must be ≥ 1, got {threads}")
    data = np.asarray(data)
    qw = _check_inputs(data, qtype, imatrix)
    x = np.ascontiguousarray(data, dtype=np.float32).reshape(-1)
    nrows, n_per_row = data.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    nblocks = nrows * n_per_row // block
    out = np.empty((nblocks, type_size), dtype=np.uint8)
    kernel = _kernel(qtype, n_per_row)
    use_qw = qw.shape[0] > 0
    ranges = _ranges(nblocks, threads)
    if len(ranges) <= 1:
        if nblocks:
            kernel(x, qw, use_qw, out, 0, nblocks)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for fut in [pool.submit(kernel, x, qw, use_qw, out, a, b) for a, b in ranges]:
                fut.result()
    return out.reshape(nrows, n_per_row // block * type_size)
