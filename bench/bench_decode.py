"""Decode speed of the reference runner on CPU against llama.cpp on the same GGUF (issue 4: goal >= 0.5x).

    .venv/bin/python bench/bench_decode.py [--work DIR] [--recipes q8_0,q4_0-native,Q4_K_M] [--threads 2]
        [--tokens 16] [--prompt-len 32] [--store auto|raw|packed|float] [--no-llama] [--no-cold]

The `slice` checkpoint (true K2.5 per-layer sizes, 3 layers, 16 experts) is written once with
`k2conv synth` and quantized once per recipe with `k2conv quantize`, all cached under --work.

Per recipe it prints:
- decode tok/s of our runner (KV-cached greedy, torch with --threads intra-op threads, expert cache
  unbounded so decode reads nothing after warm-up) and of llama.cpp (llama_cpp.Llama, same n_threads,
  same prompt tokens, greedy), and their ratio — the anchor is measured in the same run;
- bytes read per token with the expert cache off (budget 0: every routed expert read on every token)
  against the model's active bytes per token (routed: k experts x MoE layers of file bytes): they
  must be equal, which shows nothing is read twice or too much;
- cold-cache reads (the file's pages dropped with posix_fadvise DONTNEED, no root needed), cache
  budget 0, `--io mmap` vs `--io direct`: tok/s and MB/s of expert reads;
- peak RSS of the process.

`--gpu` (bench/gpu.sh) measures the CUDA path instead, on the relayout of the q4_0-native GGUF (one
read per expert miss): peak pinned→device bandwidth (a 256 MiB copy: the PCIe roofline), the same
copy at one expert record's size, decode tok/s with every expert a miss (cache budget 0, `--io
direct`: disk → pinned buffer → device) and with every expert cached (reads from HBM only), each
with the achieved GB/s and its fraction of the roofline (HBM's measured by a device-to-device copy).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from k2conv.infer.direct_io import drop_page_cache
from k2conv.infer.expert_cache import load_model
from k2conv.infer.weights import PROJS, open_weights


def sh(*cmd: str) -> None:
    subprocess.run([sys.executable, "-m", "k2conv.cli", *cmd], check=True)


def prepare(work: Path, recipe: str) -> Path:
    """The slice checkpoint's GGUF for `recipe`, made once."""
    ckpt = work / "slice"
    if not (ckpt / "config.json").exists():
        sh("synth", str(ckpt), "--preset", "slice", "--force")
    out = work / f"slice-{recipe}.gguf"
    if not out.exists():
        sh("quantize", str(ckpt), str(out), "--recipe", recipe, "--quiet", "--no-mmproj")
    return out


def prompt_ids(vocab: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(0, vocab - 256, n)]


def ours(path: Path, ids: list[int], n: int, *, budget: int | None, io: str = "mmap", store: str = "auto",
         warm: bool = True) -> dict:  # fmt: skip
    """Decode n tokens after ids; with `warm` the timed steps start after one untimed pass over them.

    `budget`: of the expert cache alone (None: unbounded; resident weights are not counted here)."""
    src = open_weights(path)
    try:
        model, cache, notes = load_model(src, "cpu", io=io, store=store)
        cache.budget = budget
        if warm:  # fill the expert cache with every expert the decode will use
            kv = model.new_cache(len(ids) + n)
            logits = model(ids, kv)
            for _ in range(n):
                logits = model([int(logits[-1].argmax())], kv)
        kv = model.new_cache(len(ids) + n)
        logits = model(ids, kv)
        cache.reset_stats()
        out, t0 = [], time.perf_counter()
        for _ in range(n):
            out.append(int(logits[-1].argmax()))
            logits = model([out[-1]], kv)
        dt = time.perf_counter() - t0
        st = cache.stats
        return {"tok_s": n / dt, "bytes_per_token": st.bytes_read / n, "reads_per_token": st.reads / n,
                "hit_rate": st.hit_rate, "read_mb_s": st.bytes_read / dt / 1e6, "tokens": out, "notes": notes}
    finally:
        src.close()


def llama(path: Path, ids: list[int], n: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + n + 8, n_threads=threads, n_threads_batch=threads,
                          verbose=False, logits_all=False)  # fmt: skip
    try:
        llm.eval(ids)
        out, t0 = [], time.perf_counter()
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return {"tok_s": n / (time.perf_counter() - t0), "tokens": out}
    finally:
        llm.close()


def active_expert_bytes(path: Path) -> int:
    """File bytes of the routed experts one token uses: k experts x MoE layers x one expert's bytes."""
    src = open_weights(path)
    try:
        cfg = src.config
        total = 0
        for layer in range(cfg.num_hidden_layers):
            if cfg.is_moe_layer(layer):
                total += sum(n for _, n, _, _ in src.expert_record(layer, 0).parts.values())
        return total * cfg.num_experts_per_tok
    finally:
        src.close()


def _gbps(fn, nbytes: int, reps: int) -> float:
    """GB/s of `fn` moving nbytes, timed with CUDA events after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9


def relaid(work: Path, gguf: Path) -> Path:
    """The relayout of `gguf` (one aligned record per expert), made once under `work`."""
    from k2conv.layouts.relayout import relayout

    path = work / f"{gguf.stem}-relayout.gguf"
    if not path.exists():
        relayout([gguf], path, align=4096)
    return path


def storage_gbps(path: Path) -> tuple[float, float]:
    """GB/s of reading the whole file: O_DIRECT in 64 MiB requests (the device), and copied out of a
    warm page cache through mmap (what `--io mmap` gets once the file is cached)."""
    from k2conv.infer.direct_io import DirectReader

    size, chunk = path.stat().st_size, 64 << 20
    reader = DirectReader(path, pin=torch.cuda.is_available())
    t0 = time.perf_counter()
    for off in range(0, size - chunk + 1, chunk):
        reader.read(off, chunk)
    disk = (size // chunk) * chunk / (time.perf_counter() - t0) / 1e9
    reader.close()
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out = np.empty(chunk, dtype=np.uint8)
    for off in range(0, size - chunk + 1, chunk):  # warm the cache, then time a second pass
        out[:] = mapped[off : off + chunk]
    t0 = time.perf_counter()
    for off in range(0, size - chunk + 1, chunk):
        out[:] = mapped[off : off + chunk]
    cached = (size // chunk) * chunk / (time.perf_counter() - t0) / 1e9
    del mapped
    return disk, cached


def gpu(work: Path, tokens: int, prompt_len: int) -> None:
    """The CUDA path: H2D roofline, expert-record copies, decode all-miss and all-hit."""
    if not torch.cuda.is_available():
        print("no CUDA device: GPU bench skipped")
        return
    dev = torch.device("cuda")
    path = relaid(work, prepare(work, "q4_0-native"))
    print(f"== GPU {torch.cuda.get_device_name(dev)}: {path}")
    big = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(big, device=dev)
    h2d_peak = _gbps(lambda: dst.copy_(big, non_blocking=True), big.nbytes, 10)
    d2d = torch.empty_like(dst)
    hbm_peak = _gbps(lambda: d2d.copy_(dst), 2 * dst.nbytes, 20)  # a copy reads and writes every byte
    src = open_weights(path)
    rec = src.layout.record(1, 0)[1]
    src.close()
    small, small_dst = big[:rec], dst[:rec]
    h2d_rec = _gbps(lambda: small_dst.copy_(small, non_blocking=True), rec, 200)
    disk, cached = storage_gbps(path)
    print(f"H2D pinned 256 MiB  {h2d_peak:7.1f} GB/s (PCIe roofline);  HBM copy {hbm_peak:7.0f} GB/s (HBM roofline)")
    print(f"H2D one record      {h2d_rec:7.1f} GB/s ({rec:,} bytes) = {h2d_rec / h2d_peak:.0%} of the PCIe roofline")
    print(f"file reads          {disk:7.1f} GB/s O_DIRECT 64 MiB;  {cached:7.1f} GB/s from the page cache (mmap copy)")
    # a miss moves storage -> host buffer -> device: its roofline is the slower of the two links
    miss_roof = {"direct": min(h2d_peak, disk), "mmap": min(h2d_peak, cached)}
    ids = prompt_ids(open_weights(path).config.vocab_size, prompt_len)
    for label, budget, io in (("all-miss, --io direct", 0, "direct"), ("all-miss, --io mmap  ", 0, "mmap"),
                              ("all-hit              ", None, "mmap")):  # fmt: skip
        src = open_weights(path)
        model, cache, notes = load_model(src, dev, io=io)
        if budget == 0:
            cache.budget = 0
        kv = model.new_cache(len(ids) + 2 * tokens)
        logits = model(ids, kv)
        for _ in range(tokens if budget is None else 0):  # all-hit: fill the cache first
            logits = model([int(logits[-1].argmax())], kv)
        cache.reset_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = model([int(logits[-1].argmax())], kv)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        st = cache.stats
        line = f"decode {label} {tokens / dt:8.2f} tok/s  hit rate {100 * st.hit_rate:5.1f} %"
        if st.bytes_read:
            gbs, miss = st.bytes_read / dt / 1e9, st.bytes_read / st.fetch_s / 1e9
            line += (f"  expert bytes {gbs:6.2f} GB/s over the step; misses alone {miss:6.2f} GB/s = "
                     f"{miss / miss_roof[io]:.0%} of min(PCIe, {io} read) roofline; fetch {st.fetch_s / dt:.0%} of the time")
        else:  # bytes the step must stream from HBM: resident float32 weights + raw experts + their float32 form
            elems = sum(r * c for _, _, _, (r, c) in next(iter(cache.entries.values())).parts.values())
            raw = next(iter(cache.entries.values())).nbytes
            k_layers = cache.stats.accesses / tokens
            per_tok = model.resident_bytes + k_layers * (raw + 8 * elems)
            gbs = per_tok * tokens / dt / 1e9
            line += f"  ~{gbs:6.0f} GB/s from HBM = {gbs / hbm_peak:.0%} of the HBM roofline"
        print(line + (f"  [{'; '.join(notes)}]" if notes else ""))
        src.close()
        del model, cache
        torch.cuda.empty_cache()
    print(f"peak VRAM {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/k2conv-bench-decode"))
    ap.add_argument("--recipes", default="q8_0,q4_0-native,Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--store", choices=["auto", "raw", "packed", "float"], default="auto",
                    help="expert cache entries (expert_cache.py; auto = packed on the CPU)")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="measure the CUDA path instead (bench/gpu.sh)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        gpu(args.work, args.tokens, args.prompt_len)
        return
    torch.set_num_threads(args.threads)
    for recipe in args.recipes.split(","):
        path = prepare(args.work, recipe)
        cfg = open_weights(path).config
        ids = prompt_ids(cfg.vocab_size, args.prompt_len)
        print(f"== {recipe}: {path} ({path.stat().st_size / 1e9:.2f} GB), {args.threads} threads, "
              f"prompt {len(ids)}, decode {args.tokens}")  # fmt: skip
        r = ours(path, ids, args.tokens, budget=None, store=args.store)
        line = f"runner decode      {r['tok_s']:8.2f} tok/s  (cache {args.store}, hit rate {100 * r['hit_rate']:.0f} %)"
        if not args.no_llama:
            ll = llama(path, ids, args.tokens, args.threads)
            # once one greedy choice differs the sequences diverge: report the common prefix
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ll["tokens"])) if a != b), args.tokens)
            line += f"\nllama.cpp decode   {ll['tok_s']:8.2f} tok/s  ratio runner/llama.cpp {r['tok_s'] / ll['tok_s']:.2f}x"
            line += f"  (greedy tokens equal for the first {same}/{args.tokens}; random weights, near-ties)"
        print(line)
        active = active_expert_bytes(path)
        nocache = ours(path, ids, 4, budget=0, warm=False)
        print(f"bytes read/token   {nocache['bytes_per_token']:,.0f} with the cache off; active routed bytes/token "
              f"{active:,} (ratio {nocache['bytes_per_token'] / active:.3f}); reads/token {nocache['reads_per_token']:.0f} "
              f"({len(PROJS)} per expert in a GGUF)")  # fmt: skip
        if not args.no_cold:  # both layouts: 3 reads per expert miss in the GGUF, 1 in the relayout file
            for layout, file in (("gguf", path), ("relayout", relaid(args.work, path))):
                for io in ("mmap", "direct"):
                    dropped = drop_page_cache(file)
                    c = ours(file, ids, 4, budget=0, io=io, warm=False)
                    note = f" [{'; '.join(c['notes'])}]" if c["notes"] else ""
                    print(f"cold {layout:<8} --io {io:<6} {c['tok_s']:8.2f} tok/s  expert reads {c['read_mb_s']:8.1f} "
                          f"MB/s, {c['reads_per_token']:.0f} reads/token (page cache dropped: {dropped}; cache budget 0){note}")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {peak / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
