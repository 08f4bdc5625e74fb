"""What a Kimi checkpoint must contain: every HF tensor name, shape and dtype, from the config.

The synthetic-checkpoint writer produces exactly this list and the reader checks real files against
it, so both sides agree on one description of the on-disk format (kimi-k2-checkpoints.md §3–§6).
A "linear" is a logical [out, in] matrix; how it is stored (BF16, INT4 pack-quantized triple, or FP8 +
block scales) depends on the variant and on which module it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2conv.convert.config import Fp8Scheme, Int4Scheme, ModelConfig, ceil_div

# Storage kinds of one logical weight.
PLAIN = "plain"  # one tensor `<name>.weight` (or a bias/norm) in its own dtype
INT4 = "int4"  # `<name>.weight_packed` int32, `.weight_scale` bf16, `.weight_shape` int32[2]
FP8 = "fp8"  # `<name>.weight` F8_E4M3 + `.weight_scale_inv` float32 blocks


@dataclass(frozen=True)
class LogicalWeight:
    """One logical tensor of the model, before storage encoding.

    `module` is the HF module path without prefix and without `.weight`
    (e.g. `model.layers.3.mlp.experts.7.down_proj`); `suffix` is `weight`, `bias` or
    `e_score_correction_bias`; `shape` is the logical (dequantized) shape.
    """

    module: str
    suffix: str
    shape: tuple[int, ...]
    storage: str
    dtype: str  # dtype of the stored tensor when PLAIN ("BF16" / "F32")

    @property
    def name(self) -> str:
        return f"{self.module}.{self.suffix}"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as it sits in a safetensors file."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _linear_storage(cfg: ModelConfig, module: str) -> str:
    """Which modules the shipped checkpoints quantize (ignore lists of the real configs)."""
    if isinstance(cfg.quant, Int4Scheme):
        return INT4 if ".mlp.experts." in module else PLAIN
    if isinstance(cfg.quant, Fp8Scheme):
        if module.endswith(("embed_tokens", "lm_head")) or module.endswith(".mlp.gate"):
            return PLAIN
        return FP8
    return PLAIN


def logical_weights(cfg: ModelConfig) -> list[LogicalWeight]:
    """Every text-model weight in the order the HF modeling code declares them."""
    out: list[LogicalWeight] = []

    def linear(module: str, rows: int, cols: int) -> None:
        out.append(LogicalWeight(module, "weight", (rows, cols), _linear_storage(cfg, module), "BF16"))

    def norm(module: str, size: int) -> None:
        out.append(LogicalWeight(module, "weight", (size,), PLAIN, "BF16"))

    h = cfg.hidden_size
    nh = cfg.num_attention_heads
    linear("model.embed_tokens", cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        norm(f"{p}.input_layernorm", h)
        if cfg.q_lora_rank:
            linear(f"{p}.self_attn.q_a_proj", cfg.q_lora_rank, h)
            norm(f"{p}.self_attn.q_a_layernorm", cfg.q_lora_rank)
            linear(f"{p}.self_attn.q_b_proj", nh * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            linear(f"{p}.self_attn.q_proj", nh * cfg.qk_head_dim, h)
        linear(f"{p}.self_attn.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        norm(f"{p}.self_attn.kv_a_layernorm", cfg.kv_lora_rank)
        linear(f"{p}.self_attn.kv_b_proj", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        linear(f"{p}.self_attn.o_proj", h, nh * cfg.v_head_dim)
        norm(f"{p}.post_attention_layernorm", h)
        if cfg.is_moe_layer(layer):
            e_inter = cfg.moe_intermediate_size
            out.append(LogicalWeight(f"{p}.mlp.gate", "weight", (cfg.n_routed_experts, h), PLAIN, "BF16"))
            if cfg.scoring_func == "sigmoid":
                out.append(
                    LogicalWeight(f"{p}.mlp.gate", "e_score_correction_bias", (cfg.n_routed_experts,), PLAIN, "F32")
                )
            for e in range(cfg.n_routed_experts):
                linear(f"{p}.mlp.experts.{e}.gate_proj", e_inter, h)
                linear(f"{p}.mlp.experts.{e}.up_proj", e_inter, h)
                linear(f"{p}.mlp.experts.{e}.down_proj", h, e_inter)
            if cfg.n_shared_experts:
                s_inter = e_inter * cfg.n_shared_experts
                linear(f"{p}.mlp.shared_experts.gate_proj", s_inter, h)
                linear(f"{p}.mlp.shared_experts.up_proj", s_inter, h)
                linear(f"{p}.mlp.shared_experts.down_proj", h, s_inter)
        else:
            linear(f"{p}.mlp.gate_proj", cfg.intermediate_size, h)
            linear(f"{p}.mlp.up_proj", cfg.intermediate_size, h)
            linear(f"{p}.mlp.down_proj", h, cfg.intermediate_size)
    norm("model.norm", h)
    if not cfg.tie_word_embeddings:
        linear("lm_head", cfg.vocab_size, h)
    return out


def stored_tensors(cfg: ModelConfig, w: LogicalWeight) -> list[StoredTensor]:
    """The safetensors entries (with the variant's name prefix) that hold one logical weight."""
    base = cfg.tensor_prefix + w.module
    if w.storage == PLAIN:
        return [StoredTensor(f"{base}.{w.suffix}", w.shape, w.dtype)]
    rows, cols = w.shape
    if w.storage == INT4:
        assert isinstance(cfg.quant, Int4Scheme)
        return [
            StoredTensor(f"{base}.weight_packed", (rows, ceil_div(cols, 8)), "I32"),
            StoredTensor(f"{base}.weight_scale", (rows, ceil_div(cols, cfg.quant.group_size)), "BF16"),
            StoredTensor(f"{base}.weight_shape", (2,), "I32"),
        ]
    assert isinstance(cfg.quant, Fp8Scheme)
    br, bc = cfg.quant.block
    return [
        StoredTensor(f"{base}.weight", (rows, cols), "F8_E4M3"),
        StoredTensor(f"{base}.weight_scale_inv", (ceil_div(rows, br), ceil_div(cols, bc)), "F32"),
    ]
