"""Is the converted model still the model? Logit-level comparison of two runs on the same tokens.

`compare` turns two sets of logits into the numbers `k2conv verify` reports: KL divergence of the
model from the reference (mean, p99, max over positions), top-1 agreement and the perplexity of each
on the tokens themselves (a drift in perplexity shows damage the KLD of one position hides).
`run_verify` runs the reference runner on both files, one after the other so only one model's
resident weights are in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from k2conv.convert.config import ModelConfig
from k2conv.infer.model import KimiModel
from k2conv.infer.weights import open_weights

N_RESERVED = 256  # Kimi's special-token ids sit at the top of the vocabulary

# Hyper-parameters whose disagreement changes the computation (reported, never silently ignored).
_COMPUTE_KEYS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "first_k_dense_replace",
    "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size", "rope_theta",
    "routed_scaling_factor", "scoring_func", "n_group", "topk_group", "norm_topk_prob", "rms_norm_eps",
)  # fmt: skip
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale_all_dim")

Logits = np.ndarray | torch.Tensor


def _as_list(x: Logits | Sequence[Logits]) -> list[np.ndarray]:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        x = [x]
    return [np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64) for a in x]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(model_logits: Logits | Sequence[Logits], ref_logits: Logits | Sequence[Logits],
            tokens: Sequence[int] | Sequence[Sequence[int]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Agreement of `model_logits` with `ref_logits` ([T, vocab] each, or lists of them per sequence).

    KLD is KL(ref ‖ model) in nats per position. With `tokens` (the sequences the logits were
    computed on) the perplexity of each side on its next tokens is reported as well.
    """
    models, refs = _as_list(model_logits), _as_list(ref_logits)
    if len(models) != len(refs) or any(m.shape != r.shape for m, r in zip(models, refs)):
        raise ValueError("model and reference logits must have the same sequences and shapes")
    klds, top1, rel = [], [], []
    nll_model, nll_ref = [], []
    seqs: list[list[int]] | None = None
    if tokens is not None:
        seqs = [list(tokens)] if tokens and isinstance(tokens[0], (int, np.integer)) else [list(t) for t in tokens]  # type: ignore[arg-type]
        if len(seqs) != len(models):
            raise ValueError("one token sequence per logits sequence")
    for i, (m, r) in enumerate(zip(models, refs)):
        lm, lr = log_softmax(m), log_softmax(r)
        klds.append((np.exp(lr) * (lr - lm)).sum(axis=-1))
        top1.append(m.argmax(-1) == r.argmax(-1))
        rel.append(np.abs(m - r).max(axis=-1) / max(float(r.max() - r.min()), 1e-30))
        if seqs is not None:
            nxt = np.asarray(seqs[i][1 : len(m)], dtype=np.int64)
            pos = np.arange(len(nxt))
            nll_model.append(-lm[pos, nxt])
            nll_ref.append(-lr[pos, nxt])
    kld = np.concatenate(klds)
    out: dict[str, Any] = {
        "positions": int(kld.size),
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float(np.concatenate(top1).mean()),
        "max_rel_logit_diff": float(np.concatenate(rel).max()),
    }
    if seqs is not None and sum(len(n) for n in nll_ref):
        ppl_model = float(np.exp(np.concatenate(nll_model).mean()))
        ppl_ref = float(np.exp(np.concatenate(nll_ref).mean()))
        out.update(ppl_model=ppl_model, ppl_ref=ppl_ref, ppl_ratio=ppl_model / ppl_ref)
    return out


def builtin_prompts(cfg: ModelConfig, n: int = 6, seed: int = 2024) -> list[list[int]]:
    """Deterministic token-id prompts over the ordinary vocabulary, lengths 24-96.

    Every other prompt repeats its first half: a real model predicts the copy almost perfectly
    (induction), so perplexity on these positions is sensitive to damage. Text prompts replace these
    once the CLI encodes text.
    """
    rng = np.random.default_rng(seed)
    ordinary = max(cfg.vocab_size - N_RESERVED, 1)
    prompts = []
    for i in range(n):
        length = int(24 + (72 * i) // max(n - 1, 1))
        if i % 2:
            half = [int(t) for t in rng.integers(0, ordinary, length // 2)]
            ids = half + half
        else:
            ids = [int(t) for t in rng.integers(0, ordinary, length)]
        if cfg.bos_token_id is not None and i == 0:
            ids = [cfg.bos_token_id, *ids[1:]]
        prompts.append(ids)
    return prompts


def config_differences(a: ModelConfig, b: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """Hyper-parameters that differ between two runs (float32 rounding of GGUF values ignored)."""

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return x is not None and y is not None and np.isclose(float(x), float(y), rtol=1e-6, atol=0)
        return x == y

    diffs = {k: (getattr(a, k), getattr(b, k)) for k in _COMPUTE_KEYS if not same(getattr(a, k), getattr(b, k))}
    ra, rb = a.rope_scaling or {}, b.rope_scaling or {}
    for k in _ROPE_KEYS:
        if not same(ra.get(k), rb.get(k)):
            diffs[f"rope_scaling.{k}"] = (ra.get(k), rb.get(k))
    return diffs


def _run(path: Path | str, prompts: list[list[int]], device: str, qa_norm_eps: float | None) -> dict[str, Any]:
    """Logits, routing and read counters of one model over all prompts."""
    src = open_weights(path)
    try:
        t0 = time.perf_counter()
        model = KimiModel(src, device, qa_norm_eps=qa_norm_eps)
        load_s = time.perf_counter() - t0
        logits, routing = [], []
        t0 = time.perf_counter()
        for ids in prompts:
            layers: list = []
            logits.append(model(ids, routing=layers).float().cpu().numpy())
            routing.append(layers)
        run_s = time.perf_counter() - t0
        n_tok = sum(len(p) for p in prompts)
        return {
            "config": src.config, "notes": list(src.notes), "logits": logits, "routing": routing,
            "load_s": load_s, "prefill_tok_s": n_tok / run_s if run_s > 0 else float("inf"),
            "expert_bytes_per_token": src.stats.expert_bytes / max(n_tok, 1),
            "expert_reads_per_token": src.stats.expert_reads / max(n_tok, 1),
            "resident_bytes": src.stats.resident_bytes,
        }  # fmt: skip
    finally:
        src.close()


def routing_agreement(model_routing: list[list], ref_routing: list[list]) -> dict[int, float]:
    """Per MoE layer: mean over tokens of |chosen ∩ reference chosen| / experts_per_tok."""
    per_layer: dict[int, list[float]] = {}
    for m_seq, r_seq in zip(model_routing, ref_routing):
        for (layer, m_ids), (_, r_ids) in zip(m_seq, r_seq):
            k = m_ids.shape[1]
            common = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(m_ids, r_ids)]
            per_layer.setdefault(layer, []).extend(common)
    return {layer: float(np.mean(v)) for layer, v in sorted(per_layer.items())}


def run_verify(model_path: Path | str, reference_path: Path | str, prompts: list[list[int]] | None = None, *,
               device: str = "cpu", qa_norm_eps: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the runner on `model_path` (e.g. a GGUF) and `reference_path` (e.g. the HF source) and compare.

    Returns compare()'s numbers plus per-layer routing agreement, config differences, notes about
    defaults a GGUF forced, and speed/read counters of the model run. JSON-serialisable.
    """
    probe = open_weights(reference_path)
    cfg = probe.config
    probe.close()
    prompts = builtin_prompts(cfg) if prompts is None else prompts
    for ids in prompts:
        if not ids or max(ids) >= cfg.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be non-empty and lie in [0, {cfg.vocab_size})")
    ref = _run(reference_path, prompts, device, qa_norm_eps)
    got = _run(model_path, prompts, device, qa_norm_eps)
    result = compare(got["logits"], ref["logits"], prompts)
    result["routing_agreement"] = {str(k): v for k, v in routing_agreement(got["routing"], ref["routing"]).items()}
    result["config_differences"] = {k: list(v) for k, v in config_differences(got["config"], ref["config"]).items()}
    result["notes"] = {"model": got["notes"], "reference": ref["notes"]}
    result["speed"] = {
        side: {k: run[k] for k in ("load_s", "prefill_tok_s", "expert_bytes_per_token", "expert_reads_per_token",
                                   "resident_bytes")}
        for side, run in (("model", got), ("reference", ref))
    }  # fmt: skip
    result["prompts"] = len(prompts)
    return result
