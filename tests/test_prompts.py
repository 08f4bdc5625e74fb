"""Text prompts for `verify`: both tokenizers against tiktoken and llama.cpp, the prompts file, fallbacks.

Oracles: tiktoken with Kimi's pat_str and ranks (what tokenization_kimi.py runs) for the checkpoint
side, llama.cpp (llama-cpp-python, vocab_only) for the GGUF side. Neither is used by the code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from test_tokenizer import EDGE_CASES, LLAMA_CPP_KNOWN_DIFFERENCES, _write_vocab_only_gguf

from k2conv.cli import main
from k2conv.convert import tokenizer_train as tt
from k2conv.convert.tokenizer import load_vocab, read_tiktoken_model
from k2conv.errors import K2ConvError
from k2conv.infer.prompts import BUILTIN_TEXTS, read_prompts_file, resolve_prompts
from k2conv.infer.tokenizer import tokenizer_for
from k2conv.infer.weights import open_weights


@pytest.fixture(scope="module")
def model(tiny_f32_gguf: tuple[Path, Path]) -> tuple[Path, Path]:
    """(checkpoint, its F32 GGUF)."""
    return tiny_f32_gguf


TEXTS = [*BUILTIN_TEXTS, *EDGE_CASES, *tt.corpus_text().splitlines(keepends=True)[:200]]


def test_both_tokenizers_equal_tiktoken(model: tuple[Path, Path]) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    ckpt, gguf = model
    hf, gg = tokenizer_for(ckpt), tokenizer_for(gguf)
    assert hf is not None and gg is not None and (hf.kind, gg.kind) == ("tiktoken", "gguf")
    enc = tiktoken.Encoding(name="kimi-tiny", pat_str=tt.KIMI_PAT_STR, special_tokens=hf.specials,
                            mergeable_ranks=read_tiktoken_model(ckpt / "tiktoken.model"))  # fmt: skip
    for text in TEXTS:
        want = enc.encode(text, allowed_special="all")
        assert hf.encode(text) == want, repr(text)
        assert gg.encode(text) == want, repr(text)


@pytest.mark.oracle
def test_gguf_tokenizer_equals_llama_cpp(model: tuple[Path, Path]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = model[1]
    llama = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    ours = tokenizer_for(gguf)
    assert ours is not None
    for text in TEXTS:
        assert ours.encode(text) == llama.tokenize(text.encode("utf-8"), add_bos=False, special=True), repr(text)
    # where llama.cpp's kimi-k2 splitter departs from Kimi's regex we follow the regex (the model's tokenizer)
    assert all(t for t, _ in LLAMA_CPP_KNOWN_DIFFERENCES.values())


def test_builtin_prompts_are_text_and_varied(model: tuple[Path, Path]) -> None:
    ckpt, gguf = model
    cfg = open_weights(ckpt).config
    got = resolve_prompts(cfg, gguf, ckpt)
    hf = tokenizer_for(ckpt)
    assert hf is not None
    assert got.ids == [hf.encode(t) for t in BUILTIN_TEXTS] and "tiktoken" in got.source and "gguf" in got.source
    chat = got.ids[3]
    assert hf.specials["<|im_user|>"] in chat and hf.specials["<|im_end|>"] in chat  # chat turn: special ids
    assert all(len(p) >= 20 for p in got.ids)


def test_disagreeing_tokenizers_fail_clearly(model: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = model
    cfg = open_weights(ckpt).config
    vocab = load_vocab(ckpt, cfg)
    vocab.merges = vocab.merges[1:]  # the most frequent merge gone: the GGUF now tokenizes differently
    bad = _write_vocab_only_gguf(tmp_path / "vocab.gguf", vocab)
    with pytest.raises(K2ConvError, match=r"tokenizers of .*model and .*vocab.gguf disagree on prompt 2 at token"):
        resolve_prompts(cfg, bad, ckpt)
    res = CliRunner().invoke(main, ["verify", str(bad), "--reference", str(ckpt), "--device", "cpu"])
    assert res.exit_code == 2 and "disagree on prompt" in res.output and res.output.count("\n") == 1, res.output


def test_prompts_file_formats(model: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, gguf = model
    cfg = open_weights(ckpt).config
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n second one 你好\n", encoding="utf-8")
    assert read_prompts_file(plain) == ["first prompt", " second one 你好"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "line one\\nline two"}\n\n{"text": "<|im_user|>hi<|im_end|>"}\n', encoding="utf-8")
    assert read_prompts_file(jl) == ["line one\nline two", "<|im_user|>hi<|im_end|>"]
    got = resolve_prompts(cfg, gguf, ckpt, jl)
    hf = tokenizer_for(ckpt)
    assert hf is not None and got.ids[1][0] == hf.specials["<|im_user|>"] and str(jl) in got.source
    for content, message in [('{"text": 3}\n', 'line 1: expected an object with a non-empty "text"'),
                             ('{"text": "a"}\n{oops\n', "line 2: not JSON"), ("\n\n", "no prompts")]:  # fmt: skip
        jl.write_text(content, encoding="utf-8")
        with pytest.raises(K2ConvError, match=message):
            read_prompts_file(jl)
    with pytest.raises(K2ConvError, match=r"absent\.txt: cannot read prompts"):
        read_prompts_file(tmp_path / "absent.txt")


def test_no_tokenizer_falls_back_to_token_ids(model: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = model
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ckpt.iterdir():
        if f.name != "tiktoken.model":
            (bare / f.name).symlink_to(f)
    cfg = open_weights(ckpt).config
    got = resolve_prompts(cfg, bare)
    assert "token-id" in got.source and got.texts is None and len(got.ids) == 6
    (tmp_path / "p.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(K2ConvError, match=r"cannot encode the prompts: neither .* carries a tokenizer"):
        resolve_prompts(cfg, bare, None, tmp_path / "p.txt")
