"""`k2conv verify`: an exact file passes, a damaged one fails the gate with exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
