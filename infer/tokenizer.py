"""Text → token ids with the model's own tokenizer, from either side of a conversion.

`verify --prompts` and `imatrix --text` feed text, so the runner must tokenize exactly as the model
was trained to see it. Two independent constructions of Kimi's byte-level BPE:

- **HF checkpoint** (`from_hf`): `tiktoken.model` ranks and the 256 reserved specials, with
  tiktoken's rule: a pre-token that is itself a token is emitted whole, else the adjacent pair whose
  *concatenation* has the lowest rank is merged first (left-most among equals).
- **GGUF** (`from_gguf`): the embedded `tokenizer.ggml.*` vocabulary with llama.cpp's rule
  (llm_tokenizer_bpe, `kimi-k2` pre-tokenizer, no ignore_merges): start from single bytes and merge
  the pair with the lowest *merge-list position*; a final symbol that is no token becomes its bytes'
  tokens. Special tokens (CONTROL and USER_DEFINED) are matched in the text first, as llama.cpp
  does with parse_special.

For Kimi's vocabulary the two agree (the GGUF merges are recovered from the ranks in rank order,
convert/tokenizer.py), which `prompts.encode_prompts` asserts whenever both sides are present.
Both split text with Kimi's own pre-tokenizer regex (convert/tokenizer_train.py). llama.cpp's
hand-written kimi-k2 splitter differs from that regex in three known corner cases (combining marks,
Han-script characters outside the CJK blocks, the `'ſ` contraction; tests/test_tokenizer.py
LLAMA_CPP_KNOWN_DIFFERENCES); we follow the regex, i.e. the tokenizer the model was trained with.
The regex needs the `regex` package; without it, text cannot be encoded (a one-line error).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2conv.errors import K2ConvError
from k2conv.gguf_scan import GGUFLayout, scan_file

_CONTROL, _USER_DEFINED, _NORMAL = 3, 4, 1

PairRank = Callable[[bytes, bytes], "int | None"]


def _pretokenize(text: str) -> list[str]:
    try:
        from k2conv.convert.tokenizer_train import pretokenize
    except ImportError:  # pragma: no cover - regex is installed wherever tests run
        raise K2ConvError("encoding text needs the `regex` package (pip install regex)") from None
    try:
        return pretokenize(text)
    except ImportError:
        raise K2ConvError("encoding text needs the `regex` package (pip install regex)") from None


def can_encode() -> bool:
    """Whether text can be encoded here (Kimi's pre-tokenizer regex needs the `regex` package)."""
    try:
        import regex  # noqa: F401
    except ImportError:  # pragma: no cover - installed wherever the tests run
        return False
    return True


def bpe(piece: bytes, pair_rank: PairRank) -> list[bytes]:
    """Merge adjacent parts of `piece` (starting from single bytes), lowest pair rank first, left-most on ties."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    ranks = [pair_rank(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
    while ranks:
        best_i, best = -1, None
        for i, r in enumerate(ranks):
            if r is not None and (best is None or r < best):
                best_i, best = i, r
        if best is None:
            break
        i = best_i
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del ranks[i]
        if i > 0:
            ranks[i - 1] = pair_rank(parts[i - 1], parts[i])
        if i < len(ranks):
            ranks[i] = pair_rank(parts[i], parts[i + 1])
    return parts


@dataclass
class TextTokenizer:
    """A byte-level BPE tokenizer: ordinary tokens by their bytes, specials by their text."""

    kind: str  # "tiktoken" (HF checkpoint) or "gguf" (llama.cpp's rule on the embedded vocab)
    source: str
    tokens: dict[bytes, int]  # ordinary tokens
    specials: dict[str, int]
    pair_rank: PairRank
    whole_piece_first: bool  # tiktoken emits a pre-token that is a token as is
    bos_id: int | None = None
    add_bos: bool = False
    _cache: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _by_first: dict[str, list[str]] | None = field(default=None, repr=False)

    def _encode_piece(self, piece: str) -> list[int]:
        got = self._cache.get(piece)
        if got is not None:
            return got
        raw = piece.encode("utf-8")
        whole = self.tokens.get(raw) if self.whole_piece_first else None
        if whole is not None:
            ids = [whole]
        else:
            ids = []
            for part in bpe(raw, self.pair_rank):
                tid = self.tokens.get(part)
                if tid is not None:
                    ids.append(tid)
                    continue
                for b in part:  # llama.cpp: an unknown symbol falls back to its bytes
                    byte_id = self.tokens.get(bytes([b]))
                    if byte_id is None:
                        raise K2ConvError(f"{self.source}: vocabulary has no token for byte {b:#04x}")
                    ids.append(byte_id)
        if len(self._cache) < 200_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token texts (e.g. `<|im_end|>`) become their ids."""
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        for chunk, special in self._split_specials(text):
            if special is not None:
                ids.append(special)
            else:
                for piece in _pretokenize(chunk):
                    ids.extend(self._encode_piece(piece))
        return ids

    def _split_specials(self, text: str) -> list[tuple[str, int | None]]:
        """Text fragments and special ids in order: earliest match first, the longest at one position."""
        if self._by_first is None:
            self._by_first = {}
            for s in sorted(self.specials, key=len, reverse=True):
                self._by_first.setdefault(s[0], []).append(s)
        by_first = self._by_first
        out: list[tuple[str, int | None]] = []
        if not any(c in text for c in by_first):
            return [(text, None)] if text else []
        start = i = 0
        while i < len(text):
            cands = by_first.get(text[i])
            hit = next((s for s in cands if text.startswith(s, i)), None) if cands else None
            if hit is None:
                i += 1
                continue
            if i > start:
                out.append((text[start:i], None))
            out.append((hit, self.specials[hit]))
            i = start = i + len(hit)
        if start < len(text):
            out.append((text[start:], None))
        return out

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, src_dir: Path | str) -> TextTokenizer:
        """Kimi's tiktoken tokenizer from a checkpoint folder (tiktoken.model + tokenizer_config.json)."""
        from k2conv.convert.tokenizer import (
            NUM_RESERVED_SPECIAL,
            read_tiktoken_model,
            special_tokens_from_config,
        )

        src_dir = Path(src_dir)
        ranks = read_tiktoken_model(src_dir / "tiktoken.model")
        tc_path = src_dir / "tokenizer_config.json"
        try:
            tok_cfg: dict[str, Any] = json.loads(tc_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise K2ConvError(f"{tc_path}: unreadable tokenizer config ({exc})") from None
        specials = special_tokens_from_config(tc_path, tok_cfg, len(ranks))
        assert len(specials) == NUM_RESERVED_SPECIAL
        bos_text = tok_cfg.get("bos_token")
        bos_text = bos_text.get("content") if isinstance(bos_text, dict) else bos_text
        get = ranks.get
        return cls(
            kind="tiktoken", source=str(src_dir), tokens=ranks, specials=specials,
            pair_rank=lambda a, b: get(a + b), whole_piece_first=True,
            bos_id=specials.get(bos_text) if isinstance(bos_text, str) else None,
            add_bos=tok_cfg.get("add_bos_token") is True,
        )  # fmt: skip

    @classmethod
    def from_gguf(cls, header: GGUFLayout, where: str) -> TextTokenizer:
        """The vocabulary embedded in a GGUF (its scanned header, map open), tokenized as llama.cpp's kimi-k2 BPE."""
        from k2conv.convert.tokenizer import bytes_to_unicode

        model, pre = header.value("tokenizer.ggml.model"), header.value("tokenizer.ggml.pre")
        if model is None:
            raise K2ConvError(f"{where}: the GGUF has no tokenizer (tokenizer.ggml.model is absent)")
        if model != "gpt2" or pre != "kimi-k2":
            raise K2ConvError(f"{where}: tokenizer {model!r}/{pre!r} is not Kimi's (gpt2/kimi-k2); cannot encode text")
        texts = header.value("tokenizer.ggml.tokens")
        types = header.value("tokenizer.ggml.token_type")
        merges = header.value("tokenizer.ggml.merges")
        if not texts or types is None or len(types) != len(texts) or not merges:
            raise K2ConvError(f"{where}: tokenizer.ggml.tokens/token_type/merges are missing or disagree in length")
        # GPT-2 text → bytes in one C pass per text (K2: 490k texts, ~3M characters; a generator per text
        # took 0.7 s): each byte-level character becomes the latin-1 character of its byte, every other
        # character below 256 becomes U+FFFF, so latin-1 fails exactly on the texts that are not byte-level.
        table = {i: "\uffff" for i in range(256)} | {ord(c): chr(b) for b, c in bytes_to_unicode().items()}

        def to_bytes(text: str) -> bytes:
            try:
                return text.translate(table).encode("latin-1")
            except UnicodeEncodeError:
                raise K2ConvError(f"{where}: token text {text[:40]!r} is not GPT-2 byte-level text") from None

        tokens: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for tid, (text, ttype) in enumerate(zip(texts, types)):
            if int(ttype) in (_CONTROL, _USER_DEFINED):
                specials.setdefault(str(text), tid)
            elif int(ttype) == _NORMAL:
                tokens.setdefault(to_bytes(str(text)), tid)
        merge_rank: dict[tuple[bytes, bytes], int] = {}
        for pos, m in enumerate(merges):
            left, sep, right = str(m).partition(" ")
            if not sep:
                raise K2ConvError(f"{where}: merge {pos} {str(m)[:40]!r} is not 'left right'")
            merge_rank.setdefault((to_bytes(left), to_bytes(right)), pos)
        bos = header.value("tokenizer.ggml.bos_token_id")
        add_bos = header.value("tokenizer.ggml.add_bos_token")
        get = merge_rank.get
        return cls(
            kind="gguf", source=where, tokens=tokens, specials=specials,
            pair_rank=lambda a, b: get((a, b)), whole_piece_first=False,
            bos_id=int(bos) if bos is not None else None, add_bos=bool(add_bos),  # llama.cpp's BPE default: no BOS
        )  # fmt: skip


def tokenizer_for(path: Path | str) -> TextTokenizer | None:
    """The tokenizer of a model path (checkpoint folder or GGUF), or None when the files carry none."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tiktoken.model").is_file():
            return None
        return TextTokenizer.from_hf(p)

    from k2conv.infer.weights import split_paths

    try:
        header = scan_file(split_paths(p)[0])  # not GGUFReader: ~20 s and ~0.6 GiB on K2's 160k vocabulary
    except (OSError, ValueError) as exc:
        raise K2ConvError(f"{p}: cannot read GGUF metadata ({exc})") from None
    try:
        if "tokenizer.ggml.tokens" not in header.kv:
            return None
        return TextTokenizer.from_gguf(header, str(p))
    finally:
        header.buf.close()  # type: ignore[attr-defined]  # values are copies: nothing keeps the map
