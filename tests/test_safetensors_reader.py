"""The safetensors header parser: good files read exactly, bad ones give one clear error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from k2conv.convert.safetensors_reader import SafetensorsFile
from k2conv.errors import K2ConvError


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5, dtype=np.int32),
        "c": np.array([1.5, -2.0], dtype=np.float16),
    }
    save_file(arrays, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for name, arr in arrays.items():
        np.testing.assert_array_equal(f.raw(name), arr)
    f.close()


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "corrupt shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "corrupt data_offsets"),
        ({"a": [1, 2]}, b"", "corrupt header entry"),
    ],
)  # fmt: skip
def test_bad_headers_are_one_clear_error(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(K2ConvError, match=message) as err:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_header_length_past_end_and_bad_json(tmp_path: Path) -> None:
    p = tmp_path / "long.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(K2ConvError, match="exceeds the file"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(K2ConvError, match="not valid JSON"):
        SafetensorsFile(p)
    p.write_bytes(b"abc")
    with pytest.raises(K2ConvError, match="truncated"):
        SafetensorsFile(p)
    with pytest.raises(K2ConvError, match="missing"):
        SafetensorsFile(tmp_path / "absent.safetensors")
