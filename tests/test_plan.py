"""The plan from the real configs alone: parameter counts, tensor set, exact byte arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from k2conv.cli import main
from k2conv.convert.config import load_config
from k2conv.convert.pipeline import make_plan

CONFIGS = Path(__file__).parent / "data" / "configs"


def test_real_k25_counts_and_sizes() -> None:
    cfg = load_config(CONFIGS / "k2.5.json")
    plan = make_plan(cfg, None, Path("k25.gguf"), "q4_0-native")
    tensors = plan.tensors
    assert len(tensors) == 1096  # 3 + 13 (dense layer 0) + 60 × 18, as public loader logs show
    experts = [t for t in tensors if t.name.endswith("_exps.weight")]
    assert len(experts) == 180 and all(t.qtype.name == "Q4_0" for t in experts)
    # 60 layers × 3 × 384 experts × 2048·7168 weights at 18 bytes per 32: the INT4 payload, re-blocked.
    assert sum(t.nbytes for t in experts) == 60 * 3 * 384 * 2048 * 7168 // 32 * 18
    k_b = next(t for t in tensors if t.name == "blk.5.attn_k_b.weight")
    assert k_b.ne == (128, 512, 64) and k_b.qtype.name == "Q8_0"
    v_b = next(t for t in tensors if t.name == "blk.5.attn_v_b.weight")
    assert v_b.ne == (512, 128, 64)
    assert next(t for t in tensors if t.name == "blk.1.exp_probs_b.bias").qtype.name == "F32"
    assert next(t for t in tensors if t.name == "blk.1.ffn_gate_inp.weight").qtype.name == "F32"
    f32 = make_plan(cfg, None, Path("k25.gguf"), "f32")
    assert sum(t.nbytes for t in f32.tensors) == 4 * 1_026_408_232_448  # text parameters (reference §8)


@pytest.mark.parametrize("variant", ["k2.5", "k2-thinking", "k2-instruct"])
def test_inspect_and_dry_run_on_bare_configs(variant: str, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(CONFIGS / f"{variant}.json")])
    assert result.exit_code == 0, result.output
    assert f"variant {variant}" in result.output and "1,026,408,232,448" in result.output
    result = runner.invoke(main, ["quantize", str(CONFIGS / f"{variant}.json"), str(tmp_path / "x.gguf"),
                                  "--recipe", "q4_0-native", "--dry-run", "--split-max-size", "50G"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "x-00001-of-00013.gguf" in result.output and "Q4_0" in result.output
    assert not list(tmp_path.iterdir())


def test_bare_config_cannot_be_converted(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["quantize", str(CONFIGS / "k2.5.json"), str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "--dry-run" in result.output
