"""Synthetic checkpoints have exactly the real on-disk format (kimi-k2-checkpoints.md §1–§6)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from k2conv.convert import synth
from k2conv.convert.config import Fp8Scheme, Int4Scheme, load_config, parse_config
from k2conv.convert.dtypes import bf16_bits_to_f32
from k2conv.convert.hf_layout import checkpoint_tensors, logical_weights, stored_tensors, vision_tensors
from k2conv.convert.int4 import unpack_int4
from k2conv.errors import K2ConvError

VARIANTS = ["k2.5", "k2-thinking", "k2-instruct"]
SHARD_RE = {
    "k2-instruct": re.compile(r"model-([1-9]\d*)-of-([1-9]\d*)\.safetensors"),
    "k2.5": re.compile(r"model-(\d{5})-of-(\d{6})\.safetensors"),
    "k2-thinking": re.compile(r"model-(\d{5})-of-(\d{6})\.safetensors"),
}
_NP = {"BF16": np.uint16, "F32": np.float32, "I32": np.int32, "F8_E4M3": np.uint8}
_BYTES = {"BF16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


class _Shards:
    """Minimal independent reader of a checkpoint folder: headers + raw numpy views via the index."""

    def __init__(self, root: Path):
        self.root = root
        self.index = json.loads((root / "model.safetensors.index.json").read_text())
        self.headers = {p.name: _header(p) for p in root.glob("*.safetensors")}

    def entry(self, name: str) -> dict:
        return self.headers[self.index["weight_map"][name]][0][name]

    def array(self, name: str) -> np.ndarray:
        shard = self.index["weight_map"][name]
        header, base = self.headers[shard]
        e = header[name]
        a, b = e["data_offsets"]
        raw = np.fromfile(self.root / shard, dtype=np.uint8, count=b - a, offset=base + a)
        return raw.view(_NP[e["dtype"]]).reshape(e["shape"])


@pytest.fixture(params=VARIANTS)
def ckpt(request, synth_ckpt) -> tuple[str, Path]:
    return request.param, synth_ckpt(request.param)


def test_shard_names_and_index(ckpt):
    variant, root = ckpt
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    nums = [SHARD_RE[variant].fullmatch(s) for s in shards]
    assert all(nums), shards
    totals = {int(m.group(2)) for m in nums}
    assert totals == {len(shards)} and sorted(int(m.group(1)) for m in nums) == list(range(1, len(shards) + 1))
    assert len(shards) >= 3
    s = _Shards(root)
    assert set(s.index) == {"metadata", "weight_map"}
    in_files = {name: shard for shard, (h, _) in s.headers.items() for name in h if name != "__metadata__"}
    assert in_files == s.index["weight_map"]
    data = sum(max((e["data_offsets"][1] for k, e in h.items() if k != "__metadata__"), default=0)
               for h, _ in s.headers.values())
    assert s.index["metadata"]["total_size"] == data


def test_tensors_equal_hf_layout(ckpt):
    _, root = ckpt
    cfg = load_config(root)
    s = _Shards(root)
    expected = {t.name: (list(t.shape), t.dtype) for t in checkpoint_tensors(cfg)}
    actual = {n: (s.entry(n)["shape"], s.entry(n)["dtype"]) for n in s.index["weight_map"]}
    assert actual == expected
    assert s.index["metadata"]["total_size"] == sum(
        _BYTES[t.dtype] * int(np.prod(t.shape)) for t in checkpoint_tensors(cfg)
    )
    for h, _ in s.headers.values():
        assert h["__metadata__"] == {"format": "pt"}


def test_shards_are_byte_identical_to_safetensors_own_writer(ckpt):
    """Load every shard with safetensors and write it back with safetensors: same bytes."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save

    _, root = ckpt
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
            meta = f.metadata()
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        assert save(tensors, metadata=meta) == path.read_bytes(), path.name


def test_config_parses_to_the_variant(ckpt):
    variant, root = ckpt
    raw = json.loads((root / "config.json").read_text())
    cfg = parse_config(raw)
    assert cfg.variant == variant
    text = raw.get("text_config", raw)
    assert text["model_type"] == "kimi_k2" and text["architectures"] == ["DeepseekV3ForCausalLM"]
    n_base = cfg.vocab_size - 256
    assert (cfg.bos_token_id, cfg.eos_token_id) == (n_base, n_base + 1)
    ranks = (root / "tiktoken.model").read_text(encoding="utf-8").splitlines()
    assert len([r for r in ranks if r.strip()]) == n_base
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (root / name).is_file()
    if variant == "k2.5":
        assert raw["model_type"] == "kimi_k25" and "quantization_config" not in raw
        assert isinstance(cfg.quant, Int4Scheme) and cfg.tensor_prefix == "language_model."
        assert raw["pad_token_id"] == n_base + 255 and raw["media_placeholder_token_id"] == n_base + 21
        assert (text["rms_norm_eps"], text["rope_scaling"]["beta_fast"]) == (1e-5, 32.0)
        assert json.loads((root / "preprocessor_config.json").read_text())["k2conv_synthetic"] is True
    elif variant == "k2-thinking":
        assert "text_config" not in raw and isinstance(cfg.quant, Int4Scheme)
    else:
        assert isinstance(cfg.quant, Fp8Scheme) and cfg.quant.block == (128, 128)
        assert (cfg.rms_norm_eps, cfg.rope_scaling["beta_fast"], cfg.max_position_embeddings) == (1e-6, 1.0, 131072)


def test_quantized_payloads_look_like_the_real_ones(ckpt):
    variant, root = ckpt
    cfg = load_config(root)
    s = _Shards(root)
    for w in logical_weights(cfg):
        names = [t.name for t in stored_tensors(cfg, w)]
        if w.storage == "int4":
            packed, scale, shape = (s.array(n) for n in names)
            assert shape.tolist() == list(w.shape)
            q = unpack_int4(packed, w.shape[1])
            assert q.min() >= -7 and q.max() <= 7  # nibble 0 (q = -8) never occurs in K2 weights
            sc = bf16_bits_to_f32(scale)
            assert np.all(np.isfinite(sc)) and np.all(sc > 0)
        elif w.storage == "fp8":
            bits, sinv = s.array(names[0]), s.array(names[1])
            assert not np.any((bits & 0x7F) == 0x7F)
            assert np.all(np.isfinite(sinv)) and np.all(sinv > 0)
            assert np.abs(bits & 0x7F).max() == 0x7E
        elif w.suffix == "e_score_correction_bias":
            bias = s.array(names[0])
            assert bias.dtype == np.float32 and np.all(bias != 0) and np.abs(bias).max() <= 0.05
        else:
            x = bf16_bits_to_f32(s.array(names[0]))
            assert np.all(np.isfinite(x)) and np.any(x != 0)
    if variant != "k2-instruct":
        q = unpack_int4(s.array(f"{cfg.tensor_prefix}model.layers.1.mlp.experts.0.gate_proj.weight_packed"),
                        cfg.hidden_size)
        assert set(np.unique(q).tolist()) == set(range(-7, 8))


def test_shard_placement_imitates_the_real_files(ckpt):
    variant, root = ckpt
    cfg = load_config(root)
    wm = _Shards(root).index["weight_map"]
    n = len(set(wm.values()))
    p = cfg.tensor_prefix

    def shard_no(name: str) -> int:
        return int(SHARD_RE[variant].fullmatch(wm[name]).group(1))

    assert shard_no(f"{p}model.layers.0.mlp.gate_proj.weight") == 1
    if variant == "k2-instruct":
        assert shard_no("model.embed_tokens.weight") == 1
        assert shard_no("lm_head.weight") == shard_no("model.norm.weight") == n
    else:
        head = n - 2 if variant == "k2.5" else n
        assert shard_no(f"{p}model.embed_tokens.weight") == shard_no(f"{p}lm_head.weight") == head
    if variant == "k2.5":
        assert {shard_no(t.name) for t in vision_tensors(cfg) if t.name.startswith("mm_projector.")} == {n - 1}
        assert {shard_no(t.name) for t in vision_tensors(cfg) if t.name.startswith("vision_tower.")} == {n}
    layer1 = {wm[k] for k in wm if ".layers.1.mlp.experts." in k}
    assert len(layer1) == 2  # a MoE layer straddles two shards: readers must go through the index


def test_tiny_is_small(ckpt):
    _, root = ckpt
    assert sum(p.stat().st_size for p in root.iterdir()) < 50 * 2**20


def test_deterministic_given_seed(synth_ckpt, tmp_path):
    first = synth_ckpt("k2-thinking")
    again = synth.write_checkpoint(tmp_path / "again", "k2-thinking", "tiny", seed=0)
    for path in first.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = synth.write_checkpoint(tmp_path / "other", "k2-thinking", "tiny", seed=1)
    shard = next(first.glob("*.safetensors")).name
    assert (other / shard).read_bytes() != (first / shard).read_bytes()
    assert (other / "config.json").read_bytes() == (first / "config.json").read_bytes()


def test_existing_target_is_refused_unless_forced(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(K2ConvError, match="already exists"):
        synth.write_checkpoint(out, "k2-instruct", "tiny")
    assert (out / "keep.txt").exists()
    synth.write_checkpoint(out, "k2-instruct", "tiny", force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_shards", boom)
    with pytest.raises(RuntimeError):
        synth.write_checkpoint(tmp_path / "ck", "k2.5", "tiny")
    assert list(tmp_path.iterdir()) == []


def test_cli_synth(tmp_path):
    from k2conv.cli import main

    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["synth", str(out), "--variant", "k2-instruct", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    assert load_config(out).variant == "k2-instruct"
    again = CliRunner().invoke(main, ["synth", str(out), "--variant", "k2-instruct"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_slice_preset_has_true_k25_layer_shapes():
    """The slice preset is GBs, so it is only planned here: shapes of §4, size, shard count."""
    cfg = parse_config(synth.build_config("k2.5", "slice", n_base=2048))
    shapes = {t.name: t.shape for t in checkpoint_tensors(cfg)}
    p = "language_model.model.layers."
    assert shapes[p + "1.self_attn.q_b_proj.weight"] == (12288, 1536)
    assert shapes[p + "1.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert shapes[p + "1.self_attn.kv_b_proj.weight"] == (16384, 512)
    assert shapes[p + "0.mlp.down_proj.weight"] == (7168, 18432)
    assert shapes[p + "2.mlp.experts.15.up_proj.weight_packed"] == (2048, 896)
    assert shapes[p + "2.mlp.experts.15.up_proj.weight_scale"] == (2048, 224)
    assert shapes[p + "2.mlp.experts.15.down_proj.weight_packed"] == (7168, 256)
    assert shapes[p + "2.mlp.experts.15.down_proj.weight_scale"] == (7168, 64)
    assert shapes["vision_tower.encoder.blocks.1.wqkv.weight"] == (3456, 1152)
    assert shapes["mm_projector.proj.2.weight"] == (7168, 4608)
    total = sum(_BYTES[t.dtype] * int(np.prod(t.shape)) for t in checkpoint_tensors(cfg))
    assert 2.0e9 < total < 3.5e9
    n, placement = synth.shard_placement(cfg, list(shapes))
    assert n == 6 and set(placement.values()) == set(range(1, 7))


def test_k2_instruct_ships_inv_freq_buffers(synth_ckpt):
    root = synth_ckpt("k2-instruct")
    s = _Shards(root)
    names = [n for n in s.index["weight_map"] if n.endswith("rotary_emb.inv_freq")]
    cfg = load_config(root)
    assert len(names) == cfg.num_hidden_layers
    assert all(s.entry(n)["shape"] == [56] and s.entry(n)["dtype"] == "BF16" for n in names)
