"""llama-quantize ftypes (Q4_K_M, Q2_K, …): k2conv picks llama.cpp's per-tensor types and bytes.

Three kinds of evidence:
- end to end on the tiny K2.5: llama.cpp's own `llama_model_quantize` turns our F32 GGUF into an
  ftype, `k2conv quantize --recipe FTYPE` goes straight from the checkpoint; every tensor must have
  the same type and the same bytes;
- llama.cpp's type-listing API (`llama_quant_compute_types`, exported by libllama, reached through
  ctypes) on the real K2.5 tensor list (61 layers, 384 experts — the tiny model has 3 and 8) and on
  synthetic lists that reach the branches Kimi does not (attn_v, kv_b, dense, 8 experts, tied
  embeddings, overrides);
- the documented table (gguf-for-kimi.md §8) restated independently for the real K2.5.
"""

from __future__ import annotations

import ctypes as C
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from k2conv.cli import main
from k2conv.convert.config import ModelConfig, load_config
from k2conv.convert.pipeline import make_plan
from k2conv.errors import K2ConvError
from k2conv.quant.llama_ftypes import (
    FILE_TYPE_IDS,
    FTYPES,
    RULE_FTYPES,
    LlamaHparams,
    choose_types,
    ftype_types,
    hparams_of,
    use_more_bits,
    visit_order,
)
from k2conv.quant.recipe import builtin_names, keeps_f32, load_recipe
from k2conv.quant.types import tensor_bytes

T = GGMLQuantizationType
K25_CONFIG = Path(__file__).parent / "data" / "configs" / "k2.5.json"
Tensors = list[tuple[str, tuple[int, ...]]]


# ---- helpers -------------------------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def candidates(cfg: ModelConfig) -> Tensors:
    """k2conv's GGUF tensors for `cfg` that llama-quantize may quantize (file order)."""
    plan = make_plan(cfg, None, Path("x.gguf"), "f32")
    return [(t.name, t.shape) for t in plan.tensors if not keeps_f32(t.name, len(t.shape))]


@pytest.fixture(scope="module")
def k25() -> ModelConfig:
    return load_config(K25_CONFIG)


@pytest.fixture(scope="module")
def k25_tensors(k25: ModelConfig) -> Tensors:
    return candidates(k25)


def layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


# ---- tables ----------------------------------------------------------------------------------------------


def test_file_type_ids_are_llama_h() -> None:
    """general.file_type numbers: gguf's LlamaFileType mirrors llama.h."""
    for name, number in FILE_TYPE_IDS.items():
        key = {"F32": "ALL_F32"}.get(name, f"MOSTLY_{name}")
        assert LlamaFileType[key] == number, name
    assert set(FTYPES) <= set(RULE_FTYPES) <= set(FILE_TYPE_IDS)


def test_every_ftype_has_a_builtin_recipe() -> None:
    """Recipes named as llama-quantize prints the ftype. Not built in: Q8_0 (the existing `q8_0` gives
    the same types, and a name differing only in case would collide on case-insensitive file systems)
    and Q2_K_S (needs an imatrix, which `k2conv quantize` cannot take yet)."""
    names = set(builtin_names())
    for ftype, default in FTYPES.items():
        if ftype in ("Q8_0", "Q2_K_S"):
            continue
        assert ftype in names
        recipe = load_recipe(ftype)
        assert (recipe.ftype, recipe.default, recipe.rules) == (ftype, default, [])


def test_q8_0_recipe_equals_q8_0_ftype(k25: ModelConfig, k25_tensors: Tensors) -> None:
    plan = {t.name: t.qtype for t in make_plan(k25, None, Path("x.gguf"), "q8_0").tensors}
    assert ftype_types("Q8_0", k25, k25_tensors, False, set()) == {n: plan[n] for n, _ in k25_tensors}


def test_visit_order_is_the_loaders() -> None:
    names = ["blk.10.a.weight", "output.weight", "blk.2.z.weight", "blk.2.b.weight", "token_embd.weight"]
    assert visit_order(names) == [
        "output.weight", "token_embd.weight", "blk.2.b.weight", "blk.2.z.weight", "blk.10.a.weight",
    ]  # fmt: skip


def test_use_more_bits_for_61_layers() -> None:
    """§8: layers 0–6, 53–60, and 9, 12, …, 51."""
    expected = set(range(7)) | set(range(53, 61)) | set(range(9, 52, 3))
    assert {i for i in range(61) if use_more_bits(i, 61)} == expected


# ---- §8 table on the real K2.5 ---------------------------------------------------------------------------

_K_B_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}
_ATTN_OUTPUT = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}
_MORE_BITS_61 = set(range(7)) | set(range(53, 61)) | set(range(9, 52, 3))


def _k25_ffn_down(ftype: str, i: int, default: GGMLQuantizationType, imatrix: bool) -> GGMLQuantizationType:
    """§8's ffn_down column (dense, _exps and _shexp alike) for 61 layers."""
    if ftype == "Q2_K":
        return T.Q3_K
    if ftype in ("Q2_K_S", "Q4_K_S") or (ftype in ("IQ4_XS", "IQ4_NL") and not imatrix):
        return {"Q2_K_S": T.Q4_K}.get(ftype, T.Q5_K) if i < 7 else default
    if ftype == "Q3_K_M":
        return T.Q5_K if i < 3 else T.Q4_K
    if ftype == "Q3_K_L":
        return T.Q5_K
    if ftype in ("Q4_K_M", "Q5_K_M"):
        return T.Q6_K if i in _MORE_BITS_61 else default
    if ftype in ("Q4_0", "Q5_0") and imatrix and i < 7:  # llama-quant.cpp (not in §8)
        return T.Q4_1 if ftype == "Q4_0" else T.Q5_1
    return default


def expected_k25(ftype: str, name: str, imatrix: bool = False) -> GGMLQuantizationType:
    """gguf-for-kimi.md §8, restated for Kimi K2.5 (MLA, 384 experts, 61 layers, ne0 of attn_k_b 128)."""
    default = FTYPES[ftype]
    if name == "output.weight":
        return T.Q8_0 if default == T.Q8_0 else T.Q6_K
    if ".attn_k_b." in name:
        return _K_B_FALLBACK.get(default, default)
    if ".attn_output." in name:
        return _ATTN_OUTPUT.get(ftype, default)
    if ".ffn_down" in name:
        return _k25_ffn_down(ftype, layer(name), default, imatrix)
    return default  # token_embd, attn_q_a/q_b/kv_a_mqa/v_b, ffn_gate/up (+ _exps, _shexp)


@pytest.mark.parametrize("imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("ftype", list(FTYPES))
def test_real_k25_follows_the_documented_table(k25: ModelConfig, k25_tensors: Tensors, ftype: str, imatrix: bool) -> None:
    if ftype == "Q2_K_S" and not imatrix:
        pytest.skip("needs an imatrix (tested below)")
    got = ftype_types(ftype, k25, k25_tensors, imatrix, set())
    assert got == {n: expected_k25(ftype, n, imatrix) for n, _ in k25_tensors}


def test_q4_k_m_plan_of_real_k25(k25: ModelConfig) -> None:
    """Through make_plan: ffn_down Q6_K exactly on use_more_bits layers, attn_k_b Q5_0, output Q6_K,
    norms/router/bias F32."""
    plan = make_plan(k25, None, Path("x.gguf"), "Q4_K_M")
    types = {t.name: t.qtype for t in plan.tensors}
    f32_only = {t.name for t in plan.tensors if keeps_f32(t.name, len(t.shape))}
    downs = {n: q for n, q in types.items() if ".ffn_down" in n}
    assert {layer(n) for n, q in downs.items() if q == T.Q6_K} == _MORE_BITS_61
    assert {q for n, q in downs.items() if layer(n) not in _MORE_BITS_61} == {T.Q4_K}
    assert len([n for n in downs if layer(n) in _MORE_BITS_61]) == 1 + 2 * (len(_MORE_BITS_61) - 1)
    assert {q for n, q in types.items() if ".attn_k_b." in n} == {T.Q5_0}
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert {types[n] for n in f32_only} == {T.F32}
    assert {n.split(".")[-2] for n in f32_only} == {
        "attn_norm", "attn_q_a_norm", "attn_kv_a_norm", "ffn_norm", "output_norm", "ffn_gate_inp", "exp_probs_b",
    }  # fmt: skip


def test_real_k25_sizes_per_ftype(k25: ModelConfig, k25_tensors: Tensors, capsys: pytest.CaptureFixture[str]) -> None:
    """Tensor bytes of the whole text model per ftype (printed with -s); more bits, more bytes."""
    f32_bytes = sum(tensor_bytes(T.F32, t.shape) for t in make_plan(k25, None, Path("x.gguf"), "f32").tensors
                    if keeps_f32(t.name, len(t.shape)))  # fmt: skip
    shapes = dict(k25_tensors)
    sizes = {}
    for ftype in FTYPES:
        types = ftype_types(ftype, k25, k25_tensors, ftype == "Q2_K_S", set())
        sizes[ftype] = f32_bytes + sum(tensor_bytes(q, shapes[n]) for n, q in types.items())
    with capsys.disabled():
        print("\nreal K2.5 tensor data per ftype (GB = 1e9 bytes; Q2_K_S with an imatrix):")
        for ftype, size in sorted(sizes.items(), key=lambda kv: kv[1]):
            print(f"  {ftype:7s} {size / 1e9:8.1f} GB")
    order = ["Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
    assert [sizes[f] for f in order] == sorted(sizes[f] for f in order)


# ---- overrides, imatrix ------------------------------------------------------------------------------------


def test_skipped_tensors_do_not_advance_counters() -> None:
    """IQ2_XXS: Q2_K for the first n/8 ffn_down *visited*; an overridden one is not visited."""
    hp = LlamaHparams(n_layer=16, n_expert=0, n_gqa=1)
    tensors = [(f"blk.{i}.ffn_down.weight", (256, 256)) for i in range(16)]
    got = choose_types("IQ2_XXS", hp, tensors)
    assert [got[n] for n, _ in tensors[:3]] == [T.Q2_K, T.Q2_K, T.IQ2_XXS]
    got = choose_types("IQ2_XXS", hp, tensors, skip={"blk.0.ffn_down.weight"})
    assert "blk.0.ffn_down.weight" not in got
    assert [got[n] for n, _ in tensors[1:4]] == [T.Q2_K, T.Q2_K, T.IQ2_XXS]


def test_imatrix_required(k25: ModelConfig, k25_tensors: Tensors) -> None:
    for ftype in ("Q2_K_S", "IQ2_XXS", "IQ1_S", "IQ3_XXS"):
        with pytest.raises(K2ConvError, match=rf"^ftype {ftype} needs an importance matrix .*first blk\.0\.") as err:
            ftype_types(ftype, k25, k25_tensors, False, set())
        assert "\n" not in str(err.value)
    # token_embd and output are exempt; the rest is typed normally with an imatrix
    types = ftype_types("IQ2_XXS", k25, k25_tensors, True, set())
    assert (types["token_embd.weight"], types["output.weight"]) == (T.Q2_K, T.Q5_K)


def test_cli_refuses_q2_k_s_without_imatrix(synth_ckpt, tmp_path: Path) -> None:
    recipe = tmp_path / "q2ks.toml"
    recipe.write_text('ftype = "Q2_K_S"\n', encoding="utf-8")
    code, text = run_cli("quantize", synth_ckpt("k2.5"), tmp_path / "o.gguf", "--recipe", recipe, "--dry-run")
    assert code == 2
    assert "Q2_K_S needs an importance matrix" in text and len(text.strip().splitlines()) == 1


# ---- llama.cpp's type-listing API through ctypes -----------------------------------------------------------


class LlamaTypes:
    """llama_quant_compute_types on a mock deepseek2 model (llama-ext.h; exported C++ symbols)."""

    _SYMBOLS: ClassVar[dict[str, str]] = {
        "from_metadata": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
        "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
        "free": "_Z16llama_quant_freeP19quantize_state_impl",
        "compute": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
    }

    class _Desc(C.Structure):
        _fields_: ClassVar = [
            ("architecture", C.c_char_p),
            *((f, C.c_uint32) for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert",
                                        "n_embd_head_k", "n_embd_head_v")),
        ]  # fmt: skip

    class _InitParams(C.Structure):
        _fields_: ClassVar = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]

    def __init__(self) -> None:
        llama_cpp = pytest.importorskip("llama_cpp")
        self.llama_cpp = llama_cpp
        lib = llama_cpp.llama_cpp._lib
        if not all(hasattr(lib, s) for s in self._SYMBOLS.values()):
            pytest.skip("this libllama does not export llama_quant_compute_types")
        f = {k: getattr(lib, s) for k, s in self._SYMBOLS.items()}
        f["from_metadata"].argtypes, f["from_metadata"].restype = [C.POINTER(self._Desc)], C.c_void_p
        f["init"].argtypes, f["init"].restype = [C.c_void_p, C.c_void_p], C.c_void_p
        f["free"].argtypes = [C.c_void_p]
        f["compute"].argtypes = [C.c_void_p, C.c_int, C.POINTER(C.c_void_p), C.POINTER(C.c_int), C.c_size_t]
        lib.llama_model_free.argtypes = [C.c_void_p]
        self.f, self.lib = f, lib
        ggml = C.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so.0"))  # libllama's own copy
        ggml.ggml_tensor_overhead.restype = C.c_size_t
        ggml.ggml_init.argtypes, ggml.ggml_init.restype = [self._InitParams], C.c_void_p
        ggml.ggml_new_tensor.argtypes = [C.c_void_p, C.c_int, C.c_int, C.POINTER(C.c_int64)]
        ggml.ggml_new_tensor.restype = C.c_void_p
        ggml.ggml_set_name.argtypes, ggml.ggml_set_name.restype = [C.c_void_p, C.c_char_p], C.c_void_p
        ggml.ggml_free.argtypes = [C.c_void_p]
        self.ggml = ggml

    def types(
        self, ftype: str, hp: LlamaHparams, n_head: int, tensors: Tensors, overrides: dict[str, GGMLQuantizationType]
    ) -> dict[str, GGMLQuantizationType]:
        """Types for `tensors`, visited in llama-quantize's order; `overrides` as --tensor-type."""
        n_head_kv = n_head // hp.n_gqa if hp.n_gqa else 0
        desc = self._Desc(b"deepseek2", 1, 1, hp.n_layer, n_head, n_head_kv, hp.n_expert, 1, 1)
        tt = (self.llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, q) in enumerate(overrides.items()):
            tt[i].pattern, tt[i].type = pattern.encode(), int(q)
        params = self.llama_cpp.llama_model_quantize_default_params()
        if overrides:
            params.tt_overrides = C.cast(tt, type(params.tt_overrides))
        shapes = dict(tensors)
        names = sorted(shapes, key=self._loader_key)
        model = self.f["from_metadata"](C.byref(desc))
        qs = self.f["init"](model, C.addressof(params))
        ctx = self.ggml.ggml_init(self._InitParams(self.ggml.ggml_tensor_overhead() * (len(names) + 1), None, True))
        try:
            ptrs = (C.c_void_p * len(names))(*(self._tensor(ctx, n, shapes[n]) for n in names))
            out = (C.c_int * len(names))()
            self.f["compute"](qs, FILE_TYPE_IDS[ftype], ptrs, out, len(names))
        finally:
            self.ggml.ggml_free(ctx)
            self.f["free"](qs)
            self.lib.llama_model_free(model)
        return {n: T(q) for n, q in zip(names, out)}

    @staticmethod
    def _loader_key(name: str) -> tuple[int, str]:
        """llama_model_loader's weight_name_comparer: sscanf("blk.%d.") (else -1), then the name."""
        m = re.match(r"blk\.(\d+)\.", name)
        return (int(m.group(1)) if m else -1, name)

    def _tensor(self, ctx: int, name: str, shape: tuple[int, ...]) -> int:
        ne = (C.c_int64 * 4)(*reversed(shape))
        t = self.ggml.ggml_new_tensor(ctx, int(T.F32), len(shape), ne)
        self.ggml.ggml_set_name(t, name.encode())
        return t


@pytest.fixture(scope="module")
def llama_types() -> LlamaTypes:
    return LlamaTypes()


def _mla_to_kv_b(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """The legacy (pre-MLA-split) layout: one attn_kv_b per layer instead of attn_k_b + attn_v_b."""
    rows = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = [(n, s) for n, s in tensors if ".attn_v_b." not in n]
    return [(n.replace("attn_k_b", "attn_kv_b"), (rows, cfg.kv_lora_rank)) if ".attn_k_b." in n else (n, s) for n, s in out]


def _llama_like(n_layer: int, dense: bool) -> Tensors:
    """A GQA llama-style list (attn_q/k/v, attn_output, ffn_*), in scrambled file order."""
    rng = np.random.default_rng(0)
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output"]
    per_layer += ["ffn_gate", "ffn_up", "ffn_down"] if dense else ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    shape = (4096, 4096) if dense else (8, 4096, 4096)
    names = [f"blk.{i}.{p}.weight" for i in range(n_layer) for p in per_layer] + ["token_embd.weight", "output.weight"]
    return [(names[i], (4096, 4096) if "ffn" not in names[i] else shape) for i in rng.permutation(len(names))]


def _scenarios(k25: ModelConfig, k25_tensors: Tensors) -> Iterator[tuple[str, LlamaHparams, int, Tensors]]:
    """(label, hparams, n_head, tensors): the real K2.5 and lists reaching the other branches."""
    hp = hparams_of(k25)
    heads = k25.num_attention_heads
    yield "k2.5", hp, heads, k25_tensors
    kv_b = _mla_to_kv_b(k25_tensors, k25)
    yield "k2.5-kv_b-gqa1", LlamaHparams(hp.n_layer, hp.n_expert, 1), heads, kv_b
    yield "k2.5-kv_b-mqa", hp, heads, kv_b
    yield "k2.5-kv_b-8experts-tied", LlamaHparams(hp.n_layer, 8, 1), heads, [t for t in kv_b if t[0] != "output.weight"]
    yield "llama-dense", LlamaHparams(32, 0, 4), 32, _llama_like(32, dense=True)
    yield "llama-8experts", LlamaHparams(32, 8, 4), 32, _llama_like(32, dense=False)
    gaps = [t for t in _llama_like(32, True) if t[0] not in ("blk.0.ffn_down.weight", "blk.5.ffn_down.weight")]
    yield "llama-dense-ffn_down-gaps", LlamaHparams(32, 0, 4), 32, gaps  # dense: a counter, not the layer
    yield "llama-gqa1-tied", LlamaHparams(32, 0, 1), 32, [t for t in _llama_like(32, True) if t[0] != "output.weight"]


@pytest.mark.oracle
def test_types_match_llama_cpp_on_many_models(llama_types: LlamaTypes, k25: ModelConfig, k25_tensors: Tensors) -> None:
    """Every ftype llama.cpp knows rules for (IQ ones included: types only, no imatrix check)."""
    failures = []
    for label, hp, n_head, tensors in _scenarios(k25, k25_tensors):
        for ftype in RULE_FTYPES:
            ref = llama_types.types(ftype, hp, n_head, tensors, {})
            ours = choose_types(ftype, hp, tensors)
            failures += [(label, ftype, n, ref[n].name, ours[n].name) for n in ref if ref[n] != ours[n]]
    assert not failures, failures[:20]


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["IQ2_XXS", "Q3_K_M", "Q4_K_M", "IQ3_XS"])
def test_overrides_match_llama_cpp(llama_types: LlamaTypes, k25: ModelConfig, k25_tensors: Tensors, ftype: str) -> None:
    """--override'd tensors skip the rules in both (counters stay); the others' types agree."""
    overrides = {r"blk\.1\.ffn_down_exps": T.Q8_0, r"blk\.3\.ffn_down": T.Q5_K, r"blk\.0\.attn_kv_b": T.Q8_0,
                 r"blk\.2\.ffn_(gate|up)_exps": T.Q6_K}  # fmt: skip
    tensors = _mla_to_kv_b(k25_tensors, k25)
    skip = {n for n, _ in tensors if any(re.search(p, n) for p in overrides)}
    assert len(skip) == 6
    hp = LlamaHparams(k25.num_hidden_layers, k25.n_routed_experts, 1)
    ref = llama_types.types(ftype, hp, k25.num_attention_heads, tensors, overrides)
    ours = choose_types(ftype, hp, tensors, skip=skip)
    assert ours == {n: q for n, q in ref.items() if n not in skip}


# ---- end to end: llama_model_quantize vs k2conv quantize on the tiny K2.5 -----------------------------------


@pytest.fixture(scope="module")
def tiny(synth_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, our F32 GGUF of it): llama-quantize's input."""
    src = synth_ckpt("k2.5")
    f32 = tmp_path_factory.mktemp("ftypes") / "f32.gguf"
    code, text = run_cli("quantize", src, f32, "--recipe", "f32", "--quiet", "--no-mmproj", "--workers", "1")
    assert code == 0, text
    return src, f32


def llama_quantize(f32: Path, out: Path, ftype: str, overrides: dict[str, GGMLQuantizationType] | None = None) -> int:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FILE_TYPE_IDS[ftype], 2
    overrides = overrides or {}
    tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, q) in enumerate(overrides.items()):
        tt[i].pattern, tt[i].type = pattern.encode(), int(q)
    if overrides:
        params.tt_overrides = C.cast(tt, type(params.tt_overrides))
    return llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), C.byref(params))


def tensors_of(path: Path) -> dict[str, tuple[GGMLQuantizationType, bytes]]:
    return {t.name: (T(t.tensor_type), np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def k2conv_quantize(src: Path, out: Path, recipe: str, *overrides: str) -> Path:
    args = [a for o in overrides for a in ("--override", o)]
    code, text = run_cli("quantize", src, out, "--recipe", recipe, *args, "--quiet", "--no-mmproj", "--workers", "1")
    assert code == 0, text
    return out


def assert_same_tensors(ref: Path, ours: Path, exact_bytes_except: tuple[str, ...] = ()) -> None:
    a, b = tensors_of(ref), tensors_of(ours)
    assert a.keys() == b.keys()
    types = [(n, a[n][0].name, b[n][0].name) for n in a if a[n][0] != b[n][0]]
    assert not types, types
    differ = [n for n in a if a[n][1] != b[n][1] and not any(s in n for s in exact_bytes_except)]
    assert not differ, [(n, a[n][0].name) for n in differ]


E2E_FTYPES = ["Q4_K_M", "Q2_K", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q4_K_S", "Q5_K_M", "Q6_K", "IQ4_XS"]


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", E2E_FTYPES)
def test_same_tensors_as_llama_quantize(tiny: tuple[Path, Path], tmp_path: Path, ftype: str) -> None:
    src, f32 = tiny
    assert llama_quantize(f32, tmp_path / "llama.gguf", ftype) == 0
    assert_same_tensors(tmp_path / "llama.gguf", k2conv_quantize(src, tmp_path / "ours.gguf", ftype))


@pytest.mark.oracle
def test_overrides_same_tensors_as_llama_quantize(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """--override = llama-quantize --tensor-type: rules skipped, the row fallback still applies
    (attn_k_b Q4_K → Q5_0)."""
    src, f32 = tiny
    overrides = {"ffn_down_exps": T.Q5_K, "attn_k_b": T.Q4_K, r"blk\.0\.ffn_down": T.Q8_0}
    assert llama_quantize(f32, tmp_path / "llama.gguf", "Q4_K_M", overrides) == 0
    ours = k2conv_quantize(src, tmp_path / "ours.gguf", "Q4_K_M", *(f"{p}={q.name}" for p, q in overrides.items()))
    assert_same_tensors(tmp_path / "llama.gguf", ours)


@pytest.mark.oracle
def test_q4_0_routed_experts_are_repacked_losslessly(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Q4_0 ftype: same types; routed experts (INT4 in K2.5) are repacked exactly by k2conv where
    llama-quantize re-quantizes their float values, so only those bytes may differ, and ours
    dequantize to the F32 file's values exactly."""
    from gguf.quants import dequantize

    src, f32 = tiny
    assert llama_quantize(f32, tmp_path / "llama.gguf", "Q4_0") == 0
    ours = k2conv_quantize(src, tmp_path / "ours.gguf", "Q4_0")
    assert_same_tensors(tmp_path / "llama.gguf", ours, exact_bytes_except=("_exps.",))
    ref = {t.name: np.asarray(t.data) for t in GGUFReader(f32).tensors}
    for t in GGUFReader(ours).tensors:
        if "_exps." in t.name:
            assert np.array_equal(dequantize(np.asarray(t.data), T.Q4_0).reshape(ref[t.name].shape), ref[t.name])


@pytest.mark.oracle
def test_llama_quantize_also_refuses_q2_k_s_without_imatrix(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    assert llama_quantize(tiny[1], tmp_path / "llama.gguf", "Q2_K_S") != 0
