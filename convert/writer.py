"""Fill a plan: produce each tensor's bytes and write them at their planned offsets.

Work is cut into units small enough to bound memory (one routed expert, or a slab of rows of a
big matrix); units are independent, so `--workers N` runs them in forked processes that `pwrite`
straight into the preallocated temporary files. Files appear under their final names only after
every byte is written and fsynced.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from k2conv.atomic import commit, temp_path
from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.hf_layout import INT4, LogicalWeight
from k2conv.convert.plan import EXPERTS, K_B, V_B, Plan, PlannedTensor
from k2conv.errors import K2ConvError
from k2conv.quant.imatrix import Imatrix, quantizer_weights
from k2conv.quant.int4_repack import repack_int4_to_q4_0, scales_to_f16
from k2conv.quant.quantize import quantize
from k2conv.quant.types import T, row_bytes

CHUNK_ELEMENTS = 8 * 1024 * 1024  # float32 elements per row slab (32 MiB)


@dataclass(frozen=True)
class Unit:
    """One independent piece of work: tensor `tensor` (index in plan order), expert or row range."""

    tensor: int
    expert: int = -1
    row_start: int = 0
    row_stop: int = -1


@dataclass
class Options:
    allow_inexact_scales: bool = False
    imatrix: Imatrix | None = None  # importance weights, llama-quantize's --imatrix


def importance(opts: Options, t: PlannedTensor) -> np.ndarray | None:
    """[n_mat, ne0] weights llama-quantize would hand ggml for this tensor (None: quantize without)."""
    if opts.imatrix is None:
        return None
    return quantizer_weights(opts.imatrix, t.name, t.shape)


def units_of(plan: Plan) -> list[Unit]:
    units = []
    for i, t in enumerate(plan.tensors):
        if t.kind == EXPERTS:
            units.extend(Unit(i, expert=e) for e in range(t.shape[0]))
        elif t.kind in (K_B, V_B) or len(t.shape) == 1:
            units.append(Unit(i))
        else:
            rows, ne0 = t.shape[0], t.shape[-1]
            step = max(1, CHUNK_ELEMENTS // ne0)
            if step < rows:
                step = max(128, step // 128 * 128)  # FP8 scale blocks are 128 rows
            units.extend(Unit(i, row_start=r, row_stop=min(rows, r + step)) for r in range(0, rows, step))
    return units


def unit_bytes(plan: Plan, unit: Unit) -> int:
    t = plan.tensors[unit.tensor]
    if unit.expert >= 0:
        return t.nbytes // t.shape[0]
    if unit.row_stop >= 0:
        return (unit.row_stop - unit.row_start) * row_bytes(t.qtype, t.shape[-1])
    return t.nbytes


# ---- producing bytes --------------------------------------------------------------------------
def _expert_bytes(ckpt: Checkpoint, t: PlannedTensor, w: LogicalWeight, expert: int, opts: Options) -> np.ndarray:
    if w.storage == INT4 and t.qtype == T.Q4_0:
        parts = ckpt.int4_parts(w)
        where = ckpt.where(ckpt.config.tensor_prefix + w.module + ".weight_scale")
        f16, report = scales_to_f16(parts.scale_bits if parts.scale_f32 is None else parts.scale_f32)
        if report.inexact:
            what = (f"{where}: {report.inexact} of {report.total} INT4 scales are not representable in float16 "
                    f"(e.g. {report.worst_value:g}, relative error after rounding {report.worst_rel_error:.3g})")
            if not opts.allow_inexact_scales:
                raise K2ConvError(f"{what}; rerun with --override '{re.escape(t.name)}=F32' for an exact copy, "
                                  "or --allow-inexact-scales to round them")
            _WARNINGS.append(f"warning: {what}: rounded (--allow-inexact-scales)")
        if not np.all(np.isfinite(f16)):
            raise K2ConvError(f"{where}: scale overflows float16 (|scale| > 65504); use --override '{re.escape(t.name)}=F32'")
        return repack_int4_to_q4_0(parts.packed, f16, parts.cols)
    weights = importance(opts, t)
    return quantize(ckpt.read(w), t.qtype, None if weights is None else weights[expert])


def produce(ckpt: Checkpoint, t: PlannedTensor, unit: Unit, opts: Options) -> tuple[int, np.ndarray]:
    """(byte offset inside the tensor, bytes) of one unit."""
    if t.kind == EXPERTS:
        w = t.sources[unit.expert]
        data = _expert_bytes(ckpt, t, w, unit.expert, opts)
        return unit.expert * (t.nbytes // t.shape[0]), data
    w = t.sources[0]
    if t.kind in (K_B, V_B):
        cfg = ckpt.config
        kv_b = ckpt.read(w).reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        if t.kind == K_B:
            part = kv_b[:, : cfg.qk_nope_head_dim, :].transpose(0, 2, 1)  # (heads, kv_lora, nope)
        else:
            part = kv_b[:, cfg.qk_nope_head_dim :, :]  # (heads, v, kv_lora)
        weights = importance(opts, t)
        if weights is None:
            return 0, quantize(np.ascontiguousarray(part), t.qtype)
        # One importance vector per head: llama-quantize quantizes each ne2 slice on its own.
        return 0, np.concatenate([quantize(np.ascontiguousarray(part[h]), t.qtype, weights[h]) for h in range(len(part))])
    weights = importance(opts, t)
    row_weights = None if weights is None else weights[0]
    if unit.row_stop >= 0:
        data = ckpt.read(w, slice(unit.row_start, unit.row_stop))
        return unit.row_start * row_bytes(t.qtype, t.shape[-1]), quantize(data, t.qtype, row_weights)
    return 0, quantize(ckpt.read(w), t.qtype, row_weights)


# ---- running ----------------------------------------------------------------------------------
class _Sink:
    """Open temp files of one process, written with pwrite at absolute offsets."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.where = plan.locate()
        self.fds: dict[int, int] = {}

    def write(self, t: PlannedTensor, offset: int, data: np.ndarray) -> None:
        file_index, base = self.where[t.name]
        fd = self.fds.get(file_index)
        if fd is None:
            fd = os.open(temp_path(self.plan.files[file_index].path), os.O_WRONLY)
            self.fds[file_index] = fd
        view = memoryview(np.ascontiguousarray(data).reshape(-1))
        pos = base + offset
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


_WORKER: tuple[Checkpoint, Plan, Options, _Sink] | None = None
_WARNINGS: list[str] = []  # filled by the unit being run, handed back to the parent with its result


def _run_unit(unit: Unit) -> tuple[int, list[str]]:
    assert _WORKER is not None
    ckpt, plan, opts, sink = _WORKER
    t = plan.tensors[unit.tensor]
    offset, data = produce(ckpt, t, unit, opts)
    expected = unit_bytes(plan, unit)
    if data.nbytes != expected:  # pragma: no cover - a planner/quantizer disagreement is a bug
        raise AssertionError(f"{t.name}: produced {data.nbytes} bytes, plan says {expected}")
    sink.write(t, offset, data)
    for w in t.sources if t.kind != EXPERTS else (t.sources[unit.expert],):
        ckpt.release(w)
    warnings = _WARNINGS[:]
    _WARNINGS.clear()
    return expected, warnings


def _run_units(
    ckpt: Checkpoint, plan: Plan, units: list[Unit], opts: Options, workers: int
) -> Iterator[tuple[int, list[str]]]:
    global _WORKER
    _WORKER = (ckpt, plan, opts, _Sink(plan))
    try:
        if workers <= 1:
            for u in units:
                yield _run_unit(u)
            return
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            yield from pool.imap_unordered(_run_unit, units, chunksize=1)
    finally:
        _WORKER[3].close()
        _WORKER = None


def check_outputs(plan: Plan, force: bool) -> None:
    """Refuse to overwrite without --force, and refuse to start without room for every byte."""
    for f in plan.files:
        if f.path.exists() and not force:
            raise K2ConvError(f"{f.path}: output exists (use --force to overwrite)")
    folder = plan.files[0].path.parent
    if not folder.is_dir():
        raise K2ConvError(f"{folder}: output folder does not exist")
    reclaimable = sum(temp_path(f.path).stat().st_size for f in plan.files if temp_path(f.path).exists())
    free = shutil.disk_usage(folder).free + reclaimable
    need = plan.total_size
    if free < need:
        raise K2ConvError(f"{folder}: not enough disk space: the plan needs {need:,} bytes, {free:,} are free")


def write_plan(ckpt: Checkpoint, plan: Plan, *, workers: int = 1, opts: Options | None = None, progress: bool = True) -> None:
    """Write every file of the plan under temporary names, then fsync and rename them."""
    from tqdm import tqdm

    opts = opts or Options()
    for f in plan.files:
        with open(temp_path(f.path), "wb") as out:
            out.write(f.header)
            out.truncate(f.size)  # zero padding everywhere; tensor bytes land at planned offsets
    units = units_of(plan)
    total = sum(t.nbytes for t in plan.tensors)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize",
                  disable=not progress, dynamic_ncols=True) as bar:
            for n, warnings in _run_units(ckpt, plan, units, opts, workers):
                bar.update(n)
                for line in warnings:
                    print(line, file=sys.stderr, flush=True)
    except BaseException:
        for f in plan.files:
            temp_path(f.path).unlink(missing_ok=True)
        raise
    for f in plan.files:
        commit(temp_path(f.path), f.path)
