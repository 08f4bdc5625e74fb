"""Kimi's tiktoken tokenizer → llama.cpp GGUF tokenizer metadata (gguf-for-kimi.md §3).

Why our own reader: Kimi ships `tiktoken.model` + `tokenizer_config.json` and a remote-code
tokenizer class; we never run remote code, so we parse both files ourselves and rebuild exactly
what llama.cpp's converter writes: GPT-2 byte-level token texts, the 256 reserved specials as
CONTROL tokens, `[PAD{i}]` fillers up to the model's vocab_size, and BPE merges recovered from the
ranks (llama.cpp's BPE needs merges; tiktoken has only ranks).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf

from k2conv.convert.config import ModelConfig
from k2conv.errors import K2ConvError

NUM_RESERVED_SPECIAL = 256  # tokenization_kimi.TikTokenTokenizer.num_reserved_special_tokens
TOKEN_NORMAL = int(gguf.TokenType.NORMAL)  # 1
TOKEN_CONTROL = int(gguf.TokenType.CONTROL)  # 3
TOKEN_UNUSED = int(gguf.TokenType.UNUSED)  # 5
# gguf.SpecialVocab's id kinds, read from config.json (text_config as fallback); its "cls" is
# left out because GGUFWriter has no key for it (SpecialVocab skips it with a warning).
SPECIAL_ID_KINDS = ("bos", "eos", "unk", "sep", "pad", "mask")
EOT_TEXT = "<|im_end|>"

ChatTemplate = str | list[dict[str, str]]


@dataclass
class KimiVocab:
    """Everything the GGUF tokenizer keys need, in llama.cpp's terms."""

    tokens: list[str]  # length = vocab_size; index = token id
    token_types: list[int]  # gguf.TokenType values, written as an INT32 array
    merges: list[str]  # "left right" in GPT-2 byte-unicode text, in rank order
    special_ids: dict[str, int]  # bos/eos/pad/... from config.json, eot = <|im_end|>
    chat_template: ChatTemplate | None
    add_bos: bool | None
    add_eos: bool | None
    n_base: int  # tiktoken ranks 0..n_base-1; specials are n_base..n_base+255
    special_tokens: dict[str, int] = field(default_factory=dict)  # text → id, all 256
    pre: str = "kimi-k2"
    model: str = "gpt2"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (byte-level BPE token texts)."""
    table = {b: chr(b) for b in (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def token_text(token: bytes) -> str:
    """A base token's text in the GGUF: its bytes through the GPT-2 table."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


# ---- reading the checkpoint's files ------------------------------------------------------


def read_tiktoken_model(path: Path) -> dict[bytes, int]:
    """Parse `<base64 token bytes> <rank>` lines; ranks must be exactly 0..N-1, tokens unique."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise K2ConvError(f"{path}: no such file (Kimi tokenizers need tiktoken.model)") from None
    except UnicodeDecodeError as exc:
        raise K2ConvError(f"{path}: not UTF-8 text ({exc})") from None
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        token, rank = _parse_tiktoken_line(path, lineno, line)
        if rank in seen_ranks:
            raise K2ConvError(f"{path}: line {lineno}: duplicate rank {rank}")
        if token in ranks:
            raise K2ConvError(f"{path}: line {lineno}: duplicate token {token!r} (also rank {ranks[token]})")
        seen_ranks.add(rank)
        ranks[token] = rank
    if not ranks:
        raise K2ConvError(f"{path}: no tokens")
    if max(seen_ranks) != len(ranks) - 1:
        raise K2ConvError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps, max is {max(seen_ranks)}")
    return ranks


def _parse_tiktoken_line(path: Path, lineno: int, line: str) -> tuple[bytes, int]:
    fields = line.split()
    if len(fields) != 2:
        raise K2ConvError(f"{path}: line {lineno}: expected '<base64> <rank>', got {line[:60]!r}")
    try:
        token = base64.b64decode(fields[0], validate=True)
        rank = int(fields[1])
    except (binascii.Error, ValueError):
        raise K2ConvError(f"{path}: line {lineno}: bad base64 or rank in {line[:60]!r}") from None
    if not token or rank < 0:
        raise K2ConvError(f"{path}: line {lineno}: empty token or negative rank")
    return token, rank


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise K2ConvError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise K2ConvError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise K2ConvError(f"{path}: not a JSON object")
    return data


def special_tokens_from_config(path: Path, tok_cfg: Mapping[str, Any], n_base: int) -> dict[str, int]:
    """All 256 reserved ids: names from added_tokens_decoder, else `<|reserved_token_{id}|>`."""
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise K2ConvError(f"{path}: added_tokens_decoder must be an object")
    names: dict[int, str] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (isinstance(key, str) and key.isdigit() and isinstance(content, str) and content):
            raise K2ConvError(
                f"{path}: added_tokens_decoder entry {key!r} needs an integer id and a content string"
            )
        tid = int(key)
        if not n_base <= tid < n_base + NUM_RESERVED_SPECIAL:
            raise K2ConvError(
                f"{path}: added token {content!r} has id {tid}, outside the special range "
                f"{n_base}..{n_base + NUM_RESERVED_SPECIAL - 1}"
            )
        names[tid] = content
    specials: dict[str, int] = {}
    for tid in range(n_base, n_base + NUM_RESERVED_SPECIAL):
        text = names.get(tid, f"<|reserved_token_{tid}|>")
        if text in specials:
            raise K2ConvError(f"{path}: special token {text!r} is used by ids {specials[text]} and {tid}")
        specials[text] = tid
    return specials


def _chat_template(src_dir: Path, tok_cfg: Mapping[str, Any]) -> ChatTemplate | None:
    """tokenizer_config `chat_template`, else chat_template.jinja, else chat_template.json (as gguf-py)."""
    template = tok_cfg.get("chat_template")
    if template is None:
        jinja, js = src_dir / "chat_template.jinja", src_dir / "chat_template.json"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif js.is_file():
            template = _read_json(js).get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) for t in template):
        return template
    raise K2ConvError(
        f"{src_dir / 'tokenizer_config.json'}: chat_template must be a string or a list of named templates"
    )


def _special_ids(
    cfg: ModelConfig, specials: Mapping[str, int], vocab_size: int, where: str
) -> dict[str, int]:
    """bos/eos/... ids from config.json (text_config fallback) plus eot = <|im_end|>."""
    raw = cfg.raw or {}
    text_cfg = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    ids: dict[str, int] = {}
    for kind in SPECIAL_ID_KINDS:
        value = raw.get(f"{kind}_token_id")
        if value is None:
            value = text_cfg.get(f"{kind}_token_id")
        if value is None:  # a ModelConfig built without its raw dict
            value = getattr(cfg, f"{kind}_token_id", None)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < vocab_size:
                raise K2ConvError(
                    f"{where}: {kind}_token_id {value} is outside the vocabulary (size {vocab_size})"
                )
            ids[kind] = value
    if EOT_TEXT in specials:
        ids["eot"] = specials[EOT_TEXT]
    return ids


# ---- merges ------------------------------------------------------------------------------


def _split_below(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> list[bytes]:
    """BPE `token` using only ranks < `rank` (left-most lowest-rank pair first).

    Pair ranks >= `rank` (or absent) are stored as `rank` itself, meaning "not mergeable".
    """
    if len(token) == 2:
        return [token[:1], token[1:]]
    get = ranks.get
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [min(get(token[i : i + 2], rank), rank) for i in range(len(token) - 1)]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best == rank:
            break
        i = pair_ranks.index(best)  # left-most among equals
        merged = parts[i] + parts[i + 1]
        parts[i : i + 2] = [merged]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = min(get(parts[i - 1] + merged, rank), rank)
        if i < len(pair_ranks):
            pair_ranks[i] = min(get(merged + parts[i + 1], rank), rank)
    return parts


def recover_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that builds each multi-byte token, in rank order (llama.cpp ranks merges by position).

    A token BPE cannot rebuild from its own bytes as exactly two parts has no merge (as in
    llama.cpp's converter); tiktoken could still emit it only if it is a whole pre-token chunk.
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split_below(token, rank, ranks)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


# ---- public API --------------------------------------------------------------------------


def load_vocab(src_dir: Path, cfg: ModelConfig) -> KimiVocab:
    """Read tiktoken.model + tokenizer_config.json (+ chat template) from a Kimi checkpoint."""
    src_dir = Path(src_dir)
    tik_path, tc_path = src_dir / "tiktoken.model", src_dir / "tokenizer_config.json"
    ranks = read_tiktoken_model(tik_path)
    n_base = len(ranks)
    vocab_size = cfg.vocab_size
    if n_base + NUM_RESERVED_SPECIAL > vocab_size:
        raise K2ConvError(
            f"{tik_path}: {n_base} base + {NUM_RESERVED_SPECIAL} special tokens exceed config vocab_size {vocab_size}"
        )
    tok_cfg = _read_json(tc_path)
    specials = special_tokens_from_config(tc_path, tok_cfg, n_base)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for token, rank in ranks.items():
        tokens[rank], types[rank] = token_text(token), TOKEN_NORMAL
    for text, tid in specials.items():
        tokens[tid], types[tid] = text, TOKEN_CONTROL
    merges = [f"{token_text(a)} {token_text(b)}" for a, b in recover_merges(ranks)]
    add = {k: tok_cfg.get(f"add_{k}_token") for k in ("bos", "eos")}
    return KimiVocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=_special_ids(cfg, specials, vocab_size, str(src_dir / "config.json")),
        chat_template=_chat_template(src_dir, tok_cfg),
        add_bos=add["bos"] if isinstance(add["bos"], bool) else None,
        add_eos=add["eos"] if isinstance(add["eos"], bool) else None,
        n_base=n_base,
        special_tokens=specials,
    )


def add_vocab(writer: gguf.GGUFWriter, vocab: KimiVocab) -> None:
    """Write the tokenizer.ggml.* keys (and tokenizer.chat_template) for `vocab`."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, tid in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
