"""zstd on expert records: ratio and decompression GB/s per record type and level, against reading the same
bytes raw from the page cache (the anchor, measured in the same run).

    .venv/bin/python bench/bench_relayout_compress.py --work DIR [--levels 1,3,9,19] [--records 6]
    .venv/bin/python bench/bench_relayout_compress.py A.gguf [B.gguf ...] [--levels ...] [--records ...]

With --work, DIR receives the K2.5 `slice` checkpoint (`k2conv synth --preset slice`: true 7168x2048
experts, 2 MoE layers x 16 experts, 2.6 GB) and its q4_0-native and Q2_K quantizations (reused when present;
the Q2_K one takes minutes on 2 cores). For each GGUF, --records records spread over its relaid layers are
read: exactly the bytes `k2conv relayout` puts in a record (gate+up+down of one expert). Then, per level:

- ratio: record bytes / zstd frame bytes (whole records, as relayout stores them), and per GGML type (each
  part compressed alone, which is what decides whether a type is worth it);
- compress MB/s: one thread (relayout compresses on up to 4);
- decompress GB/s: output bytes per second, one thread, best of 3;
- miss GB/s: one pread of the frame from a page-cache-warm file plus its decompression, vs the anchor: one
  pread of the raw record from a page-cache-warm file (best of 3 each). A miss served from a disk of D GB/s
  costs 1/D + 1/anchor per raw byte uncompressed, 1/(D * ratio) + 1/miss compressed.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard
from gguf import GGMLQuantizationType

from k2conv.layouts.relayout import _plan, _unit_chunks, pad

ALIGN = 4096


def prepare(work: Path) -> list[Path]:
    """The slice checkpoint and its two quantizations in `work` (made once)."""
    k2conv = [sys.executable, "-m", "k2conv.cli"]
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        subprocess.run([*k2conv, "synth", str(ckpt), "--variant", "k2.5", "--preset", "slice"], check=True)
    out = []
    for recipe, name in (("q4_0-native", "slice-q4_0.gguf"), ("Q2_K", "slice-q2_k.gguf")):
        if not (work / name).exists():
            print(f"quantizing {recipe} ...", flush=True)
            subprocess.run([*k2conv, "quantize", str(ckpt), str(work / name), "--recipe", recipe, "--quiet",
                            "--no-mmproj"], check=True)  # fmt: skip
        out.append(work / name)
    return out


def records_of(gguf: Path, n: int) -> list[tuple[bytes, list[tuple[str, int, int]]]]:
    """n records spread over the file: (bytes, [(type name, offset, nbytes) of its parts])."""
    plan = _plan([gguf], ALIGN, "layer", None)
    recs = plan.units[plan.first_record :]
    picks = sorted({round(k * (len(recs) - 1) / max(n - 1, 1)) for k in range(min(n, len(recs)))})
    fd = os.open(gguf, os.O_RDONLY)
    try:
        out = []
        for k in picks:
            layer, _ = plan.keys[k]
            parts = [(GGMLQuantizationType(p["type"]).name, p["offset"], p["nbytes"])
                     for p in plan.index["layers"][str(layer)]["parts"]]
            out.append((b"".join(_unit_chunks(recs[k], [fd])), parts))
        return out
    finally:
        os.close(fd)


def write_aligned(path: Path, blobs: list[bytes]) -> list[tuple[int, int]]:
    """Blobs at aligned offsets (as in a relayout file), read once so the page cache holds them."""
    spans, pos = [], 0
    with open(path, "wb") as f:
        for b in blobs:
            f.seek(pos)
            f.write(b)
            spans.append((pos, len(b)))
            pos = pad(pos + len(b), ALIGN)
    path.read_bytes()
    return spans


def best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_each(fd: int, spans: list[tuple[int, int]], dctx: zstandard.ZstdDecompressor | None = None) -> None:
    """One miss per span, as the runner serves it: a pread into fresh memory (then a decompression into
    fresh memory), the result dropped before the next one (keeping them all would time page faults)."""
    for off, n in spans:
        data = os.pread(fd, n, off)
        if dctx is not None:
            data = dctx.decompress(data)
        del data


def decompress_each(dctx: zstandard.ZstdDecompressor, frames: list[bytes]) -> None:
    for f in frames:
        out = dctx.decompress(f)
        del out


def bench_file(gguf: Path, levels: list[int], n: int, work: Path) -> None:
    recs = records_of(gguf, n)
    raw = [r for r, _ in recs]
    total = sum(map(len, raw))
    kinds = "+".join(t for t, _, _ in recs[0][1])
    raw_path = work / "raw.bin"
    spans = write_aligned(raw_path, raw)
    fd = os.open(raw_path, os.O_RDONLY)
    anchor = total / best_of(3, lambda: read_each(fd, spans)) / 1e9
    os.close(fd)
    print(f"\n{gguf.name}: {len(raw)} records of {len(raw[0]):,} B ({kinds}); anchor: raw record pread from the "
          f"page cache {anchor:.2f} GB/s")
    print("| level | ratio (records) | ratio per type | compress MB/s | decompress GB/s | miss GB/s (pread+decompress) "
          "| miss vs anchor |")
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        t = time.perf_counter()
        frames = [cctx.compress(r) for r in raw]
        c_mbs = total / (time.perf_counter() - t) / 1e6
        stored = sum(map(len, frames))
        per_type: dict[str, list[int]] = {}
        if len({t for _, parts in recs for t, _, _ in parts}) == 1:  # one type: the records' ratio is its ratio
            per_type[recs[0][1][0][0]] = [total, stored]
        for r, parts in recs if not per_type else []:
            for name, off, nbytes in parts:
                acc = per_type.setdefault(name, [0, 0])
                acc[0] += nbytes
                acc[1] += len(cctx.compress(r[off : off + nbytes]))
        dctx = zstandard.ZstdDecompressor()
        d_gbs = total / best_of(3, lambda d=dctx, fs=frames: decompress_each(d, fs)) / 1e9
        zpath = work / f"zstd-{level}.bin"
        zspans = write_aligned(zpath, frames)
        zfd = os.open(zpath, os.O_RDONLY)
        miss = total / best_of(3, lambda d=dctx, z=zfd, sp=zspans: read_each(z, sp, d)) / 1e9
        os.close(zfd)
        zpath.unlink()
        types = ", ".join(f"{k} {a / b:.3f}" for k, (a, b) in per_type.items())
        print(f"| {level} | {total / stored:.3f} | {types} | {c_mbs:.0f} | {d_gbs:.2f} | {miss:.2f} | "
              f"{miss / anchor:.2f}x |", flush=True)
    raw_path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="*", type=Path)
    ap.add_argument("--work", type=Path, default=None, help="make the slice checkpoint and its GGUFs here (kept)")
    ap.add_argument("--levels", default="1,3,9,19")
    ap.add_argument("--records", type=int, default=6)
    args = ap.parse_args()
    if not args.gguf and args.work is None:
        ap.error("give GGUF files or --work DIR")
    files = list(args.gguf)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        files += prepare(args.work)
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(dir=args.work, prefix="bench-zstd-") as tmp:
        for f in files:
            bench_file(f, levels, args.records, Path(tmp))
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; zstd "
          f"{'.'.join(map(str, zstandard.ZSTD_VERSION))}, one thread, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
