"""The size-budget solver and the K2.5 Q2_K-XL recipe: real K2.5 sizes from the config alone, and
a tiny synthetic checkpoint written with the solver's rules to the predicted byte."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from k2conv.cli import main
from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.config import load_config
from k2conv.convert.pipeline import make_plan
from k2conv.errors import K2ConvError
from k2conv.quant.solver import (
    LADDER,
    Point,
    SolverResult,
    estimate_error,
    lower_hull,
    model_errors,
    solve_target_size,
)
from k2conv.quant.types import WRITABLE, T

CONFIGS = Path(__file__).parent / "data" / "configs"
GB = 10**9
RECIPE = "k2.5-q2_k-xl"


@pytest.fixture(scope="module")
def k25():
    return load_config(CONFIGS / "k2.5.json")


@pytest.fixture(scope="module")
def k25_solved(k25) -> dict[int, SolverResult]:
    return {t: solve_target_size(k25, t * GB) for t in (345, 381, 450)}


def _class_bytes(result: SolverResult) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for row in result.mix:
        out[row.label] += row.nbytes
    return out


def _assert_rules_reproduce_mix(result: SolverResult) -> None:
    """The plan built from the rules has, per type, exactly the bytes the mix table lists."""
    by_type: dict[T, int] = defaultdict(int)
    for row in result.mix:
        by_type[row.qtype] += row.nbytes
    planned: dict[T, int] = defaultdict(int)
    for t in result.plan.tensors:
        if t.qtype != T.F32:
            planned[t.qtype] += t.nbytes
    assert dict(planned) == dict(by_type)


# ---- the real K2.5 config, no weights ------------------------------------------------------------
@pytest.mark.parametrize("target_gb", [345, 381, 450])
def test_k25_targets_land_within_half_a_percent(k25, k25_solved, target_gb: int) -> None:
    result = k25_solved[target_gb]
    target = target_gb * GB
    assert 0.995 * target <= result.total_bytes <= target
    # The size is the plan's, and the plan is what `make_plan` gives for the printed overrides.
    again = make_plan(k25, None, Path("k25.gguf"), "q4_0-native", result.overrides)
    assert again.total_size == result.total_bytes == result.plan.total_size
    _assert_rules_reproduce_mix(result)
    assert all(re.compile(pattern) for pattern, _ in result.rules)


def test_k25_more_budget_never_means_fewer_bits(k25_solved) -> None:
    small, mid, big = (_class_bytes(k25_solved[t]) for t in (345, 381, 450))
    assert small.keys() == mid.keys() == big.keys()
    for label in small:  # neighbouring budgets may trade a few MB between small classes, not 345 vs 450 GB
        assert small[label] <= big[label], label
    for c in ("routed gate/up", "routed down"):
        assert small[c] <= mid[c] <= big[c] and small[c] < big[c], c
    assert k25_solved[345].error > k25_solved[381].error > k25_solved[450].error


def test_k25_mix_has_the_dynamic_quant_shape(k25_solved) -> None:
    """At ~381 GB: experts at 2–3 bits, down above gate/up, small always-used matrices ≥ 5 bits."""
    result = k25_solved[381]
    bpw: dict[str, list[float]] = defaultdict(list)
    for row in result.mix:
        bpw[row.label] += [row.bpw] * row.tensors
    mean = {k: float(np.mean(v)) for k, v in bpw.items()}
    assert 2.6 <= mean["routed gate/up"] < mean["routed down"] <= 3.5
    for label in ("attention q", "attention kv_a", "attention k_b/v_b", "shared gate/up", "shared down"):
        assert mean[label] >= 5.5, (label, mean[label])


def test_k25_target_below_smallest_mix_is_one_line_error(k25) -> None:
    with pytest.raises(K2ConvError, match="below the smallest mix") as info:
        solve_target_size(k25, 200 * GB)  # every matrix TQ1_0 (1.69 bpw) is still ~220 GB
    assert "\n" not in str(info.value)


def test_k25_300_gb_uses_ternary_experts(k25) -> None:
    """Below an all-Q2_K file (337 GB) only the ternary types reach: 300 GB lands within 0.5 %."""
    result = solve_target_size(k25, 300 * GB)
    assert 0.995 * 300 * GB <= result.total_bytes <= 300 * GB
    assert result.plan.total_size == result.total_bytes
    types = {row.qtype for row in result.mix if row.label.startswith("routed")}
    assert types & {T.TQ1_0, T.TQ2_0}


def test_k25_solver_is_fast_and_beats_the_hand_recipe(k25) -> None:
    """At the recipe's own size the solver's mix has no more estimated error than the recipe's."""
    import time

    recipe_plan = make_plan(k25, None, Path("k25.gguf"), RECIPE)
    start = time.perf_counter()
    result = solve_target_size(k25, recipe_plan.total_size, base_recipe=RECIPE)
    assert time.perf_counter() - start < 10
    assert result.total_bytes <= recipe_plan.total_size
    assert result.error <= estimate_error(k25, recipe_plan.tensors)


def test_user_overrides_are_kept(k25) -> None:
    result = solve_target_size(k25, 381 * GB, overrides=[r"^token_embd\.weight$=Q8_0"])
    embd = next(t for t in result.plan.tensors if t.name == "token_embd.weight")
    assert embd.qtype == T.Q8_0
    assert all("token_embd" not in pattern for pattern, _ in result.rules)
    assert 0.995 * 381 * GB <= result.total_bytes <= 381 * GB


# ---- the recipe --------------------------------------------------------------------------------------
def test_k25_recipe_dry_run_is_in_the_375_381_gb_class() -> None:
    result = CliRunner().invoke(
        main, ["quantize", str(CONFIGS / "k2.5.json"), "k25.gguf", "--recipe", RECIPE, "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    total = int(re.search(r"total: ([\d,]+) bytes", result.output).group(1).replace(",", ""))
    assert 375 * GB <= total <= 381 * GB
    types = {t.qtype for t in make_plan(load_config(CONFIGS / "k2.5.json"), None, Path("k25.gguf"), RECIPE).tensors}
    assert types <= set(WRITABLE) and {T.Q2_K, T.Q3_K} <= types


# ---- the error model ---------------------------------------------------------------------------------
def test_error_model_orders_types_and_int4_needs_its_own_table() -> None:
    table = model_errors()
    g = table["gaussian"]
    chain = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
    assert all(g[a] > g[b] for a, b in itertools.pairwise(chain))
    assert 0.05 < g[T.Q2_K] < 0.15 and g[T.Q8_0] < 1e-4  # textbook relative MSEs on N(0, 1)
    assert table["int4"][T.Q4_K] < g[T.Q4_K]  # 16 levels per group fit 4-bit grids better


def test_lower_hull_keeps_only_convex_decreasing_steps() -> None:
    pts = [Point(T.Q2_K, 10, 9.0), Point(T.Q3_K, 20, 4.0), Point(T.IQ4_XS, 25, 3.9),
           Point(T.Q4_K, 30, 1.0), Point(T.Q5_K, 30, 2.0), Point(T.Q6_K, 40, 1.5)]
    assert [p.qtype for p in lower_hull(pts)] == [T.Q2_K, T.Q3_K, T.Q4_K]


# ---- the tiny synthetic checkpoint, errors measured on its rows ---------------------------------------
def test_synthetic_target_is_hit_and_written_to_the_byte(synth_ckpt, tmp_path: Path) -> None:
    src = synth_ckpt("k2.5")
    ckpt = Checkpoint(src)
    largest = solve_target_size(ckpt.config, 10**12, ckpt=ckpt)  # above everything: the largest useful mix
    assert any("above the largest" in n for n in largest.notes)
    with pytest.raises(K2ConvError, match="below the smallest mix"):
        solve_target_size(ckpt.config, largest.min_bytes - 1, ckpt=ckpt)
    target = (largest.min_bytes + largest.total_bytes) // 2
    result = solve_target_size(ckpt.config, target, ckpt=ckpt)
    assert result.measured == "checkpoint rows"
    assert 0.995 * target <= result.total_bytes <= target
    assert result.min_error > result.error > largest.error
    _assert_rules_reproduce_mix(result)

    out = tmp_path / "solved.gguf"
    args = ["quantize", str(src), str(out), "--no-mmproj", "--quiet"]
    for o in result.overrides:
        args += ["--override", o]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert out.stat().st_size == result.total_bytes


def test_synthetic_imatrix_weights_the_errors(synth_ckpt) -> None:
    ckpt = Checkpoint(synth_ckpt("k2.5"))
    rng = np.random.default_rng(0)
    plain = solve_target_size(ckpt.config, 10**12, ckpt=ckpt)
    imatrix = {t.name: rng.uniform(0.1, 10.0, (t.shape[0] if len(t.shape) == 3 else 1, t.shape[-1]))
               for t in plain.plan.tensors if t.name.endswith("_exps.weight")}
    target = (plain.min_bytes + plain.total_bytes) // 2
    result = solve_target_size(ckpt.config, target, ckpt=ckpt, imatrix=imatrix)
    assert result.measured == "checkpoint rows, imatrix-weighted"
    assert any("no imatrix entry" in n for n in result.notes)
    assert 0.995 * target <= result.total_bytes <= target
    bad = {next(iter(imatrix)): np.ones((1, 7))}
    with pytest.raises(K2ConvError, match="imatrix entry"):
        solve_target_size(ckpt.config, target, ckpt=ckpt, imatrix=bad)


def test_ladder_is_writable() -> None:
    assert set(LADDER) <= set(WRITABLE)
