"""`k2conv quantize` and `k2conv inspect` glued together: checkpoint + recipe → plan → files."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from gguf import GGUFWriter

from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.config import ModelConfig, load_config
from k2conv.convert.gguf_meta import add_model_metadata
from k2conv.convert.naming import tensor_class
from k2conv.convert.plan import Plan, build_plan, plan_tensors
from k2conv.errors import K2ConvError
from k2conv.quant.imatrix import Imatrix, check_against_plan
from k2conv.quant.recipe import load_recipe, parse_overrides


def make_plan(
    cfg: ModelConfig,
    src: Path | None,
    out: Path,
    recipe_name: str,
    overrides: list[str] = (),  # type: ignore[assignment]
    split_max_size: int = 0,
    imatrix: Imatrix | None = None,
    imatrix_path: Path | None = None,
) -> Plan:
    """The full plan for converting `src` (a checkpoint folder, or None for a bare config)."""
    recipe = load_recipe(recipe_name)
    rules = parse_overrides(list(overrides))
    tensors = plan_tensors(cfg, recipe, rules, has_imatrix=imatrix is not None)
    if imatrix is not None:
        problems = check_against_plan(imatrix, tensors)
        errors = [p.removeprefix("error: ") for p in problems if p.startswith("error: ")]
        if errors:
            raise K2ConvError(errors[0])
        if recipe.ftype is not None:
            from k2conv.quant.imatrix import quantizer_weights
            from k2conv.quant.llama_ftypes import requires_imatrix

            for t in tensors:  # llama-quantize bails out on these rather than write garbage
                if requires_imatrix(t.name, t.qtype, recipe.ftype) and quantizer_weights(imatrix, t.name, t.shape) is None:
                    raise K2ConvError(f"{imatrix.source}: no importance data for {t.name}, which {recipe.ftype} "
                                      f"quantizes to {t.qtype.name} (llama-quantize refuses this too)")
    vocab = None
    if src is not None:
        from k2conv.convert.tokenizer import load_vocab

        vocab = load_vocab(src, cfg)

    def add_metadata(w: GGUFWriter, file_type: int) -> None:
        source_name = src.name if src is not None else "config.json"
        add_model_metadata(w, cfg, source_name=source_name, recipe=recipe.name, file_type=file_type)
        if vocab is not None:
            from k2conv.convert.tokenizer import add_vocab

            add_vocab(w, vocab)
        if imatrix is not None:  # the keys llama-quantize adds
            w.add_string("quantize.imatrix.file", str(imatrix_path.name if imatrix_path else imatrix.source))
            if imatrix.datasets:
                w.add_string("quantize.imatrix.dataset", imatrix.datasets[0])
            w.add_int32("quantize.imatrix.entries_count", len(imatrix.entries))
            if imatrix.chunk_count:
                w.add_int32("quantize.imatrix.chunks_count", imatrix.chunk_count)

    file_type = None
    if recipe.ftype is not None:
        from k2conv.quant.llama_ftypes import FILE_TYPE_IDS

        file_type = FILE_TYPE_IDS[recipe.ftype]
    plan = build_plan(
        cfg, tensors, out, add_metadata, recipe_name=recipe.name, split_max_size=split_max_size,
        header_exact=vocab is not None, file_type=file_type,
    )
    if cfg.vision is not None:
        plan.notes.append("vision tower and projector are not part of the text GGUF (see --mmproj)")
    return plan


def open_source(src: Path) -> tuple[ModelConfig, Checkpoint | None]:
    """A checkpoint folder (validated) or a bare config.json (plan only)."""
    src = Path(src)
    if src.is_file():
        return load_config(src), None
    if not src.exists():
        raise K2ConvError(f"{src}: no such checkpoint folder or config file")
    ckpt = Checkpoint(src)
    return ckpt.config, ckpt


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n}"  # pragma: no cover


def plan_report(plan: Plan) -> str:
    """Exact per-file sizes, then bytes per type and per tensor class."""
    lines = [f"recipe {plan.recipe}: {len(plan.tensors)} tensors in {len(plan.files)} file(s)"]
    for f in plan.files:
        exact = "" if plan.header_exact else " (header without tokenizer: estimate)"
        lines.append(f"  {f.path.name}: {f.size:,} bytes ({human(f.size)}), {len(f.tensors)} tensors{exact}")
    lines.append(f"  total: {plan.total_size:,} bytes ({human(plan.total_size)})")
    by_type: dict[str, int] = defaultdict(int)
    by_class: dict[str, int] = defaultdict(int)
    for t in plan.tensors:
        by_type[t.qtype.name] += t.nbytes
        by_class[tensor_class(t.name)] += t.nbytes
    lines.append("  bytes per type:")
    lines += [f"    {k:8s} {v:>20,}  {human(v):>12s}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])]
    lines.append("  bytes per tensor class:")
    lines += [f"    {k:16s} {v:>20,}  {human(v):>12s}" for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
