"""Shared fixtures: synthetic checkpoints are written once per test session and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The suite gates every commit, so its property tests replay the same examples each run; explore new
# ones with HYPOTHESIS_PROFILE=explore (and --hypothesis-seed=N) when hunting bugs.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def synth_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """Factory: `synth_ckpt("k2.5")` → path of a tiny checkpoint of that variant (cached per session)."""
    from k2conv.convert.synth import write_checkpoint

    cache: dict[tuple[str, str, int], Path] = {}

    def make(variant: str = "k2.5", preset: str = "tiny", seed: int = 0) -> Path:
        key = (variant, preset, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{variant}-{preset}-{seed}")
            cache[key] = write_checkpoint(out / "model", variant=variant, preset=preset, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_f32_gguf(synth_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny K2.5 checkpoint, its F32 GGUF written once by `k2conv quantize`): exact weights for runner tests."""
    from click.testing import CliRunner

    from k2conv.cli import main

    ckpt = synth_ckpt("k2.5")
    out = tmp_path_factory.mktemp("tiny-f32") / "f32.gguf"
    res = CliRunner().invoke(main, ["quantize", str(ckpt), str(out), "--recipe", "f32", "--quiet", "--no-mmproj"])
    assert res.exit_code == 0, res.output
    return ckpt, out
