"""Synthetic Kimi checkpoints in the exact on-disk format of the real ones (kimi-k2-checkpoints.md).

`write_checkpoint` produces config.json, the sharded safetensors files, the index, tokenizer files and
the small side files of K2.5, K2-Thinking or K2-Instruct, with the model shrunk to a preset. Names,
dtypes, shapes, storage encodings, shard naming and placement follow the real checkpoints, so every
reader and converter can be tested end to end without downloading 600 GB.

The weights make a model that behaves sanely in float32: activations stay O(1), logits spread over a
few units, and routing uses every expert. Each tensor (chunk) has its own random stream derived from
(seed, name, chunk), so the output is deterministic whatever the thread scheduling. Shards are written
streaming: the header is computed from the tensor list first and the data are written in place.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from k2conv.convert.config import ModelConfig, parse_config
from k2conv.convert.fp8 import quantize_fp8_block
from k2conv.convert.hf_layout import (
    FP8,
    INT4,
    K2_INSTRUCT_INV_FREQ_LEN,
    LogicalWeight,
    StoredTensor,
    logical_weights,
    stored_tensors,
    unused_tensors,
    vision_tensors,
)
from k2conv.convert.int4 import pack_int4
from k2conv.errors import K2ConvError

SYNTH_VARIANTS = ("k2.5", "k2-thinking", "k2-instruct")
PRESETS = ("tiny", "slice")
N_RESERVED = 256  # special-token ids n_base … n_base+255 follow the base vocabulary

# Per-layer text dimensions. `slice` has the true K2.5 per-layer sizes, few layers and experts.
_TEXT_DIMS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "num_attention_heads": 4,
        "q_lora_rank": 256,
        "kv_lora_rank": 256,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
    },
    "slice": {
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "num_attention_heads": 64,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
    },
}

# K2.5 vision tower: few blocks; `slice` keeps MoonViT's real widths.
_VISION_DIMS: dict[str, dict[str, int]] = {
    "tiny": {"vt_hidden_size": 128, "vt_intermediate_size": 464, "vt_num_attention_heads": 4,
             "vt_num_hidden_layers": 2, "init_pos_emb_height": 8, "init_pos_emb_width": 8},
    "slice": {"vt_hidden_size": 1152, "vt_intermediate_size": 4304, "vt_num_attention_heads": 16,
              "vt_num_hidden_layers": 2, "init_pos_emb_height": 64, "init_pos_emb_width": 64},
}

_CHUNK_ELEMS = 1 << 22  # values generated per random draw: bounds memory (~16 MB of float32 per chunk)
_Q_STD = float(np.sqrt(4.0 + 80.0 / 12.0))  # std of the synthetic INT4 q (sum of two uniform ints)
_DTYPE_BYTES = {"F32": 4, "I32": 4, "BF16": 2, "F8_E4M3": 1}
# safetensors orders data by dtype (its enum, descending), then by name.
_DTYPE_RANK = {"F32": 4, "I32": 3, "BF16": 2, "F8_E4M3": 1}


# ---- configs ------------------------------------------------------------------------------------


def _int4_quantization_config() -> dict[str, Any]:
    """K2-Thinking / K2.5 compressed-tensors config, verbatim from the real files (§3)."""
    weights = {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
        "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "actorder": None,
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                        "weights": weights},
        },
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    }


_FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]}


def _rope_scaling(factor: float, beta_fast: float) -> dict[str, Any]:
    return {"beta_fast": beta_fast, "beta_slow": 1.0, "factor": factor, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}


def _text_config(variant: str, preset: str, n_base: int) -> dict[str, Any]:
    """The DeepSeek-V3 text config: K2-Instruct's raw keys (§2b); K2.5 / Thinking differences (§2a)."""
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "bos_token_id": n_base,
        "eos_token_id": n_base + 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "kimi_k2",
        "moe_layer_freq": 1,
        "n_group": 1,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": n_base + N_RESERVED,
        **_TEXT_DIMS[preset],
    }
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if variant == "k2-instruct":
        cfg.update(max_position_embeddings=131072, rope_scaling=_rope_scaling(32.0, 1.0), rms_norm_eps=1e-6,
                   quantization_config=_FP8_QUANTIZATION_CONFIG, transformers_version="4.48.3")
    elif variant == "k2-thinking":  # context/rope/eps UNCONFIRMED in the reference: taken as 0905's
        cfg.update(max_position_embeddings=262144, rope_scaling=_rope_scaling(64.0, 1.0), rms_norm_eps=1e-6,
                   quantization_config=_int4_quantization_config())
    else:
        cfg.update(max_position_embeddings=262144, rope_scaling=_rope_scaling(64.0, 32.0), rms_norm_eps=1e-5,
                   quantization_config=_int4_quantization_config(), ep_size=1, pad_token_id=n_base + 255)
    return cfg


def _vision_config(preset: str, text_hidden: int) -> dict[str, Any]:
    """K2.5 `vision_config` with the raw key spellings of the real file (§2a), widths per preset."""
    dims = _VISION_DIMS[preset]
    return {
        "patch_size": 14,
        "init_pos_emb_time": 4,
        "pos_emb_type": "divided_fixed",
        "merge_kernel_size": [2, 2],
        "merge_type": "sd2_tpool",
        "video_attn_type": "spatial_temporal",
        "mm_projector_type": "patchmerger",
        "mm_hidden_size": dims["vt_hidden_size"],
        "projector_hidden_act": "gelu",
        "projector_ln_eps": 1e-05,
        "text_hidden_size": text_hidden,
        **dims,
    }


def build_config(variant: str, preset: str, n_base: int) -> dict[str, Any]:
    """config.json of a synthetic checkpoint: K2.5 wraps the text config, the others are flat."""
    text = _text_config(variant, preset, n_base)
    if variant != "k2.5":
        return text
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_k25.KimiK25Config",
            "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
        },
        "bos_token_id": n_base,
        "eos_token_id": n_base + 1,
        "pad_token_id": n_base + 255,
        "media_placeholder_token_id": n_base + 21,
        "ignore_index": -100,
        "model_type": "kimi_k25",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_unified_vision_chunk": True,
        "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "vision_config": _vision_config(preset, text["hidden_size"]),
    }


def _generation_config(cfg: ModelConfig, n_base: int) -> dict[str, Any]:
    """generation_config.json (4 lines in K2-Thinking; contents UNCONFIRMED): stop at <|im_end|>."""
    return {"max_length": cfg.max_position_embeddings, "eos_token_id": n_base + 2}


def _preprocessor_config(cfg: ModelConfig) -> dict[str, Any]:
    """K2.5 image/video preprocessor settings: plausible, not copied from the real (unseen) file."""
    vc = cfg.vision or {}
    return {
        "k2conv_synthetic": True,
        "image_processor_type": "KimiK25ImageProcessor",
        "patch_size": vc.get("patch_size", 14),
        "merge_kernel_size": vc.get("merge_kernel_size", [2, 2]),
        "in_patch_limit": 16384,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
    }


# ---- shard placement ----------------------------------------------------------------------------


def shard_file_name(variant: str, index: int, total: int) -> str:
    """K2-Instruct: `model-1-of-61`; the others: 5-digit index, 6-digit total (`model-00001-of-000064`)."""
    if variant == "k2-instruct":
        return f"model-{index}-of-{total}.safetensors"
    return f"model-{index:05d}-of-{total:06d}.safetensors"


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def _expert_of(name: str) -> int | None:
    parts = name.split(".")
    if "experts" in parts:
        return int(parts[parts.index("experts") + 1])
    return None


def shard_placement(cfg: ModelConfig, names: list[str]) -> tuple[int, dict[str, int]]:
    """(number of shards, tensor name → 1-based shard) imitating the real files (§1 "Shard placement").

    One shard per layer; the last quarter of a MoE layer's experts spills into the next layer's shard
    (real shard boundaries are by size, so layers straddle files). K2.5/Thinking put embed, final norm
    and lm_head in the shard after the layers, K2.5 then the projector and the vision tower in the
    last two; K2-Instruct keeps embed in shard 1 and lm_head + norm in the last layer's shard.
    """
    n_layers = cfg.num_hidden_layers
    instruct = cfg.variant == "k2-instruct"
    tail = n_layers + 1
    total = n_layers if instruct else tail + (2 if cfg.vision else 0)
    placement: dict[str, int] = {}
    for name in names:
        layer = _layer_of(name)
        if name.startswith("mm_projector."):
            shard = tail + 1
        elif name.startswith("vision_tower."):
            shard = tail + 2
        elif layer is not None:
            shard = layer + 1
            expert = _expert_of(name)
            if expert is not None and layer + 1 < n_layers and expert >= cfg.n_routed_experts * 3 // 4:
                shard += 1
        elif instruct:
            shard = 1 if "embed_tokens" in name else n_layers
        else:
            shard = tail
        placement[name] = shard
    return total, placement


# ---- safetensors writing --------------------------------------------------------------------------


class ShardWriter:
    """A safetensors file whose header is fixed up front, so tensor data can be written in any order.

    Layout as the safetensors library writes it: 8-byte little-endian header length, compact JSON
    header (`__metadata__` first, then tensors in data order) padded with spaces to 8 bytes, data
    ordered by dtype then name. Writes are positional (pwrite) and thread-safe.
    """

    def __init__(self, path: Path, tensors: list[StoredTensor]):
        self.path = path
        order = sorted(tensors, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._spans: dict[str, tuple[int, int]] = {}
        pos = 0
        for t in order:
            size = _DTYPE_BYTES[t.dtype] * int(np.prod(t.shape, dtype=np.int64))
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + size]}
            self._spans[t.name] = (pos, size)
            pos += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._base = 8 + len(blob)
        self.data_size = pos
        self._written = dict.fromkeys(self._spans, 0)
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, len(blob).to_bytes(8, "little") + blob)
        os.ftruncate(self._fd, self._base + pos)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Write `data` (C order, the tensor's dtype) at byte `start` inside tensor `name`."""
        offset, size = self._spans[name]
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        if start + buf.nbytes > size:
            raise AssertionError(f"{name}: write past the end of the tensor")
        done = 0
        while done < buf.nbytes:
            done += os.pwrite(self._fd, buf[done:], self._base + offset + start + done)
        with self._lock:
            self._written[name] += buf.nbytes

    def close(self) -> None:
        """Check every byte of every tensor was written (no fsync: synthetic data, the page cache may keep it)."""
        missing = [n for n, (_, size) in self._spans.items() if self._written[n] != size]
        try:
            if missing:
                raise AssertionError(f"{self.path.name}: tensors not fully written: {missing[:5]}")
        finally:
            os.close(self._fd)


# ---- value generation ------------------------------------------------------------------------------


def _rng(seed: int, name: str, chunk: int = 0) -> np.random.Generator:
    """An independent stream per (seed, tensor, chunk): output does not depend on generation order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), chunk])


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, round-to-nearest-even, reusing `x` as scratch (finite values only)."""
    u = x.view(np.uint32)
    bias = (u >> 16) & 1
    bias += 0x7FFF
    u += bias
    u >>= 16
    return u.astype(np.uint16)


def _row_chunks(rows: int, cols: int, multiple: int = 1) -> Iterator[tuple[int, int, int]]:
    """(chunk index, first row, end row) covering `rows`, ~_CHUNK_ELEMS values each."""
    step = max(multiple, (_CHUNK_ELEMS // max(cols, 1)) // multiple * multiple)
    for i, r0 in enumerate(range(0, rows, step)):
        yield i, r0, min(rows, r0 + step)


@dataclass(frozen=True)
class Init:
    """Distribution of one plain tensor: mean + std·N(0,1), or uniform in ±`uniform` when set."""

    mean: float = 0.0
    std: float = 0.0
    uniform: float = 0.0


def _fan_in_std(shape: tuple[int, ...], gain: float = 1.0) -> float:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return gain / float(np.sqrt(fan_in))


def init_for(name: str, shape: tuple[int, ...], hidden: int) -> Init:
    """How a tensor is drawn so the float32 model is well-behaved (see module docstring)."""
    if name.endswith("e_score_correction_bias"):
        return Init(uniform=0.05)
    if "norm" in name.rsplit(".", 2)[-2]:  # RMSNorm / LayerNorm weight (≈1) or LayerNorm bias (≈0)
        return Init(mean=1.0, std=0.05) if name.endswith("weight") else Init(std=0.02)
    if name.endswith("bias"):
        return Init(std=0.02)
    if name.endswith("embed_tokens.weight"):
        return Init(std=1.0)
    if name.endswith("lm_head.weight"):
        return Init(std=3.0 / float(np.sqrt(hidden)))
    if name.endswith("pos_emb.weight"):
        return Init(std=0.02)
    if name.endswith(("o_proj.weight", "down_proj.weight", ".wo.weight", "fc1.weight")):
        return Init(std=_fan_in_std(shape, 0.7))
    return Init(std=_fan_in_std(shape))


def _draw(rng: np.random.Generator, n: int, init: Init) -> np.ndarray:
    if init.uniform:
        return rng.uniform(-init.uniform, init.uniform, n).astype(np.float32)
    x = rng.standard_normal(n, dtype=np.float32)
    if init.std != 1.0:
        x *= np.float32(init.std)
    if init.mean:
        x += np.float32(init.mean)
    return x


def _write_plain(w: ShardWriter, st: StoredTensor, init: Init, seed: int) -> None:
    """A BF16 or F32 tensor drawn from `init`, in row chunks."""
    rows = st.shape[0] if st.shape else 1
    cols = int(np.prod(st.shape[1:])) if len(st.shape) > 1 else 1
    itemsize = _DTYPE_BYTES[st.dtype]
    for chunk, r0, r1 in _row_chunks(rows, cols):
        x = _draw(_rng(seed, st.name, chunk), (r1 - r0) * cols, init)
        w.write(st.name, r0 * cols * itemsize, _bf16(x) if st.dtype == "BF16" else x)


def _write_int4(w: ShardWriter, parts: list[StoredTensor], rows: int, cols: int, std: float, seed: int) -> None:
    """packed / scale / shape of one INT4 linear: q in [-7, 7] (bell-shaped), bf16 scales ≈ std/σ_q."""
    packed, scale, shape = parts
    for chunk, r0, r1 in _row_chunks(rows, cols):
        rng = _rng(seed, packed.name, chunk)
        q = rng.integers(-3, 4, (r1 - r0, cols), dtype=np.int8)
        q += rng.integers(-4, 5, (r1 - r0, cols), dtype=np.int8)
        w.write(packed.name, r0 * packed.shape[1] * 4, pack_int4(q))
    groups = scale.shape[1]
    noise = _rng(seed, scale.name).standard_normal(rows * groups, dtype=np.float32)
    s = np.exp(np.float32(0.2) * noise) * np.float32(std / _Q_STD)
    w.write(scale.name, 0, _bf16(s.astype(np.float32)))
    w.write(shape.name, 0, np.array([rows, cols], dtype=np.int32))


def _write_fp8(w: ShardWriter, parts: list[StoredTensor], rows: int, cols: int, std: float, seed: int,
               block: tuple[int, int]) -> None:
    """e4m3 bits + float32 block scales of one FP8 linear, quantized from a normal draw."""
    weight, scale = parts
    br = block[0]
    for chunk, r0, r1 in _row_chunks(rows, cols, multiple=br):
        x = _draw(_rng(seed, weight.name, chunk), (r1 - r0) * cols, Init(std=std)).reshape(r1 - r0, cols)
        bits, s = quantize_fp8_block(x, block)
        w.write(weight.name, r0 * cols, bits)
        w.write(scale.name, (r0 // br) * scale.shape[1] * 4, s)


def _inv_freq(n: int, theta: float) -> np.ndarray:
    """A rotary inv_freq buffer of n values (θ^(-2i/2n)); only present because K2-Instruct ships one."""
    return (theta ** (-np.arange(0, 2 * n, 2, dtype=np.float64) / (2 * n))).astype(np.float32)


# ---- the checkpoint ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """Writes the stored tensors of one logical weight (or one extra tensor) into one shard."""

    shard: int
    size: int
    run: Callable[[ShardWriter], None]


def _jobs(cfg: ModelConfig, placement: dict[str, int], seed: int) -> list[_Job]:
    jobs: list[_Job] = []
    h = cfg.hidden_size

    def nbytes(parts: list[StoredTensor]) -> int:
        return sum(_DTYPE_BYTES[p.dtype] * int(np.prod(p.shape)) for p in parts)

    for lw in logical_weights(cfg):
        parts = stored_tensors(cfg, lw)
        shards = {placement[p.name] for p in parts}
        assert len(shards) == 1, f"{lw.name} split across shards"
        jobs.append(_Job(shards.pop(), nbytes(parts), _logical_job(cfg, lw, parts, seed)))
    for st in vision_tensors(cfg):
        init = init_for(st.name, st.shape, h)
        jobs.append(_Job(placement[st.name], nbytes([st]),
                         lambda w, st=st, init=init: _write_plain(w, st, init, seed)))
    for st in unused_tensors(cfg):
        values = _bf16(_inv_freq(K2_INSTRUCT_INV_FREQ_LEN, cfg.rope_theta))
        jobs.append(_Job(placement[st.name], nbytes([st]), lambda w, st=st, v=values: w.write(st.name, 0, v)))
    return jobs


def _logical_job(cfg: ModelConfig, lw: LogicalWeight, parts: list[StoredTensor], seed: int
                 ) -> Callable[[ShardWriter], None]:
    init = init_for(parts[0].name if lw.storage != INT4 else lw.name, lw.shape, cfg.hidden_size)
    if lw.storage == INT4:
        rows, cols = lw.shape
        return lambda w: _write_int4(w, parts, rows, cols, init.std, seed)
    if lw.storage == FP8:
        rows, cols = lw.shape
        block = cfg.quant.block  # type: ignore[union-attr]
        return lambda w: _write_fp8(w, parts, rows, cols, init.std, seed, block)
    return lambda w: _write_plain(w, parts[0], init, seed)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise K2ConvError(f"{out_dir}: already exists (use --force to replace it)")
    if not out_dir.parent.exists():
        out_dir.parent.mkdir(parents=True)


def _install(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder under its final name; an old one (force) is removed only afterwards."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _write_shards(tmp: Path, cfg: ModelConfig, variant: str, seed: int, workers: int) -> dict[str, Any]:
    """All safetensors shards (streamed) and the index; returns the index contents."""
    tensors = [st for w in logical_weights(cfg) for st in stored_tensors(cfg, w)]
    tensors += unused_tensors(cfg) + vision_tensors(cfg)
    total, placement = shard_placement(cfg, [t.name for t in tensors])
    jobs = _jobs(cfg, placement, seed)
    weight_map: dict[str, str] = {}
    total_size = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for shard in range(1, total + 1):
            name = shard_file_name(variant, shard, total)
            members = [t for t in tensors if placement[t.name] == shard]
            writer = ShardWriter(tmp / name, members)
            mine = sorted((j for j in jobs if j.shard == shard), key=lambda j: -j.size)  # big first
            for future in [pool.submit(j.run, writer) for j in mine]:
                future.result()
            writer.close()
            total_size += writer.data_size
            weight_map.update(dict.fromkeys((t.name for t in members), name))
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


def write_checkpoint(out_dir: Path, variant: str, preset: str, seed: int = 0, force: bool = False) -> Path:
    """Write a synthetic `variant` checkpoint of size `preset` to `out_dir` and return its path.

    Built in a hidden sibling folder and renamed at the end, so `out_dir` never holds a partial
    checkpoint. An existing non-empty `out_dir` is refused unless `force`.
    """
    from k2conv.convert.kimi_tokenizer_files import write_tokenizer_files

    if variant not in SYNTH_VARIANTS:
        raise K2ConvError(f"synth: unknown variant {variant!r} (choose from {', '.join(SYNTH_VARIANTS)})")
    if preset not in PRESETS:
        raise K2ConvError(f"synth: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    out_dir = Path(out_dir)
    _prepare_target(out_dir, force)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        n_base = write_tokenizer_files(tmp, variant)
        raw = build_config(variant, preset, n_base)
        cfg = parse_config(raw, "synthetic config.json")
        _write_json(tmp / "config.json", raw)
        _write_json(tmp / "generation_config.json", _generation_config(cfg, n_base))
        if variant == "k2.5":
            _write_json(tmp / "preprocessor_config.json", _preprocessor_config(cfg))
        workers = max(1, min(4, os.cpu_count() or 1))
        index = _write_shards(tmp, cfg, variant, seed, workers)
        _write_json(tmp / "model.safetensors.index.json", index)
        (tmp / "README.md").write_text(
            f"# Synthetic {variant} checkpoint ({preset})\n\nWritten by `k2conv synth` with seed {seed}: random "
            "weights in the real on-disk format of the variant. Not a trained model.\n",
            encoding="utf-8",
        )
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
