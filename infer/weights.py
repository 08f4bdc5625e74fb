"""Weight sources for the runner: GGUF files (ours or any llama.cpp deepseek2 conversion) and the HF checkpoint.

All of them are memory-mapped, and all answer in one vocabulary: llama.cpp's GGUF tensor names
(`blk.3.attn_q_a.weight`, `token_embd.weight`, …) with numpy shapes, i.e. the MLA value/key
up-projection already split into `attn_k_b` (n_head, kv_lora, nope) and `attn_v_b` (n_head, v, kv_lora).

- Non-expert weights: `tensor(name)` → float32 on the requested device; the model keeps them resident.
- Token embeddings: `embed(ids)` dequantizes only the rows asked for (163840 × 7168 need not be expanded).
- Routed experts: `expert(layer, e, proj)` reads one expert's slice of the merged `_exps` tensor (GGUF) or
  its own tensors (HF) on demand, so an expert cache can wrap a source later. `expert_raw` hands out the
  still-quantized bytes for such a cache; `stats` counts what was read.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.config import ModelConfig
from k2conv.convert.hf_layout import LogicalWeight, stored_tensors
from k2conv.convert.naming import expert_of, experts_name, gguf_name
from k2conv.errors import K2ConvError
from k2conv.gguf_scan import GGUFLayout, TensorInfo, scan_file
from k2conv.infer.dequant import dequantize
from k2conv.infer.direct_io import pread_into
from k2conv.infer.gguf_config import config_from_gguf
from k2conv.infer.qmatmul import PackedMatrix, pack, packable

PROJS = ("gate", "up", "down")
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass
class ReadStats:
    """What the runner pulled from the files: the raw material of bytes-per-token reports."""

    expert_reads: int = 0
    expert_bytes: int = 0
    resident_bytes: int = 0
    per_layer_expert_use: dict[int, dict[int, int]] = field(default_factory=dict)

    def count_expert(self, layer: int, e: int, nbytes: int) -> None:
        self.expert_reads += 1
        self.expert_bytes += nbytes
        use = self.per_layer_expert_use.setdefault(layer, {})
        use[e] = use.get(e, 0) + 1


@dataclass(frozen=True)
class ExpertRecord:
    """One routed expert's three matrices as raw bytes in one buffer, the unit the expert cache moves.

    `parts[proj]` = (offset in data, nbytes, type, logical (rows, cols)). `reads` is how many file reads
    it took (GGUF: 3 slices of the merged tensors; relayout: 1 record). `borrowed`: data is a view into a
    reusable I/O buffer (direct I/O), valid only until the source's next read, so keepers must copy.
    """

    data: np.ndarray  # uint8, 1-D
    parts: dict[str, tuple[int, int, GGMLQuantizationType, tuple[int, int]]]
    reads: int
    borrowed: bool


def _pad64(n: int) -> int:
    """Part offsets inside a staged record are 64-aligned, so F32/F16 parts can be viewed in place."""
    return (n + 63) & ~63


@dataclass(frozen=True)
class RawExpert:
    """One expert matrix still in its file encoding (GGML blocks), for caches that hold bytes."""

    data: np.ndarray  # uint8 (rows, row_bytes), a view into the mapped file
    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # logical (rows, cols)


class WeightSource(ABC):
    """A model's weights by GGUF tensor name, read through mmap."""

    config: ModelConfig
    stats: ReadStats
    notes: list[str]

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether the (non-expert) tensor exists, e.g. `output.weight` is absent when embeddings are tied."""

    @abstractmethod
    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """A non-expert weight as float32 in numpy/HF shape ([out, in] for linears)."""

    def matrix(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor | PackedMatrix:
        """A linear layer's weight [out, in] for `linear` (infer/qmatmul.py): float32 here; GGUF sources
        keep quantized types packed on the CPU."""
        return self.tensor(name, device)

    @abstractmethod
    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Embedding rows for token ids (1-D) as float32 [len(ids), hidden]."""

    @abstractmethod
    def expert(self, layer: int, e: int, proj: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Routed expert `e` of `layer`, projection gate/up ([inter, hidden]) or down ([hidden, inter])."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release mapped files (sources hold no other resources)."""


class FloatMatrices:
    """A source whose `matrix` is its float32 `tensor`: for code that watches torch's own matmuls
    (imatrix collection hooks them), which packed weights would bypass."""

    def __init__(self, src: WeightSource):
        self._src = src

    def __getattr__(self, name: str) -> object:
        return getattr(self._src, name)

    def matrix(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._src.tensor(name, device)


# ---- GGUF ------------------------------------------------------------------------------------------


def split_paths(path: Path) -> list[Path]:
    """All shards of a gguf-split set given any one of them (or just [path])."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    absent = [p.name for p in paths if not p.exists()]
    if absent:
        raise K2ConvError(f"{path}: split set is incomplete, missing {', '.join(absent)}")
    return paths


@dataclass(frozen=True)
class MappedTensor:
    """One tensor of an open GGUF: where it lives and its bytes, a read-only view of the file's map shaped
    (*shape[:-1], bytes per row), so a row or an expert is an index whatever the type."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (ggml's ne reversed)
    offset: int  # absolute, in its file
    nbytes: int
    raw: np.ndarray  # uint8

    @classmethod
    def of(cls, header: GGUFLayout, t: TensorInfo) -> MappedTensor:
        return cls(t.name, t.qtype, tuple(reversed(t.ne)), t.offset, t.nbytes, header.tensor_bytes(t))


class GGUFSource(WeightSource):
    """One GGUF or a gguf-split set, memory-mapped; dequantized with torch.

    Headers are read by gguf_scan, not gguf.GGUFReader: the scan bounds-checks a file it did not write, and
    opens K2's (160k-token tokenizer, ~1,100 tensors) in a fraction of a second where GGUFReader, building
    numpy views per string, takes ~20 s and ~0.6 GiB."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.headers = [scan_file(p) for p in split_paths(self.path)]
        self.tensors = {t.name: MappedTensor.of(h, t) for h in self.headers for t in h.tensors}
        shapes = {n: t.shape for n, t in self.tensors.items()}
        self.shapes = shapes
        parsed = config_from_gguf(self.headers[0], shapes, str(self.path))
        self.config = parsed.config
        self.notes = [f"{k} absent: llama.cpp's default used" for k in parsed.missing]
        self.stats = ReadStats()
        self._kv_b_split = "blk.0.attn_k_b.weight" not in self.tensors and "blk.0.attn_kv_b.weight" in self.tensors
        if self._kv_b_split:
            self.notes.append("attn_kv_b (pre-split MLA) found: k_b/v_b derived from it")

    def _raw(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
        t = self.tensors.get(name)
        if t is None:
            raise K2ConvError(f"{self.path}: tensor {name} is missing")
        return t.raw, t.qtype

    def _load(self, raw: np.ndarray, qtype: GGMLQuantizationType, device: torch.device | str) -> torch.Tensor:
        """Copy mapped bytes to the device, then dequantize there."""
        data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)).to(device)
        return dequantize(data, qtype)

    def has(self, name: str) -> bool:
        if self._kv_b_split and name.endswith((".attn_k_b.weight", ".attn_v_b.weight")):
            return self.has(re.sub(r"attn_[kv]_b", "attn_kv_b", name))
        return name in self.tensors

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if self._kv_b_split and name.endswith((".attn_k_b.weight", ".attn_v_b.weight")):
            return self._split_kv_b(name, device)
        raw, qtype = self._raw(name)
        out = self._load(raw, qtype, device).reshape(self.shapes[name])
        self.stats.resident_bytes += raw.nbytes
        return out

    def matrix(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor | PackedMatrix:
        t = self.tensors.get(name)
        if t is None or torch.device(device).type != "cpu" or not packable(t.qtype) or len(self.shapes[name]) != 2:
            return self.tensor(name, device)
        self.stats.resident_bytes += t.raw.nbytes
        return pack(t.raw, t.qtype, self.shapes[name])  # type: ignore[arg-type]

    def _split_kv_b(self, name: str, device: torch.device | str) -> torch.Tensor:
        cfg = self.config
        kv_b = self.tensor(re.sub(r"attn_[kv]_b", "attn_kv_b", name), device)
        kv_b = kv_b.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        if ".attn_k_b." in name:
            return kv_b[:, : cfg.qk_nope_head_dim].transpose(1, 2).contiguous()
        return kv_b[:, cfg.qk_nope_head_dim :].contiguous()

    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        raw, qtype = self._raw("token_embd.weight")
        rows = raw[ids.cpu().numpy()]  # fancy indexing copies just these rows out of the map
        return dequantize(torch.from_numpy(rows).to(device), qtype)

    def _experts_tensor(self, layer: int, proj: str, e: int) -> tuple[MappedTensor, int, int, int]:
        """The merged `_exps` tensor holding expert `e`'s `proj`, with (n_expert, rows, cols)."""
        name = experts_name(layer, proj)
        t = self.tensors.get(name)
        if t is None:
            raise K2ConvError(f"{self.path}: tensor {name} is missing")
        n_expert, rows, cols = self.shapes[name]
        if not 0 <= e < n_expert:
            raise IndexError(f"{name}: expert {e} of {n_expert}")
        return t, n_expert, rows, cols

    def expert_raw(self, layer: int, e: int, proj: str) -> RawExpert:
        t, _, rows, cols = self._experts_tensor(layer, proj, e)
        return RawExpert(t.raw[e], t.qtype, (rows, cols))

    def expert(self, layer: int, e: int, proj: str, device: torch.device | str = "cpu") -> torch.Tensor:
        raw = self.expert_raw(layer, e, proj)
        self.stats.count_expert(layer, e, raw.data.nbytes)
        return self._load(raw.data, raw.qtype, device)

    # ---- expert records for infer/expert_cache.py, through mmap or O_DIRECT ----

    io = "mmap"
    _staging = None  # reusable host buffer records are read into (direct mode, or mmap mode for a GPU)

    def set_io(self, mode: str, pin: bool | None = None) -> list[str]:
        """How expert records are read: `mmap` (copied out of the page cache) or `direct` (O_DIRECT
        into reusable aligned buffers, pinned when CUDA is there: infer/direct_io.py). Returns notes
        (e.g. the filesystem refused O_DIRECT and plain reads are used).

        With `pin` the mmap mode also copies into one reusable pinned buffer: the copy to the GPU is then
        a DMA at the bus's speed, where a copy from fresh pageable memory costs page faults plus the
        driver's own staging (measured on an H200: 3.6 GB/s per miss against 6+ GB/s pinned)."""
        from k2conv.infer.direct_io import AlignedBuffer, DirectReader

        if mode not in ("mmap", "direct"):
            raise K2ConvError(f"{self.path}: io mode {mode!r} is not mmap or direct")
        self.close_io()
        self.io = mode
        if mode == "mmap":
            self._staging = AlignedBuffer(True) if pin else None
            return []
        paths = split_paths(self.path) if len(self.headers) > 1 else [self.path]
        self._direct = {p: DirectReader(p, pin) for p in paths}
        self._file_of = {t.name: p for h, p in zip(self.headers, paths) for t in h.tensors}
        self._staging = AlignedBuffer(pin)
        return [r.note for r in self._direct.values() if r.note]

    def close_io(self) -> None:
        for r in getattr(self, "_direct", {}).values():
            r.close()
        self._direct = {}

    def _read_at(self, name: str, offset: int, size: int) -> np.ndarray:
        """Bytes of the file holding tensor `name` (direct mode): a view valid until the next read."""
        return self._direct[self._file_of[name]].read(offset, size)

    def expert_record(self, layer: int, e: int) -> ExpertRecord:
        """Expert `e` of `layer`: its slices of the three merged `_exps` tensors, three reads."""
        parts, pieces, at = {}, [], 0
        for proj in PROJS:
            t, n_expert, rows, cols = self._experts_tensor(layer, proj, e)
            per = t.nbytes // n_expert
            parts[proj] = (at, per, t.qtype, (rows, cols))
            pieces.append((t, n_expert, per))
            at = _pad64(at + per)
        staged = self._staging is not None
        out = self._staging.get(at) if staged else np.empty(at, dtype=np.uint8)
        for (off, per, _, _), (t, n_expert, _) in zip(parts.values(), pieces):
            if self.io == "direct":
                out[off : off + per] = self._read_at(t.name, t.offset + e * per, per)
            else:
                out[off : off + per] = t.raw.reshape(n_expert, -1)[e]
        for _, per, _, _ in parts.values():
            self.stats.count_expert(layer, e, per)
        return ExpertRecord(out, parts, reads=len(parts), borrowed=staged)

    def close(self) -> None:
        """Drop the maps; numpy unmaps when the last view (e.g. a RawExpert someone kept) goes."""
        self.close_io()
        self.headers = []
        self.tensors = {}


# ---- expert-record relayout (layouts/relayout.py) -------------------------------------------------------


class RelayoutSource(GGUFSource):
    """A `k2conv relayout` file: non-expert tensors as in any GGUF, each expert one aligned record.

    An expert miss is one pread of the whole record (gate, up and down together); the last record read
    is kept, so the three projections the MoE asks for in a row cost that single read. `record_reads`
    counts the reads, for the one-read-per-expert claim and bytes-per-token reports. In a compressed
    file (`relayout --compress zstd`) the read fetches the record's zstd frame, decompressed here.
    """

    def __init__(self, path: Path | str):
        from k2conv.layouts.relayout import read_layout

        self.path = Path(path)
        header = scan_file(self.path)
        self.headers = [header]
        self.layout = read_layout(header, self.path)
        self.tensors = {t.name: MappedTensor.of(header, t) for t in header.tensors
                        if not t.name.startswith("k2conv.") and ".exp." not in t.name}
        shapes = {n: t.shape for n, t in self.tensors.items()}
        self._parts: dict[tuple[int, str], dict] = {}
        for layer in self.layout.layers:
            for part in self.layout.parts(layer):
                shapes[part["name"]] = tuple(reversed(part["ne"]))
                self._parts[(layer, part["proj"])] = part
        self.shapes = shapes
        parsed = config_from_gguf(header, shapes, str(self.path))
        self.config = parsed.config
        self.notes = [f"{k} absent: llama.cpp's default used" for k in parsed.missing]
        self.stats = ReadStats()
        self._kv_b_split = "blk.0.attn_k_b.weight" not in self.tensors and "blk.0.attn_kv_b.weight" in self.tensors
        self._fd = os.open(self.path, os.O_RDONLY)
        self._last: tuple[tuple[int, int], np.ndarray] | None = None
        self.record_reads = 0

    def record(self, layer: int, e: int) -> np.ndarray:
        """The whole record of (layer, e) as uint8, read with one pread unless it is the last one read."""
        if self._last is not None and self._last[0] == (layer, e):
            return self._last[1]
        offset, size = self.layout.record(layer, e)  # size: the bytes stored (a zstd frame if compressed)
        data = self._read_span(offset, size, (layer, e))
        if self.layout.compression is not None:  # still one read; the frame's own checksum is checked
            data = np.frombuffer(self.layout.decode(layer, e, data), dtype=np.uint8)
        self.record_reads += 1
        self._last = ((layer, e), data)
        return data

    def _read_span(self, offset: int, size: int, what: tuple[int, int]) -> np.ndarray:
        """The io-mode hook: one pread into fresh memory (mmap mode), or one O_DIRECT read into the
        reusable buffer (direct mode; the view is valid until the next read, like `_last`)."""
        if self.io == "direct":
            return self._direct[self.path].read(offset, size)
        buf = np.empty(size, dtype=np.uint8) if self._staging is None else self._staging.get(size)
        if pread_into(self._fd, buf, offset) < size:
            raise K2ConvError(f"{self.path}: record {what} cut short (file too small)")
        return buf

    def set_io(self, mode: str, pin: bool | None = None) -> list[str]:
        self._last = None  # a borrowed view must not outlive a mode switch
        return super().set_io(mode, pin)

    def expert_record(self, layer: int, e: int) -> ExpertRecord:
        """Expert `e` of `layer`: its whole record, one read (none if it is the record read last)."""
        parts = {}
        for proj in PROJS:
            part = self._parts.get((layer, proj))
            if part is None:
                raise K2ConvError(f"{self.path}: no expert records for layer {layer}")
            cols, rows, _ = part["ne"]
            parts[proj] = (int(part["offset"]), int(part["nbytes"]), GGMLQuantizationType(part["type"]), (rows, cols))
        before = self.record_reads
        data = self.record(layer, e)
        for _, n, _, _ in parts.values():
            self.stats.count_expert(layer, e, n)
        borrowed = self._staging is not None and self.layout.compression is None
        return ExpertRecord(data, parts, reads=self.record_reads - before, borrowed=borrowed)

    def expert_raw(self, layer: int, e: int, proj: str) -> RawExpert:
        part = self._parts.get((layer, proj))
        if part is None:
            raise K2ConvError(f"{self.path}: no expert records for layer {layer}")
        cols, rows, _ = part["ne"]
        data = self.record(layer, e)[part["offset"] : part["offset"] + part["nbytes"]].reshape(rows, -1)
        return RawExpert(data, GGMLQuantizationType(part["type"]), (rows, cols))

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._last = None
        super().close()


# ---- Hugging Face checkpoint --------------------------------------------------------------------


class HFSource(WeightSource):
    """The source checkpoint (INT4 / FP8 / BF16 safetensors), decoded by k2conv's Checkpoint to float32."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.ckpt = Checkpoint(self.path)
        self.config = self.ckpt.config
        self.stats = ReadStats()
        self.notes: list[str] = []
        self._by_name: dict[str, LogicalWeight] = {}
        self._experts: dict[tuple[int, int, str], LogicalWeight] = {}
        for w in self.ckpt.weights:
            ex = expert_of(w.module)
            if ex is not None:
                self._experts[ex] = w
            elif w.module.endswith("self_attn.kv_b_proj"):
                layer = w.module.split(".")[2]
                self._by_name[f"blk.{layer}.attn_k_b.weight"] = w
                self._by_name[f"blk.{layer}.attn_v_b.weight"] = w
            else:
                self._by_name[gguf_name(w.module, w.suffix)] = w

    def _stored_bytes(self, w: LogicalWeight) -> int:
        total = 0
        for st in stored_tensors(self.config, w):
            entry = self.ckpt.entry(st.name)
            total += int(np.prod(entry.shape)) * _DTYPE_BYTES.get(entry.dtype, 4)
        return total

    def has(self, name: str) -> bool:
        return name in self._by_name

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        w = self._by_name.get(name)
        if w is None:
            raise K2ConvError(f"{self.path}: no weight maps to {name}")
        arr = self.ckpt.read(w)
        if ".attn_v_b." not in name:  # k_b and v_b share kv_b's bytes: count them once
            self.stats.resident_bytes += self._stored_bytes(w)
        cfg = self.config
        if w.module.endswith("self_attn.kv_b_proj"):
            kv_b = arr.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            arr = kv_b[:, : cfg.qk_nope_head_dim].transpose(0, 2, 1) if ".attn_k_b." in name else kv_b[:, cfg.qk_nope_head_dim :]
            arr = np.ascontiguousarray(arr)
        return torch.from_numpy(arr).to(device)

    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        w = self._by_name["token_embd.weight"]
        rows = [self.ckpt.read(w, slice(i, i + 1)) for i in ids.tolist()]
        return torch.from_numpy(np.concatenate(rows, axis=0)).to(device)

    def expert(self, layer: int, e: int, proj: str, device: torch.device | str = "cpu") -> torch.Tensor:
        w = self._experts.get((layer, e, proj))
        if w is None:
            raise K2ConvError(f"{self.path}: no expert {e} ({proj}) in layer {layer}")
        self.stats.count_expert(layer, e, self._stored_bytes(w))
        return torch.from_numpy(self.ckpt.read(w)).to(device)

    def close(self) -> None:
        self.ckpt.close()


_DTYPE_BYTES = {"F32": 4, "I32": 4, "I64": 8, "BF16": 2, "F16": 2, "F8_E4M3": 1}


def open_weights(path: Path | str) -> WeightSource:
    """A checkpoint folder (config.json + safetensors) or a .gguf file (any shard of a split set)."""
    p = Path(path)
    if p.is_dir():
        return HFSource(p)
    if p.suffix == ".gguf" and p.exists():
        from k2conv.layouts.relayout import is_relayout

        return RelayoutSource(p) if is_relayout(p) else GGUFSource(p)
    raise K2ConvError(f"{p}: neither a checkpoint folder nor a .gguf file")
