"""The token sequences `k2conv verify` runs: a built-in varied text set, or the user's prompts file.

Text is encoded with the model's own tokenizer (infer/tokenizer.py). When both sides of a comparison
carry one (a GGUF's embedded vocabulary and the checkpoint's tiktoken files), both encode every
prompt and must agree token for token: a converted vocabulary that tokenizes differently would make
every later number meaningless, so that is an error, not a note.

Prompts file (`--prompts FILE`): UTF-8; a `.jsonl` file holds one JSON object per line with a
"text" string (prompts may then contain newlines); any other file holds one prompt per line, blank
lines skipped. Special-token texts such as `<|im_user|>` become their ids, so chat-formatted turns
can be written out literally.

Without any tokenizer the built-in set falls back to deterministic token-id prompts
(verify.builtin_prompts); a prompts file then is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from k2conv.convert.config import ModelConfig
from k2conv.errors import K2ConvError
from k2conv.infer.tokenizer import TextTokenizer, can_encode, tokenizer_for

# Varied on purpose: what a damaged model gets wrong differs between prose, code, numbers, the chat
# format and CJK text. The last prompt repeats a passage, so a healthy model copies it (induction)
# and perplexity on the copy is sensitive to damage.
BUILTIN_TEXTS: tuple[str, ...] = (
    "The lighthouse on the northern edge of the bay has not been needed for thirty years. Ships carry "
    "their own lights now, and the charts on their screens know every rock better than any keeper did. "
    "Still, the town pays a keeper, and every evening she climbs the stairs and writes in the ledger.",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
    '    """Merge two sorted lists into one sorted list."""\n'
    "    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n"
    "            out.append(a[i]); i += 1\n"
    "        else:\n"
    "            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n",
    "Solve for x: 3x + 7 = 22. Subtract 7 from both sides: 3x = 15. Divide by 3: x = 5. "
    "Check: 3 * 5 + 7 = 22. Next, the sum of the first n odd numbers is n^2, so 1 + 3 + 5 + 7 + 9 = 25, "
    "and the integral of 2x from 0 to 3 equals 9.",
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "<|im_user|>user<|im_middle|>What is the capital of France, and why is it famous?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>The capital of France is Paris. It is famous for the Eiffel "
    "Tower, the Louvre and its cafés.<|im_end|>",
    "今天天气很好，我们去公园散步吧。北京是中国的首都，也是一座历史悠久的城市。"
    "日本語の文章：東京は日本の首都です。한국어: 서울은 한국의 수도입니다.",
    "Inventory: apples 12, pears 7, plums 30, figs 4. Repeat the inventory exactly. "
    "Inventory: apples 12, pears 7, plums 30, figs 4.",
)


@dataclass
class Prompts:
    """Token ids per prompt and a line saying where they came from (for the report)."""

    ids: list[list[int]]
    source: str
    texts: list[str] | None = None


def read_prompts_file(path: Path | str) -> list[str]:
    """Prompts from a `.jsonl` file ({"text": ...} per line) or a plain file (one per line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise K2ConvError(f"{path}: cannot read prompts ({exc})") from None
    texts: list[str] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise K2ConvError(f"{path}: line {no}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"]:
                raise K2ConvError(f'{path}: line {no}: expected an object with a non-empty "text" string')
            texts.append(obj["text"])
        else:
            texts.append(line)
    if not texts:
        raise K2ConvError(f"{path}: no prompts in the file")
    return texts


def _tokenizers(paths: list[Path | str | None]) -> list[TextTokenizer]:
    out = []
    for p in paths:
        if p is not None:
            tok = tokenizer_for(p)
            if tok is not None:
                out.append(tok)
    return out


def encode_texts(texts: list[str], tokenizers: list[TextTokenizer]) -> list[list[int]]:
    """Encode with the first tokenizer; every other one must give the same ids (else one-line error)."""
    first, others = tokenizers[0], tokenizers[1:]
    ids = [first.encode(t) for t in texts]
    for tok in others:
        for n, (text, want) in enumerate(zip(texts, ids), 1):
            got = tok.encode(text)
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise K2ConvError(
                    f"the tokenizers of {first.source} and {tok.source} disagree on prompt {n} at token {at} "
                    f"({want[at : at + 3]} vs {got[at : at + 3]}): the vocabularies differ"
                )
    return ids


def resolve_prompts(cfg: ModelConfig, model: Path | str, reference: Path | str | None = None,
                    prompts_file: Path | str | None = None) -> Prompts:  # fmt: skip
    """The prompts of one verify run: the file's or the built-in texts, encoded by both sides' tokenizers."""
    from k2conv.infer.verify import builtin_prompts

    texts = read_prompts_file(prompts_file) if prompts_file is not None else list(BUILTIN_TEXTS)
    toks = _tokenizers([reference, model])
    if not toks or not can_encode():
        if prompts_file is not None:
            why = "the `regex` package is missing" if toks else f"neither {model} nor the reference carries a tokenizer"
            raise K2ConvError(f"{prompts_file}: cannot encode the prompts: {why}")
        why = "no tokenizer found" if not toks else "`regex` package missing"
        return Prompts(builtin_prompts(cfg), f"built-in token-id prompts ({why})")
    ids = encode_texts(texts, toks)
    for n, p in enumerate(ids, 1):
        if not p:
            raise K2ConvError(f"{prompts_file}: prompt {n} encodes to no tokens")
        if max(p) >= cfg.vocab_size:
            raise K2ConvError(f"{toks[0].source}: prompt {n} has token id {max(p)} ≥ vocab_size {cfg.vocab_size}")
    kinds = " = ".join(f"{t.kind} ({t.source})" for t in toks)
    what = f"{prompts_file}" if prompts_file is not None else "built-in text prompts"
    return Prompts(ids, f"{what}, {len(ids)} prompts, tokenizer {kinds}", texts)
