"""Expert cache (budget, LRU/LFU order, counters), placement, O_DIRECT reads and routing statistics.

Oracles: scripted access sequences whose eviction order is worked out by hand; the runner without any
cache (`KimiModel`'s default expert_fn) for logits; mmap reads for direct reads; `k2conv relayout`'s
own reader of routing statistics (the record order it writes) for the statistics file.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType

from k2conv.cli import main
from k2conv.errors import K2ConvError
from k2conv.infer import direct_io
from k2conv.infer.direct_io import DirectReader
from k2conv.infer.expert_cache import ExpertCache, load_model
from k2conv.infer.model import KimiModel
from k2conv.infer.qmatmul import pack, packable
from k2conv.infer.verify import builtin_prompts, run_verify
from k2conv.infer.weights import PROJS, ExpertRecord, ReadStats, open_weights

K2CONV = [sys.executable, "-m", "k2conv.cli"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads on a shared CPU (see tests/test_infer.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the policy on scripted sequences (a fake source: sizes chosen per expert) -----------------------------


class FakeSource:
    """expert_record only: each expert is `size[e]` bytes of F32 (three parts), counted like a GGUF."""

    def __init__(self, sizes: dict[int, int]):
        self.sizes, self.stats, self.fetched = sizes, ReadStats(), []

    def expert_record(self, layer: int, e: int) -> ExpertRecord:
        self.fetched.append((layer, e))
        n = self.sizes[e]
        parts = {p: (i * n // 3, n // 3, GGMLQuantizationType.F32, (1, n // 12)) for i, p in enumerate(PROJS)}
        return ExpertRecord(np.zeros(n, np.uint8), parts, reads=3, borrowed=False)


def run(cache: ExpertCache, seq: list[int], layer: int = 1) -> list[bool]:
    """Access experts in order; return hit (True) / miss per access."""
    hits = []
    for e in seq:
        before = cache.stats.hits
        cache.access(layer, e)
        hits.append(cache.stats.hits > before)
    return hits


def test_lru_evicts_least_recently_used() -> None:
    cache = ExpertCache(FakeSource(dict.fromkeys(range(6), 120)), "cpu", store="raw", budget=360, policy="lru")
    # A B C fill the budget; A is touched; D evicts B (least recent), E evicts C, B evicts A.
    assert run(cache, [0, 1, 2, 0, 3, 4, 1]) == [False, False, False, True, False, False, False]
    assert list(cache.entries) == [(1, 3), (1, 4), (1, 1)]
    assert cache.stats.evictions == 3 and cache.used == 360


def test_lfu_evicts_least_frequently_used_with_recency_ties() -> None:
    cache = ExpertCache(FakeSource(dict.fromkeys(range(6), 120)), "cpu", store="raw", budget=360, policy="lfu")
    # counts after 0 0 0 1 2 2: {0: 3, 1: 1, 2: 2}; 3 evicts 1; then 3 (count 1, newest) vs 2 (2): 4 evicts 3.
    assert run(cache, [0, 0, 0, 1, 2, 2, 3, 4]) == [False, True, True, False, False, True, False, False]
    assert set(cache.entries) == {(1, 0), (1, 2), (1, 4)}
    # LRU on the same sequence would have evicted 0 (least recent) first.
    lru = ExpertCache(FakeSource(dict.fromkeys(range(6), 120)), "cpu", store="raw", budget=360, policy="lru")
    run(lru, [0, 0, 0, 1, 2, 2, 3, 4])
    assert set(lru.entries) == {(1, 2), (1, 3), (1, 4)}


def test_lfu_aging_lets_old_favourites_go() -> None:
    sizes = dict.fromkeys(range(6), 120)
    cache = ExpertCache(FakeSource(sizes), "cpu", store="raw", budget=240, policy="lfu", aging_period=4)
    run(cache, [0, 0, 0])  # count(0) = 3; the 4th access halves every stored count before counting
    run(cache, [1])  # tick 4: 0 → 1, then 1 gets 1; tie broken by recency: 0 is older
    run(cache, [2])  # evicts 0, which without aging (count 3) would have stayed
    assert set(cache.entries) == {(1, 1), (1, 2)}
    plain = ExpertCache(FakeSource(sizes), "cpu", store="raw", budget=240, policy="lfu", aging_period=10**9)
    run(plain, [0, 0, 0, 1, 2])
    assert set(plain.entries) == {(1, 0), (1, 2)}


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_budget_is_never_exceeded(policy: str) -> None:
    rng = np.random.default_rng(3)
    sizes = {e: int(rng.integers(30, 300)) * 3 for e in range(40)}
    budget = 1000
    cache = ExpertCache(FakeSource(sizes), "cpu", store="raw", budget=budget, policy=policy, aging_period=50)
    for e in rng.zipf(1.5, 3000) % 40:
        cache.access(int(e) % 3, int(e))
        assert cache.used <= budget and cache.used == sum(x.nbytes for x in cache.entries.values())
    assert cache.peak_used <= budget and cache.stats.hits > 0 and cache.stats.evictions > 0
    assert cache.stats.accesses == cache.stats.hits + cache.stats.misses == 3000


def test_unbounded_second_pass_hits_and_budget_zero_always_misses() -> None:
    seq = [0, 3, 1, 3, 2, 0, 4]
    cache = ExpertCache(FakeSource(dict.fromkeys(range(5), 90)), "cpu", store="raw", budget=None)
    run(cache, seq)
    cache.reset_stats()
    assert all(run(cache, seq)) and cache.stats.hit_rate == 1.0 and cache.stats.reads == 0
    zero = ExpertCache(FakeSource(dict.fromkeys(range(5), 90)), "cpu", store="raw", budget=0)
    assert not any(run(zero, seq + seq)) and zero.used == 0 and zero.stats.reads == 3 * len(seq) * 2
    assert zero.stats.bytes_read == 90 * len(seq) * 2


def test_uncounted_block_fills_the_cache_but_not_the_counters() -> None:
    cache = ExpertCache(FakeSource(dict.fromkeys(range(5), 90)), "cpu", store="raw")
    with cache.uncounted():
        run(cache, [0, 1])
    assert cache.stats.accesses == 0 and set(cache.entries) == {(1, 0), (1, 1)}
    assert run(cache, [0, 2]) == [True, False] and cache.stats.accesses == 2 and cache.stats.reads == 3


def test_counters_per_layer_usage() -> None:
    cache = ExpertCache(FakeSource(dict.fromkeys(range(5), 90)), "cpu", store="raw")
    run(cache, [0, 1, 0], layer=1)
    run(cache, [4], layer=2)
    assert cache.stats.per_layer_use == {1: {0: 2, 1: 1}, 2: {4: 1}}


# ---- on the tiny model: logits identical with and without the cache ---------------------------------------


@pytest.fixture(scope="module")
def files(synth_ckpt, tmp_path_factory) -> dict[str, Path]:
    """A q4_0-native GGUF of the tiny k2.5 checkpoint, an F32 one, and the relayout of each."""
    from k2conv.layouts.relayout import relayout

    d = tmp_path_factory.mktemp("cache")
    out: dict[str, Path] = {"src": synth_ckpt("k2.5")}
    for recipe in ("q4_0-native", "f32"):
        gguf = d / f"{recipe}.gguf"
        subprocess.run([*K2CONV, "quantize", str(out["src"]), str(gguf), "--quiet", "--recipe", recipe, "--no-mmproj"],
                       check=True, capture_output=True)  # fmt: skip
        out[recipe] = gguf
        out[f"{recipe}-relayout"] = d / f"{recipe}-relayout.gguf"
        relayout([gguf], out[f"{recipe}-relayout"], align=4096)
    return out


def ids_of(src) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [[int(t) for t in rng.integers(0, src.config.vocab_size - 256, n)] for n in (7, 19)]


@pytest.mark.parametrize("kind", ["q4_0-native", "f32-relayout"])
@pytest.mark.parametrize(("policy", "experts", "store"),
                         [("lru", None, "raw"), ("lfu", 0, "raw"), ("lru", 2.5, "raw"), ("lfu", 2.5, "float"),
                          ("lru", None, "float"), ("lru", None, "packed"), ("lfu", 2.5, "packed")])  # fmt: skip
def test_logits_identical_with_and_without_cache(files, kind: str, policy: str, experts: float | None,
                                                 store: str) -> None:  # fmt: skip
    """`experts`: the budget in expert entries (None: unbounded; 2.5: fewer than one token's routed set)."""
    src = open_weights(files[kind])
    rec = src.expert_record(1, 0)
    entry = rec.data.nbytes if store == "raw" else sum(4 * r * c for _, _, _, (r, c) in rec.parts.values())
    if store == "packed" and all(packable(t) for _, _, t, _ in rec.parts.values()):  # else float entries
        entry = sum(pack(rec.data[o : o + n], t, shape).nbytes for o, n, t, shape in rec.parts.values())
    budget = None if experts is None else int(experts * entry)
    # packed experts multiply in another summation order than float ones: the same store without a cache
    # (every expert fetched and dropped) is the reference; raw and float both give float matrices
    plain = ExpertCache(src, "cpu", budget=0, store="packed") if store == "packed" else None
    want = [KimiModel(src, expert_fn=plain)(ids) for ids in ids_of(src)]
    cache = ExpertCache(src, "cpu", budget=budget, policy=policy, store=store)
    model = KimiModel(src, expert_fn=cache)
    for _ in range(2):
        for ids, w in zip(ids_of(src), want):
            assert torch.equal(model(ids), w)
    st = cache.stats
    assert st.accesses == st.hits + st.misses > 0 and cache.peak_used <= (budget if budget is not None else 1 << 60)
    if budget == 0:
        assert st.hits == 0
    if budget is None:  # everything fits: the second pass over the same prompts only hits
        first = ExpertCache(src, "cpu", budget=None, policy=policy, store=store)
        m = KimiModel(src, expert_fn=first)
        for ids in ids_of(src):
            m(ids)
        first.reset_stats()
        for ids in ids_of(src):
            m(ids)
        assert first.stats.hit_rate == 1.0 and first.stats.bytes_read == 0
    src.close()


def test_float_store_and_load_model_budget(files) -> None:
    src = open_weights(files["q4_0-native"])
    ids = ids_of(src)[1]
    want = KimiModel(src)(ids)
    model, cache, _ = load_model(src, "cpu", budget=200_000_000, store="float")
    assert torch.equal(model(ids), want)
    assert cache.budget == 200_000_000 - model.resident_bytes > 0
    # float entries of a q4_0 expert are 32/4.5 ≈ 7x larger than raw ones
    assert ExpertCache(src, "cpu").store == "packed" and ExpertCache(src, "cuda").store == "raw"  # store="auto"
    raw = ExpertCache(src, "cpu", store="raw")
    raw.access(1, 0)
    assert cache.entries[next(iter(cache.entries))].nbytes > 6 * raw.entries[(1, 0)].nbytes
    packed = ExpertCache(src, "cpu")  # int8 + a float32 scale per 32 weights: 36 bytes against Q4_0 block of 18
    packed.access(1, 0)
    assert packed.entries[(1, 0)].nbytes == pytest.approx(2 * raw.entries[(1, 0)].nbytes, rel=0.01)


def test_resident_weights_over_budget_is_a_clean_error(files) -> None:
    src = open_weights(files["q4_0-native"])
    with pytest.raises(K2ConvError, match=r"q4_0-native\.gguf: resident .* need more than 1,000,000 bytes"):
        load_model(src, "cpu", budget=1_000_000)
    result = CliRunner().invoke(main, ["verify", str(files["q4_0-native"]), "--reference", str(files["src"]),
                                       "--device", "cpu", "--vram-budget", "1M"])  # fmt: skip
    assert result.exit_code == 2 and "resident (non-expert) weights need more than" in result.output


# ---- O_DIRECT reads --------------------------------------------------------------------------------------


def o_direct_works(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | direct_io.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_direct_reader_reads_unaligned_ranges(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 77, dtype=np.uint8)
    f = tmp_path / "blob.bin"
    f.write_bytes(data.tobytes())
    r = DirectReader(f, pin=False)
    assert r.direct == o_direct_works(f) and (r.note == "") == r.direct
    for off, n in [(0, 1), (5, 4096), (4095, 2), (4096, 4096), (3 * 4096, 77), (100, 3 * 4096 - 23)]:
        assert np.array_equal(r.read(off, n), data[off : off + n])
    assert r.reads == 6 and r.device_bytes >= r.bytes
    with pytest.raises(K2ConvError, match="cut short"):
        r.read(len(data) - 10, 20)
    r.close()


@pytest.fixture()
def no_o_direct(monkeypatch):
    """A filesystem that refuses O_DIRECT (tmpfs before Linux 6.6, many FUSE/network mounts): EINVAL on open."""
    real_open = os.open

    def fake_open(path, flags, *a, **k):
        if flags & direct_io.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(direct_io.os, "open", fake_open)


@pytest.mark.parametrize("kind", ["q4_0-native", "q4_0-native-relayout", "f32-relayout"])
@pytest.mark.parametrize("fallback", [False, True])
def test_direct_io_logits_equal_mmap(files, kind: str, fallback: bool, request) -> None:
    if fallback:
        request.getfixturevalue("no_o_direct")
    ids = ids_of(open_weights(files[kind]))
    # raw entries: the bytes stay in the cache as read, so a buffer reused too early would show in the logits
    mm_model, mm_cache, _ = load_model(open_weights(files[kind]), "cpu", budget=300_000_000, io="mmap", store="raw")
    src = open_weights(files[kind])
    model, cache, notes = load_model(src, "cpu", budget=300_000_000, io="direct", store="raw")
    readers = list(src._direct.values())
    if fallback:
        assert not readers[0].direct and any("refuses O_DIRECT" in n for n in notes)
    else:
        assert readers[0].direct == o_direct_works(files[kind])
    for x in ids:
        assert torch.equal(model(x), mm_model(x))
    assert cache.stats.bytes_read == mm_cache.stats.bytes_read > 0
    per_miss = 1 if "relayout" in kind else 3  # one record, or three slices of the merged tensors
    assert cache.stats.reads == per_miss * cache.stats.misses == sum(r.reads for r in readers)
    src.close()


def test_direct_io_budget_zero_rereads_through_one_buffer(files) -> None:
    """With nothing stored every access reads again into the same reused buffer; logits must not notice."""
    path = files["q4_0-native-relayout"]
    src = open_weights(path)
    want = KimiModel(src)(ids_of(src)[1])
    model, cache, _ = load_model(open_weights(path), "cpu", budget=None, io="direct", store="raw")
    cache.budget = 0
    assert torch.equal(model(ids_of(src)[1]), want) and cache.stats.hits == 0


# ---- verify: speed figures and the routing statistics round trip --------------------------------------------


def test_verify_reports_decode_and_cache_figures(files) -> None:
    src = files["src"]
    prompts = builtin_prompts(open_weights(src).config, n=2)
    report = run_verify(files["q4_0-native"], src, prompts, device="cpu", cache_policy="lfu", io="direct",
                        max_new_tokens=4)  # fmt: skip
    sp = report["speed"]["model"]
    assert sp["decode_tokens"] == 4 and sp["decode_tok_s"] > 0 and sp["peak_rss_bytes"] > 0
    assert sp["cache_policy"] == "lfu" and sp["io"] == "direct"
    # the default budget holds every tiny expert and the prefill saw them all: decoding reads nothing
    assert sp["cache_hit_rate"] == 1.0 and sp["bytes_read_per_token"] == 0 == sp["reads_per_token"]
    # decode counters are per token: at most k experts per MoE layer can miss, 3 reads each
    cfg = open_weights(src).config
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert sp["reads_per_token"] <= 3 * cfg.num_experts_per_tok * moe_layers
    stats = report["routing_stats"]
    total = sum(len(p) for p in prompts) + 4
    assert stats["version"] == 1 and set(stats["layers"]) == {str(i) for i in range(1, cfg.num_hidden_layers)}
    assert all(sum(v.values()) == total * cfg.num_experts_per_tok for v in stats["layers"].values())


def test_routing_stats_round_trip_into_hot_first_relayout(files, tmp_path: Path) -> None:
    from k2conv.layouts.relayout import open_layout

    stats = tmp_path / "routing.json"
    runner = CliRunner()
    result = runner.invoke(main, ["verify", str(files["q4_0-native"]), "--reference", str(files["src"]), "--device",
                                  "cpu", "--max-new-tokens", "2", "--save-routing-stats", str(stats),
                                  "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.output and "hit rate" in result.output and "peak RSS" in result.output
    assert "routing_stats" not in json.loads((tmp_path / "r.json").read_text())
    use = {(int(k), int(e)): c for k, v in json.loads(stats.read_text())["layers"].items() for e, c in v.items()}
    out = tmp_path / "hot.gguf"
    result = runner.invoke(main, ["relayout", str(files["q4_0-native"]), str(out), "--order", "hot-first",
                                  "--stats", str(stats)])  # fmt: skip
    assert result.exit_code == 0, result.output
    _, lay = open_layout(out)
    order = sorted((lay.record(layer, e)[0], (layer, e)) for layer in lay.layers for e in range(lay.n_expert))
    counts = [use.get(key, 0) for _, key in order]
    assert counts == sorted(counts, reverse=True) and counts[0] == max(use.values())


# ---- GPU (skipped without CUDA) ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_cuda_cache_matches_cpu(files, io: str) -> None:
    path = files["q4_0-native-relayout"]
    ids = ids_of(open_weights(path))[1]
    cpu = KimiModel(open_weights(path), "cpu")(ids)
    src = open_weights(path)
    model, cache, _ = load_model(src, "cuda", budget=2_000_000_000, io=io, policy="lfu")
    got = model(ids)
    assert got.is_cuda and next(iter(cache.entries.values())).data.is_cuda
    assert src._staging.pin  # records are staged in pinned memory in both modes: the H2D copy is a DMA
    if io == "direct":
        assert next(iter(src._direct.values())).buffer.array.size
    assert float((got.cpu() - cpu).abs().max() / (cpu.max() - cpu.min())) <= 1e-4
    assert torch.cuda.max_memory_allocated() <= 2_000_000_000
