"""deepseek2 KV metadata for a Kimi model, exactly the keys and value types llama.cpp reads.

See gguf-for-kimi.md §2.1: MLA is written as MQA (head_count_kv 1) with the *_mla lengths set,
sigmoid gating is written explicitly (the loader's default is softmax), YaRN's log multiplier is
0.1·mscale_all_dim. The GGUF records the source config's true values (rms eps, yarn betas) even
where llama.cpp ignores them (oracle-notes.md).
"""

from __future__ import annotations

from gguf import ExpertGatingFuncType, GGUFWriter, RopeScalingType

from k2conv import __version__
from k2conv.convert.config import ModelConfig, yarn_log_multiplier

ARCH = "deepseek2"

_DISPLAY_NAMES = {"k2.5": "Kimi-K2.5", "k2-thinking": "Kimi-K2-Thinking", "k2-instruct": "Kimi-K2-Instruct", "bf16": "DeepSeek-V3"}


def add_model_metadata(w: GGUFWriter, cfg: ModelConfig, *, source_name: str, recipe: str, file_type: int) -> None:
    """general.* provenance and every deepseek2.* hyper-parameter."""
    w.add_type("model")
    w.add_name(_DISPLAY_NAMES.get(cfg.variant, "Kimi"))
    w.add_quantized_by(f"k2conv {__version__}")
    w.add_string("general.source.k2conv.checkpoint", source_name)
    w.add_string("general.source.k2conv.variant", cfg.variant)
    w.add_string("general.k2conv.recipe", recipe)
    w.add_string("general.k2conv.version", __version__)
    w.add_file_type(file_type)
    w.add_quantization_version(2)

    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs and rs.get("type") == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_log_mul(yarn_log_multiplier(cfg))
        if "beta_fast" in rs:
            w.add_rope_scaling_yarn_beta_fast(float(rs["beta_fast"]))
        if "beta_slow" in rs:
            w.add_rope_scaling_yarn_beta_slow(float(rs["beta_slow"]))
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.n_routed_experts:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)
        gating = ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid" else ExpertGatingFuncType.SOFTMAX
        w.add_expert_gating_func(gating)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
