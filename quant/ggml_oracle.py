"""ctypes access to ggml's own quantizers, as an oracle for tests and benchmarks only.

k2conv never needs this at run time. It loads the ``libggml-base.so`` that llama-cpp-python bundles
(``llama_cpp/lib/``), the same C code llama-quantize runs, so tests can demand byte identity with it.
Set ``K2CONV_GGML_BASE`` to the path of another ``libggml-base.so`` to use that one instead.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

_ENV = "K2CONV_GGML_BASE"


class GgmlOracleUnavailable(RuntimeError):
    """Raised when no libggml-base.so can be found or loaded (llama-cpp-python not installed)."""


def _candidates() -> list[Path]:
    """Where libggml-base may live: $K2CONV_GGML_BASE, then llama_cpp/lib (without importing llama_cpp)."""
    found: list[Path] = []
    env = os.environ.get(_ENV)
    if env:
        found.append(Path(env))
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            lib = Path(loc) / "lib"
            found.extend(sorted(lib.glob("libggml-base.so*")))
            found.extend(sorted(lib.glob("libggml-base.dylib")))
    return found


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Load libggml-base once and declare the prototypes used here."""
    errors = []
    for path in _candidates():
        if not path.is_file():
            errors.append(f"{path}: not a file")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        return lib
    detail = "; ".join(errors) if errors else "llama_cpp is not installed and $" + _ENV + " is not set"
    raise GgmlOracleUnavailable(
        "cannot load libggml-base.so for the ggml oracle (install llama-cpp-python, "
        f"e.g. `pip install -e .[test]`, or set ${_ENV}): {detail}"
    )


def available() -> bool:
    """True when the oracle library can be loaded (lets tests skip cleanly otherwise)."""
    try:
        load_library()
    except GgmlOracleUnavailable:
        return False
    return True


def ggml_quantize_init(qtype: GGMLQuantizationType) -> None:
    """ggml_quantize_init: builds the grids IQ2/IQ3/IQ1 need (a no-op for K-quants and IQ4)."""
    load_library().ggml_quantize_init(int(qtype))


def ggml_quantize_chunk(
    qtype: GGMLQuantizationType, data: np.ndarray, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Quantize float32 ``data`` [nrows, n_per_row] with ggml itself → uint8 [nrows, row_bytes].

    Single-threaded, like ggml_quantize_chunk. ``imatrix`` (length n_per_row) is applied to every row.
    """
    lib = load_library()
    src = np.ascontiguousarray(data, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"data must be 2-D [nrows, n_per_row], got shape {src.shape}")
    nrows, n_per_row = src.shape
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    if n_per_row % block:
        raise ValueError(
            f"{GGMLQuantizationType(qtype).name}: n_per_row {n_per_row} is not a multiple of {block}"
        )
    qw_ptr = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (n_per_row,):
            raise ValueError(f"imatrix must have shape ({n_per_row},), got {qw.shape}")
        qw_ptr = qw.ctypes.data
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{GGMLQuantizationType(qtype).name} requires an imatrix")
    row_bytes = n_per_row // block * type_size
    out = np.zeros((nrows, row_bytes), dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(
        int(qtype), src.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, qw_ptr
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out
