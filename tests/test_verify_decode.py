"""verify --max-new-tokens: greedy continuations through the KV cache are scored against the reference.

Oracles: KimiModel.greedy (the model's own decode loop) for the tokens, and an exact F32 GGUF of the
source for the scores: teacher-forcing the reference on the model's tokens must then give KLD ≈ 0 at
every decoded position (an off-by-one alignment would not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from k2conv.cli import main
from k2conv.infer.baseline import read_baseline
from k2conv.infer.model import KimiModel
from k2conv.infer.prompts import resolve_prompts
from k2conv.infer.verify import run_verify
from k2conv.infer.weights import open_weights

N = 4


@pytest.fixture(scope="module")
def f32(tiny_f32_gguf: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_f32_gguf


def test_decoded_positions_are_scored(f32: tuple[Path, Path], tmp_path: Path) -> None:
    src, model = f32
    prompts = resolve_prompts(open_weights(src).config, model, src).ids[:2]
    report = run_verify(model, src, prompts, device="cpu", score_new_tokens=True, max_new_tokens=N,
                        save_baseline=tmp_path / "b.k2b")  # fmt: skip
    assert report["positions"] == sum(len(p) + N for p in prompts)
    dec = report["decode"]
    assert dec["positions"] == 2 * N and dec["kld_max"] < 1e-6 and dec["top1_agreement"] == 1.0
    assert report["kld_max"] < 1e-6 and report["speed"]["model"]["decode_tokens"] == 2 * N
    assert report["speed"]["model"]["decode_tok_s"] > 0
    runner = KimiModel(open_weights(model), "cpu")
    for p, seq in zip(prompts, read_baseline(tmp_path / "b.k2b").sequences):
        assert seq == p + runner.greedy(p, N)


def test_cli_reports_decoded_positions(f32: tuple[Path, Path], tmp_path: Path) -> None:
    src, model = f32
    (tmp_path / "p.txt").write_text("The keeper climbs the stairs.\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["verify", str(model), "--reference", str(src), "--device", "cpu",
                                    "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "3", "--max-kld", "1e-6"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "decoded positions (3/prompt)" in res.output and "decode tok/s (3 tokens)" in res.output
