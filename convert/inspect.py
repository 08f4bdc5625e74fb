"""`k2conv inspect`: what a checkpoint (or bare config.json) is, and how big each recipe makes it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from k2conv.convert.hf_layout import logical_weights
from k2conv.convert.naming import expert_of, tensor_class
from k2conv.convert.pipeline import human, make_plan, open_source
from k2conv.errors import K2ConvError
from k2conv.quant.recipe import builtin_names


def _param_class(module: str, suffix: str) -> str:
    if expert_of(module) is not None:
        return "routed experts"
    if module.endswith("kv_b_proj"):
        return "attention"
    try:
        from k2conv.convert.naming import gguf_name

        return tensor_class(gguf_name(module, suffix))
    except KeyError:
        return "other"


def inspect_report(src: Path) -> str:
    cfg, ckpt = open_source(src)
    params: dict[str, int] = defaultdict(int)
    for w in logical_weights(cfg):
        n = 1
        for d in w.shape:
            n *= d
        params[_param_class(w.module, w.suffix)] += n
    total = sum(params.values())
    lines = [
        f"{src}: variant {cfg.variant}, {cfg.num_hidden_layers} layers ({cfg.n_moe_layers} MoE), "
        f"{cfg.n_routed_experts} routed experts ({cfg.num_experts_per_tok} active), hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}",
        f"parameters (text model): {total:,}",
    ]
    lines += [f"  {k:16s} {v:>20,}  ({100 * v / total:5.2f} %)" for k, v in sorted(params.items(), key=lambda kv: -kv[1])]
    lines.append("predicted GGUF size per built-in recipe:")
    folder = Path(src) if ckpt is not None else None
    for name in builtin_names():
        try:
            plan = make_plan(cfg, folder, Path("model.gguf"), name)
        except K2ConvError as exc:  # e.g. an ftype that needs an imatrix
            lines.append(f"  {name:16s} {'—':>20s}  ({exc})")
            continue
        approx = "" if plan.header_exact else " (header estimated without tokenizer)"
        lines.append(f"  {name:16s} {plan.total_size:>20,} bytes  {human(plan.total_size):>12s}{approx}")
    if ckpt is not None:
        ckpt.close()
    return "\n".join(lines)
