"""Per-tensor checksums in the GGUF, `verify_integrity`, and a full disk during a run.

The checksums are checked against an outside reader (gguf-py's GGUFReader + zlib) and llama.cpp must
still load the files; every single flipped bit in tensor data is reported with the tensor's name.
The full-disk test runs k2conv on a real, small tmpfs that the test fills mid-run (root only; the
code path is also covered everywhere by an injected ENOSPC).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFWriter
from hypothesis import given, settings
from hypothesis import strategies as st

from k2conv.atomic import temp_path
from k2conv.cli import main
from k2conv.convert import journal as journal_mod
from k2conv.convert import writer
from k2conv.convert.crc32c import crc32c as crc32c_kernel
from k2conv.convert.crc32c import crc32c_reference, hardware_kind
from k2conv.convert.integrity import (
    KEY_ALGORITHM,
    KEY_HEADER,
    KEY_TENSORS,
    crc32c,
    crc32c_combine,
    stored_checksums,
    verify_integrity,
)
from k2conv.convert.journal import DiskFull, journal_path, load_journal
from k2conv.convert.pipeline import make_plan, open_source
from k2conv.convert.writer import Interrupted, unit_bytes, unit_offset, units_of, write_plan
from k2conv.gguf_scan import scan_file

sys.path.insert(0, str(Path(__file__).parent))
from gguf_seeds import write_seed

K2CONV = [sys.executable, "-m", "k2conv.cli"]


def sha(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# ---- CRC-32C -------------------------------------------------------------------------------------------
def outside_crc32c(data: bytes) -> int:
    """CRC-32C by code no one here wrote (PyPI `crc32c`, C), else by our table kernel (no hardware path)."""
    try:
        import crc32c as pypi_crc32c
    except ImportError:  # pragma: no cover - the test extra installs it
        return crc32c_kernel(data, kind="table")
    return pypi_crc32c.crc32c(data)


KINDS = ["table", hardware_kind()] if hardware_kind() != "table" else ["table"]


def test_crc32c_check_value() -> None:
    for kind in KINDS:
        assert crc32c_kernel(b"123456789", kind=kind) == 0xE3069283  # the standard check value
    assert crc32c_reference(b"123456789") == 0xE3069283


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), cut=st.integers(0, 2000), start=st.integers(0, 7))
def test_crc32c_kernels_equal_the_bitwise_definition(data: bytes, cut: int, start: int) -> None:
    """Every kernel, at every alignment, in one call or continued from a prefix, equals the definition."""
    view = memoryview(data)[min(start, len(data)) :]
    want = crc32c_reference(bytes(view))
    for kind in KINDS:
        assert crc32c_kernel(view, kind=kind) == want
        k = min(cut, len(view))
        assert crc32c_kernel(view[k:], crc32c_kernel(view[:k], kind=kind), kind=kind) == want


@pytest.mark.parametrize("size", [3 * 65536 - 1, 3 * 65536, 3 * 65536 + 23, 5 << 20])
def test_crc32c_three_stream_path_equals_an_outside_implementation(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    want = outside_crc32c(data.tobytes())
    for kind in KINDS:
        assert crc32c_kernel(data, kind=kind) == want
        assert crc32c_kernel(data[7:], crc32c_kernel(data[:7], kind=kind), kind=kind) == want


@settings(max_examples=300, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300), seed=st.integers(0, 2**32 - 1))
def test_crc32c_combine_equals_the_crc_of_the_concatenation(a: bytes, b: bytes, seed: int) -> None:
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c_reference(a + b)
    assert crc32c_combine(seed, 0, 0) == seed


@settings(max_examples=100, deadline=None)
@given(c1=st.integers(0, 2**32 - 1), c2=st.integers(0, 2**32 - 1), c3=st.integers(0, 2**32 - 1),
       n2=st.integers(1, 2**45), n3=st.integers(1, 2**45))  # fmt: skip
def test_crc32c_combine_is_associative_at_terabyte_lengths(c1: int, c2: int, c3: int, n2: int, n3: int) -> None:
    """Combining (A+B)+C and A+(B+C) agree for unit lengths far past anything that can be hashed here."""
    assert crc32c_combine(crc32c_combine(c1, c2, n2), c3, n3) == crc32c_combine(c1, crc32c_combine(c2, c3, n3), n2 + n3)


def test_crc32c_combine_of_long_zero_runs() -> None:
    zeros = bytes(3 << 20)
    assert crc32c_combine(crc32c(b"abc"), crc32c(zeros), len(zeros)) == outside_crc32c(b"abc" + zeros)


def test_crc32c_combine_past_512_mib() -> None:
    """zlib's x2n table wraps at 2³² bits, valid for its polynomial only: from 2²⁹ bytes on, a wrapped
    table gives Castagnoli wrong combines (found by the associativity property). np.zeros maps the
    zero page, so this costs no memory."""
    zeros = np.zeros((1 << 29) + 77, dtype=np.uint8)
    prefix = crc32c(b"k2conv")
    assert crc32c_combine(prefix, crc32c(zeros), zeros.size) == crc32c_kernel(zeros, prefix)


# ---- quantized files -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(synth_ckpt, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The tiny k2.5 model as one q8_0 file and as a split set (k2conv quantize, 2 workers)."""
    d = tmp_path_factory.mktemp("integrity")
    src = synth_ckpt("k2.5")
    for name, extra in (("one.gguf", []), ("split.gguf", ["--split-max-size", "3M"])):
        result = CliRunner().invoke(main, ["quantize", str(src), str(d / name), "--recipe", "q8_0", "--quiet",
                                           "--no-mmproj", "--workers", "2", *extra])  # fmt: skip
        assert result.exit_code == 0, result.output
    return {"one": [d / "one.gguf"], "split": sorted(d.glob("split-*.gguf"))}


def test_stored_checksums_are_crc32c_of_what_gguf_reader_sees(written: dict[str, list[Path]]) -> None:
    """Outside code: each stored value is PyPI crc32c of the tensor's bytes as gguf-py maps them."""
    for path in written["one"] + written["split"]:
        reader = GGUFReader(path)
        assert str(reader.fields[KEY_ALGORITHM].contents()) == "crc32c"
        assert reader.fields[KEY_HEADER].types[0].name == "UINT32"
        stored = stored_checksums(path)
        assert len(stored) == len(reader.tensors) == len(reader.fields[KEY_TENSORS].contents())
        for t in reader.tensors:
            assert stored[t.name] == outside_crc32c(np.asarray(t.data).tobytes()), (path.name, t.name)


def test_written_files_verify_clean(written: dict[str, list[Path]]) -> None:
    report = verify_integrity(written["one"] + written["split"][1:2])  # one shard names its whole set
    assert report.exit_code == 0, report.render()
    assert [f.path for f in report.files] == written["one"] + written["split"]
    assert report.nbytes == sum(p.stat().st_size for p in written["one"] + written["split"])
    assert "GB/s" in report.render() and "all intact" in report.render()


def test_every_flipped_bit_in_tensor_data_is_named(written: dict[str, list[Path]], tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    shutil.copy(written["one"][0], path)
    layout = scan_file(path)
    tensors = layout.tensors
    layout.buf.close()  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    picks = [(t, 0) for t in tensors[:3]] + [(t, t.nbytes - 1) for t in tensors[-3:]]  # tensor edges
    picks += [(t, int(rng.integers(t.nbytes))) for t in rng.choice(tensors, 34)]  # type: ignore[arg-type]
    with open(path, "r+b") as f:
        for t, at in picks:
            bit = 1 << int(rng.integers(8))
            f.seek(t.offset + at)
            old = f.read(1)[0]
            f.seek(t.offset + at)
            f.write(bytes([old ^ bit]))
            f.flush()
            # small chunks and 2 threads: tensors straddle chunk boundaries
            report = verify_integrity([path], threads=2, chunk_bytes=1 << 16)
            assert report.exit_code == 1, (t.name, at)
            (check,) = report.files
            assert check.problems and all(p.startswith(f"tensor {t.name}: CRC-32C") for p in check.problems), check.problems
            assert f"DAMAGED: tensor {t.name}: CRC-32C" in report.render()
            f.seek(t.offset + at)
            f.write(bytes([old]))
            f.flush()
    assert verify_integrity([path]).exit_code == 0


@pytest.mark.parametrize("where", ["metadata", "tensor table", "padding", "truncated", "appended", "checksum slot"])
def test_damage_outside_tensor_data_is_found(written: dict[str, list[Path]], tmp_path: Path, where: str) -> None:
    path = tmp_path / "m.gguf"
    shutil.copy(written["one"][0], path)
    data = bytearray(path.read_bytes())
    layout = scan_file(path)
    t0, last = layout.tensors[0], layout.tensors[-1]
    layout.buf.close()  # type: ignore[attr-defined]
    if where == "metadata":
        data[data.index(b"deepseek2.") + 3] ^= 0x01  # a key renamed: still a valid GGUF
        expected = "header (metadata, vocabulary, tensor table)"
    elif where == "tensor table":
        data[data.index(t0.name.encode()) + 2] ^= 0x01  # a renamed tensor: still a valid GGUF
        expected = "header (metadata, vocabulary, tensor table)"
    elif where == "padding":  # the tiny model's tensors are all multiples of 32 bytes: use a seed file
        (seed,) = write_seed(tmp_path / "seed")
        seed_layout = scan_file(seed)
        gap = next(t for t in seed_layout.tensors if t.nbytes % 32)
        seed_layout.buf.close()  # type: ignore[attr-defined]
        data = bytearray(seed.read_bytes())
        data[gap.offset + gap.nbytes] = 1
        expected = f"nonzero padding at bytes {gap.offset + gap.nbytes}.."
    elif where == "truncated":
        del data[last.offset + 5 :]
        expected = "truncated GGUF"
    elif where == "appended":
        data += b"\0" * 100
        expected = "100 unexpected bytes after the last tensor"
    else:
        slot = data.index(KEY_TENSORS.encode()) + len(KEY_TENSORS) + 16
        data[slot + 3] ^= 0x80  # the first tensor's stored CRC
        expected = f"tensor {t0.name}: CRC-32C"
    path.write_bytes(bytes(data))
    report = verify_integrity([path])
    assert report.exit_code == 1 and expected in report.render(), report.render()


def test_files_without_checksums_and_missing_shards_are_not_verified(written: dict[str, list[Path]], tmp_path: Path) -> None:
    plain = tmp_path / "plain.gguf"
    w = GGUFWriter(plain, "llama")
    w.add_tensor("a", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    report = verify_integrity([plain])
    assert report.exit_code == 2
    assert "no k2conv checksums in this file" in report.render() and "NOT VERIFIED" in report.render()

    split = tmp_path / "s"
    split.mkdir()
    for p in written["split"][:-1]:
        shutil.copy(p, split / p.name)
    report = verify_integrity([split / written["split"][0].name])
    assert report.exit_code == 2 and "no such file (a missing shard" in report.render()
    assert sum(f.status == "ok" for f in report.files) == len(written["split"]) - 1


def test_verify_integrity_command(written: dict[str, list[Path]], tmp_path: Path) -> None:
    """`k2conv verify --integrity FILE...`: exit 0 intact (with GB/s), 1 with the damaged tensor named, 2 unverifiable."""
    run = CliRunner().invoke
    ok = run(main, ["verify", "--integrity", str(written["one"][0]), str(written["split"][0]), "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert "all intact" in ok.output and "GB/s" in ok.output
    assert ok.output.count(": OK (") == 1 + len(written["split"])
    import json

    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["exit_code"] == 0 and len(doc["files"]) == 1 + len(written["split"])

    damaged = tmp_path / "d.gguf"
    shutil.copy(written["one"][0], damaged)
    layout = scan_file(damaged)
    victim = layout.tensors[len(layout.tensors) // 2]
    layout.buf.close()  # type: ignore[attr-defined]
    with open(damaged, "r+b") as f:
        f.seek(victim.offset + victim.nbytes // 2)
        b = f.read(1)[0]
        f.seek(victim.offset + victim.nbytes // 2)
        f.write(bytes([b ^ 0x10]))
    bad = run(main, ["verify", "--integrity", str(damaged)])
    assert bad.exit_code == 1 and f"DAMAGED: tensor {victim.name}: CRC-32C" in bad.output, bad.output

    missing = run(main, ["verify", "--integrity", str(tmp_path / "nope.gguf")])
    assert missing.exit_code == 2 and "NOT VERIFIED" in missing.output

    two = run(main, ["verify", str(written["one"][0]), str(damaged)])
    assert two.exit_code == 2 and "several files only with --integrity" in two.output


def test_llama_cpp_loads_a_checksummed_file(written: dict[str, list[Path]]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(written["one"][0]), vocab_only=False, n_ctx=64, n_threads=2, verbose=False)
    try:
        assert llm.metadata[KEY_ALGORITHM] == "crc32c"
        assert len(llm.tokenize(b"hello")) > 0
        llm.eval(llm.tokenize(b"hi"))  # the weights are usable, not just the header
    finally:
        llm.close()


# ---- the writer: checksums stay consistent across resumes and full disks ------------------------------
def convert(src: Path, out: Path, **kw: object) -> list[Path]:
    """`k2conv quantize SRC OUT --recipe q8_0` in-process (1 worker, so tests can inject faults)."""
    cfg, ckpt = open_source(src)
    plan = make_plan(cfg, src, out, "q8_0")
    writer.check_outputs(plan, force=False)
    write_plan(ckpt, plan, workers=1, progress=False, inputs=[p for p in src.iterdir() if p.is_file()], **kw)  # type: ignore[arg-type]
    return [f.path for f in plan.files]


@pytest.fixture(scope="module")
def reference(synth_ckpt, written: dict[str, list[Path]]) -> tuple[Path, dict[str, str]]:
    return synth_ckpt("k2.5"), sha(written["one"])


def journal_is_consistent(out: Path) -> int:
    """Every unit the journal records has its CRC in the temporary file; returns how many."""
    src_plan = make_plan(*_cfg_src(out), out, "q8_0")
    units = units_of(src_plan)
    journal = load_journal(journal_path(out))
    assert journal is not None and not journal.done
    where = src_plan.locate()
    data = temp_path(out).read_bytes()
    for index, crc in journal.finished.items():
        unit = units[index]
        t = src_plan.tensors[unit.tensor]
        at = where[t.name][1] + unit_offset(src_plan, unit)
        assert crc32c(data[at : at + unit_bytes(src_plan, unit)]) == crc, f"unit {index} of {t.name}"
    return len(journal.finished)


_SRC: dict[Path, Path] = {}


def _cfg_src(out: Path) -> tuple[object, Path]:
    src = _SRC[out.parent]
    return open_source(src)[0], src


def test_crash_after_checksums_before_done_resumes_to_same_bytes(reference, tmp_path: Path, monkeypatch) -> None:
    src, ref = reference
    out = tmp_path / "one.gguf"

    def crash(self: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(journal_mod.Journal, "mark_done", crash)
    with pytest.raises(Interrupted):
        convert(src, out)
    monkeypatch.undo()
    assert not out.exists() and stored_checksums(temp_path(out))  # patched, not yet renamed
    with open(journal_path(out), "ab") as j:
        j.write(b'{"u": 3, "cr')  # and a torn last line on top
    convert(src, out)
    assert sha([out]) == ref and not journal_path(out).exists()


def test_injected_enospc_from_pwrite_keeps_the_journal_and_resumes(reference, tmp_path: Path, monkeypatch) -> None:
    """The code path of a full disk, on any machine: os.pwrite fails with ENOSPC after some units."""
    src, ref = reference
    out = tmp_path / "one.gguf"
    _SRC[tmp_path] = src
    real, calls = os.pwrite, [0]

    def pwrite(fd: int, data: object, offset: int) -> int:
        calls[0] += 1
        if calls[0] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    with pytest.raises(DiskFull) as exc:
        convert(src, out)
    monkeypatch.undo()
    msg = str(exc.value)
    assert msg.startswith(f"{out}: no space left on device") and "\n" not in msg
    assert "rerun the same command to resume" in msg and "more bytes" in msg
    assert journal_is_consistent(out) == 20
    convert(src, out)
    assert sha([out]) == ref and not journal_path(out).exists() and not temp_path(out).exists()


def test_injected_enospc_in_the_journal_drops_the_torn_line_and_resumes(reference, tmp_path: Path, monkeypatch) -> None:
    src, ref = reference
    out = tmp_path / "one.gguf"
    _SRC[tmp_path] = src
    real, calls = os.write, [0]

    def write(fd: int, data: bytes) -> int:
        calls[0] += 1
        if calls[0] == 30:  # half a line reaches the disk, then the disk is full
            real(fd, bytes(data)[:5])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(journal_mod.os, "write", write)
    with pytest.raises(DiskFull, match="no space left on device for the journal"):
        convert(src, out)
    monkeypatch.undo()
    assert journal_path(out).read_bytes().endswith(b'{"u":')
    assert journal_is_consistent(out) == 29
    convert(src, out)
    assert sha([out]) == ref


def _mount_tmpfs(size: int) -> Path | None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    mnt = Path(tempfile.mkdtemp(prefix="k2conv-enospc-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        mnt.rmdir()
        return None
    return mnt


def _fill(folder: Path) -> Path:
    """Write a ballast file until the filesystem refuses another byte."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\1" * block)
    return ballast


def test_full_disk_mid_run_on_a_real_small_filesystem(reference, written: dict[str, list[Path]]) -> None:
    """k2conv on a tmpfs just big enough for the output; the test fills it mid-run. The run stops
    with one clear line naming the output, the journal matches the temporary file, and once the
    ballast is deleted the same command finishes with the reference bytes."""
    src, ref = reference
    size = written["one"][0].stat().st_size
    mnt = _mount_tmpfs(size + (4 << 20))
    if mnt is None:
        pytest.skip("cannot mount a tmpfs here (needs root and mount); the ENOSPC path is covered by the injected tests")
    try:
        out = mnt / "one.gguf"
        _SRC[mnt] = src
        cmd = [*K2CONV, "quantize", str(src), str(out), "--recipe", "q8_0", "--quiet", "--no-mmproj", "--workers", "1"]
        env = {**os.environ, "K2CONV_TEST_UNIT_DELAY": "0.03"}
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        journal = journal_path(out)
        deadline = time.time() + 60
        while not (journal.exists() and journal.read_bytes().count(b"\n") >= 10) and time.time() < deadline:
            time.sleep(0.01)
        ballast = _fill(mnt)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert code == 2, err
        assert err.startswith(f"error: {out}") and err.count("\n") == 1, err
        assert "no space left on device" in err and "rerun the same command to resume" in err, err
        assert not out.exists()
        saved = journal_is_consistent(out)
        assert saved >= 9
        rerun = subprocess.run(cmd, capture_output=True, text=True)
        assert rerun.returncode == 2 and "not enough disk space" in rerun.stderr  # still full: refused up front
        ballast.unlink()
        rerun = subprocess.run(cmd, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        assert sha([out]) == ref
        assert sorted(p.name for p in mnt.iterdir()) == ["one.gguf"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()
