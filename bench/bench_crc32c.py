"""CRC-32C speed on one thread: the pclmulqdq-folding kernel against the three-stream crc32 kernel.

Prints GB/s (best of N calls on one buffer, default 64 MiB, so memory-bound as in a conversion) of
convert/crc32c.py's kinds "pclmul" (the default where the CPU has it) and "x86" (three crc32
streams, what ran before), zlib.crc32 (another polynomial, for scale) and PyPI `crc32c` if
installed; then the ratio new/old, and what a fresh process pays to load the cached kernels:
`python -c 'from k2conv.convert.crc32c import crc32c; crc32c(bytes(16))'` for each kind, then a
256 KiB call (the x86 kind loads a second kernel for it), and the same after numba's first-call
set-up (~0.3 s, paid by whichever kernel comes first) was done by another kernel: the kernel's own
load. Run it on a quiet machine.

    .venv/bin/python bench/bench_crc32c.py [--mib 64] [--repeat 7] [--fresh 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zlib

import numpy as np

from k2conv.convert.crc32c import crc32c, hardware_kind

CHILD = """
import json, sys, time
kind, warm = sys.argv[1], sys.argv[2] == "1"
t0 = time.perf_counter()
from k2conv.convert.crc32c import crc32c
t1 = time.perf_counter()
if warm:
    crc32c(bytes(16), kind="table")  # numba's first-call set-up, paid once by whichever kernel comes first
t2 = time.perf_counter()
crc32c(bytes(16), kind=kind)
t3 = time.perf_counter()
crc32c(bytes(1 << 18), kind=kind)  # the x86 kind loads its three-stream kernel here
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "small": t3 - t2, "large": t4 - t3}))
"""


def best_gbps(fn, buf: np.ndarray, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn(buf[:4096])  # compile or load before timing
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(buf)
        best = min(best, time.perf_counter() - t)
    return buf.size / best / 1e9


def fresh_process(kind: str, warm: bool, runs: int) -> dict[str, float]:
    """Medians over fresh interpreters: process wall time, module import, first small and first large call."""
    cmd = [sys.executable, "-c", CHILD, kind, str(int(warm))]
    subprocess.run(cmd, check=True, capture_output=True)  # compile into numba's cache if it is not there
    samples: dict[str, list[float]] = {"wall": [], "import": [], "small": [], "large": []}
    for _ in range(runs):
        t = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        samples["wall"].append(time.perf_counter() - t)
        for key, value in json.loads(out.stdout).items():
            samples[key].append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--fresh", type=int, default=5, help="fresh processes per kind for the load time")
    args = ap.parse_args()

    buf = np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8)
    kind = hardware_kind()
    print(f"hardware kind: {kind}; {args.mib} MiB buffer, best of {args.repeat}, one thread")
    new_kind = "pclmul" if kind == "pclmul" else kind
    rows = {f"k2conv crc32c ({new_kind}, new)": lambda b: crc32c(b, kind=new_kind)}
    if kind in ("pclmul", "x86"):
        rows["k2conv crc32c (x86: 3 crc32 streams, old)"] = lambda b: crc32c(b, kind="x86")
    rows["zlib.crc32 (CRC-32, other polynomial)"] = zlib.crc32
    try:
        import crc32c as pypi

        rows["PyPI crc32c"] = pypi.crc32c
    except ImportError:
        pass
    speeds = {}
    for name, fn in rows.items():
        speeds[name] = best_gbps(fn, buf, args.repeat)
        print(f"  {name:44s} {speeds[name]:6.2f} GB/s")
    values = list(speeds.values())
    if kind in ("pclmul", "x86"):
        print(f"  new/old: {values[0] / values[1]:.2f}x")

    print(f"fresh process, cached kernels, ms (median of {args.fresh}):")
    for k in dict.fromkeys([new_kind, "x86"] if kind in ("pclmul", "x86") else [new_kind]):
        cold, warm = fresh_process(k, False, args.fresh), fresh_process(k, True, args.fresh)
        print(f"  kind={k:7s} process {cold['wall'] * 1e3:5.0f}  import {cold['import'] * 1e3:4.0f}  "
              f"first crc32c(bytes(16)) {cold['small'] * 1e3:4.0f}  then 256 KiB {cold['large'] * 1e3:4.1f}  | "
              f"numba warmed: 16 B {warm['small'] * 1e3:4.1f}, 256 KiB {warm['large'] * 1e3:4.1f}")  # fmt: skip

if __name__ == "__main__":
    main()
