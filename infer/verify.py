"""Is the converted model still the model? Logit-level comparison of two runs on the same tokens.

`compare` turns two sets of logits into the numbers `k2conv verify` reports: KL divergence of the
model from the reference (mean, p99, max over positions), top-1 agreement and the perplexity of each
on the tokens themselves (a drift in perplexity shows damage the KLD of one position hides).
`run_verify` runs the reference runner on both files, one after the other so only one model's
resident weights are in memory at a time.
"""

from __future__ import annotations

import contextlib
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
    out = agreement_summary(np.concatenate(klds), np.concatenate(top1))
    out["max_rel_logit_diff"] = float(np.concatenate(rel).max())
    if seqs is not None and sum(len(n) for n in nll_ref):
        out.update(perplexities(np.concatenate(nll_model), np.concatenate(nll_ref)))
    return out


def agreement_summary(kld: np.ndarray, top1: np.ndarray) -> dict[str, Any]:
    """The per-position KLDs and top-1 matches reduced to the figures verify reports and gates on."""
    return {
        "positions": int(kld.size),
        "kld_mean": float(kld.mean()),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float(top1.mean()),
    }


def perplexities(nll_model: np.ndarray, nll_ref: np.ndarray) -> dict[str, float]:
    """Perplexity of each side on the same next tokens (float64 means) and their ratio."""
    ppl_model = float(np.exp(nll_model.astype(np.float64).mean()))
    ppl_ref = float(np.exp(nll_ref.astype(np.float64).mean()))
    return {"ppl_model": ppl_model, "ppl_ref": ppl_ref, "ppl_ratio": ppl_model / ppl_ref}


def builtin_prompts(cfg: ModelConfig, n: int = 6, seed: int = 2024) -> list[list[int]]:
    """Deterministic token-id prompts over the ordinary vocabulary, lengths 24-96.

    Every other prompt repeats its first half: a real model predicts the copy almost perfectly
    (induction), so perplexity on these positions is sensitive to damage. Only the fallback: verify
    runs the built-in text prompts of infer/prompts.py whenever a tokenizer is found.
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


def _run(path: Path | str, prompts: list[list[int]], device: str, qa_norm_eps: float | None, *,
         vram_budget: int | None = None, cache_policy: str = "lru", io: str = "mmap",
         max_new_tokens: int = 16, score_decode: bool = False) -> dict[str, Any]:  # fmt: skip
    """Logits, routing and read counters of one model over all prompts, then a short greedy decode.

    Non-expert weights are resident on the device; routed experts go through an expert cache in what
    is left of `vram_budget` (infer/expert_cache.py). Prefill runs every prompt once; the decode
    continues the first prompt `max_new_tokens` tokens through the KV cache, and the per-token read
    counters and hit rate of the speed report are those of the decode (one token per step is what a
    user waits for). Routing statistics count every token's chosen experts, prefill and decode.
    With `score_decode` every prompt is continued instead, its decode logits appended to the prompt's
    and the new tokens returned under "generated" (run_verify scores those positions too).
    """
    from k2conv.infer.expert_cache import load_model
    from k2conv.infer.model import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)
    src = open_weights(path)
    try:
        t0 = time.perf_counter()
        model, cache, io_notes = load_model(src, dev, budget=vram_budget, policy=cache_policy, io=io,
                                            qa_norm_eps=qa_norm_eps)  # fmt: skip
        load_s = time.perf_counter() - t0
        logits, routing = [], []
        t0 = time.perf_counter()
        for ids in prompts:
            layers: list = []
            logits.append(model(ids, routing=layers).float().cpu().numpy())
            routing.append(layers)
        run_s = time.perf_counter() - t0
        n_tok = sum(len(p) for p in prompts)
        prefill, src_bytes, src_reads = cache.stats, src.stats.expert_bytes, src.stats.expert_reads
        cache.reset_stats()
        decode_routing: list = []
        generated: list[list[int]] = []
        if score_decode:
            decode_s, n_dec = 0.0, 0
            for i, ids in enumerate(prompts):
                steps: list = []
                sec, n = _decode(model, ids, max_new_tokens, decode_routing, steps)
                decode_s, n_dec = decode_s + sec, n_dec + n
                generated.append([t for t, _ in steps])
                logits[i] = np.concatenate([logits[i], *(row for _, row in steps)])
        else:
            decode_s, n_dec = _decode(model, prompts[0], max_new_tokens, decode_routing)
        dec = cache.stats
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return {
            "config": src.config, "notes": list(src.notes) + io_notes, "logits": logits, "routing": routing,
            "load_s": load_s, "prefill_tok_s": n_tok / run_s if run_s > 0 else float("inf"),
            "expert_bytes_per_token": src_bytes / max(n_tok, 1),
            "expert_reads_per_token": src_reads / max(n_tok, 1),
            "resident_bytes": src.stats.resident_bytes,
            "resident_device_bytes": model.resident_bytes,
            "decode_tokens": n_dec,
            "decode_tok_s": n_dec / decode_s if n_dec and decode_s > 0 else None,
            "bytes_read_per_token": dec.bytes_read / n_dec if n_dec else None,
            "reads_per_token": dec.reads / n_dec if n_dec else None,
            "cache_hit_rate": dec.hit_rate if n_dec else None,
            "prefill_cache_hit_rate": prefill.hit_rate,
            "cache_budget": cache.budget, "cache_peak_bytes": cache.peak_used,
            "cache_policy": cache.policy, "io": io,
            "peak_vram_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "peak_rss_bytes": _peak_rss(),
            "routing_stats": routing_stats([*routing, decode_routing]), "generated": generated,
        }  # fmt: skip
    finally:
        src.close()


def _decode(model: KimiModel, prompt: list[int], n: int, routing: list,
            record: list | None = None) -> tuple[float, int]:  # fmt: skip
    """Greedy continuation of `prompt` by n tokens through the KV cache: (seconds of the n steps, n).

    `record`, when a list, receives (token fed, logits row [1, vocab] it produced) per step.
    """
    if n <= 0:
        return 0.0, 0
    cache = model.new_cache(len(prompt) + n)
    expert_cache = getattr(model, "expert_cache", None)  # the prefill is not part of the decode's counters
    with expert_cache.uncounted() if expert_cache is not None else contextlib.nullcontext():
        logits = model(prompt, cache)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(logits[-1].argmax())
        logits = model([token], cache, routing=routing)
        if record is not None:
            record.append((token, logits.float().cpu().numpy()))
    sync()
    return time.perf_counter() - t0, n


def _peak_rss() -> int:
    """Peak resident set of this process so far (both runs of a verify; Linux reports KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def routing_stats(routing: list[list]) -> dict[str, Any]:
    """Tokens routed to each expert per layer, in the shape `k2conv relayout --stats` reads (docs/layout.md).

    `routing`: per sequence, the (layer, expert ids [T, k]) pairs the model recorded.
    """
    layers: dict[int, dict[int, int]] = {}
    for seq in routing:
        for layer, ids in seq:
            use = layers.setdefault(int(layer), {})
            values, counts = np.unique(np.asarray(ids).reshape(-1), return_counts=True)
            for e, c in zip(values.tolist(), counts.tolist()):
                use[e] = use.get(e, 0) + c
    return {"version": 1, "layers": {str(k): {str(e): c for e, c in sorted(v.items())} for k, v in sorted(layers.items())}}


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
               device: str = "cpu", qa_norm_eps: float | None = None, prompts_file: Path | str | None = None,
               save_baseline: Path | str | None = None, score_new_tokens: bool = False,
               **run_options: Any) -> dict[str, Any]:  # fmt: skip
    """Run the runner on `model_path` (e.g. a GGUF) and `reference_path` (e.g. the HF source) and compare.

    Returns compare()'s numbers plus per-layer routing agreement, config differences, notes about
    defaults a GGUF forced, and speed/read counters of the model run. JSON-serialisable.
    `run_options` go to both runs (_run: vram_budget, cache_policy, io, max_new_tokens); the model's
    routing statistics come back under "routing_stats". With `score_new_tokens` the model runs first
    and greedily continues every prompt by max_new_tokens through its KV cache; the reference is then
    teacher-forced on prompt + those tokens, and every position is compared ("decode": the new ones alone).
    """
    probe = open_weights(reference_path)
    cfg = probe.config
    probe.close()
    source = "token ids given by the caller"
    if prompts is None:  # the built-in text set (or a prompts file), encoded by both sides' tokenizers
        from k2conv.infer.prompts import resolve_prompts

        resolved = resolve_prompts(cfg, model_path, reference_path, prompts_file)
        prompts, source = resolved.ids, resolved.source
    for ids in prompts:
        if not ids or max(ids) >= cfg.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be non-empty and lie in [0, {cfg.vocab_size})")
    sequences = prompts
    if score_new_tokens and run_options.get("max_new_tokens", 16) > 0:
        got = _run(model_path, prompts, device, qa_norm_eps, score_decode=True, **run_options)
        sequences = [p + g for p, g in zip(prompts, got["generated"])]
        ref = _run(reference_path, sequences, device, qa_norm_eps, **{**run_options, "max_new_tokens": 0})
    else:
        ref = _run(reference_path, prompts, device, qa_norm_eps, **run_options)
        got = _run(model_path, prompts, device, qa_norm_eps, **run_options)
    result = compare(got["logits"], ref["logits"], sequences)
    if sequences is not prompts:  # the decoded positions alone: the KV-cache path against the reference
        cut = [len(p) for p in prompts]
        result["decode"] = compare([m[c:] for m, c in zip(got["logits"], cut)], [r[c:] for r, c in zip(ref["logits"], cut)],
                                   [s[c:] for s, c in zip(sequences, cut)])  # fmt: skip
    result["routing_agreement"] = {str(k): v for k, v in routing_agreement(got["routing"], ref["routing"]).items()}
    result["config_differences"] = {k: list(v) for k, v in config_differences(got["config"], ref["config"]).items()}
    result["notes"] = {"model": got["notes"], "reference": ref["notes"]}
    result["speed"] = {
        side: {k: v for k, v in run.items()
               if k not in ("config", "notes", "logits", "routing", "routing_stats", "generated")}
        for side, run in (("model", got), ("reference", ref))
    }  # fmt: skip
    result["routing_stats"] = got["routing_stats"]
    result["prompts"] = len(prompts)
    result["prompt_source"] = source
    if save_baseline is not None:  # the reference's top-k distributions, for later runs without it (baseline.py)
        from k2conv.infer.baseline import save_baseline as write_baseline

        size = write_baseline(save_baseline, ref["logits"], sequences, ref["config"], reference=str(reference_path))
        result["baseline"] = {"path": str(save_baseline), "bytes": size, "bytes_per_position": size / result["positions"]}
    return result
