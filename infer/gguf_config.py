"""ModelConfig from a deepseek2 GGUF's metadata, so the runner can run GGUFs nobody gave a config.json for.

Our GGUFs record every hyper-parameter of the source (gguf_meta.py); other llama.cpp conversions of Kimi
(e.g. Unsloth's) may lack the YaRN betas (llama.cpp then uses 32 / 1, and so do we, with a note in
`missing`), and older ones lack the `*_mla` head sizes (then key_length/value_length are per head).
`mscale` is not stored anywhere: llama.cpp's graph assumes it equals mscale_all_dim (Kimi: both 1.0),
and so do we.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from k2conv.convert.config import ModelConfig
from k2conv.errors import K2ConvError
from k2conv.gguf_scan import GGUFLayout

ARCH = "deepseek2"
_GATING = {1: "softmax", 2: "sigmoid"}


@dataclass
class GGUFConfig:
    """The parsed config plus the keys that were absent and replaced by llama.cpp's defaults."""

    config: ModelConfig
    missing: list[str] = field(default_factory=list)


def config_from_gguf(header: GGUFLayout, tensor_shapes: dict[str, tuple[int, ...]], where: str) -> GGUFConfig:
    """Build the runner's ModelConfig from a scanned GGUF header (gguf_scan, map open) and the tensors' numpy shapes."""
    arch = header.value("general.architecture")
    if arch != ARCH:
        raise K2ConvError(f"{where}: architecture {arch!r} is not {ARCH!r} (Kimi K2 / DeepSeek-V3)")
    missing: list[str] = []

    def get(key: str, default: Any = None, *, note: bool = False) -> Any:
        v = header.value(f"{ARCH}.{key}")
        if v is None:
            if default is None and not note:
                raise K2ConvError(f"{where}: metadata key {ARCH}.{key} is missing")
            if note:
                missing.append(f"{ARCH}.{key}")
            return default
        return v

    def f32(v: float) -> float:
        """GGUF floats are float32: use the value the file holds, as llama.cpp does."""
        return float(np.float32(v))

    n_head = int(get("attention.head_count"))
    kv_lora = int(get("attention.kv_lora_rank"))
    rope_dim = int(get("rope.dimension_count"))
    k_len = header.value(f"{ARCH}.attention.key_length_mla")
    v_len = header.value(f"{ARCH}.attention.value_length_mla")
    if k_len is None or v_len is None:  # pre-MLA-cache conversions: per-head sizes in key/value_length
        k_len, v_len = get("attention.key_length"), get("attention.value_length")
    qk_head, v_head = int(k_len), int(v_len)
    q_lora = header.value(f"{ARCH}.attention.q_lora_rank")

    rope_scaling: dict[str, Any] | None = None
    if header.value(f"{ARCH}.rope.scaling.type") == "yarn":
        mscale_all_dim = f32(get("rope.scaling.yarn_log_multiplier", 0.0, note=True)) / 0.1
        mscale_all_dim = round(mscale_all_dim, 6)  # 0.1·x stored as float32; undo the rounding noise
        rope_scaling = {
            "type": "yarn",
            "factor": f32(get("rope.scaling.factor")),
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
            "beta_fast": f32(get("rope.scaling.yarn_beta_fast", 32.0, note=True)),
            "beta_slow": f32(get("rope.scaling.yarn_beta_slow", 1.0, note=True)),
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        }
    n_expert = int(get("expert_count", 0, note=True))
    vocab = header.value(f"{ARCH}.vocab_size")
    if vocab is None:
        vocab = tensor_shapes["token_embd.weight"][0]

    def tok(key: str) -> int | None:
        v = header.value(f"tokenizer.ggml.{key}")
        return int(v) if v is not None else None

    variant = header.value("general.source.k2conv.variant") or "gguf"
    cfg = ModelConfig(
        variant=str(variant),
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        moe_intermediate_size=int(get("expert_feed_forward_length", 0)) if n_expert else 0,
        num_hidden_layers=int(get("block_count")),
        first_k_dense_replace=int(get("leading_dense_block_count", 0, note=True)),
        n_routed_experts=n_expert,
        num_experts_per_tok=int(get("expert_used_count", 0)) if n_expert else 0,
        n_shared_experts=int(get("expert_shared_count", 0)) if n_expert else 0,
        num_attention_heads=n_head,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=kv_lora,
        qk_nope_head_dim=qk_head - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_head,
        vocab_size=int(vocab),
        max_position_embeddings=int(get("context_length")),
        rope_theta=f32(get("rope.freq_base", 10000.0, note=True)),
        rope_scaling=rope_scaling,
        routed_scaling_factor=f32(get("expert_weights_scale", 1.0, note=True)) if n_expert else 1.0,
        scoring_func=_GATING.get(int(get("expert_gating_func", 1, note=True)), "softmax") if n_expert else "softmax",
        n_group=int(get("expert_group_count", 1, note=True)) if n_expert else 1,
        topk_group=int(get("expert_group_used_count", 1, note=True)) if n_expert else 1,
        norm_topk_prob=bool(get("expert_weights_norm", False)) if n_expert else False,
        rms_norm_eps=f32(get("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=tok("bos_token_id"),
        eos_token_id=tok("eos_token_id"),
        pad_token_id=tok("padding_token_id"),
    )
    return GGUFConfig(cfg, missing)
