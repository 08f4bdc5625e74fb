"""Cold reads of random (layer, expert) pairs: llama.cpp's layout (three slices) vs relayout (one record).

    .venv/bin/python bench/bench_cold_reads.py [--pairs 64] [--experts 32] [--layers 3] [--dir DIR]
    .venv/bin/python bench/bench_cold_reads.py --gguf FILE [--relayout FILE]   # your own files

Without --gguf a deepseek2 GGUF with the real K2.5 expert shapes (7168 x 2048) in the `k2.5-q2_k-xl`
recipe's types (gate/up Q2_K, down Q3_K: 15.9 MB per expert, as in docs/layout.md) is written, with
random bytes in the blocks (only sizes and offsets matter here), then relaid with `k2conv relayout`.

Each pair is read the way a runner would on an expert-cache miss:

* `direct`: O_DIRECT (no page cache, so every read is cold) into one page-aligned buffer. The original
  layout needs three reads per expert (gate, up, down slices of the merged tensors, each widened to 4 KiB
  boundaries as O_DIRECT requires); the relayout file one read of the record.
* `mmap`: the file's pages dropped first (posix_fadvise DONTNEED, no root needed), then the bytes touched
  through a mapping, one load per 4 KiB page: the page-fault path llama.cpp's mmap loading takes, with the
  kernel's readahead. Major faults are counted from getrusage.

Printed: reads issued, bytes, time, MB/s and the ratio relayout / original, for the same pairs in the
same run, plus peak RSS. The anchor is the original layout read the same way.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from k2conv.layouts.relayout import open_layout, relayout

PAGE = 4096
PROJS = ("gate", "up", "down")


def synthetic(path: Path, n_expert: int, layers: int, hidden: int = 7168, inter: int = 2048) -> Path:
    """Real-dimension expert tensors (Q2_K gate/up, Q3_K down) filled with random bytes."""
    w = GGUFWriter(path, "deepseek2")
    w.add_block_count(layers)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((256, hidden)).astype(np.float16))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        for proj, qtype, rows, cols in (("gate", GGMLQuantizationType.Q2_K, inter, hidden),
                                        ("up", GGMLQuantizationType.Q2_K, inter, hidden),
                                        ("down", GGMLQuantizationType.Q3_K, hidden, inter)):  # fmt: skip
            block, type_size = GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (n_expert, rows, cols // block * type_size), dtype=np.uint8)
            w.add_tensor(f"blk.{i}.ffn_{proj}_exps.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Spans:
    """Byte ranges [offset, offset + size) to read for one expert, in one file."""

    file: Path
    ranges: list[tuple[int, int]]


def original_spans(path: Path) -> dict[tuple[int, int], Spans]:
    """(layer, expert) → the three slices of the merged `_exps` tensors in llama.cpp's layout."""
    reader = GGUFReader(path)
    out: dict[tuple[int, int], Spans] = {}
    tensors = {t.name: t for t in reader.tensors}
    layer = 0
    while f"blk.{layer}.ffn_gate_exps.weight" in tensors or layer == 0:
        names = [f"blk.{layer}.ffn_{p}_exps.weight" for p in PROJS]
        if all(n in tensors for n in names):
            for e in range(int(tensors[names[0]].shape[-1])):
                ranges = []
                for n in names:
                    t = tensors[n]
                    per = int(t.n_bytes) // int(t.shape[-1])
                    ranges.append((int(t.data_offset) + e * per, per))
                out[(layer, e)] = Spans(path, ranges)
        layer += 1
        if layer > 4096:
            break
    return out


def relayout_spans(path: Path) -> dict[tuple[int, int], Spans]:
    """(layer, expert) → the one record of a relayout file (O(1) lookup from its metadata)."""
    _, layout = open_layout(path)
    return {(layer, e): Spans(path, [layout.record(layer, e)]) for layer in layout.layers for e in range(layout.n_expert)}


def read_direct(spans: list[Spans], buf: mmap.mmap) -> tuple[int, int, float]:
    """O_DIRECT reads widened to page boundaries; (reads issued, bytes read, seconds)."""
    reads = nbytes = 0
    fds: dict[Path, int] = {}
    t0 = time.perf_counter()
    try:
        for s in spans:
            fd = fds.get(s.file)
            if fd is None:
                fd = fds[s.file] = os.open(s.file, os.O_RDONLY | os.O_DIRECT)
            for off, size in s.ranges:
                start = off - off % PAGE
                end = -(-(off + size) // PAGE) * PAGE
                view, at = memoryview(buf)[: end - start], start
                while view:
                    n = os.preadv(fd, [view], at)
                    reads += 1
                    if n <= 0:  # the last page of the file: O_DIRECT returns a short read
                        break
                    view, at, nbytes = view[n:], at + n, nbytes + n
    finally:
        for fd in fds.values():
            os.close(fd)
    return reads, nbytes, time.perf_counter() - t0


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_mmap_cold(spans: list[Spans]) -> tuple[int, int, float]:
    """Touch every page of each range through a mapping after dropping the file's cached pages;
    (major page faults, bytes, seconds)."""
    files = sorted({s.file for s in spans})
    for f in files:
        drop_cache(f)
    maps = {f: np.memmap(f, dtype=np.uint8, mode="r") for f in files}
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    nbytes, checksum = 0, 0
    t0 = time.perf_counter()
    for s in spans:
        m = maps[s.file]
        for off, size in s.ranges:
            checksum += int(m[off : off + size : PAGE].sum())  # one load per page
            nbytes += size
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0
    del maps
    return faults, nbytes, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="a deepseek2 GGUF in llama.cpp's layout (default: synthetic)")
    ap.add_argument("--relayout", type=Path, help="its relayout (default: made from --gguf)")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--experts", type=int, default=32, help="experts per layer of the synthetic file")
    ap.add_argument("--layers", type=int, default=3, help="MoE layers of the synthetic file")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-cold-"))
    try:
        src = args.gguf or synthetic(work / "in.gguf", args.experts, args.layers)
        rl = args.relayout
        if rl is None:
            rl = work / "rl.gguf"
            relayout([src], rl, PAGE)
        orig, recs = original_spans(src), relayout_spans(rl)
        keys = sorted(orig)
        assert keys == sorted(recs), "the relayout file does not hold the same experts"
        rng = np.random.default_rng(args.seed)
        picks = [keys[i] for i in rng.choice(len(keys), min(args.pairs, len(keys)), replace=False)]
        biggest = max(sum(-(-(o % PAGE + n) // PAGE) * PAGE for o, n in s.ranges) for s in (*orig.values(), *recs.values()))
        buf = mmap.mmap(-1, biggest + PAGE)  # anonymous mappings are page-aligned, as O_DIRECT needs

        rows = []
        for mode in ("direct", "mmap"):
            for name, table in (("original (3 slices)", orig), ("relayout (1 record)", recs)):
                spans = [table[k] for k in picks]
                if mode == "direct":
                    reads, nbytes, sec = read_direct(spans, buf)
                    what = f"{reads} reads"
                else:
                    faults, nbytes, sec = read_mmap_cold(spans)
                    what = f"{faults} major faults"
                rows.append((mode, name, what, nbytes, sec))
        print(f"{len(picks)} random (layer, expert) pairs; expert = {sum(n for _, n in orig[picks[0]].ranges):,} B; "
              f"files: {src.stat().st_size:,} B and {rl.stat().st_size:,} B")  # fmt: skip
        print("| path | layout | issued | MB | s | MB/s | ms / expert | vs original |")
        print("|---|---|---|---|---|---|---|---|")
        for i, (mode, name, what, nbytes, sec) in enumerate(rows):
            anchor = rows[i - i % 2]
            ratio = (nbytes / sec) / (anchor[3] / anchor[4])
            print(f"| {mode} | {name} | {what} | {nbytes / 1e6:,.0f} | {sec:.2f} | {nbytes / 1e6 / sec:,.0f} | "
                  f"{1e3 * sec / len(picks):.1f} | {ratio:.2f}x |")  # fmt: skip
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
