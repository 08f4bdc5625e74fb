"""Never leave a half-written file under its final name: write `<name>.part`, fsync, rename."""

from __future__ import annotations

import os
from pathlib import Path


def temp_path(final: Path) -> Path:
    """The temporary name used while `final` is being written (same folder: rename stays atomic)."""
    return final.with_name(final.name + ".part")


def fsync_dir(folder: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(temp: Path, final: Path) -> None:
    """fsync `temp`, rename it to `final` and fsync the folder."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)
    fsync_dir(final.parent)


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to write [offset, offset+n) to disk now, without waiting (Linux: POSIX_FADV_DONTNEED
    starts writeback of the range's dirty pages and drops its clean ones).

    Why: the kernel's flusher starts only once dirty pages pass dirty_background_ratio (10 % of RAM, 2.4 GB
    on a 24 GB machine), so a multi-GB output would sit dirty in RAM until the final fsync and the disk
    would idle while the CPU works, then the CPU idle while the disk works. Started per unit, the disk
    writes while later units are produced and the final fsync has little left; the dropped clean pages
    also keep the output from pushing the input out of the page cache.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Small files (configs, JSON reports): all or nothing."""
    temp = temp_path(final)
    with open(temp, "wb") as f:
        f.write(data)
    commit(temp, final)
