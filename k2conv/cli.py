"""The `k2conv` command line: one click group, one thin command per pipeline step.

Commands only parse options and call into the stage packages; every bad input surfaces as a
K2ConvError, printed as one line with exit status 2 (nothing else is written).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click

from k2conv import __version__
from k2conv.errors import K2ConvError


class _Group(click.Group):
    """Turn K2ConvError into `error: <message>` + exit 2, without a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except K2ConvError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="k2conv")
def main() -> None:
    """Convert Kimi K2-family checkpoints into llama.cpp GGUF files, exactly and in one pass.

    \b
    Example (the whole pipeline on a tiny synthetic checkpoint):
      k2conv demo
    """


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--variant", type=click.Choice(["k2.5", "k2-thinking", "k2-instruct"]), default="k2.5",
              show_default=True, help="Which real checkpoint's on-disk format to imitate.")
@click.option("--preset", type=click.Choice(["tiny", "slice"]), default="tiny", show_default=True,
              help="tiny: seconds, <50 MB. slice: true K2.5 per-layer dimensions, few layers/experts.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the weights.")
@click.option("--force", is_flag=True, help="Overwrite OUT_DIR if it exists.")
def synth(out_dir: Path, variant: str, preset: str, seed: int, force: bool) -> None:
    """Write a synthetic checkpoint in the exact on-disk format of a Kimi variant.

    \b
    Example:
      k2conv synth /tmp/k25-tiny --variant k2.5 --preset tiny
    """
    from k2conv.convert.synth import write_checkpoint

    path = write_checkpoint(out_dir, variant=variant, preset=preset, seed=seed, force=force)
    click.echo(f"wrote {variant} {preset} checkpoint to {path}")


def parse_size(text: str) -> int:
    """`50G`, `500M`, `1.5T`, `123456` → bytes, decimal units like gguf-split; `4Ki`, `2Mi` binary."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}
    t = text.strip().upper().removesuffix("B")
    suffix = t[-2:] if t[-2:] in units else t[-1:] if t[-1:] in units else ""
    mult = units.get(suffix, 1)
    number = t[: len(t) - len(suffix)]
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise K2ConvError(f"bad size {text!r} (use e.g. 50G, 500M)") from None
    if value <= 0:
        raise K2ConvError(f"bad size {text!r}: must be positive")
    return value


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--recipe", default="q4_0-native", show_default=True,
              help="Built-in recipe (f32, bf16, q8_0, q4_0-native) or a recipe TOML file.")
@click.option("--override", "overrides", multiple=True, metavar="REGEX=TYPE",
              help="Ordered type rules on GGUF tensor names, tried before the recipe's (repeatable).")
@click.option("--split-max-size", default=None, metavar="SIZE",
              help="Write gguf-split shards of at most SIZE tensor bytes (e.g. 50G).")
@click.option("--target-size", default=None, metavar="SIZE",
              help="Choose every matrix's type so the GGUF lands within 0.5% under SIZE (e.g. 380G), "
                   "least estimated error; prints the mix and the equivalent --override rules.")
@click.option("--imatrix", "imatrix_path", type=click.Path(path_type=Path), default=None,
              help="llama.cpp importance matrix (GGUF or legacy .dat) for the block quantizers.")
@click.option("--workers", type=int, default=None,
              help="Processes quantizing in parallel (default: one per CPU core, at most 8; ~300 MB each).")
@click.option("--dry-run", is_flag=True, help="Print the exact plan (file sizes, bytes per type/class); write nothing.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's progress instead of resuming it.")
@click.option("--allow-inexact-scales", is_flag=True,
              help="INT4→Q4_0: round scales float16 cannot hold (reported) instead of stopping.")
@click.option("--mmproj", type=click.Path(path_type=Path), default=None,
              help="K2.5: where to write the vision projector GGUF (default: mmproj-<OUT stem>.gguf beside OUT).")
@click.option("--mmproj-type", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="Type of the mmproj's matrices.")
@click.option("--no-mmproj", is_flag=True, help="Do not write the vision projector.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def quantize(src: Path, out: Path, recipe: str, overrides: tuple[str, ...], split_max_size: str | None,
             target_size: str | None, imatrix_path: Path | None, workers: int | None, dry_run: bool, force: bool, restart: bool, allow_inexact_scales: bool, mmproj: Path | None,
             mmproj_type: str, no_mmproj: bool, quiet: bool) -> None:
    """Convert a Hugging Face Kimi checkpoint (SRC folder) into GGUF at OUT, in one streaming pass.

    \b
    A killed or interrupted run resumes when the same command is run again (--restart discards).

    \b
    Examples:
      k2conv quantize ./Kimi-K2.5 kimi-k2.5-q4_0.gguf --recipe q4_0-native --split-max-size 50G
      k2conv quantize ./Kimi-K2.5 out.gguf --recipe q8_0 --override 'ffn_down_exps=Q4_0' --dry-run
    """
    from k2conv.convert.pipeline import make_plan, open_source, plan_report
    from k2conv.convert.writer import Options, check_outputs, write_plan

    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 1:
        raise K2ConvError("--workers must be at least 1")
    cfg, ckpt = open_source(src)
    if ckpt is None and not dry_run:
        raise K2ConvError(f"{src}: a bare config can only be planned (--dry-run); give the checkpoint folder")
    split = parse_size(split_max_size) if split_max_size else 0
    imatrix = None
    if imatrix_path is not None:
        from k2conv.quant.imatrix import read_imatrix

        imatrix = read_imatrix(imatrix_path)
    if target_size:
        from k2conv.quant.solver import solve_target_size

        weights = None
        if imatrix is not None:
            from k2conv.convert.plan import plan_layout
            from k2conv.quant.imatrix import quantizer_weights

            weights = {n: w for n, shape, _, _ in plan_layout(cfg) if (w := quantizer_weights(imatrix, n, shape)) is not None}
        solved = solve_target_size(cfg, parse_size(target_size), ckpt=ckpt, imatrix=weights, base_recipe=recipe,
                                   overrides=list(overrides), split_max_size=split, out=out)  # fmt: skip
        click.echo(solved.report())
        overrides = (*overrides, *solved.overrides)
    plan = make_plan(cfg, Path(src) if ckpt else None, out, recipe, list(overrides), split, imatrix, imatrix_path)
    mm_plan = None
    if ckpt is not None and not no_mmproj:
        from k2conv.convert.mmproj import default_mmproj_path, mmproj_status, plan_mmproj

        status = mmproj_status(cfg)
        if status.startswith("ok"):
            mm_plan = plan_mmproj(ckpt, mmproj or default_mmproj_path(out), mmproj_type)
        elif mmproj is not None:
            raise K2ConvError(f"--mmproj: {status}")
        elif cfg.vision is not None:
            click.echo(f"mmproj {status}")
    if dry_run:
        click.echo(plan_report(plan))
        if mm_plan is not None:
            click.echo(mm_plan.summary())
        return
    assert ckpt is not None
    check_outputs(plan, force)
    if mm_plan is not None and mm_plan.out.exists() and not force:
        raise K2ConvError(f"{mm_plan.out}: output exists (use --force to overwrite)")
    inputs = [p for p in Path(src).iterdir() if p.is_file()] + ([imatrix_path] if imatrix_path else [])
    write_plan(ckpt, plan, workers=workers, opts=Options(allow_inexact_scales, imatrix), progress=not quiet,
               inputs=inputs, restart=restart)
    for f in plan.files:
        click.echo(f"wrote {f.path} ({f.size:,} bytes)")
    if mm_plan is not None:
        from k2conv.convert.mmproj import write_mmproj

        path = write_mmproj(ckpt, mm_plan.out, mmproj_type, force=force)
        click.echo(f"wrote {path} ({path.stat().st_size:,} bytes, vision projector)")


def split_set(first: Path) -> list[Path]:
    """`X-00001-of-00003.gguf` → all three shards (a single file → itself)."""
    m = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", first.name)
    if not m:
        return [first]
    stem, count = m.group(1), int(m.group(3))
    paths = [first.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise K2ConvError(f"{missing[0]}: shard of the split set is missing")
    return paths


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--align", default="4K", show_default=True, metavar="SIZE",
              help="Record alignment (4K: no padding for K2.5's record sizes; 2M for huge-page mappings).")
@click.option("--order", type=click.Choice(["layer", "hot-first"]), default="layer", show_default=True,
              help="Record order: by layer then expert, or most used experts first (needs --stats).")
@click.option("--stats", type=click.Path(path_type=Path), default=None, help="Routing statistics JSON for --order hot-first.")
@click.option("--restore", "do_restore", is_flag=True, help="SRC is a relayout file: write back the original GGUF(s), byte-identical.")
@click.option("--dry-run", is_flag=True, help="Print the output size and padding; write nothing.")
@click.option("--compress", default=None, metavar="zstd[:LEVEL]",
              help="Store each record as one zstd frame (LEVEL 1..22, default 3); see docs/layout.md for when it pays.")
def relayout(src: Path, out: Path, align: str, order: str, stats: Path | None, do_restore: bool, dry_run: bool,
             compress: str | None) -> None:
    """Rewrite a GGUF so each (layer, expert) is one contiguous, aligned record (and back).

    SRC may be the first file of a split set; OUT is one relayout GGUF. A killed run resumes.

    \b
    Examples:
      k2conv relayout kimi-00001-of-00008.gguf kimi-experts.gguf --align 4K
      k2conv relayout kimi-experts.gguf kimi-restored.gguf --restore
      k2conv relayout kimi-00001-of-00008.gguf kimi-experts-zstd.gguf --compress zstd:3
    """
    from k2conv.layouts.relayout import relayout as run_relayout
    from k2conv.layouts.relayout import restore

    if do_restore:
        if compress is not None:
            raise K2ConvError("--compress applies when writing a relayout file, not to --restore")
        for path in restore(src, out):
            click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")
        return
    if order == "hot-first" and stats is None:
        raise K2ConvError("--order hot-first needs --stats FILE (routing statistics from the runner)")
    align = align.strip()
    binary = align + "i" if align[-1:].upper() in ("K", "M", "G") else align  # alignments are powers of two
    report = run_relayout(split_set(Path(src)), out, align=parse_size(binary), order=order, stats=stats, dry_run=dry_run,
                          compress=compress)
    for line in report.lines():
        click.echo(line)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="MODEL | FILE...")
@click.option("--integrity", is_flag=True,
              help="Instead of running the model: recheck the CRC-32C of every tensor and header k2conv stored "
                   "in each FILE (any shard names its whole split set). Exit 1 on damage, 2 if not verifiable.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="What MODEL must still be: the HF source checkpoint (or another GGUF).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the full report as JSON.")
@click.option("--max-kld", type=float, default=None, help="Exit 1 when the mean KL divergence exceeds this.")
@click.option("--min-top1", type=float, default=None, help="Exit 1 when top-1 agreement falls below this (0..1).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Text prompts instead of the built-in set: one per line, or a .jsonl file of {\"text\": ...}; "
                   "encoded with the model's own tokenizer (both sides' must agree).")
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path), default=None,
              help="Instead of --reference: compare with a baseline file written by --save-baseline (no reference run).")
@click.option("--save-baseline", type=click.Path(path_type=Path), default=None,
              help="Also write the reference's top-64 log-probabilities per position (zstd, ~350-450 bytes each) "
                   "for later --baseline runs.")
@click.option("--vram-budget", default=None, metavar="SIZE",
              help="Device memory (RAM on --device cpu) for resident weights plus the expert cache, e.g. 20G "
                   "[default: 90% of free VRAM / half of available RAM].")
@click.option("--cache-policy", type=click.Choice(["lru", "lfu"]), default="lru", show_default=True,
              help="Expert cache eviction: least recently or least frequently (aged) used.")
@click.option("--io", "io_mode", type=click.Choice(["mmap", "direct"]), default="mmap", show_default=True,
              help="Read experts through mmap, or with O_DIRECT into reusable (pinned) buffers for files larger than RAM.")
@click.option("--max-new-tokens", type=int, default=16, show_default=True,
              help="Greedy-decode this many tokens after each prompt through the KV cache; those positions are "
                   "scored too (reference teacher-forced on them) and give the decode tok/s and per-token read "
                   "figures (0: no decode).")
@click.option("--save-routing-stats", type=click.Path(path_type=Path), default=None,
              help="Write the model's per-layer expert use (JSON) for `relayout --order hot-first --stats`.")
def verify(paths: tuple[Path, ...], integrity: bool, reference: Path | None, device: str, json_out: Path | None,
           max_kld: float | None, min_top1: float | None, vram_budget: str | None, cache_policy: str, io_mode: str,
           max_new_tokens: int, save_routing_stats: Path | None, prompts_file: Path | None,
           baseline_path: Path | None, save_baseline: Path | None) -> None:
    """Check a converted model against its source with the reference runner: KLD, top-1, perplexity;
    or, with --integrity, check that the files' bytes are still the bytes k2conv wrote.

    \b
    Examples:
      k2conv verify kimi-q4_0.gguf --reference ./Kimi-K2.5 --max-kld 0.05 --json report.json
      k2conv verify kimi-q2_k.gguf --reference ./Kimi-K2.5 --save-baseline k25.baseline
      k2conv verify kimi-relayout.gguf --baseline k25.baseline --io direct --vram-budget 10G \\
          --save-routing-stats routing.json
      k2conv verify --integrity kimi-q2_k-00001-of-00009.gguf kimi-relayout.gguf
    """
    import json

    if integrity:
        _verify_integrity(list(paths), json_out)
        return
    if len(paths) != 1:
        raise K2ConvError(f"verify takes one MODEL (got {len(paths)} paths); several files only with --integrity")
    model = paths[0]

    from k2conv.infer.verify import run_verify

    if reference is None and baseline_path is None:
        raise K2ConvError("--reference or --baseline is required (the source checkpoint, a GGUF, or a saved baseline)")
    if baseline_path is not None and (reference is not None or save_baseline is not None or prompts_file is not None):
        raise K2ConvError("--baseline replaces --reference and fixes the prompts: not with --reference, "
                          "--save-baseline or --prompts")
    if max_new_tokens < 0:
        raise K2ConvError(f"--max-new-tokens {max_new_tokens}: must be >= 0")
    run_options = {"vram_budget": parse_size(vram_budget) if vram_budget else None, "cache_policy": cache_policy,
                   "io": io_mode, "max_new_tokens": max_new_tokens}  # fmt: skip
    try:
        if baseline_path is not None:
            from k2conv.infer.baseline import run_verify_baseline

            report = run_verify_baseline(model, baseline_path, device=device, **run_options)
        else:
            report = run_verify(model, reference, device=device, prompts_file=prompts_file,
                                save_baseline=save_baseline, score_new_tokens=True, **run_options)  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        raise K2ConvError(str(exc)) from None
    routing_stats = report.pop("routing_stats", None)
    rows = [
        ("KL divergence mean / p99 / max", f"{report['kld_mean']:.4g} / {report['kld_p99']:.4g} / {report['kld_max']:.4g}"),
        ("top-1 agreement", f"{100 * report['top1_agreement']:.2f} %"),
        ("perplexity model / reference", f"{report['ppl_model']:.4g} / {report['ppl_ref']:.4g} (ratio {report['ppl_ratio']:.4f})"),
        ("prompts", report.get("prompt_source", str(report["prompts"]))),
    ]
    if "decode" in report:
        d = report["decode"]
        rows.insert(2, (f"decoded positions ({max_new_tokens}/prompt)",
                        f"KLD mean {d['kld_mean']:.4g}, top-1 {100 * d['top1_agreement']:.2f} %"))
    if "kld_method" in report:
        rows.insert(1, ("KL divergence from baseline", f"{report['kld_method']} (lower bound "
                        f"{report['kld_lower_bound']['mean']:.4g}; reference mass outside the top k "
                        f"{100 * report['baseline_tail_mass']:.1f} %)"))
    if "baseline" in report:
        b = report["baseline"]
        rows.append(("baseline written", f"{b['path']} ({b['bytes']:,} bytes, {b['bytes_per_position']:.0f} / position)"))
    speed = report["speed"]["model"]
    rows.append(("model prefill tok/s", f"{speed['prefill_tok_s']:.1f}"))
    rows.append(("expert bytes read / token", f"{speed['expert_bytes_per_token']:,.0f}"))
    rows += _speed_rows(speed)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    if json_out is not None:
        from k2conv.atomic import write_bytes_atomic

        write_bytes_atomic(json_out, json.dumps(report, indent=2).encode())
    if save_routing_stats is not None and routing_stats is not None:
        from k2conv.atomic import write_bytes_atomic

        write_bytes_atomic(save_routing_stats, json.dumps(routing_stats).encode())
        click.echo(f"wrote routing statistics to {save_routing_stats}")
    failed = []
    if max_kld is not None and report["kld_mean"] > max_kld:
        failed.append(f"mean KLD {report['kld_mean']:.4g} > {max_kld}")
    if min_top1 is not None and report["top1_agreement"] < min_top1:
        failed.append(f"top-1 {report['top1_agreement']:.4f} < {min_top1}")
    if failed:
        click.echo("FAILED: " + "; ".join(failed), err=True)
        sys.exit(1)


def _speed_rows(speed: dict) -> list[tuple[str, str]]:
    """verify's decode/cache/memory lines (figures a run did not measure are left out)."""

    def fmt(key: str, spec: str, scale: float = 1.0, unit: str = "") -> str | None:
        v = speed.get(key)
        return None if v is None else f"{v * scale:{spec}}{unit}"

    rows = [
        (f"model decode tok/s ({speed.get('decode_tokens', 0)} tokens)", fmt("decode_tok_s", ".2f")),
        ("decode bytes read / token", fmt("bytes_read_per_token", ",.0f")),
        ("decode reads / token", fmt("reads_per_token", ".1f")),
        (f"expert-cache hit rate ({speed.get('cache_policy')}, decode)", fmt("cache_hit_rate", ".1f", 100, " %")),
        ("peak VRAM", fmt("peak_vram_bytes", ",.0f", 1, " bytes")),
        ("peak RSS", fmt("peak_rss_bytes", ",.0f", 1, " bytes")),
    ]
    return [(k, v) for k, v in rows if v is not None]


def _verify_integrity(paths: list[Path], json_out: Path | None) -> None:
    """`verify --integrity`: one streaming pass per file, a line per file (or per problem), GB/s, exit code."""
    import json

    from k2conv.convert.integrity import verify_integrity

    report = verify_integrity(paths, progress=True)
    click.echo(report.render())
    if json_out is not None:
        from k2conv.atomic import write_bytes_atomic

        doc = {"files": [{"path": str(f.path), "status": f.status, "tensors": f.tensors, "bytes": f.nbytes,
                          "problems": f.problems} for f in report.files],
               "bytes": report.nbytes, "seconds": report.seconds, "gb_per_s": report.gbps,
               "exit_code": report.exit_code}  # fmt: skip
        write_bytes_atomic(json_out, json.dumps(doc, indent=2).encode())
    sys.exit(report.exit_code)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--text", "text_path", type=click.Path(path_type=Path), required=True,
              help="Calibration text (UTF-8), tokenized with the model's own tokenizer.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Where to write the imatrix: llama.cpp's GGUF format, or the legacy format if it ends in .dat.")
@click.option("--chunk", type=int, default=512, show_default=True, help="Tokens per chunk (llama-imatrix's context size).")
@click.option("--chunks", "max_chunks", type=int, default=None, help="Use at most this many chunks.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix --process-output).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def imatrix(model: Path, text_path: Path, out: Path, chunk: int, max_chunks: int | None, process_output: bool,
            device: str) -> None:
    """Compute an importance matrix with the reference runner, for `quantize --imatrix`.

    \b
    Per weight matrix: Σx² of the activations entering it and their count, per expert for merged
    experts (only the tokens routed to each), as llama-imatrix computes it.

    \b
    Example:
      k2conv imatrix ./Kimi-K2.5 --text calibration.txt -o kimi.imatrix.gguf --chunk 512
    """
    from k2conv.infer.imatrix_collect import collect_imatrix
    from k2conv.quant.imatrix import write_imatrix_dat, write_imatrix_gguf

    if max_chunks is not None and max_chunks < 1:
        raise K2ConvError("--chunks must be at least 1")
    im = collect_imatrix(model, text_path, chunk=chunk, max_chunks=max_chunks, device=device,
                         process_output=process_output, progress=lambda s: click.echo(s, err=True))  # fmt: skip
    (write_imatrix_dat if out.suffix == ".dat" else write_imatrix_gguf)(out, im)
    click.echo(f"wrote {out}: {len(im.entries)} entries, {im.chunk_count} chunks of {im.chunk_size} tokens")


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
def inspect(src: Path) -> None:
    """Describe a checkpoint folder or a bare config.json: variant, parameters, predicted GGUF sizes.

    \b
    Example:
      k2conv inspect ./Kimi-K2.5/config.json
    """
    from k2conv.convert.inspect import inspect_report

    click.echo(inspect_report(Path(src)))


@main.command()
@click.argument("work_dir", type=click.Path(path_type=Path), default=Path("k2conv-demo"))
@click.option("--variant", type=click.Choice(["k2.5", "k2-thinking", "k2-instruct"]), default="k2.5", show_default=True)
def demo(work_dir: Path, variant: str) -> None:
    """The whole pipeline on an embedded default: synthesize a tiny checkpoint, quantize it, show the result.

    \b
    Example:
      k2conv demo ./k2conv-demo
    """
    from k2conv.convert.demo import run_demo

    run_demo(work_dir, variant, echo=click.echo)


if __name__ == "__main__":
    main()
