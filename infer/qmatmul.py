"""Matrix products with GGML-quantized weights on the CPU, without expanding them to float32.

Why: a decode step multiplies one activation row by every weight it touches, so its time is the time
to stream the weights through the cores. As float32 that is 4 bytes per weight (~6 GB per token on
the `slice` model, ~2.7 tok/s on the 2-core dev machine, memory-bound); here a weight stays one int8
quant plus a float32 scale (and min) per group of 16 or 32 — 9–10 bits — and the product is computed
straight from them, in float32:

    y[r] = Σ_groups scale[r,g] · Σ_j q[r,g,j] · x[g,j]  −  Σ_groups min[r,g] · Σ_j x[g,j]

which is Σ_j (scale·q − min)·x, the dequantized weight times x, only summed in another order (float32
rounding differs from a float32 matmul by ~1e-6 relative; the activations are never quantized, unlike
llama.cpp's kernels). Every type infer/dequant.py can split into groups is packed this way (legacy
4/5/8-bit, K-quants, IQ4); 4-bit types are not kept as nibbles because on this CPU the int8 kernel is
compute-bound already and unpacking nibbles costs more than the bytes it saves (measured: 4.1 vs
3.2 G weights/s on one core).

Kernels: numba, one row per task (`prange`, as many threads as torch uses), 32 independent float32
accumulators per row so the loop vectorizes without a serial dependency. Several activation rows
(prefill) go through a float32 expansion of a block of weight rows and torch's matmul instead: there
the weights are reused across rows and a GEMM wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from k2conv.infer.dequant import GROUPS

_JIT = {"cache": True, "nogil": True, "boundscheck": False}
GEMV_MAX_ROWS = 4  # activation rows up to which one matrix-vector pass per row beats expand-and-matmul
EXPAND_BYTES = 32 << 20  # float32 block of weight rows expanded at a time for several activation rows


@intrinsic
def _stack_f32x32(typingctx):  # type: ignore[no-untyped-def]
    """A pointer to 32 float32 on the stack. Accumulators in a numba array live in heap memory, so
    every step would load and store them; on the stack LLVM keeps them in four vector registers
    (measured: 5.8 against 4.3 G weights/s on one core)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return cgutils.alloca_once(builder, ir.FloatType(), size=32)

    return types.CPointer(types.float32)(), codegen


@njit(fastmath=True, **_JIT)
def _dot_g32(q: np.ndarray, s: np.ndarray, x: np.ndarray) -> np.float32:
    acc = carray(_stack_f32x32(), 32)  # in the caller's frame: a pointer to it must not be returned
    acc[:] = 0
    for g in range(s.size):
        sg = s[g]
        for j in range(32):
            acc[j] += sg * (np.float32(q[g * 32 + j]) * x[g * 32 + j])
    return acc.sum()


@njit(fastmath=True, **_JIT)
def _dot_g16(q: np.ndarray, s: np.ndarray, x: np.ndarray) -> np.float32:
    acc = carray(_stack_f32x32(), 32)
    acc[:] = 0
    for p in range(s.size // 2):  # two groups of 16 per step: the same 32 accumulators as above
        s0, s1 = s[2 * p], s[2 * p + 1]
        for j in range(16):
            acc[j] += s0 * (np.float32(q[p * 32 + j]) * x[p * 32 + j])
            acc[16 + j] += s1 * (np.float32(q[p * 32 + 16 + j]) * x[p * 32 + 16 + j])
    return acc.sum()


@njit(parallel=True, fastmath=True, **_JIT)
def _gemv(q: np.ndarray, scales: np.ndarray, mins: np.ndarray, x: np.ndarray, xsum: np.ndarray,
          out: np.ndarray) -> None:  # fmt: skip
    """out[r] = Σ (scale·q − min)·x over row r; `mins` is (0, 0) for symmetric types."""
    rows, cols = q.shape
    g16 = cols // scales.shape[1] == 16
    has_min = mins.shape[0] > 0
    for r in prange(rows):
        total = _dot_g16(q[r], scales[r], x) if g16 else _dot_g32(q[r], scales[r], x)
        if has_min:
            m = mins[r]
            for g in range(m.size):
                total -= m[g] * xsum[g]
        out[r] = total


@njit(parallel=True, **_JIT)
def _expand(q: np.ndarray, scales: np.ndarray, mins: np.ndarray, r0: int, out: np.ndarray) -> None:
    """out[i] = scale·q − min of row r0+i: the same float32 operations as infer/dequant.py (no FMA, no
    fastmath), so the expanded rows are bit-identical to gguf's dequantization."""
    n_groups = scales.shape[1]
    group = q.shape[1] // n_groups
    has_min = mins.shape[0] > 0
    for i in prange(out.shape[0]):
        qr, sr, row = q[r0 + i], scales[r0 + i], out[i]
        for g in range(n_groups):
            s, at = sr[g], g * group
            for j in range(group):
                row[at + j] = s * np.float32(qr[at + j])
            if has_min:
                m = mins[r0 + i, g]
                for j in range(group):
                    row[at + j] -= m


@dataclass(frozen=True)
class PackedMatrix:
    """A [rows, cols] weight as int8 quants with a float32 scale (and min) per group; see the module doc."""

    q: np.ndarray  # int8 [rows, cols]
    scales: np.ndarray  # float32 [rows, cols / group]
    mins: np.ndarray  # float32 [rows, cols / group], or (0, 0) when the type has none
    qtype: GGMLQuantizationType

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape  # type: ignore[return-value]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes + self.mins.nbytes

    def expand(self, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        """Rows r0…r1 as float32 (into `out`'s first elements when given), equal to dequantizing the
        original blocks."""
        r1 = self.shape[0] if r1 is None else r1
        n = (r1 - r0) * self.shape[1]
        rows = (np.empty(n, np.float32) if out is None else out[:n]).reshape(r1 - r0, self.shape[1])
        _expand(self.q, self.scales, self.mins, r0, rows)
        return torch.from_numpy(rows)


def packable(qtype: GGMLQuantizationType) -> bool:
    return GGMLQuantizationType(qtype) in GROUPS


def pack(raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> PackedMatrix:
    """Raw GGML blocks of a [rows, cols] matrix (uint8, any shape holding rows·row_bytes) → PackedMatrix."""
    qtype = GGMLQuantizationType(qtype)
    rows, cols = shape
    _, size = GGML_QUANT_SIZES[qtype]
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw, dtype=np.uint8))  # mapped: copy
    data = data.reshape(-1, size)
    g = GROUPS[qtype](data)
    n_groups = g.q.shape[0] * g.q.shape[1]
    if n_groups * g.q.shape[2] != rows * cols:
        raise ValueError(f"{qtype.name}: {data.numel()} bytes do not hold a {rows}x{cols} matrix")
    q = g.q.to(torch.int8).reshape(rows, cols).numpy()
    scales = g.scale.reshape(rows, -1).contiguous().numpy()
    mins = g.min.reshape(rows, -1).contiguous().numpy() if g.min is not None else np.zeros((0, 0), np.float32)
    return PackedMatrix(q, scales, mins, qtype)


_numba_threads = [0]
_expand_buffer = [np.empty(0, np.float32)]  # the runner runs one forward pass at a time (not thread-safe)


def _follow_torch_threads() -> None:
    """numba's threads follow torch's (bench --threads, torch.set_num_threads); set only on a change."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if n != _numba_threads[0]:
        numba.set_num_threads(n)
        _numba_threads[0] = n


def linear(x: torch.Tensor, w: torch.Tensor | PackedMatrix) -> torch.Tensor:
    """x @ w.T for a float weight or a PackedMatrix (x float32 [T, cols] on the CPU)."""
    if isinstance(w, torch.Tensor):
        return x @ w.T
    rows, cols = w.shape
    x2 = x.reshape(-1, cols).to(torch.float32).contiguous()
    out = torch.empty(x2.shape[0], rows, dtype=torch.float32)
    _follow_torch_threads()
    if x2.shape[0] <= GEMV_MAX_ROWS:
        xs, ys = x2.numpy(), out.numpy()
        for t in range(x2.shape[0]):
            xsum = xs[t].reshape(-1, w.group).sum(axis=1) if w.mins.size else xs[t, :0]
            _gemv(w.q, w.scales, w.mins, xs[t], xsum, ys[t])
    else:
        step = max(1, EXPAND_BYTES // (4 * cols))
        if _expand_buffer[0].size < step * cols:  # one buffer for every call: fresh pages cost ~30 %
            _expand_buffer[0] = np.empty(step * cols, np.float32)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[:, r0:r1] = x2 @ w.expand(r0, r1, _expand_buffer[0]).T
    return out.reshape(*x.shape[:-1], rows)
