"""GGML tensor types k2conv can write: names, block geometry, byte sizes, llama.cpp's fallbacks."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from k2conv.errors import K2ConvError

T = GGMLQuantizationType

# Types with a quantizer in this project (the gguf package or quant.kquants).
WRITABLE: tuple[GGMLQuantizationType, ...] = (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0,
)  # fmt: skip

# llama-quantize's substitute when a row (ne0) is not a multiple of the block size.
_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    T.IQ4_XS: T.IQ4_NL,
    T.TQ1_0: T.Q4_0,
    T.TQ2_0: T.Q4_0,
}


def parse_type(name: str, where: str = "") -> GGMLQuantizationType:
    """`q4_k` / `Q4_K` / `bf16` → the ggml type; unknown or unwritable names are a clear error."""
    key = name.strip().upper()
    try:
        qtype = GGMLQuantizationType[key]
    except KeyError:
        raise K2ConvError(f"{where}unknown tensor type {name!r} (known: {', '.join(t.name for t in WRITABLE)})") from None
    if qtype not in WRITABLE:
        raise K2ConvError(f"{where}tensor type {qtype.name} cannot be written by k2conv (known: {', '.join(t.name for t in WRITABLE)})")
    return qtype


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: GGMLQuantizationType, ne0: int) -> int:
    blck, size = GGML_QUANT_SIZES[qtype]
    return ne0 // blck * size


def tensor_bytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor with numpy `shape` (last axis = ne0) stored as `qtype`."""
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * row_bytes(qtype, shape[-1])


def fit_to_row(qtype: GGMLQuantizationType, ne0: int) -> GGMLQuantizationType:
    """llama-quantize's fallback chain for rows the block does not divide (e.g. attn_k_b's 128)."""
    if ne0 % block_size(qtype) == 0:
        return qtype
    fallback = _FALLBACK.get(qtype, T.F16)
    if ne0 % block_size(fallback) != 0:
        return T.F16
    return fallback


def file_type_of(counts: dict[GGMLQuantizationType, int]) -> int:
    """`general.file_type` for a mix: the type holding most bytes (llama.cpp only displays it)."""
    if not counts:
        return int(LlamaFileType.ALL_F32)
    main = max(counts, key=lambda t: counts[t])
    mapping = {
        T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
        T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
        T.Q5_0: LlamaFileType.MOSTLY_Q5_0, T.Q5_1: LlamaFileType.MOSTLY_Q5_1, T.Q2_K: LlamaFileType.MOSTLY_Q2_K,
        T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M, T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
        T.Q6_K: LlamaFileType.MOSTLY_Q6_K, T.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL, T.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS,
        T.TQ1_0: LlamaFileType.MOSTLY_TQ1_0, T.TQ2_0: LlamaFileType.MOSTLY_TQ2_0,
    }  # fmt: skip
    return int(mapping.get(main, LlamaFileType.GUESSED))
