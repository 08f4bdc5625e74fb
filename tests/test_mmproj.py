"""K2.5 vision → mmproj GGUF: keys and tensors as llama.cpp's clip loader wants them, exact values,
the wqkv RoPE permutation, atomic writes, and (with llama-cpp-python) a real load + image encode
whose output is checked against an independent NumPy MoonViT forward on the HF weights.

The expected names/keys below are spelled out from llama.cpp's tools/mtmd/clip-impl.h and
clip.cpp (as vendored by llama-cpp-python 0.3.36) rather than taken from gguf-py, so a rename on
either side shows up here.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType

from k2conv.cli import main
from k2conv.convert import mmproj as mm
from k2conv.convert.checkpoint import Checkpoint, to_f32
from k2conv.errors import K2ConvError

# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k25(synth_ckpt) -> Checkpoint:
    ck = Checkpoint(synth_ckpt("k2.5"))
    yield ck
    ck.close()


@pytest.fixture(scope="module")
def files(k25: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("mmproj")
    return {ft: mm.write_mmproj(k25, out / f"mmproj-{ft}.gguf", ft) for ft in ("f16", "f32")}


def _tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in GGUFReader(path).tensors}


def _src(ck: Checkpoint, name: str) -> np.ndarray:
    return to_f32(ck.raw(name), ck.entry(name).dtype)


def _dims(ck: Checkpoint) -> dict[str, int]:
    vc = ck.config.vision
    return {"C": vc["vt_hidden_size"], "F": vc["vt_intermediate_size"], "L": vc["vt_num_hidden_layers"],
            "H": vc["vt_num_attention_heads"], "P": vc["patch_size"], "PH": vc["init_pos_emb_height"],
            "PW": vc["init_pos_emb_width"], "T": ck.config.hidden_size}


# ---- status / refusals --------------------------------------------------------------------------


def test_status_ok_for_k25_and_skipped_for_text_only(synth_ckpt, k25: Checkpoint, tmp_path: Path) -> None:
    assert mm.mmproj_status(k25.config).startswith("ok: kimik25")
    thinking = Checkpoint(synth_ckpt("k2-thinking"))
    status = mm.mmproj_status(thinking.config)
    assert status.startswith("skipped: k2-thinking is a text-only checkpoint")
    with pytest.raises(K2ConvError, match="text-only"):
        mm.write_mmproj(thinking, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("change", "reason"), [
    ({"vt_hidden_size": 120, "vt_num_attention_heads": 4}, "head dim 30 is not a multiple of 4"),
    ({"merge_kernel_size": [2, 3]}, "merge_kernel_size"),
    ({"projector_hidden_act": "silu"}, "projector_hidden_act"),
    ({"merge_type": "sd3"}, "merge_type"),
    ({"text_hidden_size": 7168}, "text_hidden_size 7168"),
])
def test_unrepresentable_vision_configs_are_skipped(k25: Checkpoint, change: dict, reason: str) -> None:
    cfg = dataclasses.replace(k25.config, vision={**k25.config.vision, **change})
    status = mm.mmproj_status(cfg)
    assert status.startswith("skipped: llama.cpp's kimik25 projector cannot represent"), status
    assert reason in status
    # any head count with head_dim % 4 == 0 is fine (the permutation uses the real count)
    cfg = dataclasses.replace(k25.config, vision={**k25.config.vision, "vt_num_attention_heads": 8})
    assert mm.mmproj_status(cfg).startswith("ok")


def test_transformers_key_spellings_give_the_same_plan(k25: Checkpoint, tmp_path: Path) -> None:
    """vision_config may use `hidden_size`/`pos_emb_height`/… instead of `vt_*`/`init_pos_emb_*`."""
    rename = {"vt_hidden_size": "hidden_size", "vt_intermediate_size": "intermediate_size",
              "vt_num_hidden_layers": "num_hidden_layers", "vt_num_attention_heads": "num_attention_heads",
              "init_pos_emb_height": "pos_emb_height", "init_pos_emb_width": "pos_emb_width",
              "init_pos_emb_time": "pos_emb_time"}
    other = copy.copy(k25)
    other.config = dataclasses.replace(k25.config, vision={rename.get(k, k): v for k, v in k25.config.vision.items()})
    a, b = mm.plan_mmproj(k25, tmp_path / "a.gguf"), mm.plan_mmproj(other, tmp_path / "a.gguf")
    assert a.kv == b.kv and a.tensors == b.tensors


def test_bad_ftype_and_default_path(k25: Checkpoint, tmp_path: Path) -> None:
    with pytest.raises(K2ConvError, match="ftype 'q8_0'"):
        mm.plan_mmproj(k25, tmp_path / "m.gguf", "q8_0")
    assert mm.default_mmproj_path(Path("/x/Kimi-K2.5-Q4_0.gguf")) == Path("/x/mmproj-Kimi-K2.5-Q4_0.gguf")


# ---- keys ---------------------------------------------------------------------------------------


def test_keys_are_what_clip_load_hparams_reads(k25: Checkpoint, files: dict[str, Path]) -> None:
    d = _dims(k25)
    U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
    expected = {  # key: (type, value); clip.cpp get_u32/get_f32/get_string are type-strict
        "general.architecture": (STR, "clip"),
        "clip.projector_type": (STR, "kimik25"),
        "clip.has_vision_encoder": (BOOL, True),
        "clip.vision.embedding_length": (U32, d["C"]),
        "clip.vision.attention.head_count": (U32, d["H"]),
        "clip.vision.feed_forward_length": (U32, d["F"]),
        "clip.vision.block_count": (U32, d["L"]),
        "clip.vision.projection_dim": (U32, d["T"]),
        "clip.vision.attention.layer_norm_epsilon": (F32, pytest.approx(1e-5)),
        "clip.vision.image_size": (U32, d["PH"] * d["P"]),
        "clip.vision.patch_size": (U32, d["P"]),
        "clip.use_gelu": (BOOL, True),
        "clip.vision.projector.scale_factor": (U32, 2),
        "clip.vision.image_min_pixels": (U32, 8 * d["P"] ** 2),
        "clip.vision.image_max_pixels": (U32, 16384 * d["P"] ** 2),
        "vision.pos_emb_height": (U32, d["PH"]),
        "vision.pos_emb_width": (U32, d["PW"]),
        "vision.pos_emb_time": (U32, 4),
    }
    for ft, file_type in (("f16", 1), ("f32", 0)):
        fields = GGUFReader(files[ft]).fields
        for key, (vtype, value) in expected.items():
            assert key in fields, key
            assert fields[key].types == [vtype], key
            assert fields[key].contents() == value, key
        assert fields["general.file_type"].contents() == file_type
        for key in ("clip.vision.image_mean", "clip.vision.image_std"):
            assert fields[key].types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
            assert fields[key].contents() == [0.5, 0.5, 0.5]


# ---- tensors ------------------------------------------------------------------------------------


def _expected_tensors(d: dict[str, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (ggml ne, type class) from clip-impl.h's TN_* formats and kimik25's loader branch."""
    C, F, M = d["C"], d["F"], 4 * d["C"]
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "v.patch_embd.weight": ((d["P"], d["P"], 3, C), "mat"),  # TN_PATCH_EMBD
        "v.patch_embd.bias": ((C,), "f32"),  # TN_PATCH_BIAS
        "v.position_embd.weight": ((C, d["PW"], d["PH"]), "f32"),  # TN_POS_EMBD; ne = (C, W, H)
        "v.post_ln.weight": ((C,), "f32"), "v.post_ln.bias": ((C,), "f32"),  # TN_LN_POST
        "mm.input_norm.weight": ((C,), "f32"), "mm.input_norm.bias": ((C,), "f32"),  # TN_MM_INP_NORM(_B)
        "mm.1.weight": ((M, M), "mat"), "mm.1.bias": ((M,), "f32"),  # TN_LLAVA_PROJ
        "mm.2.weight": ((M, d["T"]), "mat"), "mm.2.bias": ((d["T"],), "f32"),
    }
    for b in range(d["L"]):
        for stem, ne in (("attn_qkv", (C, 3 * C)), ("attn_out", (C, C)), ("ffn_up", (C, F)), ("ffn_down", (F, C))):
            out[f"v.blk.{b}.{stem}.weight"] = (ne, "mat")
            out[f"v.blk.{b}.{stem}.bias"] = ((ne[1],), "f32")
        for stem in ("ln1", "ln2"):
            out[f"v.blk.{b}.{stem}.weight"] = ((C,), "f32")
            out[f"v.blk.{b}.{stem}.bias"] = ((C,), "f32")
    return out


@pytest.mark.parametrize("ftype", ["f16", "f32"])
def test_tensor_names_shapes_types(k25: Checkpoint, files: dict[str, Path], ftype: str) -> None:
    expected = _expected_tensors(_dims(k25))
    got = _tensors(files[ftype])
    assert set(got) == set(expected)
    mat = "F16" if ftype == "f16" else "F32"
    for name, (ne, cls) in expected.items():
        t = got[name]
        assert tuple(int(x) for x in t.shape) == ne, name
        assert t.tensor_type.name == (mat if cls == "mat" else "F32"), name
    plan = mm.plan_mmproj(k25, files[ftype], ftype)
    assert files[ftype].stat().st_size >= plan.nbytes
    assert sum(int(t.n_bytes) for t in got.values()) == plan.nbytes


def _interleaved_to_split(x: np.ndarray, n_head: int) -> np.ndarray:
    """Independent statement of the permutation: per head, source row 4i+2a+b → a·hd/2 + 2i + b."""
    out = np.empty_like(x)
    hd = x.shape[0] // n_head
    for h in range(n_head):
        for i in range(hd // 4):
            for a in range(2):
                for b in range(2):
                    out[h * hd + a * hd // 2 + 2 * i + b] = x[h * hd + 4 * i + 2 * a + b]
    return out


def _expected_qkv(w: np.ndarray, n_head: int) -> np.ndarray:
    n = w.shape[0] // 3
    return np.concatenate([_interleaved_to_split(w[:n], n_head), _interleaved_to_split(w[n:2 * n], n_head), w[2 * n:]])


def test_wqkv_permutation_numerically(k25: Checkpoint, files: dict[str, Path]) -> None:
    d = _dims(k25)
    f32, f16 = _tensors(files["f32"]), _tensors(files["f16"])
    for b in range(d["L"]):
        for part in ("weight", "bias"):
            want = _expected_qkv(_src(k25, f"vision_tower.encoder.blocks.{b}.wqkv.{part}"), d["H"])
            name = f"v.blk.{b}.attn_qkv.{part}"
            got32 = np.asarray(f32[name].data, dtype=np.float32).reshape(want.shape)
            np.testing.assert_array_equal(got32, want)
            got16 = np.asarray(f16[name].data).reshape(want.shape)
            np.testing.assert_array_equal(got16, want.astype(got16.dtype))
            # the permutation really moves data: V is untouched, Q/K are not the identity
            assert not np.array_equal(want[: want.shape[0] // 3], _src(k25, f"vision_tower.encoder.blocks.{b}.wqkv.{part}")[: want.shape[0] // 3])


def test_all_other_tensors_are_exact_copies(k25: Checkpoint, files: dict[str, Path]) -> None:
    plan = mm.plan_mmproj(k25, files["f32"], "f32")
    f32, f16 = _tensors(files["f32"]), _tensors(files["f16"])
    for t in plan.tensors:
        if t.transform != mm.COPY:
            continue
        src = _src(k25, t.source).reshape(t.shape)
        np.testing.assert_array_equal(np.asarray(f32[t.name].data).reshape(t.shape), src, err_msg=t.name)
        g16 = np.asarray(f16[t.name].data).reshape(t.shape)
        np.testing.assert_array_equal(g16, src.astype(g16.dtype), err_msg=t.name)


# ---- atomicity ----------------------------------------------------------------------------------


def test_failed_write_leaves_old_file_and_no_part(k25: Checkpoint, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "mmproj.gguf"
    out.write_bytes(b"old")
    calls = {"n": 0}
    real = mm.tensor_data

    def failing(ckpt, plan, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise K2ConvError("boom")
        return real(ckpt, plan, t)

    monkeypatch.setattr(mm, "tensor_data", failing)
    with pytest.raises(K2ConvError, match="boom"):
        mm.write_mmproj(k25, out, "f16", force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj.gguf"]
    monkeypatch.undo()
    with pytest.raises(K2ConvError, match="exists"):
        mm.write_mmproj(k25, out, "f16")
    assert out.read_bytes() == b"old"


# ---- llama.cpp: load and encode -----------------------------------------------------------------


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def moonvit_reference(ck: Checkpoint, img: np.ndarray) -> np.ndarray:
    """K2.5 vision tower + PatchMergerMLP on the HF weights (float64), one image, t = 1.

    MoonViT3d semantics: Conv2d patches + learned 2-D pos-emb (no time term for one frame);
    pre-LN blocks with 2-D RoPE on interleaved pairs (x = column on even pairs, y = row on odd,
    freq_i = 10000^(-4i/hd)); GELU-tanh MLP; final LayerNorm; 2×2 merge in (dy, dx, C) order;
    pre_norm per sub-patch, Linear, GELU(erf), Linear.
    """
    d = _dims(ck)
    C, nh, P = d["C"], d["H"], d["P"]
    hd = C // nh

    def w(name: str) -> np.ndarray:
        return _src(ck, name).astype(np.float64)

    H, W = img.shape[:2]
    gh, gw = H // P, W // P
    x = (img.astype(np.float64) / 255.0 - 0.5) / 0.5
    patches = x.reshape(gh, P, gw, P, 3).transpose(0, 2, 4, 1, 3).reshape(gh * gw, 3 * P * P)
    t = patches @ w("vision_tower.patch_embed.proj.weight").reshape(C, -1).T + w("vision_tower.patch_embed.proj.bias")
    t = t + w("vision_tower.patch_embed.pos_emb.weight").reshape(gh * gw, C)
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    freqs = 1.0 / 10000.0 ** (np.arange(0, hd, 4)[: hd // 4] / hd)
    ang = np.stack([np.outer(cols, freqs), np.outer(rows, freqs)], axis=-1).reshape(gh * gw, 1, hd // 2)
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(q: np.ndarray) -> np.ndarray:
        out = np.empty_like(q)
        out[..., 0::2] = q[..., 0::2] * cos - q[..., 1::2] * sin
        out[..., 1::2] = q[..., 0::2] * sin + q[..., 1::2] * cos
        return out

    for b in range(d["L"]):
        p = f"vision_tower.encoder.blocks.{b}."
        h = _ln(t, w(p + "norm0.weight"), w(p + "norm0.bias"))
        qkv = (h @ w(p + "wqkv.weight").T + w(p + "wqkv.bias")).reshape(-1, 3, nh, hd)
        q, k, v = rope(qkv[:, 0]), rope(qkv[:, 1]), qkv[:, 2]
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        t = t + np.einsum("hqk,khd->qhd", s, v).reshape(-1, C) @ w(p + "wo.weight").T + w(p + "wo.bias")
        h = _ln(t, w(p + "norm1.weight"), w(p + "norm1.bias"))
        u = h @ w(p + "mlp.fc0.weight").T + w(p + "mlp.fc0.bias")
        u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        t = t + u @ w(p + "mlp.fc1.weight").T + w(p + "mlp.fc1.bias")
    t = _ln(t, w("vision_tower.encoder.final_layernorm.weight"), w("vision_tower.encoder.final_layernorm.bias"))
    m = t.reshape(gh // 2, 2, gw // 2, 2, C).transpose(0, 2, 1, 3, 4).reshape(-1, 4, C)
    m = _ln(m, w("mm_projector.pre_norm.weight"), w("mm_projector.pre_norm.bias")).reshape(m.shape[0], -1)
    m = m @ w("mm_projector.proj.0.weight").T + w("mm_projector.proj.0.bias")
    m = 0.5 * m * (1 + np.vectorize(math.erf)(m / math.sqrt(2)))
    return m @ w("mm_projector.proj.2.weight").T + w("mm_projector.proj.2.bias")


def mtmd_encode(text_gguf: Path, mmproj: Path, img: np.ndarray) -> np.ndarray:
    """Load the mmproj with libmtmd (paired with the text GGUF) and encode one RGB image."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mt

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), llama_cpp.llama_model_default_params())
    assert model, "text GGUF failed to load"
    ctx = bmp = chunks = None
    try:
        n_embd = llama_cpp.llama_model_n_embd(model)
        params = mt.mtmd_context_params_default()
        params.use_gpu = False
        params.warmup = False  # the warmup image is 1792² (in_patch_limit): pointless here
        params.n_threads = 2
        ctx = mt.mtmd_init_from_file(str(mmproj).encode(), model, params)
        assert ctx, "mtmd_init_from_file refused the mmproj"
        assert mt.mtmd_support_vision(ctx)
        H, W = img.shape[:2]
        bmp = mt.mtmd_bitmap_init(W, H, (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes()))
        chunks = mt.mtmd_input_chunks_init()
        marker = mt.mtmd_default_marker()
        text = mt.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        assert mt.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mt.mtmd_bitmap_p_ctypes * 1)(bmp), 1) == 0
        outs = []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) != mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue
            n = mt.mtmd_input_chunk_get_n_tokens(chunk)
            assert mt.mtmd_encode_chunk(ctx, chunk) == 0
            ptr = mt.mtmd_get_output_embd(ctx)
            outs.append(np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).reshape(n, n_embd).copy())
        assert len(outs) == 1
        return outs[0]
    finally:
        if chunks:
            mt.mtmd_input_chunks_free(chunks)
        if bmp:
            mt.mtmd_bitmap_free(bmp)
        if ctx:
            mt.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def text_gguf(k25: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text") / "text.gguf"
    result = CliRunner().invoke(main, ["quantize", str(k25.root), str(out), "--recipe", "f32", "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_llama_cpp_loads_and_encodes_like_moonvit(k25: Checkpoint, files: dict[str, Path], text_gguf: Path,
                                                   ftype: str) -> None:
    pytest.importorskip("llama_cpp.mtmd_cpp", reason="llama-cpp-python with libmtmd not installed")
    d = _dims(k25)
    # exactly the pos-emb grid, a multiple of patch×merge: mtmd neither resizes nor interpolates
    side = d["PH"] * d["P"]
    img = np.random.default_rng(7).integers(0, 256, size=(side, d["PW"] * d["P"], 3), dtype=np.uint8)
    want = moonvit_reference(k25, img)
    got = mtmd_encode(text_gguf, files[ftype], img)
    assert got.shape == want.shape == ((d["PH"] // 2) * (d["PW"] // 2), d["T"])
    # llama.cpp uses tanh-GELU in the projector (HF: erf) and F16 weights in the f16 file
    err = float(np.abs(got - want).max()) / float(np.abs(want).max())
    assert err < 5e-3, f"relative error {err:.2e}"


@pytest.mark.oracle
def test_unpermuted_wqkv_would_be_caught(k25: Checkpoint, text_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    """The encode comparison is sensitive to the permutation (guards the test itself)."""
    pytest.importorskip("llama_cpp.mtmd_cpp", reason="llama-cpp-python with libmtmd not installed")
    monkeypatch.setattr(mm, "split_rope_order", lambda rows, n_head: rows)
    bad = mm.write_mmproj(k25, tmp_path / "bad.gguf", "f32")
    monkeypatch.undo()
    d = _dims(k25)
    img = np.random.default_rng(7).integers(0, 256, size=(d["PH"] * d["P"], d["PW"] * d["P"], 3), dtype=np.uint8)
    want = moonvit_reference(k25, img)
    err = float(np.abs(mtmd_encode(text_gguf, bad, img) - want).max()) / float(np.abs(want).max())
    assert err > 5e-2


# ---- llama.cpp's own converter (opt-in: needs a llama.cpp source tree and torch) ----------------


@pytest.mark.oracle
@pytest.mark.slow
def test_same_bytes_as_llama_cpp_converter(k25: Checkpoint, files: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp's own converter (the tree vendored by llama-cpp-python, unpacked by ./setup.sh test,
    or K2CONV_LLAMA_CPP_SRC) writes the mmproj of the same checkpoint.

    The converter permutes wqkv with `num_attention_heads` (default 16, a key K2.5's raw config
    lacks), so a copy of config.json gets that spelling too. It reads the ViT width, depth and
    FFN size through transformers' config class, whose defaults are the real K2.5 sizes (1152,
    27, 4304) rather than the tiny checkpoint's; those three keys are therefore not compared
    (setting `num_hidden_layers` instead breaks its `mm.2` mapping, which only covers block ids
    below the block count). Tensor data must match byte for byte, other keys exactly.
    """
    default = Path(__file__).resolve().parent.parent / ".venv" / "llama.cpp-src"  # put there by ./setup.sh test
    src = os.environ.get("K2CONV_LLAMA_CPP_SRC") or (str(default) if (default / "convert_hf_to_gguf.py").exists() else "")
    if not src:
        pytest.skip("no llama.cpp source tree (./setup.sh test unpacks one; or set K2CONV_LLAMA_CPP_SRC)")
    pytest.importorskip("torch")
    import json

    ckpt = tmp_path / "ckpt"
    shutil.copytree(k25.root, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    vc = cfg["vision_config"]
    vc["num_attention_heads"] = vc["vt_num_attention_heads"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    for ftype in ("f16", "f32"):
        ref = tmp_path / f"ref-{ftype}.gguf"
        env = {**os.environ, "PYTHONPATH": str(Path(src) / "gguf-py")}
        run = subprocess.run([sys.executable, str(Path(src) / "convert_hf_to_gguf.py"), str(ckpt), "--mmproj",
                              "--outfile", str(ref), "--outtype", ftype], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        ours, theirs = GGUFReader(files[ftype]), GGUFReader(ref)
        a = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in ours.tensors}
        b = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in theirs.tensors}
        assert a == b
        skip = ("general.name", "general.size_label", "general.quantized_by", "general.source.", "general.k2conv.",
                "clip.vision.embedding_length", "clip.vision.block_count", "clip.vision.feed_forward_length")
        ka = {k: f.contents() for k, f in ours.fields.items() if not k.startswith(("GGUF.", *skip))}
        kb = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith(("GGUF.", *skip))}
        assert ka == kb
