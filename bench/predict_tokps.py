"""Predicted decode tok/s of K2.5 on the reference machine (RTX 3060 + Optane), per layout and cache size.

    .venv/bin/python bench/predict_tokps.py [--recipe k2.5-q2_k-xl] [--storage-gbps 39] [--dram-cache-gb 0 64 128]

A bandwidth model, not a measurement: decode of one token reads every resident (non-expert) weight once
from VRAM and the 8 routed experts of each of the 60 MoE layers from wherever they live. The byte counts
are exact (k2conv's plan of the real K2.5 config, tests/data/configs/k2.5.json, with the chosen recipe);
the machine figures are the parameters below (flags), stated in docs/optane-model.md with their sources.

Per token:  t = resident_bytes / vram_gbps
              + sum over active experts of  [hit] bytes / dram_gbps
                                             [miss] bytes / storage_gbps + per_expert_overhead(layout)
with per_expert_overhead = number of I/O operations × their fixed cost: 4 KiB page faults for an mmap of
llama.cpp's layout from a page-cache device (NVMe), three O_DIRECT reads for that layout read directly,
one read for a relayout record. The hit rate of an expert cache of C experts per layer under routing
that is uniform over the 384 experts is C / 384; real routing is skewed (the runner's
--save-routing-stats measures it), so the uniform figure is the pessimistic end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from k2conv.convert.config import load_config
from k2conv.convert.pipeline import make_plan

ROOT = Path(__file__).resolve().parent.parent


def model_bytes(recipe: str) -> tuple[int, int, list[int], int]:
    """(resident bytes on the GPU, embedding bytes (CPU lookups), per MoE layer one expert's bytes, n_expert)."""
    cfg = load_config(ROOT / "tests/data/configs/k2.5.json")
    plan = make_plan(cfg, None, Path("predict.gguf"), recipe)
    per_layer: dict[int, int] = {}
    resident = embed = 0
    for t in plan.tensors:
        if "_exps" in t.name:
            layer = int(t.name.split(".")[1])
            per_layer[layer] = per_layer.get(layer, 0) + t.nbytes // cfg.n_routed_experts
        elif t.name == "token_embd.weight":
            embed += t.nbytes
        else:
            resident += t.nbytes
    return resident, embed, [per_layer[k] for k in sorted(per_layer)], cfg.n_routed_experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="k2.5-q2_k-xl")
    ap.add_argument("--active", type=int, default=8, help="experts per token per layer")
    ap.add_argument("--vram-gb", type=float, default=12.0, help="RTX 3060: 12 GB")
    ap.add_argument("--vram-gbps", type=float, default=360.0, help="RTX 3060 GDDR6 peak")
    ap.add_argument("--storage-gbps", type=float, default=39.0, help="Optane PMem 6 DIMMs interleaved, read")
    ap.add_argument("--dram-gbps", type=float, default=100.0, help="6-channel DDR4-2666 read, achievable")
    ap.add_argument("--nvme-gbps", type=float, default=3.5, help="a PCIe 3.0 x4 NVMe, sequential read")
    ap.add_argument("--fault-us", type=float, default=1.0, help="cost of one 4 KiB page fault with I/O setup")
    ap.add_argument("--read-us", type=float, default=20.0, help="fixed cost of one large O_DIRECT read")
    ap.add_argument("--dram-cache-gb", type=float, nargs="+", default=[0, 64, 128, 256])
    ap.add_argument("--efficiency", type=float, default=0.8, help="fraction of peak bandwidth a kernel reaches")
    args = ap.parse_args()

    resident, embed, expert_bytes, n_expert = model_bytes(args.recipe)
    active = args.active * sum(expert_bytes)
    mean_expert = sum(expert_bytes) / len(expert_bytes)
    print(f"recipe {args.recipe}: resident {resident / 1e9:.2f} GB (VRAM {args.vram_gb} GB), embedding "
          f"{embed / 1e9:.2f} GB (CPU), {len(expert_bytes)} MoE layers, expert {mean_expert / 1e6:.1f} MB mean, "
          f"active expert bytes per token {active / 1e9:.2f} GB")  # fmt: skip
    if resident > args.vram_gb * 1e9:
        print("  note: the resident weights do not fit in VRAM; the model below assumes they do")
    eff = args.efficiency
    t_gpu = resident / (args.vram_gbps * 1e9 * eff)
    layouts = {  # (storage GB/s, fixed cost per expert miss in s)
        "Optane, llama.cpp layout, mmap (DAX: mapped once, no faults after warm-up)": (args.storage_gbps, 0.0),
        "Optane, relayout, O_DIRECT (1 read / expert)": (args.storage_gbps, args.read_us * 1e-6),
        "NVMe, llama.cpp layout, mmap (4 KiB faults, page cache)": (args.nvme_gbps, mean_expert / 4096 * args.fault_us * 1e-6),
        "NVMe, llama.cpp layout, O_DIRECT (3 reads / expert)": (args.nvme_gbps, 3 * args.read_us * 1e-6),
        "NVMe, relayout, O_DIRECT (1 read / expert)": (args.nvme_gbps, args.read_us * 1e-6),
    }  # fmt: skip
    print(f"\nGPU part (resident weights at {eff:.0%} of {args.vram_gbps:.0f} GB/s): {1e3 * t_gpu:.1f} ms/token")
    header = " | ".join(f"cache {gb:.0f} GB (hit {min(1.0, gb * 1e9 / (mean_expert * n_expert * len(expert_bytes))):.0%})"
                        for gb in args.dram_cache_gb)  # fmt: skip
    print(f"\n| storage, layout, path | {header} |")
    print("|---|" + "---|" * len(args.dram_cache_gb))
    for name, (gbps, overhead) in layouts.items():
        cells = []
        for gb in args.dram_cache_gb:
            hit = min(1.0, gb * 1e9 / (mean_expert * n_expert * len(expert_bytes)))  # uniform routing
            misses = (1 - hit) * args.active * len(expert_bytes)
            t = (t_gpu + hit * active / (args.dram_gbps * 1e9 * eff)
                 + (1 - hit) * active / (gbps * 1e9 * eff) + misses * overhead)  # fmt: skip
            cells.append(f"{1 / t:.2f} tok/s")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
