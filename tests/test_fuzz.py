"""Hostile input: thousands of mutated files through every parser of user-supplied bytes.

Each parser must either accept the input or raise one K2ConvError line (the CLI prints it and exits
2), within a per-example time limit (a hang fails the example), allocating no more than a small
multiple of the file's size (a lying length field must not drive an allocation). Parsers covered:
the safetensors header (SafetensorsFile), the checkpoint index and config (Checkpoint), GGUF files
(`verify_integrity`, `open_gguf_reader`, and the bounds-checking scan they share, whose values and
tensor views the runner reads) and the journal.
The imatrix reader has its own fuzz test in test_imatrix.py.

Byte-level mutations (bit flips, 4/8-byte overwrites with boundary values, truncation, insertion)
find lying length fields; structured mutations (hostile JSON values in the right places) reach the
checks behind the JSON parser.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.integrity import verify_integrity
from k2conv.convert.journal import load_journal
from k2conv.convert.safetensors_reader import SafetensorsFile
from k2conv.errors import K2ConvError
from k2conv.gguf_scan import open_gguf_reader, scan_file

sys.path.insert(0, str(Path(__file__).parent))
from gguf_seeds import write_seed
from mutations import mutate, mutations

TIME_LIMIT_S = 2.0
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def fuzz(n: int) -> settings:
    """n examples, no deadline (the per-example timer in `bounded` is the hang check), no database."""
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=_HEALTH)


class Hang(Exception):
    """Raised by the per-example timer: the parser ran past TIME_LIMIT_S."""


@contextmanager
def bounded(path: Path, slack: int = 1 << 20, factor: int = 64) -> Iterator[None]:
    """Fail the example on a hang (SIGALRM timer) or an allocation beyond slack + factor × file size."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"{path.name}: still running after {TIME_LIMIT_S} s")

    limit = slack + factor * path.stat().st_size
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= limit, f"{peak:,} bytes allocated for a {path.stat().st_size:,}-byte input"


def clean_error(exc: K2ConvError) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)


# ---- hostile JSON values ------------------------------------------------------------------------------
HOSTILE_SCALARS = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63), 1e308, -0.0, 0.5,
                     "", "F32", "BF16", "I64", "../x", "/etc/passwd", "a\0b", "model.safetensors", "config.json",
                     ".", "..", "model-00001-of-000006.safetensors", "ü" * 3]),
    st.integers(), st.floats(allow_nan=False), st.text(max_size=12),
)  # fmt: skip
HOSTILE = st.recursive(HOSTILE_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                       max_leaves=12)  # fmt: skip


def deep(n: int) -> str:
    return "[" * n + "]" * n


def replace_at(doc: object, path: list[int], value: object) -> object:
    """Replace one node of a JSON document, chosen by a list of child indices (wrapping around)."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    if isinstance(doc, dict):
        keys = list(doc)
        key = keys[path[0] % len(keys)]
        return {**doc, key: replace_at(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return [*doc[:i], replace_at(doc[i], path[1:], value), *doc[i + 1 :]]


# ---- safetensors ---------------------------------------------------------------------------------------
def _safetensors_seed() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "w.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
        "w.weight_scale_inv": {"dtype": "F32", "shape": [1, 1], "data_offsets": [12, 16]},
        "e.weight": {"dtype": "F8_E4M3", "shape": [4, 2], "data_offsets": [16, 24]},
        "p.weight_packed": {"dtype": "I32", "shape": [2, 1], "data_offsets": [24, 32]},
        "p.weight_shape": {"dtype": "I64", "shape": [2], "data_offsets": [32, 48]},
        "empty": {"dtype": "F16", "shape": [0, 4], "data_offsets": [48, 48]},
    }
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + bytes(range(48))


SAFETENSORS_SEED = _safetensors_seed()


def read_all_safetensors(path: Path) -> None:
    f = SafetensorsFile(path)
    try:
        for name in f.names():
            arr = f.raw(name)
            assert arr.nbytes == f.entries[name].nbytes
            f.release(name)
    finally:
        f.close()


def check_safetensors(path: Path) -> None:
    with bounded(path):
        try:
            read_all_safetensors(path)
        except K2ConvError as exc:
            clean_error(exc)


@fuzz(1500)
@given(ops=mutations(len(SAFETENSORS_SEED) + 8))
def test_fuzz_safetensors_bytes(tmp_path: Path, ops: list[tuple[str, int, int]]) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(mutate(SAFETENSORS_SEED, ops))
    check_safetensors(path)


@fuzz(1000)
@given(where=st.lists(st.integers(0, 50), max_size=4), value=HOSTILE, lie=st.sampled_from([None, 0, -1, 1, 1 << 40, (1 << 64) - 1]))
def test_fuzz_safetensors_json(tmp_path: Path, where: list[int], value: object, lie: int | None) -> None:
    """Hostile values at any place in the header JSON, with an honest or lying header length."""
    (n,) = struct.unpack_from("<Q", SAFETENSORS_SEED)
    doc = replace_at(json.loads(SAFETENSORS_SEED[8 : 8 + n]), where, value)
    blob = json.dumps(doc).encode()
    length = len(blob) if lie is None else (len(blob) + lie) % 2**64
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + blob + SAFETENSORS_SEED[8 + n :])
    check_safetensors(path)


@pytest.mark.parametrize("blob", [deep(100_000).encode(), b"1" * 5000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe{}", b"{}" * 3, b"[]"])
def test_safetensors_json_edge_cases(tmp_path: Path, blob: bytes) -> None:
    """JSON that makes the stdlib parser raise something other than JSONDecodeError."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(K2ConvError) as exc:
        read_all_safetensors(path)
    clean_error(exc.value)


# ---- checkpoint index and config -----------------------------------------------------------------------
class CkptSeed(tuple):
    """(folder, index bytes, config bytes), with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"CkptSeed({self[0]})"


@pytest.fixture(scope="module")
def ckpt_dir(synth_ckpt, tmp_path_factory: pytest.TempPathFactory) -> CkptSeed:
    """A tiny checkpoint whose shards are symlinks, so each example rewrites only the two JSON files."""
    src = synth_ckpt("k2.5")
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    for p in src.iterdir():
        if p.suffix == ".safetensors":
            (root / p.name).symlink_to(p)
        else:
            shutil.copy(p, root / p.name)
    return CkptSeed((root, (src / "model.safetensors.index.json").read_bytes(), (src / "config.json").read_bytes()))


def check_checkpoint(root: Path) -> None:
    index = root / "model.safetensors.index.json"
    with bounded(index, slack=16 << 20):
        try:
            Checkpoint(root).close()
        except K2ConvError as exc:
            clean_error(exc)


@fuzz(250)
@given(which=st.sampled_from(["index", "config"]), ops=mutations(1 << 15))
def test_fuzz_checkpoint_bytes(ckpt_dir: CkptSeed, which: str, ops: list[tuple[str, int, int]]) -> None:
    root, index, config = ckpt_dir
    (root / "model.safetensors.index.json").write_bytes(mutate(index, ops) if which == "index" else index)
    (root / "config.json").write_bytes(mutate(config, ops) if which == "config" else config)
    check_checkpoint(root)


@fuzz(400)
@given(which=st.sampled_from(["index", "config"]), where=st.lists(st.integers(0, 400), max_size=4), value=HOSTILE)
def test_fuzz_checkpoint_json(ckpt_dir: CkptSeed, which: str, where: list[int], value: object) -> None:
    """A hostile value anywhere in the index (weight_map names, shard names) or the config."""
    root, index, config = ckpt_dir
    if which == "index":
        doc = json.loads(index)
        if where and where[0] % 2:  # mostly aim at the weight map
            doc["weight_map"] = replace_at(doc["weight_map"], where[1:], value)
        else:
            doc = replace_at(doc, where, value)
        index = json.dumps(doc).encode()
    else:
        config = json.dumps(replace_at(json.loads(config), where, value)).encode()
    (root / "model.safetensors.index.json").write_bytes(index)
    (root / "config.json").write_bytes(config)
    check_checkpoint(root)


@pytest.mark.parametrize("which", ["index", "config"])
@pytest.mark.parametrize("blob", [deep(100_000).encode(), b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe", b""])
def test_checkpoint_json_edge_cases(ckpt_dir: CkptSeed, which: str, blob: bytes) -> None:
    root, index, config = ckpt_dir
    (root / "model.safetensors.index.json").write_bytes(blob if which == "index" else index)
    (root / "config.json").write_bytes(blob if which == "config" else config)
    with pytest.raises(K2ConvError) as exc:
        Checkpoint(root)
    clean_error(exc.value)


@pytest.mark.parametrize("key", ["num_hidden_layers", "n_routed_experts", "first_k_dense_replace", "hidden_size",
                                 "vocab_size", "num_attention_heads", "q_lora_rank", "moe_layer_freq", "n_group"])
@pytest.mark.parametrize("value", [10**12, 2**64 + 1, -1, 1.5, "7", [3], float("inf")])
def test_checkpoint_config_lying_counts(ckpt_dir: CkptSeed, key: str, value: object) -> None:
    """A config whose sizes lie (10¹² layers would otherwise mean 10¹² weight descriptions) fails fast."""
    root, index, config = ckpt_dir
    doc = json.loads(config)
    doc["text_config"][key] = value
    (root / "model.safetensors.index.json").write_bytes(index)
    path = root / "config.json"
    path.write_text(json.dumps(doc).replace("Infinity", "1e999"))
    with bounded(path, slack=16 << 20):
        try:
            Checkpoint(root).close()
        except K2ConvError as exc:
            clean_error(exc)


# ---- GGUF ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("gguf-seeds")
    (single,) = write_seed(d, "single.gguf")
    first = write_seed(d, "split.gguf", split_max_size=200)[1]
    return {"single": single.read_bytes(), "shard": first.read_bytes()}


@fuzz(1200)
@given(which=st.sampled_from(["single", "shard"]), ops=mutations(1 << 11))
def test_fuzz_gguf(tmp_path: Path, gguf_seeds: dict[str, bytes], which: str, ops: list[tuple[str, int, int]]) -> None:
    """Every mutant: verify never raises, reports every changed file as not intact, GGUFReader behind the
    scan either reads every tensor and field or fails as one K2ConvError line, and so does what the runner
    reads instead (the scan's values and tensor views), which equal GGUFReader's wherever both read."""
    seed = gguf_seeds[which]
    data = mutate(seed, ops)
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    with bounded(path):
        report = verify_integrity([path], threads=1)
    assert len(report.files) == 1
    if data == seed:
        assert report.exit_code == 0, report.render()
    else:
        assert report.exit_code != 0, f"a changed file passed: {ops}"
        assert all("\n" not in p for p in report.files[0].problems)
    reader = header = None
    with bounded(path):
        try:
            reader = open_gguf_reader(path)
        except K2ConvError as exc:
            clean_error(exc)
        else:
            for t in reader.tensors:
                assert np.asarray(t.data).nbytes == t.n_bytes
            for fld in reader.fields.values():
                fld.contents()
    with bounded(path):
        try:
            header = scan_file(path)
            values = {key: header.value(key) for key in header.kv}
            views = {t.name: header.tensor_bytes(t) for t in header.tensors}
        except K2ConvError as exc:
            clean_error(exc)
    if reader is not None:
        assert header is not None
        fields = {k: repr(f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert {k: repr(v) for k, v in values.items()} == fields
        assert [(t.name, t.qtype, t.offset, t.nbytes) for t in header.tensors] == [
            (t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors
        ]
        for t in reader.tensors:
            assert views[t.name].tobytes() == np.asarray(t.data).tobytes(), t.name
    del reader, header


def test_scan_refuses_lying_array_before_gguf_reader(tmp_path: Path, gguf_seeds: dict[str, bytes]) -> None:
    """The case that hangs gguf-py's GGUFReader: an array claiming 2⁶⁰ elements."""
    seed = gguf_seeds["single"]
    at = seed.index(b"tokenizer.ggml.token_type") + len(b"tokenizer.ggml.token_type") + 8  # after ARRAY, INT32 tags
    path = tmp_path / "lie.gguf"
    path.write_bytes(seed[:at] + struct.pack("<Q", 1 << 60) + seed[at + 8 :])
    with bounded(path), pytest.raises(K2ConvError, match="claims 1152921504606846976 values") as exc:
        open_gguf_reader(path)
    clean_error(exc.value)
    report = verify_integrity([path], threads=1)
    assert report.exit_code == 1 and "claims" in report.render()


@pytest.mark.parametrize("data", [b"", b"GGU", b"GGUF", b"GGUF\x03\0\0\0", b"NOPE" * 10, b"GGUF\0\0\0\x03" + bytes(16)])
def test_gguf_tiny_and_foreign_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "t.gguf"
    path.write_bytes(data)
    with pytest.raises(K2ConvError) as exc:
        open_gguf_reader(path)
    clean_error(exc.value)
    assert verify_integrity([path], threads=1).exit_code == 1


# ---- journal ------------------------------------------------------------------------------------------
@fuzz(300)
@given(ops=mutations(400))
def test_fuzz_journal(tmp_path: Path, ops: list[tuple[str, int, int]]) -> None:
    """A damaged journal loads as a shorter valid prefix (or not at all), never raises."""
    lines = [json.dumps({"version": 1, "plan": "p", "options": {}, "inputs": {"/x": [1, 2]}})]
    lines += [json.dumps({"u": i, "crc": i * 7919}) for i in range(12)] + ['{"done": true}']
    path = tmp_path / "j.journal"
    path.write_bytes(mutate(("\n".join(lines) + "\n").encode(), ops))
    with bounded(path):
        journal = load_journal(path)
    if journal is not None:
        assert journal.valid_bytes <= path.stat().st_size
        assert all(isinstance(u, int) and isinstance(c, int) for u, c in journal.finished.items())
        os.truncate(path, journal.valid_bytes)
        again = load_journal(path)
        assert again is not None and again.finished == journal.finished


def test_control_characters_in_names_stay_on_one_line(tmp_path: Path) -> None:
    """A tensor named with a newline or an escape sequence must not split or colour the one-line error."""
    header = json.dumps({"a\n\x1b[31mb": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(K2ConvError) as exc:
        SafetensorsFile(path)
    msg = str(exc.value)
    assert "\n" not in msg and "\x1b" not in msg and "a\\n\\x1b[31mb" in msg, msg


# ---- relayout files ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relayout_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small relayout file: two layers of three Q4_0 experts (gate, up, down) plus a norm, records aligned to 256."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from k2conv.layouts.relayout import relayout

    d = tmp_path_factory.mktemp("relayout-seed")
    rng = np.random.default_rng(0)
    w = GGUFWriter(d / "in.gguf", "deepseek2")
    w.add_block_count(2)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    for layer in (0, 1):
        for proj, (rows, cols) in (("gate", (4, 32)), ("up", (4, 32)), ("down", (32, 32))):
            raw = rng.integers(0, 256, (3, rows, cols // 32 * 18), dtype=np.uint8)
            w.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", raw, raw_dtype=GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    relayout([d / "in.gguf"], d / "rl.gguf", 256)
    return (d / "rl.gguf").read_bytes()


@fuzz(400)
@given(ops=mutations(1 << 13))
def test_fuzz_relayout_reader(tmp_path: Path, relayout_seed: bytes, ops: list[tuple[str, int, int]]) -> None:
    """Every mutant of a relayout file: verify flags it, and reading its layout, every record and a
    restore either work or fail as one K2ConvError line (no hang, no allocation beyond the file)."""
    from k2conv.layouts.relayout import open_layout, restore

    data = mutate(relayout_seed, ops)
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    assert verify_integrity([path], threads=1).exit_code == (0 if data == relayout_seed else 1) or data != relayout_seed
    out = tmp_path / "back.gguf"
    with bounded(path):
        try:
            _, layout = open_layout(path)
            for layer in layout.layers:
                for e in range(layout.n_expert):
                    offset, size = layout.record(layer, e)
                    assert offset >= 0 and offset + size <= len(data), (layer, e, offset, size)
            restore(path, out)
        except K2ConvError as exc:
            clean_error(exc)
