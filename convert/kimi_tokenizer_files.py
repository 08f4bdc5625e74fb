"""Write Kimi-format tokenizer files (tiktoken.model, tokenizer_config.json, chat_template.jinja).

Why: synthetic checkpoints must carry tokenizer files shaped exactly like Moonshot's (see
kimi-k2-checkpoints.md §7) so the converter's tokenizer path is exercised as on the real models.
The base vocab is our tiny trained one (`data/kimi-tiny.tiktoken`, 1,792 tokens); the 256
reserved specials follow it with Kimi's names at Kimi's offsets. `tokenization_kimi.py` is not
written: k2conv never runs remote code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from k2conv.convert.tokenizer_train import TINY_TIKTOKEN
from k2conv.errors import K2ConvError

NUM_RESERVED_SPECIAL = 256
TOKENIZER_VARIANTS = ("k2.5", "k2-thinking", "k2-instruct", "bf16")  # bf16 = K2-Instruct's tokenizer
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

# Offsets from n_base (163584 in the real models); `True` = special, False = the tool-call tokens.
_COMMON_SPECIALS: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    6: ("<|start_header_id|>", True),
    7: ("<|end_header_id|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False),
    13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False),
    15: ("<|tool_call_end|>", False),
    17: ("<|im_middle|>", True),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}
_MEDIA_SPECIALS = {
    18: ("<|media_begin|>", True),
    19: ("<|media_content|>", True),
    20: ("<|media_end|>", True),
    21: ("<|media_pad|>", True),
}
_THINK_SPECIALS = {22: ("<think>", True), 23: ("</think>", True)}
ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
]
MODEL_MAX_LENGTH = 1000000000000000019884624838656  # int(1e30) as transformers writes it


def _check_variant(variant: str) -> None:
    if variant not in TOKENIZER_VARIANTS:
        raise K2ConvError(f"tokenizer variant {variant!r} is not one of {', '.join(TOKENIZER_VARIANTS)}")


def has_thinking(variant: str) -> bool:
    """K2-Thinking and K2.5 carry <think>/</think>; K2-Instruct does not."""
    return variant in ("k2.5", "k2-thinking")


def special_token_names(variant: str) -> dict[int, tuple[str, bool]]:
    """Named specials as {offset from n_base: (text, special flag)} for a variant."""
    _check_variant(variant)
    named = dict(_COMMON_SPECIALS)
    if variant == "k2.5":
        named.update(_MEDIA_SPECIALS)
    if has_thinking(variant):
        named.update(_THINK_SPECIALS)
    return named


def special_tokens(n_base: int, variant: str) -> dict[str, int]:
    """All 256 special texts → ids, unnamed ones as `<|reserved_token_{id}|>` (tokenization_kimi's rule)."""
    named = special_token_names(variant)
    out: dict[str, int] = {}
    for off in range(NUM_RESERVED_SPECIAL):
        tid = n_base + off
        out[named[off][0] if off in named else f"<|reserved_token_{tid}|>"] = tid
    return out


def tokenizer_config(n_base: int, variant: str, chat_template: str) -> dict[str, Any]:
    """tokenizer_config.json as Moonshot ships it (field set and order from the K2 files)."""
    named = special_token_names(variant)
    decoder = {}
    for text, tid in special_tokens(n_base, variant).items():
        is_special = named.get(tid - n_base, (text, True))[1]
        decoder[str(tid)] = {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": is_special,
        }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def tiny_base_vocab_size() -> int:
    """Number of base tokens in the shipped tiny vocab (one line each)."""
    return sum(1 for line in TINY_TIKTOKEN.read_text(encoding="ascii").splitlines() if line.strip())


def write_tokenizer_files(out_dir: Path, variant: str) -> int:
    """Write tiktoken.model, tokenizer_config.json and chat_template.jinja; return n_base."""
    _check_variant(variant)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_base = tiny_base_vocab_size()
    template = chat_template(variant)
    shutil.copyfile(TINY_TIKTOKEN, out_dir / "tiktoken.model")
    cfg = tokenizer_config(n_base, variant, template)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    return n_base


# ---- chat template -----------------------------------------------------------------------
# Our own Jinja, implementing Kimi's chat format (§7): every turn is
# `<|im_{role}|>{name}<|im_middle|>{content}<|im_end|>`; a default system turn when none is given;
# tools declared in a `tool_declare` system turn; tool results as system turns named after the
# tool; assistant tool calls inside <|tool_calls_section_begin|>…<|tool_calls_section_end|>.
# Thinking variants wrap reasoning in <think>…</think>: turns before the last user message get an
# empty pair, later turns keep `reasoning_content`.

_TEMPLATE_HEAD = r"""{#- k2conv's Kimi chat template (variant: @VARIANT@) -#}
{%- macro render_content(msg) -%}
{%- set c = msg['content'] if 'content' in msg else none -%}
{%- if c is string -%}{{ c }}
{%- elif c is not none -%}
{%- for part in c -%}
{%- if part['type'] == 'text' -%}{{ part['text'] }}
@MEDIA@{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro render_tool_calls(msg) -%}
<|tool_calls_section_begin|>
{%- for tc in msg['tool_calls'] -%}
{%- set fn = tc['function'] if 'function' in tc else tc -%}
{%- set call_id = tc['id'] if 'id' in tc and tc['id'] else 'functions.' ~ fn['name'] ~ ':' ~ loop.index0 -%}
<|tool_call_begin|>{{ call_id }}<|tool_call_argument_begin|>
{%- if fn['arguments'] is string -%}{{ fn['arguments'] }}{%- else -%}{{ fn['arguments'] | tojson }}{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- endmacro -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
<|im_system|>system<|im_middle|>@SYSTEM@<|im_end|>
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
{%- set name = m['name'] if 'name' in m and m['name'] else m['role'] -%}
{%- if m['role'] == 'system' -%}
<|im_system|>{{ name }}<|im_middle|>{{ render_content(m) }}<|im_end|>
{%- elif m['role'] == 'user' -%}
<|im_user|>{{ name }}<|im_middle|>{{ render_content(m) }}<|im_end|>
{%- elif m['role'] == 'tool' -%}
<|im_system|>{{ m['name'] if 'name' in m and m['name'] else 'tool' }}<|im_middle|>## Return of {{ m['tool_call_id'] if 'tool_call_id' in m else '' }}
{{ render_content(m) }}<|im_end|>
{%- elif m['role'] == 'assistant' -%}
<|im_assistant|>{{ name }}<|im_middle|>
"""

_TEMPLATE_THINK = r"""{%- if loop.index0 > ns.last_user and 'reasoning_content' in m and m['reasoning_content'] -%}
<think>{{ m['reasoning_content'] }}</think>
{%- else -%}
<think></think>
{%- endif -%}
"""

_TEMPLATE_TAIL = r"""{{- render_content(m) }}
{%- if 'tool_calls' in m and m['tool_calls'] -%}{{ render_tool_calls(m) }}{%- endif -%}
<|im_end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>@GEN_THINK@
{%- endif -%}
"""

_MEDIA_PART = (
    "{%- elif part['type'] in ('image', 'image_url') -%}"
    "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"
)
# K2.5 switches thinking per request: `thinking=false` pre-fills an empty reasoning block.
_GEN_THINK_K25 = "{%- if thinking is defined and not thinking -%}<think></think>{%- endif -%}"


def chat_template(variant: str) -> str:
    """The Jinja chat template for a variant (thinking handling and media differ)."""
    _check_variant(variant)
    text = _TEMPLATE_HEAD + (_TEMPLATE_THINK if has_thinking(variant) else "") + _TEMPLATE_TAIL
    return (
        text.replace("@VARIANT@", variant)
        .replace("@SYSTEM@", DEFAULT_SYSTEM_PROMPT)
        .replace("@MEDIA@", _MEDIA_PART if variant == "k2.5" else "")
        .replace("@GEN_THINK@", _GEN_THINK_K25 if variant == "k2.5" else "")
    )
