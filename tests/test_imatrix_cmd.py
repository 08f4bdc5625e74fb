"""`k2conv imatrix`: values against an independent recomputation, the file against our reader and quantize.

Oracle for the values: the activations entering each weight, recomputed here step by step from the
runner's public pieces (embedding, blocks, RMSNorm, router, experts) with no torch function mode,
summed as llama-imatrix defines it (Σx² over tokens; per expert only the tokens routed to it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from gguf import GGUFReader

from k2conv.cli import main
from k2conv.convert.tokenizer_train import DATA_DIR
from k2conv.infer.imatrix_collect import chunks_of, collect_imatrix
from k2conv.infer.model import ORIGINAL_LOW_RANK_NORM_EPS, KimiModel, rms_norm
from k2conv.infer.tokenizer import tokenizer_for
from k2conv.infer.weights import open_weights
from k2conv.quant.imatrix import quantizer_weights, read_imatrix
from k2conv.quant.quantize import quantize
from k2conv.quant.types import GGMLQuantizationType as T

CHUNK = 32


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((DATA_DIR / "corpus-en.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


def _recompute(ckpt: Path, chunks: list[list[int]], expert: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Σx² and counts for blk.0.attn_q_a, blk.0.attn_k_b and blk.1 gate/down of `expert`, by hand."""
    src = open_weights(ckpt)
    model = KimiModel(src, "cpu")
    cfg = model.cfg
    eps = cfg.rms_norm_eps
    acc: dict[str, list] = {}

    def add(name: str, x: torch.Tensor, n_mat: int = 1, mat: int = 0) -> None:
        sums, counts = acc.setdefault(name, [np.zeros((n_mat, x.shape[-1])), np.zeros(n_mat, np.int64)])
        sums[mat] += (x.double() ** 2).sum(0).numpy()
        counts[mat] += x.shape[0]

    with torch.no_grad():
        for ids in chunks:
            x = src.embed(torch.tensor(ids))
            cos, sin = model.rope.cos_sin(0, len(ids), model.device)
            b0, b1 = model.blocks[0], model.blocks[1]
            h0 = rms_norm(x, b0.attn_norm, eps)
            add("blk.0.attn_q_a.weight", h0)
            q = rms_norm(h0 @ b0.attn.q_a.T, b0.attn.q_a_norm, ORIGINAL_LOW_RANK_NORM_EPS) @ b0.attn.q_b.T
            q_nope = q.view(len(ids), cfg.num_attention_heads, cfg.qk_head_dim)[..., : cfg.qk_nope_head_dim]
            add("blk.0.attn_k_b.weight", q_nope.reshape(len(ids), -1))  # head-major, one count per token
            x1 = b0(x, cos, sin, 0, None, None)
            h1 = x1 + b1.attn(rms_norm(x1, b1.attn_norm, eps), cos, sin, 0, None)
            f = rms_norm(h1, b1.ffn_norm, eps)
            routed, _ = b1.ffn.route(f)
            rows = f[(routed == expert).any(dim=1)]
            gate, up = (src.expert(1, expert, p) for p in ("gate", "up"))
            add("blk.1.ffn_gate_exps.weight", rows, cfg.n_routed_experts, expert)
            add("blk.1.ffn_down_exps.weight", F.silu(rows @ gate.T) * (rows @ up.T), cfg.n_routed_experts, expert)
    src.close()
    return {k: (v[0], v[1]) for k, v in acc.items()}


def test_values_equal_independent_recomputation(synth_ckpt, calib: Path) -> None:
    ckpt = synth_ckpt("k2.5")
    im = collect_imatrix(ckpt, calib, chunk=CHUNK, max_chunks=2, device="cpu")
    tok = tokenizer_for(ckpt)
    assert tok is not None
    chunks = chunks_of(tok.encode(calib.read_text(encoding="utf-8")), CHUNK, None)[:2]
    assert im.chunk_count == 2 and im.chunk_size == CHUNK and im.datasets == [str(calib)]
    expert = 3
    want = _recompute(ckpt, chunks, expert)
    for name, (sums, counts) in want.items():
        got = im.entries[name]
        if "_exps" in name:
            assert got.sums.shape == sums.shape and counts[expert] > 0, name
            assert got.counts[expert] == counts[expert], name
            np.testing.assert_allclose(got.sums[expert], sums[expert], rtol=1e-5, err_msg=name)
        else:
            assert got.counts.tolist() == [2 * CHUNK], name
            np.testing.assert_allclose(got.sums, sums, rtol=1e-5, err_msg=name)
    # every expert's count is its routed tokens: k per token in total
    exps = im.entries["blk.1.ffn_up_exps.weight"]
    assert exps.counts.sum() == 2 * CHUNK * 2 and exps.sums.shape == (8, 512)
    assert "output.weight" not in im.entries and "token_embd.weight" not in im.entries


def test_cli_file_feeds_quantize(synth_ckpt, calib: Path, tmp_path: Path) -> None:
    """The written file reads back, and quantize uses it: Q4_K bytes equal quantize() with its weights."""
    ckpt = synth_ckpt("k2.5")
    runner = CliRunner()
    out = tmp_path / "im.gguf"
    res = runner.invoke(main, ["imatrix", str(ckpt), "--text", str(calib), "-o", str(out), "--chunk", str(CHUNK),
                               "--chunks", "2", "--device", "cpu", "--process-output"])  # fmt: skip
    assert res.exit_code == 0, res.output
    im = read_imatrix(out)
    assert im.chunk_count == 2 and "output.weight" in im.entries and "blk.2.ffn_down_exps.weight" in im.entries
    name = "blk.1.ffn_down_exps.weight"
    base = ["--recipe", "f32", "--quiet", "--no-mmproj", "--workers", "1"]
    rule = ["--override", r"blk\.1\.ffn_down_exps=Q4_K"]
    with_im, without, f32 = tmp_path / "with.gguf", tmp_path / "without.gguf", tmp_path / "f32.gguf"
    for path, extra in ((with_im, [*rule, "--imatrix", str(out)]), (without, rule), (f32, [])):
        res = runner.invoke(main, ["quantize", str(ckpt), str(path), *base, *extra])
        assert res.exit_code == 0, res.output

    def tensor(path: Path, tname: str):
        return next(t for t in GGUFReader(path).tensors if t.name == tname)

    a, b = tensor(with_im, name), tensor(without, name)
    assert a.tensor_type == T.Q4_K and not np.array_equal(a.data, b.data)
    rows = np.array(tensor(f32, name).data, dtype=np.float32)  # (experts, rows, cols)
    weights = quantizer_weights(im, name, rows.shape)
    assert weights is not None
    want = np.stack([quantize(rows[e], T.Q4_K, np.array(weights[e])) for e in range(rows.shape[0])])
    assert np.array_equal(np.asarray(a.data).reshape(-1), want.reshape(-1))


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("none", ["--text", "{tmp}/absent.txt"], "absent.txt: cannot read calibration text"),
        ("short", ["--text", "{tmp}/short.txt"], "fewer than one chunk of 512"),
        ("binary", ["--text", "{tmp}/bin.txt"], "bin.txt: cannot read calibration text"),
        ("none", ["--text", "{tmp}/absent.txt", "--chunk", "8"], "--chunk 8: must be at least 16"),
    ],
)
def test_bad_input_is_one_line(synth_ckpt, tmp_path: Path, setup: str, args: list[str], message: str) -> None:
    (tmp_path / "short.txt").write_text("a few words only", encoding="utf-8")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = CliRunner().invoke(main, ["imatrix", str(synth_ckpt("k2.5")), *args, "-o", str(tmp_path / "o.gguf"),
                                    "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "o.gguf").exists()


def test_missing_model(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("text " * 100, encoding="utf-8")
    res = CliRunner().invoke(main, ["imatrix", str(tmp_path / "nope.gguf"), "--text", str(tmp_path / "t.txt"), "-o",
                                    str(tmp_path / "o.gguf")])  # fmt: skip
    assert res.exit_code == 2 and "nope.gguf" in res.output and res.output.count("\n") == 1, res.output


def test_gguf_source_gives_the_same_matrix(tiny_f32_gguf: tuple[Path, Path], calib: Path) -> None:
    """An exact F32 GGUF (weights as dequantized views, the `W.T` of a view) gives the checkpoint's imatrix."""
    ckpt, f32 = tiny_f32_gguf
    a = collect_imatrix(ckpt, calib, chunk=CHUNK, max_chunks=1, device="cpu")
    b = collect_imatrix(f32, calib, chunk=CHUNK, max_chunks=1, device="cpu")
    assert sorted(a.entries) == sorted(b.entries) and len(a.entries) == 35
    for name, ea in a.entries.items():
        assert np.array_equal(ea.counts, b.entries[name].counts), name
        np.testing.assert_allclose(b.entries[name].sums, ea.sums, rtol=1e-4, err_msg=name)
