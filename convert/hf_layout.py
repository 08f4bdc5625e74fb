"""What a Kimi checkpoint must contain: every HF tensor name, shape and dtype, from the config.

The synthetic-checkpoint writer produces exactly this list and the reader checks real files against
it, so both sides agree on one description of the on-disk format (kimi-k2-checkpoints.md §3–§6).
A "linear" is a logical [out, in] matrix; how it is stored (BF16, INT4 pack-quantized triple, or FP8 +
block scales) depends on the variant and on which module it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2conv.convert.config import Fp8Scheme, Int4Scheme, ModelConfig, ceil_div
from k2conv.errors import K2ConvError

# Storage kinds of one logical weight.
PLAIN = "plain"  # one tensor `<name>.weight` (or a bias/norm) in its own dtype
INT4 = "int4"  # `<name>.weight_packed` int32, `.weight_scale` bf16, `.weight_shape` int32[2]
FP8 = "fp8"  # `<name>.weight` F8_E4M3 + `.weight_scale_inv` float32 blocks


@dataclass(frozen=True)
class LogicalWeight:
    """One logical tensor of the model, before storage encoding.

    `module` is the HF module path without prefix and without `.weight`
    (e.g. `model.layers.3.mlp.experts.7.down_proj`); `suffix` is `weight`, `bias` or
    `e_score_correction_bias`; `shape` is the logical (dequantized) shape.
    """

    module: str
    suffix: str
    shape: tuple[int, ...]
    storage: str
    dtype: str  # dtype of the stored tensor when PLAIN ("BF16" / "F32")

    @property
    def name(self) -> str:
        return f"{self.module}.{self.suffix}"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as it sits in a safetensors file."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _linear_storage(cfg: ModelConfig, module: str) -> str:
    """Which modules the shipped checkpoints quantize (ignore lists of the real configs)."""
    if isinstance(cfg.quant, Int4Scheme):
        return INT4 if ".mlp.experts." in module else PLAIN
    if isinstance(cfg.quant, Fp8Scheme):
        if module.endswith(("embed_tokens", "lm_head")) or module.endswith(".mlp.gate"):
            return PLAIN
        return FP8
    return PLAIN


def logical_weights(cfg: ModelConfig) -> list[LogicalWeight]:
    """Every text-model weight in the order the HF modeling code declares them."""
    out: list[LogicalWeight] = []

    def linear(module: str, rows: int, cols: int) -> None:
        out.append(LogicalWeight(module, "weight", (rows, cols), _linear_storage(cfg, module), "BF16"))

    def norm(module: str, size: int) -> None:
        out.append(LogicalWeight(module, "weight", (size,), PLAIN, "BF16"))

    h = cfg.hidden_size
    nh = cfg.num_attention_heads
    linear("model.embed_tokens", cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        norm(f"{p}.input_layernorm", h)
        if cfg.q_lora_rank:
            linear(f"{p}.self_attn.q_a_proj", cfg.q_lora_rank, h)
            norm(f"{p}.self_attn.q_a_layernorm", cfg.q_lora_rank)
            linear(f"{p}.self_attn.q_b_proj", nh * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            linear(f"{p}.self_attn.q_proj", nh * cfg.qk_head_dim, h)
        linear(f"{p}.self_attn.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        norm(f"{p}.self_attn.kv_a_layernorm", cfg.kv_lora_rank)
        linear(f"{p}.self_attn.kv_b_proj", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        linear(f"{p}.self_attn.o_proj", h, nh * cfg.v_head_dim)
        norm(f"{p}.post_attention_layernorm", h)
        if cfg.is_moe_layer(layer):
            e_inter = cfg.moe_intermediate_size
            out.append(LogicalWeight(f"{p}.mlp.gate", "weight", (cfg.n_routed_experts, h), PLAIN, "BF16"))
            if cfg.scoring_func == "sigmoid":
                out.append(
                    LogicalWeight(f"{p}.mlp.gate", "e_score_correction_bias", (cfg.n_routed_experts,), PLAIN, "F32")
                )
            for e in range(cfg.n_routed_experts):
                linear(f"{p}.mlp.experts.{e}.gate_proj", e_inter, h)
                linear(f"{p}.mlp.experts.{e}.up_proj", e_inter, h)
                linear(f"{p}.mlp.experts.{e}.down_proj", h, e_inter)
            if cfg.n_shared_experts:
                s_inter = e_inter * cfg.n_shared_experts
                linear(f"{p}.mlp.shared_experts.gate_proj", s_inter, h)
                linear(f"{p}.mlp.shared_experts.up_proj", s_inter, h)
                linear(f"{p}.mlp.shared_experts.down_proj", h, s_inter)
        else:
            linear(f"{p}.mlp.gate_proj", cfg.intermediate_size, h)
            linear(f"{p}.mlp.up_proj", cfg.intermediate_size, h)
            linear(f"{p}.mlp.down_proj", h, cfg.intermediate_size)
    norm("model.norm", h)
    if not cfg.tie_word_embeddings:
        linear("lm_head", cfg.vocab_size, h)
    return out


def stored_tensors(cfg: ModelConfig, w: LogicalWeight) -> list[StoredTensor]:
    """The safetensors entries (with the variant's name prefix) that hold one logical weight."""
    base = cfg.tensor_prefix + w.module
    if w.storage == PLAIN:
        return [StoredTensor(f"{base}.{w.suffix}", w.shape, w.dtype)]
    rows, cols = w.shape
    if w.storage == INT4:
        assert isinstance(cfg.quant, Int4Scheme)
        return [
            StoredTensor(f"{base}.weight_packed", (rows, ceil_div(cols, 8)), "I32"),
            StoredTensor(f"{base}.weight_scale", (rows, ceil_div(cols, cfg.quant.group_size)), "BF16"),
            StoredTensor(f"{base}.weight_shape", (2,), "I32"),
        ]
    assert isinstance(cfg.quant, Fp8Scheme)
    br, bc = cfg.quant.block
    return [
        StoredTensor(f"{base}.weight", (rows, cols), "F8_E4M3"),
        StoredTensor(f"{base}.weight_scale_inv", (ceil_div(rows, br), ceil_div(cols, bc)), "F32"),
    ]


# ---- tensors outside the text model ------------------------------------------------------------

# K2-Instruct stores a bf16 `rotary_emb.inv_freq` of 56 values in every layer ([DUMP-K2I]: 61 tensors,
# 6.67 KB). 56 is not qk_rope_head_dim/2, so the length is kept literally; loaders skip these.
K2_INSTRUCT_INV_FREQ_LEN = 56


def unused_tensors(cfg: ModelConfig) -> list[StoredTensor]:
    """Tensors the real checkpoints ship that no converter reads (K2-Instruct's rotary buffers)."""
    if cfg.variant != "k2-instruct":
        return []
    return [
        StoredTensor(f"{cfg.tensor_prefix}model.layers.{i}.self_attn.rotary_emb.inv_freq", (K2_INSTRUCT_INV_FREQ_LEN,), "BF16")
        for i in range(cfg.num_hidden_layers)
    ]


@dataclass(frozen=True)
class VisionDims:
    """MoonViT + patch-merger projector sizes from K2.5's `vision_config` (either key spelling)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    patch: int
    pos_h: int
    pos_w: int
    merge: tuple[int, int]
    mm_hidden: int
    text_hidden: int


def vision_dims(cfg: ModelConfig) -> VisionDims | None:
    """The vision tower's sizes, or None for text-only variants."""
    vc = cfg.vision
    if not vc:
        return None

    def get(*keys: str, default: int | None = None) -> int:
        for k in keys:
            if isinstance(vc.get(k), int):
                return int(vc[k])
        if default is None:
            raise K2ConvError(f"config.json: vision_config lacks {keys[0]!r}")
        return default

    hidden = get("vt_hidden_size", "hidden_size")
    merge = vc.get("merge_kernel_size") or [2, 2]
    return VisionDims(
        hidden=hidden,
        intermediate=get("vt_intermediate_size", "intermediate_size"),
        layers=get("vt_num_hidden_layers", "num_hidden_layers"),
        heads=get("vt_num_attention_heads", "num_attention_heads"),
        patch=get("patch_size"),
        pos_h=get("init_pos_emb_height", "pos_emb_height"),
        pos_w=get("init_pos_emb_width", "pos_emb_width"),
        merge=(int(merge[0]), int(merge[1])),
        mm_hidden=get("mm_hidden_size", default=hidden),
        text_hidden=get("text_hidden_size", default=cfg.hidden_size),
    )


def vision_tensors(cfg: ModelConfig) -> list[StoredTensor]:
    """K2.5's `vision_tower.*` and `mm_projector.*` tensors (all BF16; §4 table), [] for text-only."""
    d = vision_dims(cfg)
    if d is None:
        return []
    h = d.hidden
    out = [
        StoredTensor("vision_tower.patch_embed.proj.weight", (h, 3, d.patch, d.patch), "BF16"),
        StoredTensor("vision_tower.patch_embed.proj.bias", (h,), "BF16"),
        StoredTensor("vision_tower.patch_embed.pos_emb.weight", (d.pos_h, d.pos_w, h), "BF16"),
    ]
    for b in range(d.layers):
        p = f"vision_tower.encoder.blocks.{b}"
        for module, rows, cols in (
            ("wqkv", 3 * h, h),
            ("wo", h, h),
            ("mlp.fc0", d.intermediate, h),
            ("mlp.fc1", h, d.intermediate),
        ):
            out.append(StoredTensor(f"{p}.{module}.weight", (rows, cols), "BF16"))
            out.append(StoredTensor(f"{p}.{module}.bias", (rows,), "BF16"))
        for norm in ("norm0", "norm1"):
            out.append(StoredTensor(f"{p}.{norm}.weight", (h,), "BF16"))
            out.append(StoredTensor(f"{p}.{norm}.bias", (h,), "BF16"))
    out.append(StoredTensor("vision_tower.encoder.final_layernorm.weight", (h,), "BF16"))
    out.append(StoredTensor("vision_tower.encoder.final_layernorm.bias", (h,), "BF16"))
    merged = d.mm_hidden * d.merge[0] * d.merge[1]
    out += [
        StoredTensor("mm_projector.pre_norm.weight", (d.mm_hidden,), "BF16"),
        StoredTensor("mm_projector.pre_norm.bias", (d.mm_hidden,), "BF16"),
        StoredTensor("mm_projector.proj.0.weight", (merged, merged), "BF16"),
        StoredTensor("mm_projector.proj.0.bias", (merged,), "BF16"),
        StoredTensor("mm_projector.proj.2.weight", (d.text_hidden, merged), "BF16"),
        StoredTensor("mm_projector.proj.2.bias", (d.text_hidden,), "BF16"),
    ]
    return out


def checkpoint_tensors(cfg: ModelConfig) -> list[StoredTensor]:
    """Every tensor a real checkpoint of this variant holds: text model, unused buffers, vision."""
    text = [st for w in logical_weights(cfg) for st in stored_tensors(cfg, w)]
    return text + unused_tensors(cfg) + vision_tensors(cfg)
