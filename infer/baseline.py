"""Verify baselines: the reference's next-token distributions kept compactly, so later runs need no reference.

`verify --save-baseline FILE` stores, per scored position of the reference run, the top-k
log-probabilities (token ids and values), the log of the probability mass outside them, and the
log-probability of the token that actually came next; with the token sequences themselves and the
model config they belong to. `verify --baseline FILE` then runs only the model and compares.

KL divergence against a baseline: the reference's distribution is known on its top-k tokens S and
as one "rest" bucket R = 1 − Σ_S p. The model's distribution q is folded the same way (q on S, and
Q = 1 − Σ_S q, computed as a log-sum-exp over the complement, not by subtraction), and

    KLD_k = Σ_{i∈S} p_i (log p_i − log q_i) + R (log R − log Q).

Merging bins never increases a KL divergence (log-sum inequality), so KLD_k ≤ the full-vocabulary
KLD, with equality when the model's tail is proportional to the reference's; what it misses is
R · KL(p_tail/R ‖ q_tail/Q), the KL inside the tail weighted by its mass. That part is estimated
from the head: when the model's logit errors are spread evenly over the vocabulary (quantization
noise is), KL(p‖q) ≈ ½σ²(1 − Σp²) for any distribution, so the tail's KL ≈ KL_S / (1 − Σ p̂²), with
KL_S and p̂ those of the head renormalised. The reported KLD is KLD_k plus that estimate (within
~2 % of the full KLD at k = 64 in docs/verify.md's measurements); the bound KLD_k is reported too.
Top-1 agreement and both perplexities are exact (the reference's top-1 id and the log-probability
of each next token are stored). docs/verify.md has the measured size per position and error for
several k.

File layout (little-endian; format version 1):

    magic      16 bytes  b"K2CONV-BASELINE\\0"
    version    u32
    hlen       u32       length of the JSON header
    header     hlen bytes of UTF-8 JSON: format version, k, vocab_size, the model config's compute
               hyper-parameters (floats rounded to float32 as GGUF stores them) and their
               fingerprint, reference name, sequence lengths, and the list of arrays
               (name, dtype, shape) in payload order
    payload    one zstd frame (with its content checksum) of the arrays' raw bytes, in that order:
               tokens int32 [P]            the sequences, concatenated
               topk_ids int32 [P, k]       the reference's k most likely next tokens, most likely first
               topk_logp float32 [P, k]    their log-probabilities
               rest_logp float32 [P]       log of the probability outside the top k (−inf if none)
               next_logp float32 [P]       log-probability of the actual next token (NaN at a sequence end)

No pickle: a baseline from a stranger is parsed, never executed. Every defect (short file, wrong
magic/version, a header that does not describe the payload, a corrupt frame, ids outside the
vocabulary) is one K2ConvError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from k2conv import __version__
from k2conv.atomic import write_bytes_atomic
from k2conv.convert.config import ModelConfig
from k2conv.errors import K2ConvError

MAGIC = b"K2CONV-BASELINE\0"
FORMAT_VERSION = 1
DEFAULT_K = 64  # docs/verify.md: ~340 B per position; the bound misses about the mass outside the top k
_ZSTD_LEVEL = 19
_MAX_HEADER = 1 << 24
_ARRAYS = (("tokens", "<i4", 1), ("topk_ids", "<i4", 2), ("topk_logp", "<f4", 2), ("rest_logp", "<f4", 1),
           ("next_logp", "<f4", 1))  # fmt: skip


def config_summary(cfg: ModelConfig) -> dict[str, Any]:
    """The hyper-parameters a baseline is only valid for, floats rounded to float32 (as a GGUF holds them)."""
    from k2conv.infer.verify import _COMPUTE_KEYS, _ROPE_KEYS

    def norm(v: Any) -> Any:
        return float(np.float32(v)) if isinstance(v, float) else v

    out = {k: norm(getattr(cfg, k)) for k in _COMPUTE_KEYS}
    rs = cfg.rope_scaling or {}
    out.update({f"rope_scaling.{k}": norm(rs.get(k)) for k in _ROPE_KEYS})
    return out


def fingerprint(summary: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logsumexp_masked(lp: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """log Σ exp(lp) over entries where `keep` ([T, V] bool) is True; −inf where none."""
    masked = np.where(keep, lp, -np.inf)
    top = masked.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(masked - safe).sum(axis=-1, keepdims=True)) + safe)[:, 0]


def _topk(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids [T, k] of the k largest log-probs, largest first (ties: lower id first), and the values."""
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, idx, axis=-1)
    order = np.lexsort((idx, -vals), axis=-1)
    idx = np.take_along_axis(idx, order, axis=-1)
    return idx, np.take_along_axis(lp, idx, axis=-1)


@dataclass
class Baseline:
    """A loaded baseline: per-position arrays concatenated over the sequences."""

    path: str
    k: int
    vocab_size: int
    config: dict[str, Any]
    fingerprint: str
    reference: str
    lengths: list[int]
    tokens: np.ndarray
    topk_ids: np.ndarray
    topk_logp: np.ndarray
    rest_logp: np.ndarray
    next_logp: np.ndarray

    @property
    def sequences(self) -> list[list[int]]:
        ends = np.cumsum(self.lengths)
        return [self.tokens[e - n : e].tolist() for n, e in zip(self.lengths, ends)]

    def check_model(self, cfg: ModelConfig, where: str) -> None:
        """The model must have the hyper-parameters the baseline was made with (one-line error if not)."""
        ours = config_summary(cfg)
        if fingerprint(ours) != self.fingerprint:
            diffs = [f"{k} {self.config.get(k)!r} vs {v!r}" for k, v in ours.items() if self.config.get(k) != v]
            what = "; ".join(diffs[:3]) or "fingerprint only"
            raise K2ConvError(f"{self.path}: baseline is for another model than {where} (baseline vs model: {what})")


def build_arrays(ref_logits: list[np.ndarray], sequences: list[list[int]], k: int) -> dict[str, np.ndarray]:
    """The payload arrays from the reference's logits ([T_i, vocab] per sequence) and the sequences."""
    ids, logp, rest, nxt = [], [], [], []
    for logits, seq in zip(ref_logits, sequences):
        if logits.shape[0] != len(seq):
            raise ValueError("one logits row per token of each sequence")
        lp = _log_softmax(np.asarray(logits))
        top_ids, top_lp = _topk(lp, k)
        keep = np.ones(lp.shape, dtype=bool)
        np.put_along_axis(keep, top_ids, False, axis=-1)
        ids.append(top_ids)
        logp.append(top_lp)
        rest.append(_logsumexp_masked(lp, keep))
        n = np.full(len(seq), np.nan)
        n[:-1] = lp[np.arange(len(seq) - 1), np.asarray(seq[1:], dtype=np.int64)]
        nxt.append(n)
    return {
        "tokens": np.asarray([t for s in sequences for t in s], dtype="<i4"),
        "topk_ids": np.concatenate(ids).astype("<i4"),
        "topk_logp": np.concatenate(logp).astype("<f4"),
        "rest_logp": np.concatenate(rest).astype("<f4"),
        "next_logp": np.concatenate(nxt).astype("<f4"),
    }


def save_baseline(path: Path | str, ref_logits: list[np.ndarray], sequences: list[list[int]], cfg: ModelConfig, *,
                  k: int = DEFAULT_K, reference: str = "") -> int:  # fmt: skip
    """Write a baseline atomically; returns its size in bytes."""
    vocab = int(ref_logits[0].shape[-1])
    if not 1 <= k <= vocab:
        raise K2ConvError(f"baseline top-k {k} must lie in 1..{vocab}")
    arrays = build_arrays(ref_logits, sequences, k)
    summary = config_summary(cfg)
    header = {
        "format": FORMAT_VERSION, "k": k, "vocab_size": vocab, "config": summary,
        "fingerprint": fingerprint(summary), "reference": reference, "k2conv": __version__,
        "lengths": [len(s) for s in sequences],
        "arrays": [{"name": n, "dtype": arrays[n].dtype.str, "shape": list(arrays[n].shape)} for n, _, _ in _ARRAYS],
    }  # fmt: skip
    payload = b"".join(np.ascontiguousarray(arrays[n]).tobytes() for n, _, _ in _ARRAYS)
    frame = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True, write_content_size=True).compress(payload)
    head = json.dumps(header, separators=(",", ":")).encode()
    data = MAGIC + struct.pack("<II", FORMAT_VERSION, len(head)) + head + frame
    write_bytes_atomic(Path(path), data)
    return len(data)


def read_baseline(path: Path | str) -> Baseline:
    """Parse and validate a baseline file (never trusts a length it has not checked)."""
    path = Path(path)
    src = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise K2ConvError(f"{src}: cannot read baseline ({exc.strerror or exc})") from None
    fixed = len(MAGIC) + 8
    if len(data) < fixed or data[: len(MAGIC)] != MAGIC:
        raise K2ConvError(f"{src}: not a k2conv verify baseline (bad magic)")
    version, hlen = struct.unpack_from("<II", data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise K2ConvError(f"{src}: baseline format version {version}; this k2conv reads version {FORMAT_VERSION}")
    if hlen > min(_MAX_HEADER, len(data) - fixed):
        raise K2ConvError(f"{src}: truncated baseline: header of {hlen} bytes, {len(data) - fixed} left in the file")
    try:
        header = json.loads(data[fixed : fixed + hlen].decode("utf-8"))
        k, vocab, lengths = int(header["k"]), int(header["vocab_size"]), [int(n) for n in header["lengths"]]
        specs = [(a["name"], np.dtype(a["dtype"]), tuple(int(d) for d in a["shape"])) for a in header["arrays"]]
        summary, fp = dict(header["config"]), str(header["fingerprint"])
    except (ValueError, KeyError, TypeError) as exc:
        raise K2ConvError(f"{src}: corrupt baseline header ({exc})") from None
    n_pos = sum(lengths)
    want = [(n, np.dtype(dt), (n_pos, k) if nd == 2 else (n_pos,)) for n, dt, nd in _ARRAYS]
    if specs != want or k < 1 or vocab < k or min(lengths, default=0) < 1:
        raise K2ConvError(f"{src}: corrupt baseline header (arrays {specs} do not fit k={k}, {n_pos} positions)")
    expected = sum(dt.itemsize * int(np.prod(shape)) for _, dt, shape in want)
    try:
        payload = zstandard.ZstdDecompressor().decompress(data[fixed + hlen :], max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise K2ConvError(f"{src}: truncated or corrupt baseline payload ({exc})") from None
    if len(payload) != expected:
        raise K2ConvError(f"{src}: baseline payload has {len(payload)} bytes, the header describes {expected}")
    arrays, at = {}, 0
    for name, dt, shape in want:
        size = dt.itemsize * int(np.prod(shape))
        arrays[name] = np.frombuffer(payload, dtype=dt, count=int(np.prod(shape)), offset=at).reshape(shape)
        at += size
    if arrays["topk_ids"].size and (arrays["topk_ids"].min() < 0 or arrays["topk_ids"].max() >= vocab):
        raise K2ConvError(f"{src}: corrupt baseline: a top-k token id lies outside the vocabulary of {vocab}")
    if arrays["tokens"].size and (arrays["tokens"].min() < 0 or arrays["tokens"].max() >= vocab):
        raise K2ConvError(f"{src}: corrupt baseline: a sequence token lies outside the vocabulary of {vocab}")
    return Baseline(src, k, vocab, summary, fp, str(header.get("reference", "")), lengths, **arrays)


def _tail_estimate(lp: np.ndarray, lq: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """R · KL_S / (1 − Σ p̂²) per position: the tail's KL extrapolated from the renormalised head's."""
    head = np.exp(lp).sum(-1, keepdims=True)
    lp_h = lp - np.log(head)
    lq_h = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    kl_head = (np.exp(lp_h) * (lp_h - lq_h)).sum(-1)
    spread = 1.0 - np.exp(2 * lp_h).sum(-1)
    return np.where(spread > 1e-9, rest * np.maximum(kl_head, 0.0) / np.maximum(spread, 1e-9), 0.0)


def compare_to_baseline(model_logits: list[np.ndarray], base: Baseline) -> dict[str, Any]:
    """verify's agreement numbers of a model's logits (one [T_i, vocab] per baseline sequence) vs a baseline."""
    from k2conv.infer.verify import (  # verify imports torch; reading a baseline does not
        agreement_summary,
        perplexities,
    )

    seqs = base.sequences
    if len(model_logits) != len(seqs) or any(m.shape != (len(s), base.vocab_size) for m, s in zip(model_logits, seqs)):
        raise K2ConvError(f"{base.path}: the model's logits do not match the baseline's sequences or vocabulary")
    klds, bounds, top1, nll_model = [], [], [], []
    at = 0
    for m, seq in zip(model_logits, seqs):
        sl = slice(at, at + len(seq))
        at += len(seq)
        lq = _log_softmax(np.asarray(m))
        ids = base.topk_ids[sl].astype(np.int64)
        lp = base.topk_logp[sl].astype(np.float64)
        lr = base.rest_logp[sl].astype(np.float64)
        lq_top = np.take_along_axis(lq, ids, axis=-1)
        keep = np.ones(lq.shape, dtype=bool)
        np.put_along_axis(keep, ids, False, axis=-1)
        lq_rest = _logsumexp_masked(lq, keep)
        kld = (np.exp(lp) * (lp - lq_top)).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rest = np.where(np.isfinite(lr), np.exp(lr) * (lr - lq_rest), 0.0)
        bounds.append(kld + rest)
        klds.append(kld + rest + _tail_estimate(lp, lq_top, np.exp(lr)))
        top1.append(m.argmax(-1) == ids[:, 0])
        nxt = np.asarray(seq[1:], dtype=np.int64)
        nll_model.append(-lq[np.arange(len(nxt)), nxt])
    kld, bound = np.concatenate(klds), np.concatenate(bounds)
    nll_ref = -np.concatenate([base.next_logp[e - n : e - 1] for n, e in zip(base.lengths, np.cumsum(base.lengths))])
    out: dict[str, Any] = {
        **agreement_summary(kld, np.concatenate(top1)),
        "kld_method": f"top-{base.k} + rest bucket + tail estimate",
        "kld_lower_bound": {"mean": float(bound.mean()), "p99": float(np.percentile(bound, 99)),
                            "max": float(bound.max())},
        # the reference's mean probability outside its top k: how much of the KLD rests on the tail estimate
        "baseline_tail_mass": float(np.exp(base.rest_logp.astype(np.float64)).mean()),
    }
    if nll_ref.size:
        out.update(perplexities(np.concatenate(nll_model), nll_ref))
    return out


def run_verify_baseline(model_path: Path | str, baseline_path: Path | str, *, device: str = "cpu",
                        qa_norm_eps: float | None = None, **run_options: Any) -> dict[str, Any]:  # fmt: skip
    """`verify MODEL --baseline FILE`: run only the model, on the baseline's sequences, and compare."""
    from k2conv.infer.verify import _run
    from k2conv.infer.weights import open_weights

    base = read_baseline(baseline_path)
    probe = open_weights(model_path)
    try:
        base.check_model(probe.config, str(model_path))
    finally:
        probe.close()
    seqs = base.sequences
    got = _run(model_path, seqs, device, qa_norm_eps, **run_options)
    result = compare_to_baseline(got["logits"], base)
    result["notes"] = {"model": got["notes"]}
    result["speed"] = {"model": {k: v for k, v in got.items() if k not in ("config", "notes", "logits", "routing",
                                                                          "routing_stats", "generated")}}  # fmt: skip
    result["routing_stats"] = got.get("routing_stats")
    result["prompts"] = len(seqs)
    result["prompt_source"] = f"baseline {baseline_path} ({len(seqs)} sequences, reference {base.reference})"
    return result
