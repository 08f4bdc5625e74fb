"""Expert-major relayout of llama.cpp GGUF files, and its exact inverse.

In llama.cpp's layout one routed expert of one layer is three slices of three merged `_exps` tensors,
gigabytes apart. A relayout file keeps the GGUF container (gguf's reader and dump tools open it) but
replaces every layer's three `_exps` tensors by one I8 tensor per expert, `blk.N.exp.E`, holding that
expert's gate, up and down bytes back to back (types unchanged), so an expert miss is one read. Every
tensor starts on a multiple of `general.alignment`, set to the record alignment. docs/layout.md has the
format and the reasons behind it.

The original file(s) are restorable byte for byte: each input's header is kept verbatim as an I8 tensor,
with its tensors' offsets and any non-zero gap bytes, so `restore` rewrites exactly what was read, for a
split set as for one file, whoever wrote it.

Writing streams: every unit (one tensor, or one record) is read with a few large preads and written with
one pwrite per chunk at its planned offset into `<out>.part`; a journal of finished units (CRC-32 each)
makes a killed run resume, and the file is fsynced and renamed only when complete.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGUF_MAGIC

from k2conv.atomic import commit, temp_path
from k2conv.convert.journal import Journal, input_identity, load_journal, plan_hash
from k2conv.errors import K2ConvError

LAYOUT_VERSION = 1
KIND = "expert-records"
DEFAULT_ALIGN = 4096  # docs/layout.md: 2 MiB wastes ~150x more for no gain on 4 KiB-page reads
CHUNK = 64 << 20  # bounded memory: the most any single read or write holds

KEY_VERSION = "k2conv.layout.version"  # UINT32; the first KV of every relayout file (cheap detection)
KEY_KIND = "k2conv.layout.kind"  # STRING "expert-records"
KEY_ALIGN = "k2conv.layout.align"  # UINT64, equal to general.alignment
KEY_N_EXPERT = "k2conv.layout.n_expert"  # UINT32
KEY_LAYERS = "k2conv.layout.layers"  # ARRAY[UINT32]: the relaid layers, ascending
KEY_RECORD_BYTES = "k2conv.layout.record_bytes"  # ARRAY[UINT64]: record size per relaid layer
KEY_OFFSETS = "k2conv.layout.record_offsets"  # ARRAY[UINT64]: [i * n_expert + e] → absolute offset
KEY_INDEX = "k2conv.layout.index"  # STRING, JSON: parts of each record, restore data (see docs)

PROJS = ("gate", "up", "down")
_EXPS_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_DROP_KEYS = ("general.alignment", "split.no", "split.count", "split.tensors.count")


def record_name(layer: int, e: int) -> str:
    return f"blk.{layer}.exp.{e}"


def header_name(k: int) -> str:
    return f"k2conv.orig.{k}.header"


def gaps_name(k: int) -> str:
    return f"k2conv.orig.{k}.gaps"


def pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# ---- GGUF serialization (the few value types we write) --------------------------------------------------


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _str(key) + struct.pack("<II", GGUFValueType.UINT32, v)


def _kv_u64(key: str, v: int) -> bytes:
    return _str(key) + struct.pack("<IQ", GGUFValueType.UINT64, v)


def _kv_str(key: str, v: str) -> bytes:
    return _str(key) + struct.pack("<I", GGUFValueType.STRING) + _str(v)


def _kv_arr(key: str, vtype: GGUFValueType, values: list[int]) -> bytes:
    fmt = {GGUFValueType.UINT32: "I", GGUFValueType.UINT64: "Q"}[vtype]
    return _str(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, vtype, len(values)) + struct.pack(f"<{len(values)}{fmt}", *values)


def _tensor_info(name: str, ne: tuple[int, ...], qtype: int, rel_offset: int) -> bytes:
    return _str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, rel_offset)


# ---- the plan ------------------------------------------------------------------------------------------


@dataclass
class Src:
    """A byte range of one input file."""

    file: int
    offset: int
    nbytes: int


@dataclass
class Unit:
    """One output tensor: its name, GGUF type and ne, and where its bytes come from (concatenated)."""

    name: str
    qtype: int
    ne: tuple[int, ...]
    sources: list[Src] = field(default_factory=list)
    blob: bytes | None = None  # bytes held in memory instead (original headers, gap bytes)
    offset: int = 0  # absolute, in the output

    @property
    def nbytes(self) -> int:
        return len(self.blob) if self.blob is not None else sum(s.nbytes for s in self.sources)


@dataclass
class RelayoutReport:
    """What a relayout did (or, for a dry run, would do)."""

    out: Path
    align: int
    order: str
    size: int
    input_size: int
    records: int
    record_layers: int
    waste: int  # padding bytes in the output data section
    input_waste: int  # padding/gap bytes in the inputs' data sections
    resumed_units: int = 0
    written_units: int = 0
    dry_run: bool = False

    def lines(self) -> list[str]:
        return [
            f"{self.out}: {self.records} records in {self.record_layers} layers, align {self.align}, order {self.order}",
            f"size {self.size:,} B (inputs {self.input_size:,} B); padding {self.waste:,} B (inputs {self.input_waste:,} B)",
        ] + ([f"resumed {self.resumed_units} units, wrote {self.written_units}"] if not self.dry_run else ["dry run: nothing written"])


def _header_end(reader: GGUFReader) -> int:
    """End of the KV pairs and tensor infos: where the original header bytes stop."""
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    return max(f.offset + sum(int(p.nbytes) for p in f.parts) for f in fields)


def load_stats(path: Path) -> dict[int, dict[int, int]]:
    """Routing statistics: `{"version": 1, "layers": {"LAYER": {"EXPERT": count, ...} | [count, ...]}}`.

    The runner writes its `ReadStats.per_layer_expert_use` in this shape; a per-layer list indexed by
    expert is accepted too.
    """
    try:
        data = json.loads(path.read_text())
        out: dict[int, dict[int, int]] = {}
        for layer, use in data["layers"].items():
            items = enumerate(use) if isinstance(use, list) else ((int(k), v) for k, v in use.items())
            out[int(layer)] = {int(e): int(c) for e, c in items}
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise K2ConvError(f"{path}: not a routing statistics file ({exc})") from None


def _plan(inputs: list[Path], align: int, order: str, stats: dict[int, dict[int, int]] | None
          ) -> tuple[bytes, list[Unit], dict, int]:
    """(header, units in file order with offsets, index, total size) of the relayout of `inputs`."""
    if align < 32 or align & (align - 1):
        raise K2ConvError(f"--align {align}: must be a power of two, at least 32")
    readers = []
    for p in inputs:
        try:
            readers.append(GGUFReader(p, "r"))
        except (ValueError, KeyError, OSError) as exc:
            raise K2ConvError(f"{p}: not a readable GGUF ({exc})") from None
    if readers[0].fields.get(KEY_VERSION) is not None:
        raise K2ConvError(f"{inputs[0]}: already a relayout file (use restore)")
    exps: dict[int, dict[str, tuple[int, object]]] = {}
    for k, r in enumerate(readers):
        for t in r.tensors:
            m = _EXPS_RE.match(t.name)
            if m:
                exps.setdefault(int(m.group(1)), {})[m.group(2)] = (k, t)
    layers = sorted(layer for layer, d in exps.items() if len(d) == 3)
    n_expert = 0
    layer_info: dict[str, dict] = {}
    for layer in layers:
        parts, off = [], 0
        for proj in PROJS:
            _, t = exps[layer][proj]
            ne = [int(x) for x in t.shape]
            if len(ne) != 3 or n_expert not in (0, ne[2]):
                raise K2ConvError(f"{t.name}: expected (cols, rows, {n_expert or 'n_expert'}) experts, got ne={ne}")
            n_expert = ne[2]
            if t.n_bytes % n_expert:
                raise K2ConvError(f"{t.name}: {t.n_bytes} bytes do not split into {n_expert} experts")
            per = t.n_bytes // n_expert
            parts.append({"proj": proj, "name": t.name, "type": int(t.tensor_type), "ne": ne, "offset": off, "nbytes": per})
            off += per
        layer_info[str(layer)] = {"record_bytes": off, "parts": parts}
    relaid = {exps[layer][p][1].name for layer in layers for p in PROJS}  # type: ignore[attr-defined]

    units: list[Unit] = []
    files = []
    input_waste = 0
    for k, (p, r) in enumerate(zip(inputs, readers)):
        head_end = _header_end(r)
        with open(p, "rb") as f:
            head = os.pread(f.fileno(), head_end, 0)
            size = os.fstat(f.fileno()).st_size
            spans = sorted((t.data_offset, t.n_bytes, t.name) for t in r.tensors)
            tensors, gaps, blob = [], [], bytearray()
            pos = head_end
            for off, n, name in [*spans, (size, 0, "")]:
                if off < pos:
                    raise K2ConvError(f"{p}: tensor {name} overlaps the header or another tensor")
                if off > pos:  # a gap: padding, normally zeros; anything else is kept
                    input_waste += off - pos
                    data = _pread_all(f.fileno(), off - pos, pos) if off - pos <= CHUNK else None
                    if data is None or any(data):
                        if data is None:
                            raise K2ConvError(f"{p}: {off - pos} B gap at {pos} (not a llama.cpp layout)")
                        gaps.append([pos, off - pos, len(blob)])
                        blob += data
                    else:
                        gaps.append([pos, off - pos, -1])
                if name:
                    tensors.append([name, off, n])
                pos = off + n
        units.append(Unit(header_name(k), int(GGMLQuantizationType.I8), (len(head),), blob=head))
        if blob:
            units.append(Unit(gaps_name(k), int(GGMLQuantizationType.I8), (len(blob),), blob=bytes(blob)))
        files.append({"name": p.name, "size": size, "header": header_name(k), "gaps": gaps,
                      "gap_blob": gaps_name(k) if blob else None, "tensors": tensors})
    for k, r in enumerate(readers):
        for t in r.tensors:
            if t.name not in relaid:
                units.append(Unit(t.name, int(t.tensor_type), tuple(int(x) for x in t.shape),
                                  [Src(k, t.data_offset, t.n_bytes)]))

    keys = [(layer, e) for layer in layers for e in range(n_expert)]
    if order == "hot-first":
        if stats is None:
            raise K2ConvError("--order hot-first needs --stats FILE")
        keys.sort(key=lambda le: (-stats.get(le[0], {}).get(le[1], 0), le[0], le[1]))
    elif order != "layer":
        raise K2ConvError(f"--order {order}: expected layer or hot-first")
    first_record = len(units)
    for layer, e in keys:
        info = layer_info[str(layer)]
        srcs = []
        for part in info["parts"]:
            k, t = exps[layer][part["proj"]]
            srcs.append(Src(k, t.data_offset + e * part["nbytes"], part["nbytes"]))  # type: ignore[attr-defined]
        units.append(Unit(record_name(layer, e), int(GGMLQuantizationType.I8), (info["record_bytes"],), srcs))

    index = {"version": LAYOUT_VERSION, "order": order, "layers": layer_info, "files": files}
    fixed = [_kv_u32(KEY_VERSION, LAYOUT_VERSION), _kv_str(KEY_KIND, KIND), _kv_u64(KEY_ALIGN, align),
             _kv_u32("general.alignment", align), _kv_u32(KEY_N_EXPERT, n_expert),
             _kv_arr(KEY_LAYERS, GGUFValueType.UINT32, layers),
             _kv_arr(KEY_RECORD_BYTES, GGUFValueType.UINT64, [layer_info[str(la)]["record_bytes"] for la in layers]),
             _kv_str(KEY_INDEX, json.dumps(index, separators=(",", ":")))]
    r0 = readers[0]
    original_kvs = []
    for name, fld in r0.fields.items():  # the first input's KV pairs, byte for byte, in their order
        if name.startswith("GGUF.") or name in _DROP_KEYS:
            continue
        with open(inputs[0], "rb") as f:
            original_kvs.append(os.pread(f.fileno(), sum(int(x.nbytes) for x in fld.parts), fld.offset))

    def header_with(offsets: list[int]) -> bytes:
        kvs = [*fixed, _kv_arr(KEY_OFFSETS, GGUFValueType.UINT64, offsets), *original_kvs]
        infos = b"".join(_tensor_info(u.name, u.ne, u.qtype, u.offset - data_start) for u in units)
        return struct.pack("<IIQQ", GGUF_MAGIC, 3, len(units), len(kvs)) + b"".join(kvs) + infos

    data_start = 0
    probe = header_with([0] * len(keys))  # offsets only change values, never the length
    data_start = pad(len(probe), align)
    pos = data_start
    for u in units:
        u.offset = pos
        pos += pad(u.nbytes, align)
    total = data_start + sum(pad(u.nbytes, align) for u in units[:-1]) + (units[-1].nbytes if units else 0)
    slot = {key: units[first_record + i].offset for i, key in enumerate(keys)}
    offsets = [slot[(layer, e)] for layer in layers for e in range(n_expert)]
    header = header_with(offsets)
    assert len(header) == len(probe)
    index["_input_waste"] = input_waste
    return header, units, index, total


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, min(n - len(out), CHUNK), offset + len(out))
        if not chunk:
            raise K2ConvError(f"unexpected end of file at {offset + len(out)}")
        out += chunk
    return bytes(out)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _unit_chunks(u: Unit, fds: list[int]) -> Iterator[bytes]:
    """A unit's bytes in pieces of at most CHUNK; a record (three slices) comes as one piece."""
    if u.blob is not None:
        yield u.blob
        return
    if u.nbytes <= CHUNK:
        yield b"".join(_pread_all(fds[s.file], s.nbytes, s.offset) for s in u.sources)
        return
    for s in u.sources:
        for at in range(0, s.nbytes, CHUNK):
            yield _pread_all(fds[s.file], min(CHUNK, s.nbytes - at), s.offset + at)


def _crc_of(fd: int, offset: int, n: int) -> int:
    crc = 0
    for at in range(0, n, CHUNK):
        crc = zlib.crc32(_pread_all(fd, min(CHUNK, n - at), offset + at), crc)
    return crc


# Tests set this (in a child process) to die after a given unit: a real kill, mid-run.
_after_unit: Callable[[int], None] | None = None


def relayout(inputs: list[Path], out: Path, align: int = DEFAULT_ALIGN, order: str = "layer",
             stats: Path | None = None, dry_run: bool = False) -> RelayoutReport:
    """Write the expert-record relayout of `inputs` (one GGUF or a whole split set, in order) to `out`.

    Resumes a killed run of the same inputs and options from `<out>.part` and its journal; anything
    else there is started over (the journal's first line says what run it belongs to).
    """
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    header, units, index, total = _plan(inputs, align, order, load_stats(stats) if stats else None)
    data_waste = total - (units[0].offset if units else len(header)) - sum(u.nbytes for u in units)
    n_records = sum(1 for u in units if u.name.startswith("blk.") and ".exp." in u.name)
    report = RelayoutReport(out, align, order, total, sum(p.stat().st_size for p in inputs), n_records,
                            len(index["layers"]), data_waste, index["_input_waste"], dry_run=dry_run)
    if dry_run:
        return report

    temp = temp_path(out)
    jpath = temp.with_name(temp.name + ".journal")
    new = Journal(jpath, plan_hash([header]), {"align": align, "order": order},
                  input_identity(inputs + ([Path(stats)] if stats else [])))
    old = load_journal(jpath)
    resume = old is not None and temp.exists() and temp.stat().st_size == total and \
        (old.plan, old.options, old.inputs) == (new.plan, new.options, new.inputs)
    fds = [os.open(p, os.O_RDONLY) for p in inputs]
    try:
        if resume:
            assert old is not None
            journal = old
            journal.reopen()
            fd = os.open(temp, os.O_RDWR)
            done = {i for i, crc in old.finished.items()
                    if i < len(units) and _crc_of(fd, units[i].offset, units[i].nbytes) == crc}
            journal.finished = {i: old.finished[i] for i in done}
        else:
            if jpath.exists():
                jpath.unlink()
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, total)  # padding reads as zeros, never written
            journal = new
            journal.create()
            done = set()
        report.resumed_units = len(done)
        try:
            _pwrite_all(fd, header, 0)
            for i, u in enumerate(units):
                if i in done:
                    continue
                crc, at = 0, u.offset
                for chunk in _unit_chunks(u, fds):
                    _pwrite_all(fd, chunk, at)
                    crc = zlib.crc32(chunk, crc)
                    at += len(chunk)
                journal.record(i, crc)
                report.written_units += 1
                if _after_unit is not None:
                    _after_unit(i)
            os.fsync(fd)
            journal.mark_done()
        finally:
            os.close(fd)
            journal.close()
        commit(temp, out)
        jpath.unlink()
    finally:
        for f in fds:
            os.close(f)
    return report


# ---- reading a relayout file -------------------------------------------------------------------------


@dataclass
class Layout:
    """The O(1) locator of a relayout file: record (layer, e) → (offset, parts)."""

    path: Path
    n_expert: int
    layers: list[int]
    record_bytes: dict[int, int]
    offsets: np.ndarray  # uint64 [len(layers) * n_expert]
    index: dict

    def record(self, layer: int, e: int) -> tuple[int, int]:
        """(absolute offset, size) of the record of expert `e` in `layer`."""
        i = self._slot[layer]
        if not 0 <= e < self.n_expert:
            raise IndexError(f"layer {layer}: expert {e} of {self.n_expert}")
        return int(self.offsets[i * self.n_expert + e]), self.record_bytes[layer]

    def parts(self, layer: int) -> list[dict]:
        """proj, GGUF name, type, ne (of the merged tensor), offset and size inside the record."""
        return self.index["layers"][str(layer)]["parts"]

    def __post_init__(self) -> None:
        self._slot = {layer: i for i, layer in enumerate(self.layers)}


def is_relayout(path: Path) -> bool:
    """Whether `path` is a relayout file: its first KV is KEY_VERSION (read 24 + a few bytes)."""
    want = struct.pack("<Q", len(KEY_VERSION)) + KEY_VERSION.encode()
    try:
        with open(path, "rb") as f:
            head = f.read(24 + len(want))
    except OSError:
        return False
    return len(head) == 24 + len(want) and head[:4] == struct.pack("<I", GGUF_MAGIC) and head[24:] == want


def read_layout(reader: GGUFReader, path: Path) -> Layout:
    """The layout metadata of an opened relayout file."""
    f = reader.fields
    version = f[KEY_VERSION].contents()
    if version != LAYOUT_VERSION:
        raise K2ConvError(f"{path}: relayout version {version}, this k2conv reads {LAYOUT_VERSION}")
    layers = [int(x) for x in f[KEY_LAYERS].contents()] if f[KEY_LAYERS].data else []
    sizes = [int(x) for x in f[KEY_RECORD_BYTES].contents()] if f[KEY_RECORD_BYTES].data else []
    offsets = np.array(f[KEY_OFFSETS].contents() if f[KEY_OFFSETS].data else [], dtype=np.uint64)
    return Layout(path, int(f[KEY_N_EXPERT].contents()), layers, dict(zip(layers, sizes)), offsets,
                  json.loads(f[KEY_INDEX].contents()))


def open_layout(path: Path) -> tuple[GGUFReader, Layout]:
    reader = GGUFReader(path, "r")
    if KEY_VERSION not in reader.fields:
        raise K2ConvError(f"{path}: not a relayout file")
    return reader, read_layout(reader, path)


def restore_paths(out: Path, count: int) -> list[Path]:
    """Where `restore` writes: `out` itself, or for a split set `STEM-0000i-of-0000n.gguf` beside it."""
    if count == 1:
        return [out]
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", out.name.removesuffix(".gguf"))
    return [out.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def restore(inp: Path, out: Path) -> list[Path]:
    """Rewrite the original llama.cpp-layout file(s) of relayout file `inp`, byte-identical."""
    inp, out = Path(inp), Path(out)
    reader, lay = open_layout(inp)
    tensors = {t.name: t for t in reader.tensors}
    exps = {p["name"]: (int(layer), p) for layer in lay.index["layers"] for p in lay.index["layers"][layer]["parts"]}
    paths = restore_paths(out, len(lay.index["files"]))
    fd_in = os.open(inp, os.O_RDONLY)
    try:
        for path, spec in zip(paths, lay.index["files"]):
            temp = temp_path(path)
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, spec["size"])  # zero gaps come for free
                h = tensors[spec["header"]]
                for at in range(0, h.n_bytes, CHUNK):
                    _pwrite_all(fd, _pread_all(fd_in, min(CHUNK, h.n_bytes - at), h.data_offset + at), at)
                if spec["gap_blob"]:
                    g = tensors[spec["gap_blob"]]
                    for pos, n, blob_at in spec["gaps"]:
                        if blob_at >= 0:
                            _pwrite_all(fd, _pread_all(fd_in, n, g.data_offset + blob_at), pos)
                for name, off, n in spec["tensors"]:
                    if name in exps:
                        layer, part = exps[name]
                        per = part["nbytes"]
                        for e in range(lay.n_expert):  # expert slices, batched into large writes
                            rec, _ = lay.record(layer, e)
                            _pwrite_all(fd, _pread_all(fd_in, per, rec + part["offset"]), off + e * per)
                    else:
                        t = tensors[name]
                        for at in range(0, n, CHUNK):
                            _pwrite_all(fd, _pread_all(fd_in, min(CHUNK, n - at), t.data_offset + at), off + at)
            finally:
                os.close(fd)
            commit(temp, path)
    finally:
        os.close(fd_in)
    return paths


# ---- alignment waste from a conversion plan (no file needed) ----------------------------------------------


def plan_waste(tensors: list[tuple[str, int, int]], align: int, n_expert: int) -> dict[str, int]:
    """Padding a relayout at `align` would add, from (name, nbytes, n_experts-or-0) of an original's tensors.

    Records: one per (layer, expert) of size gate+up+down per expert; every other tensor pads to `align` too.
    """
    layers: dict[int, int] = {}
    other = 0
    n_other = 0
    for name, nbytes, _ in tensors:
        m = _EXPS_RE.match(name)
        if m:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + nbytes // n_expert
        else:
            other += pad(nbytes, align) - nbytes
            n_other += 1
    rec = sum((pad(s, align) - s) * n_expert for s in layers.values())
    return {"records": len(layers) * n_expert, "record_waste": rec, "other_tensors": n_other, "other_waste": other,
            "total_waste": rec + other}

