"""Read a GGUF header without trusting it: every length is checked against the bytes that remain.

gguf-py's GGUFReader trusts the file: an array that claims 2⁶⁰ scalars past the end of the file
makes it loop forever on empty slices, and a lying string length makes it allocate. Everything in
k2conv that opens a GGUF it did not just write (imatrix files, `verify --integrity`, the runner)
goes through `scan_gguf` first, which enforces what ggml's gguf.cpp enforces, so a file passing it
is one llama.cpp loads: little-endian v2/v3, lengths within the file, ≤ 4 dims, known types, unique
names shorter than GGML_MAX_NAME, tensors contiguous at their aligned offsets, and the whole padded
data section present. Work and memory are bounded by the file size (every loop consumes bytes),
and every problem is one K2ConvError line naming the file.

The scan also returns where each KV value and tensor lives, so callers can read the values they need
(`GGUFLayout.value`, `.string`, `.scalar`, `.array`, `.strings`) and view tensors (`.tensor_bytes`) without
building GGUFReader's per-element views of a 160k-token vocabulary (~20 s and ~0.6 GiB per open).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from k2conv.errors import K2ConvError

#: ggml's GGML_MAX_NAME: a GGUF tensor name must be shorter than this or gguf.cpp refuses the file.
GGML_MAX_NAME = 64
#: ggml's GGUF_MAX_STRING_LENGTH / GGUF_MAX_ARRAY_ELEMENTS.
GGUF_MAX_STRING = 1 << 30
GGUF_MAX_ARRAY = 1 << 30
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAGIC = b"GGUF"

SCALAR_SIZE = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip
_SCALAR_FORMAT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


class Buffer(Sized, Protocol):
    """What the scan reads from: a numpy uint8 memmap, an mmap.mmap or bytes."""

    def __getitem__(self, key: slice) -> Any: ...


class Cursor:
    """Bounds-checked little-endian reads from a byte buffer; every overrun is a K2ConvError."""

    def __init__(self, buf: Buffer, where: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.where = where

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> int:
        """Reserve n bytes for `what`; returns their offset."""
        if n < 0 or n > self.left:
            raise K2ConvError(
                f"{self.where}: truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.left} left"
            )
        at = self.pos
        self.pos += n
        return at

    def unpack(self, fmt: str, what: str) -> int:
        at = self.need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, at)[0]  # type: ignore[arg-type]

    def raw(self, n: int, what: str) -> bytes:
        at = self.need(n, what)
        return bytes(self.buf[at : at + n])

    def text(self, n: int, what: str) -> str:
        data = self.raw(n, what)
        try:
            s = data.decode("utf-8")
        except UnicodeDecodeError:
            raise K2ConvError(f"{self.where}: {what} is not valid UTF-8: {data[:40]!r}") from None
        if "\0" in s:
            raise K2ConvError(f"{self.where}: {what} contains a NUL byte: {s[:40]!r}")
        return s


@dataclass(frozen=True)
class KVInfo:
    """Where one KV pair's value lives: type, element type and count for arrays, byte offset of the value.

    For a scalar array `value_at` is the first element; for a string, the 8-byte length before it.
    """

    key: str
    vtype: GGUFValueType
    itype: GGUFValueType | None
    count: int
    value_at: int
    start: int = 0  # the KV pair's bytes, key length first: [start, end)
    end: int = 0


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order (ne0 first)
    qtype: GGMLQuantizationType
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass
class GGUFLayout:
    """A validated GGUF header: KV locations, tensor infos, where the data section starts."""

    path: str
    buf: Buffer
    size: int
    version: int
    alignment: int
    kv: dict[str, KVInfo]
    tensors: list[TensorInfo]
    header_end: int  # end of the tensor infos
    data_start: int
    data_end: int = field(default=0)  # end of the last tensor's padding

    def pad(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def string(self, key: str) -> str | None:
        """A STRING value, or None when absent or of another type."""
        kv = self.kv.get(key)
        if kv is None or kv.vtype != GGUFValueType.STRING:
            return None
        n = struct.unpack_from("<Q", self.buf, kv.value_at)[0]  # type: ignore[arg-type]
        return bytes(self.buf[kv.value_at + 8 : kv.value_at + 8 + n]).decode("utf-8")

    def scalar(self, key: str) -> int | float | bool | None:
        """A scalar (integer, float or bool) value, or None when absent or not a scalar."""
        kv = self.kv.get(key)
        if kv is None or kv.vtype not in _SCALAR_FORMAT:
            return None
        return struct.unpack_from(_SCALAR_FORMAT[kv.vtype], self.buf, kv.value_at)[0]  # type: ignore[arg-type]

    def u32_array(self, key: str) -> np.ndarray | None:
        """A UINT32 ARRAY value as a little-endian numpy copy, or None when absent or of another type."""
        kv = self.kv.get(key)
        return self.array(key) if kv is not None and kv.itype == GGUFValueType.UINT32 else None

    def array(self, key: str) -> np.ndarray | None:
        """An ARRAY of numbers or bools (any scalar element type) as a numpy copy, or None when absent or not one."""
        kv = self.kv.get(key)
        if kv is None or kv.vtype != GGUFValueType.ARRAY or kv.itype not in _SCALAR_FORMAT:
            return None
        width = SCALAR_SIZE[kv.itype]
        data = bytes(self.buf[kv.value_at : kv.value_at + width * kv.count])
        return np.frombuffer(data, dtype=_SCALAR_FORMAT[kv.itype]).copy()  # struct codes are numpy's too

    def strings(self, key: str) -> list[str] | None:
        """An ARRAY of STRING value (a vocabulary, its merges), or None when absent or of another type.

        The scan checked every length and the UTF-8, so this is one walk over a copy of the value's bytes:
        ~0.3 s for K2's 330k tokenizer strings, where GGUFReader builds two numpy views per string (~20 s)."""
        kv = self.kv.get(key)
        if kv is None or kv.vtype != GGUFValueType.ARRAY or kv.itype != GGUFValueType.STRING:
            return None
        data = bytes(self.buf[kv.value_at : kv.end])
        out: list[str] = []
        pos, unpack = 0, _U64.unpack_from
        for _ in range(kv.count):
            n = unpack(data, pos)[0]
            out.append(data[pos + 8 : pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        return out

    def value(self, key: str) -> Any:
        """Any value as gguf-py's `ReaderField.contents()` gives it (a scalar, a str, or a list of either), or
        None when absent: the runner's metadata readers take their values from here instead of a GGUFReader."""
        kv = self.kv.get(key)
        if kv is None:
            return None
        if kv.vtype == GGUFValueType.STRING:
            return self.string(key)
        if kv.vtype != GGUFValueType.ARRAY:
            return self.scalar(key)
        if kv.itype == GGUFValueType.STRING:
            return self.strings(key)
        return self.array(key).tolist()  # type: ignore[union-attr]  # the scan allows no other element type

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """Tensor `t`'s bytes as a view of `buf` (read-only for a map), shaped (*ne[:0:-1], bytes per row): the
        layout of GGUFReader's `tensor.data.view(np.uint8)` for every type, rows first as numpy orders them."""
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        shape = (*reversed(t.ne[1:]), t.ne[0] // block * type_size) if t.ne else (t.nbytes,)
        data = np.frombuffer(self.buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)  # type: ignore[call-overload]
        try:
            return data.reshape(shape)
        except (ValueError, OverflowError):  # an empty tensor beside dims past numpy's (and ggml's) sizes
            raise K2ConvError(f"{self.path}: corrupt GGUF: tensor {t.name!r} has impossible shape {list(t.ne)}") from None


_U64 = struct.Struct("<Q")
_BATCH = 1 << 16  # strings walked per bulk check (bounds the walk's memory whatever the file claims)


def _skip_strings(cur: Cursor, key: str, count: int) -> None:
    """Walk the `count` strings of array `key` and check each as `string()` does (length within the file
    and GGUF_MAX_STRING, valid UTF-8, no NUL), a batch at a time: a 160k-token vocabulary and its merges are
    330k strings, 1 s at ~3 µs each one by one. The walk only reads lengths; each batch's bytes are then
    checked at once, its length fields overwritten with ASCII (which no multi-byte UTF-8 sequence contains,
    so the whole decodes iff every string does). Any batch that fails is walked again string by string,
    which raises the exact error the one-by-one scan would."""
    buf, size, unpack = cur.buf, cur.size, _U64.unpack_from
    for first in range(0, count, _BATCH):
        start = pos = cur.pos
        heads: list[int] = []
        try:
            for _ in range(min(_BATCH, count - first)):
                heads.append(pos)
                pos += 8 + unpack(buf, pos)[0]  # type: ignore[arg-type]
        except (struct.error, OverflowError):
            pos = -1  # a length field past the end, or a length beyond any offset
        if 0 <= pos <= size:
            at = np.asarray(heads, dtype=np.int64) - start
            lengths = np.diff(np.append(at, pos - start)) - 8
            region = bytearray(buf[start:pos])
            np.frombuffer(region, dtype=np.uint8)[(at[:, None] + np.arange(8)).ravel()] = 0x0A
            if int(lengths.max()) <= GGUF_MAX_STRING and b"\0" not in region:
                try:
                    region.decode("utf-8")
                    cur.pos = pos
                    continue
                except UnicodeDecodeError:
                    pass
        for j in range(first, first + len(heads)):  # this batch has a bad string: find it, one by one
            _string(cur, f"{key}[{j}]")  # raises (and were it ever not to, leaves cur.pos right)


def _string(cur: Cursor, what: str) -> str:
    """One GGUF string: u64 length, then that many bytes of UTF-8 without NUL."""
    n = cur.unpack("<Q", f"{what} length")
    if n > GGUF_MAX_STRING or n > cur.left:
        raise K2ConvError(f"{cur.where}: corrupt GGUF: {what} length {n} exceeds the {cur.left} bytes left")
    return cur.text(n, what)


def scan_gguf(buf: Buffer, src: str, *, kind: str = "GGUF") -> GGUFLayout:
    """Walk and validate the header in `buf` (the whole file); see the module docstring.

    `kind` names the file in messages ("GGUF imatrix" for imatrix files).
    """
    cur = Cursor(buf, src)
    if cur.size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
        raise K2ConvError(f"{src}: not a GGUF file (no GGUF magic)")
    cur.need(4, "magic")
    version = cur.unpack("<I", "GGUF version")
    if version & 0xFFFF == 0 and version:
        raise K2ConvError(f"{src}: big-endian {kind} files are not supported (llama.cpp cannot read them)")
    if version not in (2, 3):
        raise K2ConvError(f"{src}: unsupported GGUF version {version} (llama.cpp reads 2 and 3)")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key count")
    if n_kv > cur.left // 13 or n_tensors > cur.left // 24:
        raise K2ConvError(f"{src}: corrupt GGUF: claims {n_kv} keys and {n_tensors} tensors in a {cur.size}-byte file")

    def string(what: str) -> str:
        return _string(cur, what)

    alignment = GGUF_DEFAULT_ALIGNMENT
    kvs: dict[str, KVInfo] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = string("key")
        if not key or key in kvs:
            raise K2ConvError(f"{src}: corrupt GGUF: empty or duplicate key {key!r}")
        raw_type = cur.unpack("<I", f"type of {key!r}")
        try:
            vtype = GGUFValueType(raw_type)
        except ValueError:
            raise K2ConvError(f"{src}: corrupt GGUF: key {key!r} has unknown type {raw_type}") from None
        value_at, itype, count = cur.pos, None, 1
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise K2ConvError(f"{src}: corrupt GGUF: general.alignment must be u32")
            alignment = cur.unpack("<I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise K2ConvError(f"{src}: corrupt GGUF: alignment {alignment} is not a power of 2")
        elif vtype == GGUFValueType.STRING:
            string(f"value of {key!r}")
        elif vtype == GGUFValueType.ARRAY:
            raw_itype = cur.unpack("<I", f"element type of {key!r}")
            try:
                itype = GGUFValueType(raw_itype)
            except ValueError:
                itype = GGUFValueType.ARRAY  # reported just below
            count = cur.unpack("<Q", f"length of {key!r}")
            if itype == GGUFValueType.ARRAY or raw_itype != itype:
                raise K2ConvError(f"{src}: corrupt GGUF: array {key!r} has unsupported element type {raw_itype}")
            value_at = cur.pos
            if itype == GGUFValueType.STRING:
                if count > GGUF_MAX_ARRAY or count > cur.left // 8:
                    raise K2ConvError(f"{src}: corrupt GGUF: array {key!r} claims {count} strings ({cur.left} bytes left)")
                _skip_strings(cur, key, count)
            else:
                width = SCALAR_SIZE[itype]
                if count > GGUF_MAX_ARRAY or count * width > cur.left:
                    raise K2ConvError(f"{src}: corrupt GGUF: array {key!r} claims {count} values ({cur.left} bytes left)")
                cur.need(count * width, f"array {key!r}")
        else:
            cur.need(SCALAR_SIZE[vtype], f"value of {key!r}")
        kvs[key] = KVInfo(key, vtype, itype, count, value_at, start, cur.pos)

    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = string(f"name of tensor {i}")
        if len(name.encode()) >= GGML_MAX_NAME or name in names:
            raise K2ConvError(f"{src}: corrupt GGUF: tensor name {name!r} is duplicate or ≥ {GGML_MAX_NAME} bytes")
        names.add(name)
        n_dims = cur.unpack("<I", f"tensor {name!r}: dimension count")
        if n_dims > 4:
            raise K2ConvError(f"{src}: corrupt GGUF: tensor {name!r} has {n_dims} dimensions (at most 4)")
        dims = tuple(cur.unpack("<Q", f"tensor {name!r}: dimension") for _ in range(n_dims))
        raw_type = cur.unpack("<I", f"tensor {name!r}: type")
        offset = cur.unpack("<Q", f"tensor {name!r}: offset")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise K2ConvError(f"{src}: corrupt GGUF: tensor {name!r} has unknown type {raw_type}") from None
        nelem = math.prod(dims)
        if any(d >= 1 << 63 for d in dims) or nelem >= 1 << 63 or (dims[0] if dims else 1) % block:
            raise K2ConvError(f"{src}: corrupt GGUF: tensor {name!r} has impossible shape {list(dims)} for {qtype.name}")
        infos.append((name, dims, qtype, offset, nelem // block * type_size))

    header_end = cur.pos
    data_start = -(-header_end // alignment) * alignment
    expected = 0
    tensors = []
    for name, dims, qtype, offset, nbytes in infos:
        if offset != expected:
            raise K2ConvError(f"{src}: corrupt GGUF: tensor {name!r} at data offset {offset}, expected {expected}")
        expected += -(-nbytes // alignment) * alignment
        if data_start + expected > cur.size:
            raise K2ConvError(
                f"{src}: truncated GGUF: tensor {name!r} (with padding) ends at byte {data_start + expected}, "
                f"the file has {cur.size}"
            )
        tensors.append(TensorInfo(name, dims, qtype, data_start + offset, nbytes))
    return GGUFLayout(src, buf, cur.size, version, alignment, kvs, tensors, header_end, data_start, data_start + expected)


def map_file(path: Path) -> mmap.mmap:
    """A read-only map of the whole file; empty files and directories are one clear error."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise K2ConvError(f"{path}: empty file, not a GGUF")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise K2ConvError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise K2ConvError(f"{path}: is a directory, not a GGUF file") from None
    except (OSError, ValueError) as exc:
        raise K2ConvError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def scan_file(path: Path, *, kind: str = "GGUF") -> GGUFLayout:
    """Map `path` and scan its header (the map stays open as `layout.buf`)."""
    return scan_gguf(map_file(Path(path)), str(path), kind=kind)


def open_gguf_reader(path: Path, mode: str = "r") -> GGUFReader:
    """gguf.GGUFReader on a file that passed `scan_gguf`: hostile files fail as one K2ConvError line."""
    layout = scan_file(Path(path))
    layout.buf.close()  # type: ignore[attr-defined]
    try:
        return GGUFReader(path, mode)  # type: ignore[arg-type]
    except Exception as exc:  # the scan should leave nothing, but GGUFReader is not ours
        raise K2ConvError(f"{path}: unreadable GGUF: {exc.__class__.__name__}: {exc}".splitlines()[0]) from None
