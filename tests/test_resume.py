"""Kill `k2conv quantize` anywhere, rerun it, get the same bytes; never a half file under the final name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from k2conv.convert.journal import load_journal

K2CONV = [sys.executable, "-m", "k2conv.cli"]


def digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.gguf"))


def start(src: Path, out: Path, *extra: str, unit_delay: float = 0.0) -> subprocess.Popen:
    """The run in a new process group, SIGINT at its default (as in a terminal, not ignored as a
    background job of a non-interactive shell would have it)."""
    cmd = [*K2CONV, "quantize", str(src), str(out), "--recipe", "q8_0", "--quiet", "--no-mmproj", "--workers", "2", *extra]
    env = {**os.environ, "K2CONV_TEST_UNIT_DELAY": str(unit_delay)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for_journal(folder: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Block until the run has planned and begun writing (its journal exists)."""
    deadline = time.monotonic() + timeout
    while not any(folder.glob("*.journal")):
        assert proc.poll() is None, "run ended before its journal appeared"
        assert time.monotonic() < deadline, "no journal appeared"
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("split", [False, True])
def test_kill_9_anywhere_then_resume_gives_identical_bytes(synth_ckpt, tmp_path: Path, split: bool) -> None:
    src = synth_ckpt("k2.5")
    extra = ("--split-max-size", "3M") if split else ()
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    t0 = time.perf_counter()
    proc = start(src, ref_dir / "m.gguf", *extra)
    assert proc.wait() == 0, proc.stderr.read()
    full = time.perf_counter() - t0
    reference = digest(outputs(ref_dir))
    rng = np.random.default_rng(7 + split)
    moments = np.sort(rng.uniform(0.05, 1.1, 15)) * full  # spread over the run, some after it ends
    # Where start-up dominates (a slow CI disk, a cold import) random moments may miss the write phase,
    # so five more kills wait for the journal and land a random moment into slowed-down writing.
    kills: list[tuple[float, bool]] = [(float(m), False) for m in moments] + [(float(d), True) for d in rng.uniform(0, 0.3, 5)]
    resumed = 0
    for i, (moment, after_journal) in enumerate(kills):
        work = tmp_path / f"run{i}"
        work.mkdir()
        out = work / "m.gguf"
        proc = start(src, out, *extra, unit_delay=0.02 if after_journal else 0.0)
        if after_journal:
            wait_for_journal(work, proc)
        time.sleep(moment)
        with pytest.raises(ProcessLookupError) if proc.poll() is not None else _nullcontext():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # whatever is under a final name must be complete and correct
        for p in outputs(work):
            assert digest([p])[p.name] == reference[p.name], f"partial file under final name after kill at {moment:.2f}s"
        interrupted = any(work.glob("*.journal")) or any(work.glob("*.part"))
        resumed += any(work.glob("*.journal"))
        assert interrupted or not after_journal, "a kill during slowed writing left no journal"
        if interrupted or digest(outputs(work)) != reference:  # else the kill came after a finished run
            proc = start(src, out, *extra)
            assert proc.wait() == 0, proc.stderr.read()
        assert digest(outputs(work)) == reference
        assert not list(work.glob("*.part")) and not list(work.glob("*.journal"))
    assert resumed >= 3  # some kills really landed mid-run and were resumed


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_quickly_and_resumes(synth_ckpt, tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C or SIGTERM (a reboot, a job scheduler): out within 2 s, one line saying how to resume."""
    src = synth_ckpt("k2-instruct")
    ref = tmp_path / "ref.gguf"
    assert subprocess.run([*K2CONV, "quantize", str(src), str(ref), "--recipe", "f32", "--quiet", "--workers", "1"]).returncode == 0
    out = tmp_path / "m.gguf"
    cmd = [*K2CONV, "quantize", str(src), str(out), "--recipe", "f32", "--quiet", "--workers", "1"]
    env = {**os.environ, "K2CONV_TEST_UNIT_DELAY": "0.05"}  # slow each unit so the signal lands mid-run
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    journal = tmp_path / "m.gguf.part.journal"
    deadline = time.time() + 60
    while not (journal.exists() and journal.read_text().count("\n") >= 4) and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    code = proc.wait()
    assert time.perf_counter() - t0 < 2.0
    err = proc.stderr.read()
    assert code == 130 and "rerun the same command to resume" in err, err
    assert not out.exists() and journal.exists()
    assert subprocess.run(cmd).returncode == 0
    assert out.read_bytes() == ref.read_bytes()


def test_changed_input_refuses_to_resume(synth_ckpt, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(synth_ckpt("k2-thinking"), src)
    out = tmp_path / "m.gguf"
    cmd = [*K2CONV, "quantize", str(src), str(out), "--recipe", "f32", "--quiet", "--workers", "1"]
    env = {**os.environ, "K2CONV_TEST_UNIT_DELAY": "0.05"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    journal = tmp_path / "m.gguf.part.journal"
    while not (journal.exists() and journal.read_text().count("\n") >= 3):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    shard = sorted(src.glob("model-*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and "cannot resume: input changed" in run.stderr and shard.name in run.stderr
    assert not out.exists()
    assert subprocess.run([*cmd, "--restart"]).returncode == 0 and out.exists()


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _reference_and_slowed_run(synth_ckpt, tmp_path: Path) -> tuple[Path, Path, Path, subprocess.Popen, Path]:
    """(source, folder of an uninterrupted reference run, output, a slowed 2-worker run of it that has
    journaled a few units, its journal)."""
    src = synth_ckpt("k2.5")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    assert start(src, ref_dir / "m.gguf").wait() == 0
    out = tmp_path / "m.gguf"
    proc = start(src, out, unit_delay=0.05)
    wait_for_journal(tmp_path, proc)
    journal = next(tmp_path.glob("*.journal"))
    deadline = time.monotonic() + 60
    while journal.read_text().count("\n") < 4:  # some units finished before the signal
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    return src, ref_dir, out, proc, journal


def test_killed_worker_is_reported_and_the_run_resumes(synth_ckpt, tmp_path: Path) -> None:
    """A worker killed mid-run (as the OOM killer would): one clear line, journal kept, rerun gives the same bytes."""
    src, ref_dir, out, proc, journal = _reference_and_slowed_run(synth_ckpt, tmp_path)
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "a worker process died" in lines[0] and "rerun the same command to resume" in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and journal.exists()
    saved = load_journal(journal)
    assert saved is not None and len(saved.finished) >= 3
    assert start(src, out).wait() == 0
    assert digest([out]) == digest(outputs(ref_dir))
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.journal"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_process_group_with_workers(synth_ckpt, tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C in a terminal reaches the workers too: one line from the parent, no worker tracebacks, no
    worker left running, and the rerun resumes to the same bytes."""
    src, ref_dir, out, proc, journal = _reference_and_slowed_run(synth_ckpt, tmp_path)
    workers = _children(proc.pid)
    t0 = time.perf_counter()
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=30)
    assert time.perf_counter() - t0 < 2.0
    err = proc.stderr.read().decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1 and "rerun the same command to resume" in lines[0], err
    assert not out.exists() and journal.exists()
    time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert start(src, out).wait() == 0
    assert digest([out]) == digest(outputs(ref_dir))
