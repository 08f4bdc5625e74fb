"""Pick a type for every matrix so the GGUF lands just under a size budget with the least error.

`k2conv quantize --target-size 380G` asks for "the best file that fits". The solver answers with
ordinary `--override REGEX=TYPE` rules, so the result is a recipe like any other: printable,
reproducible by hand, and planned by the same code that writes the file (the size it reports is
`make_plan(...).total_size` with those rules, never an estimate).

What it minimizes. Every quantized matrix adds noise to the residual stream of each token it
touches, in proportion to its *relative* squared error D = Σ h·(w − ŵ)² / Σ h·w² (h = imatrix
column weights, 1 without one): for y = W·x the output error energy relative to the output energy
is ≈ D, whatever the matrix's size or scale. The objective is Σ over matrices of importance × D.
The importance of a matrix is 1, times 2 for down projections (their input, the gated product, is
heavy-tailed and nothing normalizes their output before it joins the residual; llama.cpp's Q2_K,
Q3_K_M and Q4_K_M ftypes give ffn_down more bits for the same reason), times 2 in the first and last
MoE layers (they build and finish the representation every other layer reads; llama.cpp's
`use_more_bits` and Unsloth's dynamic quants protect them), times 2 for the output head (its error
lands in the logits with no later layer to absorb it). A layer's routed experts count once per
tensor, not once per expert: the top-k experts' outputs are summed with router weights, so their
noise adds up to about D times the MoE output energy, like one dense matrix. The consequence is
the usual dynamic-quant shape: small, always-used matrices (attention, shared experts) climb to
6–8 bits for a few GB, and the routed experts (97 % of the bytes) take what is left.

How D is known.
- With a checkpoint: a few rows of a few tensors per class are read, quantized with each candidate
  type (with the imatrix when one is given, as llama-quantize would) and dequantized with
  `gguf.quants.dequantize`; D is pooled over the samples.
- From a config alone: D per type is measured once per process on synthetic data (`model_errors`):
  Gaussian rows for BF16/FP8 sources, and Gaussian rows rounded to symmetric group-32 INT4 (the
  compressed-tensors format of K2.5/K2-Thinking experts) for INT4 sources. Block quantizers rescale
  every 16–32 values, so D depends on the distribution's shape only mildly and not on its scale;
  the Gaussian ratios between types are what the allocation needs (which step buys most per byte),
  and they are the textbook figures for K-quants. INT4 data is different enough to deserve its own
  table: it sits on 16 levels per group, so Q4_0 holds it exactly (the writer repacks INT4 → Q4_0
  losslessly, D = 0) and IQ4_XS/Q4_K/Q5_K re-quantize it with a real error.

How types are chosen. Each matrix gets the lower convex hull of its (bytes, importance × D) points
over `LADDER`; a greedy pass takes the hull step with the largest error reduction per byte that
still fits, skipping matrices whose next step does not fit (the classic marginal-gain allocation,
optimal on convex hulls up to the last partial step). A refine pass then takes single changes, or
pairs of one tensor up and another down, that lower the error and fit (the greedy cannot see
those); if the total is still more than `tolerance` under the target, which only happens when
tensors are coarse next to the file (tiny test models), the least harmful pair that lands inside
the window is taken. Ties between identical matrices go to the layers nearest the ends of the
model. Units are single tensors, so one step of the largest (one layer's routed gate, up or down:
~0.6 GB for K2.5) is far below 0.5 % of any reachable target. Pairs are searched over kinds of
interchangeable tensors (same candidates, same current choice), a few hundred for K2.5, with numpy.
"""

from __future__ import annotations

import heapq
import re
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.config import ModelConfig
from k2conv.convert.hf_layout import INT4
from k2conv.convert.plan import EXPERTS, K_B, V_B, Plan, PlannedTensor, pad
from k2conv.errors import K2ConvError
from k2conv.quant.quantize import quantize
from k2conv.quant.recipe import keeps_f32, load_recipe, parse_overrides
from k2conv.quant.types import WRITABLE, T, block_size, fit_to_row, tensor_bytes

# Candidate types, smallest first. The ternary TQ1_0/TQ2_0 (1.69/2.06 bpw, what "UD-TQ1_0" Kimi files
# use) only win where the budget is below an all-Q2_K file. Q4_1/Q5_0/Q5_1/IQ4_NL are left out: at their size a K-quant or
# IQ4_XS is better on float weights, and on INT4 weights Q4_0 is already exact (they still appear as
# llama.cpp's fallbacks for attn_k_b's 128-wide rows).
LADDER: tuple[GGMLQuantizationType, ...] = (T.TQ1_0, T.TQ2_0, T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
DOWN_WEIGHT = 2.0
EDGE_WEIGHT = 2.0
OUTPUT_WEIGHT = 2.0
SAMPLE_TENSORS = 3  # tensors per class read when measuring on a checkpoint (first, middle, last layer)
SAMPLE_SLICES = 2  # experts (or heads) per sampled tensor
SAMPLE_ROWS = 32  # rows per slice
DEFAULT_BASE_RECIPE = "q4_0-native"  # the CLI's default --recipe: its name is in the header

# GGUF family (name without `blk.N.`) → (class label, importance before the edge factor).
_FAMILIES: dict[str, tuple[str, float]] = {
    "ffn_gate_exps": ("routed gate/up", 1.0),
    "ffn_up_exps": ("routed gate/up", 1.0),
    "ffn_down_exps": ("routed down", DOWN_WEIGHT),
    "ffn_gate_shexp": ("shared gate/up", 1.0),
    "ffn_up_shexp": ("shared gate/up", 1.0),
    "ffn_down_shexp": ("shared down", DOWN_WEIGHT),
    "ffn_gate": ("dense gate/up", 1.0),
    "ffn_up": ("dense gate/up", 1.0),
    "ffn_down": ("dense down", DOWN_WEIGHT),
    "attn_q": ("attention q", 1.0),
    "attn_q_a": ("attention q", 1.0),
    "attn_q_b": ("attention q", 1.0),
    "attn_kv_a_mqa": ("attention kv_a", 1.0),
    "attn_k_b": ("attention k_b/v_b", 1.0),
    "attn_v_b": ("attention k_b/v_b", 1.0),
    "attn_output": ("attention output", 1.0),
    "token_embd": ("token embedding", 1.0),
    "output": ("output head", OUTPUT_WEIGHT),
}
_NAME_RE = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.weight$")


@dataclass(frozen=True)
class Point:
    """One candidate: the type actually written (after llama.cpp's row fallback), its padded bytes
    and its weighted error."""

    qtype: GGMLQuantizationType
    nbytes: int
    error: float


@dataclass
class Unit:
    """One quantizable tensor and where the solver stands on its hull."""

    tensor: PlannedTensor
    family: str
    layer: int | None
    label: str
    group: str  # "edge" for the first/last MoE layers, "" otherwise
    weight: float
    priority: int  # smaller is upgraded first among equals: distance to the nearest end of the model
    points: list[Point] = field(default_factory=list)  # every candidate, by size
    hull: list[Point] = field(default_factory=list)  # the greedy's steps
    chosen: Point = None  # type: ignore[assignment]  # the current candidate, set once points are known

    @property
    def int4(self) -> bool:
        return self.tensor.sources[0].storage == INT4


@dataclass(frozen=True)
class MixRow:
    """One line of the mix table: a class (and layer group) at one type."""

    label: str
    group: str
    qtype: GGMLQuantizationType
    tensors: int
    nbytes: int
    params: int

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.params if self.params else 0.0


@dataclass
class SolverResult:
    """The chosen mix: rules to pass as `--override`, the exact planned size, and a table."""

    target_bytes: int
    total_bytes: int  # make_plan(...).total_size with `overrides`
    min_bytes: int  # every matrix at its smallest candidate
    max_bytes: int  # every matrix at its largest useful candidate (approximate: same overhead)
    rules: list[tuple[str, GGMLQuantizationType]]
    mix: list[MixRow]
    error: float  # the objective at the chosen mix
    min_error: float  # the objective with every matrix at its smallest candidate
    measured: str  # "checkpoint rows", "checkpoint rows, imatrix-weighted" or "error model"
    plan: Plan
    notes: list[str] = field(default_factory=list)

    @property
    def overrides(self) -> list[str]:
        """`REGEX=TYPE` strings in order, ready for `make_plan(..., overrides=...)` or the CLI."""
        return [f"{pattern}={qtype.name}" for pattern, qtype in self.rules]

    def report(self) -> str:
        """What `--target-size` prints before planning: the mix, the size and the rules."""
        from k2conv.convert.pipeline import human

        share = self.total_bytes / self.target_bytes
        lines = [
            f"target {human(self.target_bytes)}: planned {self.total_bytes:,} bytes ({human(self.total_bytes)}, "
            f"{share:.2%} of target); reachable {human(self.min_bytes)} .. ~{human(self.max_bytes)}",
            f"  error estimate ({self.measured}): {self.error:.4g} (all-smallest mix: {self.min_error:.4g})",
            "  mix:",
        ]
        for row in self.mix:
            where = f"{row.label} ({row.group})" if row.group else row.label
            lines.append(f"    {where:34s} {row.qtype.name:7s} {row.tensors:4d} tensors "
                         f"{row.nbytes:>18,} B {human(row.nbytes):>11s} {row.bpw:5.2f} bpw")
        lines.append("  rules (as --override):")
        lines += [f"    '{o}'" for o in self.overrides]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- classes --------------------------------------------------------------------------------------
def edge_layers(cfg: ModelConfig) -> set[int]:
    """The first and last MoE layers: one at each end, one more per 30 MoE layers (2 + 2 for K2.5's 60).

    Unsloth-style quants and llama.cpp's `use_more_bits` both protect the ends; a couple of layers
    per end costs ~2 % of the expert bytes per step, so the solver can afford it at any budget."""
    moe = [layer for layer in range(cfg.num_hidden_layers) if cfg.is_moe_layer(layer)]
    n = max(1, len(moe) // 30)
    return set(moe[:n]) | set(moe[-n:])


def _unit(t: PlannedTensor, cfg: ModelConfig, edges: set[int]) -> Unit:
    m = _NAME_RE.match(t.name)
    if m is None:  # pragma: no cover - keeps_f32 filters everything not ending in .weight
        raise AssertionError(t.name)
    layer = int(m.group(1)) if m.group(1) is not None else None
    family = m.group(2)
    label, weight = _FAMILIES.get(family, (family, 1.0))
    group = "edge" if layer in edges else ""
    if group:
        weight *= EDGE_WEIGHT
    n = cfg.num_hidden_layers
    priority = 0 if layer is None else min(layer, n - 1 - layer)
    return Unit(t, family, layer, label, group, weight, priority)


def quantizable_units(cfg: ModelConfig, tensors: list[PlannedTensor]) -> list[Unit]:
    """Every tensor a type rule can change (llama.cpp keeps norms, router and biases F32)."""
    edges = edge_layers(cfg)
    return [_unit(t, cfg, edges) for t in tensors if not keeps_f32(t.name, len(t.shape))]


# ---- error model ------------------------------------------------------------------------------------
def _int4_like(x: np.ndarray, group: int = 32) -> np.ndarray:
    """`x` rounded like compressed-tensors' symmetric INT4 (scale = absmax / 7.5 per group, bf16)."""
    g = x.reshape(x.shape[0], -1, group)
    scale = np.abs(g).max(axis=-1, keepdims=True) / np.float32(7.5)
    scale = (scale.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # to bf16
    scale[scale == 0] = 1
    q = np.clip(np.rint(g / scale), -8, 7)
    return (q * scale).reshape(x.shape).astype(np.float32)


def _sq_error(rows: np.ndarray, qtype: GGMLQuantizationType, h: np.ndarray | None) -> tuple[float, float]:
    """(Σ h·(w − ŵ)², Σ h·w²) of `rows` quantized to `qtype` and back."""
    if qtype == T.F32:
        back = rows
    else:
        back = np.asarray(dequantize(quantize(rows, qtype, h), qtype), dtype=np.float32).reshape(rows.shape)
    weights = np.ones(rows.shape[-1], dtype=np.float64) if h is None else h.astype(np.float64)
    diff = (rows.astype(np.float64) - back) ** 2
    return float((diff * weights).sum()), float((rows.astype(np.float64) ** 2 * weights).sum())


@lru_cache(maxsize=1)
def model_errors() -> dict[str, dict[GGMLQuantizationType, float]]:
    """Relative squared error of every writable type on Gaussian and on INT4-like rows (measured
    once per process; 64 rows of 4096, fixed seed, so the table is deterministic)."""
    rng = np.random.default_rng(20250101)
    gauss = rng.standard_normal((64, 4096)).astype(np.float32)
    data = {"gaussian": gauss, "int4": _int4_like(gauss)}
    table: dict[str, dict[GGMLQuantizationType, float]] = {}
    for kind, rows in data.items():
        table[kind] = {}
        for qtype in WRITABLE:
            num, den = _sq_error(rows, qtype, None)
            table[kind][qtype] = num / den
    return table


def _rows(ckpt: Checkpoint, t: PlannedTensor, index: int, rng: np.random.Generator) -> np.ndarray:
    """A few float32 rows (last axis = ne0) of expert / head `index` of `t`, as the writer builds them."""
    cfg = ckpt.config
    if t.kind in (K_B, V_B):
        per_head = cfg.qk_nope_head_dim + cfg.v_head_dim
        kv_b = ckpt.read(t.sources[0], slice(index * per_head, (index + 1) * per_head))
        if t.kind == K_B:
            return np.ascontiguousarray(kv_b[: cfg.qk_nope_head_dim].T[:SAMPLE_ROWS])
        return np.ascontiguousarray(kv_b[cfg.qk_nope_head_dim :][:SAMPLE_ROWS])
    w = t.sources[index] if t.kind == EXPERTS else t.sources[0]
    n = w.shape[0]
    start = int(rng.integers(0, max(1, n // 128))) * 128 if n > 128 else 0  # FP8 reads start on 128-row blocks
    return ckpt.read(w, slice(start, min(n, start + SAMPLE_ROWS)))


def _imatrix_row(imatrix: Mapping[str, np.ndarray] | None, t: PlannedTensor, index: int) -> np.ndarray | None:
    """The importance vector llama-quantize would pass for slice `index` of `t` (None when absent)."""
    if imatrix is None or t.name not in imatrix:
        return None
    arr = np.asarray(imatrix[t.name], dtype=np.float32)
    arr = arr.reshape(-1, arr.shape[-1])
    if arr.shape[-1] != t.shape[-1]:
        raise K2ConvError(f"imatrix entry {t.name}: rows of {arr.shape[-1]} values, the tensor's rows have {t.shape[-1]}")
    return arr[min(index, arr.shape[0] - 1)]


def _samples(ckpt: Checkpoint, units: list[Unit], imatrix: Mapping[str, np.ndarray] | None
             ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(rows, imatrix row) pairs from up to SAMPLE_TENSORS tensors of one class, spread over layers."""
    picks = sorted({0, len(units) // 2, len(units) - 1})[:SAMPLE_TENSORS]
    out = []
    for i in picks:
        t = units[i].tensor
        rng = np.random.default_rng(zlib.crc32(t.name.encode()))
        n_slices = t.shape[0] if len(t.shape) == 3 else 1
        for index in sorted(set(rng.integers(0, n_slices, SAMPLE_SLICES).tolist())):
            out.append((_rows(ckpt, t, index, rng), _imatrix_row(imatrix, t, index)))
    return out


def measure_errors(ckpt: Checkpoint, units: list[Unit], imatrix: Mapping[str, np.ndarray] | None
                   ) -> dict[str, dict[GGMLQuantizationType, float]]:
    """Relative (imatrix-weighted) squared error per class and written type, on sampled real rows."""
    by_class: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        by_class[u.label].append(u)
    table: dict[str, dict[GGMLQuantizationType, float]] = {}
    for label, members in by_class.items():
        members.sort(key=lambda u: (u.layer is None, u.layer, u.tensor.name))
        types = {fit_to_row(q, u.tensor.shape[-1]) for u in members for q in LADDER}
        samples = _samples(ckpt, members, imatrix)
        table[label] = {}
        for qtype in types:
            num = den = 0.0
            for rows, h in samples:
                if rows.shape[-1] % block_size(qtype) == 0:  # k_b's 128-wide rows only take the fallbacks
                    a, b = _sq_error(rows, qtype, h)
                    num, den = num + a, den + b
            table[label][qtype] = num / den if den > 0 else 0.0
    return table


def _config_errors(units: list[Unit]) -> dict[str, dict[GGMLQuantizationType, float]]:
    """The error model's table for each class: INT4-like for INT4 sources, Gaussian otherwise."""
    model = model_errors()
    return {u.label: model["int4" if u.int4 else "gaussian"] for u in units}


# ---- hulls and the greedy -------------------------------------------------------------------------
def _points(u: Unit, errors: Mapping[GGMLQuantizationType, float]) -> list[Point]:
    """Candidates of one tensor after the row fallback, one per written type."""
    best: dict[GGMLQuantizationType, Point] = {}
    for q in LADDER:
        written = fit_to_row(q, u.tensor.shape[-1])
        exact = u.int4 and written == T.Q4_0  # the writer repacks INT4 into Q4_0 bit-exactly
        d = 0.0 if exact else errors[written]
        best[written] = Point(written, pad(tensor_bytes(written, u.tensor.shape)), u.weight * d)
    return sorted(best.values(), key=lambda p: (p.nbytes, p.error))


def lower_hull(points: list[Point]) -> list[Point]:
    """Lower convex hull of (bytes, error), error strictly falling: the only steps a greedy needs."""
    hull: list[Point] = []
    for p in points:
        if hull and p.nbytes == hull[-1].nbytes:
            continue  # same size, sorted by error: the first one is better
        if hull and p.error >= hull[-1].error:
            continue
        while len(hull) >= 2 and _ratio(hull[-2], hull[-1]) <= _ratio(hull[-2], p):
            hull.pop()
        hull.append(p)
    return hull


def _ratio(a: Point, b: Point) -> float:
    return (a.error - b.error) / (b.nbytes - a.nbytes)


def _greedy(units: list[Unit], free: int) -> int:
    """Take hull steps by error saved per byte while they fit; returns the bytes still free."""
    pos = [0] * len(units)
    heap = [(-_ratio(u.hull[0], u.hull[1]), u.priority, i) for i, u in enumerate(units) if len(u.hull) > 1]
    heapq.heapify(heap)
    while heap:
        _, _, i = heapq.heappop(heap)
        u = units[i]
        step = u.hull[pos[i] + 1].nbytes - u.hull[pos[i]].nbytes
        if step > free:
            continue  # this tensor's next step does not fit; smaller ones of other tensors may
        free -= step
        pos[i] += 1
        u.chosen = u.hull[pos[i]]
        if pos[i] + 1 < len(u.hull):
            heapq.heappush(heap, (-_ratio(u.chosen, u.hull[pos[i] + 1]), u.priority, i))
    return free


@dataclass(frozen=True)
class _Move:
    """Change one tensor of a kind (same candidates, same current choice) to `point`."""

    kind: int
    point: Point
    nbytes: int  # change in bytes
    error: float  # change in error


def _kinds(units: list[Unit]) -> dict[tuple, list[Unit]]:
    """Tensors that are interchangeable for the search: same candidates, same current choice."""
    kinds: dict[tuple, list[Unit]] = defaultdict(list)
    for u in units:
        kinds[(tuple(u.points), u.chosen)].append(u)
    return kinds


def _best_pair(groups: list[list[Unit]], free: int, low: int, improve: bool) -> tuple[_Move, _Move | None] | None:
    """The best change of one tensor, or of two at once (one up, one down), whose net bytes stay
    within `free`: when `improve`, the one that lowers the error most; otherwise the least harmful
    one whose net bytes reach at least `low`. `groups` are interchangeable tensors (`_kinds`)."""
    moves = [_Move(k, p, p.nbytes - g[0].chosen.nbytes, p.error - g[0].chosen.error)
             for k, g in enumerate(groups) for p in g[0].points if p != g[0].chosen]
    ups = [m for m in moves if m.nbytes > 0]
    downs: list[_Move | None] = [None, *(m for m in moves if m.nbytes < 0)]
    if not ups:
        return None
    up_b = np.array([m.nbytes for m in ups], dtype=np.int64)[:, None]
    up_e = np.array([m.error for m in ups])[:, None]
    up_k = np.array([m.kind for m in ups])[:, None]
    dn_b = np.array([0 if m is None else m.nbytes for m in downs], dtype=np.int64)[None, :]
    dn_e = np.array([0.0 if m is None else m.error for m in downs])[None, :]
    dn_k = np.array([-1 if m is None else m.kind for m in downs])[None, :]
    net, err = up_b + dn_b, up_e + dn_e
    lonely = np.array([len(g) == 1 for g in groups])[up_k]  # one tensor cannot move up and down at once
    ok = (net <= free) & ~((up_k == dn_k) & lonely)
    ok &= (err < -1e-12 * max(1.0, float(np.abs(err).max()))) if improve else (net >= low)
    if not ok.any():
        return None
    i, j = np.unravel_index(np.argmin(np.where(ok, err, np.inf)), err.shape)
    return ups[i], downs[j]


def _apply(groups: list[list[Unit]], pair: tuple[_Move, _Move | None]) -> None:
    """Carry out a move on concrete tensors: raise the one nearest an end of the model, lower the
    one farthest from them (the greedy's tie-break)."""
    up, down = pair
    riser = min(groups[up.kind], key=lambda u: (u.priority, u.tensor.name))
    if down is not None:
        faller = max((u for u in groups[down.kind] if u is not riser), key=lambda u: (u.priority, u.tensor.name))
        faller.chosen = down.point
    riser.chosen = up.point


def _refine(units: list[Unit], free: int, window: int, rounds: int = 200) -> int:
    """After the greedy: take single or paired changes that lower the error and fit, then, if the
    total is still more than `window` bytes under the budget, the least harmful change that lands
    inside it (coarse tensors can leave a gap no single step fills)."""
    for _ in range(rounds):
        groups = list(_kinds(units).values())
        pair = _best_pair(groups, free, 0, improve=True)
        if pair is None:
            break
        free -= _net(pair)
        _apply(groups, pair)
    if free > window:
        groups = list(_kinds(units).values())
        pair = _best_pair(groups, free, free - window, improve=False)
        if pair is not None:
            free -= _net(pair)
            _apply(groups, pair)
    return free


def _net(pair: tuple[_Move, _Move | None]) -> int:
    return pair[0].nbytes + (pair[1].nbytes if pair[1] is not None else 0)


def _shrink(units: list[Unit], excess: int) -> None:
    """Step down the tensors whose smaller candidate costs least error per byte until `excess` bytes
    are gone (only needed when a split into more shards adds headers)."""
    while excess > 0:
        best: tuple[float, Unit, Point] | None = None
        for u in units:
            for p in u.points:
                if p.nbytes < u.chosen.nbytes:
                    cost = (p.error - u.chosen.error) / (u.chosen.nbytes - p.nbytes)
                    if best is None or cost < best[0]:
                        best = (cost, u, p)
        if best is None:
            return
        _, u, p = best
        excess -= u.chosen.nbytes - p.nbytes
        u.chosen = p


# ---- rules and the mix table ------------------------------------------------------------------------
def _layer_alternation(layers: Sequence[int]) -> str:
    return "|".join(str(n) for n in sorted(layers))


def rules_for(units: list[Unit]) -> list[tuple[str, GGMLQuantizationType]]:
    """Ordered, disjoint rules reproducing each unit's type: per family (merged when families share
    their layer → type map), listed layers for minority types first, then a catch-all."""
    per_family: dict[str, dict[int | None, GGMLQuantizationType]] = defaultdict(dict)
    for u in units:
        per_family[u.family][u.layer] = u.chosen.qtype
    merged: dict[tuple, list[str]] = defaultdict(list)
    for family, mapping in per_family.items():
        merged[tuple(sorted(mapping.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))].append(family)
    rules: list[tuple[str, GGMLQuantizationType]] = []
    for items, families in merged.items():
        fam = families[0] if len(families) == 1 else f"(?:{'|'.join(families)})"
        mapping = dict(items)
        if None in mapping:  # global tensors (token_embd, output): one rule
            rules.append((rf"^{fam}\.weight$", mapping[None]))
            continue
        by_type: dict[GGMLQuantizationType, list[int]] = defaultdict(list)
        for layer, qtype in mapping.items():
            by_type[qtype].append(layer)  # type: ignore[arg-type]
        order = sorted(by_type, key=lambda q: (-len(by_type[q]), q.value))
        for qtype in order[1:]:
            rules.append((rf"^blk\.(?:{_layer_alternation(by_type[qtype])})\.{fam}\.weight$", qtype))
        rules.append((rf"\.{fam}\.weight$", order[0]))
    return rules


def mix_table(units: list[Unit]) -> list[MixRow]:
    """Bytes per class, layer group and type, largest classes first."""
    acc: dict[tuple[str, str, GGMLQuantizationType], list[int]] = defaultdict(lambda: [0, 0, 0])
    for u in units:
        row = acc[(u.label, u.group, u.chosen.qtype)]
        row[0] += 1
        row[1] += tensor_bytes(u.chosen.qtype, u.tensor.shape)
        row[2] += int(np.prod(u.tensor.shape))
    class_bytes: dict[str, int] = defaultdict(int)
    for (label, _, _), (_, nbytes, _) in acc.items():
        class_bytes[label] += nbytes
    rows = [MixRow(label, group, q, n, b, p) for (label, group, q), (n, b, p) in acc.items()]
    return sorted(rows, key=lambda r: (-class_bytes[r.label], r.label, r.group, r.bpw))


def estimate_error(cfg: ModelConfig, tensors: list[PlannedTensor]) -> float:
    """The error model's objective for any planned mix (a recipe's, say), comparable with
    `SolverResult.error` of a config-only solve."""
    units = quantizable_units(cfg, tensors)
    errors = _config_errors(units)
    total = 0.0
    for u in units:
        by_type = {p.qtype: p for p in _points(u, errors[u.label])}
        point = by_type.get(u.tensor.qtype)
        if point is None:  # a type off the ladder (F16, Q5_1…): measured all the same
            exact = u.int4 and u.tensor.qtype == T.Q4_0
            point = Point(u.tensor.qtype, pad(u.tensor.nbytes), 0.0 if exact else u.weight * errors[u.label][u.tensor.qtype])
        total += point.error
    return total


# ---- the entry point ---------------------------------------------------------------------------------
def _plan(cfg: ModelConfig, ckpt: Checkpoint | None, out: Path, recipe: str, overrides: list[str], split: int) -> Plan:
    from k2conv.convert.pipeline import make_plan

    return make_plan(cfg, ckpt.root if ckpt else None, out, recipe, overrides, split)


def _check_base_recipe(name: str) -> None:
    recipe = load_recipe(name)
    if not recipe.builtin and recipe.rules:
        raise K2ConvError(f"--target-size chooses every matrix's type, so the rules of recipe {name} would never "
                          "apply (and k2conv refuses unused rules): use a built-in recipe or drop --recipe")


def solve_target_size(
    cfg: ModelConfig,
    target_bytes: int,
    *,
    ckpt: Checkpoint | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
    base_recipe: str | None = None,
    tolerance: float = 0.005,
    overrides: Sequence[str] = (),
    split_max_size: int = 0,
    out: Path = Path("model.gguf"),
) -> SolverResult:
    """Types for every matrix so the planned total is in [(1 − tolerance)·target, target] at least error.

    `ckpt` switches from the error model to errors measured on sampled rows; `imatrix` (GGUF tensor
    name → [n_mat, ne0] importances) weights them. `overrides` are the user's own `--override`
    rules: the tensors they match keep their type and the solver's rules come after them.
    `base_recipe` and `split_max_size` must be the command's, since both change header bytes; with
    the command's `out` too, `result.plan` is the very plan to write.
    Raises K2ConvError when even the smallest mix is larger than the target.
    """
    recipe = base_recipe or DEFAULT_BASE_RECIPE
    _check_base_recipe(recipe)
    user = list(overrides)
    user_rules = parse_overrides(user)
    # The smallest mix, planned for real: its size is the floor, its header + F32 tensors the fixed part.
    min_plan = _plan(cfg, ckpt, out, recipe, [*user, rf"\.weight$={LADDER[0].name}"], split_max_size)
    units = [u for u in quantizable_units(cfg, min_plan.tensors)
             if not any(r.regex.search(u.tensor.name) for r in user_rules)]
    min_bytes = min_plan.total_size
    if min_bytes > target_bytes:
        from k2conv.convert.pipeline import human

        raise K2ConvError(f"target size {human(target_bytes)} is below the smallest mix k2conv can write for this model "
                          f"({min_bytes:,} bytes, {human(min_bytes)}: every matrix {LADDER[0].name} or its row fallback)")
    fixed = min_bytes - sum(pad(u.tensor.nbytes) for u in units)
    errors, measured, notes = _errors(units, ckpt, imatrix)
    for u in units:
        u.points = _points(u, errors[u.label])
        u.hull = lower_hull(u.points)
        u.chosen = u.hull[0]
    min_error = sum(u.chosen.error for u in units)
    max_bytes = fixed + sum(u.hull[-1].nbytes for u in units)
    free = _greedy(units, target_bytes - fixed - sum(u.chosen.nbytes for u in units))
    _refine(units, free, int(tolerance * target_bytes))
    plan = _plan(cfg, ckpt, out, recipe, [*user, *_solver_overrides(units)], split_max_size)
    for _ in range(8):  # only a split into more shards (more headers) can overshoot
        if plan.total_size <= target_bytes:
            break
        _shrink(units, plan.total_size - target_bytes)
        plan = _plan(cfg, ckpt, out, recipe, [*user, *_solver_overrides(units)], split_max_size)
    if not plan.header_exact:
        notes.append("bare config: the header has no tokenizer yet, so the real file is a few MB larger")
    if plan.total_size < (1 - tolerance) * target_bytes:
        if all(u.chosen.error == min(p.error for p in u.points) for u in units):
            notes.append("the target is above the largest useful mix: every matrix is at its best candidate")
        else:
            notes.append(f"could not get within {tolerance:.1%} of the target with whole-tensor steps")
    return SolverResult(
        target_bytes, plan.total_size, min_bytes, max_bytes, rules_for(units), mix_table(units),
        sum(u.chosen.error for u in units), min_error, measured, plan, notes,
    )


def _errors(units: list[Unit], ckpt: Checkpoint | None, imatrix: Mapping[str, np.ndarray] | None
            ) -> tuple[dict[str, dict[GGMLQuantizationType, float]], str, list[str]]:
    """(error table per class, how it was obtained, notes): measured when there are weights."""
    notes: list[str] = []
    if ckpt is None:
        if imatrix:
            notes.append("an imatrix needs the checkpoint's weights to weight errors; ignored for a bare config")
        return _config_errors(units), "error model", notes
    if imatrix:
        missing = sorted({u.label for u in units if u.tensor.name not in imatrix})
        if missing:
            notes.append(f"no imatrix entry for some tensors of: {', '.join(missing)} (measured unweighted)")
    return measure_errors(ckpt, units, imatrix), "checkpoint rows" + (", imatrix-weighted" if imatrix else ""), notes


def _solver_overrides(units: list[Unit]) -> list[str]:
    return [f"{pattern}={qtype.name}" for pattern, qtype in rules_for(units)]
