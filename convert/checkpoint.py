"""A Hugging Face Kimi checkpoint opened lazily: config, index, shard headers, decoders.

`Checkpoint.read(weight)` returns one logical weight (or one expert's matrix) as float32, decoding
BF16/F16/F32, FP8 e4m3 with block scales, or compressed-tensors INT4; nothing else is loaded.
Opening validates the index against the shard headers and the expected tensor list
(hf_layout), so a missing, truncated or mis-shaped tensor is reported before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2conv.convert.config import ModelConfig, load_config
from k2conv.convert.dtypes import bf16_bits_to_f32, bf16_bits_to_f32_checked, e4m3_bits_to_f32
from k2conv.convert.hf_layout import FP8, INT4, PLAIN, LogicalWeight, logical_weights, stored_tensors
from k2conv.convert.safetensors_reader import SafetensorsFile
from k2conv.errors import K2ConvError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class Int4Parts:
    """The three stored tensors of one INT4 pack-quantized linear, as raw views."""

    packed: np.ndarray  # int32 [rows, ceil(cols/8)]
    scale_bits: np.ndarray  # uint16 (bf16) [rows, cols/32]; float scales are converted to bf16-free f32
    scale_f32: np.ndarray | None  # set instead of scale_bits when the file stores F32/F16 scales
    rows: int
    cols: int


class Checkpoint:
    """Config + shard headers of a checkpoint folder; tensor data is read on demand."""

    def __init__(self, src: Path, *, validate: bool = True):
        self.root = Path(src)
        if not self.root.is_dir():
            raise K2ConvError(f"{self.root}: not a checkpoint folder")
        self.config: ModelConfig = load_config(self.root / "config.json")
        self.weight_map = self._read_weight_map()
        self.files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(self.weight_map.values())):
            self.files[shard] = SafetensorsFile(self._shard_path(shard))
        for name, shard in self.weight_map.items():
            if name not in self.files[shard]:
                raise K2ConvError(f"{self.files[shard].path}: tensor {name} is listed in {INDEX_NAME} but not in the shard")
        self._check_counts()
        self.weights = logical_weights(self.config)
        if validate:
            self._validate_layout()

    # ---- opening ------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        index = self.root / INDEX_NAME
        if not index.exists():
            single = self.root / SINGLE_NAME
            if not single.exists():
                raise K2ConvError(f"{self.root}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
            return dict.fromkeys(SafetensorsFile(single).names(), SINGLE_NAME)
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, 4300+ digit ints, deep nesting
            raise K2ConvError(f"{index}: not valid JSON ({str(exc).splitlines()[0][:120] or exc.__class__.__name__})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise K2ConvError(f"{index}: no weight_map object of tensor name → shard file")
        return weight_map

    def _check_counts(self) -> None:
        """Refuse a config that implies more tensors than the index lists, before anything loops
        over its layers and experts: a lying num_hidden_layers or n_routed_experts (10¹²) would
        otherwise build that many weight descriptions (a hang), not a clear error."""
        cfg, have = self.config, len(self.weight_map)
        implied = cfg.num_hidden_layers
        if implied <= have:  # n_moe_layers loops over the layers: only now is that bounded
            implied += 3 * cfg.n_moe_layers * cfg.n_routed_experts
        if implied > have:
            raise K2ConvError(
                f"{self.root / 'config.json'}: implies at least {implied:,} tensors ({cfg.num_hidden_layers:,} layers, "
                f"{cfg.n_routed_experts:,} routed experts) but the checkpoint holds {have:,}"
            )

    def _shard_path(self, shard: str) -> Path:
        """Resolve a shard name from the index, refusing anything that leaves the checkpoint folder."""
        candidate = Path(shard)
        if candidate.is_absolute() or ".." in candidate.parts or len(candidate.parts) != 1:
            raise K2ConvError(f"{self.root / INDEX_NAME}: shard name {shard!r} escapes the checkpoint folder")
        path = self.root / candidate
        if not path.exists():
            raise K2ConvError(f"{path}: shard listed in {INDEX_NAME} is missing")
        return path

    def _validate_layout(self) -> None:
        """Every tensor the config implies exists with the right dtype family and shape."""
        for w in self.weights:
            for st in stored_tensors(self.config, w):
                entry = self.entry(st.name)
                shape_ok = entry.shape == st.shape or (
                    st.name.endswith(".weight_shape") and entry.shape == (2,)
                )
                if not shape_ok:
                    raise K2ConvError(
                        f"{self.files[self.weight_map[st.name]].path.name}: tensor {st.name} has shape "
                        f"{list(entry.shape)} but the config implies {list(st.shape)}"
                    )
                if not _dtype_compatible(st.dtype, entry.dtype):
                    raise K2ConvError(
                        f"{self.files[self.weight_map[st.name]].path.name}: tensor {st.name} is {entry.dtype}, "
                        f"expected {st.dtype}"
                    )

    def entry(self, name: str):
        shard = self.weight_map.get(name)
        if shard is None:
            raise K2ConvError(f"{self.root}: tensor {name} is missing from the checkpoint")
        return self.files[shard].entries[name]

    def raw(self, name: str) -> np.ndarray:
        shard = self.weight_map.get(name)
        if shard is None:
            raise K2ConvError(f"{self.root}: tensor {name} is missing from the checkpoint")
        return self.files[shard].raw(name)

    def where(self, name: str) -> str:
        shard = self.weight_map.get(name, "?")
        return f"{shard}: tensor {name}"

    # ---- decoding -----------------------------------------------------------------------
    def int4_parts(self, w: LogicalWeight) -> Int4Parts:
        base = self.config.tensor_prefix + w.module
        packed = self.raw(f"{base}.weight_packed")
        scale = self.raw(f"{base}.weight_scale")
        shape = self.raw(f"{base}.weight_shape")
        rows, cols = (int(v) for v in shape)
        if (rows, cols) != w.shape:
            raise K2ConvError(f"{self.where(base + '.weight_shape')}: says {[rows, cols]}, config implies {list(w.shape)}")
        scale_entry = self.entry(f"{base}.weight_scale")
        if scale_entry.dtype == "BF16":
            return Int4Parts(packed, scale, None, rows, cols)
        return Int4Parts(packed, scale, np.asarray(scale, dtype=np.float32), rows, cols)

    def plain_name(self, w: LogicalWeight) -> str:
        """The checkpoint tensor a plain (unquantized) weight is stored as."""
        return f"{self.config.tensor_prefix}{w.module}.{w.suffix}"

    def bf16_bits(self, w: LogicalWeight, rows: slice | None = None) -> np.ndarray | None:
        """The stored bfloat16 bit patterns (uint16, a view of the mapped file) of a plain BF16 weight,
        or None for any other storage: lets a quantizer that widens on the fly skip `read`'s float32 copy."""
        name = self.plain_name(w)
        if w.storage != PLAIN or self.entry(name).dtype != "BF16":
            return None
        raw = self.raw(name)
        return raw[rows or slice(0, w.shape[0])] if raw.ndim > 1 else raw

    def read(self, w: LogicalWeight, rows: slice | None = None) -> np.ndarray:
        """The logical weight (or rows `rows` of it) as float32, NaN/Inf rejected with the tensor's name.

        Row slices let huge matrices (embeddings, 18432-wide dense layers) stream in bounded memory;
        for FP8 the slice must start on a scale-block boundary.
        """
        from k2conv.convert.fp8 import dequant_fp8_block
        from k2conv.convert.int4 import dequant_int4

        rows = rows or slice(0, w.shape[0])
        base = self.config.tensor_prefix + w.module
        finite: bool | None = None  # known already when the decoder checked it in its own pass
        if w.storage == PLAIN:
            name = self.plain_name(w)
            raw = self.raw(name)
            part = raw[rows] if raw.ndim > 1 else raw
            if self.entry(name).dtype == "BF16":
                out, finite = bf16_bits_to_f32_checked(part)
            else:
                out = to_f32(part, self.entry(name).dtype)
        elif w.storage == INT4:
            parts = self.int4_parts(w)
            name = f"{base}.weight_scale"
            scales = parts.scale_f32 if parts.scale_f32 is not None else parts.scale_bits
            scales = scales[rows]
            _check_finite_scales(scales, parts.scale_f32 is None, self.where(name))
            out = dequant_int4(parts.packed[rows], scales, parts.cols)
        elif w.storage == FP8:
            name = f"{base}.weight"
            br, bc = self.config.quant.block  # type: ignore[union-attr]
            assert rows.start % br == 0, "FP8 row slices must start on a block boundary"
            bits = self.raw(name)[rows]
            if np.any((bits & 0x7F) == 0x7F):
                raise K2ConvError(f"{self.where(name)}: contains NaN (FP8 code 0x7F/0xFF)")
            sinv_name = f"{base}.weight_scale_inv"
            stop = rows.stop if rows.stop is not None else w.shape[0]
            sinv = np.asarray(self.raw(sinv_name)[rows.start // br : -(-stop // br)], dtype=np.float32)
            if not np.all(np.isfinite(sinv)):
                raise K2ConvError(f"{self.where(sinv_name)}: contains NaN or Inf")
            out = dequant_fp8_block(bits, sinv, (br, bc))
        else:  # pragma: no cover - hf_layout only produces the three kinds
            raise AssertionError(w.storage)
        if w.storage != INT4 and not (finite if finite is not None else np.all(np.isfinite(out))):
            raise K2ConvError(f"{self.where(name)}: contains NaN or Inf")
        return np.ascontiguousarray(out, dtype=np.float32)

    def release(self, w: LogicalWeight) -> None:
        """Let go of the mapped pages of one weight once its output bytes are written."""
        for st in stored_tensors(self.config, w):
            shard = self.weight_map.get(st.name)
            if shard is not None:
                self.files[shard].release(st.name)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a stored tensor to float32 (exact for BF16/F16/F32)."""
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    if dtype == "F8_E4M3":
        return e4m3_bits_to_f32(raw)
    return raw.astype(np.float32)


def _dtype_compatible(expected: str, actual: str) -> bool:
    """Plain float weights may come as BF16, F16 or F32 (other tools write other dtypes)."""
    floats = {"BF16", "F16", "F32"}
    if expected in floats:
        return actual in floats
    if expected == "I32":
        return actual in {"I32", "I64"}
    return expected == actual


def _check_finite_scales(scales: np.ndarray, is_bf16_bits: bool, where: str) -> None:
    if is_bf16_bits:
        bad = (scales & 0x7F80) == 0x7F80  # exponent all ones: Inf or NaN
    else:
        bad = ~np.isfinite(scales)
    if np.any(bad):
        raise K2ConvError(f"{where}: contains NaN or Inf")
