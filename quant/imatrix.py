"""Importance matrices (imatrix files) read, written and turned into quantizer weights as llama.cpp does.

An imatrix holds, per weight matrix, Σx² of the activations that met each input column (ne0 values
per matrix) and how many tokens went in (the count). llama-quantize divides one by the other and hands
the result to ``ggml_quantize_chunk`` as the importance weights of every row of that matrix. k2conv
quantizes in-process, so it must produce exactly those float32 values; anything else changes bytes.

Two file formats exist (gguf-for-kimi.md §9; tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp,
tools/quantize/quantize.cpp):

* **GGUF** (current default): ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32). Per entry, F32 tensors
  ``<name>.in_sum2`` (ne {per_mat, n_mat}: raw Σx²), ``<name>.counts`` (ne {1, n_mat}) and
  optionally ``<name>.in_sum`` (raw Σx). Other tensors (e.g. ``.stats``) are ignored, as llama.cpp
  ignores them. MoE entries have one matrix per expert; 3-D dense weights (attn_k_b/v_b) are written
  by current llama-imatrix as one matrix of per_mat = ne0·n_head with a single count.
* **legacy .dat**: int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval,
  float[nval] holding (Σx²/count)·ncall; an optional trailer (int32 chunk count, int32 length,
  dataset name).

What the quantizer receives (quantize.cpp ``load_imatrix``): GGUF → in_sum2/count per matrix, and
1.0 for a matrix with count 0; legacy → value/ncall (the value itself when ncall ≤ 0). llama-quantize
then requires the flat length to equal ne0·ne2 of the tensor (token_embd exempt: quantized without).

Reading is defensive: the file is memory-mapped, every length is checked against the bytes that
remain before anything is sliced or allocated, and every problem is one K2ConvError line naming the
file and the entry. Files llama-quantize accepts read to the same values; a few it would tolerate
(duplicate names, trailing garbage, negative Σx², non-integer layouts) are refused here because no
real writer produces them.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from k2conv.atomic import commit, temp_path
from k2conv.errors import K2ConvError
from k2conv.gguf_scan import GGML_MAX_NAME, GGUF_DEFAULT_ALIGNMENT, Cursor, scan_gguf

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
SUFFIX_SUM = ".in_sum"

_GGUF_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT
_GGUF_VERSION = 3
#: Tensors llama-quantize quantizes without the imatrix when its size is wrong (tensor_name_match_token_embd).
_TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")
#: lround of a count beyond this is undefined in C; no real count comes near it.
_MAX_COUNT = float(1 << 62)


@dataclass
class ImatrixEntry:
    """One weight's statistics, laid out as the file stores them.

    ``sums`` is float32 [n_mat, per_mat] (raw Σx² for GGUF; (Σx²/count)·ncall for legacy, where
    n_mat is 1 and per_mat is nval); ``counts`` int64 [n_mat] (tokens per matrix after llama.cpp's
    lround; legacy: [ncall]); ``in_sum`` optional float32 like ``sums`` (raw Σx, GGUF only).
    per_mat is usually the tensor's ne0, but a 3-D dense weight from current llama-imatrix has one
    matrix of ne0·n_head values: the layout is the file's, and `quantizer_weights` maps it onto the
    tensor exactly as llama-quantize does (by flat length).
    """

    sums: np.ndarray
    counts: np.ndarray
    in_sum: np.ndarray | None = None

    @property
    def n_values(self) -> int:
        return int(self.sums.size)


@dataclass
class Imatrix:
    """A whole imatrix file. ``legacy`` selects the .dat semantics of ``sums``/``counts``.

    ``source`` is the file it came from (for error messages); ``chunk_size`` is 0 for legacy files,
    which do not store it.
    """

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    source: str = "<imatrix>"


class _TensorLike(Protocol):
    """What `check_against_plan` needs of a planned tensor (convert.plan.PlannedTensor fits)."""

    name: str
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------
# reading


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF or legacy .dat imatrix (detected by the GGUF magic, as llama.cpp tries GGUF first).

    Arrays are read-only views of a memory map, so a 1.5 GB Kimi imatrix costs no resident memory
    until used; every value is validated here (finite, Σx² ≥ 0, counts ≥ 0) so later steps need not.
    """
    path = Path(path)
    src = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise K2ConvError(f"{src}: cannot read imatrix: {exc.strerror or exc}") from None
    if size < 4:
        raise K2ConvError(f"{src}: not an imatrix: the file has only {size} bytes")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise K2ConvError(f"{src}: cannot map imatrix: {exc}") from None
    if bytes(mm[:4]) == b"GGUF":
        return _read_gguf(path, mm)
    return _read_dat(src, mm)


def _check_values(src: str, name: str, what: str, values: np.ndarray, nonneg: bool) -> None:
    """Reject NaN/inf (llama-quantize does too) and, for Σx², negative values (no real file has them)."""
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values.reshape(-1)))[0])
        raise K2ConvError(f"{src}: imatrix entry {name!r}: {what} has a non-finite value at index {bad}")
    if nonneg and (values < 0).any():
        bad = int(np.flatnonzero(values.reshape(-1) < 0)[0])
        raise K2ConvError(f"{src}: imatrix entry {name!r}: {what} has a negative value at index {bad}")


def _read_dat(src: str, mm: np.ndarray) -> Imatrix:
    """Legacy format (common_imatrix_load_legacy), with every length checked against the file size."""
    cur = Cursor(mm, src)
    n_entries = cur.unpack("<i", "entry count")
    # the smallest entry is 16 bytes (name length, 1 name byte, ncall, nval, one float minus 1)
    if n_entries < 1:
        raise K2ConvError(f"{src}: not an imatrix: entry count {n_entries} (neither GGUF nor a legacy .dat)")
    if n_entries > cur.left // 17:
        raise K2ConvError(
            f"{src}: not an imatrix or corrupt: claims {n_entries} entries but has room for at most "
            f"{cur.left // 17} ({cur.left} bytes after the header)"
        )
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        label = f"entry {i + 1} of {n_entries}"
        nlen = cur.unpack("<i", f"{label}: name length")
        if nlen < 1 or nlen > cur.left:
            raise K2ConvError(
                f"{src}: corrupt imatrix: {label}: name length {nlen} (only {cur.left} bytes left in the file)"
            )
        name = cur.text(nlen, f"{label}: name")
        ncall = cur.unpack("<i", f"entry {name!r}: ncall")
        nval = cur.unpack("<i", f"entry {name!r}: value count")
        if ncall < 0:
            raise K2ConvError(f"{src}: imatrix entry {name!r}: negative ncall {ncall}")
        if nval < 1 or 4 * nval > cur.left:
            raise K2ConvError(
                f"{src}: corrupt imatrix: entry {name!r}: {nval} values ({4 * nval} bytes) but only "
                f"{cur.left} bytes left in the file"
            )
        if name in entries:
            raise K2ConvError(f"{src}: imatrix entry {name!r} appears twice")
        at = cur.need(4 * nval, f"entry {name!r}: values")
        values = mm[at : at + 4 * nval].view("<f4").reshape(1, nval)
        _check_values(src, name, "values", values, nonneg=True)
        entries[name] = ImatrixEntry(values, np.array([ncall], dtype=np.int64))

    chunk_count = 0
    datasets: list[str] = []
    if cur.left:
        chunk_count = cur.unpack("<i", "trailer: chunk count")
        if chunk_count < 0:
            raise K2ConvError(f"{src}: corrupt imatrix trailer: negative chunk count {chunk_count}")
        if cur.left:
            dlen = cur.unpack("<i", "trailer: dataset name length")
            if dlen < 0 or dlen > cur.left:
                raise K2ConvError(
                    f"{src}: corrupt imatrix trailer: dataset name length {dlen} ({cur.left} bytes left)"
                )
            if dlen:
                datasets.append(cur.text(dlen, "trailer: dataset name"))
        if cur.left:
            raise K2ConvError(f"{src}: corrupt imatrix: {cur.left} unexpected bytes after the trailer")
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True, source=src)


def _u32_field(reader: GGUFReader, src: str, key: str) -> int:
    """A required u32 KV (llama.cpp's gguf_get_val_u32 asserts the type; we report it instead)."""
    fld = reader.fields.get(key)
    if fld is None:
        raise K2ConvError(f"{src}: GGUF imatrix lacks {key} (llama-quantize refuses it: missing imatrix metadata)")
    if fld.types != [GGUFValueType.UINT32]:
        got = "/".join(t.name for t in fld.types)
        raise K2ConvError(f"{src}: GGUF imatrix key {key} must be UINT32, not {got}")
    return int(fld.contents())


def _read_gguf(path: Path, mm: np.ndarray) -> Imatrix:
    """GGUF format (common_imatrix_load + quantize.cpp's metadata check), via gguf.GGUFReader."""
    src = str(path)
    scan_gguf(mm, src, kind="GGUF imatrix")  # GGUFReader trusts lengths: bound them first
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the prescan should leave nothing, but GGUFReader is not ours
        raise K2ConvError(f"{src}: unreadable GGUF imatrix: {exc}") from None

    gtype = reader.fields.get(KEY_TYPE)
    if gtype is not None and (gtype.types != [GGUFValueType.STRING] or gtype.contents() != "imatrix"):
        raise K2ConvError(f"{src}: not an imatrix: {KEY_TYPE} is {gtype.contents()!r}, not 'imatrix'")
    ds = reader.fields.get(KEY_DATASETS)
    if ds is None:
        raise K2ConvError(f"{src}: GGUF imatrix lacks {KEY_DATASETS} (llama-quantize refuses it: missing imatrix metadata)")
    if ds.types[:1] != [GGUFValueType.ARRAY] or (len(ds.types) > 1 and ds.types[1] != GGUFValueType.STRING):
        raise K2ConvError(f"{src}: GGUF imatrix key {KEY_DATASETS} must be an array of strings")
    datasets = [str(s) for s in ds.contents()] if ds.data else []
    chunk_count = _u32_field(reader, src, KEY_CHUNK_COUNT)
    chunk_size = _u32_field(reader, src, KEY_CHUNK_SIZE)

    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (SUFFIX_SUM2, SUFFIX_COUNTS, SUFFIX_SUM):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                base = t.name[: -len(suffix)]
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise K2ConvError(f"{src}: imatrix entry {base!r}: {suffix[1:]} must be F32, not {t.tensor_type.name}")
                parts.setdefault(base, {})[suffix] = np.asarray(t.data).reshape(-1)
                break
    if not parts:
        raise K2ConvError(f"{src}: GGUF imatrix has no entries (no <tensor>.in_sum2 / .counts pairs)")

    entries: dict[str, ImatrixEntry] = {}
    for name in sorted(parts):
        got = parts[name]
        if SUFFIX_SUM2 not in got or SUFFIX_COUNTS not in got:
            raise K2ConvError(f"{src}: imatrix entry {name!r}: in_sum2 and counts must come as a pair, found {sorted(got)}")
        sums, raw_counts = got[SUFFIX_SUM2], got[SUFFIX_COUNTS]
        n_mat = raw_counts.size
        if n_mat < 1 or sums.size < 1 or sums.size % n_mat:
            raise K2ConvError(f"{src}: imatrix entry {name!r}: {sums.size} sums do not split into {n_mat} matrices")
        _check_values(src, name, "in_sum2", sums, nonneg=True)
        _check_values(src, name, "counts", raw_counts, nonneg=True)
        if (raw_counts >= _MAX_COUNT).any():
            raise K2ConvError(f"{src}: imatrix entry {name!r}: a count is out of range ({raw_counts.max()})")
        counts = _lround(raw_counts)
        in_sum = got.get(SUFFIX_SUM)
        if in_sum is not None:
            if in_sum.size != sums.size:
                raise K2ConvError(f"{src}: imatrix entry {name!r}: in_sum has {in_sum.size} values, in_sum2 {sums.size}")
            _check_values(src, name, "in_sum", in_sum, nonneg=False)
            in_sum = in_sum.reshape(n_mat, -1)
        entries[name] = ImatrixEntry(sums.reshape(n_mat, -1), counts, in_sum)
    return Imatrix(entries, datasets, chunk_count, chunk_size, legacy=False, source=src)


def _lround(x: np.ndarray) -> np.ndarray:
    """C lround (halves away from zero) of float32 values, exact: x + 0.5 is exact in float64."""
    d = x.astype(np.float64)
    return (np.sign(d) * np.floor(np.abs(d) + 0.5)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# what llama-quantize hands to ggml_quantize_chunk


def _flat_weights(im: Imatrix, entry: ImatrixEntry) -> np.ndarray:
    """quantize.cpp load_imatrix: the flat float32 vector llama-quantize keeps for one entry."""
    sums = np.asarray(entry.sums, dtype=np.float32)
    if im.legacy:
        ncall = int(entry.counts[0]) if entry.counts.size else 0
        if ncall > 0:
            return (sums / np.float32(ncall)).reshape(-1)  # float / (float) int64, as in C
        return sums.reshape(-1).copy()
    out = np.ones(sums.shape, dtype=np.float32)
    counts = np.asarray(entry.counts).astype(np.float32)  # (float) int64
    live = counts > 0
    out[live] = sums[live] / counts[live, None]
    return out.reshape(-1)


def n_matrices(shape: Sequence[int]) -> int:
    """How many ne0-wide importance vectors a tensor takes: ne2 (experts, heads) or 1 for 2-D."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        return int(shape[0])
    raise ValueError(f"imatrix weights exist for 2-D and 3-D tensors only, not shape {tuple(shape)}")


def quantizer_weights(im: Imatrix, tensor_name: str, shape: Sequence[int]) -> np.ndarray | None:
    """The float32 importance llama-quantize gives ggml_quantize_chunk for `tensor_name`, as [n_mat, ne0].

    `shape` is numpy order (last axis ne0; merged experts (n_expert, rows, ne0); attn_k_b
    (n_head, kv_lora, nope)). Row block m of the tensor (expert m, head m, or the whole 2-D matrix
    for m = 0) must be quantized with ``weights[m]``. None when the file has no entry (llama-quantize
    then quantizes without one) or when a token_embd entry has the wrong size (llama-quantize ignores
    it); a wrong size for any other tensor is the error llama-quantize aborts with.
    """
    entry = im.entries.get(tensor_name)
    if entry is None:
        return None
    ne0, n_mat = int(shape[-1]), n_matrices(shape)
    if entry.n_values != ne0 * n_mat:
        if tensor_name in _TOKEN_EMBD:
            return None
        raise K2ConvError(
            f"{im.source}: imatrix entry {tensor_name!r} has {entry.n_values} values but tensor "
            f"{tensor_name} {tuple(shape)} needs ne0·n_mat = {ne0}·{n_mat} = {ne0 * n_mat} "
            "(an imatrix made for another model?)"
        )
    return _flat_weights(im, entry).reshape(n_mat, ne0)


def _llama_quantizes(name: str, shape: Sequence[int]) -> bool:
    """Whether llama-quantize would quantize (and so look up the imatrix of) this tensor at all."""
    return (
        len(shape) >= 2
        and name.endswith("weight")
        and not name.endswith("_norm.weight")
        and "ffn_gate_inp" not in name
    )


def check_against_plan(im: Imatrix, plan_tensors: Iterable[_TensorLike]) -> list[str]:
    """Messages for an imatrix that does not fit this model: ``"error: …"`` or ``"warning: …"``.

    Errors are what llama-quantize would abort on (a wrong size for a tensor it quantizes) or an
    imatrix with nothing for this model; warnings are what it silently tolerates (entries for tensors
    that do not exist, a matrix split that differs from the tensor's, tensors quantized without
    importance data).
    """
    src = im.source
    msgs: list[str] = []
    tensors = {t.name: tuple(t.shape) for t in plan_tensors}
    unknown = sorted(n for n in im.entries if n not in tensors)
    matched = len(im.entries) - len(unknown)
    if unknown:
        head = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        msgs.append(f"warning: {src}: {len(unknown)} imatrix entries name no tensor of this model: {head}")
    if im.entries and not matched:
        msgs.append(f"error: {src}: no imatrix entry matches a tensor of this model (made for another model?)")
    for name, shape in tensors.items():
        entry = im.entries.get(name)
        if entry is None or not _llama_quantizes(name, shape) or len(shape) > 3:
            continue
        ne0, n_mat = shape[-1], n_matrices(shape)
        if entry.n_values != ne0 * n_mat:
            level = "warning" if name in _TOKEN_EMBD else "error"
            what = "ignored, quantized without" if level == "warning" else "llama-quantize would abort"
            msgs.append(
                f"{level}: {src}: imatrix entry {name!r} has {entry.n_values} values, tensor {shape} "
                f"needs {ne0}·{n_mat} = {ne0 * n_mat} ({what})"
            )
        elif entry.sums.shape[1] not in (ne0, ne0 * n_mat):
            msgs.append(
                f"warning: {src}: imatrix entry {name!r} is split into {entry.sums.shape[0]} matrices of "
                f"{entry.sums.shape[1]}, the tensor into {n_mat} of {ne0} (same total; counts apply oddly)"
            )
    missing = [n for n, s in tensors.items() if n not in im.entries and _llama_quantizes(n, s)]
    if missing and matched:
        head = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        msgs.append(f"warning: {src}: {len(missing)} weight tensors have no imatrix entry (quantized without): {head}")
    return msgs


# ---------------------------------------------------------------------------------------------------
# writing


def _validate_for_write(im: Imatrix) -> None:
    """Programming errors in an in-memory Imatrix are ValueErrors, not bad-input K2ConvErrors."""
    if not im.entries:
        raise ValueError("an imatrix needs at least one entry")
    for name, e in im.entries.items():
        if not name or "\0" in name:
            raise ValueError(f"bad imatrix entry name {name!r}")
        if e.sums.ndim != 2 or e.counts.ndim != 1 or e.counts.shape[0] != e.sums.shape[0] or e.sums.size < 1:
            raise ValueError(f"imatrix entry {name!r}: sums {e.sums.shape} and counts {e.counts.shape} disagree")
        if e.in_sum is not None and e.in_sum.shape != e.sums.shape:
            raise ValueError(f"imatrix entry {name!r}: in_sum {e.in_sum.shape} vs sums {e.sums.shape}")
        if not np.isfinite(e.sums).all() or (np.asarray(e.counts) < 0).any():
            raise ValueError(f"imatrix entry {name!r}: non-finite sums or negative counts")


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def write_imatrix_gguf(path: str | os.PathLike[str], im: Imatrix) -> None:
    """Write `im` in llama-imatrix's GGUF layout, atomically (temp name, fsync, rename).

    Same keys, key order and tensors as save_imatrix: per sorted name ``.in_sum2`` {per_mat, n_mat},
    ``.counts`` {1, n_mat} and, when present, ``.in_sum``; no general.architecture; 32-byte alignment
    with the last tensor padded too (gguf.cpp reads the whole padded data section). Written by hand
    because gguf.GGUFWriter cannot write the empty ``imatrix.datasets`` array llama.cpp requires to
    be present. A legacy-origin `im` is written in the one GGUF form that gives llama-quantize
    identical weights: sums = its value/ncall and counts = 1 (a .dat holds no token counts).
    """
    _validate_for_write(im)
    final = Path(path)
    tensors: list[tuple[str, np.ndarray, tuple[int, int]]] = []
    for name in sorted(im.entries):
        e = im.entries[name]
        for suffix in (SUFFIX_SUM2, SUFFIX_COUNTS, SUFFIX_SUM):
            if len((name + suffix).encode()) >= GGML_MAX_NAME:
                raise K2ConvError(
                    f"{final}: imatrix entry {name!r}: GGUF tensor name {name + suffix!r} would be ≥ "
                    f"{GGML_MAX_NAME} bytes, which llama.cpp cannot read"
                )
        if im.legacy:
            sums = _flat_weights(im, e).reshape(1, -1)
            counts = np.ones(1, np.float32)
            in_sum = None
        else:
            sums = np.asarray(e.sums, dtype=np.float32)
            counts = np.asarray(e.counts).astype(np.float32)  # (float) int64, as llama-imatrix
            in_sum = None if e.in_sum is None else np.asarray(e.in_sum, dtype=np.float32)
        n_mat, per_mat = sums.shape
        tensors.append((name + SUFFIX_SUM2, sums, (per_mat, n_mat)))
        tensors.append((name + SUFFIX_COUNTS, counts, (1, n_mat)))
        if in_sum is not None:
            tensors.append((name + SUFFIX_SUM, in_sum, (per_mat, n_mat)))

    head = io.BytesIO()
    head.write(b"GGUF" + struct.pack("<IQQ", _GGUF_VERSION, len(tensors), 4))
    head.write(_gguf_string(KEY_TYPE) + struct.pack("<I", GGUFValueType.STRING) + _gguf_string("imatrix"))
    head.write(_gguf_string(KEY_DATASETS) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, len(im.datasets)))
    for d in im.datasets:
        head.write(_gguf_string(d))
    for key, val in ((KEY_CHUNK_COUNT, im.chunk_count), (KEY_CHUNK_SIZE, im.chunk_size)):
        if not 0 <= val < 1 << 32:
            raise ValueError(f"{key} {val} does not fit u32")
        head.write(_gguf_string(key) + struct.pack("<II", GGUFValueType.UINT32, val))
    offset = 0
    for tname, arr, (ne0, ne1) in tensors:
        head.write(_gguf_string(tname) + struct.pack("<IQQIQ", 2, ne0, ne1, GGMLQuantizationType.F32, offset))
        offset += -(-arr.nbytes // _GGUF_ALIGNMENT) * _GGUF_ALIGNMENT
    header = head.getvalue()
    temp = temp_path(final)
    try:
        with open(temp, "wb") as f:
            f.write(header + b"\0" * (-len(header) % _GGUF_ALIGNMENT))
            for _, arr, _ in tensors:
                f.write(np.ascontiguousarray(arr, dtype="<f4").data)
                f.write(b"\0" * (-arr.nbytes % _GGUF_ALIGNMENT))
        commit(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_imatrix_dat(path: str | os.PathLike[str], im: Imatrix) -> None:
    """Write `im` as a legacy .dat, atomically, with save_imatrix_legacy's semantics.

    From GGUF-origin data: names sorted; entries whose every count is 0 skipped; ncall =
    ceil(max count / chunk_size); each value (Σx²/count_of_its_matrix)·ncall in float32, and 1·ncall
    for a count-0 matrix; trailer = chunk_count and the last dataset name. A legacy-origin `im` is
    written back unchanged (byte-identical round trip).
    """
    _validate_for_write(im)
    final = Path(path)
    if not im.legacy and im.chunk_size <= 0:
        raise K2ConvError(f"{final}: a legacy imatrix needs chunk_size > 0 to compute ncall (got {im.chunk_size})")
    if not 0 <= im.chunk_count < 1 << 31:
        raise K2ConvError(f"{final}: chunk_count {im.chunk_count} does not fit the legacy format's int32")
    names = [n for n in sorted(im.entries) if im.legacy or np.asarray(im.entries[n].counts).any()]
    if not names:
        raise K2ConvError(f"{final}: every imatrix entry has count 0; a legacy file would be empty")
    temp = temp_path(final)
    try:
        with open(temp, "wb") as f:
            f.write(struct.pack("<i", len(names)))
            for name in names:
                ncall, values = _dat_values(im, im.entries[name])
                blob = name.encode("utf-8")
                if not -(1 << 31) <= ncall < 1 << 31 or values.size >= 1 << 31:
                    raise K2ConvError(f"{final}: imatrix entry {name!r}: ncall {ncall} or {values.size} values overflow int32")
                f.write(struct.pack("<i", len(blob)) + blob + struct.pack("<ii", ncall, values.size))
                f.write(np.ascontiguousarray(values, dtype="<f4").data)
            dataset = im.datasets[-1].encode("utf-8") if im.datasets else b""
            f.write(struct.pack("<ii", im.chunk_count, len(dataset)) + dataset)
        commit(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _dat_values(im: Imatrix, e: ImatrixEntry) -> tuple[int, np.ndarray]:
    """(ncall, flat float32 values) of one legacy entry: stored as is, or scaled as save_imatrix_legacy."""
    if im.legacy:
        return int(e.counts[0]), np.asarray(e.sums, dtype=np.float32).reshape(-1)
    counts = np.asarray(e.counts, dtype=np.int64)
    ncall = (int(counts.max()) + im.chunk_size - 1) // im.chunk_size  # ceiling: no accidental zeros
    sums = np.asarray(e.sums, dtype=np.float32)
    cnt = counts.astype(np.float32)[:, None]
    zero = cnt == 0  # a count-0 matrix stores 1·ncall
    one = np.float32(1)
    values = (np.where(zero, one, sums) / np.where(zero, one, cnt)) * np.float32(ncall)
    return ncall, values.astype(np.float32).reshape(-1)
