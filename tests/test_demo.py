"""README's first command runs the pipeline end to end; keep it working."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from k2conv.cli import main


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "bit-exact vs the INT4 source: 48/48" in result.output
    assert "4/6 verify" in result.output and "top-1 agreement" in result.output
    assert "byte for byte: yes" in result.output and "all intact" in result.output
    assert "6/6 verify" in result.output and result.output.count("top-1 agreement") == 2
    assert len(list((tmp_path / "demo").glob("*.gguf"))) == 2
