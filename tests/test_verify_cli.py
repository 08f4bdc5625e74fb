"""`k2conv verify`: an exact file passes, a damaged one fails the gate with exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader

from k2conv.cli import main


def test_verify_f32_passes_and_damaged_fails(synth_ckpt, tmp_path: Path) -> None:
    src = synth_ckpt("k2-thinking")
    runner = CliRunner()
    good = tmp_path / "f32.gguf"
    assert runner.invoke(main, ["quantize", str(src), str(good), "--recipe", "f32", "--quiet"]).exit_code == 0
    result = runner.invoke(main, ["verify", str(good), "--reference", str(src), "--device", "cpu", "--max-kld", "1e-6",
                                  "--min-top1", "1.0", "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kld_mean"] < 1e-9 and report["top1_agreement"] == 1.0
    bad = tmp_path / "bad.gguf"
    data = bytearray(good.read_bytes())
    t = next(t for t in GGUFReader(good).tensors if t.name == "blk.1.ffn_down_exps.weight")
    start, per_expert = int(t.data_offset), int(t.n_bytes) // t.shape[-1]
    expert = np.frombuffer(data, np.float32, per_expert // 4, start).copy()
    data[start : start + per_expert] = np.random.default_rng(0).permutation(expert).tobytes()  # scramble expert 0
    bad.write_bytes(bytes(data))
    result = runner.invoke(main, ["verify", str(bad), "--reference", str(src), "--device", "cpu", "--max-kld", "0.01"])
    assert result.exit_code == 1 and "FAILED: mean KLD" in result.output


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_verify_with_direct_io_and_a_small_budget(synth_ckpt, tmp_path: Path, device: str) -> None:
    """The whole verify path on each device: O_DIRECT (pinned buffers under CUDA), a cache that must evict."""
    src = synth_ckpt("k2.5")
    runner = CliRunner()
    good = tmp_path / "f32.gguf"
    assert runner.invoke(main, ["quantize", str(src), str(good), "--recipe", "f32", "--quiet", "--no-mmproj"]).exit_code == 0
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(good).tensors}
    resident = sum(n for name, n in sizes.items() if "_exps" not in name)
    one_expert = max(n // t.shape[-1] for t in GGUFReader(good).tensors if "_exps" in t.name for n in [int(t.n_bytes)])
    budget = resident + 8 * 3 * one_expert  # room for ~8 experts: evictions are certain
    result = runner.invoke(main, ["verify", str(good), "--reference", str(src), "--device", device, "--io", "direct",
                                  "--vram-budget", str(budget), "--max-kld", "1e-6", "--min-top1", "1.0",
                                  "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kld_mean"] < 1e-9 and report["top1_agreement"] == 1.0
    speed = report["speed"]["model"]
    assert speed["cache_hit_rate"] < 1.0 and speed["cache_budget"] < sum(n for name, n in sizes.items() if "_exps" in name) and speed["io"] == "direct"
    assert device == "cpu" or speed["peak_vram_bytes"] > 0
