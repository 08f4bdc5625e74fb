"""Kimi K2.5's vision tower and patch-merger projector as a llama.cpp mmproj GGUF.

llama.cpp keeps vision encoders out of the language GGUF: libmtmd (tools/mtmd/clip.cpp) loads a
second file, `general.architecture = "clip"`, whose `clip.projector_type = "kimik25"` selects the
MoonViT3d graph (tools/mtmd/models/kimik25.cpp). This module writes that file in the form
llama.cpp's own converter produces (conversion/kimivl.py `KimiK25Model` + `MmprojModel`), as
vendored by llama-cpp-python 0.3.36 (llama.cpp 0c1e5709):

* keys: the standard `clip.vision.*` set, the K2.5 extras (`clip.use_gelu`, projector scale factor,
  min/max pixels) and three u32 keys named literally `vision.pos_emb_{height,width,time}`;
* tensors: HF names → gguf-py's MMPROJ names (`v.blk.N.attn_qkv`, `mm.1`, `v.position_embd`, …);
* `wqkv`: the Q and K rows of every head go from MoonViT's interleaved 2-D RoPE order
  (x-pair, y-pair, x-pair, …) to split order (all x pairs, then all y pairs), because the
  runtime applies `build_rope_2d` (first half rotated by the column, second by the row);
* types: F16 for matrices (F32 with `ftype="f32"`), F32 for 1-D tensors and the position
  embedding, exactly as the converter's rules pick them.

One deliberate difference: the permutation uses the config's real head count. llama.cpp's
converter reads `num_attention_heads` with a default of 16, which K2.5's raw `vt_*` config does not
have; 16 happens to be K2.5's value, but any other head count would be permuted wrongly there.

Tensors are read one at a time (bounded memory: the largest, `mm_projector.proj.2`, is
7168 × 4608) and the file only appears under its final name after everything is fsynced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFType,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
)

from k2conv import __version__
from k2conv.atomic import commit, temp_path
from k2conv.convert.checkpoint import Checkpoint, to_f32
from k2conv.convert.config import ModelConfig
from k2conv.convert.hf_layout import VisionDims, vision_dims
from k2conv.errors import K2ConvError

ARCH = "clip"
# clip-impl.h PROJECTOR_TYPE_KIMIK25; gguf-py 0.19 predates it (no VisionProjectorType.KIMIK25).
PROJECTOR_TYPE = "kimik25"
# The llama.cpp that llama-cpp-python 0.3.36 bundles, against which this layout was checked.
CHECKED_AGAINST = "llama.cpp 0c1e5709 (vendored by llama-cpp-python 0.3.36)"

FTYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "f32": (LlamaFileType.ALL_F32, GGMLQuantizationType.F32),
    "f16": (LlamaFileType.MOSTLY_F16, GGMLQuantizationType.F16),
}
_NP_DTYPE = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}

# K2.5's image preprocessor (`preprocessor_config.json` → `media_proc_cfg`): used only when the
# checkpoint folder lacks the file, and reported as a plan note.
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
DEFAULT_IN_PATCH_LIMIT = 16384
MIN_PATCHES = 8  # llama.cpp's converter: image_min_pixels = 8 patches

# Transforms applied to a source tensor on its way into the GGUF.
COPY = "copy"
QKV_WEIGHT = "qkv_weight"
QKV_BIAS = "qkv_bias"


@dataclass(frozen=True)
class MmprojTensor:
    """One GGUF tensor: where it comes from, its numpy (row-major) shape and its GGML type."""

    name: str
    source: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    transform: str = COPY

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml's dimension order (innermost first), as llama.cpp reports shapes."""
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(_NP_DTYPE[self.qtype]).itemsize


@dataclass(frozen=True)
class MmprojKV:
    """One metadata key with its GGUF value type (the loader is strict about u32 vs i32, etc.)."""

    key: str
    value: Any
    vtype: GGUFValueType


@dataclass
class MmprojPlan:
    """Everything `write_mmproj` will write, computed from config + shard headers only."""

    out: Path
    ftype: str
    n_head: int
    kv: list[MmprojKV]
    tensors: list[MmprojTensor]
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Tensor data bytes (the file adds a few KiB of header and alignment)."""
        return sum(t.nbytes for t in self.tensors)

    def writer(self) -> GGUFWriter:
        """A GGUFWriter holding this plan's KV pairs and tensor infos (no file opened yet)."""
        writer = GGUFWriter(None, ARCH)
        for kv in self.kv:
            if kv.vtype == GGUFValueType.ARRAY:
                writer.add_array(kv.key, kv.value)
            else:
                writer.add_key_value(kv.key, kv.value, kv.vtype)
        for t in self.tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(_NP_DTYPE[t.qtype]), t.nbytes)
        return writer

    @property
    def file_size(self) -> int:
        """Exact size of the written file: serialized header, then 32-aligned tensor data."""
        from k2conv.convert.plan import pad, serialize_headers

        (header,) = serialize_headers(self.writer())
        return pad(len(header)) + sum(pad(t.nbytes) for t in self.tensors)

    def kv_dict(self) -> dict[str, Any]:
        return {kv.key: kv.value for kv in self.kv}

    def summary(self) -> str:
        """A few lines for `--dry-run` / logs."""
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.qtype.name] = by_type.get(t.qtype.name, 0) + t.nbytes
        types = ", ".join(f"{k} {v:,} B" for k, v in sorted(by_type.items()))
        lines = [f"  {self.out.name}: {self.file_size:,} bytes, {len(self.tensors)} tensors "
                 f"(vision projector, {self.ftype}: {types})"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- status -------------------------------------------------------------------------------------
def mmproj_status(cfg: ModelConfig) -> str:
    """Whether an mmproj can be written: a line starting "ok: …" or "skipped: <reason>".

    The bundled llama.cpp (0c1e5709) loads `kimik25` projectors, so the only reasons to skip are a
    checkpoint without a vision tower, or a vision config that llama.cpp's MoonViT3d graph cannot
    represent (the graph hard-codes these choices; writing a file anyway would load but compute
    the wrong thing).
    """
    if not cfg.vision:
        return f"skipped: {cfg.variant} is a text-only checkpoint (no vision_config, no vision_tower.* tensors)"
    problems = _unsupported(cfg)
    if problems:
        return "skipped: llama.cpp's kimik25 projector cannot represent this vision_config: " + "; ".join(problems)
    d = _dims(cfg)
    return (f"ok: kimik25 mmproj, {d.layers} ViT blocks × {d.hidden} wide, {d.heads} heads, "
            f"projector {d.mm_hidden * d.merge[0] * d.merge[1]} → {d.text_hidden}")


def _unsupported(cfg: ModelConfig) -> list[str]:
    """What in the vision config the kimik25 graph (tools/mtmd/models/kimik25.cpp) cannot do."""
    vc = cfg.vision or {}
    try:
        d = _dims(cfg)
    except K2ConvError as exc:
        return [str(exc)]
    out = []
    if d.hidden % d.heads:
        out.append(f"hidden size {d.hidden} is not a multiple of {d.heads} heads")
    elif (d.hidden // d.heads) % 4:
        out.append(f"head dim {d.hidden // d.heads} is not a multiple of 4 (2-D RoPE needs x/y pairs)")
    if d.merge[0] != d.merge[1] or d.merge[0] < 2:
        out.append(f"merge_kernel_size {list(d.merge)} (the graph merges square n×n, n ≥ 2)")
    if d.mm_hidden != d.hidden:
        out.append(f"mm_hidden_size {d.mm_hidden} differs from the ViT width {d.hidden}")
    if d.text_hidden != cfg.hidden_size:
        out.append(f"text_hidden_size {d.text_hidden} != the text model's hidden_size {cfg.hidden_size} "
                   "(libmtmd refuses a projector whose output width differs)")
    act = vc.get("projector_hidden_act", "gelu")
    if act != "gelu":
        # clip.use_gelu drives both the ViT MLP and the projector; MoonViT needs GELU.
        out.append(f"projector_hidden_act {act!r} (only gelu)")
    for key, want in (("merge_type", "sd2_tpool"), ("mm_projector_type", "patchmerger"),
                      ("pos_emb_type", "divided_fixed")):
        if vc.get(key, want) != want:
            out.append(f"{key} {vc.get(key)!r} (only {want!r})")
    return out


def _dims(cfg: ModelConfig) -> VisionDims:
    try:
        d = vision_dims(cfg)
    except KeyError as exc:
        raise K2ConvError(f"config.json: {exc.args[0]}") from None
    if d is None:
        raise K2ConvError(f"{cfg.variant}: checkpoint has no vision_config")
    return d


def default_mmproj_path(text_out: Path) -> Path:
    """`mmproj-<stem>.gguf` next to the text GGUF (llama.cpp's own naming: mmproj-<name>.gguf)."""
    return text_out.with_name(f"mmproj-{text_out.stem}.gguf")


# ---- plan ---------------------------------------------------------------------------------------
def _vget(vc: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key among the two spellings (raw `init_pos_emb_*`/`vt_*` or transformers')."""
    for k in keys:
        if k in vc and vc[k] is not None:
            return vc[k]
    return default


def _preprocessor(root: Path) -> dict[str, Any]:
    """preprocessor_config.json with `media_proc_cfg` lifted to the top (as llama.cpp does)."""
    path = root / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise K2ConvError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise K2ConvError(f"{path}: not a JSON object")
    if isinstance(data.get("media_proc_cfg"), dict):
        data = {**data, **data["media_proc_cfg"]}
    return data


def _triple(value: Any, name: str, where: Path) -> list[float]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise K2ConvError(f"{where}: {name} must be a list of 3 numbers, got {value!r}")
    return [float(v) for v in value]


def _tn(kind: MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    base = TENSOR_NAMES[kind]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def plan_mmproj(ckpt: Checkpoint, out: Path, ftype: str = "f16") -> MmprojPlan:
    """Keys, tensor names/shapes/types of the mmproj for `ckpt`; reads no tensor data.

    Raises K2ConvError (naming the reason) for text-only checkpoints, unsupported vision configs,
    and vision tensors that are missing or mis-shaped in the shards.
    """
    if ftype not in FTYPES:
        raise K2ConvError(f"mmproj ftype {ftype!r} is not supported (choose from {', '.join(FTYPES)})")
    cfg = ckpt.config
    status = mmproj_status(cfg)
    if not status.startswith("ok"):
        raise K2ConvError(f"{ckpt.root}: no mmproj: {status}")
    vc = cfg.vision or {}
    d = _dims(cfg)
    file_type, mat_type = FTYPES[ftype]
    qt_f32 = GGMLQuantizationType.F32
    notes: list[str] = []

    pre = _preprocessor(ckpt.root)
    pre_path = ckpt.root / "preprocessor_config.json"
    if "image_mean" in pre and "image_std" in pre:
        mean = _triple(pre["image_mean"], "image_mean", pre_path)
        std = _triple(pre["image_std"], "image_std", pre_path)
    else:
        mean, std = list(DEFAULT_IMAGE_MEAN), list(DEFAULT_IMAGE_STD)
        notes.append("preprocessor_config.json has no image_mean/image_std; wrote K2.5's 0.5/0.5")
    in_patch_limit = pre.get("in_patch_limit", DEFAULT_IN_PATCH_LIMIT)
    if not isinstance(in_patch_limit, int) or isinstance(in_patch_limit, bool) or in_patch_limit < MIN_PATCHES:
        raise K2ConvError(f"{pre_path}: in_patch_limit must be an integer ≥ {MIN_PATCHES}, got {in_patch_limit!r}")
    pos_t = _vget(vc, "init_pos_emb_time", "pos_emb_time", default=4)
    if not isinstance(pos_t, int) or isinstance(pos_t, bool) or pos_t < 1:
        raise K2ConvError(f"config.json: vision_config init_pos_emb_time must be a positive integer, got {pos_t!r}")
    eps = float(_vget(vc, "projector_ln_eps", default=1e-5))
    px = d.patch * d.patch

    U32, F32, BOOL, STR, ARR = (GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL,
                                GGUFValueType.STRING, GGUFValueType.ARRAY)
    CV = Keys.ClipVision
    kv = [
        MmprojKV(Keys.General.TYPE, GGUFType.MMPROJ, STR),
        MmprojKV(Keys.General.NAME, "Kimi-K2.5", STR),
        MmprojKV(Keys.General.QUANTIZED_BY, f"k2conv {__version__}", STR),
        MmprojKV("general.source.k2conv.checkpoint", ckpt.root.name, STR),
        MmprojKV("general.k2conv.version", __version__, STR),
        MmprojKV(Keys.General.FILE_TYPE, int(file_type), U32),
        MmprojKV(Keys.General.QUANTIZATION_VERSION, 2, U32),
        MmprojKV(Keys.Clip.HAS_VISION_ENCODER, True, BOOL),
        MmprojKV(CV.PROJECTION_DIM, d.text_hidden, U32),
        MmprojKV(CV.IMAGE_SIZE, d.pos_h * d.patch, U32),
        MmprojKV(CV.PATCH_SIZE, d.patch, U32),
        MmprojKV(CV.EMBEDDING_LENGTH, d.hidden, U32),
        MmprojKV(CV.FEED_FORWARD_LENGTH, d.intermediate, U32),
        MmprojKV(CV.BLOCK_COUNT, d.layers, U32),
        MmprojKV(CV.Attention.HEAD_COUNT, d.heads, U32),
        MmprojKV(CV.IMAGE_MEAN, mean, ARR),
        MmprojKV(CV.IMAGE_STD, std, ARR),
        MmprojKV(Keys.Clip.PROJECTOR_TYPE, PROJECTOR_TYPE, STR),
        MmprojKV("vision.pos_emb_height", d.pos_h, U32),
        MmprojKV("vision.pos_emb_width", d.pos_w, U32),
        MmprojKV("vision.pos_emb_time", pos_t, U32),
        MmprojKV(CV.USE_GELU, True, BOOL),
        MmprojKV(CV.Attention.LAYERNORM_EPS, eps, F32),
        MmprojKV(CV.Projector.SCALE_FACTOR, d.merge[0], U32),
        MmprojKV(CV.IMAGE_MIN_PIXELS, MIN_PATCHES * px, U32),
        MmprojKV(CV.IMAGE_MAX_PIXELS, in_patch_limit * px, U32),
    ]

    h, merged = d.hidden, d.mm_hidden * d.merge[0] * d.merge[1]
    T = MODEL_TENSOR
    vt, mm = "vision_tower.", "mm_projector."
    tensors = [
        MmprojTensor(_tn(T.V_ENC_EMBD_PATCH, "weight"), vt + "patch_embed.proj.weight", (h, 3, d.patch, d.patch), mat_type),
        MmprojTensor(_tn(T.V_ENC_EMBD_PATCH, "bias"), vt + "patch_embed.proj.bias", (h,), qt_f32),
        # kept 3-D: ne = (C, W, H) is what resize_position_embeddings_3d reads
        MmprojTensor(_tn(T.V_ENC_EMBD_POS, "weight"), vt + "patch_embed.pos_emb.weight", (d.pos_h, d.pos_w, h), qt_f32),
    ]
    for b in range(d.layers):
        src = f"{vt}encoder.blocks.{b}."
        for kind, module, rows, cols in (
            (T.V_ENC_ATTN_QKV, "wqkv", 3 * h, h),
            (T.V_ENC_ATTN_O, "wo", h, h),
            (T.V_ENC_FFN_UP, "mlp.fc0", d.intermediate, h),
            (T.V_ENC_FFN_DOWN, "mlp.fc1", h, d.intermediate),
        ):
            is_qkv = module == "wqkv"
            tensors.append(MmprojTensor(_tn(kind, "weight", b), src + module + ".weight", (rows, cols), mat_type,
                                        QKV_WEIGHT if is_qkv else COPY))
            tensors.append(MmprojTensor(_tn(kind, "bias", b), src + module + ".bias", (rows,), qt_f32,
                                        QKV_BIAS if is_qkv else COPY))
        for kind, norm in ((T.V_ENC_INPUT_NORM, "norm0"), (T.V_ENC_POST_ATTN_NORM, "norm1")):
            for suffix in ("weight", "bias"):
                tensors.append(MmprojTensor(_tn(kind, suffix, b), f"{src}{norm}.{suffix}", (h,), qt_f32))
    for suffix in ("weight", "bias"):
        tensors.append(MmprojTensor(_tn(T.V_POST_NORM, suffix), f"{vt}encoder.final_layernorm.{suffix}", (h,), qt_f32))
    for suffix in ("weight", "bias"):
        tensors.append(MmprojTensor(_tn(T.V_MM_INP_NORM, suffix), f"{mm}pre_norm.{suffix}", (d.mm_hidden,), qt_f32))
    mmproj = TENSOR_NAMES[T.V_MMPROJ]
    for idx, src_idx, rows in ((1, 0, merged), (2, 2, d.text_hidden)):
        tensors.append(MmprojTensor(mmproj.format(bid=idx) + ".weight", f"{mm}proj.{src_idx}.weight", (rows, merged), mat_type))
        tensors.append(MmprojTensor(mmproj.format(bid=idx) + ".bias", f"{mm}proj.{src_idx}.bias", (rows,), qt_f32))

    for t in tensors:
        entry = ckpt.entry(t.source)  # raises K2ConvError naming a missing tensor
        if tuple(entry.shape) != t.shape:
            raise K2ConvError(f"{ckpt.where(t.source)}: shape {list(entry.shape)}, the vision_config implies {list(t.shape)}")
        if entry.dtype not in ("BF16", "F16", "F32"):
            raise K2ConvError(f"{ckpt.where(t.source)}: dtype {entry.dtype}, expected BF16/F16/F32")
    return MmprojPlan(out=Path(out), ftype=ftype, n_head=d.heads, kv=kv, tensors=tensors, notes=notes)


# ---- transforms ---------------------------------------------------------------------------------
def split_rope_order(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of Q (or K) from MoonViT's interleaved 2-D RoPE layout to split layout.

    Per head of `hd` rows, MoonViT stores pairs (x0, y0, x1, y1, …): row 4i+2a+b is pair i of axis
    a (0 = column/x, 1 = row/y), component b. llama.cpp's `build_rope_2d` wants all x pairs then all
    y pairs: row a·hd/2 + 2i + b. Works for weights [rows, in] and biases [rows].
    """
    out_dim = rows.shape[0]
    hd = out_dim // n_head
    r = rows.reshape(n_head, hd // 4, 2, 2, *rows.shape[1:])
    return np.ascontiguousarray(np.swapaxes(r, 1, 2).reshape(rows.shape))


def _permute_qkv(x: np.ndarray, n_head: int) -> np.ndarray:
    third = x.shape[0] // 3
    q, k, v = x[:third], x[third:2 * third], x[2 * third:]
    return np.concatenate([split_rope_order(q, n_head), split_rope_order(k, n_head), v], axis=0)


def tensor_data(ckpt: Checkpoint, plan: MmprojPlan, t: MmprojTensor) -> np.ndarray:
    """The bytes of one planned tensor as a numpy array of its GGML type (F32 or F16)."""
    values = to_f32(ckpt.raw(t.source), ckpt.entry(t.source).dtype).reshape(t.shape)
    if not np.all(np.isfinite(values)):
        raise K2ConvError(f"{ckpt.where(t.source)}: contains NaN or Inf")
    if t.transform in (QKV_WEIGHT, QKV_BIAS):
        values = _permute_qkv(values, plan.n_head)
    dtype = _NP_DTYPE[t.qtype]
    if dtype is np.float16:
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        if peak > float(np.finfo(np.float16).max):
            raise K2ConvError(f"{ckpt.where(t.source)}: |value| {peak:g} overflows F16; use ftype f32")
    return np.ascontiguousarray(values.astype(dtype, copy=False))


# ---- write --------------------------------------------------------------------------------------
def write_mmproj(ckpt: Checkpoint, out: Path, ftype: str = "f16", *, force: bool = False,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Write the mmproj GGUF for `ckpt` to `out` (atomically) and return `out`.

    Streams one tensor at a time into `<out>.part`, fsyncs, renames. A failure leaves neither a
    new final file nor the temporary one behind. An existing `out` is replaced only with `force`.
    """
    out = Path(out)
    plan = plan_mmproj(ckpt, out, ftype)
    if out.exists() and not force:
        raise K2ConvError(f"{out}: exists (use --force to overwrite)")
    temp = temp_path(out)
    writer = plan.writer()
    try:
        writer.write_header_to_file(temp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan.tensors:
            writer.write_tensor_data(tensor_data(ckpt, plan, t))
            if progress is not None:
                progress(t.name)
        writer.close()
        commit(temp, out)
    except BaseException:
        writer.close()
        if temp.exists():
            os.unlink(temp)
        raise
    return out
