"""Model hyper-parameters of a Kimi K2-family checkpoint, read from its config.json.

One place for every dimension the converter, the planner and the runner need. K2.5 nests the
DeepSeek-V3 text config under `text_config` (with `quantization_config` inside it); K2-Instruct and
K2-Thinking are flat. Both spellings are accepted, and so is a plain DeepSeek-V3 BF16 config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2conv.errors import K2ConvError

VARIANTS = ("k2.5", "k2-thinking", "k2-instruct", "bf16")


@dataclass(frozen=True)
class Int4Scheme:
    """compressed-tensors pack-quantized: symmetric signed INT4, one scale per `group_size` inputs."""

    group_size: int = 32
    num_bits: int = 4


@dataclass(frozen=True)
class Fp8Scheme:
    """DeepSeek block FP8: e4m3 weights times a float32 `weight_scale_inv` per block."""

    block: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    """The DeepSeek-V3 text model as Kimi ships it (names follow the HF config keys)."""

    variant: str
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    routed_scaling_factor: float
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    rms_norm_eps: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    moe_layer_freq: int = 1
    quant: Int4Scheme | Fp8Scheme | None = None
    tensor_prefix: str = ""
    vision: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return sum(1 for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek-V3 rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq` layers."""
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def yarn_mscale_all_dim(self) -> float:
        rs = self.rope_scaling or {}
        return float(rs.get("mscale_all_dim", 0.0) or 0.0)


def _rope_scaling(cfg: dict[str, Any], where: str) -> dict[str, Any] | None:
    """`rope_scaling` (transformers 4) or `rope_parameters` (transformers 5 re-serialisation)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise K2ConvError(f"{where}: rope_scaling must be an object, got {rs!r:.60}")
    rs = dict(rs)
    kind = rs.get("type") or rs.get("rope_type")
    if kind in (None, "default"):
        return None
    rs["type"] = kind
    return rs


def _quant_scheme(qc: dict[str, Any] | None, where: str) -> Int4Scheme | Fp8Scheme | None:
    """Validate a quantization_config; anything k2conv cannot decode exactly is refused here."""
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise K2ConvError(f"{where}: quantization_config must be an object, got {qc!r:.60}")
    method = qc.get("quant_method")
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise K2ConvError(f"{where}: quantization_config fp8 fmt {fmt!r} is not supported (only e4m3)")
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise K2ConvError(f"{where}: quantization_config fp8 needs weight_block_size [rows, cols], got {block!r}")
        return Fp8Scheme(block=(block[0], block[1]))
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt != "pack-quantized":
            raise K2ConvError(f"{where}: compressed-tensors format {fmt!r} is not supported (only pack-quantized)")
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict) or len(groups) != 1:
            raise K2ConvError(f"{where}: compressed-tensors needs config_groups with exactly 1 group")
        group = next(iter(groups.values()))
        weights = (group.get("weights") if isinstance(group, dict) else None) or {}
        if not isinstance(weights, dict):
            raise K2ConvError(f"{where}: compressed-tensors config group weights must be an object")
        problems = []
        if weights.get("num_bits") != 4:
            problems.append(f"num_bits {weights.get('num_bits')} (need 4)")
        if weights.get("type", "int") != "int":
            problems.append(f"type {weights.get('type')!r} (need int)")
        if weights.get("symmetric") is not True:
            problems.append("asymmetric weights (need symmetric)")
        if weights.get("strategy") != "group":
            problems.append(f"strategy {weights.get('strategy')!r} (need group)")
        if weights.get("group_size") != 32:
            problems.append(f"group_size {weights.get('group_size')} (need 32)")
        if weights.get("actorder") not in (None, False):
            problems.append(f"actorder {weights.get('actorder')!r} (need null)")
        if problems:
            raise K2ConvError(f"{where}: unsupported quantization_config: " + ", ".join(problems))
        return Int4Scheme(group_size=32, num_bits=4)
    raise K2ConvError(f"{where}: unsupported quant_method {method!r} (supported: compressed-tensors, fp8)")


def _int(cfg: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise K2ConvError(f"{where}: config key {key!r} must be a non-negative integer, got {value!r}")
    return value


def _num(cfg: dict[str, Any], key: str, where: str, default: float, kind: type = float, falsy_default: bool = False) -> Any:
    """A numeric config value as `kind`; null means the default (and so do 0/false with
    `falsy_default`, as HF configs use them); strings, lists, inf for ints are one clear error."""
    value = cfg.get(key)
    if value is None or (falsy_default and not value):
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise K2ConvError(f"{where}: config key {key!r} must be a number, got {value!r:.60}")
    try:
        return kind(value)
    except (OverflowError, ValueError):
        raise K2ConvError(f"{where}: config key {key!r} is out of range: {value!r}") from None


def parse_config(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a config.json dict (K2.5 wrapper or flat K2)."""
    if not isinstance(raw, dict):
        raise K2ConvError(f"{where}: not a JSON object")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        archs = []
    is_k25 = raw.get("model_type") == "kimi_k25" or "KimiK25ForConditionalGeneration" in archs
    if is_k25 or ("text_config" in raw and "hidden_size" not in raw):
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise K2ConvError(f"{where}: K2.5-style config without a text_config object")
        prefix = "language_model."
    else:
        text = raw
        prefix = ""
    qc = text.get("quantization_config") or raw.get("quantization_config")
    quant = _quant_scheme(qc, where)
    if is_k25:
        variant = "k2.5"
    elif isinstance(quant, Int4Scheme):
        variant = "k2-thinking"
    elif isinstance(quant, Fp8Scheme):
        variant = "k2-instruct"
    else:
        variant = "bf16"

    def tok(key: str) -> int | None:
        v = text.get(key, raw.get(key))
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    scoring = text.get("scoring_func", "softmax")
    if scoring not in ("sigmoid", "softmax"):
        raise K2ConvError(f"{where}: scoring_func {scoring!r} is not supported (sigmoid or softmax)")
    q_lora = text.get("q_lora_rank")
    cfg = ModelConfig(
        variant=variant,
        hidden_size=_int(text, "hidden_size", where),
        intermediate_size=_int(text, "intermediate_size", where),
        moe_intermediate_size=_int(text, "moe_intermediate_size", where),
        num_hidden_layers=_int(text, "num_hidden_layers", where),
        first_k_dense_replace=_int(text, "first_k_dense_replace", where, 0),
        n_routed_experts=_int(text, "n_routed_experts", where, 0) if text.get("n_routed_experts") else 0,
        num_experts_per_tok=_int(text, "num_experts_per_tok", where, 0) if text.get("num_experts_per_tok") else 0,
        n_shared_experts=_int(text, "n_shared_experts", where, 0) if text.get("n_shared_experts") else 0,
        num_attention_heads=_int(text, "num_attention_heads", where),
        q_lora_rank=q_lora if isinstance(q_lora, int) and q_lora > 0 else None,
        kv_lora_rank=_int(text, "kv_lora_rank", where),
        qk_nope_head_dim=_int(text, "qk_nope_head_dim", where),
        qk_rope_head_dim=_int(text, "qk_rope_head_dim", where),
        v_head_dim=_int(text, "v_head_dim", where),
        vocab_size=_int(text, "vocab_size", where),
        max_position_embeddings=_int(text, "max_position_embeddings", where, 4096),
        rope_theta=_num(text, "rope_theta", where, 10000.0),
        rope_scaling=_rope_scaling(text, where),
        routed_scaling_factor=_num(text, "routed_scaling_factor", where, 1.0, falsy_default=True),
        scoring_func=scoring,
        n_group=_num(text, "n_group", where, 1, int, falsy_default=True),
        topk_group=_num(text, "topk_group", where, 1, int, falsy_default=True),
        norm_topk_prob=bool(text.get("norm_topk_prob", False)),
        rms_norm_eps=_num(text, "rms_norm_eps", where, 1e-6),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))),
        bos_token_id=tok("bos_token_id"),
        eos_token_id=tok("eos_token_id"),
        pad_token_id=tok("pad_token_id"),
        moe_layer_freq=_num(text, "moe_layer_freq", where, 1, int, falsy_default=True),
        quant=quant,
        tensor_prefix=prefix,
        vision=_vision(raw, where) if is_k25 else None,
        raw=raw,
    )
    if cfg.hidden_size == 0 or cfg.num_hidden_layers == 0 or cfg.vocab_size == 0:
        raise K2ConvError(f"{where}: hidden_size, num_hidden_layers and vocab_size must be positive")
    if cfg.n_routed_experts and not 0 < cfg.num_experts_per_tok <= cfg.n_routed_experts:
        raise K2ConvError(f"{where}: num_experts_per_tok must be in 1..n_routed_experts")
    return cfg


def load_config(path: Path) -> ModelConfig:
    """Read config.json (or a checkpoint folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise K2ConvError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise K2ConvError(f"{path}: is a directory, not a config file") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, 4300+ digit ints
        raise K2ConvError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120] or exc.__class__.__name__})") from None
    return parse_config(raw, str(path))


def _vision(raw: dict[str, Any], where: str) -> dict[str, Any] | None:
    vision = raw.get("vision_config")
    if vision is not None and not isinstance(vision, dict):
        raise K2ConvError(f"{where}: vision_config must be an object, got {vision!r:.60}")
    return vision


def yarn_log_multiplier(cfg: ModelConfig) -> float:
    """llama.cpp stores 0.1·mscale_all_dim and divides it back at load (see gguf-for-kimi §2.1)."""
    return 0.1 * cfg.yarn_mscale_all_dim


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0 and math.log2(n).is_integer()
