"""config.json parsing: variants detected, unsupported quantization refused with one line."""

from __future__ import annotations

import copy

import pytest

from k2conv.convert.config import Fp8Scheme, Int4Scheme, parse_config
from k2conv.errors import K2ConvError

TEXT = {
    "hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256, "num_hidden_layers": 3,
    "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "num_attention_heads": 4, "q_lora_rank": 256, "kv_lora_rank": 256, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 2048, "scoring_func": "sigmoid",
    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}  # fmt: skip
INT4_QC = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "actorder": None}}},
}  # fmt: skip


def test_variants() -> None:
    k25 = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
           "text_config": {**TEXT, "quantization_config": INT4_QC}, "vision_config": {"patch_size": 14}}  # fmt: skip
    cfg = parse_config(k25)
    assert cfg.variant == "k2.5" and isinstance(cfg.quant, Int4Scheme) and cfg.tensor_prefix == "language_model."
    assert parse_config({**TEXT, "quantization_config": INT4_QC}).variant == "k2-thinking"
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    cfg = parse_config({**TEXT, "quantization_config": fp8})
    assert cfg.variant == "k2-instruct" and cfg.quant == Fp8Scheme((128, 128))
    assert parse_config(TEXT).variant == "bf16"
    assert cfg.n_moe_layers == 2 and not cfg.is_moe_layer(0)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("num_bits",), 8, "num_bits 8"),
        (("symmetric",), False, "asymmetric"),
        (("group_size",), 128, "group_size 128"),
        (("strategy",), "channel", "strategy 'channel'"),
    ],
)
def test_unsupported_int4_configs(path: tuple[str, ...], value: object, message: str) -> None:
    qc = copy.deepcopy(INT4_QC)
    qc["config_groups"]["group_0"]["weights"][path[0]] = value
    with pytest.raises(K2ConvError, match=message):
        parse_config({**TEXT, "quantization_config": qc}, "x/config.json")


def test_other_bad_configs() -> None:
    with pytest.raises(K2ConvError, match="quant_method 'awq'"):
        parse_config({**TEXT, "quantization_config": {"quant_method": "awq"}})
    with pytest.raises(K2ConvError, match="format 'int-quantized'"):
        parse_config({**TEXT, "quantization_config": {**INT4_QC, "format": "int-quantized"}})
    with pytest.raises(K2ConvError, match="hidden_size"):
        parse_config({**TEXT, "hidden_size": "big"})
