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


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Small files (configs, JSON reports): all or nothing."""
    temp = temp_path(final)
    with open(temp, "wb") as f:
        f.write(data)
    commit(temp, final)
