"""HF module paths → llama.cpp deepseek2 GGUF tensor names (the one place naming lives)."""

from __future__ import annotations

import re

# Per-layer module suffix → GGUF name suffix (without `blk.N.` and `.weight`).
_LAYER_NAMES: dict[str, str] = {
    "input_layernorm": "attn_norm",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.q_proj": "attn_q",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj$")


def gguf_name(module: str, suffix: str = "weight") -> str:
    """GGUF name of a non-expert HF weight (kv_b_proj is split elsewhere; experts are stacked)."""
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.weight"
    m = _LAYER_RE.match(module)
    if not m:
        raise KeyError(module)
    layer, rest = m.groups()
    if suffix == "e_score_correction_bias":
        return f"blk.{layer}.exp_probs_b.bias"
    return f"blk.{layer}.{_LAYER_NAMES[rest]}.{suffix}"


def expert_of(module: str) -> tuple[int, int, str] | None:
    """(layer, expert, 'gate'|'up'|'down') for a routed-expert module, else None."""
    m = _LAYER_RE.match(module)
    if not m:
        return None
    e = _EXPERT_RE.match(m.group(2))
    if not e:
        return None
    return int(m.group(1)), int(e.group(1)), e.group(2)


def experts_name(layer: int, proj: str) -> str:
    return f"blk.{layer}.ffn_{proj}_exps.weight"


def layer_of(gguf_tensor: str) -> int | None:
    m = re.match(r"^blk\.(\d+)\.", gguf_tensor)
    return int(m.group(1)) if m else None


def tensor_class(gguf_tensor: str) -> str:
    """Coarse class for size reports: experts, shared experts, attention, dense ffn, embeddings, …"""
    if "_exps." in gguf_tensor:
        return "routed experts"
    if "_shexp." in gguf_tensor:
        return "shared experts"
    if ".attn_" in gguf_tensor and not gguf_tensor.endswith("_norm.weight"):
        return "attention"
    if "ffn_gate_inp" in gguf_tensor or "exp_probs_b" in gguf_tensor:
        return "router"
    if gguf_tensor.endswith("_norm.weight"):
        return "norms"
    if re.search(r"\.ffn_(gate|up|down)\.weight$", gguf_tensor):
        return "dense ffn"
    if gguf_tensor.startswith("token_embd"):
        return "token embedding"
    if gguf_tensor.startswith("output."):
        return "output head"
    return "other"
