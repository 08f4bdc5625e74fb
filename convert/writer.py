"""Fill a plan: produce each tensor's bytes and write them at their planned offsets.

Work is cut into units small enough to bound memory (one routed expert, or a slab of rows of a
big matrix); units are independent, so `--workers N` runs them in forked processes that `pwrite`
straight into the preallocated temporary files. Files appear under their final names only after
every byte is written and fsynced.

Each unit's CRC-32C is computed by the worker that produced it and recorded in the journal (resume
checks it); when all units are done the CRCs are combined per tensor in offset order and written
into the header slots the plan reserved (integrity.py), before the final fsync and rename. A full
disk stops the run with `DiskFull`, keeping the journal and temporary files for a resume.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from k2conv.atomic import commit, start_writeback, temp_path
from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.hf_layout import INT4, LogicalWeight
from k2conv.convert.integrity import crc32c, crc32c_combine
from k2conv.convert.journal import (
    DiskFull,
    Journal,
    NullJournal,
    input_identity,
    is_disk_full,
    journal_path,
    load_journal,
    plan_hash,
    refuse,
    why_not_resumable,
)
from k2conv.convert.plan import EXPERTS, K_B, V_B, Plan, PlannedTensor
from k2conv.errors import K2ConvError
from k2conv.quant.imatrix import Imatrix, quantizer_weights
from k2conv.quant.int4_repack import repack_int4_to_q4_0, scales_to_f16
from k2conv.quant.quantize import quantize, quantize_q8_0_bf16
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
        scales = parts.scale_bits if parts.scale_f32 is None else parts.scale_f32
        data, inexact, nonfinite = repack_int4_to_q4_0(parts.packed, scales, parts.cols)
        if inexact:
            _, report = scales_to_f16(scales)  # the rare path: which scale, by how much
            what = (f"{where}: {report.inexact} of {report.total} INT4 scales are not representable in float16 "
                    f"(e.g. {report.worst_value:g}, relative error after rounding {report.worst_rel_error:.3g})")
            if not opts.allow_inexact_scales:
                raise K2ConvError(f"{what}; rerun with --override '{re.escape(t.name)}=F32' for an exact copy, "
                                  "or --allow-inexact-scales to round them")
            _WARNINGS.append(f"warning: {what}: rounded (--allow-inexact-scales)")
        if nonfinite:
            raise K2ConvError(f"{where}: scale overflows float16 (|scale| > 65504); use --override '{re.escape(t.name)}=F32'")
        return data
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
        bits = ckpt.bf16_bits(w) if t.qtype == T.Q8_0 else None
        kv_b = ckpt.read(w) if bits is None else bits
        kv_b = kv_b.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        if t.kind == K_B:
            part = kv_b[:, : cfg.qk_nope_head_dim, :].transpose(0, 2, 1)  # (heads, kv_lora, nope)
        else:
            part = kv_b[:, cfg.qk_nope_head_dim :, :]  # (heads, v, kv_lora)
        if bits is not None:  # Q8_0 blocks never cross a row: the heads need no separate passes
            return 0, quantize_q8_0_bf16(np.ascontiguousarray(part), ckpt.where(ckpt.plain_name(w)))
        weights = importance(opts, t)
        if weights is None:
            return 0, quantize(np.ascontiguousarray(part), t.qtype)
        # One importance vector per head: llama-quantize quantizes each ne2 slice on its own.
        return 0, np.concatenate([quantize(np.ascontiguousarray(part[h]), t.qtype, weights[h]) for h in range(len(part))])
    rows = slice(unit.row_start, unit.row_stop) if unit.row_stop >= 0 else None
    offset = unit.row_start * row_bytes(t.qtype, t.shape[-1]) if rows else 0
    bits = ckpt.bf16_bits(w, rows) if t.qtype == T.Q8_0 else None
    if bits is not None:  # the commonest case (BF16 attention/dense/shared matrices → Q8_0): one pass
        return offset, quantize_q8_0_bf16(bits, ckpt.where(ckpt.plain_name(w)))
    weights = importance(opts, t)
    return offset, quantize(ckpt.read(w, rows), t.qtype, None if weights is None else weights[0])


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
        try:
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
            start_writeback(fd, base + offset, data.nbytes)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(f"{self.plan.files[file_index].path}: no space left on device "
                               f"(writing {t.name} into {temp_path(self.plan.files[file_index].path).name})") from None
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


_WORKER: tuple[Checkpoint, Plan, Options, _Sink] | None = None
_WARNINGS: list[str] = []  # filled by the unit being run, handed back to the parent with its result


_TEST_DELAY = float(os.environ.get("K2CONV_TEST_UNIT_DELAY", "0"))  # lets tests land signals mid-run
_CHECKSUMS = True  # False only for `write_plan(integrity=False)` (benchmarks); set before workers fork


_CRC_THREAD: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): one per process, made after fork


def _flat(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _checksum(data: np.ndarray) -> int:
    return crc32c(_flat(data)) if _CHECKSUMS else 0


def _write_and_checksum(sink: _Sink, t: PlannedTensor, offset: int, data: np.ndarray, crc: int | None = None,
                        threaded: bool = False) -> int:  # fmt: skip
    """pwrite the unit and return its CRC-32C (0 when off): `crc` when the caller computed it, else
    computed here first, or with `threaded` (worker processes) on a second thread during the pwrite.

    Both release the GIL, and pwrite often waits (dirty-page throttling while the disk catches up),
    so a threaded checksum mostly costs no wall time. The single-process writer thread checksums
    inline: a third thread would only take CPU from the producer.
    """
    global _CRC_THREAD
    flat = _flat(data)
    if _CHECKSUMS and crc is None and threaded:
        if _CRC_THREAD is None or _CRC_THREAD[0] != os.getpid():
            _CRC_THREAD = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="k2conv-crc"))
        future = _CRC_THREAD[1].submit(crc32c, flat)
        sink.write(t, offset, flat)
        return future.result()
    crc = crc if crc is not None else _checksum(flat)
    sink.write(t, offset, flat)
    return crc


_Made = tuple[int, Unit, int, np.ndarray, list[str]]  # (unit index, unit, offset in tensor, bytes, warnings)


def _make_unit(job: tuple[int, Unit]) -> _Made:
    """Produce one unit's bytes (the CPU-heavy half of a unit)."""
    assert _WORKER is not None
    if _TEST_DELAY:
        time.sleep(_TEST_DELAY)
    ckpt, plan, opts, _ = _WORKER
    index, unit = job
    t = plan.tensors[unit.tensor]
    offset, data = produce(ckpt, t, unit, opts)
    expected = unit_bytes(plan, unit)
    if data.nbytes != expected:  # pragma: no cover - a planner/quantizer disagreement is a bug
        raise AssertionError(f"{t.name}: produced {data.nbytes} bytes, plan says {expected}")
    warnings = _WARNINGS[:]
    _WARNINGS.clear()
    return index, unit, offset, data, warnings


def _store_unit(made: _Made, crc: int | None = None, threaded: bool = False) -> tuple[int, int, int, list[str]]:
    """Write and checksum (unless `crc` is given; see _write_and_checksum) one produced unit, then let
    go of its source pages; (unit index, bytes, CRC-32C of the bytes, warnings)."""
    assert _WORKER is not None
    ckpt, plan, _, sink = _WORKER
    index, unit, offset, data, warnings = made
    t = plan.tensors[unit.tensor]
    crc = _write_and_checksum(sink, t, offset, data, crc, threaded)
    for w in t.sources if t.kind != EXPERTS else (t.sources[unit.expert],):
        ckpt.release(w)  # after the write: produced bytes may still be views of the mapped source
    return index, data.nbytes, crc, warnings


def _run_unit(job: tuple[int, Unit]) -> tuple[int, int, int, list[str]]:
    """Produce and write one unit (a worker process's task)."""
    return _store_unit(_make_unit(job), threaded=True)


def _pipelined(jobs: list[tuple[int, Unit]]) -> Iterator[tuple[int, int, int, list[str]]]:
    """One process: a writer thread stores unit N (pwrite, GIL-free) while this thread produces unit
    N+1, so writing leaves the critical path whenever a second core is free. The CRC-32C goes to
    whichever side has slack: when the writer is still busy with N once N+1 is made (the disk
    decides: q4_0-native), this thread checksums N+1 before handing it over, else (the CPU decides:
    q8_0) the writer does, inline. At most two units' bytes are alive; a result is yielded (and
    journaled) only once stored."""
    with ThreadPoolExecutor(1, thread_name_prefix="k2conv-write") as writer:
        inflight: Future | None = None
        try:
            for job in jobs:
                made = _make_unit(job)
                writer_busy = inflight is not None and not inflight.done()
                crc = _checksum(made[3]) if writer_busy else None
                if inflight is not None:
                    yield inflight.result()
                inflight = writer.submit(_store_unit, made, crc)
            if inflight is not None:
                yield inflight.result()
                inflight = None
        finally:
            if inflight is not None:  # interrupted: let the write in flight finish before the files close
                inflight.cancel() or inflight.exception()


def _quiet_worker() -> None:
    """Forked workers inherit the parent's SIGTERM handler (raise KeyboardInterrupt): when the pool breaks
    it terminates the survivors, which then printed a traceback each. Workers die quietly on SIGTERM
    and ignore Ctrl-C (sent to the whole process group): the parent alone reports it, keeps the journal
    and ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_units(
    ckpt: Checkpoint, plan: Plan, jobs: list[tuple[int, Unit]], opts: Options, workers: int
) -> Iterator[tuple[int, int, int, list[str]]]:
    """Run jobs in this process or in forked workers, yielding results as they finish.

    A bounded window of submitted jobs keeps the parent small for 100k-unit plans; a worker
    that dies (OOM killer, kill -9) surfaces as BrokenProcessPool instead of a hang.
    """
    global _WORKER
    _WORKER = (ckpt, plan, opts, _Sink(plan))
    try:
        if workers <= 1:
            yield from _pipelined(jobs)
            return
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        pending = iter(jobs)
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_quiet_worker)
        try:
            running = {pool.submit(_run_unit, job) for job in itertools.islice(pending, 4 * workers)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
                running |= {pool.submit(_run_unit, job) for job in itertools.islice(pending, len(done))}
        except BaseException:  # Ctrl-C, a dead worker, an error: stop now, not after the queued units
            workers_left = list(getattr(pool, "_processes", None) or {})
            pool.shutdown(wait=False, cancel_futures=True)
            for pid in workers_left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # unjournaled units are redone on resume
            raise
        pool.shutdown(wait=True)
    finally:
        _WORKER[3].close()
        _WORKER = None


class Interrupted(K2ConvError):
    """Ctrl-C / SIGTERM: the journal is consistent, rerunning the same command resumes."""

    exit_code = 130


class WorkerDied(K2ConvError):
    """A worker process vanished (OOM killer, kill -9): what was journaled is intact, the rest is redone."""

    exit_code = 3


def check_outputs(plan: Plan, force: bool) -> None:
    """Refuse to overwrite without --force, and refuse to start without room for every byte."""
    resuming = journal_path(plan.files[0].path).exists()  # an interrupted run may have renamed some files
    for f in plan.files:
        if f.path.exists() and not force and not resuming:
            raise K2ConvError(f"{f.path}: output exists (use --force to overwrite)")
    folder = plan.files[0].path.parent
    if not folder.is_dir():
        raise K2ConvError(f"{folder}: output folder does not exist")
    reclaimable = sum(allocated(temp_path(f.path)) for f in plan.files)
    free = shutil.disk_usage(folder).free + reclaimable
    need = plan.total_size
    if free < need:
        raise K2ConvError(f"{folder}: not enough disk space: the plan needs {need:,} bytes, {free:,} are free")


def allocated(path: Path) -> int:
    """Disk bytes a file holds now: temporary outputs are sparse until written, so their size says
    nothing about what a resume still needs (a run stopped by a full disk has a full-size file)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return min(st.st_size, st.st_blocks * 512)


def _verified(plan: Plan, units: list[Unit], finished: dict[int, int]) -> dict[int, int]:
    """The journaled units whose bytes in the temporary files still have the recorded CRC."""
    where = plan.locate()
    fds = {i: os.open(temp_path(f.path), os.O_RDONLY) for i, f in enumerate(plan.files)}
    good = {}
    try:
        for index, crc in finished.items():
            if not 0 <= index < len(units):
                continue
            unit = units[index]
            t = plan.tensors[unit.tensor]
            file_index, base = where[t.name]
            offset = unit_offset(plan, unit)
            data = os.pread(fds[file_index], unit_bytes(plan, unit), base + offset)
            if crc32c(data) == crc:
                good[index] = crc
    finally:
        for fd in fds.values():
            os.close(fd)
    return good


def unit_offset(plan: Plan, unit: Unit) -> int:
    """Byte offset of a unit inside its tensor (the same arithmetic `produce` uses)."""
    t = plan.tensors[unit.tensor]
    if unit.expert >= 0:
        return unit.expert * (t.nbytes // t.shape[0])
    if unit.row_stop >= 0:
        return unit.row_start * row_bytes(t.qtype, t.shape[-1])
    return 0


def _start_journal(plan: Plan, units: list[Unit], opts: Options, inputs: list[Path], restart: bool,
                   integrity: bool = True) -> Journal:
    """Resume the interrupted run if it is the same run, else start a fresh one."""
    jpath = journal_path(plan.files[0].path)
    kind = Journal if integrity else NullJournal
    new = kind(jpath, plan_hash([f.header for f in plan.files] + [str(f.path).encode() for f in plan.files]),
               {"allow_inexact_scales": opts.allow_inexact_scales}, input_identity(inputs))
    old = None if restart or not integrity else load_journal(jpath)
    if old is not None:
        reason = why_not_resumable(old, new)
        if reason is not None:
            raise refuse(jpath, reason)
        temps = [temp_path(f.path) for f in plan.files]
        if old.done or all(t.exists() and t.stat().st_size == f.size for t, f in zip(temps, plan.files)):
            if not old.done:
                old.finished = _verified(plan, units, old.finished)
            old.reopen()
            return old
    for f in plan.files:
        with open(temp_path(f.path), "wb") as out:
            out.write(f.header)
            out.truncate(f.size)  # zero padding everywhere; tensor bytes land at planned offsets
    new.create()
    return new


def tensor_checksums(plan: Plan, units: list[Unit], finished: dict[int, int]) -> list[int]:
    """CRC-32C of every planned tensor's bytes (plan order), combined from its units' CRCs in offset order.

    Units of one tensor are contiguous in `units` but not necessarily in offset order, so they are
    sorted by offset first; together they cover the tensor exactly (produce() writes nothing else).
    """
    by_tensor: dict[int, list[tuple[int, int, int]]] = {}
    for index, unit in enumerate(units):
        by_tensor.setdefault(unit.tensor, []).append((unit_offset(plan, unit), unit_bytes(plan, unit), finished[index]))
    crcs = []
    for i, t in enumerate(plan.tensors):
        crc, pos = 0, 0
        for offset, n, unit_crc in sorted(by_tensor[i]):
            assert offset == pos, f"{t.name}: units leave a gap at byte {pos}"
            crc, pos = crc32c_combine(crc, unit_crc, n), pos + n
        assert pos == t.nbytes, f"{t.name}: units cover {pos} of {t.nbytes} bytes"
        crcs.append(crc)
    return crcs


def _write_checksums(plan: Plan, units: list[Unit], finished: dict[int, int]) -> None:
    """Rewrite every temporary file's header with its tensors' checksums in the reserved slots.

    The whole header is written (not just the slots), so a resumed run also repairs a header
    region a crash left damaged; the result depends only on the plan and the tensor bytes.
    """
    crcs = iter(tensor_checksums(plan, units, finished))
    for f in plan.files:
        header = f.header_with([next(crcs) for _ in f.tensors])
        fd = os.open(temp_path(f.path), os.O_WRONLY)
        try:
            view = memoryview(header)
            pos = 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos:], pos)
        finally:
            os.close(fd)


def _finish(plan: Plan, journal: Journal, units: list[Unit]) -> None:
    """All bytes written: fill in the checksums, make everything durable, mark the journal, then
    rename (each step is redone or skipped correctly by a resumed run)."""
    if not journal.done:
        if not isinstance(journal, NullJournal):
            _write_checksums(plan, units, journal.finished)
        for f in plan.files:
            fd = os.open(temp_path(f.path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        journal.mark_done()
    for f in plan.files:
        if temp_path(f.path).exists():
            commit(temp_path(f.path), f.path)
        elif not f.path.exists():
            raise K2ConvError(f"{f.path}: neither the output nor its temporary file exists; rerun with --restart")
    journal.close()
    journal.path.unlink(missing_ok=True)


def write_plan(ckpt: Checkpoint, plan: Plan, *, workers: int = 1, opts: Options | None = None, progress: bool = True,
               inputs: list[Path] | None = None, restart: bool = False, integrity: bool = True) -> None:
    """Write every file of the plan under temporary names, then fsync and rename them.

    A journal beside the first temporary file makes the run resumable: rerunning the same
    command after a crash, Ctrl-C or a full disk redoes only the units not recorded as finished.
    `integrity=False` (benchmarks only) drops the journal and the checksums: the files' checksum
    slots stay zero and the run cannot resume.
    """
    from tqdm import tqdm

    global _CHECKSUMS
    opts = opts or Options()
    units = units_of(plan)
    _CHECKSUMS = integrity
    if integrity:  # compile/load the CRC kernels once here, not in every forked worker
        crc32c(np.zeros(1 << 20, dtype=np.uint8))
        crc32c(np.zeros(16, dtype=np.uint8))
    if workers > 1:  # likewise the kernels of the two commonest units: forked workers inherit them loaded
        quantize_q8_0_bf16(np.zeros((1, 32), dtype=np.uint16), "warm-up")
        repack_int4_to_q4_0(np.zeros((1, 4), dtype=np.int32), np.ones((1, 1), dtype=np.uint16), 32)
    try:
        journal = _start_journal(plan, units, opts, inputs or [], restart, integrity)
    except OSError as exc:
        if is_disk_full(exc):
            raise _disk_full(plan, None, units, f"{plan.files[0].path}: no space left on device") from None
        raise
    jobs = [(i, u) for i, u in enumerate(units) if i not in journal.finished]
    total = sum(t.nbytes for t in plan.tensors)
    done_bytes = sum(unit_bytes(plan, units[i]) for i in journal.finished)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with tqdm(total=total, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize",
                  disable=not progress, dynamic_ncols=True) as bar:
            for index, n, crc, warnings in _run_units(ckpt, plan, jobs, opts, workers):
                journal.record(index, crc)
                bar.update(n)
                for line in warnings:
                    print(line, file=sys.stderr, flush=True)
        _finish(plan, journal, units)
    except DiskFull as exc:
        journal.close()  # everything journaled is on disk: keep it all for the resume
        raise _disk_full(plan, journal, units, str(exc)) from None
    except OSError as exc:
        journal.close()
        if is_disk_full(exc):  # e.g. fsync on a network filesystem
            raise _disk_full(plan, journal, units, f"{plan.files[0].path}: {exc.strerror}") from None
        raise
    except KeyboardInterrupt:
        journal.close()
        raise Interrupted(
            f"interrupted: {len(journal.finished)} of {len(units)} units saved in {journal.path}; "
            "rerun the same command to resume"
        ) from None
    except BrokenProcessPool:
        journal.close()  # finished units were journaled by this process, after their bytes were written
        raise WorkerDied(
            f"{plan.files[0].path}: a worker process died (killed, or out of memory?): {len(journal.finished)} of "
            f"{len(units)} units saved in {journal.path}; rerun the same command to resume (fewer --workers use less memory)"
        ) from None
    except K2ConvError:
        journal.close()  # bad input: nothing worth resuming
        for f in plan.files:
            temp_path(f.path).unlink(missing_ok=True)
        journal.path.unlink(missing_ok=True)
        raise
    except BaseException:
        journal.close()  # e.g. a worker killed: keep the journal, the run can resume
        raise
    finally:
        _CHECKSUMS = True
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _disk_full(plan: Plan, journal: Journal | None, units: list[Unit], what: str) -> DiskFull:
    """One line: what filled up, what is saved, how much room a resume needs."""
    folder = plan.files[0].path.parent
    need = plan.total_size - sum(allocated(temp_path(f.path)) for f in plan.files)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover
        free = 0
    saved = f"{len(journal.finished)} of {len(units)} units are saved in {journal.path}; " if journal else ""
    return DiskFull(f"{what}; {saved}the output needs about {max(need, 0):,} more bytes, {free:,} are free "
                    f"in {folder}: free space and rerun the same command to resume")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
