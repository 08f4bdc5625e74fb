"""`k2conv quantize` end to end on tiny synthetic checkpoints: sizes, exactness, splits, bad input."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from gguf.quants import dequantize

from k2conv.cli import main
from k2conv.convert.checkpoint import Checkpoint
from k2conv.convert.naming import expert_of

VARIANTS = ["k2.5", "k2-thinking", "k2-instruct"]
RECIPES = ["f32", "bf16", "q8_0", "q4_0-native"]


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def planned_sizes(output: str) -> dict[str, int]:
    """file name → bytes, from the `--dry-run` report lines `  NAME.gguf: 1,234 bytes …`."""
    found = re.findall(r"^\s+(\S+\.gguf): ([\d,]+) bytes", output, flags=re.M)
    return {name: int(size.replace(",", "")) for name, size in found}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_sizes_equal_written_files(synth_ckpt, tmp_path: Path, variant: str, recipe: str) -> None:
    src = synth_ckpt(variant)
    out = tmp_path / "m.gguf"
    code, text = run_cli("quantize", src, out, "--recipe", recipe, "--dry-run")
    assert code == 0, text
    assert not out.exists()
    sizes = planned_sizes(text)
    code, text = run_cli("quantize", src, out, "--recipe", recipe, "--quiet")
    assert code == 0, text
    assert sizes == {p.name: p.stat().st_size for p in tmp_path.glob("*.gguf")}
    assert ("mmproj-m.gguf" in sizes) == (variant == "k2.5")
    reader = GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "deepseek2"


@pytest.mark.parametrize("variant", ["k2.5", "k2-thinking"])
def test_q4_0_native_experts_dequantize_bit_exactly(synth_ckpt, tmp_path: Path, variant: str) -> None:
    src = synth_ckpt(variant)
    out = tmp_path / "q4.gguf"
    assert run_cli("quantize", src, out, "--recipe", "q4_0-native", "--quiet")[0] == 0
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    ckpt = Checkpoint(src)
    n = 0
    for w in ckpt.weights:
        ex = expert_of(w.module)
        if ex is None:
            continue
        layer, e, proj = ex
        t = tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
        assert t.tensor_type.name == "Q4_0"
        got = dequantize(np.asarray(t.data)[e], t.tensor_type)
        np.testing.assert_array_equal(got, ckpt.read(w))
        n += 1
    assert n == 3 * ckpt.config.n_routed_experts * ckpt.config.n_moe_layers


def test_split_holds_same_tensor_bytes(synth_ckpt, tmp_path: Path) -> None:
    src = synth_ckpt("k2.5")
    single = tmp_path / "one.gguf"
    split = tmp_path / "split.gguf"
    assert run_cli("quantize", src, single, "--recipe", "q8_0", "--quiet")[0] == 0
    code, text = run_cli("quantize", src, split, "--recipe", "q8_0", "--split-max-size", "3M", "--quiet")
    assert code == 0, text
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) >= 3 and not split.exists()
    ref = {t.name: bytes(np.asarray(t.data).tobytes()) for t in GGUFReader(single).tensors}
    got: dict[str, bytes] = {}
    for i, shard in enumerate(shards):
        r = GGUFReader(shard)
        assert r.fields["split.no"].contents() == i
        assert r.fields["split.count"].contents() == len(shards)
        assert r.fields["split.tensors.count"].contents() == len(ref)
        for t in r.tensors:
            assert t.name not in got
            got[t.name] = bytes(np.asarray(t.data).tobytes())
    assert got == ref


# ---- bad input: one line, exit 2, nothing under the output name --------------------------------
def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("model-*.safetensors"))


def _expect_error(ckpt: Path, tmp_path: Path, message: str, *extra: str) -> None:
    out = tmp_path / "out.gguf"
    code, text = run_cli("quantize", ckpt, out, "--quiet", *extra)
    assert code == 2, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert message in lines[0], text
    assert not out.exists()
    assert not list(tmp_path.glob("out*.gguf"))


def test_missing_shard(synth_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    victim = _shards(ckpt)[1]
    victim.unlink()
    _expect_error(ckpt, tmp_path, f"{victim.name}: shard listed in model.safetensors.index.json is missing")


def test_truncated_shard(synth_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    victim = _shards(ckpt)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    _expect_error(ckpt, tmp_path, "truncated shard")


@pytest.mark.parametrize("damage", ["json", "length", "offsets"])
def test_corrupt_header(synth_ckpt, tmp_path: Path, damage: str) -> None:
    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    victim = _shards(ckpt)[0]
    data = bytearray(victim.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    if damage == "json":
        data[8] = ord("[") if data[8] != ord("[") else ord("{")
        data[9:12] = b"!!!"
        expected = "not valid JSON"
    elif damage == "length":
        data[:8] = struct.pack("<Q", len(data) * 2)
        expected = "exceeds the file"
    else:
        header = json.loads(data[8 : 8 + hlen])
        by_size: dict[int, list[str]] = {}
        for n, v in header.items():
            if n != "__metadata__":
                by_size.setdefault(v["data_offsets"][1] - v["data_offsets"][0], []).append(n)
        a, b = next(names for names in by_size.values() if len(names) > 1)[:2]
        header[b]["data_offsets"] = header[a]["data_offsets"][:]
        blob = json.dumps(header, separators=(",", ":")).encode().ljust(hlen)
        assert len(blob) == hlen
        data[8 : 8 + hlen] = blob
        expected = "overlap"
    victim.write_bytes(bytes(data))
    _expect_error(ckpt, tmp_path, expected)


def test_shard_name_escaping_folder(synth_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../" + index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    _expect_error(ckpt, tmp_path, "escapes the checkpoint folder")


def test_shape_disagrees_with_config(synth_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"]["moe_intermediate_size"] *= 2
    cfg_path.write_text(json.dumps(cfg))
    _expect_error(ckpt, tmp_path, "but the config implies")


def test_unsupported_quantization_config(synth_ckpt, tmp_path: Path) -> None:
    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    cfg_path.write_text(json.dumps(cfg))
    _expect_error(ckpt, tmp_path, "unsupported quantization_config: num_bits 8")


def test_nan_in_weight(synth_ckpt, tmp_path: Path) -> None:
    from k2conv.convert.safetensors_reader import SafetensorsFile

    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    shard = ckpt / index["weight_map"][name]
    f = SafetensorsFile(shard)
    entry, start = f.entries[name], f.data_start
    f.close()
    data = bytearray(shard.read_bytes())
    data[start + entry.begin + 6 : start + entry.begin + 8] = b"\xc0\x7f"  # bf16 NaN
    shard.write_bytes(bytes(data))
    _expect_error(ckpt, tmp_path, f"tensor {name}: contains NaN or Inf")


def test_not_enough_disk_space(synth_ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import k2conv.convert.writer as writer

    real = shutil.disk_usage
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    _expect_error(synth_ckpt("k2.5"), tmp_path, "not enough disk space")


def test_existing_output_needs_force(synth_ckpt, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    code, text = run_cli("quantize", synth_ckpt("k2.5"), out, "--quiet")
    assert code == 2 and "use --force" in text
    assert out.read_bytes() == b"keep me"
    assert run_cli("quantize", synth_ckpt("k2.5"), out, "--quiet", "--force")[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_override_rules(synth_ckpt, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    code, text = run_cli("quantize", synth_ckpt("k2.5"), out, "--recipe", "q8_0", "--override", r"ffn_down_exps=Q4_0",
                         "--override", r"attn_output=F16", "--quiet")  # fmt: skip
    assert code == 0, text
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.1.ffn_down_exps.weight"] == "Q4_0"
    assert types["blk.1.attn_output.weight"] == "F16"
    assert types["blk.1.ffn_up_exps.weight"] == "Q8_0"
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"
    code, text = run_cli("quantize", synth_ckpt("k2.5"), out, "--override", "nothing_matches=Q8_0", "--force")
    assert code == 2 and "matches no tensor" in text
    code, text = run_cli("quantize", synth_ckpt("k2.5"), out, "--override", "x(=Q8_0", "--force")
    assert code == 2 and "does not compile" in text
    code, text = run_cli("quantize", synth_ckpt("k2.5"), out, "--override", "x=Q7_7", "--force")
    assert code == 2 and "unknown tensor type" in text


def test_every_legacy_type_round_trips(synth_ckpt, tmp_path: Path) -> None:
    """F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 through gguf's quantizers: gguf's dequantizer gives
    the source back within each type's step, and 128-wide rows keep 32-blocks."""
    src = synth_ckpt("k2-instruct")
    out = tmp_path / "mix.gguf"
    rules = ["attn_q_a=F16", "attn_q_b=BF16", "attn_kv_a_mqa=Q4_0", "attn_output=Q4_1", "attn_k_b=Q5_0",
             "attn_v_b=Q5_1", "ffn_down_exps=Q8_0"]  # fmt: skip
    code, text = run_cli("quantize", src, out, "--recipe", "f32", *[a for r in rules for a in ("--override", r)], "--quiet")
    assert code == 0, text
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    ckpt = Checkpoint(src)
    step = {"F16": 1e-3, "BF16": 8e-3, "Q4_0": 0.16, "Q4_1": 0.1, "Q5_0": 0.07, "Q5_1": 0.05, "Q8_0": 0.01}
    for rule in rules:
        pattern, tname = rule.split("=")
        t = tensors[f"blk.1.{pattern}.weight"]
        assert t.tensor_type.name == tname
        got = dequantize(np.asarray(t.data), t.tensor_type)
        w = next(w for w in ckpt.weights if w.module.endswith({
            "attn_q_a": "q_a_proj", "attn_q_b": "q_b_proj", "attn_kv_a_mqa": "kv_a_proj_with_mqa",
            "attn_output": "o_proj", "attn_k_b": "kv_b_proj", "attn_v_b": "kv_b_proj",
            "ffn_down_exps": "experts.0.down_proj"}[pattern]) and ".layers.1." in w.module)  # fmt: skip
        src_w = ckpt.read(w)
        if pattern == "attn_k_b":
            src_w = src_w.reshape(got.shape[0], -1, src_w.shape[1])[:, :128].transpose(0, 2, 1)
        elif pattern == "attn_v_b":
            src_w = src_w.reshape(got.shape[0], -1, src_w.shape[1])[:, 128:]
        elif pattern == "ffn_down_exps":
            got = got[0]
        scale = np.abs(src_w).max()
        assert np.abs(got - src_w.reshape(got.shape)).max() <= step[tname] * scale, tname


def test_workers_do_not_change_a_byte(synth_ckpt, tmp_path: Path) -> None:
    src = synth_ckpt("k2-instruct")
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    assert run_cli("quantize", src, one, "--recipe", "q8_0", "--workers", "1", "--quiet")[0] == 0
    assert run_cli("quantize", src, two, "--recipe", "q8_0", "--workers", "2", "--quiet")[0] == 0
    assert one.read_bytes() == two.read_bytes()


def test_int4_scale_float16_cannot_hold(synth_ckpt, tmp_path: Path) -> None:
    """A bf16 scale below float16's range must not be rounded silently by the exact repack."""
    from k2conv.convert.safetensors_reader import SafetensorsFile

    ckpt = _copy(synth_ckpt("k2.5"), tmp_path)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "language_model.model.layers.2.mlp.experts.3.up_proj.weight_scale"
    shard = ckpt / index["weight_map"][name]
    f = SafetensorsFile(shard)
    start = f.data_start + f.entries[name].begin
    f.close()
    data = bytearray(shard.read_bytes())
    data[start : start + 2] = np.array([0x3000], dtype="<u2").tobytes()  # bf16 2**-31: far below f16's range
    shard.write_bytes(bytes(data))
    _expect_error(ckpt, tmp_path, f"{name}: 1 of ")
    out = tmp_path / "out.gguf"
    code, text = run_cli("quantize", ckpt, out, "--quiet", "--no-mmproj", "--override", r"blk\.2\.ffn_up_exps=F32")
    assert code == 0, text
    t = next(t for t in GGUFReader(out).tensors if t.name == "blk.2.ffn_up_exps.weight")
    w = next(w for w in Checkpoint(ckpt).weights if w.module.endswith("layers.2.mlp.experts.3.up_proj"))
    np.testing.assert_array_equal(np.asarray(t.data)[3], Checkpoint(ckpt).read(w))  # exact in F32
    result = CliRunner().invoke(main, ["quantize", str(ckpt), str(out), "--quiet", "--no-mmproj", "--force",
                                       "--allow-inexact-scales"])  # fmt: skip
    assert result.exit_code == 0 and "warning:" in result.output and "rounded" in result.output
