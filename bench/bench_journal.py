"""What the journal and the per-tensor checksums cost: `slice` quantize with them vs without.

Each measured run is a fresh process converting the `slice` checkpoint (true K2.5 per-layer
dimensions) exactly as `k2conv quantize` does, once with the journal + CRC-32Cs + header patch
(the default) and once with `write_plan(integrity=False)` (no journal file, no CRCs, checksum
slots left zero: a benchmark-only switch). Runs alternate on/off so drift on a shared machine hits
both; the figure is the difference of the medians as % of the run without. It also times
`verify_integrity` over the written file (page cache warm) and the pieces of the cost directly:
CRC-32C of every output byte, combining the unit CRCs, the journal lines.

    .venv/bin/python bench/bench_journal.py [--work DIR] [--out-dir DIR] [--recipes q4_0-native,q8_0] [--workers 1,2]
        [--repeat 3] [--settle 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(src: Path, out: Path, recipe: str, workers: int, integrity: bool) -> None:
    """One conversion in this process (plan made, disk synced, then timed); prints its wall time as JSON."""
    from k2conv.convert.pipeline import make_plan, open_source
    from k2conv.convert.writer import write_plan

    cfg, ckpt = open_source(src)
    plan = make_plan(cfg, src, out, recipe)
    for f in plan.files:  # freeing the last run's 2 GB and its writeback must not land in this run's time
        f.path.unlink(missing_ok=True)
    os.sync()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    write_plan(ckpt, plan, workers=workers, progress=False, inputs=[p for p in src.iterdir() if p.is_file()],
               restart=True, integrity=integrity)  # fmt: skip
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu0, "bytes": plan.total_size}))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished workers: unlike wall time, disk noise barely moves it."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(src: Path, out: Path, recipe: str, workers: int, integrity: bool, settle: float = 0.0) -> dict:
    out.unlink(missing_ok=True)
    os.sync()
    time.sleep(settle)  # this VM's disk keeps writing the last run's bytes for seconds after a sync
    cmd = [sys.executable, __file__, "--child", str(src), str(out), recipe, str(workers), str(int(integrity))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def pieces(out: Path) -> dict[str, float]:
    """Direct timings of the cost's parts on the written file."""
    import numpy as np

    from k2conv.convert.integrity import crc32c, crc32c_combine, verify_integrity
    from k2conv.convert.journal import Journal

    data = np.fromfile(out, dtype=np.uint8)
    crc32c(data[: 1 << 20])  # load the kernels first: the conversion's workers get them warm too
    t0 = time.perf_counter()
    for i in range(0, data.size, 32 << 20):
        crc32c(data[i : i + (32 << 20)])
    crc_s = time.perf_counter() - t0
    n_units = max(1, data.size // (8 << 20))
    t0 = time.perf_counter()
    c = 0
    for i in range(n_units):
        c = crc32c_combine(c, i, 8 << 20)
    combine_s = time.perf_counter() - t0
    j = Journal(out.with_suffix(".benchjournal"), "p", {}, {})
    j.create()
    t0 = time.perf_counter()
    for i in range(n_units):
        j.record(i, i)
    journal_s = time.perf_counter() - t0
    j.close()
    j.path.unlink()
    report = verify_integrity([out])
    assert report.exit_code == 0, report.render()
    return {"crc_GBps": data.size / crc_s / 1e9, "crc_s": crc_s, "combine_s": combine_s, "journal_s": journal_s,
            "units": n_units, "verify_GBps": report.gbps, "verify_s": report.seconds}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        src, out, recipe, workers, integrity = sys.argv[2:7]
        child(Path(src), Path(out), recipe, int(workers), integrity == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/k2conv-bench"))
    ap.add_argument("--recipes", default="q4_0-native,q8_0")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out-dir", type=Path, default=None, help="where outputs go (default --work): a disk, or tmpfs "
                    "to take the disk's noise out")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds the disk gets to settle before each run")
    args = ap.parse_args()
    src = args.work / "k2.5-slice"
    if not (src / "config.json").exists():
        print("synthesizing the slice checkpoint (once)…", flush=True)
        subprocess.run([sys.executable, "-m", "k2conv.cli", "synth", str(src), "--variant", "k2.5", "--preset", "slice"],
                       check=True)  # fmt: skip
    for p in src.glob("*.safetensors"):  # warm the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    results = {}
    for recipe in args.recipes.split(","):
        for workers in map(int, args.workers.split(",")):
            out = (args.out_dir or args.work) / f"journal-{recipe}.gguf"
            run(src, out, recipe, workers, True)  # warm-up, not counted: numba's on-disk cache, first-touch pages
            on, off, cpu_on, cpu_off = [], [], [], []
            for _ in range(args.repeat):
                r_off = run(src, out, recipe, workers, False, args.settle)
                r_on = run(src, out, recipe, workers, True, args.settle)
                off.append(r_off["seconds"]), cpu_off.append(r_off["cpu_seconds"])
                on.append(r_on["seconds"]), cpu_on.append(r_on["cpu_seconds"])
            parts = pieces(out)
            m_on, m_off = statistics.median(on), statistics.median(off)
            cost = (m_on - m_off) / m_off * 100
            cpu_cost = (statistics.median(cpu_on) - statistics.median(cpu_off)) / statistics.median(cpu_off) * 100
            direct = (parts["crc_s"] / workers + parts["combine_s"] + parts["journal_s"]) / m_off * 100
            results[f"{recipe}/{workers}"] = {"on_s": on, "off_s": off, "overhead_pct": cost, "direct_pct": direct,
                                              "cpu_on_s": cpu_on, "cpu_off_s": cpu_off, "cpu_overhead_pct": cpu_cost,
                                              "output_bytes": out.stat().st_size, **parts}  # fmt: skip
            print(f"{recipe:12s} workers {workers}: with {m_on:6.2f} s [{min(on):.2f}–{max(on):.2f}], without {m_off:6.2f} s "
                  f"[{min(off):.2f}–{max(off):.2f}] → {cost:+.1f}% wall, {cpu_cost:+.1f}% CPU time "
                  f"(direct: CRC {parts['crc_GBps']:.2f} GB/s over {out.stat().st_size / 1e9:.2f} GB + combine + "
                  f"journal = {direct:.2f}%); verify {parts['verify_GBps']:.2f} GB/s", flush=True)
            out.unlink()
    (args.work / "bench_journal.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
