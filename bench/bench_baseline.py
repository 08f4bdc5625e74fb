"""verify baselines: bytes per position and KLD error of the top-k approximation, against the full logits.

    .venv/bin/python bench/bench_baseline.py [--preset tiny] [--recipes q8_0,q4_0-native,Q2_K] [--sim]

Synthesizes a checkpoint of --preset (every synth preset has the tiny 2,048-token vocabulary), quantizes
it with each recipe, runs the reference runner on the source and on each GGUF over the built-in text
prompts, and prints for k = 8 … 128: the baseline's size per position (anchor: the full float32 logits
per position, ratio in the same run), its KLD lower bound and its reported estimate against the full
KLD of the same logits (anchor), and the reference's mass outside the top k. `--sim` adds simulated
LLM-like distributions over Kimi's real 163,840-token vocabulary (Gaussian background logits plus a
few standing-out continuations, the model = reference + iid logit noise): not a model run, a check of
the estimator where the vocabulary is realistic. Peak RSS at the end.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from k2conv.cli import main
from k2conv.convert.synth import write_checkpoint
from k2conv.infer.baseline import (
    compare_to_baseline,
    read_baseline,
    save_baseline,
)
from k2conv.infer.prompts import resolve_prompts
from k2conv.infer.verify import _run, compare
from k2conv.infer.weights import open_weights

KS = (8, 16, 32, 64, 128)


def study(name: str, ref_logits: list[np.ndarray], model_logits: list[np.ndarray], seqs: list[list[int]], cfg,
          folder: Path) -> None:  # fmt: skip
    full = compare(model_logits, ref_logits, seqs)["kld_mean"]
    n_pos = sum(len(s) for s in seqs)
    vocab = ref_logits[0].shape[-1]
    print(f"{name}: full-vocabulary KLD {full:.5g} over {n_pos} positions (vocab {vocab})")
    for k in KS:
        path = folder / f"k{k}.k2b"
        size = save_baseline(path, ref_logits, seqs, cfg, k=k)
        base = read_baseline(path)
        got = compare_to_baseline(model_logits, base)
        lb, est = got["kld_lower_bound"]["mean"], got["kld_mean"]
        size_s = f"{size / n_pos:6.0f} B/pos ({size / n_pos / (4 * vocab):.5f}x full f32 logits)"
        print(f"  k={k:3d}: {size_s}; lower bound {lb:.5g} ({100 * (lb / full - 1):+6.1f} %), "
              f"estimate {est:.5g} ({100 * (est / full - 1):+5.1f} %), tail mass {100 * got['baseline_tail_mass']:.1f} %")


def simulated(folder: Path, cfg, positions: int = 96, vocab: int = 163840) -> None:
    """`cfg` only labels the file (sizes are what matter here; the vocabulary comes from the logits)."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((positions, vocab)).astype(np.float32) * 2.0
    for i in range(positions):
        n = int(rng.integers(1, 30))
        ref[i, rng.choice(vocab, n, replace=False)] += rng.uniform(6, 18, n).astype(np.float32)
    seq = [int(t) for t in rng.integers(0, vocab, positions)]
    for noise in (0.05, 0.3):
        model = ref + rng.standard_normal(ref.shape).astype(np.float32) * np.float32(noise)
        study(f"simulated, logit noise {noise}", [ref], [model], [seq], cfg, folder)


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "slice"])
    ap.add_argument("--recipes", default="q8_0,q4_0-native,Q2_K")
    ap.add_argument("--sim", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = write_checkpoint(folder / "src", variant="k2.5", preset=args.preset)
        cfg = open_weights(src).config
        ggufs = []
        for recipe in args.recipes.split(","):
            out = folder / f"{recipe}.gguf"
            res = CliRunner().invoke(main, ["quantize", str(src), str(out), "--recipe", recipe, "--quiet", "--no-mmproj"])
            assert res.exit_code == 0, res.output
            ggufs.append((recipe, out))
        prompts = resolve_prompts(cfg, ggufs[0][1], src).ids
        ref = _run(src, prompts, "cpu", None, max_new_tokens=0)
        for recipe, path in ggufs:
            got = _run(path, prompts, "cpu", None, max_new_tokens=0)
            study(f"{args.preset} {recipe}", ref["logits"], got["logits"], prompts, cfg, folder)
        if args.sim:
            simulated(folder, cfg)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main_()
