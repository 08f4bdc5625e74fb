"""Resume after a crash: a journal of finished work units beside the temporary output.

The journal is JSON lines. The first line identifies the run: a hash of the plan (every header
byte, every tensor's place and type), the options that change bytes, and the identity of every
input file (size, mtime). Each later line is one finished unit with the CRC-32 of its bytes.
Nothing is fsynced per unit: on resume every journaled unit is read back from the temporary file
and its CRC checked, so a line that reached the disk before its data did is simply redone.
A final `{"done": true}` line (fsynced) marks that every byte is durable and only renames remain.

CRC-32 (zlib, stdlib) detects torn or missing writes, which is all resume needs; it runs at
GB/s, so verifying a resumed 381 GB run costs one sequential read of what was already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from k2conv.atomic import temp_path
from k2conv.errors import K2ConvError

VERSION = 1


def journal_path(first_output: Path) -> Path:
    return temp_path(first_output).with_name(temp_path(first_output).name + ".journal")


def crc32(data: memoryview | bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


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
    """The identity of a run and the units it has finished (unit index → CRC-32)."""

    path: Path
    plan: str
    options: dict
    inputs: dict[str, list[int]]
    finished: dict[int, int] = field(default_factory=dict)
    done: bool = False

    def header(self) -> dict:
        return {"version": VERSION, "plan": self.plan, "options": self.options, "inputs": self.inputs}

    def create(self) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.header()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends

    def reopen(self) -> None:
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def record(self, unit: int, crc: int) -> None:
        self.finished[unit] = crc
        self._file.write(f'{{"u": {unit}, "crc": {crc}}}\n')
        self._file.flush()

    def mark_done(self) -> None:
        self._file.write('{"done": true}\n')
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done = True

    def close(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
            self._file = None


def load_journal(path: Path) -> Journal | None:
    """The journal at `path`, or None if there is none (a torn last line is ignored)."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        head = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
        return None
    if head.get("version") != VERSION:
        return None
    journal = Journal(path, head.get("plan", ""), head.get("options", {}), head.get("inputs", {}))
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break
        if entry.get("done"):
            journal.done = True
        elif isinstance(entry.get("u"), int) and isinstance(entry.get("crc"), int):
            journal.finished[entry["u"]] = entry["crc"]
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
