"""A tiny, deterministic byte-level BPE trainer that splits text exactly like Kimi's tokenizer.

Why: tests and synthetic checkpoints need a Kimi-shaped tokenizer (tiktoken ranks + Kimi's
pre-tokenizer) small enough to ship, trained on our own corpus (`data/corpus-*.txt`). The trained
result ships as `data/kimi-tiny.tiktoken`; `python -m k2conv.convert.tokenizer_train` rewrites it
and a test checks that retraining reproduces it byte for byte.

Every token the trainer adds is reachable by BPE from its own bytes (merging the left-most
lowest-rank pair first, with only lower ranks), so the merge list recovered by
`tokenizer.recover_merges` tokenizes exactly like tiktoken does.

Needs the `regex` package (a dependency of tiktoken and transformers), imported lazily.
"""

from __future__ import annotations

import base64
import heapq
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_FILES = ("corpus-en.txt", "corpus-zh.txt", "corpus-code.txt", "corpus-misc.txt")
TINY_TIKTOKEN = DATA_DIR / "kimi-tiny.tiktoken"
TINY_N_BASE = 1792  # + 256 reserved specials = a 2048-token vocab

# Kimi's pat_str (tokenization_kimi.py), verbatim. `&&` is class intersection: tiktoken's Rust
# engine accepts it, Python's `regex` only in V1 mode.
KIMI_PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# The same pattern without `&&`: `[X&&[^\p{Han}]]` becomes `(?:(?!\p{Han})[X])`, which plain
# (V0) `regex` accepts. tests/test_tokenizer.py checks it splits like tiktoken.
_UPPER = r"(?:(?!\p{Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])"
_LOWER = r"(?:(?!\p{Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}])"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PAT_STR_V0 = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

Pair = tuple[int, int]


@lru_cache(maxsize=1)
def _compiled() -> Any:
    import regex  # lazy: only the trainer and the tests need it

    return regex.compile(KIMI_PAT_STR_V0)


def pretokenize(text: str) -> list[str]:
    """Split text into the chunks Kimi's tokenizer BPE-encodes independently."""
    return _compiled().findall(text)


def corpus_text() -> str:
    """The shipped training corpus, files joined in a fixed order.

    Read in text mode (universal newlines), so a CRLF checkout trains the same vocab.
    """
    return "".join((DATA_DIR / name).read_text(encoding="utf-8") for name in CORPUS_FILES)


def bpe_parts(token: bytes, ranks: Mapping[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """BPE `token` from single bytes: merge the left-most lowest-rank pair while its rank < max_rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_i, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best_rank is None or r < best_rank):
                best_i, best_rank = i, r
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


class _PairStats:
    """Pair counts over a weighted word list, with a lazy max-heap keyed (-count, left, right)."""

    def __init__(self, words: list[list[int]], freqs: list[int], vocab: list[bytes]) -> None:
        self.words, self.freqs, self.vocab = words, freqs, vocab
        self.counts: Counter[Pair] = Counter()
        self.where: dict[Pair, set[int]] = {}
        for wi, word in enumerate(words):
            self._add_word(wi, word, +1)
        self.banned: set[Pair] = set()
        self.heap: list[tuple[int, bytes, bytes, Pair]] = []
        for pair in self.counts:
            self._push(pair)

    def _add_word(self, wi: int, word: list[int], sign: int) -> None:
        f = self.freqs[wi] * sign
        for pair in itertools.pairwise(word):
            self.counts[pair] += f
            if sign > 0:
                self.where.setdefault(pair, set()).add(wi)

    def _push(self, pair: Pair) -> None:
        c = self.counts[pair]
        if c > 0:
            heapq.heappush(self.heap, (-c, self.vocab[pair[0]], self.vocab[pair[1]], pair))

    def pop_best(self, min_count: int) -> Pair | None:
        """The most frequent live pair (ties: smallest left bytes, then right bytes)."""
        while self.heap:
            neg, _, _, pair = heapq.heappop(self.heap)
            if -neg != self.counts[pair] or pair in self.banned:
                continue  # stale entry
            return pair if -neg >= min_count else None
        return None

    def merge(self, pair: Pair, new_id: int) -> None:
        """Replace `pair` by `new_id` in every word holding it, updating counts incrementally."""
        touched: set[Pair] = set()
        for wi in sorted(self.where.pop(pair, ())):
            word = self.words[wi]
            self._add_word(wi, word, -1)
            touched.update(itertools.pairwise(word))
            merged: list[int] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            self.words[wi] = merged
            self._add_word(wi, merged, +1)
            touched.update(itertools.pairwise(merged))
        self.counts.pop(pair, None)
        for p in touched - {pair}:
            self._push(p)


def train_bpe(pieces: Iterable[str], n_base: int, min_count: int = 2) -> dict[bytes, int]:
    """Train tiktoken-style `mergeable_ranks` with `n_base` tokens (ranks 0..255 are the bytes).

    Deterministic: the most frequent pair wins, ties go to the smallest (left, right) bytes. A
    candidate whose bytes already are a token, or which BPE would not rebuild from its own bytes
    as exactly this pair, is skipped so the result stays BPE-consistent.
    """
    if n_base < 256:
        raise ValueError("n_base must be at least 256 (the single bytes)")
    counts = Counter(p.encode("utf-8") for p in pieces)
    words = [list(w) for w in sorted(counts)]
    freqs = [counts[w] for w in sorted(counts)]
    vocab = [bytes([b]) for b in range(256)]
    ranks = {tok: i for i, tok in enumerate(vocab)}
    stats = _PairStats(words, freqs, vocab)
    while len(vocab) < n_base:
        pair = stats.pop_best(min_count)
        if pair is None:
            raise ValueError(f"corpus too small: only {len(vocab)} of {n_base} tokens could be trained")
        left, right = vocab[pair[0]], vocab[pair[1]]
        token = left + right
        if token in ranks or bpe_parts(token, ranks) != [left, right]:
            stats.banned.add(pair)  # never merge it; the words keep the pair unmerged
            continue
        ranks[token] = len(vocab)
        vocab.append(token)
        stats.merge(pair, ranks[token])
    return ranks


def format_tiktoken(ranks: Mapping[bytes, int]) -> str:
    """tiktoken.model text: one `<base64 bytes> <rank>` line per token, in rank order."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    return "\n".join(lines) + "\n"


def train_kimi_tiny() -> dict[bytes, int]:
    """Train the shipped tiny vocab from the shipped corpus."""
    return train_bpe(pretokenize(corpus_text()), TINY_N_BASE)


def main() -> None:
    """Regenerate data/kimi-tiny.tiktoken (run after editing the corpus)."""
    ranks = train_kimi_tiny()
    TINY_TIKTOKEN.write_text(format_tiktoken(ranks), encoding="ascii", newline="\n")
    print(f"wrote {TINY_TIKTOKEN} ({len(ranks)} tokens)")


if __name__ == "__main__":
    main()
