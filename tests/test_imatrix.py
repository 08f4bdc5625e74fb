"""imatrix files: round trips, llama.cpp's own loader and quantizer as oracles, hostile input.

The oracles are llama.cpp code, not ours:

* gguf-py's GGUFReader reads our GGUF imatrix with the keys, tensor names, types and shapes that
  common/imatrix-loader.cpp and tools/quantize/quantize.cpp require;
* **llama-quantize itself**, compiled here in a few seconds from the vendored tools/quantize/quantize.cpp
  and common/imatrix-loader.cpp against llama-cpp-python's prebuilt libllama (only four trivial
  `common` symbols are stubbed: logging, build info, --override-kv parsing). Its static
  load_imatrix() dumps the vectors it computed from our files (compared bit for bit with
  quantizer_weights), and the real binary quantizes an F32 GGUF with our imatrix file; every tensor
  must equal, byte for byte, what k2conv's quantize() makes slice by slice with quantizer_weights;
* llama-cpp-python's llama_model_quantize with ``params.imatrix`` (no compiler needed): the same
  byte identity for the in-process API, fed quantizer_weights' vectors.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2conv.cli import main
from k2conv.errors import K2ConvError
from k2conv.quant.imatrix import (
    Imatrix,
    ImatrixEntry,
    check_against_plan,
    quantizer_weights,
    read_imatrix,
    write_imatrix_dat,
    write_imatrix_gguf,
)
from k2conv.quant.quantize import quantize

sys.path.insert(0, str(Path(__file__).parent))
from mutations import mutate, mutations

T = GGMLQuantizationType
ROOT = Path(__file__).resolve().parent.parent

# numpy shapes of the tiny k2.5 synthetic model (checked against the real F32 GGUF in a test below)
TINY_SHAPES = {
    "blk.0.attn_k_b.weight": (4, 256, 128),
    "blk.1.attn_k_b.weight": (4, 256, 128),
    "blk.0.attn_v_b.weight": (4, 128, 256),
    "blk.1.ffn_down_exps.weight": (8, 512, 256),
    "blk.1.ffn_up_exps.weight": (8, 256, 512),
    "blk.2.ffn_gate_exps.weight": (8, 256, 512),
    "blk.1.ffn_down_shexp.weight": (512, 256),
    "blk.0.ffn_down.weight": (512, 1024),
    "blk.0.attn_q_b.weight": (768, 256),
    "blk.1.attn_kv_a_mqa.weight": (320, 512),
    "blk.2.attn_output.weight": (512, 512),
    "output.weight": (2048, 512),
}


def sample_imatrix(seed: int = 0, chunk_size: int = 512) -> Imatrix:
    """Random positive Σx² for the tiny model, with every layout llama-imatrix writes.

    Merged experts: one matrix per expert, some with count 0, and one entry whose experts all have
    count 0 (GGUF keeps it, .dat drops it). attn_k_b both as current llama-imatrix writes a 3-D dense
    weight (one matrix of ne0·n_head, one count) and as older files did (per-head counts, one 0).
    token_embd with a wrong size (llama-quantize ignores it) and an entry for a tensor that does not
    exist. Counts above chunk_size so the legacy ncall scaling is exercised.
    """
    rng = np.random.default_rng(seed)

    def sums(n_mat: int, per: int) -> np.ndarray:
        return rng.lognormal(0.0, 2.0, (n_mat, per)).astype(np.float32) * np.float32(100)

    def counts(n: int) -> np.ndarray:
        return rng.integers(1, 6000, n).astype(np.int64)

    e: dict[str, ImatrixEntry] = {}
    c = counts(8)
    c[[2, 5]] = 0
    e["blk.1.ffn_down_exps.weight"] = ImatrixEntry(sums(8, 256), c, rng.standard_normal((8, 256)).astype(np.float32))
    e["blk.1.ffn_up_exps.weight"] = ImatrixEntry(sums(8, 512), counts(8))
    e["blk.2.ffn_gate_exps.weight"] = ImatrixEntry(np.zeros((8, 512), np.float32), np.zeros(8, np.int64))
    e["blk.0.attn_k_b.weight"] = ImatrixEntry(sums(1, 4 * 128), counts(1))
    c = counts(4)
    c[1] = 0
    e["blk.1.attn_k_b.weight"] = ImatrixEntry(sums(4, 128), c)
    e["blk.0.attn_v_b.weight"] = ImatrixEntry(sums(1, 4 * 256), counts(1), rng.standard_normal((1, 1024)).astype(np.float32))
    for name in ("blk.1.ffn_down_shexp.weight", "blk.0.ffn_down.weight", "blk.0.attn_q_b.weight",
                 "blk.1.attn_kv_a_mqa.weight", "blk.2.attn_output.weight", "output.weight"):  # fmt: skip
        e[name] = ImatrixEntry(sums(1, TINY_SHAPES[name][-1]), counts(1))
    e["token_embd.weight"] = ImatrixEntry(sums(1, 100), counts(1))
    e["blk.9.ffn_up.weight"] = ImatrixEntry(sums(1, 512), counts(1))
    return Imatrix(e, ["calibration.txt"], chunk_count=11, chunk_size=chunk_size)


def assert_entries_equal(a: Imatrix, b: Imatrix) -> None:
    assert sorted(a.entries) == sorted(b.entries)
    for name, ea in a.entries.items():
        eb = b.entries[name]
        assert ea.sums.shape == eb.sums.shape, name
        assert np.array_equal(ea.sums.view(np.uint32), np.asarray(eb.sums, np.float32).view(np.uint32)), name
        assert np.array_equal(ea.counts, eb.counts), name
        assert (ea.in_sum is None) == (eb.in_sum is None), name
        if ea.in_sum is not None:
            assert np.array_equal(ea.in_sum, eb.in_sum), name


# ---------------------------------------------------------------------------------------------------
# round trips and the on-disk layout


def test_gguf_round_trip_is_exact_and_rewrite_is_byte_identical(tmp_path: Path) -> None:
    im = sample_imatrix()
    write_imatrix_gguf(tmp_path / "a.gguf", im)
    back = read_imatrix(tmp_path / "a.gguf")
    assert not back.legacy
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calibration.txt"], 11, 512)
    assert_entries_equal(im, back)
    write_imatrix_gguf(tmp_path / "b.gguf", back)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert not (tmp_path / "a.gguf.part").exists()


def test_dat_follows_llama_imatrix_legacy_writer(tmp_path: Path) -> None:
    im = sample_imatrix()
    write_imatrix_dat(tmp_path / "a.dat", im)
    back = read_imatrix(tmp_path / "a.dat")
    assert back.legacy and back.chunk_size == 0
    assert (back.datasets, back.chunk_count) == (["calibration.txt"], 11)
    # the all-zero-count entry is dropped, like save_imatrix_legacy's "has no data - skipping"
    assert sorted(back.entries) == sorted(n for n, e in im.entries.items() if e.counts.any())
    for name, e in back.entries.items():
        src = im.entries[name]
        ncall = -(-int(src.counts.max()) // im.chunk_size)
        assert e.counts.tolist() == [ncall] and e.sums.shape == (1, src.sums.size)
        for m in range(src.sums.shape[0]):
            c = np.float32(src.counts[m])
            per = src.sums.shape[1]
            want = (src.sums[m] / c if c else np.ones(per, np.float32)) * np.float32(ncall)
            assert np.array_equal(e.sums[0, m * per : (m + 1) * per], want.astype(np.float32)), (name, m)
    write_imatrix_dat(tmp_path / "b.dat", back)
    assert (tmp_path / "a.dat").read_bytes() == (tmp_path / "b.dat").read_bytes()


def test_legacy_to_gguf_keeps_the_quantizer_weights(tmp_path: Path) -> None:
    write_imatrix_dat(tmp_path / "a.dat", sample_imatrix())
    dat = read_imatrix(tmp_path / "a.dat")
    write_imatrix_gguf(tmp_path / "a.gguf", dat)
    gg = read_imatrix(tmp_path / "a.gguf")
    for name in dat.entries:
        if name in TINY_SHAPES:
            a = quantizer_weights(dat, name, TINY_SHAPES[name])
            b = quantizer_weights(gg, name, TINY_SHAPES[name])
            assert a is not None and b is not None
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), name


def test_gguf_layout_is_what_llama_cpp_loader_requires(tmp_path: Path) -> None:
    """Checked with gguf-py against common/imatrix-loader.cpp + quantize.cpp + tools/imatrix's writer."""
    im = sample_imatrix()
    write_imatrix_gguf(tmp_path / "a.gguf", im)
    r = GGUFReader(tmp_path / "a.gguf")
    kv = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    # exactly llama-imatrix's keys (has_metadata needs all three imatrix.* keys), in its order
    assert list(kv) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert kv["general.type"].types == [GGUFValueType.STRING] and kv["general.type"].contents() == "imatrix"
    assert kv["imatrix.datasets"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert kv["imatrix.datasets"].contents() == ["calibration.txt"]
    for k, want in (("imatrix.chunk_count", 11), ("imatrix.chunk_size", 512)):
        assert kv[k].types == [GGUFValueType.UINT32] and kv[k].contents() == want
    names = [t.name for t in r.tensors]
    expected: list[str] = []
    for name in sorted(im.entries):
        expected += [name + ".in_sum2", name + ".counts"]
        if im.entries[name].in_sum is not None:
            expected.append(name + ".in_sum")
    assert names == expected
    for t in r.tensors:
        assert t.tensor_type == T.F32 and len(t.name) < 64
        base, _, suffix = t.name.rpartition(".")
        e = im.entries[base]
        n_mat, per = e.sums.shape
        if suffix == "counts":
            assert t.shape.tolist() == [1, n_mat]
            assert np.array_equal(t.data.reshape(-1), e.counts.astype(np.float32))
        else:
            assert t.shape.tolist() == [per, n_mat]
            want = e.sums if suffix == "in_sum2" else e.in_sum
            assert np.array_equal(t.data.reshape(n_mat, per), want)
    # gguf.cpp reads the whole padded data section (no_alloc = false): the last tensor is padded too
    last = r.tensors[-1]
    assert (tmp_path / "a.gguf").stat().st_size == last.data_offset + -(-last.n_bytes // 32) * 32


def test_unwritable_names_fail_before_any_file_exists(tmp_path: Path) -> None:
    im = Imatrix({"blk.0." + "x" * 60 + ".weight": ImatrixEntry(np.ones((1, 4), np.float32), np.ones(1, np.int64))})
    with pytest.raises(K2ConvError, match="≥ 64 bytes"):
        write_imatrix_gguf(tmp_path / "a.gguf", im)
    zero = Imatrix({"a.weight": ImatrixEntry(np.ones((2, 4), np.float32), np.zeros(2, np.int64))}, chunk_size=512)
    with pytest.raises(K2ConvError, match="every imatrix entry has count 0"):
        write_imatrix_dat(tmp_path / "a.dat", zero)
    assert list(tmp_path.iterdir()) == []


def test_empty_datasets_still_count_as_metadata(tmp_path: Path) -> None:
    """llama.cpp needs the imatrix.datasets key even when empty; gguf.GGUFWriter cannot write that."""
    im = sample_imatrix()
    im.datasets = []
    write_imatrix_gguf(tmp_path / "a.gguf", im)
    back = read_imatrix(tmp_path / "a.gguf")
    assert back.datasets == []
    assert GGUFReader(tmp_path / "a.gguf").fields["imatrix.datasets"].types[0] == GGUFValueType.ARRAY


def test_tiny_shapes_match_the_converter(f32_model: Path) -> None:
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in GGUFReader(f32_model).tensors}
    for name, shape in TINY_SHAPES.items():
        assert shapes[name] == shape, name


# ---------------------------------------------------------------------------------------------------
# quantizer_weights and check_against_plan


def test_quantizer_weights_semantics(tmp_path: Path) -> None:
    write_imatrix_gguf(tmp_path / "f.gguf", sample_imatrix())
    with pytest.raises(K2ConvError, match=rf"^{tmp_path / 'f.gguf'}: imatrix entry 'blk.1.ffn_up_exps.weight' has 4096 values"):
        quantizer_weights(read_imatrix(tmp_path / "f.gguf"), "blk.1.ffn_up_exps.weight", (16, 256, 512))
    im = sample_imatrix()
    w = quantizer_weights(im, "blk.1.ffn_down_exps.weight", TINY_SHAPES["blk.1.ffn_down_exps.weight"])
    e = im.entries["blk.1.ffn_down_exps.weight"]
    assert w is not None and w.shape == (8, 256) and w.dtype == np.float32
    assert np.all(w[2] == 1.0) and np.all(w[5] == 1.0)  # count-0 experts
    assert np.array_equal(w[0], e.sums[0] / np.float32(e.counts[0]))
    kb = quantizer_weights(im, "blk.0.attn_k_b.weight", (4, 256, 128))  # one matrix of ne0·n_head
    assert kb is not None and kb.shape == (4, 128)
    assert np.array_equal(kb.reshape(-1), im.entries["blk.0.attn_k_b.weight"].sums[0] / np.float32(im.entries["blk.0.attn_k_b.weight"].counts[0]))
    assert quantizer_weights(im, "blk.0.ffn_up.weight", (1024, 512)) is None  # no entry
    assert quantizer_weights(im, "token_embd.weight", (2048, 512)) is None  # wrong size, exempt
    with pytest.raises(K2ConvError, match=r"<imatrix>: imatrix entry 'blk.0.ffn_down.weight' has 1024 values .* 2048"):
        quantizer_weights(im, "blk.0.ffn_down.weight", (512, 2048))


def test_check_against_plan() -> None:
    plan = [SimpleNamespace(name=n, shape=s) for n, s in TINY_SHAPES.items()]
    plan += [SimpleNamespace(name="token_embd.weight", shape=(2048, 512)),
             SimpleNamespace(name="blk.0.attn_norm.weight", shape=(512,)),
             SimpleNamespace(name="blk.0.ffn_up.weight", shape=(1024, 512))]  # fmt: skip
    msgs = check_against_plan(sample_imatrix(), plan)
    assert not [m for m in msgs if m.startswith("error")], msgs
    assert any("blk.9.ffn_up.weight" in m and m.startswith("warning") for m in msgs)
    assert any("'token_embd.weight'" in m and "ignored" in m for m in msgs)
    assert any("1 weight tensors have no imatrix entry" in m and "blk.0.ffn_up.weight" in m for m in msgs)

    other = sample_imatrix()
    other.entries["blk.0.ffn_down.weight"] = ImatrixEntry(np.ones((1, 2048), np.float32), np.ones(1, np.int64))
    other.entries["blk.2.attn_output.weight"] = ImatrixEntry(np.ones((2, 256), np.float32), np.ones(2, np.int64))
    msgs = check_against_plan(other, plan)
    assert any(m.startswith("error") and "'blk.0.ffn_down.weight' has 2048 values" in m for m in msgs)
    assert any(m.startswith("warning") and "'blk.2.attn_output.weight' is split into 2" in m for m in msgs)

    foreign = Imatrix({"blk.0.attn_qkv.weight": ImatrixEntry(np.ones((1, 64), np.float32), np.ones(1, np.int64))})
    assert any(m.startswith("error") and "no imatrix entry matches" in m for m in check_against_plan(foreign, plan))


# ---------------------------------------------------------------------------------------------------
# llama.cpp oracles


@pytest.fixture(scope="module")
def f32_model(synth_ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imatrix-model") / "f32.gguf"
    result = CliRunner().invoke(main, ["quantize", str(synth_ckpt("k2.5")), str(out), "--recipe", "f32", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _llama_cpp_lib() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(loc) / "lib"
        if list(lib.glob("libllama.so*")):
            return lib
    return None


_SHIM = r"""
// Test-only stand-ins for the four `common` symbols llama-quantize links against, so the vendored
// tools/quantize/quantize.cpp builds against llama-cpp-python's libllama without all of `common`.
#include <cstdarg>
#include <cstdio>
#include <vector>
#include "llama.h"
#include "log.h"
int common_log_get_verbosity_thold(void) { return 1000; }
struct common_log * common_log_main() { return nullptr; }
void common_log_add(struct common_log *, enum ggml_log_level, const char * fmt, ...) {
    va_list ap; va_start(ap, fmt); std::vfprintf(stderr, fmt, ap); va_end(ap);
}
bool string_parse_kv_override(const char *, std::vector<llama_model_kv_override> &) { return false; }
void llama_print_build_info(const char *, FILE *) {}
"""

_HARNESS = r"""
// Test-only: llama-quantize itself (its quantize.cpp, unchanged), plus `--dump-imatrix FILE OUT`,
// which writes the vectors its static load_imatrix() computed: int32 chunks, int32 n_datasets,
// {int32 len, bytes}, int32 n_entries, {int32 len, name, int64 n, float[n]}.
#include "quantize.cpp"
static void put(FILE * f, const void * p, size_t n) { std::fwrite(p, 1, n, f); }
int main(int argc, char ** argv) {
    if (argc == 4 && std::string(argv[1]) == "--dump-imatrix") {
        std::vector<std::string> datasets;
        std::unordered_map<std::string, std::vector<float>> data;
        const int32_t chunks = load_imatrix(argv[2], datasets, data);
        FILE * f = std::fopen(argv[3], "wb");
        if (!f) return 3;
        const int32_t nd = (int32_t) datasets.size(), ne = (int32_t) data.size();
        put(f, &chunks, 4); put(f, &nd, 4);
        for (const auto & d : datasets) { const int32_t n = (int32_t) d.size(); put(f, &n, 4); put(f, d.data(), d.size()); }
        put(f, &ne, 4);
        for (const auto & [name, v] : data) {
            const int32_t n = (int32_t) name.size(); const int64_t m = (int64_t) v.size();
            put(f, &n, 4); put(f, name.data(), name.size()); put(f, &m, 8); put(f, v.data(), 4 * v.size());
        }
        std::fclose(f);
        return 0;
    }
    return llama_quantize(argc, argv);
}
"""


@pytest.fixture(scope="session")
def llama_quantize(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-quantize built from the vendored sources (≈ 6 s, cached by content hash)."""
    default = ROOT / ".venv" / "llama.cpp-src"  # put there by ./setup.sh test
    src = Path(os.environ.get("K2CONV_LLAMA_CPP_SRC") or default)
    lib = _llama_cpp_lib()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    quantize_cpp = src / "tools" / "quantize" / "quantize.cpp"
    if not quantize_cpp.exists() or lib is None or cxx is None:
        pytest.skip("needs the llama.cpp source tree (./setup.sh test), llama-cpp-python's libllama and a C++17 compiler")
    h = hashlib.sha256((_SHIM + _HARNESS + cxx).encode())
    for p in (quantize_cpp, src / "common" / "imatrix-loader.cpp", src / "include" / "llama.h", *sorted(lib.glob("libllama.so*"))):
        h.update(p.read_bytes() if p.suffix in (".cpp", ".h") else str(p.stat().st_mtime_ns).encode())
    try:
        cache = Path(request.config.cache.mkdir("k2conv-llama-quantize"))  # type: ignore[union-attr]
    except AttributeError:
        cache = tmp_path_factory.mktemp("llama-quantize")
    exe = cache / f"llama-quantize-{h.hexdigest()[:16]}"
    if exe.exists():
        return exe
    (cache / "shim.cpp").write_text(_SHIM)
    (cache / "harness.cpp").write_text(_HARNESS)
    tmp = exe.with_name(exe.name + f".{os.getpid()}.part")
    cmd = [cxx, "-std=c++17", "-O1", f"-I{src / 'tools' / 'quantize'}", f"-I{src / 'common'}", f"-I{src / 'include'}",
           f"-I{src / 'ggml' / 'include'}", str(cache / "harness.cpp"), str(src / "common" / "imatrix-loader.cpp"),
           str(cache / "shim.cpp"), f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(tmp)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"could not build llama-quantize from {src}: {done.stderr[-800:]}")
    os.replace(tmp, exe)
    return exe


def dump_llama_imatrix(exe: Path, path: Path, out: Path) -> tuple[int, list[str], dict[str, np.ndarray]]:
    """Run llama-quantize's own load_imatrix() on `path`: (chunks, datasets, name → float32 vector)."""
    done = subprocess.run([str(exe), "--dump-imatrix", str(path), str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    buf = out.read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def text() -> str:
        nonlocal pos
        n = take("<i")
        pos += n
        return buf[pos - n : pos].decode()

    chunks = take("<i")
    datasets = [text() for _ in range(take("<i"))]
    data: dict[str, np.ndarray] = {}
    for _ in range(take("<i")):
        name = text()
        n = take("<q")
        data[name] = np.frombuffer(buf, np.float32, n, pos).copy()
        pos += 4 * n
    assert pos == len(buf)
    return chunks, datasets, data


@pytest.mark.oracle
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_load_imatrix_equals_quantizer_weights(llama_quantize: Path, tmp_path: Path, fmt: str) -> None:
    im = sample_imatrix()
    path = tmp_path / f"im.{fmt}"
    (write_imatrix_gguf if fmt == "gguf" else write_imatrix_dat)(path, im)
    chunks, datasets, llama = dump_llama_imatrix(llama_quantize, path, tmp_path / "dump.bin")
    ours = read_imatrix(path)
    assert (chunks, datasets) == (ours.chunk_count, ours.datasets) == (11, ["calibration.txt"])
    assert sorted(llama) == sorted(ours.entries)
    for name, vec in llama.items():
        shape = TINY_SHAPES.get(name, (1, ours.entries[name].n_values))  # token_embd / unknown: any fit
        w = quantizer_weights(ours, name, shape)
        assert w is not None
        assert np.array_equal(w.reshape(-1).view(np.uint32), vec.view(np.uint32)), name


def quantized_tensors(path: Path) -> dict[str, tuple[T, np.ndarray]]:
    return {t.name: (t.tensor_type, np.asarray(t.data)) for t in GGUFReader(path).tensors}


def assert_matches_ours(f32: Path, quantized: Path, im: Imatrix | None) -> tuple[set[T], set[str]]:
    """Every tensor llama.cpp quantized equals k2conv's quantize(), matrix by matrix with weights[m].

    Returns the types seen and the tensors whose bytes the imatrix changed (so the test knows the
    imatrix path, not the plain one, was compared).
    """
    src = {t.name: np.array(t.data) for t in GGUFReader(f32).tensors}  # writable: numba kernels want it
    types, sensitive = set(), set()
    for name, (qtype, data) in quantized_tensors(quantized).items():
        if qtype == T.F32:
            continue
        x = src[name]
        mats = x.reshape(-1, *x.shape[-2:])
        w = quantizer_weights(im, name, x.shape) if im is not None else None
        ours = np.concatenate([quantize(m, qtype, None if w is None else w[i]).reshape(-1) for i, m in enumerate(mats)])
        assert np.array_equal(ours, data.reshape(-1)), f"{name} {qtype.name}"
        types.add(qtype)
        if w is not None:
            plain = np.concatenate([quantize(m, qtype).reshape(-1) for m in mats])
            if not np.array_equal(plain, ours):
                sensitive.add(name)
    return types, sensitive


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "ftype"),
    [("gguf", "Q2_K"), ("gguf", "Q3_K_M"), ("gguf", "Q4_K_M"), ("gguf", "Q6_K"), ("gguf", "IQ4_XS"), ("dat", "Q4_K_M")],
)
def test_llama_quantize_with_our_imatrix_file_is_byte_identical(
    llama_quantize: Path, f32_model: Path, tmp_path: Path, fmt: str, ftype: str
) -> None:
    """llama-quantize --imatrix OUR_FILE vs k2conv slice-by-slice: merged experts (count-0 experts and
    an all-zero entry), attn_k_b/attn_v_b per head, 2-D weights, token_embd ignored, and the
    attn_k_b fallback types (Q4_0, Q5_0, Q8_0, IQ4_NL) all take the imatrix path."""
    im = sample_imatrix()
    path = tmp_path / f"im.{fmt}"
    (write_imatrix_gguf if fmt == "gguf" else write_imatrix_dat)(path, im)
    out = tmp_path / "q.gguf"
    done = subprocess.run([str(llama_quantize), "--imatrix", str(path), str(f32_model), str(out), ftype, "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "did not find weights for blk.0.ffn_up.weight" in log  # entries really are looked up by name
    types, sensitive = assert_matches_ours(f32_model, out, read_imatrix(path))
    assert len(types) >= 2, types
    # the imatrix really changed the bytes of experts, per-head and 2-D tensors (Q8_0 ignores it)
    must = {"blk.1.ffn_down_exps.weight", "blk.1.ffn_up_exps.weight", "blk.0.attn_v_b.weight", "blk.0.ffn_down.weight"}
    must |= {"blk.0.attn_k_b.weight", "blk.1.attn_k_b.weight"} if ftype != "Q6_K" else set()
    assert must <= sensitive, must - sensitive
    kv = GGUFReader(out).fields
    assert kv["quantize.imatrix.file"].contents() == str(path)
    assert kv["quantize.imatrix.entries_count"].contents() == len(read_imatrix(path).entries)


@pytest.mark.oracle
@pytest.mark.slow
def test_llama_model_quantize_api_with_quantizer_weights(f32_model: Path, tmp_path: Path) -> None:
    """In-process llama_model_quantize, params.imatrix = quantizer_weights' vectors (no compiler needed).

    Proves the slicing (expert e / head h uses weights[e] / weights[h]) and the bytes; not the file
    parsing (the compiled llama-quantize tests above prove that).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    im = sample_imatrix()
    keep: list[object] = []
    items = []
    for name, shape in TINY_SHAPES.items():
        w = quantizer_weights(im, name, shape)
        if w is None:
            continue
        flat = np.ascontiguousarray(w.reshape(-1), np.float32)
        bname = name.encode()
        keep += [flat, bname]
        items.append((bname, flat))
    arr = (llama_cpp.llama_model_imatrix_data * (len(items) + 1))()
    for i, (bname, flat) in enumerate(items):
        arr[i].name = bname
        arr[i].data = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = flat.size
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    out = tmp_path / "q.gguf"
    rc = llama_cpp.llama_model_quantize(str(f32_model).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0
    sub = Imatrix({n.decode(): ImatrixEntry(f.reshape(1, -1).copy(), np.ones(1, np.int64)) for n, f in items})
    types, sensitive = assert_matches_ours(f32_model, out, sub)
    assert {T.Q4_K, T.Q6_K} <= types
    assert {"blk.1.ffn_down_exps.weight", "blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"} <= sensitive


# ---------------------------------------------------------------------------------------------------
# hostile input


def gguf_raw(kvs: list[tuple[str, int, bytes]], tensors: list[tuple[str, int, list[int], bytes]], *, version: int = 3) -> bytes:
    """A GGUF written independently of k2conv's writer: kvs are (key, type, packed value)."""

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, val in kvs:
        out += s(key) + struct.pack("<I", vtype) + val
    off = 0
    for name, ttype, dims, data in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, off)
        off += -(-len(data) // 32) * 32
    out += b"\0" * (-len(out) % 32)
    for *_, data in tensors:
        out += data + b"\0" * (-len(data) % 32)
    return out


def _str(x: str) -> bytes:
    return struct.pack("<Q", len(x.encode())) + x.encode()


META = [
    ("general.type", 8, _str("imatrix")),
    ("imatrix.datasets", 9, struct.pack("<IQ", 8, 1) + _str("d.txt")),
    ("imatrix.chunk_count", 4, struct.pack("<I", 3)),
    ("imatrix.chunk_size", 4, struct.pack("<I", 512)),
]


def f32b(*v: float) -> bytes:
    return np.array(v, np.float32).tobytes()


def good_tensors() -> list[tuple[str, int, list[int], bytes]]:
    return [("a.weight.in_sum2", 0, [4, 2], f32b(*range(8))), ("a.weight.counts", 0, [1, 2], f32b(3, 0))]


def dat_raw(entries: list[tuple[bytes, int, int, bytes]], n: int | None = None, trailer: bytes = b"") -> bytes:
    out = struct.pack("<i", len(entries) if n is None else n)
    for name, ncall, nval, data in entries:
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, nval) + data
    return out + trailer


GOOD_DAT = dat_raw([(b"a.weight", 2, 4, f32b(1, 2, 3, 4)), (b"b.weight", 1, 2, f32b(5, 6))], trailer=struct.pack("<ii", 3, 5) + b"d.txt")

HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "only 0 bytes"),
    "dat-zero-entries": (struct.pack("<i", 0), "entry count 0"),
    "dat-too-many-entries": (dat_raw([(b"a", 1, 1, f32b(1))], n=1 << 30), "claims 1073741824 entries"),
    "dat-name-length-beyond-file": (struct.pack("<ii", 1, 0x7FFFFFFF) + b"x" * 20, "name length 2147483647"),
    "dat-negative-name-length": (struct.pack("<ii", 1, -5) + b"x" * 20, "name length -5"),
    "dat-lying-nval": (dat_raw([(b"a.weight", 1, 0x7FFFFFFF, f32b(1, 2))]), "'a.weight': 2147483647 values"),
    "dat-truncated-values": (dat_raw([(b"a.weight", 1, 4, f32b(1, 2))]), "'a.weight': 4 values"),
    "dat-nan": (dat_raw([(b"a.weight", 1, 2, f32b(1, np.nan))]), "'a.weight': values has a non-finite value at index 1"),
    "dat-negative-ncall": (dat_raw([(b"a.weight", -1, 1, f32b(1))]), "negative ncall -1"),
    "dat-negative-value": (dat_raw([(b"a.weight", 1, 1, f32b(-1))]), "negative value"),
    "dat-duplicate": (dat_raw([(b"a.weight", 1, 1, f32b(1)), (b"a.weight", 1, 1, f32b(1))]), "appears twice"),
    "dat-trailing-garbage": (GOOD_DAT + b"junk", "unexpected bytes after the trailer"),
    "dat-lying-dataset-length": (GOOD_DAT[:-9] + struct.pack("<i", 999) + b"d.txt", "dataset name length 999"),
    "dat-bad-utf8-name": (dat_raw([(b"\xff\xfe", 1, 1, f32b(1))]), "not valid UTF-8"),
    "gguf-truncated": (gguf_raw(META, good_tensors())[:-40], "truncated GGUF"),
    "gguf-header-only": (b"GGUF\x03\x00", "GGUF version needs 4 bytes"),
    "gguf-big-endian": (b"GGUF" + struct.pack(">I", 3) + b"\0" * 16, "big-endian"),
    "gguf-v1": (gguf_raw(META, good_tensors(), version=1), "unsupported GGUF version 1"),
    "gguf-huge-array": (gguf_raw([("x", 9, struct.pack("<IQ", 0, 1 << 60))], []), "array 'x' claims 1152921504606846976 values"),
    "gguf-huge-string": (gguf_raw([("x", 8, struct.pack("<Q", 1 << 62))], []), "length 4611686018427387904 exceeds"),
    "gguf-huge-counts": (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40), "claims 1099511627776 keys"),
    "gguf-huge-dims": (gguf_raw(META, [("a.in_sum2", 0, [1 << 40, 1 << 40], b"")]), "impossible shape"),
    "gguf-data-beyond-file": (gguf_raw(META, [("a.in_sum2", 0, [1 << 20], b"")]), "truncated GGUF"),
    "gguf-no-metadata": (gguf_raw(META[:1], good_tensors()), "lacks imatrix.datasets"),
    "gguf-chunk-count-i32": (gguf_raw([*META[:2], ("imatrix.chunk_count", 5, struct.pack("<i", 3)), META[3]], good_tensors()), "imatrix.chunk_count must be UINT32"),
    "gguf-not-imatrix": (gguf_raw([("general.type", 8, _str("model")), *META[1:]], good_tensors()), "general.type is 'model'"),
    "gguf-missing-counts": (gguf_raw(META, good_tensors()[:1]), "must come as a pair"),
    "gguf-f16-sums": (gguf_raw(META, [("a.weight.in_sum2", 1, [4, 2], b"\0" * 16), good_tensors()[1]]), "in_sum2 must be F32, not F16"),
    "gguf-negative-count": (gguf_raw(META, [good_tensors()[0], ("a.weight.counts", 0, [1, 2], f32b(3, -1))]), "counts has a negative value"),
    "gguf-inf-sum": (gguf_raw(META, [("a.weight.in_sum2", 0, [4, 2], f32b(1, 2, 3, np.inf, 5, 6, 7, 8)), good_tensors()[1]]), "in_sum2 has a non-finite value at index 3"),
    "gguf-uneven-split": (gguf_raw(META, [("a.weight.in_sum2", 0, [7], f32b(*range(7))), good_tensors()[1]]), "7 sums do not split into 2"),
    "gguf-no-entries": (gguf_raw(META, [("x.stats", 0, [2], f32b(np.nan, 1))]), "has no entries"),
    "gguf-bad-offset": (gguf_raw(META, good_tensors()).replace(struct.pack("<IQ", 0, 32), struct.pack("<IQ", 0, 64), 1), "expected 32"),
    "gguf-long-name": (gguf_raw(META, [("a" * 64, 0, [1], f32b(1))]), "≥ 64 bytes"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_fail_with_one_clear_line(tmp_path: Path, case: str) -> None:
    data, expected = HOSTILE[case]
    path = tmp_path / f"{case}.imatrix"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(K2ConvError) as err:
            read_imatrix(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    assert expected in msg, msg
    assert peak < 4 << 20, f"{peak} bytes allocated for a {len(data)}-byte file"


def test_hostile_fixtures_are_valid_when_unbroken(tmp_path: Path) -> None:
    """The raw builders above make files we (and so the hostile variants' other parts) accept."""
    (tmp_path / "g.gguf").write_bytes(gguf_raw(META, [*good_tensors(), ("a.weight.stats", 0, [2], f32b(np.nan, 1))]))
    g = read_imatrix(tmp_path / "g.gguf")
    assert g.entries["a.weight"].counts.tolist() == [3, 0] and g.datasets == ["d.txt"]
    want = np.array([[0, 1, 2, 3], [3, 3, 3, 3]], np.float32) / np.float32(3)
    assert np.array_equal(quantizer_weights(g, "a.weight", (2, 5, 4)), want)
    (tmp_path / "g.dat").write_bytes(GOOD_DAT)
    d = read_imatrix(tmp_path / "g.dat")
    assert (d.chunk_count, d.datasets) == (3, ["d.txt"])
    assert quantizer_weights(d, "a.weight", (7, 4)).tolist() == [[0.5, 1, 1.5, 2]]  # type: ignore[union-attr]


def test_counts_are_rounded_like_lround(tmp_path: Path) -> None:
    counts = f32b(0.5, 1.5, 2.5, 2.4999998)
    (tmp_path / "r.gguf").write_bytes(gguf_raw(META, [("a.in_sum2", 0, [1, 4], f32b(6, 6, 6, 6)), ("a.counts", 0, [1, 4], counts)]))
    assert read_imatrix(tmp_path / "r.gguf").entries["a"].counts.tolist() == [1, 2, 3, 2]


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("imatrix-fuzz")
    small = Imatrix(
        {"blk.1.ffn_down_exps.weight": ImatrixEntry(np.arange(12, dtype=np.float32).reshape(3, 4), np.array([600, 0, 2000])),
         "output.weight": ImatrixEntry(np.ones((1, 8), np.float32), np.array([5]), np.ones((1, 8), np.float32))},
        ["x.txt"], 4, 512,
    )  # fmt: skip
    write_imatrix_gguf(d / "s.gguf", small)
    write_imatrix_dat(d / "s.dat", small)
    return d, {"gguf": (d / "s.gguf").read_bytes(), "dat": (d / "s.dat").read_bytes()}


@settings(max_examples=300, deadline=2000, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["gguf", "dat"]), ops=mutations())
def test_fuzz_read_imatrix_only_raises_k2conv_error(fuzz_seeds: tuple[Path, dict[str, bytes]], fmt: str, ops: list[tuple[str, int, int]]) -> None:
    folder, seeds = fuzz_seeds
    path = folder / "m.imatrix"
    path.write_bytes(mutate(seeds[fmt], ops))
    t0 = time.monotonic()
    try:
        im = read_imatrix(path)
    except K2ConvError as exc:
        assert "\n" not in str(exc)
        return
    finally:
        assert time.monotonic() - t0 < 1.0
    for name, e in im.entries.items():
        w = quantizer_weights(im, name, (1, 1, e.n_values))
        assert w is not None and np.isfinite(w).all() and w.dtype == np.float32


@pytest.mark.oracle
def test_whatever_we_accept_llama_quantize_loads_to_the_same_values(
    llama_quantize: Path, fuzz_seeds: tuple[Path, dict[str, bytes]]
) -> None:
    """Differential fuzz: mutants of valid files that read_imatrix accepts give, in llama-quantize's
    own load_imatrix, the same entries and bit-identical vectors (and are never refused by it)."""
    folder, seeds = fuzz_seeds
    rng = np.random.default_rng(7)
    vals = [0, 1, -1, 255, 1 << 31, (1 << 31) - 1, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]
    kinds = ["flip", "i32", "u64", "cut", "insert"]
    accepted = 0
    for i in range(400):
        fmt = ("gguf", "dat")[i % 2]
        ops = [(kinds[rng.integers(5)], int(rng.integers(1 << 16)), int(rng.choice(vals)) if rng.random() < 0.5 else int(rng.integers(256)))
               for _ in range(int(rng.integers(1, 3)))]  # fmt: skip
        path = folder / f"diff-{i}.imatrix"
        path.write_bytes(mutate(seeds[fmt], ops))
        try:
            ours = read_imatrix(path)
        except K2ConvError:
            continue
        accepted += 1
        _, datasets, llama = dump_llama_imatrix(llama_quantize, path, folder / "dump.bin")
        assert datasets == ours.datasets and sorted(llama) == sorted(ours.entries), (fmt, ops)
        for name, e in ours.entries.items():
            w = quantizer_weights(ours, name, (1, 1, e.n_values))
            assert w is not None and np.array_equal(w.reshape(-1).view(np.uint32), llama[name].view(np.uint32)), (fmt, ops, name)
    assert accepted >= 50, accepted


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K_S"])
def test_k2conv_quantize_with_imatrix_equals_llama_quantize(
    llama_quantize: Path, synth_ckpt, f32_model: Path, tmp_path: Path, ftype: str
) -> None:
    """End to end: `k2conv quantize SRC --recipe FTYPE --imatrix F` straight from the HF checkpoint
    writes the same tensor types and bytes as llama-quantize --imatrix F on our F32 GGUF."""
    rng = np.random.default_rng(3)
    entries = {}
    for t in GGUFReader(f32_model).tensors:  # every matrix llama-quantize quantizes (Q2_K_S needs them all)
        ne = [int(d) for d in t.shape]
        if len(ne) >= 2 and t.name.startswith("blk.") and "ffn_gate_inp" not in t.name:
            n_mat = ne[2] if len(ne) > 2 else 1
            sums = rng.lognormal(0.0, 2.0, (n_mat, ne[0])).astype(np.float32)
            entries[t.name] = ImatrixEntry(sums, rng.integers(0, 50, n_mat).astype(np.int64))
    im = Imatrix(entries, datasets=["synthetic"], chunk_count=4, chunk_size=512)
    path = tmp_path / "im.gguf"
    write_imatrix_gguf(path, im)
    ref = tmp_path / "ref.gguf"
    done = subprocess.run([str(llama_quantize), "--imatrix", str(path), str(f32_model), str(ref), ftype, "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ours = tmp_path / "ours.gguf"
    result = CliRunner().invoke(main, ["quantize", str(synth_ckpt("k2.5")), str(ours), "--recipe", ftype,
                                       "--imatrix", str(path), "--quiet", "--no-mmproj"])  # fmt: skip
    assert result.exit_code == 0, result.output
    theirs = {t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes())) for t in GGUFReader(ref).tensors}
    mine = {t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes())) for t in GGUFReader(ours).tensors}
    assert set(mine) == set(theirs)
    for name in theirs:
        assert mine[name][0] == theirs[name][0], name
        assert mine[name][1] == theirs[name][1], name


def test_imatrix_for_another_model_is_one_clear_error(synth_ckpt, tmp_path: Path) -> None:
    other = Imatrix({"blk.0.attn_q_b.weight": ImatrixEntry(np.ones((1, 999), np.float32), np.ones(1, np.int64))})
    path = tmp_path / "other.gguf"
    write_imatrix_gguf(path, other)
    out = tmp_path / "x.gguf"
    result = CliRunner().invoke(main, ["quantize", str(synth_ckpt("k2.5")), str(out), "--recipe", "Q4_K_M",
                                       "--imatrix", str(path), "--quiet"])  # fmt: skip
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "blk.0.attn_q_b.weight" in result.output
    assert not out.exists()
