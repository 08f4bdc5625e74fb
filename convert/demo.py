"""`k2conv demo`: the pipeline end to end on an embedded default (a tiny synthetic K2.5).

It is what README's first command runs on a fresh machine, so it also proves something: the
q4_0-native experts it writes are checked to dequantize exactly to the INT4 source.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.pipeline import make_plan, plan_report
from k2conv.convert.synth import write_checkpoint
from k2conv.convert.writer import check_outputs, write_plan


def run_demo(work_dir: Path, variant: str, echo: Callable[[str], None] = print) -> None:
    """synth → quantize → check → verify → relayout (hot-first from the run's routing) → verify again."""
    import hashlib
    import json

    from k2conv.atomic import write_bytes_atomic
    from k2conv.convert.integrity import verify_integrity
    from k2conv.infer.verify import run_verify
    from k2conv.layouts.relayout import relayout, restore

    work_dir = Path(work_dir)
    ckpt_dir = work_dir / f"{variant}-tiny"
    out = work_dir / f"{variant}-tiny-q4_0-native.gguf"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    echo(f"1/6 synth: writing a tiny {variant} checkpoint in the real on-disk format → {ckpt_dir}")
    write_checkpoint(ckpt_dir, variant=variant, preset="tiny", seed=0)
    ckpt = Checkpoint(ckpt_dir)
    echo("2/6 quantize: recipe q4_0-native (INT4 experts repacked losslessly, the rest Q8_0)")
    plan = make_plan(ckpt.config, ckpt_dir, out, "q4_0-native")
    echo(plan_report(plan))
    check_outputs(plan, force=True)
    write_plan(ckpt, plan, progress=False)
    echo("3/6 check: reading the GGUF back with gguf's reader and dequantizer")
    echo(_check_experts(ckpt, out))
    echo("4/6 verify: the reference runner on the GGUF vs on the source checkpoint")
    report = run_verify(out, ckpt_dir, device="cpu", max_new_tokens=4)
    echo(_summary(report) + " (the non-expert matrices are Q8_0, so small differences are expected)")
    stats = work_dir / "routing.json"
    write_bytes_atomic(stats, json.dumps(report["routing_stats"]).encode())
    relaid = work_dir / f"{variant}-tiny-q4_0-native.relayout.gguf"
    echo(f"5/6 relayout: one aligned record per (layer, expert), most used first (routing from step 4) → {relaid}")
    for line in relayout([out], relaid, order="hot-first", stats=stats).lines():
        echo("  " + line)
    back = restore(relaid, work_dir / "restored.gguf")[0]
    same = hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(out.read_bytes()).digest()
    echo(f"  restore gives back the original file byte for byte: {'yes' if same else 'NO'}")
    back.unlink()
    echo("6/6 verify: the relayout file vs the source, and both files' stored checksums")
    report = run_verify(relaid, ckpt_dir, device="cpu", max_new_tokens=4)
    echo(_summary(report))
    integrity = verify_integrity([out, relaid])
    echo(f"  integrity: {integrity.render().splitlines()[-1].removeprefix('integrity: ')}")
    if not same or integrity.exit_code:
        raise RuntimeError("demo: restore or integrity check failed")  # a bug, never bad input
    echo(f"done: {out} ({out.stat().st_size:,} bytes), {relaid} ({relaid.stat().st_size:,} bytes)")


def _summary(report: dict) -> str:
    speed = report["speed"]["model"]
    return (f"  KL divergence mean {report['kld_mean']:.4g}, top-1 agreement {100 * report['top1_agreement']:.1f} %, "
            f"perplexity ratio {report['ppl_ratio']:.4f} over {report['positions']} positions; "
            f"decode {speed['decode_tok_s'] or 0:.1f} tok/s, expert-cache hit rate {100 * (speed['cache_hit_rate'] or 0):.0f} %")


def _check_experts(ckpt: Checkpoint, gguf_path: Path) -> str:
    """Compare every routed-expert tensor of the GGUF with the dequantized source, bit for bit."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from k2conv.convert.naming import expert_of

    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    checked = exact = 0
    for w in ckpt.weights:
        ex = expert_of(w.module)
        if ex is None:
            continue
        layer, e, proj = ex
        t = tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
        got = dequantize(np.asarray(t.data)[e], t.tensor_type)
        checked += 1
        exact += bool(np.array_equal(got, ckpt.read(w)))
    return f"  {len(reader.tensors)} tensors; routed expert matrices bit-exact vs the INT4 source: {exact}/{checked}"
