"""Small k2conv-style GGUF files (with checksums) built through the real plan machinery.

The fuzz and integrity tests need GGUFs of a few KB: the real tiny model is 15 MB, too big to
rewrite thousands of times. These go through `build_plan` (the same header serialization and
checksum slots as `k2conv quantize`) and `PlannedFile.header_with`; only the tensor bytes are
random instead of quantized weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from k2conv.convert.integrity import crc32c
from k2conv.convert.plan import WEIGHT, PlannedTensor, build_plan, pad
from k2conv.quant.types import tensor_bytes

SHAPES = [
    ("token_embd.weight", (3, 64), GGMLQuantizationType.Q8_0),
    ("blk.0.attn_norm.weight", (7,), GGMLQuantizationType.F32),
    ("blk.0.ffn_down_exps.weight", (2, 4, 32), GGMLQuantizationType.Q4_0),
    ("output.weight", (3, 5), GGMLQuantizationType.F16),
]


def _metadata(w: GGUFWriter, file_type: int) -> None:
    w.add_string("general.name", "seed")
    w.add_uint32("general.file_type", file_type)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "<|x|>", "ü"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 1])
    w.add_float32("deepseek2.rope.freq_base", 50000.0)


def write_seed(folder: Path, name: str = "seed.gguf", split_max_size: int = 0, seed: int = 0) -> list[Path]:
    """Write a small checksummed GGUF (or split set) into `folder`; returns its file(s)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = [PlannedTensor(n, s, q, WEIGHT, (), tensor_bytes(q, s)) for n, s, q in SHAPES]
    plan = build_plan(None, tensors, folder / name, _metadata, recipe_name="seed",  # type: ignore[arg-type]
                      split_max_size=split_max_size)
    for f in plan.files:
        datas = [rng.integers(0, 256, t.nbytes, dtype=np.uint8).tobytes() for t in f.tensors]
        body = bytearray(f.header_with([crc32c(d) for d in datas]))
        body.extend(bytes(f.data_start - len(body)))
        for d in datas:
            body.extend(d + bytes(pad(len(d)) - len(d)))
        assert len(body) == f.size
        f.path.write_bytes(bytes(body))
    return [f.path for f in plan.files]
