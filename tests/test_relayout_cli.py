"""`k2conv relayout` from the command line: split input, restore byte-identical, verify accepts it, clean
errors for bad options, and kill -9 at any moment of a run followed by a resume to the identical file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import k2conv.layouts.relayout as rl
from k2conv.cli import main
from k2conv.convert.integrity import verify_integrity
from k2conv.layouts.relayout import relayout


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


def test_bad_compress_level_is_one_clean_line(synth_ckpt, tmp_path: Path) -> None:
    runner = CliRunner()
    src = tmp_path / "m.gguf"
    r = runner.invoke(main, ["quantize", str(synth_ckpt("k2.5")), str(src), "--recipe", "q4_0-native", "--quiet",
                             "--no-mmproj"])  # fmt: skip
    assert r.exit_code == 0, r.output
    for spec in ("zstd:0", "zstd:99", "gzip"):
        r = runner.invoke(main, ["relayout", str(src), str(tmp_path / "x.gguf"), "--compress", spec])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and f"--compress {spec}" in r.output, r.output
    r = runner.invoke(main, ["relayout", str(src), str(tmp_path / "x.gguf"), "--restore", "--compress", "zstd"])
    assert r.exit_code == 2 and "--restore" in r.output
    assert not list(tmp_path.glob("x.gguf*"))
    r = runner.invoke(main, ["relayout", str(src), str(tmp_path / "x.gguf"), "--compress", "zstd:1", "--dry-run"])
    assert r.exit_code == 0 and "ESTIMATE" in r.output and not list(tmp_path.glob("x.gguf*"))


# ---- kill -9 anywhere ----------------------------------------------------------------------------------

K2CONV = [sys.executable, "-m", "k2conv.cli"]
DELAY = 0.008  # K2CONV_TEST_UNIT_DELAY: ~70 pauses make a ~0.6 s write phase on any machine


@pytest.fixture(scope="module")
def kill_inputs(synth_ckpt, tmp_path_factory: pytest.TempPathFactory):
    """case → the Q8_0 file(s) to relayout: one file, or a split set of 5."""
    made: dict[str, list[Path]] = {}

    def make(case: str) -> list[Path]:
        if case not in made:
            folder = tmp_path_factory.mktemp(f"kill-{case}")
            split = ["--split-max-size", "3M"] if case.startswith("split") else []
            subprocess.run([*K2CONV, "quantize", str(synth_ckpt("k2.5")), str(folder / "m.gguf"), "--quiet",
                            "--no-mmproj", "--recipe", "q8_0", *split], check=True, capture_output=True)  # fmt: skip
            made[case] = sorted(folder.glob("m*.gguf"))
        return made[case]

    return make


def _start(inputs: list[Path], out: Path, compress: str | None, delay: float) -> subprocess.Popen:
    cmd = [*K2CONV, "relayout", str(inputs[0]), str(out), "--align", "4K", *(["--compress", compress] if compress else [])]
    env = {**os.environ, "K2CONV_TEST_UNIT_DELAY": str(delay)}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)


def _wait_for_journal(journal: Path, proc: subprocess.Popen, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while not journal.exists():
        assert proc.poll() is None, f"run ended before its journal appeared: {proc.stderr.read()!r}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no journal appeared"
        time.sleep(0.002)
    return time.monotonic()


@pytest.mark.parametrize("case", ["single", "split-zstd"])
def test_kill_9_anywhere_then_resume_gives_identical_bytes(kill_inputs, tmp_path: Path, case: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the `k2conv relayout` process group at 11 random moments (1 from the start, 1 within 1.5 unit delays
    of the journal's creation, around the header write, and 9 stratified over the write phase from journal
    creation to 20 % past the end: records, fsync, rename, after the end); each rerun must finish with the bytes
    of an uninterrupted run, and no file under the final name may be partial."""
    inputs = kill_inputs(case)
    compress = "zstd:1" if case.endswith("zstd") else None
    clean = tmp_path / "clean.gguf"
    relayout(inputs, clean, 4096, compress=compress)  # the uninterrupted run (and numba's kernels loaded)
    reference = sha(clean)
    assert verify_integrity([clean]).ok  # every resumed output below has these bytes, so these checksums
    monkeypatch.setattr(rl, "_TEST_DELAY", DELAY)  # again, slowed like the killed runs: how long their write
    t0 = time.monotonic()  # phase lasts here (planning in this warm process is a few ms of it)
    relayout(inputs, tmp_path / "slow.gguf", 4096, compress=compress)
    phase = time.monotonic() - t0
    monkeypatch.setattr(rl, "_TEST_DELAY", 0.0)
    assert sha(tmp_path / "slow.gguf") == reference
    rng = np.random.default_rng(11 if compress else 5)
    n = 9
    kills = [(float(rng.uniform(0, 1.5)), False)]  # from the start: planning, before the journal (mostly)
    kills += [(float(rng.uniform(0, 1.5 * DELAY)), True)]  # the header is written one delay after the journal
    kills += [(float((k + rng.uniform()) / n * 1.2 * phase), True) for k in range(n)]

    def trial(i: int, moment: float, after_journal: bool) -> tuple[str, int]:
        work = tmp_path / f"run{i}"
        work.mkdir()
        out = work / "r.gguf"
        proc = _start(inputs, out, compress, DELAY)
        if after_journal:
            _wait_for_journal(work / "r.gguf.part.journal", proc)
        time.sleep(moment)
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():  # whatever is under the final name is the complete, correct file
            assert sha(out) == reference, f"partial file under the final name after a kill at {moment:.3f} s"
        leftovers = sorted(p.name for p in work.iterdir() if p.name != "r.gguf")
        state = "finished" if out.exists() and not leftovers else "+".join(leftovers) or "nothing"
        resumed = 0
        if leftovers or not out.exists():
            resumed = relayout(inputs, out, 4096, compress=compress).resumed_units
        assert sha(out) == reference
        assert sorted(p.name for p in work.iterdir()) == ["r.gguf"]
        return state, resumed

    with ThreadPoolExecutor(3) as pool:  # two CPU cores: overlap one run's start-up with another's sleeps
        results = list(pool.map(lambda a: trial(*a), [(i, m, aj) for i, (m, aj) in enumerate(kills)]))
    print(case, f"write phase {phase:.2f} s", results)  # (state after the kill, units resumed), with -s
    assert len(results) == 11  # 22 kills over both cases
    resumed = [r for _, r in results if r > 0]
    assert len(resumed) >= 3, results  # several kills landed mid-write and really resumed from the journal
    assert any(s == "r.gguf.part+r.gguf.part.journal" for s, _ in results), results
