"""O_DIRECT reads of byte ranges into reusable aligned (pinned, when CUDA is there) buffers.

Why: a 600 GB model does not fit in RAM, and reading experts through mmap fills the page cache with
bytes the expert cache already holds (twice the memory, and the kernel evicts by its own LRU, not
ours). O_DIRECT moves the bytes from the device straight into our buffer, bypassing the page cache.
It needs the file offset, the length and the buffer address aligned (4096 covers every common
device's logical block), so a range is widened to aligned bounds, read whole, and the caller gets a
view of the part it asked for.

The buffers are reused (one per reader, grown on demand): a view is valid until the reader's next
read. When CUDA is available they are pinned, so the copy to the GPU is a DMA from the buffer.

Where the filesystem refuses O_DIRECT (EINVAL on open or on the first read: older tmpfs, some
network and FUSE filesystems) the reader falls back to ordinary preads into the same buffers and
says so in `note`, rather than failing: the bytes are the same, only the page cache is not bypassed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import torch

from k2conv.errors import K2ConvError

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)


def align_down(x: int) -> int:
    return x & ~(ALIGN - 1)


def align_up(x: int) -> int:
    return (x + ALIGN - 1) & ~(ALIGN - 1)


class AlignedBuffer:
    """A reusable byte buffer whose start is ALIGN-aligned; pinned host memory when CUDA is available."""

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._base: torch.Tensor | None = None
        self.array = np.empty(0, dtype=np.uint8)

    def get(self, size: int) -> np.ndarray:
        """At least `size` aligned bytes (grown geometrically; contents are not kept across growth)."""
        if self.array.size < size:
            cap = max(align_up(size), 2 * self.array.size)
            base = torch.empty(cap + ALIGN, dtype=torch.uint8, pin_memory=self.pin)
            skip = (-base.data_ptr()) % ALIGN
            self._base = base
            self.array = base.numpy()[skip : skip + cap]
        return self.array[:size]


def pread_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Fill `buf` from `offset`; returns the bytes read (short only at end of file)."""
    view, at, done = memoryview(buf), offset, 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], at)
        if n <= 0:
            break
        done, at = done + n, at + n
    return done


class DirectReader:
    """Reads byte ranges of one file with O_DIRECT (or plain preads where the filesystem refuses it).

    `reads` and `bytes` count the read requests and the bytes asked for; `device_bytes` what moved
    from the device (the aligned spans), so alignment overhead is visible.
    """

    def __init__(self, path: Path | str, pin: bool | None = None):
        self.path = Path(path)
        self.buffer = AlignedBuffer(pin)
        self.reads = self.bytes = self.device_bytes = 0
        self.note = ""
        self.direct = bool(O_DIRECT)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | O_DIRECT) if self.direct else os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise K2ConvError(f"{self.path}: cannot open for reading ({exc.strerror})") from None
            self._fall_back(exc)
        if not O_DIRECT:
            self.note = f"{self.path}: O_DIRECT is not available on this platform; reading through the page cache"

    def _fall_back(self, exc: OSError) -> None:
        self.direct = False
        self.note = f"{self.path}: the filesystem refuses O_DIRECT ({exc.strerror}); reading through the page cache"
        self.fd = os.open(self.path, os.O_RDONLY)

    def read(self, offset: int, size: int) -> np.ndarray:
        """Bytes [offset, offset+size) as a uint8 view into the reusable buffer (valid until the next read)."""
        start, end = align_down(offset), align_up(offset + size)
        buf = self.buffer.get(end - start)
        try:
            got = pread_into(self.fd, buf, start)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise K2ConvError(f"{self.path}: read of {size} bytes at {offset} failed ({exc.strerror})") from None
            os.close(self.fd)
            self._fall_back(exc)
            got = pread_into(self.fd, buf, start)
        if got < offset + size - start:
            raise K2ConvError(f"{self.path}: read of {size} bytes at {offset} cut short (file too small)")
        self.reads += 1
        self.bytes += size
        self.device_bytes += got
        return buf[offset - start : offset - start + size]

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None


def drop_page_cache(path: Path | str) -> bool:
    """Ask the kernel to drop the file's cached pages (POSIX_FADV_DONTNEED; no root needed).

    Returns whether the call was made; pages of a file another process has mapped or dirtied may stay.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
