"""The plan: every output tensor's name, shape, type, source, byte size, file and offset.

It is a pure function of the config, the recipe and the tokenizer metadata, computed before any
weight is read. `--dry-run` prints it; the writer fills it in; workers write at its offsets; a
resumed run trusts it. Headers are serialized here with gguf's GGUFWriter, so the exact file sizes
are known up front. Each header reserves fixed-width slots for the per-tensor checksums
(convert/integrity.py), filled in by the writer once every byte exists; the header checksum is
known here already.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGUF_MAGIC, GGUF_VERSION
from gguf.gguf_writer import GGUFValue, WriterState

from k2conv.convert.config import ModelConfig
from k2conv.convert.gguf_meta import ARCH
from k2conv.convert.hf_layout import LogicalWeight, logical_weights
from k2conv.convert.integrity import ALGORITHM, KEY_ALGORITHM, KEY_HEADER, KEY_TENSORS, header_checksum
from k2conv.convert.naming import expert_of, experts_name, gguf_name
from k2conv.quant.recipe import Recipe, Rule, assign_types, check_all_rules_used
from k2conv.quant.types import file_type_of, tensor_bytes

ALIGNMENT = 32  # GGUF default (general.alignment absent)

# How an output tensor is built from source weights.
WEIGHT = "weight"  # one logical weight, as is
K_B = "k_b"  # kv_b_proj → per-head k_nope part, transposed: (n_head, kv_lora, nope)
V_B = "v_b"  # kv_b_proj → per-head v part: (n_head, v, kv_lora)
EXPERTS = "experts"  # routed experts stacked: (n_expert, rows, cols)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order; ggml ne is the reverse
    qtype: GGMLQuantizationType
    kind: str
    sources: tuple[LogicalWeight, ...]
    nbytes: int

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclass
class PlannedFile:
    path: Path
    header: bytes  # checksum slots of the tensors hold zeros until `header_with` fills them
    tensors: list[PlannedTensor]
    offsets: list[int]  # from the start of the file
    checksums_at: int = -1  # offset in `header` of the UINT32 tensor-checksum array values (-1: none)

    @property
    def data_start(self) -> int:
        return pad(len(self.header))

    def header_with(self, crcs: Sequence[int]) -> bytes:
        """The header with the tensors' CRC-32s (file order) in their reserved slots: same length."""
        if self.checksums_at < 0:
            return self.header
        if len(crcs) != len(self.tensors):  # pragma: no cover - a writer bug
            raise AssertionError(f"{self.path}: {len(crcs)} checksums for {len(self.tensors)} tensors")
        values = struct.pack(f"<{len(crcs)}I", *crcs)
        return self.header[: self.checksums_at] + values + self.header[self.checksums_at + len(values) :]

    @property
    def size(self) -> int:
        return self.data_start + sum(pad(t.nbytes) for t in self.tensors)


@dataclass
class Plan:
    config: ModelConfig
    recipe: str
    files: list[PlannedFile]
    header_exact: bool = True  # False when tokenizer metadata was not available (bare config)
    notes: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for f in self.files for t in f.tensors]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def locate(self) -> dict[str, tuple[int, int]]:
        """tensor name → (file index, absolute offset in that file)."""
        return {t.name: (i, off) for i, f in enumerate(self.files) for t, off in zip(f.tensors, f.offsets)}


def pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def serialize_headers(writer: GGUFWriter) -> list[bytes]:
    """The header (magic, KV, tensor infos) of each file a GGUFWriter with tensor infos would write,
    produced in memory: gguf's own serialization, so planned sizes equal written ones."""
    buffers = [io.BytesIO() for _ in writer.tensors]
    writer.fout = buffers  # type: ignore[assignment]
    writer.state = WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.fout = None
    writer.state = WriterState.NO_FILE
    return [b.getvalue() for b in buffers]


def serialize_checksummed_headers(writer: GGUFWriter) -> list[tuple[bytes, int]]:
    """Like `serialize_headers`, with k2conv's checksum KVs appended to every file's KV section:
    (header, offset of the tensor-checksum array's values) per file.

    The keys go last so their place is simple arithmetic; the tensor values are zeros (the writer
    patches them), the header checksum is computed here over the header with both values zeroed.
    GGUFWriter.write_header_to_file insists on one KV set (it adds the split keys itself), so the
    24-byte fixed header is written here, with the split keys added the way it would add them.
    """
    buffers = [io.BytesIO() for _ in writer.tensors]
    writer.fout = buffers  # type: ignore[assignment]
    writer.add_shard_kv_data()  # split.no / split.count / split.tensors.count, one KV set per file
    for kv, tensors in zip(writer.kv_data, writer.tensors):
        kv[KEY_ALGORITHM] = GGUFValue(ALGORITHM, GGUFValueType.STRING)
        kv[KEY_HEADER] = GGUFValue(0, GGUFValueType.UINT32)
        kv[KEY_TENSORS] = GGUFValue([0] * len(tensors), GGUFValueType.ARRAY, GGUFValueType.UINT32)
    for fout, tensors, kv in zip(buffers, writer.tensors, writer.kv_data):
        fout.write(struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kv)))
    writer.state = WriterState.HEADER
    writer.write_kv_data_to_file()
    kv_ends = [b.tell() for b in buffers]
    writer.write_ti_data_to_file()
    writer.fout = None
    writer.state = WriterState.NO_FILE
    out = []
    key = KEY_TENSORS.encode()
    for buf, kv_end, tensors in zip(buffers, kv_ends, writer.tensors):
        header = bytearray(buf.getvalue())
        values_at = kv_end - 4 * len(tensors)
        entry_at = values_at - 16 - 8 - len(key)  # key length, key, ARRAY, UINT32, count
        head_at = entry_at - 4  # the UINT32 value of KEY_HEADER just before
        assert header[entry_at + 8 : entry_at + 8 + len(key)] == key, "checksum slots not where expected"
        assert struct.unpack_from("<IIQ", header, values_at - 16) == (GGUFValueType.ARRAY, GGUFValueType.UINT32, len(tensors))
        data_start = pad(len(header))
        crc = header_checksum(header, data_start, [(head_at, 4), (values_at, 4 * len(tensors))])
        header[head_at : head_at + 4] = struct.pack("<I", crc)
        out.append((bytes(header), values_at))
    return out


Layout = list[tuple[str, tuple[int, ...], str, tuple[LogicalWeight, ...]]]
_LAYOUTS: dict[str, Layout] = {}


def plan_layout(cfg: ModelConfig) -> Layout:
    """(GGUF name, numpy shape, kind, source weights) of every output tensor, in file order.

    Depends on the config alone, so it is computed once per config (inspect plans ~20 recipes of a
    70k-weight model).
    """
    key = repr(cfg)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    layout: Layout = []
    weights = logical_weights(cfg)
    where = [expert_of(w.module) for w in weights]
    experts: dict[tuple[int, str], list[LogicalWeight]] = {}
    for w, ex in zip(weights, where):
        if ex is not None:
            experts.setdefault((ex[0], ex[2]), []).append(w)
    for w, ex in zip(weights, where):
        if ex is not None:
            layer, _, proj = ex
            group = experts[(layer, proj)]
            if w is group[0]:
                layout.append((experts_name(layer, proj), (len(group), *w.shape), EXPERTS, tuple(group)))
        elif w.module.endswith("self_attn.kv_b_proj"):
            nh = cfg.num_attention_heads
            layer = w.module.split(".")[2]  # model.layers.N.self_attn.kv_b_proj
            layout.append((f"blk.{layer}.attn_k_b.weight", (nh, cfg.kv_lora_rank, cfg.qk_nope_head_dim), K_B, (w,)))
            layout.append((f"blk.{layer}.attn_v_b.weight", (nh, cfg.v_head_dim, cfg.kv_lora_rank), V_B, (w,)))
        else:
            layout.append((gguf_name(w.module, w.suffix), w.shape, WEIGHT, (w,)))
    _LAYOUTS[key] = layout
    return layout


def plan_tensors(cfg: ModelConfig, recipe: Recipe, overrides: list[Rule], has_imatrix: bool = False) -> list[PlannedTensor]:
    """Output tensors in file order, each with its type chosen by the recipe."""
    layout = plan_layout(cfg)
    types = assign_types([(n, s) for n, s, _, _ in layout], recipe, overrides, cfg, has_imatrix)
    check_all_rules_used(recipe, overrides)
    return [
        PlannedTensor(name, shape, qtype, kind, sources, tensor_bytes(qtype, shape))
        for (name, shape, kind, sources), qtype in zip(layout, types)
    ]


def build_plan(
    cfg: ModelConfig,
    tensors: list[PlannedTensor],
    out_path: Path,
    add_metadata: Callable[[GGUFWriter, int], None],
    *,
    recipe_name: str,
    split_max_size: int = 0,
    header_exact: bool = True,
    file_type: int | None = None,
) -> Plan:
    """Assign tensors to files (gguf-split rules) and serialize each file's header.

    `add_metadata(writer, file_type)` adds every KV pair of the first file.
    """
    writer = GGUFWriter(path=None, arch=ARCH, split_max_size=split_max_size)
    counts: dict[GGMLQuantizationType, int] = {}
    for t in tensors:
        counts[t.qtype] = counts.get(t.qtype, 0) + t.nbytes
    add_metadata(writer, file_type if file_type is not None else file_type_of(counts))
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    headers = serialize_checksummed_headers(writer)
    paths = writer.format_shard_names(Path(out_path))
    by_name = {t.name: t for t in tensors}
    files = []
    for path, (header, checksums_at), infos in zip(paths, headers, writer.tensors):
        ftensors = [by_name[name] for name in infos]
        offsets, pos = [], pad(len(header))
        for t in ftensors:
            offsets.append(pos)
            pos += pad(t.nbytes)
        files.append(PlannedFile(path, header, ftensors, offsets, checksums_at))
    return Plan(cfg, recipe_name, files, header_exact=header_exact)
