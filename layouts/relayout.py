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

With `compress="zstd[:LEVEL]"` each record is stored as one zstd frame (layout version 2; the other
tensors stay raw), so a miss is still one read, followed by one decompression.

Writing streams: units (one tensor, or one record) are written in file order, each one after the
aligned end of the previous, into `<out>.part` (raw ones gathered into a reused buffer and written a batch
at a time by a writer thread, overlapping the reads of the next batch); a journal of finished units
(CRC-32C and stored size each, appended once the write holding the unit has returned) makes a killed
run resume. The same CRC-32C values, computed as the bytes are written, become
the file's per-tensor checksums (convert/integrity.py: `k2conv verify --integrity` rechecks them);
the header's fixed-width slots for them, and for the record offsets a compressed run only learns as it
goes, are filled in last, then the file is fsynced and renamed. The CRC-32C kernel (numba: most of a fresh
process's start-up) loads on a thread while the first units are copied; those are checksummed, and only
then journaled, once it is there.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGUF_MAGIC

from k2conv.atomic import commit, start_writeback, temp_path
from k2conv.convert.integrity import (
    ALGORITHM,
    KEY_ALGORITHM,
    KEY_HEADER,
    KEY_TENSORS,
    crc32c,
    header_checksum,
)
from k2conv.convert.journal import Journal, input_identity, load_journal, plan_hash
from k2conv.errors import K2ConvError
from k2conv.gguf_scan import GGUFLayout, TensorInfo, scan_file

LAYOUT_VERSION = 1  # records stored raw
LAYOUT_VERSION_ZSTD = 2  # records stored as zstd frames: a version-1 reader must refuse them, not misread them
READ_VERSIONS = (LAYOUT_VERSION, LAYOUT_VERSION_ZSTD)
KIND = "expert-records"
DEFAULT_ALIGN = 4096  # docs/layout.md: 2 MiB wastes ~150x more for no gain on 4 KiB-page reads
# The most any single read or write holds, and the batcher's two buffers (CHUNK/2 each). Small on purpose:
# with writeback started per batch, 4 MiB batches kept this VM's disk busy from the first batch to the last
# (1 GB synthetic relayout 2.0 s, as fast as cp), where 32 MiB ones left it idle between bursts (3.0 s).
CHUNK = 8 << 20
DEFAULT_ZSTD_LEVEL = 3  # zstd's own default
MAX_ZSTD_LEVEL = 22

KEY_VERSION = "k2conv.layout.version"  # UINT32; the first KV of every relayout file (cheap detection)
KEY_KIND = "k2conv.layout.kind"  # STRING "expert-records"
KEY_ALIGN = "k2conv.layout.align"  # UINT64, equal to general.alignment
KEY_N_EXPERT = "k2conv.layout.n_expert"  # UINT32
KEY_LAYERS = "k2conv.layout.layers"  # ARRAY[UINT32]: the relaid layers, ascending
KEY_RECORD_BYTES = "k2conv.layout.record_bytes"  # ARRAY[UINT64]: record size per relaid layer (uncompressed)
KEY_OFFSETS = "k2conv.layout.record_offsets"  # ARRAY[UINT64]: [i * n_expert + e] → absolute offset
KEY_INDEX = "k2conv.layout.index"  # STRING, JSON: parts of each record, restore data (see docs)
KEY_COMPRESSION = "k2conv.layout.compression"  # STRING "zstd" (version 2 only)
KEY_LEVEL = "k2conv.layout.compression_level"  # UINT32, informative (readers do not need it)
KEY_STORED = "k2conv.layout.record_stored_bytes"  # ARRAY[UINT64], indexed like record_offsets (version 2 only)

PROJS = ("gate", "up", "down")
_EXPS_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_DROP_KEYS = ("general.alignment", "split.no", "split.count", "split.tensors.count")
_DROP_PREFIXES = ("k2conv.checksum.",)  # the input's checksums describe the input; ours are written anew


def record_name(layer: int, e: int) -> str:
    return f"blk.{layer}.exp.{e}"


def header_name(k: int) -> str:
    return f"k2conv.orig.{k}.header"


def gaps_name(k: int) -> str:
    return f"k2conv.orig.{k}.gaps"


def pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Compression:
    """How records are stored: one zstd frame per record at `level`."""

    algorithm: str
    level: int

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.level}"


def parse_compression(spec: str | None) -> Compression | None:
    """`zstd` or `zstd:LEVEL` (1..22) → Compression; None or "none" → None; anything else is a K2ConvError."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    algorithm, colon, level = spec.strip().lower().partition(":")
    if algorithm != "zstd":
        raise K2ConvError(f"--compress {spec}: expected zstd or zstd:LEVEL")
    if not colon:
        return Compression("zstd", DEFAULT_ZSTD_LEVEL)
    try:
        n = int(level)
    except ValueError:
        raise K2ConvError(f"--compress {spec}: the zstd level must be an integer 1..{MAX_ZSTD_LEVEL}") from None
    if not 1 <= n <= MAX_ZSTD_LEVEL:
        raise K2ConvError(f"--compress {spec}: the zstd level must be 1..{MAX_ZSTD_LEVEL}")
    return Compression("zstd", n)


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
    stored: int = -1  # bytes in the output: nbytes, or a compressed record's frame size once written
    record: bool = False  # an expert record (the only units that are ever compressed)

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
    compression: Compression | None = None
    record_raw: int = 0  # the records' bytes before compression
    record_stored: int = 0  # ... and as stored (an estimate in a compressed dry run)
    sampled: int = 0  # compressed dry run: records compressed to estimate the ratio

    def lines(self) -> list[str]:
        comp = f", records {self.compression}" if self.compression else ""
        out = [f"{self.out}: {self.records} records in {self.record_layers} layers, align {self.align}, "
               f"order {self.order}{comp}"]
        if self.compression and self.dry_run:
            ratio = self.record_raw / self.record_stored if self.record_stored else 0.0
            out.append(f"size about {self.size:,} B (inputs {self.input_size:,} B): an ESTIMATE, records shrink "
                       f"{ratio:.2f}x in {self.sampled} of {self.records} records compressed as a sample; the exact "
                       f"size is known only once every record is compressed")
        else:
            out.append(f"size {self.size:,} B (inputs {self.input_size:,} B); padding {self.waste:,} B "
                       f"(inputs {self.input_waste:,} B)")
            if self.compression:
                out.append(f"records {self.record_raw:,} B stored in {self.record_stored:,} B "
                           f"({self.record_raw / max(self.record_stored, 1):.2f}x, {self.compression})")
        out.append("dry run: nothing written" if self.dry_run else
                   f"resumed {self.resumed_units} units, wrote {self.written_units}")
        return out


def _scan(path: Path) -> GGUFLayout:
    """The validated header of `path` (gguf_scan: hostile files fail as one K2ConvError line), its map closed:
    what a relayout needs (each KV pair's bytes, the tensors, the header's end) without GGUFReader, which
    parses the header a second time and builds a view per vocabulary string (seconds on a 160k vocab)."""
    layout = scan_file(path)
    layout.buf.close()  # type: ignore[attr-defined]
    return layout


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


@dataclass
class _Plan:
    """Everything about the output but the records' stored sizes (and so, when compressed, their offsets).

    Every header field has a fixed width, so the header's length, and the data start, are known here
    whatever the offsets, stored sizes and checksums turn out to be; `header` serializes it for the
    units' current `offset` and `stored`.
    """

    units: list[Unit]
    index: dict
    layers: list[int]
    n_expert: int
    keys: list[tuple[int, int]]  # (layer, expert) of units[first_record:], in file order
    first_record: int
    align: int
    fixed_kvs: list[bytes]  # layout keys before record_offsets
    original_kvs: list[bytes]  # the first input's KV pairs, byte for byte
    compression: Compression | None
    input_waste: int = 0
    data_start: int = 0

    def place(self) -> int:
        """Put each unit at the aligned end of the previous one; returns the file size."""
        pos = self.data_start
        for u in self.units:
            u.offset = pos
            pos += pad(u.stored, self.align)
        return pos

    def serialize(self, crcs: list[int] | None = None) -> tuple[bytearray, int, int]:
        """(header, offset of the header-checksum value, offset of the tensor-checksum values); checksum slots
        hold `crcs` (zeros when None) and a zero header checksum."""
        slot = {key: self.units[self.first_record + i] for i, key in enumerate(self.keys)}
        recs = [slot[(layer, e)] for layer in self.layers for e in range(self.n_expert)]
        kvs = [*self.fixed_kvs, _kv_arr(KEY_OFFSETS, GGUFValueType.UINT64, [u.offset for u in recs])]
        if self.compression is not None:
            kvs += [_kv_str(KEY_COMPRESSION, self.compression.algorithm), _kv_u32(KEY_LEVEL, self.compression.level),
                    _kv_arr(KEY_STORED, GGUFValueType.UINT64, [u.stored for u in recs])]
        n = len(self.units)
        kvs += [*self.original_kvs, _kv_str(KEY_ALGORITHM, ALGORITHM), _kv_u32(KEY_HEADER, 0),
                _kv_arr(KEY_TENSORS, GGUFValueType.UINT32, list(crcs) if crcs is not None else [0] * n)]
        infos = b"".join(_tensor_info(u.name, (u.stored,) if u.record else u.ne, u.qtype, u.offset - self.data_start)
                         for u in self.units)
        head = bytearray(struct.pack("<IIQQ", GGUF_MAGIC, 3, n, len(kvs)))
        for kv in kvs:
            head += kv
        values_at = len(head) - 4 * n  # the checksum keys are the last KVs: their place is arithmetic
        head_at = values_at - 16 - 8 - len(KEY_TENSORS) - 4  # ARRAY header, key, key length; UINT32 value before
        assert head[head_at + 4 + 8 : head_at + 4 + 8 + len(KEY_TENSORS)] == KEY_TENSORS.encode()
        head += infos
        return head, head_at, values_at

    def header(self, crcs: list[int]) -> bytes:
        """The final header: checksums in their slots, the header checksum over it with both zeroed."""
        head, head_at, values_at = self.serialize(crcs)
        crc = header_checksum(head, self.data_start, [(head_at, 4), (values_at, 4 * len(self.units))])
        head[head_at : head_at + 4] = struct.pack("<I", crc)
        return bytes(head)


def _plan(inputs: list[Path], align: int, order: str, stats: dict[int, dict[int, int]] | None,
          compression: Compression | None = None) -> _Plan:
    """The relayout of `inputs`, placed as if no record were compressed."""
    if align < 32 or align & (align - 1):
        raise K2ConvError(f"--align {align}: must be a power of two, at least 32")
    readers = [_scan(p) for p in inputs]
    if KEY_VERSION in readers[0].kv:
        raise K2ConvError(f"{inputs[0]}: already a relayout file (use restore)")
    exps: dict[int, dict[str, tuple[int, TensorInfo]]] = {}
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
            ne = list(t.ne)
            if len(ne) != 3 or n_expert not in (0, ne[2]) or not ne[2]:
                raise K2ConvError(f"{t.name}: expected (cols, rows, {n_expert or 'n_expert'}) experts, got ne={ne}")
            n_expert = ne[2]
            if t.nbytes % n_expert:
                raise K2ConvError(f"{t.name}: {t.nbytes} bytes do not split into {n_expert} experts")
            per = t.nbytes // n_expert
            parts.append({"proj": proj, "name": t.name, "type": int(t.qtype), "ne": ne, "offset": off, "nbytes": per})
            off += per
        layer_info[str(layer)] = {"record_bytes": off, "parts": parts}
    relaid = {exps[layer][p][1].name for layer in layers for p in PROJS}

    units: list[Unit] = []
    files = []
    input_waste = 0
    for k, (p, r) in enumerate(zip(inputs, readers)):
        head_end = r.header_end
        with open(p, "rb") as f:
            head = _pread_all(f.fileno(), head_end, 0)
            size = os.fstat(f.fileno()).st_size
            spans = sorted((t.offset, t.nbytes, t.name) for t in r.tensors)
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
                units.append(Unit(t.name, int(t.qtype), t.ne, [Src(k, t.offset, t.nbytes)]))

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
            srcs.append(Src(k, t.offset + e * part["nbytes"], part["nbytes"]))
        units.append(Unit(record_name(layer, e), int(GGMLQuantizationType.I8), (info["record_bytes"],), srcs, record=True))
    for u in units:
        u.stored = u.nbytes

    index = {"version": LAYOUT_VERSION if compression is None else LAYOUT_VERSION_ZSTD, "order": order,
             "layers": layer_info, "files": files}
    fixed = [_kv_u32(KEY_VERSION, index["version"]), _kv_str(KEY_KIND, KIND), _kv_u64(KEY_ALIGN, align),
             _kv_u32("general.alignment", align), _kv_u32(KEY_N_EXPERT, n_expert),
             _kv_arr(KEY_LAYERS, GGUFValueType.UINT32, layers),
             _kv_arr(KEY_RECORD_BYTES, GGUFValueType.UINT64, [layer_info[str(la)]["record_bytes"] for la in layers]),
             _kv_str(KEY_INDEX, json.dumps(index, separators=(",", ":")))]
    original_kvs = []
    with open(inputs[0], "rb") as f:
        for name, kv in readers[0].kv.items():  # the first input's KV pairs, byte for byte, in their order
            if name in _DROP_KEYS or name.startswith(_DROP_PREFIXES):
                continue
            original_kvs.append(_pread_all(f.fileno(), kv.end - kv.start, kv.start))
    plan = _Plan(units, index, layers, n_expert, keys, first_record, align, fixed, original_kvs, compression, input_waste)
    plan.data_start = pad(len(plan.serialize()[0]), align)  # values never change the header's length
    plan.place()
    return plan


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, min(n - len(out), CHUNK), offset + len(out))
        if not chunk:
            raise K2ConvError(f"unexpected end of file at {offset + len(out)}")
        out += chunk
    return bytes(out)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, writeback: bool = False) -> None:
    view = memoryview(data)
    start, total = offset, len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    if writeback:
        start_writeback(fd, start, total)


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


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from fd at offset (no intermediate bytes objects: the page cache copies straight in)."""
    while view:
        n = os.preadv(fd, [view], offset)
        if not n:
            raise K2ConvError(f"unexpected end of file at {offset}")
        view, offset = view[n:], offset + n


class _KernelLoad:
    """numba's import and the CRC-32C kernels' load (~0.7 s of a fresh process, most of relayout's start-up)
    on a thread of their own, started once the plan is made, so that they run while the first units are
    copied (the copy waits on the disk, with the GIL released) instead of before them.

    The load is Python holding the GIL; the copying thread wants it back after every read and write, and
    would wait up to the interpreter's switch interval (5 ms) each time: lowered to 0.5 ms while the load
    runs (then restored), the copy kept ~15 % more of its pace (1 GB: 510–540 MB copied during the load
    against 390–480 MB, and the whole run 0.2–0.6 s shorter, on the dev VM)."""

    SWITCH_INTERVAL = 0.0005
    loaded = False  # once in a process: later runs find the kernels there

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.thread: threading.Thread | None = None
        if _KernelLoad.loaded:
            self.ready.set()
            return
        self.interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self.interval, self.SWITCH_INTERVAL))
        self.thread = threading.Thread(target=self._load, name="k2conv-crc-load")
        self.thread.start()

    def _load(self) -> None:
        try:
            for data in (bytes(1 << 20), bytearray(1 << 20)):  # read-only and writable buffers: every
                crc32c(data)  # kernel and argument type the copy will use
            _KernelLoad.loaded = True
        except BaseException:  # the caller's own crc32c call raises it again, in its thread
            pass
        finally:
            sys.setswitchinterval(self.interval)
            self.ready.set()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


class _Batcher:
    """Writes raw units through two reused buffers of CHUNK/2: consecutive units are read into one at their
    aligned places (padding zeroed) and checksummed there, while a writer thread writes the other with one
    pwrite; a unit is journaled only once the write that holds it has returned.

    Until the CRC-32C kernel has loaded (`kernel`, on its own thread) units are copied unchecksummed: once
    written they wait in `deferred`, and once the kernel is there a checksum thread computes their CRC-32C
    from the same bytes (the unit's blob, or its input ranges read again) and they are journaled then, so
    the journal's rule holds: a unit is journaled, with its checksum, only after its bytes were written.

    Why: a fresh `bytes` per read, a join per record and a write per unit cost as much as the copy
    itself, and reading, writing and the disk's writeback done one after the other add up; preadv into
    a reused buffer, one large write and writeback started per batch overlap them (all release the GIL).
    A unit larger than a buffer streams through the buffers in pieces, journaled after its last one.
    (`copy_file_range` instead of the buffers measured no faster for records on the dev VM: 2.6–3.0 s
    against 2.7–3.0 s for 1 GB, alternating, the disk deciding.)
    """

    def __init__(self, fd: int, fds: list[int], align: int, done: Callable[[int, int, int], None],
                 kernel: _KernelLoad | None = None, checksums: bool = True, buffer: int = CHUNK // 2) -> None:
        self.fd, self.fds, self.align, self.done, self.kernel = fd, fds, align, done, kernel
        self.checksums = checksums  # False: restore, which keeps no journal (units are "done" with CRC 0)
        self.bufs = [memoryview(bytearray(buffer)) for _ in range(2)]  # `buffer`: less for a small output
        self.cur = 0
        self.start = self.used = 0
        # (unit, CRC-32C or None until the kernel is there, bytes, the unit) of the current buffer
        self.pending: list[tuple[int, int | None, int, Unit]] = []
        self.inflight: list[tuple[Future, list[tuple[int, int | None, int, Unit]]] | None] = [None, None]
        self.deferred: list[tuple[int, Unit]] = []  # written, not yet checksummed
        self.checking: deque[tuple[int, int, Future]] = deque()  # (unit, bytes, its CRC-32C to come)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="k2conv-write")
        self.crc_pool = ThreadPoolExecutor(1, thread_name_prefix="k2conv-crc")
        self.crc_buf = memoryview(bytearray(CHUNK if checksums else 0))  # the checksum thread's

    def _fill(self, u: Unit, view: memoryview) -> None:
        if u.blob is not None:
            view[:] = u.blob
            return
        at = 0
        for s in u.sources:
            _read_into(self.fds[s.file], view[at : at + s.nbytes], s.offset)
            at += s.nbytes

    def add(self, i: int, u: Unit, pos: int) -> None:
        """Unit i goes to `pos`: gathered now, written (and journaled) by this or a later flush."""
        n = u.nbytes
        end = pad(n, self.align)
        size = len(self.bufs[0])
        if self.used and (pos != self.start + self.used or self.used + end > size):
            self.flush()
        if end > size:
            self._large(i, u, pos)
            return
        if not self.used:
            self.start = pos
        view = self.bufs[self.cur][self.used : self.used + n]
        self._fill(u, view)
        self.bufs[self.cur][self.used + n : self.used + end] = bytes(end - n)  # a resumed file may hold old bytes
        self.pending.append((i, self._crc(view), n, u))
        self.used += end
        if _TEST_DELAY:  # slowed for the kill tests: one unit per write, so kills land between journaled units
            self.flush()

    def _large(self, i: int, u: Unit, pos: int) -> None:
        size = len(self.bufs[0])
        pieces: list[Src | None] = [None] if u.blob is not None else list(u.sources)  # None: the blob
        crc: int | None = 0
        at, left = pos, u.nbytes
        for src in pieces:
            nbytes = src.nbytes if src is not None else u.nbytes
            for k in range(0, nbytes, size):
                m = min(size, nbytes - k)
                view = self.bufs[self.cur][:m]
                if src is not None:
                    _read_into(self.fds[src.file], view, src.offset + k)
                else:
                    view[:] = memoryview(u.blob)[k : k + m]  # type: ignore[arg-type]
                crc = self._crc(view, crc)
                left -= m
                self.start, self.used = at, m
                if not left:  # its padding is written before the unit can be journaled
                    if pad(u.nbytes, self.align) > u.nbytes:
                        _pwrite_all(self.fd, bytes(pad(u.nbytes, self.align) - u.nbytes), at + m)
                    self.pending = [(i, crc, u.nbytes, u)]
                self.flush()
                at += m

    def _write(self, view: memoryview, offset: int) -> None:
        _pwrite_all(self.fd, view, offset)
        start_writeback(self.fd, offset, len(view))

    def _ready(self) -> bool:
        return self.kernel is None or self.kernel.ready.is_set()

    def _crc(self, view: memoryview, crc: int | None = 0) -> int | None:
        """CRC-32C of `view` continuing from `crc`; 0 without checksums (restore); None once the kernel was
        not there for a unit's first piece (the unit is checksummed later, whole: `deferred`)."""
        if not self.checksums:
            return 0
        if crc is None or not self._ready():
            return None
        return crc32c(view, crc)

    def _take(self, k: int) -> None:
        """Wait for buffer k's write, then journal its units (those without a checksum yet: once they have one)."""
        job, self.inflight[k] = self.inflight[k], None
        if job is not None:
            fut, units = job
            fut.result()
            _pause(0.5)
            for i, crc, n, u in units:
                if crc is None:
                    self.deferred.append((i, u))
                else:
                    self.done(i, crc, n)
        self._check()

    def _checksum(self, u: Unit) -> int:
        """CRC-32C of unit u's bytes, from memory or read again from the input (the checksum thread's)."""
        if u.blob is not None:
            return crc32c(u.blob)
        crc = 0
        for s in u.sources:
            for at in range(0, s.nbytes, CHUNK):
                view = self.crc_buf[: min(CHUNK, s.nbytes - at)]
                _read_into(self.fds[s.file], view, s.offset + at)
                crc = crc32c(view, crc)
        return crc

    def _check(self, wait: bool = False) -> None:
        """Once the kernel is there, hand the written units still without a checksum to the checksum thread;
        journal those whose checksum is known, in order (`wait`: all of them)."""
        if self.deferred and (wait or self._ready()):
            if self.kernel is not None:
                self.kernel.wait()
            for i, u in self.deferred:
                self.checking.append((i, u.nbytes, self.crc_pool.submit(self._checksum, u)))
            self.deferred = []
        while self.checking and (wait or self.checking[0][2].done()):
            i, n, fut = self.checking.popleft()
            self.done(i, fut.result(), n)

    def flush(self) -> None:
        """Hand the gathered units to the writer; journal what the other buffer held once it is written."""
        if not self.used:
            return
        _pause(0.5)
        self.inflight[self.cur] = (self.pool.submit(self._write, self.bufs[self.cur][: self.used], self.start),
                                   self.pending)
        self.pending, self.used = [], 0
        self.cur ^= 1
        self._take(self.cur)

    def drain(self) -> None:
        """Everything gathered written, checksummed and journaled."""
        self.flush()
        self._take(self.cur ^ 1)
        self._check(wait=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.crc_pool.shutdown(wait=True, cancel_futures=True)


def _crc_at(fd: int, offset: int, n: int) -> int | None:
    """CRC-32C of n bytes of the temporary file at offset; None if the file ends first."""
    crc = 0
    for at in range(0, n, CHUNK):
        want = min(CHUNK, n - at)
        data = os.pread(fd, want, offset + at)
        if len(data) != want:
            return None
        crc = crc32c(data, crc)
    return crc


class _Compressor:
    """Compresses records ahead of the writer on a few threads (zstd releases the GIL), handing them
    back in file order; holds at most `2 × threads` compressed records."""

    def __init__(self, units: list[Unit], todo: list[int], fds: list[int], compression: Compression) -> None:
        self.units, self.fds, self.compression = units, fds, compression
        self.threads = min(4, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="k2conv-zstd")
        self.queue = deque(todo)
        self.pending: dict[int, Future] = {}
        self.local = threading.local()

    def compress(self, i: int) -> tuple[list[bytes], int, int]:
        """(frame pieces, CRC-32C, size) of unit i's record as one zstd frame."""
        cctx = getattr(self.local, "cctx", None)
        if cctx is None:  # a compression context is not thread-safe: one per thread
            cctx = self.local.cctx = zstandard.ZstdCompressor(level=self.compression.level, write_checksum=True,
                                                              write_content_size=True)
        u = self.units[i]
        obj = cctx.compressobj(size=u.nbytes)
        pieces = [piece for chunk in _unit_chunks(u, self.fds) if (piece := obj.compress(chunk))]
        pieces.append(obj.flush())
        crc = 0
        for piece in pieces:
            crc = crc32c(piece, crc)
        return pieces, crc, sum(len(p) for p in pieces)

    def get(self, i: int) -> tuple[list[bytes], int, int]:
        """Unit i compressed (waited for, or compressed here if it was not queued), the next ones queued."""
        while self.queue and self.queue[0] <= i:
            self.queue.popleft()
        fut = self.pending.pop(i, None)
        while self.queue and len(self.pending) < 2 * self.threads:
            j = self.queue.popleft()
            self.pending[j] = self.pool.submit(self.compress, j)
        return fut.result() if fut is not None else self.compress(i)

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        self.pool.shutdown(wait=True)


class _Journal(Journal):
    """The relayout journal: each line also carries the unit's stored size (`"n"`), which is where the
    next unit starts when records are compressed."""

    sizes: dict[int, int]

    @classmethod
    def adopt(cls, old: Journal) -> _Journal:
        """A loaded journal, with the stored sizes of its intact lines."""
        new = cls(old.path, old.plan, old.options, old.inputs, dict(old.finished), old.done, old.valid_bytes)
        new.sizes = {}
        for line in old.path.read_bytes()[: old.valid_bytes].splitlines()[1:]:
            entry = json.loads(line)  # intact lines only: load_journal checked them
            if isinstance(entry.get("u"), int) and isinstance(entry.get("n"), int):
                new.sizes[entry["u"]] = entry["n"]
        return new

    def record_stored(self, unit: int, crc: int, nbytes: int) -> None:
        self._append(f'{{"u": {unit}, "crc": {crc}, "n": {nbytes}}}\n'.encode())
        self.finished[unit] = crc
        self.sizes[unit] = nbytes


# Tests set this (in a child process) to die after a given unit: a real kill, mid-run.
_after_unit: Callable[[int], None] | None = None
# Tests set K2CONV_TEST_UNIT_DELAY (seconds) so that kills land in every phase on any machine: it is slept
# after the journal starts, after the header, before and after each unit's write, before and after the rename.
_TEST_DELAY = float(os.environ.get("K2CONV_TEST_UNIT_DELAY") or 0)


def _pause(fraction: float = 1.0) -> None:
    if _TEST_DELAY:
        time.sleep(_TEST_DELAY * fraction)


def _estimate(plan: _Plan, inputs: list[Path], report: RelayoutReport, samples: int = 4) -> None:
    """Dry run with compression: compress up to `samples` records spread over the file; scale the rest."""
    records = plan.units[plan.first_record :]
    if not records:
        return
    assert plan.compression is not None
    picks = sorted({round(k * (len(records) - 1) / max(samples - 1, 1)) for k in range(min(samples, len(records)))})
    fds = [os.open(p, os.O_RDONLY) for p in inputs]
    comp = _Compressor(plan.units, [], fds, plan.compression)
    try:
        raw = sum(records[k].nbytes for k in picks)
        stored = sum(comp.compress(plan.first_record + k)[2] for k in picks)
    finally:
        comp.close()
        for f in fds:
            os.close(f)
    ratio = stored / raw if raw else 1.0
    for u in records:
        u.stored = round(u.nbytes * ratio)
    report.size = plan.place()
    report.record_raw = sum(u.nbytes for u in records)
    report.record_stored = sum(u.stored for u in records)
    report.sampled = len(picks)


def relayout(inputs: list[Path], out: Path, align: int = DEFAULT_ALIGN, order: str = "layer",
             stats: Path | None = None, dry_run: bool = False, compress: str | None = None) -> RelayoutReport:
    """Write the expert-record relayout of `inputs` (one GGUF or a whole split set, in order) to `out`.

    `compress`: None, or `zstd[:LEVEL]` to store each record as one zstd frame. Resumes a killed run of
    the same inputs and options from `<out>.part` and its journal; anything else there is started over
    (the journal's first line says what run it belongs to).
    """
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    compression = parse_compression(compress)
    plan = _plan(inputs, align, order, load_stats(stats) if stats else None, compression)
    units = plan.units
    records = units[plan.first_record :]
    report = RelayoutReport(out, align, order, plan.place(), sum(p.stat().st_size for p in inputs), len(records),
                            len(plan.layers), 0, plan.input_waste, dry_run=dry_run, compression=compression,
                            record_raw=sum(u.nbytes for u in records), record_stored=sum(u.stored for u in records))
    report.waste = report.size - plan.data_start - sum(u.stored for u in units)
    if dry_run:
        if compression is not None:
            _estimate(plan, inputs, report)
        return report

    kernel = _KernelLoad()  # numba and the CRC-32C kernel load while the first units are copied
    if _TEST_DELAY:  # the slowed kill tests time their write phase in a warm process: loaded before, as there
        kernel.wait()
    temp = temp_path(out)
    jpath = temp.with_name(temp.name + ".journal")
    options = {"align": align, "order": order, "compress": str(compression) if compression else None}
    if compression is not None:  # another zstd may compress to other bytes: start over, do not mix
        options["zstd"] = ".".join(map(str, zstandard.ZSTD_VERSION))
    new = _Journal(jpath, plan_hash([bytes(plan.serialize()[0])]), options,
                   input_identity(inputs + ([Path(stats)] if stats else [])))
    new.sizes = {}
    old = load_journal(jpath)
    resume = old is not None and temp.exists() and \
        (old.plan, old.options, old.inputs) == (new.plan, new.options, new.inputs)
    fds = [os.open(p, os.O_RDONLY) for p in inputs]
    try:
        if resume:
            assert old is not None
            journal = _Journal.adopt(old)
            journal.reopen()
            fd = os.open(temp, os.O_RDWR)
            known = {i: (crc, journal.sizes[i]) for i, crc in journal.finished.items()
                     if 0 <= i < len(units) and i in journal.sizes}
            kernel.wait()  # the finished units are checked before anything is copied
        else:
            jpath.unlink(missing_ok=True)
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            journal = new
            journal.create()
            known = {}
        if compression is not None:
            kernel.wait()  # the compressing threads checksum from the first record on
        comp = _Compressor(units, [i for i in range(plan.first_record, len(units)) if i not in known], fds,
                           compression) if compression is not None else None
        batch: _Batcher | None = None
        try:
            _pause()
            head = plan.serialize()[0]  # placeholders until every offset and checksum is known
            _pwrite_all(fd, bytes(head) + bytes(plan.data_start - len(head)), 0)
            _pause()
            crcs = [0] * len(units)

            def finished(i: int, crc: int, stored: int) -> None:  # unit i's bytes are in the file: journal it
                journal.record_stored(i, crc, stored)
                crcs[i] = crc
                report.written_units += 1
                if _after_unit is not None:
                    _after_unit(i)

            batch = _Batcher(fd, fds, align, finished, kernel)
            pos, reusable = plan.data_start, True
            for i, u in enumerate(units):
                u.offset = pos
                if reusable and i in known and _crc_at(fd, pos, known[i][1]) == known[i][0]:
                    crcs[i], u.stored = known[i]
                    report.resumed_units += 1
                elif comp is not None and u.record:  # its CRC was computed beside the compression
                    batch.drain()
                    _pause(0.5)
                    pieces, crc, _ = comp.get(i)
                    at = pos
                    for piece in pieces:
                        _pwrite_all(fd, piece, at)
                        at += len(piece)
                    u.stored = at - pos
                    if resume and pad(u.stored, align) > u.stored:  # a resumed file may hold old bytes there
                        _pwrite_all(fd, bytes(pad(u.stored, align) - u.stored), at)
                    if i in known and known[i][1] != u.stored:
                        reusable = False  # every later unit moved: none of them can be reused
                    _pause(0.5)
                    finished(i, crc, u.stored)
                else:
                    u.stored = u.nbytes
                    if i in known and known[i][1] != u.stored:
                        reusable = False
                    batch.add(i, u, pos)
                pos = u.offset + pad(u.stored, align)
            batch.drain()
            kernel.wait()
            os.ftruncate(fd, pos)  # the last unit's padding too, as llama.cpp expects; drops stale bytes
            _pwrite_all(fd, plan.header(crcs), 0)
            os.fsync(fd)
            journal.mark_done()
        finally:
            if batch is not None:
                batch.close()  # before the fd closes: a write may still be in flight
            if comp is not None:
                comp.close()
            os.close(fd)
            journal.close()
        _pause()
        commit(temp, out)
        _pause()
        jpath.unlink()
    finally:
        for f in fds:
            os.close(f)
    report.size = pos
    report.waste = pos - plan.data_start - sum(u.stored for u in units)
    report.record_stored = sum(u.stored for u in records)
    return report


# ---- reading a relayout file -------------------------------------------------------------------------


@dataclass
class Layout:
    """The O(1) locator of a relayout file: record (layer, e) → (offset, stored size, parts)."""

    path: Path
    n_expert: int
    layers: list[int]
    record_bytes: dict[int, int]  # uncompressed record size per layer
    offsets: np.ndarray  # uint64 [len(layers) * n_expert]
    index: dict
    compression: str | None = None  # "zstd": each record is one zstd frame
    stored: np.ndarray | None = None  # uint64, like offsets: bytes stored per record (compressed files)

    def record(self, layer: int, e: int) -> tuple[int, int]:
        """(absolute offset, stored size) of the record of expert `e` in `layer`: what one read fetches."""
        i = self._slot[layer]
        if not 0 <= e < self.n_expert:
            raise IndexError(f"layer {layer}: expert {e} of {self.n_expert}")
        k = i * self.n_expert + e
        return int(self.offsets[k]), int(self.stored[k]) if self.stored is not None else self.record_bytes[layer]

    def decode(self, layer: int, e: int, raw: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """A record as read → its gate+up+down bytes (a zstd frame is decompressed and its checksum checked)."""
        if self.compression is None:
            return raw
        want = self.record_bytes[layer]
        try:
            data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=want)
        except zstandard.ZstdError as exc:
            raise K2ConvError(f"{self.path}: record {record_name(layer, e)} is damaged ({exc}); "
                              "`k2conv verify --integrity` checks the whole file") from None
        if len(data) != want:
            raise K2ConvError(f"{self.path}: record {record_name(layer, e)} decompresses to {len(data)} B, "
                              f"expected {want}")
        return data

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


def read_layout(header: GGUFLayout, path: Path) -> Layout:
    """The layout metadata of a relayout file from its scanned header (gguf_scan, map open), checked against
    the file before anything trusts it.

    The file may be damaged or hostile: every count, offset and name the records, the index and a
    restore rely on is validated here, so later code indexes and reads only what exists.
    """
    try:
        layout = _parse_layout(header, path)
        _check_layout(layout, header, path)
    except K2ConvError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        raise K2ConvError(f"{path}: corrupt relayout metadata ({exc.__class__.__name__}: {exc})") from None
    return layout


class _Values:
    """KV values of a scanned header, strictly typed where `GGUFLayout.value` is lenient: `value` a scalar or a
    string, `numbers` an array of numbers as a list; KeyError when absent, TypeError when of the other kind."""

    def __init__(self, header: GGUFLayout) -> None:
        self.header = header

    def __contains__(self, key: str) -> bool:
        return key in self.header.kv

    def value(self, key: str) -> object:
        if self.header.kv[key].vtype == GGUFValueType.ARRAY:
            raise TypeError(f"{key} is an array, not a single value")
        return self.header.value(key)

    def numbers(self, key: str) -> list:
        a = self.header.array(key)
        if a is None:
            raise TypeError(f"{key} is not an array of numbers") if key in self.header.kv else KeyError(key)
        return a.tolist()


def _parse_layout(header: GGUFLayout, path: Path) -> Layout:
    f = _Values(header)
    version = f.value(KEY_VERSION)
    if version not in READ_VERSIONS:
        raise K2ConvError(f"{path}: relayout version {version}, this k2conv reads {', '.join(map(str, READ_VERSIONS))}")
    layers = [int(x) for x in f.numbers(KEY_LAYERS)]
    sizes = [int(x) for x in f.numbers(KEY_RECORD_BYTES)]
    offsets = np.array(f.numbers(KEY_OFFSETS), dtype=np.uint64)
    compression, stored = None, None
    if version == LAYOUT_VERSION_ZSTD:
        if KEY_COMPRESSION not in f or KEY_STORED not in f or f.value(KEY_COMPRESSION) != "zstd":
            raise K2ConvError(f"{path}: relayout version 2 without zstd {KEY_COMPRESSION} and {KEY_STORED}")
        compression = "zstd"
        stored = np.array(f.numbers(KEY_STORED), dtype=np.uint64)
        if len(stored) != len(offsets):
            raise K2ConvError(f"{path}: {KEY_STORED} has {len(stored)} entries for {len(offsets)} records")
    if len(sizes) != len(layers) or len(set(layers)) != len(layers):
        raise K2ConvError(f"{path}: {len(sizes)} record sizes for {len(layers)} layers (or a layer listed twice)")
    index = json.loads(f.value(KEY_INDEX))  # type: ignore[arg-type]
    if not isinstance(index, dict):
        raise ValueError("the index is not a JSON object")
    return Layout(path, int(f.value(KEY_N_EXPERT)), layers, dict(zip(layers, sizes)), offsets, index,  # type: ignore[call-overload]
                  compression, stored)


def _is_int(x: object, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _check_layout(lay: Layout, header: GGUFLayout, path: Path) -> None:
    """Raise K2ConvError unless every record, part and restore instruction lies inside this file."""
    size = path.stat().st_size
    names = {t.name for t in header.tensors}
    if not 0 < lay.n_expert <= 1 << 16 or len(lay.offsets) != len(lay.layers) * lay.n_expert:
        raise K2ConvError(f"{path}: {len(lay.offsets)} record offsets for {len(lay.layers)} layers × {lay.n_expert} experts")
    for layer in lay.layers:
        rec = lay.record_bytes[layer]
        spec = lay.index["layers"][str(layer)]
        parts = spec["parts"]
        if not isinstance(parts, list) or sorted(p["proj"] for p in parts) != sorted(PROJS):
            raise K2ConvError(f"{path}: layer {layer}: record parts are not gate, up and down")
        for part in parts:
            ne = part["ne"]
            if not (isinstance(part["name"], str) and isinstance(ne, list) and len(ne) == 3
                    and all(_is_int(n, 1) for n in ne) and ne[2] == lay.n_expert
                    and _is_int(part["offset"]) and _is_int(part["nbytes"])
                    and part["offset"] + part["nbytes"] <= rec):  # fmt: skip
                raise K2ConvError(f"{path}: layer {layer}: part {part['proj']} lies outside its record")
            GGMLQuantizationType(part["type"])
        for e in range(lay.n_expert):
            offset, stored = lay.record(layer, e)
            if offset + stored > size or (lay.stored is None and stored != rec):
                raise K2ConvError(f"{path}: record {record_name(layer, e)} ({offset}+{stored}) lies outside the file")
    originals = {t[0]: t[2] for spec in lay.index["files"] for t in spec["tensors"]}
    for layer in lay.layers:
        for part in lay.parts(layer):
            if originals.get(part["name"]) != part["nbytes"] * lay.n_expert:
                raise K2ConvError(f"{path}: layer {layer}: {part['name']} is not an original tensor of that size")
    for spec in lay.index["files"]:
        total = 0
        for name in [spec["header"], *([spec["gap_blob"]] if spec["gap_blob"] else [])]:
            if name not in names:
                raise K2ConvError(f"{path}: restore needs tensor {name}, which the file lacks")
        for name, off, n in spec["tensors"]:
            if not (isinstance(name, str) and _is_int(off) and _is_int(n)) or off + n > spec["size"]:
                raise K2ConvError(f"{path}: original tensor {name} lies outside its file")
            total += n
        for pos, n, blob_at in spec["gaps"]:
            if not (_is_int(pos) and _is_int(n) and _is_int(blob_at, -1)) or pos + n > spec["size"]:
                raise K2ConvError(f"{path}: a stored gap lies outside its file")
        # an original holds its tensors, its header and alignment padding: never vastly more than this file
        if not _is_int(spec["size"]) or spec["size"] > total + size + (len(spec["tensors"]) + 1) * (1 << 21):
            raise K2ConvError(f"{path}: original file size {spec['size']} is not plausible")


def open_layout(path: Path) -> tuple[GGUFLayout, Layout]:
    """The scanned header (map closed) and the layout of relayout file `path`: not gguf's GGUFReader, which
    takes ~20 s and ~0.6 GiB on a 160k vocabulary."""
    header = scan_file(path)
    try:
        if KEY_VERSION not in header.kv:
            raise K2ConvError(f"{path}: not a relayout file")
        return header, read_layout(header, path)
    finally:
        header.buf.close()  # type: ignore[attr-defined]


def restore_paths(out: Path, count: int) -> list[Path]:
    """Where `restore` writes: `out` itself, or for a split set `STEM-0000i-of-0000n.gguf` beside it."""
    if count == 1:
        return [out]
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", out.name.removesuffix(".gguf"))
    return [out.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def restore(inp: Path, out: Path) -> list[Path]:
    """Rewrite the original llama.cpp-layout file(s) of relayout file `inp`, byte-identical.

    Each original file is written front to back like a copy: its header, gap bytes and other tensors
    are ranges of `inp`, and each `_exps` tensor is the matching part of its layer's records, expert by
    expert (`_restore_units`); the relayout writer's batches read those ranges into two reused buffers
    and write them with large sequential writes on a second thread. Why: one pread, allocation and
    three scattered small writes per record left restore at 0.63–0.77x `cp`. Compressed records must be
    decompressed whole, so they are still read once each and their parts written where they belong.
    """
    inp, out = Path(inp), Path(out)
    header, lay = open_layout(inp)
    tensors = {t.name: t for t in header.tensors}
    paths = restore_paths(out, len(lay.index["files"]))
    fd_in = os.open(inp, os.O_RDONLY)
    fds: list[int] = []
    try:
        where: dict[str, tuple[int, int]] = {}  # compressed input: original _exps tensor → (output fd, offset)
        for path, spec in zip(paths, lay.index["files"]):
            fd = os.open(temp_path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.ftruncate(fd, spec["size"])  # zero gaps come for free
            batch = _Batcher(fd, [fd_in], 1, lambda i, crc, n: None, checksums=False,
                             buffer=max(1, min(CHUNK // 2, spec["size"])))
            try:
                for i, (pos, name, u) in enumerate(_restore_units(spec, tensors, lay)):
                    if u is None:
                        where[name] = (fd, pos)
                    else:
                        batch.add(i, u, pos)
                batch.drain()
            finally:
                batch.close()
        if lay.compression is not None:
            for _, layer, e in sorted((lay.record(la, e)[0], la, e) for la in lay.layers for e in range(lay.n_expert)):
                offset, size = lay.record(layer, e)
                rec = memoryview(lay.decode(layer, e, _pread_all(fd_in, size, offset)))
                for part in lay.parts(layer):
                    fd, off = where[part["name"]]
                    _pwrite_all(fd, rec[part["offset"] : part["offset"] + part["nbytes"]], off + e * part["nbytes"])
    finally:
        os.close(fd_in)
        for fd in fds:
            os.close(fd)
    for path in paths:
        commit(temp_path(path), path)
    return paths


def _restore_units(spec: dict, tensors: dict[str, TensorInfo], lay: Layout) -> list[tuple[int, str, Unit | None]]:
    """(position, name, where its bytes are in the relayout file) for every non-zero range of one original
    file, in file order: an `_exps` tensor comes one expert's part at a time (consecutive positions, so
    small parts share a write), or, from a compressed input, as one (position, name, None): its records
    must be decoded whole."""
    parts = {p["name"]: (layer, p) for layer in lay.layers for p in lay.parts(layer)}

    def stored(name: str) -> TensorInfo:
        if name not in tensors:
            raise K2ConvError(f"{lay.path}: corrupt relayout index: it names tensor {name!r}, which the file lacks")
        return tensors[name]

    h = stored(spec["header"])
    ranges: list[tuple[int, str, Unit | None]] = [(0, "header", Unit("header", 0, (), [Src(0, h.offset, h.nbytes)]))]
    if spec["gap_blob"]:
        g = stored(spec["gap_blob"])
        ranges += [(pos, "gap", Unit("gap", 0, (), [Src(0, g.offset + at, n)])) for pos, n, at in spec["gaps"] if at >= 0]
    for name, off, n in spec["tensors"]:
        if name not in parts:
            ranges.append((off, name, Unit(name, 0, (), [Src(0, stored(name).offset, n)])))
        elif lay.compression is not None:
            ranges.append((off, name, None))
        else:
            layer, p = parts[name]
            for e in range(lay.n_expert):
                src = Src(0, lay.record(layer, e)[0] + p["offset"], p["nbytes"])
                ranges.append((off + e * p["nbytes"], name, Unit(name, 0, (), [src])))
    return sorted(ranges, key=lambda r: r[0])


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

