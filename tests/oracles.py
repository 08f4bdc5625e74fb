"""Outside implementations used as test oracles: transformers' DeepseekV3 and llama.cpp.

Nothing here is product code. The transformers model is built in float32 from the dequantized
source weights; llama.cpp runs our GGUF through llama-cpp-python with an F32 KV cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.config import ModelConfig
from k2conv.convert.naming import expert_of


def hf_config(cfg: ModelConfig):
    """transformers DeepseekV3Config equivalent to our ModelConfig."""
    from transformers import DeepseekV3Config

    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling and cfg.rope_scaling.get("type") == "yarn":
        rs = cfg.rope_scaling
        rope = {
            "rope_type": "yarn",
            "rope_theta": cfg.rope_theta,
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
            "beta_fast": float(rs.get("beta_fast", 32.0)),
            "beta_slow": float(rs.get("beta_slow", 1.0)),
            "mscale": float(rs.get("mscale", 1.0)),
            "mscale_all_dim": float(rs.get("mscale_all_dim", 0.0)),
        }
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        first_k_dense_replace=cfg.first_k_dense_replace,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_shared_experts=cfg.n_shared_experts,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
    )


def gguf_weight_reader(ckpt: Checkpoint, gguf_path: Path):
    """read(weight) → float32 from a GGUF, dequantized by gguf's own dequantizer (undoing the
    kv_b split and the expert stacking), for running transformers on exactly the GGUF's weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from k2conv.convert.naming import gguf_name

    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors}
    cfg = ckpt.config

    def deq(name: str) -> np.ndarray:
        t = tensors[name]
        return dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)

    def read(w) -> np.ndarray:
        ex = expert_of(w.module)
        if ex is not None:
            layer, e, proj = ex
            return deq(f"blk.{layer}.ffn_{proj}_exps.weight")[e]
        if w.module.endswith("kv_b_proj"):
            layer = w.module.split(".")[2]
            k_b = deq(f"blk.{layer}.attn_k_b.weight").transpose(0, 2, 1)  # (heads, nope, kv_lora)
            v_b = deq(f"blk.{layer}.attn_v_b.weight")  # (heads, v, kv_lora)
            return np.concatenate([k_b, v_b], axis=1).reshape(-1, cfg.kv_lora_rank)
        return deq(gguf_name(w.module, w.suffix)).reshape(w.shape)

    return read


def hf_model(ckpt_dir: Path, *, llamacpp_eps: bool = False, gguf_path: Path | None = None):
    """float32 DeepseekV3ForCausalLM holding the checkpoint's dequantized weights.

    `llamacpp_eps`: give q_a/kv_a layernorms the config's rms_norm_eps, as llama.cpp does, instead
    of the original code's fixed 1e-6 (oracle-notes.md, effect 1).
    `gguf_path`: take the weights from that GGUF (dequantized by gguf) instead of the source.
    """
    import torch
    from transformers import DeepseekV3ForCausalLM

    ckpt = Checkpoint(ckpt_dir)
    cfg = ckpt.config
    read = gguf_weight_reader(ckpt, gguf_path) if gguf_path is not None else ckpt.read
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).float().eval()
    state = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for w in ckpt.weights:
        arr = read(w)
        ex = expert_of(w.module)
        if ex is None:
            new[w.name] = torch.from_numpy(arr)
        else:
            layer, e, proj = ex
            experts.setdefault((layer, proj), {})[e] = arr
    for (layer, proj), by_e in experts.items():
        stacked = np.stack([by_e[e] for e in sorted(by_e)])
        if proj == "down":
            new[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.from_numpy(stacked)
    for layer in {lp[0] for lp in experts}:
        gate = np.stack([experts[(layer, "gate")][e] for e in sorted(experts[(layer, "gate")])])
        up = np.stack([experts[(layer, "up")][e] for e in sorted(experts[(layer, "up")])])
        new[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([gate, up], axis=1))
    missing = set(state) - set(new)
    extra = set(new) - set(state)
    assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])
    model.load_state_dict(new, strict=True)
    if llamacpp_eps:
        for layer in model.model.layers:
            if layer.self_attn.q_a_layernorm is not None:
                layer.self_attn.q_a_layernorm.variance_epsilon = cfg.rms_norm_eps
            layer.self_attn.kv_a_layernorm.variance_epsilon = cfg.rms_norm_eps
    ckpt.close()
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float().numpy()


def llama_logits(gguf_path: Path, ids: list[int], **kwargs) -> np.ndarray:
    """Logits of every position from llama.cpp (F32 KV cache, no flash attention)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=max(64, len(ids) + 8), n_batch=512, n_ubatch=512, logits_all=True,
        n_threads=2, verbose=False, type_k=0, type_v=0, flash_attn=False, **kwargs,
    )  # fmt: skip
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
