"""llama-quantize's file types (ftypes) and its per-tensor type choice, reproduced exactly.

A recipe naming an `ftype` (e.g. Q4_K_M) must give every tensor the type `llama-quantize IN OUT
Q4_K_M` would give it, so a k2conv file is interchangeable with llama.cpp's own. The facts below
come from the vendored llama.cpp (src/llama-quant.cpp, llama_tensor_get_type and its helpers;
gguf-for-kimi.md §8); the code is our own:

- visit order is the loader's (non-block tensors, then by block number, then by name), because the
  counters (i_ffn_down, i_attention_wv, …) advance in that order, not in our file order;
- a tensor typed by `--override` never reaches the rules, so it advances no counter;
- the row-fit fallback (ne0 % block) is applied after the rules, as llama-quantize does;
- some ftypes need an importance matrix; without one llama-quantize aborts, and so do we.

`choose_types` takes the few model facts llama-quantize consults (`LlamaHparams`) so a test can
set them the way llama.cpp's own mock model does; `ftype_types` derives them from the config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from k2conv.convert.config import ModelConfig
from k2conv.errors import K2ConvError

T = GGMLQuantizationType

# ---- ftype tables ---------------------------------------------------------------------------------

# llama_ftype numbers (include/llama.h), named as llama-quantize prints them. `general.file_type`.
FILE_TYPE_IDS: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38,
}  # fmt: skip

# Every quantized ftype's default tensor type (llama_ftype_get_default_type). The rules below know
# all of them; only those whose every possible type k2conv can write are offered as recipes (FTYPES).
RULE_FTYPES: dict[str, GGMLQuantizationType] = {
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0,
    "Q2_K": T.Q2_K, "Q2_K_S": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K,
    "IQ4_XS": T.IQ4_XS, "IQ4_NL": T.IQ4_NL,
    "IQ2_XXS": T.IQ2_XXS, "IQ2_XS": T.IQ2_XS, "IQ2_S": T.IQ2_XS, "IQ2_M": T.IQ2_S,
    "IQ3_XXS": T.IQ3_XXS, "IQ3_XS": T.IQ3_S, "IQ3_S": T.IQ3_S, "IQ3_M": T.IQ3_S,
    "IQ1_S": T.IQ1_S, "IQ1_M": T.IQ1_M, "TQ1_0": T.TQ1_0, "TQ2_0": T.TQ2_0, "MXFP4_MOE": T.MXFP4,
}  # fmt: skip

# The ftypes k2conv offers (ftype name → default type): their rules only ever pick writable types.
FTYPES: dict[str, GGMLQuantizationType] = {
    name: RULE_FTYPES[name]
    for name in (
        "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
        "Q6_K", "IQ4_XS", "IQ4_NL", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    )
}  # fmt: skip

_LOW_IQ = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}  # the 1-2 bit i-quant branch
_OUTPUT_Q5_K = {"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}
# ftypes whose attn_output becomes Q5_K in an 8-expert (Mixtral-like) model
_ATTN_OUT_8_EXPERTS = {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"}
# types llama-quantize refuses to make without an imatrix (Q2_K too, but only in a Q2_K_S file)
_NEEDS_IMATRIX = {T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S}

# ---- tensor categories (substring tests, in llama.cpp's order) -------------------------------------

OUTPUT, TOKEN_EMBD, QKV, KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = (
    "output", "token_embd", "qkv", "kv_b", "attn_v", "attn_k", "attn_q", "attn_output",
)  # fmt: skip
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "ffn_up", "ffn_gate", "ffn_down", "other"
_SUBSTRINGS = (
    ("attn_qkv.weight", QKV), ("attn_kv_b.weight", KV_B), ("attn_v.weight", ATTN_V),
    ("attn_k.weight", ATTN_K), ("attn_q.weight", ATTN_Q), ("attn_output.weight", ATTN_OUTPUT),
    ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE), ("ffn_down", FFN_DOWN),
)  # fmt: skip
_TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")


def category(name: str) -> str:
    """llama.cpp's broad tensor category: Kimi's attn_q_a/q_b/kv_a_mqa/k_b/v_b all fall in OTHER."""
    if name == "output.weight":
        return OUTPUT
    if name in _TOKEN_EMBD_NAMES:
        return TOKEN_EMBD
    return next((cat for sub, cat in _SUBSTRINGS if sub in name), OTHER)


def _is_attn_v_like(cat: str) -> bool:
    """attn_v, fused qkv and MLA's kv_b share the 'sensitive value projection' rules and counter."""
    return cat in (ATTN_V, QKV, KV_B)


_BLK = re.compile(r"blk\.(\d+)\.")


def block_of(name: str) -> int:
    """The `blk.N.` number, -1 for non-block tensors (the loader's sscanf leaves -1 then)."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def visit_order(names: Iterable[str]) -> list[str]:
    """llama-quantize's loader order (std::map with weight_name_comparer): counters follow it."""
    return sorted(names, key=lambda n: (block_of(n), n))


# ---- model facts llama-quantize consults ------------------------------------------------------------


@dataclass(frozen=True)
class LlamaHparams:
    """What llama_tensor_get_type reads from the model: block count, expert count, GQA ratio."""

    n_layer: int  # general block_count (n_layer_all): n_ffn_down = n_ffn_gate = n_ffn_up
    n_expert: int  # expert_count; 0 when absent
    n_gqa: int  # head_count / head_count_kv of layer 0 (0 when head_count_kv is 0)


def hparams_of(cfg: ModelConfig) -> LlamaHparams:
    """The hparams of the GGUF k2conv writes for `cfg`. MLA is written as MQA (head_count_kv 1,
    convert/gguf_meta.py), so n_gqa is the head count; it only matters for attn_v-like tensors."""
    return LlamaHparams(cfg.num_hidden_layers, cfg.n_routed_experts or 0, cfg.num_attention_heads)


def use_more_bits(i: int, n: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _State:
    """llama-quantize's counters (quantize_state_impl): advanced only when a rule is consulted."""

    hp: LlamaHparams
    ftype: str
    has_imatrix: bool
    tied_embeddings: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    def layer(self, counter: int, name: str) -> int:
        """layer_info: MoE models parse the block number (experts need not be consecutive);
        dense models use the running counter."""
        if self.hp.n_expert <= 1:
            return counter
        i = block_of(name)
        if i < 0:
            raise K2ConvError(f"ftype {self.ftype}: cannot determine the layer of tensor {name}")
        if i >= self.hp.n_layer:
            raise K2ConvError(f"ftype {self.ftype}: bad layer {i} for tensor {name}, must be in [0, {self.hp.n_layer})")
        return i


# ---- the rules, one function per branch of llama_tensor_get_type_impl --------------------------------


def _output_type(st: _State, qtype: GGMLQuantizationType, ne0: int) -> GGMLQuantizationType:
    """output.weight (and a tied token_embd): Q6_K, Q5_K for the lowest i-quants, Q8_0 if rows misfit."""
    if st.ftype == "MXFP4_MOE" or ne0 % block_size(qtype) != 0:
        return T.Q8_0
    if st.ftype in _OUTPUT_Q5_K:
        return T.Q5_K
    return qtype if qtype == T.Q8_0 else T.Q6_K


def _token_embd_type(ftype: str, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Untied token embeddings: a floor for the lowest-bit ftypes, else the default."""
    if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
        return T.Q2_K
    if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
        return T.IQ3_S
    if ftype in ("TQ1_0", "TQ2_0"):
        return T.Q4_K
    return qtype


def _low_iq_type(st: _State, cat: str, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """IQ1/IQ2 ftypes: more bits for value projections, the first eighth of ffn_down, attn_output."""
    hp, ftype = st.hp, st.ftype
    iq2_sm = ftype in ("IQ2_S", "IQ2_M")
    if _is_attn_v_like(cat):
        qtype = T.Q4_K if hp.n_gqa >= 4 or hp.n_expert >= 4 else (T.IQ3_S if iq2_sm else T.Q2_K)
        st.i_attention_wv += 1
    elif hp.n_expert == 8 and cat == ATTN_K:
        qtype = T.Q4_K
    elif cat == FFN_DOWN:
        # a counter in visit order, not the layer number
        if st.i_ffn_down < hp.n_layer // 8:
            qtype = T.IQ3_S if iq2_sm else T.Q2_K
        st.i_ffn_down += 1
    elif cat == ATTN_OUTPUT:
        if hp.n_expert == 8:
            qtype = T.Q5_K
        elif ftype in ("IQ1_S", "IQ1_M"):
            qtype = T.IQ2_XXS
        elif iq2_sm:
            qtype = T.IQ3_S
    return qtype


def _attn_v_type(st: _State, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """attn_v / qkv / kv_b outside the low i-quants; the first few or use_more_bits ones get more."""
    hp, ftype, gqa4 = st.hp, st.ftype, st.hp.n_gqa >= 4
    if ftype == "Q2_K":
        qtype = T.Q4_K if gqa4 else T.Q3_K
    elif ftype == "Q2_K_S" and gqa4:
        qtype = T.Q4_K
    elif ftype == "IQ3_XXS":
        qtype = T.Q4_K if gqa4 else (T.IQ3_S if not st.has_imatrix else T.IQ3_XXS)
    elif (ftype in ("IQ3_XS", "IQ3_S") and gqa4) or ftype == "IQ3_M":
        qtype = T.Q4_K
    elif ftype == "Q3_K_M":
        qtype = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
    elif ftype == "Q3_K_L" or (ftype in ("IQ4_NL", "IQ4_XS") and gqa4):
        qtype = T.Q5_K
    elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(st.i_attention_wv, st.n_attention_wv):
        qtype = T.Q6_K
    elif ftype == "Q4_K_S" and st.i_attention_wv < 4:
        qtype = T.Q5_K
    # (the LLaMA-70B bump does not apply: deepseek2 is never LLM_TYPE_70B)
    if hp.n_expert == 8:
        qtype = T.Q8_0
    st.i_attention_wv += 1
    return qtype


def _attn_kq_type(st: _State, cat: str, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Separate attn_k / attn_q (absent in MLA files)."""
    if cat == ATTN_K and st.hp.n_expert == 8:
        return T.Q8_0
    if st.ftype == "IQ3_XS":
        return T.IQ3_XXS
    if st.ftype == "IQ3_XXS":
        return T.IQ2_S
    return qtype


def _ffn_down_type(st: _State, name: str, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """ffn_down (dense, _exps and _shexp alike): the tensor most sensitive to quantization."""
    hp, ftype = st.hp, st.ftype
    i, n = st.layer(st.i_ffn_down, name), hp.n_layer
    first_eighth, more = i < n // 8, use_more_bits(i, n)
    if ftype == "Q2_K":
        qtype = T.Q3_K
    elif ftype == "Q2_K_S":
        if first_eighth:
            qtype = T.Q4_K
    elif ftype == "IQ3_XXS" and not st.has_imatrix:
        qtype = T.Q4_K if first_eighth else T.Q3_K
    elif ftype == "Q3_K_M":
        qtype = T.Q5_K if i < n // 16 else T.Q4_K  # not Falcon: Q4_K on every later layer
    elif ftype == "IQ3_M" and (first_eighth or (hp.n_expert == 8 and more)):
        qtype = T.Q4_K
    elif ftype == "Q3_K_L":
        qtype = T.Q5_K
    elif ftype == "Q4_K_M":
        if more:
            qtype = T.Q6_K
    elif first_eighth and ftype in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
        qtype = T.Q5_K
    elif ftype == "Q5_K_M" and more:
        qtype = T.Q6_K
    elif ftype == "Q4_K_S" and first_eighth:
        qtype = T.Q5_K
    elif ftype in ("Q4_0", "Q5_0") and st.has_imatrix and first_eighth:
        qtype = T.Q4_1 if ftype == "Q4_0" else T.Q5_1
    st.i_ffn_down += 1
    return qtype


def _attn_output_type(st: _State, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """attn_output: Q5_K across the board in 8-expert models, else per-ftype bumps."""
    ftype = st.ftype
    if st.hp.n_expert == 8:
        return T.Q5_K if ftype in _ATTN_OUT_8_EXPERTS else qtype
    bumps = {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_M": T.Q4_K}
    return bumps.get(ftype, qtype)


def _ffn_gate_up_type(st: _State, cat: str, name: str, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """ffn_gate / ffn_up: only IQ3_XS changes them (middle layers IQ3_XXS); each has its counter."""
    counter = st.i_ffn_gate if cat == FFN_GATE else st.i_ffn_up
    i, n = st.layer(counter, name), st.hp.n_layer
    if st.ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
        qtype = T.IQ3_XXS
    if cat == FFN_GATE:
        st.i_ffn_gate += 1
    else:
        st.i_ffn_up += 1
    return qtype


def _rule_type(st: _State, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl: the branch order matters, as each category is tested once."""
    cat, ftype = category(name), st.ftype
    if cat == OUTPUT or (st.tied_embeddings and cat == TOKEN_EMBD):
        return _output_type(st, qtype, shape[-1])
    if ftype == "MXFP4_MOE":  # stacked experts (3-D) MXFP4, everything else Q8_0
        return T.MXFP4 if len(shape) >= 3 and shape[-3] > 1 else T.Q8_0
    if cat == TOKEN_EMBD:
        return _token_embd_type(ftype, qtype)
    if ftype in _LOW_IQ:
        return _low_iq_type(st, cat, qtype)
    if _is_attn_v_like(cat):  # includes qkv: llama.cpp's later qkv branch is never reached
        return _attn_v_type(st, qtype)
    if cat in (ATTN_K, ATTN_Q):
        return _attn_kq_type(st, cat, qtype)
    if cat == FFN_DOWN:
        return _ffn_down_type(st, name, qtype)
    if cat == ATTN_OUTPUT:
        return _attn_output_type(st, qtype)
    if cat in (FFN_GATE, FFN_UP):
        return _ffn_gate_up_type(st, cat, name, qtype)
    return qtype


# ---- shape fallback and imatrix requirement ------------------------------------------------------------

_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS), T.IQ4_NL),
    **dict.fromkeys((T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0), T.Q4_0),
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def fallback(qtype: GGMLQuantizationType, ne0: int) -> GGMLQuantizationType:
    """tensor_type_fallback: a type whose block divides the row (attn_k_b's 128), F16 as last resort."""
    if ne0 % block_size(qtype) == 0:
        return qtype
    if qtype in _FALLBACK:
        qtype = _FALLBACK[qtype]
    elif block_size(qtype) > 32:
        raise K2ConvError(f"no tensor type fallback is defined for type {qtype.name}")
    return qtype if ne0 % block_size(qtype) == 0 else T.F16


def requires_imatrix(name: str, qtype: GGMLQuantizationType, ftype: str) -> bool:
    """tensor_requires_imatrix: the 1-3 bit i-quants, and Q2_K in a Q2_K_S file; never the
    embeddings or the output matrix."""
    if name in _TOKEN_EMBD_NAMES or name == "output.weight":
        return False
    return qtype in _NEEDS_IMATRIX or (qtype == T.Q2_K and ftype == "Q2_K_S")


# ---- entry points ----------------------------------------------------------------------------------------


def _check_ftype(ftype: str) -> None:
    if ftype not in RULE_FTYPES:
        raise K2ConvError(f"unknown llama-quantize ftype {ftype!r} (known: {', '.join(RULE_FTYPES)})")


def choose_types(
    ftype: str,
    hp: LlamaHparams,
    tensors: list[tuple[str, tuple[int, ...]]],
    has_imatrix: bool = False,
    skip: set[str] | frozenset[str] = frozenset(),
) -> dict[str, GGMLQuantizationType]:
    """llama-quantize's type for each quantizable tensor (name, numpy shape), except those in `skip`
    (typed by an override: llama-quantize consults no rule for them, so counters do not advance).

    No imatrix check here (see `ftype_types`): llama.cpp's own type-listing API has none either.
    """
    _check_ftype(ftype)
    names = [n for n, _ in tensors]
    shapes = dict(tensors)
    st = _State(
        hp, ftype, has_imatrix,
        tied_embeddings="output.weight" not in shapes,
        n_attention_wv=sum(_is_attn_v_like(category(n)) for n in names),
    )  # fmt: skip
    default = RULE_FTYPES[ftype]
    out: dict[str, GGMLQuantizationType] = {}
    for name in visit_order(names):
        if name in skip:
            continue
        shape = shapes[name]
        out[name] = fallback(_rule_type(st, name, shape, default), shape[-1])
    return out


def ftype_types(
    ftype: str,
    cfg: ModelConfig,
    tensors: list[tuple[str, tuple[int, ...]]],
    has_imatrix: bool,
    skip: set[str],
) -> dict[str, GGMLQuantizationType]:
    """The types `llama-quantize F32.gguf OUT.gguf FTYPE` gives the tensors of k2conv's GGUF of
    `cfg` (F32-only tensors already removed), in a dict by name.

    Raises K2ConvError when llama-quantize would refuse: an ftype needing an imatrix without one.
    """
    types = choose_types(ftype, hparams_of(cfg), tensors, has_imatrix, skip)
    if not has_imatrix:
        needy = [n for n in visit_order(types) if requires_imatrix(n, types[n], ftype)]
        if needy:
            raise K2ConvError(
                f"ftype {ftype} needs an importance matrix (imatrix), as in llama-quantize: {len(needy)} tensors "
                f"would be {types[needy[0]].name}, first {needy[0]}; provide one or pick another ftype (e.g. Q2_K)"
            )
    return types
