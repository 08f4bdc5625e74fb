"""k2conv.quant.kquants must produce exactly ggml_quantize_chunk's bytes, block for block.

The oracle is ggml itself (libggml-base from llama-cpp-python, via quant.ggml_oracle). Every type
is compared with and without an importance matrix on tensors chosen to reach the quantizers' edge
cases: zero and constant blocks, a single non-zero value, values near the fp16 limits and float32
subnormals, one-signed rows, heavy tails, INT4-derived weights (few distinct values, many ties),
exact rounding ties, magnitudes up to float32's maximum, and even inf/NaN.
Without the oracle, golden digests (recorded from runs that matched ggml) and a dequantization
round trip through gguf-py still check the bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from k2conv.quant import ggml_oracle
from k2conv.quant.kquants import quantize_rows, supported_types

KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]
BLOCK32 = [T.IQ4_NL, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
ALL_TYPES = KQUANTS + BLOCK32

needs_oracle = pytest.mark.skipif(
    not ggml_oracle.available(), reason="llama-cpp-python's libggml-base not found"
)

# ------------------------------------------------------------------------------------ test data


def _blocks(shape: tuple[int, int], block: int) -> int:
    """Number of `block`-sized blocks in a tensor of `shape`."""
    return shape[0] * shape[1] // block


def _gaussian(rng, shape):
    return rng.standard_normal(shape)


def _heavy_tailed(rng, shape):
    """Student-t (df 1.5) plus rare outliers 100× larger: scales set by one value per block."""
    x = rng.standard_t(1.5, shape) * 0.02
    hits = rng.random(shape) < 1e-3
    x[hits] = rng.standard_normal(hits.sum()) * 100.0
    return x


def _zero_blocks(rng, shape):
    """Gaussian with a third of the 32-blocks (and so some 256-blocks) set to exactly zero."""
    x = rng.standard_normal(shape).reshape(-1, 32)
    x[rng.random(x.shape[0]) < 0.33] = 0.0
    x[: max(1, x.shape[0] // 16)] = 0.0  # a run of zeros covering whole super-blocks
    return x.reshape(shape)


def _constant_blocks(rng, shape):
    """Blocks of one repeated value: positive, negative, tiny, or a constant offset plus tiny noise."""
    x = np.repeat(rng.standard_normal(shape[0] * shape[1] // 32) * 3.0, 32).reshape(shape)
    flat = x.reshape(-1, 32)
    noisy = rng.random(flat.shape[0]) < 0.3
    flat[noisy] += rng.standard_normal((noisy.sum(), 32)) * 1e-6
    flat[rng.random(flat.shape[0]) < 0.1] = 1e-20
    return x


def _one_nonzero(rng, shape):
    """All blocks zero except one value each (random position, sign and magnitude)."""
    x = np.zeros(shape).reshape(-1, 32)
    pos = rng.integers(0, 32, x.shape[0])
    x[np.arange(x.shape[0]), pos] = rng.standard_normal(x.shape[0]) * 10.0 ** rng.uniform(-6, 3, x.shape[0])
    return x.reshape(shape)


def _fp16_extremes(rng, shape):
    """Per-block magnitudes from float32 subnormals to near the fp16 maximum (65504)."""
    x = rng.standard_normal(shape).reshape(-1, 32)
    exps = rng.choice([-42.0, -30.0, -12.0, -8.0, -7.0, -6.0, -5.0, 0.0, 3.0, 4.0, 4.6], x.shape[0])
    x *= (10.0**exps)[:, None]
    x[rng.random(x.shape[0]) < 0.05] = 65504.0
    big = rng.random(x.shape[0]) < 0.05
    x[big] = np.clip(x[big] * 1e5, -65504.0, 65504.0)
    return x.reshape(shape)


def _only_negative(rng, shape):
    return -np.abs(rng.standard_normal(shape)) - 0.01


def _only_positive(rng, shape):
    return rng.random(shape) + 0.5


def _int4_derived(rng, shape):
    """Dequantized INT4 weights: q in [−7, 7] times a bf16-rounded scale per 32 values."""
    q = rng.integers(-7, 8, shape).astype(np.float32).reshape(-1, 32)
    scale = (rng.uniform(2e-4, 2e-2, q.shape[0]).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(
        np.float32
    )
    return (q * scale[:, None]).reshape(shape)


def _sparse(rng, shape):
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 0.9] = 0.0
    return x


def _huge_and_tiny(rng, shape):
    """Magnitudes from 1e-38 to 1e38 within blocks: overflowing squares, |x/d| beyond nearest_int's range."""
    x = rng.standard_normal(shape).reshape(-1, 32)
    x *= 10.0 ** rng.uniform(-38, 38, x.shape)
    x[::3] = rng.standard_normal((x[::3].shape[0], 32)) * 3.0e38
    return x.reshape(shape)


def _quarter_ties(rng, shape):
    """Multiples of 1/4: exact .5 cases for every rounding step (round-half-even must match)."""
    return np.round(rng.standard_normal(shape) * 8.0) / 4.0


def _non_finite(rng, shape):
    """A few inf, −inf and NaN values (ggml has no special case; its bytes are still deterministic)."""
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 0.003] = np.inf
    x[rng.random(shape) < 0.003] = -np.inf
    x[rng.random(shape) < 0.003] = np.nan
    return x


DATASETS = {
    "gaussian": _gaussian,
    "heavy_tailed": _heavy_tailed,
    "zero_blocks": _zero_blocks,
    "constant_blocks": _constant_blocks,
    "one_nonzero": _one_nonzero,
    "fp16_extremes": _fp16_extremes,
    "only_negative": _only_negative,
    "only_positive": _only_positive,
    "int4_derived": _int4_derived,
    "sparse": _sparse,
    "huge_and_tiny": _huge_and_tiny,
    "quarter_ties": _quarter_ties,
    "non_finite": _non_finite,
}


def _shapes(qtype: T) -> list[tuple[int, int]]:
    """Rows of 7168 (Kimi's hidden size) and of one super-block; 32-blocks also get 32 and 128."""
    shapes = [(6, 7168), (24, 256)]
    if qtype in BLOCK32:
        shapes += [(16, 128), (32, 32)]
    return shapes


def _imatrices(rng: np.random.Generator, n: int) -> dict[str, np.ndarray | None]:
    """None (reference path) and imatrix vectors: random positive, with zeros, and with huge values."""
    random = rng.uniform(0.05, 20.0, n)
    zeros = random.copy()
    zeros[rng.random(n) < 0.3] = 0.0
    zeros[:32] = 0.0  # a whole zero-weight block
    huge = random * 10.0 ** rng.uniform(-3, 9, n)
    return {"none": None, "random": random, "zeros": zeros, "huge": huge}


# --------------------------------------------------------------------------------- bookkeeping


class _Tally:
    """Counts compared blocks; the total is printed at the end of the module."""

    blocks = 0
    tensors = 0


@pytest.fixture(scope="module", autouse=True)
def _report_blocks(request: pytest.FixtureRequest):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _Tally.tensors:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(
            f"\ntest_kquants: {_Tally.blocks} blocks in {_Tally.tensors} tensors byte-identical to ggml_quantize_chunk"
        )


def _first_mismatch(ours: np.ndarray, ref: np.ndarray, qtype: T) -> str:
    """Human-readable location of the first differing block."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    a = ours.reshape(-1, type_size)
    b = ref.reshape(-1, type_size)
    bad = np.nonzero((a != b).any(axis=1))[0]
    i = int(bad[0])
    cols = np.nonzero(a[i] != b[i])[0][:8]
    return f"{len(bad)}/{len(a)} blocks differ; block {i} bytes {cols.tolist()}: ours {a[i][cols]} ggml {b[i][cols]}"


# --------------------------------------------------------------------------------------- tests


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_ggml(qtype: T, dataset: str) -> None:
    """Byte identity with ggml_quantize_chunk, with and without importance weights."""
    seed = int(qtype) * 7919 + sorted(DATASETS).index(dataset)
    rng = np.random.default_rng(seed)
    block = GGML_QUANT_SIZES[qtype][0]
    for shape in _shapes(qtype):
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.ascontiguousarray(DATASETS[dataset](rng, shape), dtype=np.float32)
        for name, imatrix in _imatrices(rng, shape[1]).items():
            qw = None if imatrix is None else imatrix.astype(np.float32)
            ours = quantize_rows(data, qtype, qw)
            ref = ggml_oracle.ggml_quantize_chunk(qtype, data, qw)
            assert ours.shape == ref.shape
            assert np.array_equal(ours, ref), (
                f"{qtype.name} {dataset} {shape} imatrix={name}: " + _first_mismatch(ours, ref, qtype)
            )
            _Tally.blocks += _blocks(shape, block)
            _Tally.tensors += 1


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_ggml_many_rows_threaded(qtype: T) -> None:
    """A larger mixed tensor, quantized on 2 threads (the bytes must not depend on threading)."""
    rng = np.random.default_rng(int(qtype))
    with np.errstate(over="ignore", invalid="ignore"):
        parts = [fn(rng, (4, 7168)) for fn in DATASETS.values()]
        data = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    qw = rng.uniform(0.0, 5.0, 7168).astype(np.float32)
    for imatrix in (None, qw):
        ours = quantize_rows(data, qtype, imatrix, threads=2)
        ref = ggml_oracle.ggml_quantize_chunk(qtype, data, imatrix)
        assert np.array_equal(ours, ref), _first_mismatch(ours, ref, qtype)
        _Tally.blocks += data.size // GGML_QUANT_SIZES[qtype][0]
        _Tally.tensors += 1


# Relative RMS error bounds for Gaussian data after quantize → gguf-py dequantize (loose: a sanity
# check that our bytes mean what the format says, not a quality benchmark).
_RT_BOUND = {
    T.Q2_K: 0.45, T.Q3_K: 0.25, T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03, T.IQ4_XS: 0.12,
    T.IQ4_NL: 0.12, T.Q4_0: 0.15, T.Q4_1: 0.12, T.Q5_0: 0.08, T.Q5_1: 0.06, T.Q8_0: 0.01,
}  # fmt: skip


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_gguf_dequantize_round_trip(qtype: T, with_imatrix: bool) -> None:
    """gguf-py's dequantizer reads our bytes back to values close to the input."""
    rng = np.random.default_rng(1234 + int(qtype))
    data = rng.standard_normal((8, 7168)).astype(np.float32)
    qw = rng.uniform(0.5, 2.0, 7168).astype(np.float32) if with_imatrix else None
    q = quantize_rows(data, qtype, qw)
    back = gguf_quants.dequantize(q, qtype).reshape(data.shape)
    rel = np.sqrt(np.mean((back - data) ** 2) / np.mean(data**2))
    assert rel < _RT_BOUND[qtype], f"{qtype.name}: relative RMS error {rel:.4f}"
    zeros = quantize_rows(np.zeros((1, 7168), np.float32), qtype, qw)
    assert not gguf_quants.dequantize(zeros, qtype).any()


def _hash_input(n_rows: int, n_per_row: int) -> np.ndarray:
    """Platform-independent test tensor: integer hashing and exact float32 ops only (no RNG streams)."""
    k = np.arange(n_rows * n_per_row, dtype=np.uint64)
    h = k * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    u = ((h >> np.uint64(40)).astype(np.int64) - (1 << 23)).astype(np.float32) / np.float32(1 << 23)
    blk = (k // np.uint64(32)).astype(np.int64)
    scale = np.ldexp(np.ones(blk.shape, np.float32), ((blk * 7) % 23 - 12).astype(np.int32))
    x = (u * u * u + u * np.float32(0.25)) * scale
    x[(blk % 29) == 3] = 0.0
    x[(blk % 31) == 5] = scale[(blk % 31) == 5]
    return x.reshape(n_rows, n_per_row).astype(np.float32)


def _hash_imatrix(n: int) -> np.ndarray:
    k = np.arange(n, dtype=np.int64)
    return (((k * 2654435761) % 1000).astype(np.float32) / np.float32(64.0)).astype(np.float32)


#: sha256 of quantize_rows(_hash_input(8, 7168), type, None | _hash_imatrix(7168)), recorded from a run
#: whose bytes matched ggml_quantize_chunk (llama-cpp-python 0.3.36). They catch regressions where the
#: oracle is not installed.
GOLDEN = {
    ("Q2_K", False): "7eff7b7b05567f3d457b1a6e92005860efd432e22be34b49a7ba0e24fcb99ebb",
    ("Q2_K", True): "f67b03644e6650f60caac59f6d38eb9cc644beb758345486f3b4e2db711fbf6e",
    ("Q3_K", False): "4ca88597f9def626f16ac6c868e64c170b254d4b2cbff9a8a7af90c55033ac27",
    ("Q3_K", True): "3a1f5173803c422c8b485307c77ec68df124221803ceaa2bddadd7707720270e",
    ("Q4_K", False): "1bc449724cc745cfdc92160623ac46149d1b47279bf52e5311e8061ab559497b",
    ("Q4_K", True): "014bfb351e27da8a1cef7ee14e0f58d265ea1f26a15a92c82270ed41690d968a",
    ("Q5_K", False): "f008c5d9d3f5d8eaa5a919547e4578a274e7152ce38c65b65e50d25c58c55c3c",
    ("Q5_K", True): "8b4ed1e88e78a6341046baf40b6cfb170c2feee84315ae48491525a389819a7c",
    ("Q6_K", False): "2df124378dd4f9a2b01515d491f5dc17243ec13e2a12083bd5054638f3bce3c7",
    ("Q6_K", True): "dde23b36003caf168b41bfd56f534f20702ca17f55b176025fe32531ed1cd622",
    ("IQ4_XS", False): "935f15a7cd1bc910a1975dfe0458f3db40be4594b515bac5a2351792998048fb",
    ("IQ4_XS", True): "a8853ac5327d8f7d0de014b1fa5a2861befa2527893e50cd36d288a705164cfd",
    ("IQ4_NL", False): "1d54bf1d0a073cd5ca16c3430b71e6c8032059568d8dc8631aece49244187084",
    ("IQ4_NL", True): "6455399b828b4021ffe7543af791e8fbcc5fe7f0065921456c4515040971e6f5",
    ("Q4_0", False): "412aba3d03a9f69304a2526af087c472dffe50793e4546988dc44b92e223a523",
    ("Q4_0", True): "62af5bd5a3b534155ea51443e7d064227d0db8fb7f3c366dcb5bee8f923276f6",
    ("Q4_1", False): "4d6b66f144b5f1bf98fd77960fc31e337023b709dbcd0077e37eae09fe6e2e48",
    ("Q4_1", True): "c19f7a50ed493e8c637d3f96c2d674b132bff94cac93bc3e6ebe0e131b374dad",
    ("Q5_0", False): "0d641ff3e804b314484dc28818b78c70dcb476afbffd4d0d856d2605eb2f013c",
    ("Q5_0", True): "861a9f0816e4bf8139883d5865768506e790c1e04c3fd38f844432ac03c91a09",
    ("Q5_1", False): "657bed05a6dda8c9f979b23a767d7d3c62df2278c218f052d9942024bba8a23d",
    ("Q5_1", True): "2fed8d015b3b7af78687aaaf4022dae9187a6dc394a1f59254f8c08bdcf9051d",
    ("Q8_0", False): "2ac623325ca2519c2a39a376d24f96cc23ab3f74b289507a9f4085a47f6749a9",
    ("Q8_0", True): "2ac623325ca2519c2a39a376d24f96cc23ab3f74b289507a9f4085a47f6749a9",
}  # fmt: skip


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_golden_digest(qtype: T, with_imatrix: bool) -> None:
    """Bytes for a fixed tensor equal those recorded when they matched ggml (no oracle needed)."""
    data = _hash_input(8, 7168)
    qw = _hash_imatrix(7168) if with_imatrix else None
    digest = hashlib.sha256(quantize_rows(data, qtype, qw).tobytes()).hexdigest()
    if ggml_oracle.available():
        ref = ggml_oracle.ggml_quantize_chunk(qtype, data, qw)
        assert hashlib.sha256(ref.tobytes()).hexdigest() == digest
    assert GOLDEN[(qtype.name, with_imatrix)] == digest


def test_supported_types_and_validation() -> None:
    """The API covers the types the converter needs and rejects malformed input."""
    assert set(ALL_TYPES) == set(supported_types())
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="multiple"):
        quantize_rows(np.zeros((1, 100), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="imatrix"):
        quantize_rows(x, T.Q4_K, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="float32"):
        quantize_rows(x.astype(np.float64), T.Q4_K)
    with pytest.raises(ValueError, match="unsupported"):
        quantize_rows(x, T.IQ2_XXS)
    assert quantize_rows(np.zeros((0, 256), np.float32), T.Q6_K).shape == (0, 210)


def test_oracle_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llama-cpp-python the oracle says what to install instead of failing obscurely."""
    monkeypatch.setenv("K2CONV_GGML_BASE", "/nonexistent/libggml-base.so")
    monkeypatch.setattr(
        ggml_oracle, "_candidates", lambda: [ggml_oracle.Path("/nonexistent/libggml-base.so")]
    )
    ggml_oracle.load_library.cache_clear()
    try:
        with pytest.raises(ggml_oracle.GgmlOracleUnavailable, match="llama-cpp-python"):
            ggml_oracle.load_library()
    finally:
        ggml_oracle.load_library.cache_clear()
