"""Resume after a crash: a journal of finished work units beside the temporary output.

The journal is JSON lines. The first line identifies the run: a hash of the plan (every header
byte, every tensor's place and type), the options that change bytes, and the identity of every
input file (size, mtime). Each later line is one finished unit with the CRC-32C of its bytes.
Nothing is fsynced per unit: on resume every journaled unit is read back from the temporary file
and its CRC checked, so a line that reached the disk before its data did is simply redone.
A final `{"done": true}` line (fsynced) marks that every byte is durable and only renames remain.
Lines are appended with unbuffered writes; a line cut short (a crash, or a full disk mid-write) is
dropped when the journal is reopened, so later lines never follow a torn one.

CRC-32C detects torn or missing writes, which is all resume needs; it runs at several GB/s
(convert/crc32c.py), so verifying a resumed 381 GB run costs one sequential read of what was
already written. The same unit CRCs, combined, become the per-tensor checksums stored in the GGUF
(integrity.py).

A full disk (ENOSPC, EDQUOT) is `DiskFull`: unlike other K2ConvErrors (bad input: the partial
output is deleted) it keeps the temporary files and the journal, so freeing space and rerunning
the same command resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from k2conv.atomic import temp_path
from k2conv.errors import K2ConvError

VERSION = 2  # 2: torn tails are dropped on reopen; quantize records CRC-32C (1: zlib CRC-32)


def journal_path(first_output: Path) -> Path:
    return temp_path(first_output).with_name(temp_path(first_output).name + ".journal")


class DiskFull(K2ConvError):
    """No space left while writing: the journal is consistent, free space and rerun to resume."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def input_identity(paths: list[Path]) -> dict[str, list[int]]:
    """path → [size, mtime_ns] of every file the output depends on."""
    out = {}
    for p in sorted(set(paths)):
        st = p.stat()
        out[str(p.resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def plan_hash(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


@dataclass
class Journal:
    """The identity of a run and the units it has finished (unit index → CRC-32C).

    `valid_bytes` is the length of the journal's intact prefix (whole lines only).
    """

    path: Path
    plan: str
    options: dict
    inputs: dict[str, list[int]]
    finished: dict[int, int] = field(default_factory=dict)
    done: bool = False
    valid_bytes: int = 0

    def header(self) -> dict:
        return {"version": VERSION, "plan": self.plan, "options": self.options, "inputs": self.inputs}

    def create(self) -> None:
        line = (json.dumps(self.header()) + "\n").encode()
        try:
            with open(self.path, "wb") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(f"{self.path}: no space left on device to start the journal") from None
            raise
        self.valid_bytes = len(line)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def reopen(self) -> None:
        """Append after the intact prefix, dropping a torn last line."""
        if self.path.stat().st_size != self.valid_bytes:
            os.truncate(self.path, self.valid_bytes)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _append(self, line: bytes) -> None:
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            if is_disk_full(exc):  # a partial line may be on disk: reopen() drops it
                raise DiskFull(f"{self.path}: no space left on device for the journal") from None
            raise
        self.valid_bytes += len(line)

    def record(self, unit: int, crc: int) -> None:
        self._append(f'{{"u": {unit}, "crc": {crc}}}\n'.encode())
        self.finished[unit] = crc

    def mark_done(self) -> None:
        self._append(b'{"done": true}\n')
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(f"{self.path}: no space left on device for the journal") from None
            raise
        self.done = True

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)


class NullJournal(Journal):
    """No journal at all (benchmarks only: measures what the journal and checksums cost)."""

    def create(self) -> None:
        pass

    def reopen(self) -> None:  # pragma: no cover - never loaded
        pass

    def _append(self, line: bytes) -> None:
        pass

    def mark_done(self) -> None:
        self.done = True

    def close(self) -> None:
        pass


def load_journal(path: Path) -> Journal | None:
    """The journal at `path`, or None if there is none; reading stops at the first line that is
    not whole, valid JSON ending in a newline (a torn tail)."""
    if not path.exists():
        return None
    data = path.read_bytes()
    end = data.find(b"\n")
    try:
        head = json.loads(data[:end]) if end >= 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
        head = None
    if not isinstance(head, dict) or head.get("version") != VERSION:
        return None
    options, inputs = head.get("options", {}), head.get("inputs", {})
    journal = Journal(path, str(head.get("plan", "")), options if isinstance(options, dict) else {},
                      inputs if isinstance(inputs, dict) else {})
    pos = end + 1
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:
            entry = json.loads(data[pos:nl])
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError):
            break
        if not isinstance(entry, dict):
            break
        if entry.get("done") is True:
            journal.done = True
        elif isinstance(entry.get("u"), int) and isinstance(entry.get("crc"), int):
            journal.finished[entry["u"]] = entry["crc"]
        else:
            break
        pos = nl + 1
    journal.valid_bytes = pos
    return journal


def why_not_resumable(old: Journal, new: Journal) -> str | None:
    """One line saying what changed since the interrupted run, or None if it can resume."""
    if old.options != new.options:
        keys = sorted(k for k in set(old.options) | set(new.options) if old.options.get(k) != new.options.get(k))
        return f"options changed since the interrupted run ({', '.join(keys)})"
    if old.inputs != new.inputs:
        changed = sorted(k for k in set(old.inputs) | set(new.inputs) if old.inputs.get(k) != new.inputs.get(k))
        return f"input changed since the interrupted run: {changed[0]}" + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
    if old.plan != new.plan:
        return "the plan changed since the interrupted run (recipe, overrides, split size or tool version)"
    return None


def refuse(journal_file: Path, reason: str) -> K2ConvError:
    return K2ConvError(f"{journal_file}: cannot resume: {reason}; rerun with --restart to start over")
