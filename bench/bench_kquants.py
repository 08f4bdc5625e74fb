"""Benchmark k2conv's quantizers against ggml's own, on one tensor, in one process.

For every type: weights per second of ours and of ggml_quantize_chunk on the same float32 tensor
(one thread each), their ratio, our speed on 2 threads and the scaling, whether the bytes are
identical, and the process's peak RSS. Needs llama-cpp-python (for ggml's libggml-base).

    .venv/bin/python bench/bench_kquants.py                 # 2048×7168, reference path
    .venv/bin/python bench/bench_kquants.py --imatrix       # also the importance-matrix path
    .venv/bin/python bench/bench_kquants.py --rows 256 --types Q4_K IQ4_XS --repeat 3
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from k2conv.quant import ggml_oracle
from k2conv.quant.kquants import quantize_rows

DEFAULT_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def best_time(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    """Fastest of `repeat` runs (the machine may be shared; the minimum is the least disturbed)."""
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_type(
    qtype: T, data: np.ndarray, imatrix: np.ndarray | None, repeat: int
) -> dict[str, float | bool]:
    """Time ours (1 and 2 threads) and ggml (1 thread) on `data`; check the bytes agree."""
    n = data.size
    quantize_rows(data[:1], qtype, imatrix)  # load the compiled kernel before timing
    t_ours, ours = best_time(lambda: quantize_rows(data, qtype, imatrix, threads=1), repeat)
    t_ggml, ref = best_time(lambda: ggml_oracle.ggml_quantize_chunk(qtype, data, imatrix), repeat)
    t_two, two = best_time(lambda: quantize_rows(data, qtype, imatrix, threads=2), repeat)
    return {
        "ours": n / t_ours / 1e6,
        "ggml": n / t_ggml / 1e6,
        "ratio": t_ggml / t_ours,
        "two": n / t_two / 1e6,
        "scaling": t_ours / t_two,
        "identical": bool(np.array_equal(ours, ref) and np.array_equal(two, ref)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    ap.add_argument("--imatrix", action="store_true", help="also benchmark the importance-matrix path")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest counts")
    args = ap.parse_args(argv)

    if not ggml_oracle.available():
        print("ggml oracle unavailable: install llama-cpp-python (pip install -e .[test])", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    qw = rng.uniform(0.1, 10.0, args.cols).astype(np.float32)
    print(
        f"tensor {args.rows}x{args.cols} float32 ({data.nbytes / 2**20:.0f} MiB), peak RSS {peak_rss_mib():.0f} MiB"
    )
    header = f"{'type':7s} {'path':7s} {'ours 1T':>9s} {'ggml 1T':>9s} {'ratio':>6s} {'ours 2T':>9s} {'scaling':>7s}  bytes"
    print(header + "\n" + "-" * len(header) + "   (weights/s in millions)")
    ok = True
    for name in args.types:
        qtype = T[name]
        for imatrix in [None, qw] if args.imatrix else [None]:
            r = bench_type(qtype, data, imatrix, args.repeat)
            ok &= bool(r["identical"])
            path = "imatrix" if imatrix is not None else "ref"
            print(
                f"{name:7s} {path:7s} {r['ours']:9.1f} {r['ggml']:9.1f} {r['ratio']:6.2f} {r['two']:9.1f} "
                f"{r['scaling']:7.2f}  {'identical' if r['identical'] else 'DIFFERENT'}",
                flush=True,
            )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
