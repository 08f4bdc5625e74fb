"""The runner reads GGUF headers with gguf_scan, and reads exactly what gguf-py's GGUFReader reads.

GGUFReader builds numpy views per string: on a real K2 header (163,840 tokens and as many merges, ~1,100
tensors) one open takes ~20 s and ~0.6 GiB, and `verify` / `imatrix` opened two (weights, tokenizer). So
infer/ reads headers with k2conv's own scan, and GGUFReader stays here as the independent oracle: the weight
sources (a single file, a split set, a relayout file) must hold every tensor with GGUFReader's type, shape,
offset, size and bytes, every metadata value must equal its `contents()`, the GGUF tokenizer must be the one
its values give, and nothing at run time may build a GGUFReader again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader, GGUFWriter

from k2conv.cli import main
from k2conv.convert.tokenizer import bytes_to_unicode
from k2conv.errors import K2ConvError
from k2conv.gguf_scan import scan_file
from k2conv.infer.tokenizer import tokenizer_for
from k2conv.infer.weights import GGUFSource, RelayoutSource, open_weights
from k2conv.layouts.relayout import relayout

KINDS = ["single", "split", "relayout"]


@pytest.fixture(scope="module")
def files(tiny_f32_gguf, synth_ckpt, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """kind → files: the session's F32 GGUF; a Q4_K_M split set (k-quants beside F32 norms, several shards);
    a relayout file of that set."""
    folder = tmp_path_factory.mktemp("scan-vs-reader")
    args = ["quantize", str(synth_ckpt("k2.5")), str(folder / "m.gguf"), "--quiet", "--no-mmproj",
            "--recipe", "Q4_K_M", "--split-max-size", "3M"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    split = sorted(folder.glob("m-*.gguf"))
    assert len(split) > 1
    relayout(split, folder / "r.gguf", 4096)
    return {"single": [tiny_f32_gguf[1]], "split": split, "relayout": [folder / "r.gguf"]}


@pytest.mark.parametrize("kind", KINDS)
def test_source_tensors_are_gguf_readers(files: dict[str, list[Path]], kind: str) -> None:
    paths = files[kind]
    src = open_weights(paths[-1])  # any shard names a split set
    assert type(src) is (RelayoutSource if kind == "relayout" else GGUFSource)
    theirs = {t.name: t for p in paths for t in GGUFReader(p).tensors}
    if kind == "relayout":  # expert records and restore blobs are read through the layout, not as tensors
        dropped = {n for n in theirs if n.startswith("k2conv.") or ".exp." in n}
        assert dropped and set(src.tensors) == set(theirs) - dropped
    else:
        assert set(src.tensors) == set(theirs)
    assert kind == "single" or len({t.qtype for t in src.tensors.values()}) > 2  # k-quants, F32, ...
    for name, t in src.tensors.items():
        ref = theirs[name]
        assert (t.qtype, t.offset, t.nbytes) == (ref.tensor_type, ref.data_offset, ref.n_bytes), name
        assert t.shape == src.shapes[name] == tuple(reversed(ref.shape.tolist())), name
        want = np.asarray(ref.data).view(np.uint8)
        assert t.raw.shape == want.shape and np.array_equal(t.raw, want), name
        assert not t.raw.flags.writeable, name  # a view of the read-only map
    src.close()


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_values_are_gguf_readers(files: dict[str, list[Path]], kind: str) -> None:
    for path in files[kind]:
        header = scan_file(path)
        fields = {k: f for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}  # GGUF.*: not KVs
        assert list(header.kv) == list(fields)
        for key, f in fields.items():
            ours, theirs = header.value(key), f.contents()
            assert repr(ours) == repr(theirs), key  # repr: 1, 1.0 and True differ, NaN equals NaN
        assert header.value("no.such.key") is None


@pytest.mark.parametrize("kind", ["single", "split"])
def test_tokenizer_is_the_one_gguf_readers_values_give(files: dict[str, list[Path]], kind: str) -> None:
    """Tokens, specials, merge ranks and BOS of `tokenizer_for`, against gguf-py's values under the byte-level
    rule written out plainly (one dict lookup per character)."""
    tok = tokenizer_for(files[kind][-1])
    assert tok is not None and tok.kind == "gguf"
    fields = GGUFReader(files[kind][0]).fields
    inverse = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(text: str) -> bytes:
        return bytes(inverse[c] for c in text)

    texts, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    tokens: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for tid, (text, ttype) in enumerate(zip(texts, types)):
        if ttype in (3, 4):  # CONTROL, USER_DEFINED
            specials.setdefault(text, tid)
        elif ttype == 1:
            tokens.setdefault(to_bytes(text), tid)
    ranks: dict[tuple[bytes, bytes], int] = {}
    for pos, merge in enumerate(fields["tokenizer.ggml.merges"].contents()):
        left, _, right = merge.partition(" ")
        ranks.setdefault((to_bytes(left), to_bytes(right)), pos)
    assert tokens and specials and ranks
    assert any(not t.isascii() for t in texts)  # the byte-level mapping is exercised, not just ASCII
    assert tok.tokens == tokens and tok.specials == specials
    assert {pair: tok.pair_rank(*pair) for pair in ranks} == ranks
    bos = fields.get("tokenizer.ggml.bos_token_id")
    assert tok.bos_id == (bos.contents() if bos else None)
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    assert tok.add_bos == (bool(add_bos.contents()) if add_bos else False)


def _vocab_gguf(path: Path, tokens: list[str], merges: list[str]) -> Path:
    w = GGUFWriter(path, "deepseek2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("kimi-k2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tokenizer_maps_byte_level_text_to_bytes(tmp_path: Path) -> None:
    path = _vocab_gguf(tmp_path / "v.gguf", ["Ġ", "Ā", "ä¸Ń", "ÿ", "a", "<|im_end|>"], ["Ġ ä¸Ń", "Ā a"])
    tok = tokenizer_for(path)
    assert tok is not None
    assert tok.tokens == {b" ": 0, b"\x00": 1, "中".encode(): 2, b"\xff": 3, b"a": 4}
    assert tok.specials == {"<|im_end|>": 5}
    assert tok.pair_rank(b" ", "中".encode()) == 0 and tok.pair_rank(b"\x00", b"a") == 1


@pytest.mark.parametrize("bad", [" ", "\x1f", "\xad", "中", "\uffff", "\U0001f600"])
@pytest.mark.parametrize("where", ["token", "merge"])
def test_tokenizer_refuses_text_that_is_not_byte_level(tmp_path: Path, bad: str, where: str) -> None:
    """Characters outside GPT-2's byte-level alphabet (space, controls, soft hyphen, CJK, beyond the BMP) are
    one clear error, from a token or from a merge."""
    tokens, merges = ["Ġ", "a", "<|im_end|>"], ["Ġ a"]
    if where == "token":
        tokens.insert(1, "x" + bad)
    else:
        merges.append(f"a x{bad}" if bad != " " else "a Ġ ")  # a merge's left side ends at its first space
    path = _vocab_gguf(tmp_path / "v.gguf", tokens, merges)
    with pytest.raises(K2ConvError, match="is not GPT-2 byte-level text") as exc:
        tokenizer_for(path)
    assert "\n" not in str(exc.value)


def test_runtime_builds_no_gguf_reader(files: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard against going back: opening sources, reading weights and experts, and the tokenizer."""

    def refuse(self: GGUFReader, *args: object, **kwargs: object) -> None:
        raise AssertionError("a GGUFReader was built at run time (~20 s and ~0.6 GiB on a K2 header)")

    monkeypatch.setattr(GGUFReader, "__init__", refuse)
    for kind in KINDS:
        src = open_weights(files[kind][-1])
        layer = src.config.first_k_dense_replace  # the first MoE layer
        assert src.tensor("output_norm.weight").dtype == torch.float32
        assert src.embed(torch.tensor([1, 2])).shape == (2, src.config.hidden_size)
        assert src.expert_record(layer, 0).data.nbytes > 0
        src.close()
        assert tokenizer_for(files[kind][0]) is not None
