"""Quantize the `slice` checkpoint (true K2.5 per-layer dimensions) and compare with `cp`.

Prints, for each recipe: wall time, source MB/s, weights/s, peak RSS of the quantize process, and
the ratio of its throughput to `cp` of the same source bytes measured in the same run (page cache
warm for both: the source is read once before timing), as medians of --repeat alternating runs.

    .venv/bin/python bench/bench_quantize.py [--work DIR] [--recipes q4_0-native,q8_0] [--workers 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of a child process (RSS via wait4's rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def source_stats(ckpt: Path) -> tuple[int, int]:
    """(bytes of all shards, number of text-model weights) of the checkpoint."""
    from k2conv.convert.config import load_config
    from k2conv.convert.hf_layout import logical_weights

    nbytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    cfg = load_config(ckpt)
    weights = 0
    for w in logical_weights(cfg):
        n = 1
        for d in w.shape:
            n *= d
        weights += n
    return nbytes, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/k2conv-bench"))
    ap.add_argument("--recipes", default="q4_0-native,q8_0")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds of cp and quantize; medians count")
    ap.add_argument("--settle", type=float, default=6.0,
                    help="seconds to let the disk settle before each copy (this VM's host cache keeps writing ~5 s)")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "k2conv.cli"]
    ckpt = args.work / "k2.5-slice"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").exists():
        print("synthesizing the slice checkpoint (once)…", flush=True)
        subprocess.run([*exe, "synth", str(ckpt), "--variant", "k2.5", "--preset", "slice"], check=True)
    src_bytes, n_weights = source_stats(ckpt)
    for p in ckpt.glob("*.safetensors"):  # warm the page cache for both contenders
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    copy_dir = args.work / "cp-target"

    def cp() -> float:
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy_dir.mkdir()
        wall, _ = run_timed(["bash", "-c", f"cp {ckpt}/*.safetensors {copy_dir}/ && sync -f {copy_dir}"])
        shutil.rmtree(copy_dir)
        return wall

    def settle() -> None:  # the previous copy's writeback must not land in the next one's time
        os.sync()
        time.sleep(args.settle)

    results: dict = {"source_bytes": src_bytes, "weights": n_weights, "repeat": args.repeat}
    print(f"source: {src_bytes / 1e9:.2f} GB, {n_weights / 1e9:.3f} G weights; medians of {args.repeat} "
          f"alternating runs (cp q q cp ...)")
    for recipe in args.recipes.split(","):
        out = args.work / f"slice-{recipe}.gguf"
        cmd = [*exe, "quantize", str(ckpt), str(out), "--recipe", recipe, "--quiet", "--force", "--no-mmproj",
               "--workers", str(args.workers)]
        cps, runs = [], []
        for k in range(args.repeat):
            for name in ("cp", "q") if k % 2 == 0 else ("q", "cp"):
                out.unlink(missing_ok=True)
                settle()
                if name == "cp":
                    cps.append(cp())
                else:
                    runs.append(run_timed(cmd))
        cp_wall = statistics.median(cps)
        wall = statistics.median(w for w, _ in runs)
        rss = max(r for _, r in runs)
        rate, cp_rate = src_bytes / wall, src_bytes / cp_wall
        results[recipe] = {"seconds": wall, "runs": [w for w, _ in runs], "cp_seconds": cps, "MBps": rate / 1e6,
                           "weights_per_s": n_weights / wall, "peak_rss": rss, "vs_cp": rate / cp_rate}
        print(f"{recipe:12s} workers={args.workers}: {wall:6.1f} s [{min(w for w, _ in runs):.1f}–"
              f"{max(w for w, _ in runs):.1f}]  {rate / 1e6:7.0f} MB/s source  {n_weights / wall / 1e6:7.1f} M weights/s  "
              f"peak RSS {rss / 2**20:6.0f} MiB  {rate / cp_rate:.2f}x cp ({cp_wall:.1f} s = {cp_rate / 1e6:.0f} MB/s "
              f"[{min(cps):.1f}–{max(cps):.1f}])")
        out.unlink(missing_ok=True)
    print(json.dumps(results))
    print(f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
