"""orcd.GGUFFile against files written by the `gguf` package, and on the real model."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

import orcd


def _write_all_types(path):
    """A GGUF with every metadata value type and a few tensors, via gguf's writer."""
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <|im_start|> ✓")
    w.add_array("t.arr_int", [1, -2, 3])
    w.add_array("t.arr_float", [0.5, 1.5])
    w.add_array("t.arr_str", ["a", "", "ĠHello"])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 8)).astype(np.float32)  # numpy [ne1=3, ne0=8]
    b = rng.standard_normal((64,)).astype(np.float16)
    w.add_tensor("a", a)
    w.add_tensor("b", b)
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return a, b, q


def test_metadata_and_tensors_from_gguf_writer(tmp_path):
    p = tmp_path / "all.gguf"
    a, b, q = _write_all_types(p)
    with orcd.GGUFFile(p) as f:
        md = f.metadata
        assert f.version == 3
        assert md["general.architecture"] == "qwen2"
        assert md["t.u8"] == 200 and md["t.i8"] == -100
        assert md["t.u16"] == 65000 and md["t.i16"] == -32000
        assert md["t.u32"] == 4_000_000_000 and md["t.i32"] == -2_000_000_000
        assert md["t.f32"] == pytest.approx(0.1, rel=1e-7) and md["t.f64"] == 1e-300
        assert md["t.u64"] == 2**63 + 5 and md["t.i64"] == -(2**62)
        assert md["t.bool"] is True
        assert md["t.str"] == "héllo <|im_start|> ✓"
        assert list(md["t.arr_int"]) == [1, -2, 3]
        assert md["t.arr_float"].dtype == np.float32 and list(md["t.arr_float"]) == [0.5, 1.5]
        assert md["t.arr_str"] == ["a", "", "ĠHello"]
        assert list(md["t.arr_bool"]) == [True, False, True]
        assert [list(x) for x in md["t.arr_nested"]] == [[1, 2], [3]]
        # the gguf package's own reader agrees on every key
        r = gguf.GGUFReader(str(p))
        assert set(r.fields) - set(md) == {k for k in r.fields if k.startswith("GGUF.")}

        names = [t.name for t in f.tensors]
        assert names == ["a", "b", "q"]
        ta = f.tensor_info("a")
        assert ta.shape == (8, 3)  # ne order: contiguous axis first
        assert ta.type == "F32" and ta.nbytes == 3 * 8 * 4
        assert np.array_equal(f.dequantize("a"), a)  # shape ne reversed = numpy's [3, 8]
        assert np.array_equal(f.dequantize("b"), b.astype(np.float32))
        assert f.tensor_info("q").type == "Q8_0"
        raw = f.tensor("q")
        assert raw.dtype == np.uint8 and raw.nbytes == q.nbytes and not raw.flags.writeable
        assert np.array_equal(raw, q.reshape(-1))
        ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(f.dequantize("q"), ref)
        assert np.array_equal(f.dequantize_rows("q", 1, 2), ref[1:2])
        with pytest.raises(ValueError, match="rows"):
            f.dequantize_rows("q", 1, 5)
        with pytest.raises(ValueError, match="missing tensor 'nope'"):
            f.dequantize("nope")
    # closed: data access fails cleanly, views taken before stay valid
    assert f.closed
    with pytest.raises(ValueError, match="closed"):
        f.dequantize("a")
    assert raw.sum() == q.reshape(-1).sum()


def test_bad_files_raise_clear_errors(tmp_path):
    p = tmp_path / "all.gguf"
    _write_all_types(p)
    data = p.read_bytes()
    with pytest.raises(ValueError, match="bad magic"):
        (tmp_path / "m.gguf").write_bytes(b"GGUX" + data[4:])
        orcd.GGUFFile(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="empty file"):
        (tmp_path / "e.gguf").write_bytes(b"")
        orcd.GGUFFile(tmp_path / "e.gguf")
    with pytest.raises(ValueError, match="cannot open"):
        orcd.GGUFFile(tmp_path / "missing.gguf")
    # every truncation point of this small file before the end of the last
    # tensor's data (what follows is padding): an error, never a crash
    with orcd.GGUFFile(p) as f:
        end = f.data_offset + max(t.offset + t.nbytes for t in f.tensors)
    for n in list(range(0, end, 7)) + [end - 1]:
        (tmp_path / "t.gguf").write_bytes(data[:n])
        with pytest.raises(ValueError, match="t.gguf"):
            orcd.GGUFFile(tmp_path / "t.gguf")


def test_real_model_listing(real_model_path):
    with orcd.GGUFFile(real_model_path) as f:
        assert len(f.tensors) == 291
        counts = {}
        for t in f.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        assert counts == {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
        emb = f.tensor_info("token_embd.weight")
        assert emb.shape == (896, 151936)
        md = f.metadata
        assert md["general.architecture"] == "qwen2"
        assert md["qwen2.block_count"] == 24
        r = gguf.GGUFReader(real_model_path)
        assert len(md["tokenizer.ggml.tokens"]) == len(r.fields["tokenizer.ggml.tokens"].data)
        assert md["tokenizer.ggml.tokens"][151644] == "<|im_start|>"
        # token id's row starts at id*896: row 17 equals the gguf package's row 17
        t = next(t for t in r.tensors if t.name == "token_embd.weight")
        ref = gguf.quants.dequantize(t.data[17:18], t.tensor_type)
        assert np.array_equal(f.dequantize_rows("token_embd.weight", 17, 18), ref.reshape(1, 896))


def _orcd_cli(*args):
    return subprocess.run([sys.executable, "-m", "orcd.cli", *args], capture_output=True, text=True, timeout=600)


def test_inspect_real_model(real_model_path):
    p = _orcd_cli("inspect", real_model_path, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["tensor_count"] == 291
    assert {k: v["count"] for k, v in d["totals_by_type"].items()} == {
        "Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
    assert d["hparams"]["block_count"] == 24 and d["hparams"]["rope.freq_base"] == 1e6
    assert d["tokenizer"]["model"] == "gpt2" and d["tokenizer"]["vocab_size"] == len(
        orcd.GGUFFile(real_model_path).metadata["tokenizer.ggml.tokens"])
    assert d["chat_template"] is True
    txt = _orcd_cli("inspect", real_model_path)
    assert txt.returncode == 0 and "Q4_K   x12" in txt.stdout and "token_embd.weight" in txt.stdout


def test_truncated_real_model_names_the_tensor(real_model_path, tmp_path):
    """A truncated copy gives a one-line error naming the tensor that runs past the end."""
    cut = tmp_path / "cut.gguf"
    size = os.path.getsize(real_model_path)
    with open(real_model_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size - 1000))
    p = _orcd_cli("inspect", str(cut))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "cut.gguf" in lines[0] and "past the end" in lines[0] and "tensor '" in lines[0]
    # truncated inside the metadata: names the field
    with open(real_model_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(100_000))
    p = _orcd_cli("inspect", str(cut))
    assert p.returncode == 1 and "metadata key 'tokenizer.ggml.tokens'" in p.stderr and "does not fit" in p.stderr


def test_random_corruption_never_crashes(tmp_path):
    """Flip random bytes of a valid file: the reader either opens it or raises
    ValueError naming the file; a subprocess guards against hard crashes."""
    p = tmp_path / "all.gguf"
    _write_all_types(p)
    script = f"""
import random, sys
sys.path.insert(0, {repr(str(tmp_path))})
import orcd
data = open({repr(str(p))}, 'rb').read()
rng = random.Random(1234)
opened = failed = 0
for i in range(400):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        k = rng.randrange(len(b))
        b[k] = rng.randrange(256)
    q = {repr(str(tmp_path / 'fuzz.gguf'))}
    open(q, 'wb').write(bytes(b))
    try:
        with orcd.GGUFFile(q) as f:
            f.metadata
            for t in f.tensors:
                if t.type in ('F32', 'F16', 'Q8_0'):
                    f.dequantize(t.name)
        opened += 1
    except ValueError as e:
        assert 'fuzz.gguf' in str(e) or 'tensor' in str(e), e
        failed += 1
print(opened, failed)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    opened, failed = map(int, r.stdout.split())
    assert opened + failed == 400 and failed > 0
