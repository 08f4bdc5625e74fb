"""Lazy, validated access to one .safetensors file through mmap.

Only the JSON header is parsed up front; tensor bytes are views into a read-only mmap, so
opening the 64 shards of a 595 GB checkpoint costs a few small reads. Every header field is
checked against the file size before use, because a lying length or offset must produce a clear
error, never a huge allocation or a read past the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2conv.errors import K2ConvError

# safetensors dtype → (numpy dtype used to hold the raw bits, bytes per element)
RAW_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live inside its file (offsets relative to the data section)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """Header of one shard plus an on-demand mmap of its data."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries, self.data_start, self.file_size = _read_header(self.path)
        self._mmap: mmap.mmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != self.file_size:
                    raise K2ConvError(f"{self.path}: file changed size while being read")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bits as a read-only numpy view (BF16 as uint16, F8 as uint8)."""
        entry = self.entries.get(name)
        if entry is None:
            raise K2ConvError(f"{self.path.name}: tensor {name} is not in this file")
        dtype = RAW_DTYPES[entry.dtype]
        buf = self._map()
        count = entry.nbytes // dtype.itemsize
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=self.data_start + entry.begin)
        return arr.reshape(entry.shape)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process (they stay in the page cache).

        Mapped file pages count toward RSS until unmapped or advised away; without this, streaming
        a 595 GB checkpoint through one mapping would show the whole model as resident.
        """
        entry = self.entries.get(name)
        if self._mmap is None or entry is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (self.data_start + entry.begin) // mmap.PAGESIZE * mmap.PAGESIZE
        end = self.data_start + entry.end
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # a live numpy view keeps the map open
                self._mmap.close()
            self._mmap = None


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], int, int]:
    """Parse and validate the header: JSON object, known dtypes, sizes, in-bounds non-overlapping offsets."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise K2ConvError(f"{path}: truncated safetensors file ({file_size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise K2ConvError(
                    f"{path}: corrupt safetensors header: header length {header_len} exceeds the file ({file_size} bytes)"
                )
            header_bytes = f.read(header_len)
    except FileNotFoundError:
        raise K2ConvError(f"{path}: shard is missing") from None
    except IsADirectoryError:
        raise K2ConvError(f"{path}: is a directory, not a safetensors file") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, 4300+ digit ints, deep nesting
        raise K2ConvError(f"{path}: corrupt safetensors header: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise K2ConvError(f"{path}: corrupt safetensors header: not a JSON object")

    data_start = 8 + header_len
    data_size = file_size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_size)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.nbytes)
    for (_b0, e0, n0), (b1, _e1, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise K2ConvError(f"{path}: corrupt safetensors header: tensors {n0} and {n1} overlap")
    return entries, data_start, file_size


def _entry(path: Path, name: str, info: object, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict):
        raise K2ConvError(f"{where}: corrupt header entry")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in RAW_DTYPES:
        raise K2ConvError(f"{where}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise K2ConvError(f"{where}: corrupt shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise K2ConvError(f"{where}: corrupt data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise K2ConvError(f"{where}: corrupt data_offsets {offsets!r}")
    if end > data_size:
        raise K2ConvError(
            f"{where}: data ends at byte {end} but the file holds only {data_size} data bytes (truncated shard?)"
        )
    numel = math.prod(shape)  # exact: numpy's int64 product wraps around for lying shapes
    if numel * RAW_DTYPES[dtype].itemsize != end - begin:
        raise K2ConvError(f"{where}: {dtype}{shape} needs {numel * RAW_DTYPES[dtype].itemsize} bytes, offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)
