"""`k2conv relayout` from the command line: split input, restore byte-identical, verify accepts it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from k2conv.cli import main


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_relayout_split_restore_and_verify(synth_ckpt, tmp_path: Path) -> None:
    src = synth_ckpt("k2.5")
    runner = CliRunner()
    split = tmp_path / "m.gguf"
    r = runner.invoke(main, ["quantize", str(src), str(split), "--recipe", "q4_0-native", "--split-max-size", "3M",
                             "--quiet", "--no-mmproj"])  # fmt: skip
    assert r.exit_code == 0, r.output
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    lay = tmp_path / "experts.gguf"
    r = runner.invoke(main, ["relayout", str(shards[0]), str(lay), "--align", "4K"])
    assert r.exit_code == 0, r.output
    assert "records" in r.output and lay.exists()
    back = tmp_path / "back" / "m.gguf"
    back.parent.mkdir()
    r = runner.invoke(main, ["relayout", str(lay), str(back), "--restore"])
    assert r.exit_code == 0, r.output
    restored = sorted(back.parent.glob("m-*-of-*.gguf"))
    assert [sha(p) for p in restored] == [sha(p) for p in shards]
    r = runner.invoke(main, ["verify", str(lay), "--reference", str(shards[0]), "--device", "cpu", "--max-kld", "1e-9"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["relayout", str(shards[0]), str(tmp_path / "x.gguf"), "--order", "hot-first"])
    assert r.exit_code == 2 and "--stats" in r.output
