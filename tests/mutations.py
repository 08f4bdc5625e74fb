"""Byte-level mutations of a seed file, shared by the fuzz tests of every reader (hypothesis strategies)."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

BOUNDARY = [0, 1, 7, 8, 255, 1 << 31, (1 << 31) - 1, (1 << 32) - 1, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def mutations(max_pos: int = 1 << 16) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    op = st.tuples(st.sampled_from(["flip", "u32", "u64", "cut", "insert", "byte"]), st.integers(0, max_pos),
                   st.sampled_from(BOUNDARY) | st.integers(0, 255))  # fmt: skip
    return st.lists(op, min_size=1, max_size=4)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        pos %= max(len(b), 1)
        if kind == "flip" and b:
            b[pos] ^= 1 << (val % 8)
        elif kind == "byte" and b:
            b[pos] = val & 0xFF
        elif kind == "u32":
            b[pos : pos + 4] = struct.pack("<I", val & 0xFFFFFFFF)
        elif kind == "u64":
            b[pos : pos + 8] = struct.pack("<Q", val & (2**64 - 1))
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes([val & 0xFF]) * (1 + val % 7)
    return bytes(b)
