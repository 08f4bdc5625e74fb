"""Kimi tokenizer → GGUF: checked against tiktoken and llama.cpp, neither written here.

Oracles:
- tiktoken with Kimi's pat_str, our tiktoken.model ranks and the 256 specials is what Moonshot's
  tokenization_kimi.py runs; it defines the right token ids.
- llama.cpp (llama-cpp-python, vocab_only) tokenizes our GGUF with its own kimi-k2 pre-tokenizer
  and our merges; it must give tiktoken's ids.
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path

import gguf
import pytest

from k2conv.convert import kimi_tokenizer_files as ktf
from k2conv.convert import tokenizer_train as tt
from k2conv.convert.config import ModelConfig, parse_config
from k2conv.convert.tokenizer import (
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNUSED,
    KimiVocab,
    add_vocab,
    load_vocab,
    read_tiktoken_model,
    recover_merges,
    token_text,
)
from k2conv.errors import K2ConvError

tiktoken = pytest.importorskip("tiktoken")

# Strings where llama.cpp and tiktoken must agree. Lines of the training corpus are added below.
EDGE_CASES = [
    "",
    " ",
    "  ",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\n",
    "\n\n\n",
    "a\n\n\nb",
    "  \n  x",
    "tabs\t\tand\t \tspaces",
    "\r\n windows \r\n",
    "1234567",
    "12,345,678.90 and 0.001 and -273.15",
    "it's IT'S don't we're they've you'll she'd I'm 'tis",
    "HelloWorld camelCaseName snake_case_name SCREAMING_CASE HTTPServer",
    "你好，世界！这是什么？“引号”、顿号……——。",
    "我用Python写了tokenizer，数字123和emoji😀。",
    "日本語：こんにちは、世界。한국어: 안녕하세요",
    "Привет, мир! Γειά σου κόσμε! Straße Größe",
    "😀😃👍🏽 👨‍👩‍👧‍👦 🇨🇳 ❤️ ✨⭐",
    "def f(x):\n    return {'a': [1, 2, 3]}\n",
    'const s = `${a} + ${b}`; // JS\n{"k": [1.5e-6, null, true]}',
    "<|im_system|>system<|im_middle|>You are Kimi.<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>",
    "<|im_assistant|>assistant<|im_middle|><think>hmm</think>ok<|im_end|>[EOS]",
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}"
    "<|tool_call_end|><|tool_calls_section_end|>",
    "text<|im_end|>more [BOS] <|media_begin|>image<|media_content|><|media_pad|><|media_end|>",
    "not special: <|im_end| and <im_end|> and [EOS",
    "<|reserved_token_1900|> between",
    "~!@#$%^&*()_+-=[]{}|;':\",./<>?",
    "∀x ∈ ℝ: x² ≥ 0 → π ≈ 3.1416",
    "<|im_user|>user<|im_middle|>Hi 你好! x = 1234567;\t\t😀\n\n   def f(): return 'ok'<|im_end|>",
    "Zyzzyva quuxWidget 99999999999 \u3000全角空格\u00a0nbsp",
]

# Where llama.cpp's hand-written kimi-k2 pre-tokenizer (src/unicode.cpp) splits differently from
# Kimi's regex: {case: (text, a token spanning the boundary llama.cpp adds)}. Our tiny vocab has no
# such token, so it still tokenizes alike; a vocab that has one (the real 163k one may) does not.
# This is llama.cpp's behaviour, not the GGUF's: asserted as a difference so a fix shows up.
LLAMA_CPP_KNOWN_DIFFERENCES = {
    # \p{M} is in Kimi's letter classes; llama.cpp's letter test leaves combining marks out.
    "combining mark": ("cafe\u0301", "e\u0301"),
    # Kimi's \p{Han} is the Han script; llama.cpp tests CJK ideograph blocks (々 is Han, Lm).
    "han script": ("日々", "日々"),
    # (?i:'s) matches 'ſ' (U+017F folds to s); llama.cpp lower-cases and compares with 's'.
    "case folded contraction": ("it'ſ", "it'ſ"),
}


# ---- fixtures ----------------------------------------------------------------------------


def _config(n_base: int, nested: bool = False, vocab_size: int | None = None) -> dict:
    """A small DeepSeek-V3 config.json carrying Kimi's special ids (K2.5 nests it in text_config)."""
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "num_attention_heads": 2,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "vocab_size": vocab_size or n_base + 256,
        "bos_token_id": n_base,
        "eos_token_id": n_base + 1,
        "pad_token_id": n_base + 255,
    }
    if nested:
        return {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "text_config": text,
        }
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", **text}


def _checkpoint(
    root: Path, variant: str, nested: bool = False, vocab_size: int | None = None
) -> tuple[Path, ModelConfig]:
    root.mkdir(parents=True, exist_ok=True)
    n_base = ktf.write_tokenizer_files(root, variant)
    raw = _config(n_base, nested, vocab_size)
    (root / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    return root, parse_config(raw)


@pytest.fixture(scope="module")
def k25(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelConfig]:
    return _checkpoint(tmp_path_factory.mktemp("tok") / "k25", "k2.5", nested=True)


@pytest.fixture(scope="module")
def k25_vocab(k25: tuple[Path, ModelConfig]) -> KimiVocab:
    return load_vocab(*k25)


@pytest.fixture(scope="module")
def encoding(k25: tuple[Path, ModelConfig], k25_vocab: KimiVocab):
    """tiktoken set up as tokenization_kimi.py does: Kimi's pat_str, the ranks, all 256 specials."""
    return tiktoken.Encoding(
        name="kimi-tiny",
        pat_str=tt.KIMI_PAT_STR,
        mergeable_ranks=read_tiktoken_model(k25[0] / "tiktoken.model"),
        special_tokens=k25_vocab.special_tokens,
    )


def _write_vocab_only_gguf(path: Path, vocab: KimiVocab) -> Path:
    """A deepseek2 GGUF with no tensors: the hparams llama.cpp reads even in vocab_only mode."""
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_q_lora_rank(16)
    w.add_kv_lora_rank(16)
    w.add_key_length(24)
    w.add_value_length(16)
    w.add_key_length_mla(24)
    w.add_value_length_mla(16)
    w.add_rope_dimension_count(8)
    w.add_leading_dense_block_count(1)
    w.add_expert_feed_forward_length(32)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_expert_shared_count(1)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_vocab_size(len(vocab.tokens))
    add_vocab(w, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, k25_vocab: KimiVocab):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = _write_vocab_only_gguf(tmp_path_factory.mktemp("gguf") / "vocab.gguf", k25_vocab)
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _llama_detokenize(llama, ids: list[int]) -> bytes:
    """llama.cpp's own llama_detokenize (Llama.detokenize truncates pieces over 32 bytes)."""
    import ctypes

    import llama_cpp

    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(llama._model.vocab, arr, len(ids), buf, cap, False, True)
    assert 0 <= n <= cap
    return buf.raw[:n]


def _fuzz_strings(n: int = 300, seed: int = 1234) -> list[str]:
    """Random mixes of the corpus' characters and special-token texts, unseen as a whole.

    Characters behind LLAMA_CPP_KNOWN_DIFFERENCES (combining marks, Han-script code points outside
    llama.cpp's CJK blocks such as 〇) are left out: they are tested on their own below.
    """
    import random
    import unicodedata

    regex = pytest.importorskip("regex")
    han = regex.compile(r"\p{Han}")
    in_blocks = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))
    alphabet = sorted(
        c
        for c in set(tt.corpus_text())
        if not unicodedata.category(c).startswith("M")
        and not (han.match(c) and not any(lo <= ord(c) <= hi for lo, hi in in_blocks))
    )
    pieces = [
        *alphabet,
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "'s",
        "'T",
        "<|im_end|>",
        "<|im_user|>",
        "[BOS]",
        "<think>",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _sample_lines() -> list[str]:
    lines = tt.corpus_text().splitlines(keepends=True)
    return [*EDGE_CASES, *lines, "".join(lines[:40]), *_fuzz_strings()]


# ---- the shipped tiny vocab --------------------------------------------------------------


def test_retraining_reproduces_shipped_vocab() -> None:
    """data/kimi-tiny.tiktoken is exactly what the trainer makes from the shipped corpus."""
    assert tt.format_tiktoken(tt.train_kimi_tiny()) == tt.TINY_TIKTOKEN.read_text(encoding="ascii")


def test_shipped_vocab_shape() -> None:
    ranks = read_tiktoken_model(tt.TINY_TIKTOKEN)
    assert len(ranks) == tt.TINY_N_BASE == ktf.tiny_base_vocab_size()
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert len(tt.corpus_text().encode("utf-8")) > 30_000


def test_every_token_is_one_merge_of_earlier_tokens() -> None:
    """BPE-consistent: each token >255 is rebuilt from its bytes as (earlier, earlier)."""
    ranks = read_tiktoken_model(tt.TINY_TIKTOKEN)
    merges = recover_merges(ranks)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    assert len(merges) == len(ranks) - 256
    for (a, b), token in zip(merges, by_rank[256:], strict=True):
        assert a + b == token and ranks[a] < ranks[token] and ranks[b] < ranks[token]


def test_pretokenizer_rewrite_splits_like_tiktoken() -> None:
    """Our `&&`-free regex gives tiktoken's chunks (tiktoken runs Kimi's original pat_str).

    tiktoken exposes no splitter, so it gets a vocab holding every chunk we produce and every
    union of up to 8 neighbouring chunks: a chunk tiktoken sees whole comes back as one token, so
    its tokens equal our chunks only if the chunk boundaries agree.
    """
    text = "".join(_sample_lines()) + "".join(t for t, _ in LLAMA_CPP_KNOWN_DIFFERENCES.values())
    pieces = [p.encode("utf-8") for p in tt.pretokenize(text)]
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(len(pieces)):
        for j in range(i + 1, min(len(pieces), i + 8) + 1):
            ranks.setdefault(b"".join(pieces[i:j]), len(ranks))
    enc = tiktoken.Encoding(
        name="split-probe", pat_str=tt.KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens={}
    )
    got = [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)]
    assert got == pieces


def test_v1_regex_agrees_with_rewrite() -> None:
    regex = pytest.importorskip("regex")
    text = tt.corpus_text() + "".join(EDGE_CASES)
    assert regex.findall(tt.KIMI_PAT_STR, text, flags=regex.V1) == tt.pretokenize(text)


# ---- merges reproduce tiktoken -----------------------------------------------------------


def _bpe_with_merges(
    piece: bytes, merge_rank: dict[tuple[str, str], int], text_to_id: dict[str, int]
) -> list[int]:
    """llama.cpp's BPE rule on one chunk: merge the left-most pair with the lowest merge position."""
    parts = [token_text(piece[i : i + 1]) for i in range(len(piece))]
    while len(parts) > 1:
        ranked = [(merge_rank.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        ranked = [(r, i) for r, i in ranked if r is not None]
        if not ranked:
            break
        _, i = min(ranked)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [text_to_id[p] for p in parts]


def test_merge_list_reproduces_tiktoken(k25_vocab: KimiVocab, encoding) -> None:
    merge_rank = {tuple(m.split(" ")): i for i, m in enumerate(k25_vocab.merges)}
    text_to_id = {t: i for i, t in enumerate(k25_vocab.tokens[: k25_vocab.n_base])}
    for line in _sample_lines():
        ours = [
            t
            for p in tt.pretokenize(line)
            for t in _bpe_with_merges(p.encode("utf-8"), merge_rank, text_to_id)
        ]
        assert ours == encoding.encode_ordinary(line), repr(line)


# ---- llama.cpp on our GGUF ---------------------------------------------------------------


@pytest.mark.oracle
def test_llama_cpp_tokenizes_like_tiktoken(llama, encoding) -> None:
    for text in _sample_lines():
        want = encoding.encode(text, allowed_special="all")
        got = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert got == want, repr(text)
        assert _llama_detokenize(llama, got) == text.encode("utf-8"), repr(text)


def _extend_vocab(ranks: dict[bytes, int], target: bytes) -> None:
    """Append BPE-consistent merges until `target` is one token (left-most pair first)."""
    while len(parts := tt.bpe_parts(target, ranks)) > 1:
        token = parts[0] + parts[1]
        assert tt.bpe_parts(token, ranks) == parts[:2]
        ranks[token] = len(ranks)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory):
    """The tiny vocab plus tokens that span llama.cpp's divergent chunk boundaries: (llama, tiktoken)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src, _ = _checkpoint(tmp_path_factory.mktemp("crafted") / "ckpt", "k2.5")
    ranks = read_tiktoken_model(src / "tiktoken.model")
    for _, token in LLAMA_CPP_KNOWN_DIFFERENCES.values():
        _extend_vocab(ranks, token.encode("utf-8"))
    n = len(ranks)
    (src / "tiktoken.model").write_text(tt.format_tiktoken(ranks), encoding="ascii")
    tc = ktf.tokenizer_config(n, "k2.5", ktf.chat_template("k2.5"))
    (src / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    raw = _config(n)
    vocab = load_vocab(src, parse_config(raw))
    enc = tiktoken.Encoding(
        name="crafted", pat_str=tt.KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens=vocab.special_tokens
    )
    path = _write_vocab_only_gguf(src / "vocab.gguf", vocab)
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False), enc


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(LLAMA_CPP_KNOWN_DIFFERENCES))
def test_llama_cpp_known_pretokenizer_differences(crafted, case: str) -> None:
    llama, enc = crafted
    text, token = LLAMA_CPP_KNOWN_DIFFERENCES[case]
    want = enc.encode(text, allowed_special="all")
    got = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert enc.decode_single_token_bytes(want[-1]) == token.encode("utf-8")  # tiktoken uses the token
    assert got != want  # llama.cpp cannot: its chunk boundary cuts through it
    assert _llama_detokenize(llama, got) == text.encode("utf-8")
    for line in EDGE_CASES:  # everywhere else the crafted vocab still agrees
        assert llama.tokenize(line.encode("utf-8"), add_bos=False, special=True) == enc.encode(
            line, allowed_special="all"
        )


@pytest.mark.oracle
def test_llama_cpp_reads_special_ids_and_template(llama, k25_vocab: KimiVocab) -> None:
    n = k25_vocab.n_base
    assert llama.n_vocab() == n + 256
    assert (llama.token_bos(), llama.token_eos()) == (n, n + 1)
    assert llama.metadata["tokenizer.ggml.eot_token_id"] == str(n + 2)
    assert llama.metadata["tokenizer.ggml.pre"] == "kimi-k2"
    assert llama.metadata["tokenizer.chat_template"] == ktf.chat_template("k2.5")


# ---- load_vocab / add_vocab --------------------------------------------------------------


def test_vocab_layout(k25_vocab: KimiVocab) -> None:
    v, n = k25_vocab, k25_vocab.n_base
    assert len(v.tokens) == len(v.token_types) == n + 256
    assert v.tokens[ord("A")] == "A" and v.tokens[ord(" ")] == "Ġ" and v.tokens[ord("\n")] == "Ċ"
    assert v.token_types[:n] == [TOKEN_NORMAL] * n and v.token_types[n:] == [TOKEN_CONTROL] * 256
    assert v.tokens[n : n + 3] == ["[BOS]", "[EOS]", "<|im_end|>"]
    assert v.tokens[n + 5] == f"<|reserved_token_{n + 5}|>"
    assert v.tokens[n + 22 : n + 24] == ["<think>", "</think>"]
    assert v.tokens[-2:] == ["[UNK]", "[PAD]"]
    assert v.special_ids == {"bos": n, "eos": n + 1, "pad": n + 255, "eot": n + 2}
    assert len(v.merges) == n - 256 and all(m.count(" ") == 1 for m in v.merges)
    assert (v.pre, v.model, v.add_bos, v.add_eos) == ("kimi-k2", "gpt2", None, None)
    assert v.chat_template == ktf.chat_template("k2.5")


def test_pad_fill_and_flat_config(tmp_path: Path) -> None:
    src, cfg = _checkpoint(tmp_path, "k2-instruct", vocab_size=ktf.tiny_base_vocab_size() + 300)
    v = load_vocab(src, cfg)
    n = v.n_base
    assert v.tokens[n + 256 :] == [f"[PAD{i}]" for i in range(n + 256, n + 300)]
    assert v.token_types[n + 256 :] == [TOKEN_UNUSED] * 44
    assert v.tokens[n + 22] == f"<|reserved_token_{n + 22}|>"  # no <think> in K2-Instruct


def test_chat_template_falls_back_to_jinja_file(tmp_path: Path) -> None:
    src, cfg = _checkpoint(tmp_path, "k2-thinking")
    tc = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    del tc["chat_template"]
    tc["add_bos_token"] = False
    (src / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    (src / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    v = load_vocab(src, cfg)
    assert v.chat_template == "{{ messages }}" and v.add_bos is False


def test_gguf_keys(tmp_path: Path, k25_vocab: KimiVocab) -> None:
    path = _write_vocab_only_gguf(tmp_path / "v.gguf", k25_vocab)
    r = gguf.GGUFReader(str(path))
    f = r.fields
    n = k25_vocab.n_base
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == "kimi-k2"
    assert f["tokenizer.ggml.tokens"].contents() == k25_vocab.tokens
    assert f["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert f["tokenizer.ggml.token_type"].contents() == k25_vocab.token_types
    assert f["tokenizer.ggml.merges"].contents() == k25_vocab.merges
    ids = {k: f[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "padding", "eot")}
    assert ids == {"bos": n, "eos": n + 1, "padding": n + 255, "eot": n + 2}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "tiktoken.model: no such file"),
        ("malformed", "tiktoken.model: line 3: expected '<base64> <rank>'"),
        ("bad_base64", "tiktoken.model: line 3: bad base64 or rank"),
        ("duplicate_rank", "tiktoken.model: line 4: duplicate rank 2"),
        ("too_big", "exceed config vocab_size"),
        ("bad_special_id", "tokenizer_config.json: added token"),
    ],
)
def test_bad_input(tmp_path: Path, damage: str, message: str) -> None:
    src, cfg = _checkpoint(tmp_path, "k2.5")
    tik = src / "tiktoken.model"
    lines = tik.read_text(encoding="ascii").splitlines()
    if damage == "missing":
        tik.unlink()
    elif damage == "malformed":
        lines[2] = "QQ==  "
    elif damage == "bad_base64":
        lines[2] = "Q!Q= 2"
    elif damage == "duplicate_rank":
        lines[3] = f"{base64.b64encode(b'zz').decode()} 2"
    elif damage == "too_big":
        lines.append(f"{base64.b64encode(b'new token').decode()} {len(lines)}")
    elif damage == "bad_special_id":
        tc = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        tc["added_tokens_decoder"]["5"] = {"content": "<oops>"}
        (src / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    if damage != "missing":
        tik.write_text("\n".join(lines) + "\n", encoding="ascii")
    with pytest.raises(K2ConvError) as info:
        load_vocab(src, cfg)
    msg = str(info.value)
    assert message in msg and "\n" not in msg


# ---- tokenizer files per variant ---------------------------------------------------------


@pytest.mark.parametrize("variant", ["k2.5", "k2-thinking", "k2-instruct"])
def test_tokenizer_config_per_variant(tmp_path: Path, variant: str) -> None:
    n = ktf.write_tokenizer_files(tmp_path, variant)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    dec = tc["added_tokens_decoder"]
    assert sorted(map(int, dec)) == list(range(n, n + 256))
    name = {int(k): e["content"] for k, e in dec.items()}
    assert (name[n], name[n + 1], name[n + 2], name[n + 17]) == (
        "[BOS]",
        "[EOS]",
        "<|im_end|>",
        "<|im_middle|>",
    )
    assert (name[n + 254], name[n + 255]) == ("[UNK]", "[PAD]")
    not_special = {int(k) - n for k, e in dec.items() if not e["special"]}
    assert not_special == {11, 12, 13, 14, 15}
    assert (name[n + 18] == "<|media_begin|>") == (variant == "k2.5")
    assert (name[n + 22] == "<think>") == (variant != "k2-instruct")
    assert name[n + 100] == f"<|reserved_token_{n + 100}|>"
    assert tc["tokenizer_class"] == "TikTokenTokenizer" and tc["bos_token"] == "[BOS]"
    assert tc["auto_map"]["AutoTokenizer"] == ["tokenization_kimi.TikTokenTokenizer", None]
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == tc["chat_template"]


def _render(variant: str, messages: list[dict], **kw) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)  # as transformers does
    return env.from_string(ktf.chat_template(variant)).render(messages=messages, **kw)


def test_chat_template_format() -> None:
    sys_ = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert _render("k2-instruct", msgs, add_generation_prompt=True) == (
        sys_ + "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
    ]
    assert _render("k2-thinking", history) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>q1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>a1<|im_end|>"
        "<|im_user|>user<|im_middle|>q2<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>r2</think>a2<|im_end|>"
    )


def test_chat_template_tools_and_media() -> None:
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image"}]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "tool_call_id": "functions.f:0", "name": "f", "content": "42"},
    ]
    out = _render("k2.5", msgs, tools=[{"name": "f"}], add_generation_prompt=True, thinking=False)
    assert out.startswith(
        '<|im_system|>tool_declare<|im_middle|>[{"name": "f"}]<|im_end|><|im_system|>system'
    )
    assert (
        "<|im_user|>user<|im_middle|>see<|media_begin|>image<|media_content|><|media_pad|><|media_end|><|im_end|>"
        in out
    )
    assert (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
        '{"x": 1}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    ) in out
    assert "<|im_system|>f<|im_middle|>## Return of functions.f:0\n42<|im_end|>" in out
    assert out.endswith("<|im_assistant|>assistant<|im_middle|><think></think>")


def test_recover_merges_skips_unreachable_tokens() -> None:
    """A token BPE cannot rebuild as two parts gets no merge (as in llama.cpp's converter)."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"de": 257, b"abcde": 258, b"abc": 259})
    assert recover_merges(ranks) == [(b"a", b"b"), (b"d", b"e"), (b"ab", b"c")]
