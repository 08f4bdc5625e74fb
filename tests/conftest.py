"""Shared fixtures: synthetic checkpoints are written once per test session and reused."""

from __future__ import annotations

from pathlib import Path

import pytest


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
