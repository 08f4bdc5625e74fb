"""`k2conv relayout`: expert-major records, exact restore, native reading by the runner, resume after a kill,
per-tensor CRC-32C checksums, zstd-compressed records.

The restore must give back the input byte for byte (sha256) whoever wrote it: our single and split
files at two recipes, and a deepseek2 GGUF written by llama.cpp's own `llama_model_quantize`. Checksums
are compared with PyPI's `crc32c` (not ours) and with the input's own stored values for unchanged tensors.
"""

from __future__ import annotations

import ctypes as C
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import crc32c as pypi_crc32c
import numpy as np
import pytest
import torch
import zstandard
from gguf import GGUFReader

from k2conv.convert.integrity import stored_checksums, verify_integrity
from k2conv.errors import K2ConvError
from k2conv.infer.model import KimiModel
from k2conv.infer.weights import GGUFSource, RelayoutSource, open_weights
from k2conv.layouts.relayout import (
    KEY_VERSION,
    is_relayout,
    open_layout,
    parse_compression,
    record_name,
    relayout,
    restore,
)

K2CONV = [sys.executable, "-m", "k2conv.cli"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ggufs(synth_ckpt, tmp_path_factory: pytest.TempPathFactory):
    """Factory: (recipe, *extra) → the files (a split set in order) of one `k2conv quantize` run."""
    made: dict[tuple[str, ...], list[Path]] = {}

    def make(recipe: str, *extra: str) -> list[Path]:
        key = (recipe, *extra)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"rl-{recipe}")
            cmd = [*K2CONV, "quantize", str(synth_ckpt("k2.5")), str(folder / "m.gguf"), "--quiet", "--no-mmproj",
                   "--recipe", recipe, *extra]
            subprocess.run(cmd, check=True, capture_output=True)
            made[key] = sorted(folder.glob("m*.gguf"))
        return made[key]

    return make


@pytest.fixture(scope="module")
def foreign(ggufs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deepseek2 GGUF written by llama.cpp (its own writer, alignment and KV order), Q4_K_M."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("foreign") / "llama-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    rc = llama_cpp.llama_model_quantize(str(ggufs("f32")[0]).encode(), str(out).encode(), C.byref(params))
    assert rc == 0
    return out


CASES = [("q4_0-native",), ("Q4_K_M",), ("q4_0-native", "--split-max-size", "3M"), ("Q4_K_M", "--split-max-size", "3M")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_restore_is_byte_identical(ggufs, tmp_path: Path, case: tuple[str, ...]) -> None:
    inputs = ggufs(*case)
    assert (len(inputs) > 1) == ("--split-max-size" in case)
    rep = relayout(inputs, tmp_path / "r.gguf", 4096)
    assert rep.records == 2 * 8 and (tmp_path / "r.gguf").stat().st_size == rep.size
    back = restore(tmp_path / "r.gguf", tmp_path / "back" / "m.gguf") if (tmp_path / "back").mkdir() is None else []
    assert len(back) == len(inputs)
    assert [sha(p) for p in back] == [sha(p) for p in inputs]
    assert not list(tmp_path.rglob("*.part*"))


def test_foreign_writer_restores_and_reads(foreign: Path, tmp_path: Path) -> None:
    rep = relayout([foreign], tmp_path / "r.gguf", 4096)
    assert rep.records == 16
    (back,) = restore(tmp_path / "r.gguf", tmp_path / "back.gguf")
    assert sha(back) == sha(foreign)
    ids = torch.tensor([5, 17, 99, 3])
    torch.set_num_threads(1)
    want = KimiModel(GGUFSource(foreign))(ids).numpy()
    got = KimiModel(open_weights(tmp_path / "r.gguf"))(ids).numpy()
    assert np.array_equal(want, got)


def test_records_are_aligned_contiguous_and_located(ggufs, tmp_path: Path) -> None:
    (src,) = ggufs("Q4_K_M")
    out = tmp_path / "r.gguf"
    relayout([src], out, 4096)
    assert is_relayout(out) and not is_relayout(src)
    reader = GGUFReader(out)  # gguf's own reader opens the container
    _, lay = open_layout(out)
    assert reader.alignment == 4096 and reader.fields[KEY_VERSION].contents() == 1
    orig = {t.name: t for t in GGUFReader(src).tensors}
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        assert t.data_offset % 4096 == 0, t.name
    assert lay.layers == [1, 2] and lay.n_expert == 8
    for layer in lay.layers:
        for e in range(lay.n_expert):
            off, size = lay.record(layer, e)  # O(1): one array lookup
            t = tensors[record_name(layer, e)]
            assert off == t.data_offset and size == t.n_bytes and off % 4096 == 0
            rec = np.asarray(t.data).view(np.uint8)
            parts = lay.parts(layer)
            assert [p["proj"] for p in parts] == ["gate", "up", "down"]
            assert sum(p["nbytes"] for p in parts) == size  # contiguous: nothing between the three parts
            for p in parts:
                o = orig[p["name"]]
                assert int(o.tensor_type) == p["type"]
                want = np.asarray(o.data).view(np.uint8).reshape(lay.n_expert, -1)[e]
                assert np.array_equal(rec[p["offset"] : p["offset"] + p["nbytes"]], want)
    for name, t in orig.items():  # non-expert tensors unchanged
        if "_exps" not in name:
            assert tensors[name].tensor_type == t.tensor_type
            assert np.array_equal(np.asarray(tensors[name].data), np.asarray(t.data))
    dump = subprocess.run([str(Path(sys.executable).parent / "gguf-dump"), str(out)], capture_output=True, text=True)
    assert dump.returncode == 0 and "blk.2.exp.7" in dump.stdout


def test_hot_first_follows_stats(ggufs, tmp_path: Path) -> None:
    (src,) = ggufs("q4_0-native")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"version": 1, "layers": {"2": {"5": 40, "1": 7}, "1": [0, 0, 0, 30, 0, 0, 0, 7]}}))
    out = tmp_path / "hot.gguf"
    relayout([src], out, 4096, order="hot-first", stats=stats)
    reader = GGUFReader(out)
    _, lay = open_layout(out)
    records = sorted((t.data_offset, t.name) for t in reader.tensors if ".exp." in t.name)
    names = [n for _, n in records]
    assert names[:4] == ["blk.2.exp.5", "blk.1.exp.3", "blk.1.exp.7", "blk.2.exp.1"]  # ties: by layer, expert
    assert names[4:] == sorted(names[4:], key=lambda n: (int(n.split(".")[1]), int(n.split(".")[3])))
    assert lay.record(2, 5)[0] == records[0][0]
    (back,) = restore(out, tmp_path / "back.gguf")
    assert sha(back) == sha(src)


def test_runner_logits_equal_and_one_read_per_expert(ggufs, tmp_path: Path) -> None:
    inputs = ggufs("Q4_K_M", "--split-max-size", "3M")
    out = tmp_path / "r.gguf"
    relayout(inputs, out, 4096)
    torch.set_num_threads(1)
    ids = torch.tensor([1, 2, 3, 40, 50, 7])
    want = KimiModel(open_weights(inputs[0]))(ids).numpy()
    src = open_weights(out)
    assert isinstance(src, RelayoutSource)
    got = KimiModel(src)(ids).numpy()
    assert np.array_equal(want, got)
    # every routed expert used cost one record read, not three
    assert src.stats.expert_reads == 3 * src.record_reads > 0


def test_dry_run_writes_nothing(ggufs, tmp_path: Path) -> None:
    (src,) = ggufs("q4_0-native")
    rep = relayout([src], tmp_path / "r.gguf", 2 << 20, dry_run=True)
    assert rep.dry_run and not list(tmp_path.iterdir())
    real = relayout([src], tmp_path / "r.gguf", 2 << 20)
    assert real.size == rep.size == (tmp_path / "r.gguf").stat().st_size


def relayout_killed_after(inputs: list[Path], out: Path, unit: int, compress: str | None = None) -> int:
    """Run relayout in a child that SIGKILLs itself right after unit `unit` is journaled; its return code."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import k2conv.layouts.relayout as rl
        def die(i):
            if i == {unit}:
                os.kill(os.getpid(), signal.SIGKILL)
        rl._after_unit = die
        rl.relayout([Path(p) for p in {[str(p) for p in inputs]!r}], Path({str(out)!r}), 4096, compress={compress!r})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode


def test_killed_relayout_resumes_to_the_identical_file(ggufs, tmp_path: Path) -> None:
    inputs = ggufs("Q4_K_M", "--split-max-size", "3M")
    clean = tmp_path / "clean.gguf"
    relayout(inputs, clean, 4096)
    out = tmp_path / "k.gguf"
    assert relayout_killed_after(inputs, out, 30) == -9
    assert not out.exists() and out.with_name("k.gguf.part").exists()
    rep = relayout(inputs, out, 4096)
    assert rep.resumed_units == 31 and rep.written_units > 0
    assert sha(out) == sha(clean)
    assert verify_integrity([out]).ok  # checksums of kept units come from the journal: still right
    assert not out.with_name("k.gguf.part").exists() and not out.with_name("k.gguf.part.journal").exists()


def test_killed_compressed_relayout_resumes_to_the_identical_file(ggufs, tmp_path: Path) -> None:
    """Resume of a compressed run (record offsets only known as records are written), including a journal
    whose stored size of unit 20 is wrong: that unit is redone and, its place having moved, every later one."""
    inputs = ggufs("q4_0-native")
    compress = "zstd:3"
    clean = tmp_path / "clean.gguf"
    relayout(inputs, clean, 4096, compress=compress)
    out = tmp_path / "k.gguf"
    assert relayout_killed_after(inputs, out, 40, compress) == -9
    journal = out.with_name("k.gguf.part.journal")
    lines = journal.read_text().splitlines()
    entries = [json.loads(line) for line in lines[1:]]
    assert [e["u"] for e in entries] == list(range(41)) and all("n" in e for e in entries)
    # corrupt unit 20's recorded size: its CRC no longer matches, so it is redone and, since its rewritten size
    # differs from the journaled one, every later unit too (their places would have moved)
    lines[21] = json.dumps({**entries[20], "n": entries[20]["n"] + 1})
    journal.write_text("\n".join(lines) + "\n")
    rep = relayout(inputs, out, 4096, compress=compress)
    assert rep.resumed_units == 20
    assert sha(out) == sha(clean)
    assert verify_integrity([out]).ok


@pytest.fixture(scope="module")
def q8(ggufs) -> Path:
    (src,) = ggufs("q8_0")
    return src


def _flip(src: Path, dst: Path, at: int) -> None:
    data = bytearray(src.read_bytes())
    data[at] ^= 0x10
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("compress", [None, "zstd:1"])
def test_checksums_verify_and_a_flipped_bit_is_named(q8: Path, tmp_path: Path, compress: str | None) -> None:
    out = tmp_path / "r.gguf"
    relayout([q8], out, 4096, compress=compress)
    assert verify_integrity([out]).ok
    mine, theirs = stored_checksums(out), stored_checksums(q8)
    assert theirs and mine  # the input had k2conv checksums, and they were replaced, not copied
    reader = GGUFReader(out)
    assert sum(1 for k in reader.fields if k.startswith("k2conv.checksum.")) == 3
    tensors = {t.name: t for t in reader.tensors}
    for name, crc in theirs.items():  # unchanged tensors keep the input's own checksum
        if "_exps" not in name:
            assert mine[name] == crc, name
    for name in ("blk.1.exp.0", "blk.2.exp.7", "k2conv.orig.0.header"):  # independent CRC-32C (PyPI crc32c)
        assert mine[name] == pypi_crc32c.crc32c(np.asarray(tensors[name].data).tobytes()), name
    record = tensors["blk.2.exp.3"]
    if compress:
        assert int(record.n_bytes) < reader.fields["k2conv.layout.record_bytes"].contents()[1]
    targets = {
        "blk.2.exp.3": int(record.data_offset) + int(record.n_bytes) // 2,
        "output_norm.weight": int(tensors["output_norm.weight"].data_offset) + 3,
        "k2conv.orig.0.header": int(tensors["k2conv.orig.0.header"].data_offset) + 100,
        "header": 40,  # inside the KV section
    }
    for name, at in targets.items():
        bad = tmp_path / f"bad-{name}.gguf"
        _flip(out, bad, at)
        rep = verify_integrity([bad])
        assert rep.exit_code == 1, name
        (check,) = rep.files
        assert len(check.problems) == 1 and (f"tensor {name}:" if name != "header" else "header (") in check.problems[0]


def test_compressed_restores_byte_identical_and_runs_identically(ggufs, tmp_path: Path) -> None:
    inputs = ggufs("Q4_K_M", "--split-max-size", "3M")
    plain, packed = tmp_path / "plain.gguf", tmp_path / "zstd.gguf"
    relayout(inputs, plain, 4096)
    rep = relayout(inputs, packed, 4096, compress="zstd:19")
    assert rep.record_stored < rep.record_raw and packed.stat().st_size == rep.size < plain.stat().st_size
    reader = GGUFReader(packed)
    _, lay = open_layout(packed)
    assert reader.fields[KEY_VERSION].contents() == 2 and lay.compression == "zstd"
    tensors = {t.name: t for t in reader.tensors}
    plain_reader = GGUFReader(plain)
    plain_tensors = {t.name: t for t in plain_reader.tensors}
    for layer in lay.layers:  # records aligned; each one zstd frame of exactly the uncompressed record
        for e in range(lay.n_expert):
            off, size = lay.record(layer, e)
            t = tensors[record_name(layer, e)]
            assert off == t.data_offset and size == t.n_bytes and off % 4096 == 0
            frame = np.asarray(t.data).tobytes()
            want = np.asarray(plain_tensors[record_name(layer, e)].data).tobytes()
            assert zstandard.ZstdDecompressor().decompress(frame) == want
    back = tmp_path / "back" / "m.gguf"
    back.parent.mkdir()
    assert [sha(p) for p in restore(packed, back)] == [sha(p) for p in inputs]
    torch.set_num_threads(1)
    ids = torch.tensor([1, 2, 3, 40, 50, 7])
    want = KimiModel(open_weights(plain))(ids).numpy()
    src = open_weights(packed)
    got = KimiModel(src)(ids).numpy()
    assert np.array_equal(want, got)
    assert src.stats.expert_reads == 3 * src.record_reads > 0  # still one read per expert
    # a damaged frame is an error naming the record, never silently wrong weights
    damaged = tmp_path / "damaged.gguf"
    t = tensors[record_name(1, 2)]
    _flip(packed, damaged, int(t.data_offset) + int(t.n_bytes) // 2)
    with pytest.raises(K2ConvError, match=r"blk\.1\.exp\.2"):
        RelayoutSource(damaged).record(1, 2)


def test_compressed_dry_run_is_an_honest_estimate(q8: Path, tmp_path: Path) -> None:
    rep = relayout([q8], tmp_path / "r.gguf", 4096, dry_run=True, compress="zstd")
    assert not list(tmp_path.iterdir())
    text = "\n".join(rep.lines())
    assert "ESTIMATE" in text and f"{rep.sampled} of 16 records" in text and rep.sampled == 4
    real = relayout([q8], tmp_path / "r.gguf", 4096, compress="zstd")
    assert abs(rep.size - real.size) < 0.2 * real.size  # a sample of 4 records: close, not exact


@pytest.mark.parametrize("spec", ["zstd:0", "zstd:23", "zstd:fast", "lz4", "zstd:-1"])
def test_bad_compression_is_a_clean_error(spec: str) -> None:
    with pytest.raises(K2ConvError, match="--compress"):
        parse_compression(spec)
    assert parse_compression("zstd") is not None and str(parse_compression("ZSTD:19")) == "zstd:19"
    assert parse_compression(None) is None


@pytest.mark.parametrize("chunk", [24 << 10, 64 << 10])
def test_small_batch_buffers_give_the_same_file_and_resume_mid_batch(ggufs, tmp_path: Path, monkeypatch, chunk: int) -> None:
    """Buffers smaller than a unit (units stream through in pieces) or holding a few units per write:
    same bytes as the default, and a run stopped after any journaled unit resumes to them."""
    import k2conv.layouts.relayout as rl

    inputs = ggufs("Q4_K_M")
    clean = tmp_path / "clean.gguf"
    relayout(inputs, clean, 4096)
    monkeypatch.setattr(rl, "CHUNK", chunk)
    small = tmp_path / "small.gguf"
    relayout(inputs, small, 4096)
    assert sha(small) == sha(clean)

    class Stop(Exception):
        pass

    def stop_after(i: int) -> None:
        if i == 7:
            raise Stop

    out = tmp_path / "stopped.gguf"
    monkeypatch.setattr(rl, "_after_unit", stop_after)
    with pytest.raises(Stop):
        relayout(inputs, out, 4096)
    monkeypatch.setattr(rl, "_after_unit", None)
    rep = relayout(inputs, out, 4096)
    assert rep.resumed_units >= 8 and sha(out) == sha(clean)
    assert verify_integrity([out]).ok


def test_units_copied_before_the_crc_kernel_loads_are_checksummed_later_and_resume(ggufs, tmp_path: Path,
                                                                                    monkeypatch) -> None:  # fmt: skip
    """A fresh process copies while numba loads (rl._KernelLoad): those units are journaled only once the
    deferred checksum thread has their CRC. Slowed load: every unit takes that path; same file, checksums
    verify, and a run stopped while the deferred units are being journaled resumes to the same bytes."""
    import time

    import k2conv.layouts.relayout as rl

    inputs = ggufs("Q4_K_M")
    clean = tmp_path / "clean.gguf"
    relayout(inputs, clean, 4096)
    load, checksum = rl._KernelLoad._load, rl._Batcher._checksum
    deferred: list[int] = []

    def slow_load(self) -> None:  # the copy of this small file finishes before the "kernel" is there
        time.sleep(1.0)
        load(self)

    def counted(self, u):
        deferred.append(u.nbytes)
        return checksum(self, u)

    monkeypatch.setattr(rl._KernelLoad, "_load", slow_load)
    monkeypatch.setattr(rl._Batcher, "_checksum", counted)
    monkeypatch.setattr(rl._KernelLoad, "loaded", False)
    late = tmp_path / "late.gguf"
    relayout(inputs, late, 4096)
    assert len(deferred) > 10 and sha(late) == sha(clean) and verify_integrity([late]).ok

    class Stop(Exception):
        pass

    def stop_at(i: int) -> None:
        if i == 5:
            raise Stop

    deferred.clear()
    monkeypatch.setattr(rl._KernelLoad, "loaded", False)
    monkeypatch.setattr(rl, "_after_unit", stop_at)
    out = tmp_path / "stopped.gguf"
    with pytest.raises(Stop):
        relayout(inputs, out, 4096)
    assert deferred and not out.exists()
    monkeypatch.setattr(rl, "_after_unit", None)
    rep = relayout(inputs, out, 4096)
    assert rep.resumed_units >= 1 and sha(out) == sha(clean) and verify_integrity([out]).ok
